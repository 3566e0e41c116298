"""The schedule's inner loop (`schedule.c`), compiled with the system C compiler on
first use and cached, then called through ctypes.

A Python loop places ~1M samples/s; the compiled loop places tens of millions, which
matters when a resume at sample 10^9 replays the schedule from its last snapshot.
The cache key is the source's hash, so an edited source is rebuilt. gcc is already
required by DeepSpeed's own ops.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from dapt.base import DaptError

SOURCE = Path(__file__).with_name("schedule.c")
MAX_CORPORA = 256  # the C loop keeps deadlines in a fixed array


def _cache_dir() -> Path:
    return Path(os.environ.get("DAPT_CACHE", Path.home() / ".cache" / "dapt"))


@lru_cache(maxsize=1)
def schedule_kernel():
    source = SOURCE.read_bytes()
    library = _cache_dir() / f"schedule-{hashlib.sha256(source).hexdigest()[:16]}.so"
    if not library.exists():
        compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
        if compiler is None:
            raise DaptError("dapt needs a C compiler (gcc) to build its mix schedule; install gcc or set CC")
        library.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
            built = Path(scratch) / library.name
            command = [compiler, "-O2", "-ffp-contract=off", "-shared", "-fPIC", str(SOURCE), "-o", str(built)]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise DaptError(f"compiling {SOURCE} failed: {result.stderr.strip()}")
            os.replace(built, library)  # atomic: concurrent ranks never load a half-written file
    kernel = ctypes.CDLL(str(library)).dapt_schedule
    pointer = np.ctypeslib.ndpointer
    kernel.argtypes = [ctypes.c_int32, pointer(np.float64, flags="C"), pointer(np.int64, flags="C"),
                       ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    kernel.restype = None
    return kernel


def run_schedule(shares: np.ndarray, counts: np.ndarray, start: int, stop: int, record: bool):
    """Advance `counts` (in place) over slots [start, stop); with `record`, return (corpus, rank) arrays."""
    corpus_ids = np.empty(stop - start if record else 0, dtype=np.int32)
    ranks = np.empty_like(corpus_ids, dtype=np.int64)
    schedule_kernel()(len(shares), shares, counts, start, stop,
                      corpus_ids.ctypes.data if record else None, ranks.ctypes.data if record else None)
    return corpus_ids, ranks
