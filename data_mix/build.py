"""`dapt data build`: tokenise a corpus into its token store, in one streaming pass.

Three stages run at once, joined by small queues: a reader thread parses and
validates documents (sources.py), an encoder thread tokenises batches with the fast
tokenizer's Rust thread pool on every core (without the GIL), and the main thread
appends ids + EOS to the store's files. Memory is bounded by a few batches whatever
the corpus size. Documents whose content hash
falls below `heldout.fraction` go to a small candidates file; at the end the
`max_documents` lowest hashes become the held-out split and the rest join training,
so the split needs no second pass. The store is written under a temporary name and
renamed last, and an unchanged fingerprint (config, sources, tokenizer) means the
existing store is kept.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import shutil
import threading
from array import array
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_mix.config import CorpusConfig, HeldoutConfig
from data_mix.sources import CorpusReader, resolve_files
from data_mix.split import split_position
from data_mix.store import MANIFEST, file_checksum, token_dtype, tokenizer_hash
from launch.base import DaptError

STORE_VERSION = 2
# A batch is sent to the tokenizer at this many documents or bytes, whichever comes first;
# at most QUEUED_BATCHES wait, so memory stays at a few batches whatever the corpus size.
BATCH_DOCUMENTS = 1024
BATCH_BYTES = 2 << 20
QUEUED_BATCHES = 4


class _SplitWriter:
    """Appends documents (token ids + EOS) to one `.bin` file and remembers their ends and bytes."""

    def __init__(self, folder: Path, name: str, dtype: np.dtype):
        self.folder, self.name, self.dtype = folder, name, dtype
        self.handle = open(folder / f"{name}.bin", "wb")
        self.ends, self.bytes = array("q"), array("q")
        self.hashes = array("d")
        self.count = 0

    def add_batch(self, ids: list[list[int]], num_bytes: list[int], hashes: list[float], eos: int) -> None:
        if not ids:
            return
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=self.dtype, count=int(lengths.sum()))
        flat = np.insert(flat, np.cumsum(lengths), eos)  # EOS after every document
        self.handle.write(flat.tobytes())
        self.ends.extend((self.count + np.cumsum(lengths + 1)).tolist())
        self.count += len(flat)
        self.bytes.extend(num_bytes)
        self.hashes.extend(hashes)

    def add_slice(self, tokens: np.ndarray, num_bytes: int) -> None:
        self.handle.write(tokens.tobytes())
        self.count += len(tokens)
        self.ends.append(self.count)
        self.bytes.append(num_bytes)

    def close(self) -> dict:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        docs = np.stack([np.frombuffer(self.ends, dtype=np.int64), np.frombuffer(self.bytes, dtype=np.int64)], axis=1)
        np.save(self.folder / f"{self.name}.docs.npy", docs)
        return {"documents": len(self.ends), "tokens": self.count, "bytes": int(docs[:, 1].sum())}


def source_fingerprint(corpus: CorpusConfig, heldout: HeldoutConfig, tokenizer_dir: Path) -> dict:
    """What a store depends on; an unchanged fingerprint means nothing to rebuild."""
    tokenizer = tokenizer_hash(tokenizer_dir)  # first: a missing tokenizer is the error to report
    sources = ({str(p): file_checksum(p) for p in resolve_files(corpus)} if corpus.paths
               else {"hf_dataset": corpus.hf_dataset.model_dump()})
    return {"version": STORE_VERSION, "corpus_config": corpus.model_dump(), "heldout": heldout.model_dump(),
            "tokenizer_hash": tokenizer, "sources": sources}


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
        raise DaptError(f"tokenizer {tokenizer_dir} has no end-of-sequence token; documents need one between them")
    return encoder, eos_id


def _read_batches(reader: CorpusReader, out: queue.Queue) -> None:
    """Reader thread: batches of documents, then None; an exception is passed on to be raised."""
    try:
        batch: list[tuple[str, bytes, int]] = []
        size = 0
        for document in reader.documents_with_digests():
            batch.append(document)
            size += document[2]
            if len(batch) == BATCH_DOCUMENTS or size >= BATCH_BYTES:
                out.put(batch)
                batch, size = [], 0
        if batch:
            out.put(batch)
        out.put(None)
    except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
        out.put(err)


def _encode_batches(encoder, batches: queue.Queue, out: queue.Queue) -> None:
    """Encoder thread: the Rust tokenizer runs without the GIL, so it overlaps the main
    thread's Python work of turning the previous batch's ids into the store's bytes."""
    while (batch := batches.get()) is not None:
        if isinstance(batch, BaseException):
            out.put(batch)
            return
        try:
            out.put((batch, encoder.encode_batch_fast([text for text, _, _ in batch], add_special_tokens=False)))
        except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
            out.put(err)
            return
    out.put(None)


def build_store(corpus: CorpusConfig, heldout: HeldoutConfig, tokenizer_dir: Path, stores_dir: Path) -> dict:
    """Build (or keep, when up to date) one corpus's store; returns its manifest."""
    final = stores_dir / corpus.name
    fingerprint = source_fingerprint(corpus, heldout, tokenizer_dir)
    if (final / MANIFEST).exists():
        manifest = json.loads((final / MANIFEST).read_text())
        if manifest.get("fingerprint") == fingerprint:
            return manifest | {"rebuilt": False}

    encoder, eos = load_encoder(tokenizer_dir)
    for leftover in stores_dir.glob(f".{corpus.name}.building-*"):  # from a build that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    temporary = stores_dir / f".{corpus.name}.building-{os.getpid()}"
    temporary.mkdir(parents=True)
    vocab_size = encoder.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab_size)
    train, candidates = _SplitWriter(temporary, "train", dtype), _SplitWriter(temporary, "candidates", dtype)

    reader = CorpusReader(corpus)
    batches: queue.Queue = queue.Queue(maxsize=QUEUED_BATCHES)
    encoded_batches: queue.Queue = queue.Queue(maxsize=QUEUED_BATCHES)
    threading.Thread(target=_read_batches, args=(reader, batches), daemon=True).start()
    threading.Thread(target=_encode_batches, args=(encoder, batches, encoded_batches), daemon=True).start()
    progress = tqdm(desc=f"tokenising {corpus.name}", unit="doc", leave=False, disable=None)
    while (item := encoded_batches.get()) is not None:
        if isinstance(item, BaseException):
            shutil.rmtree(temporary, ignore_errors=True)
            raise item
        batch, encoded = item
        sides: dict[bool, tuple[list, list, list]] = {True: ([], [], []), False: ([], [], [])}
        for (_, digest, num_bytes), encoding in zip(batch, encoded):
            position = split_position(digest)
            ids, sizes, positions = sides[position < heldout.fraction]
            ids.append(encoding.ids)
            sizes.append(num_bytes)
            positions.append(position)
        train.add_batch(*sides[False], eos=eos)
        candidates.add_batch(*sides[True], eos=eos)
        progress.update(len(batch))
    progress.close()

    splits = _split_heldout(train, candidates, heldout, temporary, dtype)
    manifest = {
        "corpus": corpus.name, "group": corpus.group, "dtype": dtype.name, "vocab_size": vocab_size,
        "eos_token_id": eos, "tokenizer_hash": fingerprint["tokenizer_hash"], "splits": splits,
        "accounting": reader.report.to_json(), "fingerprint": fingerprint,
    }
    if splits["train"]["documents"] == 0:
        shutil.rmtree(temporary, ignore_errors=True)
        raise DaptError(f"corpus '{corpus.name}': every document fell into the held-out split; lower `heldout.fraction`")
    (temporary / MANIFEST).write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(temporary, final)
    return manifest | {"rebuilt": True}


def _split_heldout(train: _SplitWriter, candidates: _SplitWriter, heldout: HeldoutConfig, folder: Path,
                   dtype: np.dtype) -> dict:
    """The `max_documents` candidates with the lowest hashes are held out; the others join training."""
    candidates.close()
    tokens = np.memmap(folder / "candidates.bin", dtype=dtype, mode="r") if candidates.count else np.empty(0, dtype)
    ends = np.frombuffer(candidates.ends, dtype=np.int64)
    starts = np.concatenate([[0], ends[:-1]])
    order = np.argsort(np.frombuffer(candidates.hashes, dtype=np.float64), kind="stable")
    held = _SplitWriter(folder, "heldout", dtype)
    held_set = set(order[: heldout.max_documents].tolist())
    for index in order[: heldout.max_documents]:
        held.add_slice(np.asarray(tokens[starts[index] : ends[index]]), candidates.bytes[index])
    for index in range(len(ends)):
        if index not in held_set:
            train.add_slice(np.asarray(tokens[starts[index] : ends[index]]), candidates.bytes[index])
    del tokens
    for leftover in ("candidates.bin", "candidates.docs.npy"):
        (folder / leftover).unlink(missing_ok=True)
    return {"train": train.close(), "heldout": held.close()}
