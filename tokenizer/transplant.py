"""Carry a base model over to another vocabulary: `model.embeddings: transplant | extend`.

In: a base causal LM, its own tokenizer, and the experiment's tokenizer (a domain
tokenizer for `transplant`; the base tokenizer plus domain pieces for `extend`, made
by `extend_tokenizer`). Out: the same model whose embedding rows (and untied output
rows) follow the experiment's tokenizer. A piece the base vocabulary has, compared as
the bytes it stands for (so sentencepiece `▁x`, byte-level `Ġx` and `<0x78>`-style byte
pieces meet), keeps its trained row; every other row is the mean of the base rows of
the pieces the base tokenizer cuts that piece's text into, so a new piece starts where
the model already puts its parts, instead of at random. This runs on the full model
before DeepSpeed builds its engine, so every ZeRO stage partitions weights that are
already carried over.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from dapt.base import DaptError
from dapt.tokenizer.files import TOKENIZER_SETTINGS, copy_tokenizer_files

BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@dataclass
class Transplant:
    """Which rows of the new vocabulary were copied from the base model, and which were averaged."""

    copied: list[int]
    averaged: list[int]

    def summary(self) -> str:
        return (f"embeddings: {len(self.copied):,} rows copied from the base model, "
                f"{len(self.averaged):,} set to the mean of their pieces' base rows")


def piece_keys(tokenizer) -> dict[int, tuple]:
    """Every id → what its piece stands for, comparable across tokenizers: `("text", bytes)` for
    learnt pieces (sentencepiece `▁` and byte-level `Ġ` both read as a space), `("byte", n)` for
    byte-fallback pieces `<0xNN>`, `("special", role)` for special tokens (`eos`, ...)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    byte_level = "ByteLevel" in json.dumps(backend.get("decoder"))
    # GPT-2's printable stand-in character for each byte, inverted.
    decoder = {char: byte for byte, char in bytes_to_unicode().items()} if byte_level else {}
    roles = {tokenizer.convert_tokens_to_ids(token): role.removesuffix("_token")
             for role, token in tokenizer.special_tokens_map.items() if isinstance(token, str)}
    keys: dict[int, tuple] = {}
    for piece, index in tokenizer.get_vocab().items():
        byte = BYTE_PIECE.match(piece)
        if index in roles or piece in tokenizer.all_special_tokens:
            keys[index] = ("special", roles.get(index, piece))
        elif byte:
            keys[index] = ("byte", int(byte.group(1), 16))
        elif byte_level:
            keys[index] = ("text", bytes(decoder.get(char, 0) for char in piece))
        else:
            keys[index] = ("text", piece.replace("▁", " ").encode("utf-8"))
    return keys


def _same_piece(key: tuple, base_index: dict[tuple, int]) -> int | None:
    """The base id standing for the same thing: the same kind first; else a one-byte text piece
    and a byte piece stand for each other (a byte-level base has only the former)."""
    if key in base_index:
        return base_index[key]
    kind, value = key
    if kind == "text" and len(value) == 1:
        return base_index.get(("byte", value[0]))
    if kind == "byte":
        return base_index.get(("text", bytes([value])))
    return None


def plan_rows(base_tokenizer, new_tokenizer) -> tuple[Transplant, list[list[int]]]:
    """For each new id, the base ids whose rows it takes: one (copied) or its text's base pieces (averaged).

    A piece whose text the base tokenizer cannot cut (a lone continuation byte, a special
    token the base lacks) takes the mean of all base rows.
    """
    base_index = {key: index for index, key in sorted(piece_keys(base_tokenizer).items(), reverse=True)}
    new_keys = piece_keys(new_tokenizer)
    copied, averaged, sources = [], [], []
    missing: dict[int, str] = {}
    for index in range(len(new_tokenizer)):
        key = new_keys.get(index, ("special", None))
        same = _same_piece(key, base_index)
        if same is not None:
            copied.append(index)
            sources.append([same])
            continue
        averaged.append(index)
        sources.append([])
        if key[0] in ("text", "byte"):
            missing[index] = (key[1] if key[0] == "text" else bytes([key[1]])).decode("utf-8", errors="ignore")
    texts = [text for text in missing.values() if text]
    pieces = iter(base_tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False) if texts else [])
    for index, text in missing.items():
        if text:
            sources[index] = next(pieces).ids
    everything = list(range(len(base_tokenizer)))
    return Transplant(copied, averaged), [ids or everything for ids in sources]


def carry_over(model, base_tokenizer, new_tokenizer) -> Transplant:
    """Resize the model to the new vocabulary in place; copied and averaged rows as `plan_rows` says."""
    rows = model.get_input_embeddings().num_embeddings
    if rows < len(base_tokenizer):
        raise DaptError(f"model.path: the base model has {rows:,} embedding rows but its tokenizer has "
                        f"{len(base_tokenizer):,} pieces; set `model.base_tokenizer` to the tokenizer it was trained with")
    plan, sources = plan_rows(base_tokenizer, new_tokenizer)
    # A row that is the mean of every base row is computed once rather than gathered row by row
    # (a gathered copy of a 49k × 576 matrix for each such piece).
    whole = torch.tensor([len(ids) == len(base_tokenizer) for ids in sources])
    parts = [[] if everything else ids for ids, everything in zip(sources, whole.tolist())]
    flat = torch.tensor([i for ids in parts for i in ids])
    owner = torch.repeat_interleave(torch.arange(len(parts)), torch.tensor([len(ids) for ids in parts]))
    counts = torch.tensor([max(len(ids), 1) for ids in parts], dtype=torch.float32).unsqueeze(1)

    def mapped(weight: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(len(parts), weight.shape[1], dtype=torch.float32).index_add_(0, owner, weight[flat].float())
        rows = total / counts
        rows[whole] = weight[: len(base_tokenizer)].mean(0, dtype=torch.float32)
        return rows.to(weight.dtype)

    input_rows = mapped(model.get_input_embeddings().weight.detach())
    output = model.get_output_embeddings()
    untied = output is not None and output.weight is not model.get_input_embeddings().weight
    output_rows = mapped(output.weight.detach()) if untied else None
    model.resize_token_embeddings(len(new_tokenizer), mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(input_rows)
        if output_rows is not None:
            model.get_output_embeddings().weight.copy_(output_rows)
    for role in ("bos", "eos", "pad"):
        setattr(model.config, f"{role}_token_id", getattr(new_tokenizer, f"{role}_token_id"))
        if model.generation_config is not None:
            setattr(model.generation_config, f"{role}_token_id", getattr(new_tokenizer, f"{role}_token_id"))
    return plan


def domain_piece_counts(domain_tokenizer, lines: list[str]) -> Counter:
    """How often the domain tokenizer uses each of its pieces on `lines`."""
    counts: Counter = Counter()
    for start in range(0, len(lines), 1024):
        for encoding in domain_tokenizer.backend_tokenizer.encode_batch_fast(lines[start:start + 1024], add_special_tokens=False):
            counts.update(encoding.ids)
    return counts


def extend_tokenizer(base_dir: Path, domain_dir: Path, lines: list[str], pieces: int, out_dir: Path) -> list[str]:
    """The base tokenizer plus the `pieces` domain pieces it lacks that the domain tokenizer uses most
    on `lines`, written to `out_dir`; returns the pieces added (as text).

    The base ids stay where they are, so every base row is copied. On a unigram base the pieces
    join the model's vocabulary with their log-frequency as score, so they compete with the base
    pieces as unigram pieces do; on other models whole domain words become added tokens.
    """
    from tokenizers import AddedToken, Tokenizer

    from dapt.tokenizer.evaluate import load_tokenizer

    base, domain = load_tokenizer(base_dir), load_tokenizer(domain_dir)
    state = json.loads(base.backend_tokenizer.to_str())
    model = state["model"]
    highest_added = max((token["id"] for token in state.get("added_tokens", [])), default=-1)
    byte_level = "ByteLevel" in json.dumps(state.get("decoder"))
    into_vocabulary = model["type"] == "Unigram" and not byte_level and highest_added < len(model["vocab"])
    # Added tokens are matched before the model, anywhere in the text: there only whole domain
    # words with their space (` million`) are added, which seldom cut through a longer word.
    words = set() if into_vocabulary else {word for line in lines for word in re.findall(r"\w+", line)}
    known = set(piece_keys(base).values())
    domain_keys = piece_keys(domain)
    counts = domain_piece_counts(domain, lines)
    total = sum(counts.values())
    candidates = []
    for index, count in counts.most_common():
        kind, value = domain_keys.get(index, ("special", None))
        if kind != "text" or len(value) < 2 or (kind, value) in known:
            continue
        text = value.decode("utf-8", errors="replace")
        if into_vocabulary or (text[:1] == " " and text[1:] in words):
            candidates.append((text, count))
    chosen = candidates[:pieces]
    if into_vocabulary:
        model["vocab"].extend([text.replace(" ", "▁"), math.log(count / total)] for text, count in chosen)
        backend = Tokenizer.from_str(json.dumps(state))
    else:
        backend = base.backend_tokenizer
        backend.add_tokens([AddedToken(text, normalized=False) for text, _ in chosen])
    # The base folder as it is (special tokens, settings) with the extended tokenizer.json; a
    # sentencepiece model beside it would describe the old vocabulary, so it is left out.
    shutil.rmtree(out_dir, ignore_errors=True)
    copy_tokenizer_files(Path(base_dir), out_dir, TOKENIZER_SETTINGS)
    backend.save(str(out_dir / "tokenizer.json"))
    return [text for text, _ in chosen]
