"""A keyed permutation of [0, size) in O(1) memory: a Feistel network with cycle walking.

Each epoch of a corpus visits its samples in the order `permute(0..size-1, key)`;
a new key per epoch gives a new order. Nothing of size `size` is ever stored, so
a corpus of 10^9 samples costs no memory, and any position is computed directly.
"""

from __future__ import annotations

import numpy as np

ROUNDS = 4
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fast, well-mixed 64-bit hash (wrapping arithmetic)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def permute(values: np.ndarray, size: int, key: int) -> np.ndarray:
    """Where each of `values` (all in [0, size)) goes under the permutation named by `key`."""
    if size <= 1:
        return np.zeros_like(np.asarray(values, dtype=np.int64))
    half = max(1, ((size - 1).bit_length() + 1) // 2)  # a square domain of 4^half >= size
    mask = np.uint64((1 << half) - 1)
    round_keys = mix64(np.arange(ROUNDS, dtype=np.uint64) + np.uint64(key % 2**64))
    out = np.asarray(values, dtype=np.uint64).copy()
    pending = np.ones(len(out), dtype=bool)
    while pending.any():  # cycle walking: re-apply until the result falls inside [0, size)
        x = out[pending]
        left, right = x >> np.uint64(half), x & mask
        for round_key in round_keys:
            left, right = right, left ^ (mix64(right ^ round_key) & mask)
        x = (left << np.uint64(half)) | right
        out[pending] = x
        pending[pending] = x >= np.uint64(size)
    return out.astype(np.int64)
