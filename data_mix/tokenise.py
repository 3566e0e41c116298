"""Documents to token ids, the way every store build task does it: the fast tokenizer on one
thread (the tasks are the parallelism), EOS after every document, a long document cut into pieces
after line breaks so that memory stays bounded whatever one document's size.
"""

from __future__ import annotations

import itertools
import json
import os
from array import array
from pathlib import Path

import numpy as np

from dapt.base import DaptError
from dapt.data_mix.records import OVER_LENGTH, Record, encode_records

def load_encoder(tokenizer_dir: Path):
    """The Rust tokenizer behind the Hugging Face folder, and its EOS id.

    `tokenizers` alone, not transformers: the same encoding, without seconds of imports.
    """
    from tokenizers import Tokenizer

    encoder = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    config = json.loads((Path(tokenizer_dir) / "tokenizer_config.json").read_text())
    eos = config.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    eos_id = encoder.token_to_id(eos) if eos else None
    if eos_id is None:
        raise DaptError(f"tokenizer {tokenizer_dir} has no end-of-sequence token, which is put between documents; "
                        f"set `eos_token` in its tokenizer_config.json")
    return encoder, eos_id


# A document longer than this is tokenised in pieces cut after line breaks, so that a worker's
# memory stays bounded whatever one document's size (the tokenizer keeps offsets and strings for
# every token: about 90 times the text).
PIECE_CHARS = 1 << 20
_encoder: tuple | None = None


def cuts_cleanly(encoder) -> bool:
    """Whether this tokenizer cuts a text in the same tokens when it is encoded in pieces cut after a
    line break between two non-space characters (true of byte-level BPE; not of a tokenizer that puts
    a space marker before every text it is given)."""
    for probe in ("Revenue rose.\nNet income fell", "end\nA b", "x\n1", "價格\nPrice"):
        head, tail = probe.split("\n", 1)
        whole, parts = (encoder.encode_batch_fast(texts, add_special_tokens=False) for texts in ([probe], [head + "\n", tail]))
        if whole[0].ids != parts[0].ids + parts[1].ids:
            return False
    return True


def document_pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    """`text` cut after line breaks between non-space characters, into pieces of about `size`
    characters (longer where a line is longer)."""
    pieces, start = [], 0
    while len(text) - start > size:
        cut = _line_start(text, start, start + size)
        if cut is None:
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _line_start(text: str, start: int, end: int) -> int | None:
    """The last line start after `start` and before `end`, else the first after `end`; None without
    one. A line start here follows a lone line break between two non-space characters: within a run
    of white space a byte-level BPE tokenizer groups the characters by the run's whole length."""
    def clean(position: int) -> bool:
        return 0 < position < len(text) - 1 and not text[position - 1].isspace() and not text[position + 1].isspace()

    position = text.rfind("\n", start + 1, end)
    while position > start and not clean(position):
        position = text.rfind("\n", start + 1, position)
    if position > start:
        return position + 1
    position = text.find("\n", end)
    while position != -1 and not clean(position):
        position = text.find("\n", position + 1)
    return position + 1 if position != -1 else None


class PythonNormalized:
    """A tokenizer whose normalizer only replaces single characters (dapt's own: " " → "▁"), with
    the replacing done by `str.replace` before the Rust tokenizer runs without it: the same ids,
    ~20% less time (the Rust normalizer keeps an alignment entry for every character)."""

    def __init__(self, encoder, replacements: list[tuple[str, str]]):
        from tokenizers import Tokenizer

        self.replacements = replacements
        self.bare = Tokenizer.from_str(encoder.to_str())
        self.bare.normalizer = None

    def encode_batch_fast(self, texts: list[str], add_special_tokens: bool = False):
        for old, new in self.replacements:
            texts = [text.replace(old, new) for text in texts]
        return self.bare.encode_batch_fast(texts, add_special_tokens=add_special_tokens)


def normalizing_in_python(encoder):
    """`encoder` as a PythonNormalized where that gives the same ids, else `encoder` itself."""
    normalizer = json.loads(encoder.to_str()).get("normalizer") or {}
    steps = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
    replacements = [(step["pattern"].get("String"), step["content"]) for step in steps
                    if step.get("type") == "Replace" and isinstance(step.get("pattern"), dict)]
    if not steps or len(replacements) != len(steps) or any(old is None or len(old) != 1 for old, _ in replacements):
        return encoder
    # Added tokens are matched in the text before the normalizer runs: one that holds a character the
    # replacing touches, or that strips the spaces beside it, would match differently.
    touched = {character for pair in replacements for character in pair}
    for token in encoder.get_added_tokens_decoder().values():
        if token.lstrip or token.rstrip or touched & set(token.content):
            return encoder
    fast = PythonNormalized(encoder, replacements)
    probes = ["Revenue  rose 3%.\n\n  Net income ▁fell", " 價格 Price\t", "</s> <s> x"]
    same = all(a.ids == b.ids for a, b in zip(encoder.encode_batch_fast(probes, add_special_tokens=False),
                                             fast.encode_batch_fast(probes)))
    return fast if same else encoder


def start_encoder(tokenizer_dir: str, dtype: str) -> None:
    """Load the tokenizer this process encodes with (once per process)."""
    # One tokenizer thread per process: the processes are the parallelism.
    os.environ["RAYON_NUM_THREADS"] = "1"
    global _encoder
    encoder, eos = load_encoder(Path(tokenizer_dir))
    encoder = normalizing_in_python(encoder)
    _encoder = (encoder, eos, np.dtype(dtype), cuts_cleanly(encoder))


def encode_record_batch(records: list[Record], max_tokens: int, truncate: bool) -> tuple[np.ndarray, ...]:
    """As `encode_texts`, for tuning records, with which tokens are trained targets, what was
    done with each record (records.KEPT, TRUNCATED, OVER_LENGTH) and its prompt's and completion's
    tokens. Over-length records are left out of the ids."""
    encoder, eos, dtype, _ = _encoder
    ids, trained, status, lengths = encode_records(encoder, eos, records, max_tokens, truncate)
    kept = [index for index in range(len(records)) if status[index] != OVER_LENGTH]
    flat = np.concatenate([ids[i] for i in kept]).astype(dtype) if kept else np.empty(0, dtype)
    mask = np.concatenate([trained[i] for i in kept]) if kept else np.empty(0, np.uint8)
    return flat, np.array([len(ids[i]) for i in kept], dtype=np.int64), mask, status, lengths


def encode_texts(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(ids of every document with EOS after each, each document's length with its EOS).
    Encoded a piece group of at most PIECE_CHARS characters at a time."""
    encoder, eos, dtype, in_pieces = _encoder
    pieces_of = [document_pieces(text) if in_pieces and len(text) > PIECE_CHARS else [text] for text in texts]
    # Ids kept as arrays of C integers: `array` takes the tokenizer's lists in about half the time
    # numpy does, and numpy then converts the whole batch at once.
    pieces_ids: list[array] = []
    group: list[str] = []

    def encode_group() -> None:
        pieces_ids.extend(array("I", encoding.ids) for encoding in encoder.encode_batch_fast(group, add_special_tokens=False))
        group.clear()

    size = 0
    for piece in itertools.chain.from_iterable(pieces_of):
        if group and size + len(piece) > PIECE_CHARS:
            encode_group()
            size = 0
        group.append(piece)
        size += len(piece)
    encode_group()
    flat, lengths, piece = array("I"), np.empty(len(pieces_of), dtype=np.int64), 0
    for document, pieces in enumerate(pieces_of):
        start = len(flat)
        for ids in pieces_ids[piece:piece + len(pieces)]:
            flat.extend(ids)
        flat.append(eos)
        lengths[document] = len(flat) - start
        piece += len(pieces)
    return np.frombuffer(flat, dtype=np.uint32).astype(dtype), lengths
