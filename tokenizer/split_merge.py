"""Split-and-merge unigram training for samples larger than sentencepiece can hold.

sentencepiece needs roughly ten times its input in memory. BloombergGPT trained its
tokenizer by splitting the data into chunks, training a unigram model on each, and
merging them. Here: the sample is dealt line by line into chunks of about
`chunk_bytes` (so every chunk mirrors the mix), each chunk is trained in its own
process (one per core at a time, so the peak memory is that of a chunk, not of the
sample), and the models are merged: each piece's probability is the sum of its
probabilities in the chunk models weighted by the chunks' shares of the bytes (a
piece a chunk never learnt counts as 0 there, so pieces found in few chunks sink).
The most probable pieces are kept up to `vocab_size`, their scores set to the log of
the renormalised merged probabilities, and the result is written back as a
sentencepiece unigram model, so it converts to Hugging Face like any other.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dapt.tokenizer.config import TokenizerTrainConfig
from dapt.tokenizer.sentencepiece_trainer import train_in_subprocess


def deal_chunks(lines: list[str], chunk_bytes: float) -> list[list[str]]:
    """Lines dealt round-robin into as many chunks as `chunk_bytes` asks for; every chunk sees every corpus."""
    total = sum(len(line.encode("utf-8")) + 1 for line in lines)
    count = max(1, min(len(lines), math.ceil(total / chunk_bytes)))
    return [lines[start::count] for start in range(count)]


def train_split_merge(lines: list[str], config: TokenizerTrainConfig) -> tuple[bytes, int]:
    """A serialized sentencepiece unigram model merged from models trained on chunks of `lines`,
    and the largest peak resident memory of a chunk process in bytes."""
    chunks = deal_chunks(lines, config.chunk_bytes)
    sizes = [sum(len(line.encode("utf-8")) + 1 for line in chunk) for chunk in chunks]
    with tempfile.TemporaryDirectory(prefix="dapt-chunks-") as folder:
        settings = Path(folder) / "config.json"
        settings.write_text(config.model_dump_json())
        paths = []
        for index, chunk in enumerate(chunks):
            paths.append(Path(folder) / f"chunk{index:05d}.txt")
            paths[-1].write_text("\n".join(chunk) + "\n", encoding="utf-8")
        del chunks  # the children read their chunk from disk
        done = 0

        def train(path: Path) -> tuple[bytes, int]:
            nonlocal done
            model, peak = train_in_subprocess(path, settings, threads=1)
            done += 1
            print(f"tokenizer: chunk {done}/{len(paths)} trained (peak memory {peak / 2**20:,.0f} MiB)", flush=True)
            return model, peak

        # One fresh interpreter per chunk, as many at once as there are cores, each with one
        # sentencepiece thread: a child holds one chunk, nothing of this process.
        with ThreadPoolExecutor(min(len(paths), os.cpu_count() or 1)) as pool:
            results = list(pool.map(train, paths))
    return merge_models([model for model, _ in results], sizes, config.vocab_size), max(peak for _, peak in results)


def merge_models(models: list[bytes], weights: list[float], vocab_size: int) -> bytes:
    """One unigram model from several: size-weighted piece probabilities, pruned to `vocab_size`.

    Control, user-defined and byte pieces are kept as the first model has them (same ids);
    single characters learnt by any chunk are kept first (the most probable, should they
    outnumber `vocab_size`), so no chunk's alphabet is lost.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    normal = pb.ModelProto.SentencePiece.NORMAL
    protos = []
    for serialized in models:
        proto = pb.ModelProto()
        proto.ParseFromString(serialized)
        protos.append(proto)
    total = sum(weights)
    merged: dict[str, float] = defaultdict(float)
    for proto, weight in zip(protos, weights):
        for piece in proto.pieces:
            if piece.type == normal:
                merged[piece.piece] += weight / total * math.exp(piece.score)
    template = protos[0]
    fixed = [piece for piece in template.pieces if piece.type != normal]
    budget = max(0, vocab_size - len(fixed))
    by_probability = sorted(merged, key=lambda p: (-merged[p], p))
    characters = [p for p in by_probability if len(p) == 1][:budget]
    kept = characters + [p for p in by_probability if len(p) > 1][: budget - len(characters)]
    norm = sum(merged[p] for p in kept)
    del template.pieces[:]
    template.pieces.extend(fixed)
    for piece in sorted(kept, key=lambda p: (-merged[p], p)):
        template.pieces.add(piece=piece, score=math.log(merged[piece] / norm), type=normal)
    template.trainer_spec.vocab_size = len(template.pieces)
    return template.SerializeToString()

