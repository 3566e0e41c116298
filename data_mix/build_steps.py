"""The steps of a store build, run by datatrove's executors (local processes, a Slurm array, Ray).

    read    (N tasks)  each task reads its units (units.py) with dapt's readers and validation,
                       tokenises the kept documents and writes them, with their content digests,
                       places and the task's accounting, under `read/<task>/<corpus>/`; with
                       near-deduplication it also hands every document to datatrove's MinHash
                       signature step
    buckets (bands)    datatrove's MinHash buckets: candidate pairs of near-duplicates
    decide  (1 task)   dedup.py: which documents are duplicates, held out or trained on
    write   (N tasks)  each task writes its training shard of every corpus it read

A task writes only under its own folder and starts that folder over when it is rerun, and
datatrove marks a task finished (`logs/<stage>/completions/<task>`) only after its step
returned, so a killed build reruns the unfinished tasks and nothing reads a half-written one.
"""

from __future__ import annotations

import json
import shutil
from array import array
from pathlib import Path

import numpy as np
from datatrove.data import Document as TroveDocument
from datatrove.pipeline.base import PipelineStep

from dapt.data_mix.config import CorpusConfig
from dapt.data_mix.records import OVER_LENGTH, ChatRenderer, account_records, trained_text_bytes
from dapt.data_mix.shard_writer import ShardWriter
from dapt.data_mix.sources import CorpusReader, Document
from dapt.data_mix.units import Unit

# A batch is tokenised at this many documents or bytes, whichever comes first.
BATCH_DOCUMENTS = 512
BATCH_BYTES = 1 << 20
COPY_TOKENS = 1 << 23  # tokens copied into a shard at a time
# What `decide` makes of each document read, per task and corpus (`decision.npy`).
TRAIN, HELDOUT, DUPLICATE, NEAR_DUPLICATE, HELDOUT_NEAR_DUPLICATE = range(5)
REMOVED = {DUPLICATE: "duplicate", NEAR_DUPLICATE: "near_duplicate", HELDOUT_NEAR_DUPLICATE: "heldout_near_duplicate"}


class BuildLayout:
    """Where the stages of one build write, under its work folder."""

    def __init__(self, work: str | Path):
        self.work = Path(work)

    def read(self, task: int, corpus: str) -> Path:
        return self.work / "read" / f"{task:05d}" / corpus

    def read_task(self, task: int) -> Path:
        return self.work / "read" / f"{task:05d}"

    @property
    def signatures(self) -> Path:
        return self.work / "minhash" / "signatures"

    @property
    def buckets(self) -> Path:
        return self.work / "minhash" / "buckets"

    def decision(self, task: int, corpus: str) -> Path:
        return self.read(task, corpus) / "decision.npy"

    @property
    def decided(self) -> Path:
        return self.work / "decided"

    def shard(self, corpus: str) -> Path:
        return self.work / "shards" / corpus

    def logs(self, stage: str) -> Path:
        return self.work / "logs" / stage


def load_plan(work: Path) -> list[list[Unit]]:
    return [[Unit(**unit) for unit in units] for units in json.loads((Path(work) / "plan.json").read_text())["tasks"]]


class ReadStep(PipelineStep):
    """Read, validate and tokenise one task's units; yields each kept document to a MinHash step."""

    name = "dapt: read and tokenise"
    type = "📖 - READER"

    def __init__(self, work: str, corpora: list[CorpusConfig], tokenizer_dir: str, dtype: str, near: bool):
        super().__init__()
        self.work, self.corpora, self.tokenizer_dir, self.dtype, self.near = work, corpora, tokenizer_dir, dtype, near

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from dapt.data_mix import tokenise

        layout = BuildLayout(self.work)
        units = load_plan(layout.work)[rank]
        shutil.rmtree(layout.read_task(rank), ignore_errors=True)  # a rerun starts the task over
        tokenise.start_encoder(self.tokenizer_dir, self.dtype)
        sequence = 0
        for corpus in self.corpora:
            mine = [unit for unit in units if unit.corpus == corpus.name]
            if mine:
                for document in _read_corpus(corpus, mine, layout.read(rank, corpus.name), self.tokenizer_dir,
                                             np.dtype(self.dtype)):
                    self.stat_update("documents")
                    if self.near:
                        yield TroveDocument(text=document.text, id=f"{rank}/{sequence}")
                    sequence += 1


def _read_corpus(corpus: CorpusConfig, units: list[Unit], out: Path, tokenizer_dir: str, dtype: np.dtype):
    """One corpus's part of a task: documents tokenised into `out`, yielded as they are written."""
    from dapt.data_mix import tokenise

    out.mkdir(parents=True)
    records = corpus.record_format != "text"
    reader = CorpusReader(corpus, ChatRenderer(Path(tokenizer_dir)) if corpus.record_format == "messages" else None,
                          deduplicate=False)
    writer = ShardWriter(out, "documents", dtype, records)
    digests, places, chars, where_offsets, record_lengths = bytearray(), array("q"), array("q"), array("q", [0]), []
    with open(out / "where.txt", "wb") as where_file:
        for batch in _batches(reader.documents_with_digests(units)):
            if records:
                flat, lengths, trained, status, token_lengths = tokenise.encode_record_batch(
                    [d.value for d in batch], corpus.max_tokens, corpus.over_length == "truncate")
                batch = account_records(reader.report, batch, status)
                record_lengths.append(token_lengths[status != OVER_LENGTH])
                trained_bytes = np.array([trained_text_bytes(d.value) for d in batch], dtype=np.int64)
                writer.add_arrays(flat, lengths, np.array([d.num_bytes for d in batch], dtype=np.int64), trained,
                                  trained_bytes)
            else:
                flat, lengths = tokenise.encode_texts([d.value for d in batch])
                writer.add_arrays(flat, lengths, np.array([d.num_bytes for d in batch], dtype=np.int64))
            for document in batch:
                digests += document.digest
                places.append(document.unit)
                chars.append(len(document.text))
                line = (document.where.replace("\n", " ") + "\n").encode("utf-8", "surrogatepass")
                where_file.write(line)
                where_offsets.append(where_offsets[-1] + len(line))  # a text file's tell() is slow
                yield document
    np.save(out / "digests.npy", np.frombuffer(bytes(digests), dtype=np.uint8).reshape(-1, 16))
    np.save(out / "units.npy", np.frombuffer(places, dtype=np.int64))
    np.save(out / "chars.npy", np.frombuffer(chars, dtype=np.int64))
    np.save(out / "where.npy", np.frombuffer(where_offsets, dtype=np.int64))
    if records:
        np.save(out / "record_lengths.npy", np.concatenate(record_lengths) if record_lengths else np.empty((0, 2), np.int64))
    counts = writer.close()
    (out / "report.json").write_text(json.dumps({"report": reader.report.to_json(), "counts": counts,
                                                 "unit_lines": reader.unit_lines}))


def _batches(documents):
    """Consecutive documents, bounded in count and size."""
    batch: list[Document] = []
    size = 0
    for document in documents:
        batch.append(document)
        size += document.num_bytes
        if len(batch) == BATCH_DOCUMENTS or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class WriteStep(PipelineStep):
    """Write one task's training shard of each corpus it read: its documents that `decide` kept for training."""

    name = "dapt: write shards"
    type = "💽 - WRITER"

    def __init__(self, work: str, corpora: list[CorpusConfig], dtype: str):
        super().__init__()
        self.work, self.corpora, self.dtype = work, corpora, dtype

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from dapt.data_mix.store import file_records, shard_files

        layout = BuildLayout(self.work)
        for corpus in self.corpora:
            source = layout.read(rank, corpus.name)
            if source.exists():
                shard = f"train-{rank:05d}"
                folder = layout.shard(corpus.name)
                folder.mkdir(parents=True, exist_ok=True)
                decision = np.load(layout.decision(rank, corpus.name))
                records, dtype = corpus.record_format != "text", np.dtype(self.dtype)
                writer = ShardWriter(folder, shard, dtype, records)
                ReadOutput(source, dtype, records).copy(writer, np.flatnonzero(decision == TRAIN))
                counts = writer.close()
                files = file_records(folder, list(shard_files(shard, records)))
                (folder / f"{shard}.json").write_text(json.dumps({"counts": counts, "files": files}))
        yield from ()


class ReadOutput:
    """What a read task wrote of one corpus, to copy documents from into shards."""

    def __init__(self, folder: Path, dtype: np.dtype, records: bool):
        from dapt.data_mix.store import TRAINED_SUFFIX

        self.docs = np.load(folder / "documents.docs.npy")
        self.tokens = _Slices(folder / "documents.bin", dtype)
        self.trained = _Slices(folder / f"documents{TRAINED_SUFFIX}", np.uint8) if records else None
        self.ends = self.docs[:, 0]
        self.starts = np.concatenate([[0], self.ends[:-1]]).astype(np.int64)

    def copy(self, writer: ShardWriter, chosen: np.ndarray) -> None:
        """Append documents `chosen` (indices in increasing order) to `writer`: each run of consecutive
        documents as slices of at most COPY_TOKENS tokens, so that memory does not grow with the corpus."""
        if not len(chosen):
            return
        for run in np.split(chosen, np.flatnonzero(np.diff(chosen) != 1) + 1):
            first = 0
            while first < len(run):
                # The documents of the run whose tokens fit in the budget (at least one).
                budget = self.starts[run[first]] + COPY_TOKENS
                last = max(first + 1, int(np.searchsorted(self.ends[run], budget, side="right")))
                part = run[first:last]
                low, high = int(self.starts[part[0]]), int(self.ends[part[-1]])
                writer.add_arrays(np.asarray(self.tokens[low:high]), self.ends[part] - self.starts[part], self.docs[part, 1],
                                  *((np.asarray(self.trained[low:high]), self.docs[part, 3]) if self.trained is not None
                                    else ()))
                first = last


class _Slices:
    """Slices of a flat file of ids read with plain reads: a memory map would keep every page read
    resident in this process, so that its memory grew with the corpus."""

    def __init__(self, path: Path, dtype):
        self.path, self.dtype = path, np.dtype(dtype)

    def __getitem__(self, span: slice) -> np.ndarray:
        return np.fromfile(self.path, dtype=self.dtype, count=span.stop - span.start, offset=span.start * self.dtype.itemsize)
