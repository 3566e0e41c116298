"""Writes one shard of a token store: ids with EOS after every document, and per document its end,
its UTF-8 bytes and, for tuning records, which tokens are trained targets (`.trained.bin`), how many,
and the UTF-8 bytes of the text they stand for (the completion's)."""

from __future__ import annotations

import os
from array import array
from pathlib import Path

import numpy as np

TRAINED_SUFFIX = ".trained.bin"  # stores of tuning records: per token, 1 where the loss covers it


class ShardWriter:
    def __init__(self, folder: Path, name: str, dtype: np.dtype, records: bool):
        self.folder, self.name, self.dtype = folder, name, dtype
        self.handle = open(folder / f"{name}.bin", "wb")
        self.trained_handle = open(folder / f"{name}{TRAINED_SUFFIX}", "wb") if records else None
        self.ends, self.bytes, self.trained, self.trained_bytes = array("q"), array("q"), array("q"), array("q")
        self.count = 0

    def add_arrays(self, flat: np.ndarray, lengths: np.ndarray, num_bytes: np.ndarray,
                   trained: np.ndarray | None = None, trained_bytes: np.ndarray | None = None) -> None:
        """Documents given as one array of ids (EOS included) and each one's length in tokens."""
        self.handle.write(flat.astype(self.dtype, copy=False).tobytes())
        ends = np.cumsum(lengths)
        self.ends.extend((self.count + ends).tolist())
        self.count += len(flat)
        self.bytes.extend(np.asarray(num_bytes).tolist())
        if self.trained_handle is not None:
            self.trained_handle.write(np.asarray(trained, dtype=np.uint8).tobytes())
            self.trained.extend(np.add.reduceat(trained, ends - lengths).tolist() if len(lengths) else [])
            self.trained_bytes.extend(np.asarray(trained_bytes).tolist())

    def close(self) -> dict:
        """Flush to disk, write the per-document index; the shard's counts."""
        columns = [self.ends, self.bytes] + ([self.trained, self.trained_bytes] if self.trained_handle else [])
        for handle in filter(None, (self.handle, self.trained_handle)):
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        docs = np.stack([np.frombuffer(column, dtype=np.int64) for column in columns], axis=1)
        np.save(self.folder / f"{self.name}.docs.npy", docs)
        counts = {"documents": len(self.ends), "tokens": self.count, "bytes": int(docs[:, 1].sum())}
        return counts | ({"trained_tokens": int(docs[:, 2].sum()), "trained_bytes": int(docs[:, 3].sum())}
                         if self.trained_handle is not None else {})
