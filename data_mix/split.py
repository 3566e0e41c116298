"""Held-out split by content hash: a document's side never depends on file order.

The held-out set of a corpus is the documents with the smallest content hashes,
below `fraction` and at most `max_documents` of them, so adding or reordering
files never moves a document from one side to the other except at the cap.
"""

from __future__ import annotations

import hashlib

import numpy as np

from dapt.data_mix.config import HeldoutConfig


def content_digest(data: bytes) -> bytes:
    """16 bytes fixed by a document's UTF-8 text: its identity for deduplication and the split."""
    return hashlib.blake2b(data, digest_size=16).digest()


def split_position(digest: bytes) -> float:
    """A uniform number in [0, 1) from a content digest; below `heldout.fraction` means held out."""
    return int.from_bytes(digest[:8], "little") / 2**64


def content_hash(text: str) -> float:
    return split_position(content_digest(text.encode("utf-8", "surrogatepass")))


def heldout_threshold(hashes: np.ndarray, heldout: HeldoutConfig) -> float:
    """Documents with hash < threshold are held out."""
    if len(hashes) <= heldout.max_documents:
        return heldout.fraction
    capped = np.partition(hashes, heldout.max_documents)[heldout.max_documents]
    return float(min(heldout.fraction, capped))


def heldout_part(digests: list[bytes], heldout: HeldoutConfig) -> list[int]:
    """Which of a corpus's kept documents (given by content digest, in read order) its store holds out:
    those below `fraction`, at most the `max_documents` lowest, in hash order (as `dapt data build`)."""
    positions = [split_position(digest) for digest in digests]
    candidates = sorted((position, index) for index, position in enumerate(positions) if position < heldout.fraction)
    return [index for _, index in candidates[: heldout.max_documents]]
