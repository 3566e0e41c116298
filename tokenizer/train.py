"""Train a sentencepiece tokenizer on a mix-weighted sample and save it for Hugging Face.

In: the experiment's corpora, their target mix shares and `tokenizer.train`.
Out: a folder with `tokenizer.json` + `tokenizer_config.json` (loadable by
`AutoTokenizer` in transformers 4.x and 5.x as `PreTrainedTokenizerFast`) and the
sentencepiece model beside it. The sample excludes held-out documents so that
held-out bits-per-byte is measured on text the tokenizer never saw.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from dapt.data_mix.config import CorpusConfig, HeldoutConfig
from dapt.data_mix.sources import CorpusReader
from dapt.data_mix.split import content_hash, heldout_threshold
from dapt.base import DaptError
from dapt.tokenizer.config import SPECIAL_TOKENS, TokenizerTrainConfig
from dapt.tokenizer.files import make_portable
from dapt.tokenizer.sentencepiece_trainer import train_sentencepiece
from dapt.tokenizer.split_merge import train_split_merge

SPM_FILE = "sentencepiece.model"
# sentencepiece drops training sentences longer than this many bytes; documents are fed line by line.


def draw_sample(corpora: list[CorpusConfig], shares: dict[str, float], heldout: HeldoutConfig, sample_bytes: float) -> list[str]:
    """Lines of training documents; each corpus contributes its mix share of `sample_bytes`.

    Documents are taken by content hash (the lowest hashes above the held-out
    threshold first), so the sample does not depend on file order.
    """
    lines: list[str] = []
    read = held_out = 0
    for corpus in corpora:
        budget = shares[corpus.name] * sample_bytes
        if budget <= 0:
            continue
        documents = list(CorpusReader(corpus).documents())
        hashes = np.array([content_hash(d) for d in documents])
        threshold = heldout_threshold(hashes, heldout)
        read += len(documents)
        taken = 0
        for index in np.argsort(hashes):
            if hashes[index] < threshold:
                held_out += 1
                continue
            if taken >= budget:
                break
            text = documents[index]
            taken += len(text.encode("utf-8"))
            lines.extend(line for line in text.split("\n") if line)
    if not lines:
        raise DaptError(f"tokenizer.train: the training sample is empty: {read} document(s) read from the corpora with a "
                        f"mix share, {held_out} of them held out (heldout.fraction {heldout.fraction}); give more "
                        f"documents, or lower `heldout.fraction`")
    return lines


def train_from_sample(lines: list[str], config: TokenizerTrainConfig, out_dir: Path) -> Path:
    """Train with the configured backend and write the Hugging Face folder (atomically); returns `out_dir`."""
    if not lines:
        raise DaptError("tokenizer.train: the sample is empty; check the corpora, the mix weights and `sample_bytes`")
    temporary = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    if config.backend == "sentencepiece":
        trained = train_sentencepiece(lines, config) if config.chunk_bytes is None else train_split_merge(lines, config)[0]
        (temporary / SPM_FILE).write_bytes(trained)
        backend = sentencepiece_backend(temporary / SPM_FILE, config.normalization)
    else:
        backend = _train_huggingface(lines, config)
    _save(backend, config.special_tokens, temporary)
    shutil.rmtree(out_dir, ignore_errors=True)
    temporary.rename(out_dir)
    return out_dir


def sentencepiece_backend(spm_path: Path, normalization: str = "none"):
    """The sentencepiece model as a `tokenizers` pipeline with the same pieces, scores (or merges) and ids."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    processor = spm.SentencePieceProcessor(model_file=str(spm_path))
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(spm_path.read_bytes())
    size = processor.get_piece_size()
    pieces = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(size)]
    byte_fallback = any(processor.is_byte(i) for i in range(size))
    if proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE:
        vocab = {piece: index for index, (piece, _) in enumerate(pieces)}
        model = models.BPE(vocab, _merges(vocab), unk_token=processor.id_to_piece(processor.unk_id()),
                           byte_fallback=byte_fallback, fuse_unk=True)
    else:
        model = models.Unigram(pieces, unk_id=processor.unk_id(), byte_fallback=byte_fallback)
    backend = Tokenizer(model)
    steps = [normalizers.NFKC()] if normalization == "nfkc" else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    # sentencepiece matches user-defined symbols before its model runs; added tokens do the same here.
    user_defined = [p.piece for p in proto.pieces if p.type == sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED]
    backend.add_tokens([AddedToken(piece, normalized=False) for piece in user_defined])
    return backend


def _merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges from a sentencepiece BPE vocabulary: a piece's rank is its id, so every
    split of it into two known pieces is a merge of that rank."""
    merges = []
    for piece, rank in vocab.items():
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        merges.extend((rank, vocab[left], vocab[right], left, right) for left, right in splits)
    return [(left, right) for *_, left, right in sorted(merges)]


def _train_huggingface(lines: list[str], config: TokenizerTrainConfig):
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    specials = [*SPECIAL_TOKENS.values(), *config.special_tokens]
    digits = [pre_tokenizers.Digits(individual_digits=True)] if config.split_digits else []
    byte_pieces = 256 if config.byte_fallback and config.model != "byte_level" else 0
    size = config.vocab_size - byte_pieces
    if config.model == "byte_level":
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.Sequence([*digits, pre_tokenizers.ByteLevel(add_prefix_space=False)])
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        model = models.BPE(unk_token=SPECIAL_TOKENS["unk"]) if config.model == "bpe" else models.Unigram()
        backend = Tokenizer(model)
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [*digits, pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)])
        backend.decoder = decoders.Sequence([decoders.Metaspace(replacement="▁", prepend_scheme="never"),
                                             decoders.ByteFallback(), decoders.Fuse()])
        trainer = (trainers.BpeTrainer(vocab_size=size, special_tokens=specials, show_progress=False)
                   if config.model == "bpe" else
                   trainers.UnigramTrainer(vocab_size=size, special_tokens=specials, unk_token=SPECIAL_TOKENS["unk"],
                                           show_progress=False))
    if config.normalization == "nfkc":
        backend.normalizer = normalizers.NFKC()
    backend.train_from_iterator(lines, trainer=trainer)
    backend = _with_byte_fallback(backend) if byte_pieces else backend
    backend.add_tokens([AddedToken(symbol, normalized=False) for symbol in config.user_symbols])  # kept whole
    return backend


def _with_byte_fallback(backend):
    """Add the 256 `<0xNN>` pieces the trainers do not make, and turn byte fallback on:
    characters outside the vocabulary then decode back exactly instead of becoming <unk>."""
    from tokenizers import Tokenizer

    state = json.loads(backend.to_str())
    model = state["model"]
    pieces = [f"<0x{value:02X}>" for value in range(256)]
    if model["type"] == "BPE":
        next_id = max(model["vocab"].values()) + 1
        missing = [p for p in pieces if p not in model["vocab"]]
        model["vocab"].update({piece: next_id + offset for offset, piece in enumerate(missing)})
    else:  # Unigram: rare pieces, scored below every learnt one
        floor = min(score for _, score in model["vocab"]) - 1.0
        known = {piece for piece, _ in model["vocab"]}
        model["vocab"].extend([piece, floor] for piece in pieces if piece not in known)
    model["byte_fallback"] = True
    return Tokenizer.from_str(json.dumps(state))


def _save(backend, extra_specials: list[str], out_dir: Path) -> None:
    """A Hugging Face tokenizer folder loadable by transformers 4.x and 5.x."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    backend.add_special_tokens([AddedToken(token, special=True) for token in [*SPECIAL_TOKENS.values(), *extra_specials]])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        clean_up_tokenization_spaces=False,
        additional_special_tokens=extra_specials or None,
        **{f"{role}_token": token for role, token in SPECIAL_TOKENS.items()},
    )
    tokenizer.save_pretrained(out_dir)
    make_portable(out_dir)
