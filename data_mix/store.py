"""Memory-mapped token stores, one per corpus, with a held-out split: the format and its reader.

A store is a folder `<stores>/<corpus>/` holding, per split (`train`, `heldout`), a set of
shards (one per build task that read any of the corpus): `<shard>.bin` (token ids, EOS after
every document; uint16 when the vocabulary fits, else uint32) and `<shard>.docs.npy` (per
document: end offset in tokens, UTF-8 bytes), plus `manifest.json` (the shards of each split,
every file's size and checksum, tokenizer hash, counts, source versions, the
read/kept/rejected accounting). A split's shards read as one, in order. `build.py` writes stores;
a store from before shards (one `<split>.bin` per split) reads as a split of one shard.

Stores do not depend on `seq_len`: training windows of seq_len + 1 tokens are cut
when read, so a new sequence length needs no rebuild.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dapt.base import DaptError
from dapt.data_mix.config import CorpusConfig
from dapt.data_mix.files import file_checksum
from dapt.data_mix.records import pack, window as record_window
from dapt.data_mix.shard_writer import TRAINED_SUFFIX
from dapt.experiment import Experiment

SPLITS = ("train", "heldout")
MANIFEST = "manifest.json"
REBUILD = "rebuild it with `dapt data build` (it rebuilds stores that changed)"


def shard_names(manifest: dict, split: str) -> list[str]:
    """The shards of a split, in reading order (a store from before shards: one, named as the split)."""
    return manifest.get("shards", {}).get(split, [split])


def shard_files(shard: str, records: bool) -> tuple[str, ...]:
    """The files of one shard (a store of tuning records has one more)."""
    return tuple(f"{shard}{suffix}" for suffix in (".bin", ".docs.npy") + ((TRAINED_SUFFIX,) if records else ()))


def store_files(manifest: dict) -> list[str]:
    """Every file of a store's splits."""
    records = manifest.get("records", False)
    return [name for split in SPLITS for shard in shard_names(manifest, split) for name in shard_files(shard, records)]


def tokenizer_hash(tokenizer_dir: Path) -> str:
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.exists():
        raise DaptError(f"no tokenizer at {tokenizer_dir}; run `dapt tokenizer train` first (or set `tokenizer.path`)")
    return file_checksum(path)


def token_dtype(vocab_size: int) -> np.dtype:
    # uint16 halves the store when every id fits, which it does for vocabularies up to 65,536.
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def read_manifest(folder: Path) -> dict:
    """A store's manifest; a missing or unreadable one is an error naming it."""
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DaptError(f"no token store in {folder} ({MANIFEST} missing); run `dapt data build` first") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DaptError(f"token store {folder}: {path.name} is not valid JSON ({err}); {REBUILD}") from None
    if not isinstance(manifest, dict) or not {"corpus", "dtype", "splits", "tokenizer_hash"} <= manifest.keys():
        raise DaptError(f"token store {folder}: {path.name} is not a dapt store manifest; {REBUILD}")
    return manifest


def size_problem(folder: Path, manifest: dict) -> str | None:
    """What is wrong with the store's file sizes against its manifest (cheap: no file is read), or None."""
    recorded = manifest.get("files")  # sizes and checksums; stores built before they were recorded have only counts
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for name in store_files(manifest):
        path = folder / name
        if not path.exists():
            return f"{name} is missing"
        size = path.stat().st_size
        split = name.split(".")[0]
        expected = (recorded[name]["bytes"] if recorded else
                    manifest["splits"][split]["tokens"] * itemsize if name.endswith(".bin") and split in SPLITS else None)
        if expected is not None and size != expected:
            return f"{name} holds {size:,} bytes where its manifest says {expected:,} (changed or cut after the build)"
    return None


def checksum_problem(folder: Path, manifest: dict) -> str | None:
    """What differs from the checksums written at build time (reads every file), or None."""
    recorded = manifest.get("files")
    if not recorded:
        return "its manifest holds no checksums (built by an earlier dapt); rebuild it to record them"
    for name in store_files(manifest):
        if file_checksum(folder / name) != recorded[name]["checksum"]:
            return f"{name} does not match the checksum written at build time"
    return None


def file_records(folder: Path, names: list[str]) -> dict:
    """What `size_problem` and `checksum_problem` check against, for a store's manifest."""
    return {name: {"bytes": (folder / name).stat().st_size, "checksum": file_checksum(folder / name)} for name in names}


class Shards:
    """Several memory-mapped arrays read as one: `len`, slices (across shard ends), `np.asarray`."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays
        self.starts = np.cumsum([0] + [len(array) for array in arrays])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, key: slice | np.ndarray | int) -> np.ndarray:
        if not isinstance(key, slice):  # positions: each read from its shard
            positions = np.asarray(key)
            shard = np.searchsorted(self.starts, positions, side="right") - 1
            out = np.empty(positions.shape, dtype=self.arrays[0].dtype)
            for number in np.unique(shard):
                chosen = shard == number
                out[chosen] = self.arrays[number][positions[chosen] - self.starts[number]]
            return out
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise IndexError("token shards are read in contiguous slices")
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        parts = []
        while start < stop:
            local = start - int(self.starts[shard])
            take = min(stop - start, len(self.arrays[shard]) - local)
            parts.append(self.arrays[shard][local : local + take])
            start += take
            shard += 1
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else self.arrays[0][:0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[0 : len(self)]
        return np.asarray(whole, dtype=dtype)


class TokenStore:
    """Read side of one split of one corpus: a flat token array cut into windows (a store of tuning
    records: records packed whole into windows, see `records`). Opening it checks its files' sizes
    against the manifest, so a cut or replaced file is named, not read."""

    def __init__(self, folder: Path, split: str):
        manifest = read_manifest(folder)
        problem = size_problem(folder, manifest)
        if problem:
            raise DaptError(f"token store {folder}: {problem}; {REBUILD}")
        self.folder, self.split = folder, split
        self.corpus = manifest["corpus"]
        self.manifest = manifest
        self.records = bool(manifest.get("records"))
        self.shards = shard_names(manifest, split)
        self._open_files()
        docs = [np.load(folder / f"{shard}.docs.npy") for shard in self.shards]
        # Each shard's ends count from its own start: shifted by the tokens of the shards before it.
        docs = np.concatenate([d + np.array([start] + [0] * (d.shape[1] - 1), dtype=np.int64)
                               for d, start in zip(docs, self.tokens.starts[:-1])]) if docs else np.empty((0, 2), np.int64)
        self.doc_ends, self.doc_bytes = docs[:, 0], docs[:, 1]
        # Records: per record, its trained targets and the UTF-8 bytes of the text they stand for.
        self.doc_trained, self.doc_trained_bytes = (docs[:, 2], docs[:, 3]) if self.records else (None, None)
        # Records, per seq_len: the windows' bounds in documents, and each window's trained targets.
        self._windows: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _open_files(self) -> None:
        self.tokens = Shards([_map(self.folder / f"{shard}.bin", self.manifest["dtype"]) for shard in self.shards])
        self.trained = (Shards([_map(self.folder / f"{shard}{TRAINED_SUFFIX}", np.uint8) for shard in self.shards])
                        if self.records else None)

    def __getstate__(self) -> dict:
        # A pickled memmap would copy the whole store into each DataLoader worker; reopen it instead.
        return {key: value for key, value in self.__dict__.items() if key not in ("tokens", "trained")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open_files()

    @property
    def total_bytes(self) -> int:
        return int(self.doc_bytes.sum())

    def window_bounds(self, seq_len: int) -> np.ndarray:
        """Records: window w holds documents [bounds[w], bounds[w + 1])."""
        return self._packed(seq_len)[0]

    def _packed(self, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        if seq_len not in self._windows:
            bounds = pack(self.doc_ends, seq_len)
            trained = np.add.reduceat(self.doc_trained, bounds[:-1]) if len(bounds) > 1 else np.empty(0, np.int64)
            self._windows[seq_len] = bounds, trained
        return self._windows[seq_len]

    def num_samples(self, seq_len: int) -> int:
        if self.records:
            return len(self.window_bounds(seq_len)) - 1
        # Windows of seq_len + 1 tokens overlap by one: every token but the first is a target once.
        return max(0, (len(self.tokens) - 1) // seq_len)

    def sample(self, index: int, seq_len: int) -> np.ndarray:
        """The ids of window `index` (`seq_len + 1` of them)."""
        return self.window(index, seq_len)[0]

    def window(self, index: int, seq_len: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Window `index`: its `seq_len + 1` ids, and for records which targets are trained on and each
        input's position in its record (None for text: every target, positions running on)."""
        if self.records:
            return record_window(self.tokens, self.trained, self.doc_ends, self.window_bounds(seq_len), index, seq_len,
                          self.manifest["eos_token_id"])
        start = index * seq_len
        return np.asarray(self.tokens[start : start + seq_len + 1], dtype=np.int64), None, None

    def trained_targets(self, indices: np.ndarray, seq_len: int) -> np.ndarray:
        """How many targets of each window in `indices` the loss covers."""
        if not self.records:
            return np.full(len(indices), seq_len, dtype=np.int64)
        return self._packed(seq_len)[1][indices]


def _map(path: Path, dtype) -> np.ndarray:
    # An empty file cannot be memory-mapped; a shard may hold no document of a split.
    return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.empty(0, dtype)


def open_stores(stores_dir: Path, corpora: list[CorpusConfig], split: str, expected_tokenizer: str) -> dict[str, TokenStore]:
    """Open every corpus's store, refusing a missing one or one made with another tokenizer."""
    stores = {}
    for corpus in corpora:
        folder = stores_dir / corpus.name
        if not (folder / MANIFEST).exists():
            raise DaptError(f"no token store for corpus '{corpus.name}' in {stores_dir}; run `dapt data build` first")
        store = TokenStore(folder, split)
        if store.manifest["tokenizer_hash"] != expected_tokenizer:
            raise DaptError(f"token store {folder} was built with another tokenizer; {REBUILD}")
        stores[corpus.name] = store
    return stores


def experiment_stores(experiment: Experiment, split: str) -> dict[str, TokenStore]:
    """The experiment's stores of `split`, checked against the tokenizer it uses."""
    return open_stores(experiment.stores_dir, experiment.corpora, split, tokenizer_hash(experiment.tokenizer_dir))
