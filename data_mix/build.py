"""`dapt data build`: tokenise a corpus into its token store, in one streaming pass.

The main process reads and validates documents (sources.py) and sends batches to
one worker process per core, each running the fast tokenizer on one thread and
returning the batch as a flat array of ids with EOS after every document; the main
process appends the arrays to the store's files in order. Processes rather than the
tokenizer's own thread pool, because turning ids into arrays is Python work that
would otherwise serialise on one core. At most two batches per worker are in
flight, so memory is bounded whatever the corpus size. Documents whose content hash
falls below `heldout.fraction` go to a small candidates file; at the end the
`max_documents` lowest hashes become the held-out split and the rest join training,
so the split needs no second pass. The store is written under a temporary name and
renamed last, and an unchanged fingerprint (config, sources, tokenizer) means the
existing store is kept.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import shutil
from array import array
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dapt.data_mix.config import CorpusConfig, HeldoutConfig
from dapt.data_mix.records import (OVER_LENGTH, ChatRenderer, Record, account_records, encode_records,
                                   record_statistics, trained_text_bytes)
from dapt.data_mix.sources import CorpusReader, Document, resolve_files
from dapt.data_mix.split import split_position
from dapt.data_mix.store import (MANIFEST, TRAINED_SUFFIX, file_checksum, file_records, read_manifest, size_problem,
                                 token_dtype, tokenizer_hash)
from dapt.base import DaptError

STORE_VERSION = 3  # 3: stores of tuning records (which tokens are trained targets)
# A batch goes to a worker at this many documents or bytes, whichever comes first.
BATCH_DOCUMENTS = 512
BATCH_BYTES = 1 << 20
IN_FLIGHT_PER_WORKER = 2


class _SplitWriter:
    """Appends documents (token ids + EOS) to one `.bin` file and remembers their ends and bytes;
    for tuning records also which tokens are trained targets (`.trained.bin`), and per record how
    many, and the UTF-8 bytes of the text they stand for (the completion's)."""

    def __init__(self, folder: Path, name: str, dtype: np.dtype, records: bool):
        self.folder, self.name, self.dtype = folder, name, dtype
        self.handle = open(folder / f"{name}.bin", "wb")
        self.trained_handle = open(folder / f"{name}{TRAINED_SUFFIX}", "wb") if records else None
        self.ends, self.bytes, self.trained, self.trained_bytes = array("q"), array("q"), array("q"), array("q")
        self.hashes = array("d")
        self.count = 0

    def add_arrays(self, flat: np.ndarray, lengths: np.ndarray, num_bytes: np.ndarray, positions: np.ndarray,
                   trained: np.ndarray | None = None, trained_bytes: np.ndarray | None = None) -> None:
        """Documents given as one array of ids (EOS included) and each one's length in tokens."""
        self.handle.write(flat.astype(self.dtype, copy=False).tobytes())
        ends = np.cumsum(lengths)
        self.ends.extend((self.count + ends).tolist())
        self.count += len(flat)
        self.bytes.extend(num_bytes.tolist())
        self.hashes.extend(positions.tolist())
        if self.trained_handle is not None:
            self.trained_handle.write(trained.tobytes())
            self.trained.extend(np.add.reduceat(trained, ends - lengths).tolist() if len(lengths) else [])
            self.trained_bytes.extend(trained_bytes.tolist())

    def add_slice(self, tokens: np.ndarray, num_bytes: int, trained: np.ndarray | None = None,
                  trained_bytes: int = 0) -> None:
        self.handle.write(tokens.tobytes())
        self.count += len(tokens)
        self.ends.append(self.count)
        self.bytes.append(num_bytes)
        if self.trained_handle is not None:
            self.trained_handle.write(trained.tobytes())
            self.trained.append(int(trained.sum()))
            self.trained_bytes.append(trained_bytes)

    def close(self) -> dict:
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


def source_fingerprint(corpus: CorpusConfig, heldout: HeldoutConfig, tokenizer_dir: Path) -> dict:
    """What a store depends on; an unchanged fingerprint means nothing to rebuild."""
    tokenizer = tokenizer_hash(tokenizer_dir)  # first: a missing tokenizer is the error to report
    sources = ({str(p): file_checksum(p) for p in resolve_files(corpus)} if corpus.paths
               else {"hf_dataset": corpus.hf_dataset.model_dump()})
    return {"version": STORE_VERSION, "corpus_config": corpus.model_dump(), "heldout": heldout.model_dump(),
            "tokenizer_hash": tokenizer, "sources": sources}


def _file_stat(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def store_staleness(corpus: CorpusConfig, heldout: HeldoutConfig, tokenizer_dir: Path, stores_dir: Path) -> str | None:
    """Why the corpus's store does not hold what the experiment would build now, or None when it does.

    Cheap on an unchanged corpus: a source file is checksummed only when its size or
    modification time differs from the build's; the store's own files are only sized."""
    tokenizer = tokenizer_hash(tokenizer_dir)  # first: a missing tokenizer is the error to report
    folder = stores_dir / corpus.name
    if not (folder / MANIFEST).exists():
        return "not built yet"
    try:
        manifest = read_manifest(folder)
    except DaptError:
        return f"its {MANIFEST} is unreadable"
    built = manifest.get("fingerprint", {})
    if built.get("version") != STORE_VERSION:
        return "built by another version of dapt's store format"
    if built.get("tokenizer_hash") != tokenizer:
        return f"built with another tokenizer than {tokenizer_dir}"
    if built.get("corpus_config") != corpus.model_dump():
        return f"corpus '{corpus.name}' is configured differently since the build"
    if built.get("heldout") != heldout.model_dump():
        return "`heldout` is configured differently since the build"
    if not corpus.paths:
        if built.get("sources") != {"hf_dataset": corpus.hf_dataset.model_dump()}:
            return "its `hf_dataset` changed since the build"
    else:
        now, then, stats = resolve_files(corpus), built.get("sources", {}), manifest.get("source_stats", {})
        added, removed = sorted({str(p) for p in now} - then.keys()), sorted(then.keys() - {str(p) for p in now})
        if added or removed:
            return f"source files {'added: ' + ', '.join(added) if added else 'removed: ' + ', '.join(removed)} since the build"
        for path in now:
            if stats.get(str(path)) != _file_stat(path) and file_checksum(path) != then[str(path)]:
                return f"source file {path} changed since the build"
    return size_problem(folder, manifest)


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
_worker: tuple | None = None


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


def _start_worker(tokenizer_dir: str, dtype: str) -> None:
    # One tokenizer thread per process: the processes are the parallelism.
    os.environ["RAYON_NUM_THREADS"] = "1"
    global _worker
    encoder, eos = load_encoder(Path(tokenizer_dir))
    _worker = (encoder, eos, np.dtype(dtype), cuts_cleanly(encoder))


def _encode_records(records: list[Record], max_tokens: int, truncate: bool) -> tuple[np.ndarray, ...]:
    """Worker: as `_encode`, for tuning records, with which tokens are trained targets, what was
    done with each record (records.KEPT, TRUNCATED, OVER_LENGTH) and its prompt's and completion's
    tokens. Over-length records are left out of the ids."""
    encoder, eos, dtype, _ = _worker
    ids, trained, status, lengths = encode_records(encoder, eos, records, max_tokens, truncate)
    kept = [index for index in range(len(records)) if status[index] != OVER_LENGTH]
    flat = np.concatenate([ids[i] for i in kept]).astype(dtype) if kept else np.empty(0, dtype)
    mask = np.concatenate([trained[i] for i in kept]) if kept else np.empty(0, np.uint8)
    return flat, np.array([len(ids[i]) for i in kept], dtype=np.int64), mask, status, lengths


def _encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Worker: (ids of every document with EOS after each, each document's length with its EOS).
    Encoded a piece group of at most PIECE_CHARS characters at a time, each turned into an array at once."""
    encoder, eos, dtype, in_pieces = _worker
    pieces_of = [document_pieces(text) if in_pieces and len(text) > PIECE_CHARS else [text] for text in texts]
    arrays: list[np.ndarray] = []
    group: list[str] = []

    def encode_group() -> None:
        arrays.extend(np.array(encoding.ids, dtype=dtype)
                      for encoding in encoder.encode_batch_fast(group, add_special_tokens=False))
        group.clear()

    size = 0
    for piece in itertools.chain.from_iterable(pieces_of):
        if group and size + len(piece) > PIECE_CHARS:
            encode_group()
            size = 0
        group.append(piece)
        size += len(piece)
    encode_group()
    end_of_document = np.array([eos], dtype=dtype)
    documents, first = [], 0
    for pieces in pieces_of:
        documents.append(np.concatenate([*arrays[first:first + len(pieces)], end_of_document]))
        first += len(pieces)
    return np.concatenate(documents), np.fromiter(map(len, documents), dtype=np.int64, count=len(documents))


def _batches(reader: CorpusReader):
    """Consecutive documents, bounded in count and size."""
    documents: list[Document] = []
    for document in reader.documents_with_digests():
        documents.append(document)
        if len(documents) == BATCH_DOCUMENTS or sum(d.num_bytes for d in documents) >= BATCH_BYTES:
            yield documents
            documents = []
    if documents:
        yield documents


def build_store(corpus: CorpusConfig, heldout: HeldoutConfig, tokenizer_dir: Path, stores_dir: Path) -> dict:
    """Build (or keep, when up to date) one corpus's store; returns its manifest."""
    final = stores_dir / corpus.name
    stale = store_staleness(corpus, heldout, tokenizer_dir, stores_dir)
    if stale is None:
        return read_manifest(final) | {"rebuilt": False}
    if (final / MANIFEST).exists():
        print(f"store {corpus.name}: {stale}; rebuilding it", flush=True)
    # Sizes and times before the checksums: a file changed while the build reads it is then checksummed again next time.
    source_stats = {str(path): _file_stat(path) for path in resolve_files(corpus)} if corpus.paths else {}
    fingerprint = source_fingerprint(corpus, heldout, tokenizer_dir)
    encoder, eos = load_encoder(tokenizer_dir)  # here for the vocabulary and EOS; workers load their own
    for leftover in stores_dir.glob(f".{corpus.name}.building-*"):  # from a build that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    temporary = stores_dir / f".{corpus.name}.building-{os.getpid()}"
    temporary.mkdir(parents=True)
    vocab_size = encoder.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab_size)
    records = corpus.record_format != "text"
    train, candidates = (_SplitWriter(temporary, name, dtype, records) for name in ("train", "candidates"))

    reader = CorpusReader(corpus, ChatRenderer(tokenizer_dir) if corpus.record_format == "messages" else None)
    record_lengths: list[np.ndarray] = []
    workers = len(os.sched_getaffinity(0))
    progress = tqdm(desc=f"tokenising {corpus.name}", unit="doc", leave=False, disable=None)

    def write(documents: list[Document], encoded) -> None:
        if records:
            flat, lengths, trained, status, token_lengths = encoded.result()
            documents = account_records(reader.report, documents, status)
            record_lengths.append(token_lengths[status != OVER_LENGTH])
            trained_bytes = np.array([trained_text_bytes(d.value) for d in documents], dtype=np.int64)
        else:
            flat, lengths = encoded.result()
        positions = np.array([split_position(d.digest) for d in documents])
        sizes = np.array([d.num_bytes for d in documents], dtype=np.int64)
        held = positions < heldout.fraction
        tokens_held = np.repeat(held, lengths)
        for writer, chosen, chosen_tokens in ((train, ~held, ~tokens_held), (candidates, held, tokens_held)):
            writer.add_arrays(flat[chosen_tokens], lengths[chosen], sizes[chosen], positions[chosen],
                              *((trained[chosen_tokens], trained_bytes[chosen]) if records else ()))
        progress.update(len(lengths))

    try:
        # spawn, not fork: forking a process that may hold threads (tokenizers, torch) is unsafe.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                                 initargs=(str(tokenizer_dir), dtype.str)) as pool:
            in_flight: deque = deque()
            for documents in _batches(reader):
                values = [d.value for d in documents]
                encoded = (pool.submit(_encode_records, values, corpus.max_tokens, corpus.over_length == "truncate")
                           if records else pool.submit(_encode, values))
                in_flight.append((documents, encoded))
                if len(in_flight) >= IN_FLIGHT_PER_WORKER * workers:
                    write(*in_flight.popleft())
            while in_flight:
                write(*in_flight.popleft())
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    finally:
        progress.close()

    splits = _split_heldout(train, candidates, heldout, temporary, dtype)
    if records:
        reader.report.records = record_statistics(np.concatenate(record_lengths) if record_lengths else
                                                  np.empty((0, 2), np.int64))
    manifest = {
        "corpus": corpus.name, "group": corpus.group, "dtype": dtype.name, "vocab_size": vocab_size,
        "eos_token_id": eos, "tokenizer_hash": fingerprint["tokenizer_hash"], "splits": splits,
        "accounting": reader.report.to_json(), "fingerprint": fingerprint, "files": file_records(temporary, records),
        "source_stats": source_stats, "records": records,
    }
    if splits["train"]["documents"] == 0:
        shutil.rmtree(temporary, ignore_errors=True)
        raise DaptError(f"corpus '{corpus.name}': no document is left for training ({reader.report.kept} kept, "
                        f"{splits['heldout']['documents']} held out; rejected {dict(reader.report.rejected) or 'none'}); "
                        f"lower `heldout.fraction`, or see why records were rejected with `dapt data prepare`")
    (temporary / MANIFEST).write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(temporary, final)
    return manifest | {"rebuilt": True}


def _split_heldout(train: _SplitWriter, candidates: _SplitWriter, heldout: HeldoutConfig, folder: Path,
                   dtype: np.dtype) -> dict:
    """The `max_documents` candidates with the lowest hashes are held out; the others join training."""
    records = candidates.trained_handle is not None
    candidates.close()

    def stored(suffix: str, kind) -> np.ndarray:
        return np.memmap(folder / f"candidates{suffix}", dtype=kind, mode="r") if candidates.count else np.empty(0, kind)

    tokens = stored(".bin", dtype)
    trained = stored(TRAINED_SUFFIX, np.uint8) if records else None
    ends = np.frombuffer(candidates.ends, dtype=np.int64)
    starts = np.concatenate([[0], ends[:-1]])
    order = np.argsort(np.frombuffer(candidates.hashes, dtype=np.float64), kind="stable")
    held = _SplitWriter(folder, "heldout", dtype, records)
    held_set = set(order[: heldout.max_documents].tolist())

    def move(index: int, writer: _SplitWriter) -> None:
        span = slice(starts[index], ends[index])
        writer.add_slice(np.asarray(tokens[span]), candidates.bytes[index],
                         *((np.asarray(trained[span]), candidates.trained_bytes[index]) if records else ()))

    for index in order[: heldout.max_documents]:
        move(index, held)
    for index in range(len(ends)):
        if index not in held_set:
            move(index, train)
    del tokens, trained
    for leftover in ("candidates.bin", "candidates.docs.npy", f"candidates{TRAINED_SUFFIX}"):
        (folder / leftover).unlink(missing_ok=True)
    return {"train": train.close(), "heldout": held.close()}
