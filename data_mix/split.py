"""Held-out split by content hash: a document's side never depends on file order.

The held-out set of a corpus is the documents with the smallest content hashes,
below `fraction` and at most `max_documents` of them, so adding or reordering
files never moves a document from one side to the other except at the cap.
"""

from __future__ import annotations

import hashlib

import numpy as np

from data_mix.config import HeldoutConfig


def content_hash(text: str) -> float:
    """A uniform number in [0, 1) fixed by the document's text."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, person=b"dapt-heldout").digest()
    return int.from_bytes(digest, "little") / 2**64


def heldout_threshold(hashes: np.ndarray, heldout: HeldoutConfig) -> float:
    """Documents with hash < threshold are held out."""
    if len(hashes) <= heldout.max_documents:
        return heldout.fraction
    capped = np.partition(hashes, heldout.max_documents)[heldout.max_documents]
    return float(min(heldout.fraction, capped))
