"""Memory-mapped token stores, one per corpus, with a held-out split.

In: a corpus's documents and a Hugging Face fast tokenizer.
Out: `<stores>/<corpus>/{train,heldout}.bin` (token ids, EOS after every document;
uint16 when the vocabulary fits, else uint32), `.docs.npy` (per document: end
offset in tokens, UTF-8 bytes) and `manifest.json` (tokenizer hash, counts, source
checksums, the read/kept/rejected accounting). A store is written under a
temporary name and renamed last, so a killed build never looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_mix.config import CorpusConfig, HeldoutConfig
from data_mix.sources import CorpusReader, resolve_files
from data_mix.split import content_hash, heldout_threshold
from launch.base import DaptError

SPLITS = ("train", "heldout")
MANIFEST = "manifest.json"
STORE_VERSION = 1
ENCODE_BATCH = 512


def file_checksum(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "blake2b").hexdigest()[:32]


def tokenizer_hash(tokenizer_dir: Path) -> str:
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.exists():
        raise DaptError(f"no tokenizer at {tokenizer_dir}; run `dapt tokenizer train` first (or set `tokenizer.path`)")
    return file_checksum(path)


def token_dtype(vocab_size: int) -> np.dtype:
    # uint16 halves the store when every id fits, which it does for vocabularies up to 65,536.
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


class TokenStore:
    """Read side of one split of one corpus: a flat token array cut into windows."""

    def __init__(self, folder: Path, split: str):
        manifest = json.loads((folder / MANIFEST).read_text())
        self.folder, self.split = folder, split
        self.corpus = manifest["corpus"]
        self.manifest = manifest
        self.tokens = self._open_tokens()
        docs = np.load(folder / f"{split}.docs.npy")
        self.doc_ends, self.doc_bytes = docs[:, 0], docs[:, 1]

    def _open_tokens(self) -> np.memmap:
        return np.memmap(self.folder / f"{self.split}.bin", dtype=self.manifest["dtype"], mode="r")

    def __getstate__(self) -> dict:
        # A pickled memmap would copy the whole store into each DataLoader worker; reopen it instead.
        return {key: value for key, value in self.__dict__.items() if key != "tokens"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.tokens = self._open_tokens()

    @property
    def total_bytes(self) -> int:
        return int(self.doc_bytes.sum())

    def num_samples(self, seq_len: int) -> int:
        # Windows of seq_len + 1 tokens overlap by one: every token but the first is a target once.
        return max(0, (len(self.tokens) - 1) // seq_len)

    def sample(self, index: int, seq_len: int) -> np.ndarray:
        start = index * seq_len
        return np.asarray(self.tokens[start : start + seq_len + 1], dtype=np.int64)


def open_stores(stores_dir: Path, corpora: list[CorpusConfig], split: str, expected_tokenizer: str) -> dict[str, TokenStore]:
    """Open every corpus's store, refusing a missing one or one made with another tokenizer."""
    stores = {}
    for corpus in corpora:
        folder = stores_dir / corpus.name
        if not (folder / MANIFEST).exists():
            raise DaptError(f"no token store for corpus '{corpus.name}' in {stores_dir}; run `dapt data build` first")
        store = TokenStore(folder, split)
        if store.manifest["tokenizer_hash"] != expected_tokenizer:
            raise DaptError(
                f"token store {folder} was built with another tokenizer; "
                "rebuild it with `dapt data build` (it rebuilds stores whose tokenizer changed)"
            )
        stores[corpus.name] = store
    return stores


@dataclass
class _SplitWriter:
    """Appends tokenised documents of one split to its .bin file."""

    folder: Path
    split: str
    dtype: np.dtype

    def __post_init__(self) -> None:
        self.handle = open(self.folder / f"{self.split}.bin", "wb")
        self.ends: list[int] = []
        self.bytes: list[int] = []
        self.count = 0

    def add(self, ids: list[int], num_bytes: int) -> None:
        self.handle.write(np.asarray(ids, dtype=self.dtype).tobytes())
        self.count += len(ids)
        self.ends.append(self.count)
        self.bytes.append(num_bytes)

    def close(self) -> dict:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        docs = np.array([self.ends, self.bytes], dtype=np.int64).T.reshape(-1, 2)
        np.save(self.folder / f"{self.split}.docs.npy", docs)
        return {"documents": len(self.ends), "tokens": self.count, "bytes": int(docs[:, 1].sum())}


def source_fingerprint(corpus: CorpusConfig, heldout: HeldoutConfig, tokenizer_dir: Path) -> dict:
    """What a store depends on; an unchanged fingerprint means nothing to rebuild."""
    return {
        "version": STORE_VERSION,
        "corpus_config": corpus.model_dump(),
        "heldout": heldout.model_dump(),
        "tokenizer_hash": tokenizer_hash(tokenizer_dir),
        "sources": {str(p): file_checksum(p) for p in resolve_files(corpus)},
    }


def build_store(corpus: CorpusConfig, heldout: HeldoutConfig, tokenizer_dir: Path, stores_dir: Path) -> dict:
    """Build (or keep, when up to date) one corpus's store; returns its manifest."""
    from transformers import AutoTokenizer

    final = stores_dir / corpus.name
    fingerprint = source_fingerprint(corpus, heldout, tokenizer_dir)
    if (final / MANIFEST).exists():
        manifest = json.loads((final / MANIFEST).read_text())
        if manifest.get("fingerprint") == fingerprint:
            return manifest | {"rebuilt": False}

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    reader = CorpusReader(corpus)
    hashes = np.fromiter((content_hash(doc) for doc in reader.documents()), dtype=np.float64)
    threshold = heldout_threshold(hashes, heldout)

    temporary = stores_dir / f".{corpus.name}.building-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    dtype = token_dtype(len(tokenizer))
    writers = {split: _SplitWriter(temporary, split, dtype) for split in SPLITS}
    progress = tqdm(total=len(hashes), desc=f"tokenising {corpus.name}", unit="doc", leave=False, disable=None)
    batch: list[str] = []

    def flush() -> None:
        for text, ids in zip(batch, tokenizer(batch, add_special_tokens=False)["input_ids"]):
            split = "heldout" if content_hash(text) < threshold else "train"
            writers[split].add(ids + [tokenizer.eos_token_id], len(text.encode("utf-8")))
        progress.update(len(batch))
        batch.clear()

    for document in reader.documents():
        batch.append(document)
        if len(batch) == ENCODE_BATCH:
            flush()
    flush()
    progress.close()

    manifest = {
        "corpus": corpus.name,
        "group": corpus.group,
        "dtype": dtype.name,
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "tokenizer_hash": fingerprint["tokenizer_hash"],
        "splits": {split: writer.close() for split, writer in writers.items()},
        "accounting": reader.report.to_json(),
        "fingerprint": fingerprint,
    }
    if manifest["splits"]["train"]["documents"] == 0:
        raise DaptError(f"corpus '{corpus.name}': every document fell into the held-out split; lower `heldout.fraction`")
    (temporary / MANIFEST).write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(temporary, final)
    return manifest | {"rebuilt": True}
