"""Carry a base model over to another vocabulary: `model.embeddings: transplant | extend`.

In: a base causal LM, its own tokenizer, and the experiment's tokenizer (a domain
tokenizer for `transplant`; for `extend` the base tokenizer grown by domain pieces,
made by `extend.extend_tokenizer`). Out: the same model whose embedding rows (and untied output
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
import re
from dataclasses import dataclass

import torch

from dapt.base import DaptError

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
    to_bytes = piece_bytes(json.loads(tokenizer.backend_tokenizer.to_str()))
    roles = {tokenizer.convert_tokens_to_ids(token): role.removesuffix("_token")
             for role, token in tokenizer.special_tokens_map.items() if isinstance(token, str)}
    keys: dict[int, tuple] = {}
    for piece, index in tokenizer.get_vocab().items():
        byte = BYTE_PIECE.match(piece)
        if index in roles or piece in tokenizer.all_special_tokens:
            keys[index] = ("special", roles.get(index, piece))
        elif byte:
            keys[index] = ("byte", int(byte.group(1), 16))
        else:
            keys[index] = ("text", to_bytes(piece))
    return keys


def piece_bytes(backend_state: dict):
    """Vocabulary string → the bytes it stands for, for a tokenizer.json's state: byte-level pieces
    spell bytes in GPT-2's printable stand-in characters; sentencepiece's `▁` is a space."""
    if "ByteLevel" not in json.dumps(backend_state.get("decoder")):
        return lambda piece: piece.replace("▁", " ").encode("utf-8")
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    return lambda piece: bytes(byte_of.get(char, 0) for char in piece)


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
