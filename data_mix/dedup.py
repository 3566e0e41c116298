"""What a store build keeps: exact and near duplicates, the held-out split, decontamination.

One task over what every read task wrote (digests, places), in reading order: the corpora in
the experiment's order, each read start to end. That order does not depend on how many tasks
read it, so neither does anything decided here.

- Exact: of documents with the same text (per corpus, or across corpora), the first read is kept.
- Held out: per corpus, of the documents left, those whose content hash is below
  `heldout.fraction`, the `max_documents` lowest (split.py), as before deduplication existed.
- Near (`dedup.near`): datatrove's MinHash buckets give pairs of documents whose signatures
  agree on a band; their connected groups are near-duplicate clusters. In a cluster that holds a
  held-out document, every training document is removed (`heldout_near_duplicate`: held-out
  bits-per-byte is then not measured on text trained on) unless `decontaminate: false`; in
  another, the first document read is kept and the others are removed (`near_duplicate`).

Every document removed is a counted rejection in its corpus's accounting, the first few with
where the kept copy is.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dapt.data_mix.build_steps import (DUPLICATE, HELDOUT, HELDOUT_NEAR_DUPLICATE, NEAR_DUPLICATE, REMOVED, TRAIN,
                                       BuildLayout, PipelineStep, ReadOutput, load_plan)
from dapt.data_mix.config import CorpusConfig, DedupConfig, HeldoutConfig
from dapt.data_mix.records import record_statistics
from dapt.data_mix.shard_writer import ShardWriter
from dapt.data_mix.sources import EXAMPLES_PER_REASON, SourceReport, resolve_lines

SENTINEL = (1 << 32) - 1  # datatrove's marker of a match against an index, not a document of this build


class _Documents:
    """Every document read by the build, numbered in reading order across corpora."""

    def __init__(self, layout: BuildLayout, corpora: list[CorpusConfig], tasks: int):
        self.layout, self.names = layout, [c.name for c in corpora]
        self.parts: list[tuple[int, int, int, int]] = []  # (corpus, task, first document, count)
        digests, chars = [], []
        first = 0
        for corpus_id, name in enumerate(self.names):
            for task in range(tasks):
                folder = layout.read(task, name)
                if folder.exists():
                    part = np.load(folder / "digests.npy")
                    self.parts.append((corpus_id, task, first, len(part)))
                    digests.append(part)
                    chars.append(np.load(folder / "chars.npy"))
                    first += len(part)
        self.count = first
        self.digests = np.concatenate(digests) if digests else np.empty((0, 16), np.uint8)
        self.chars = np.concatenate(chars) if chars else np.empty(0, np.int64)
        self.corpus = np.concatenate([np.full(n, c) for c, _, _, n in self.parts]) if self.parts else np.empty(0, int)

    def positions(self) -> np.ndarray:
        """Each document's place in [0, 1) by its content hash (split.py's `split_position`)."""
        return self.digests[:, :8].copy().view("<u8").ravel() / 2**64

    def where(self, index: int) -> str:
        corpus, task, first, _ = self._part(index)
        folder = self.layout.read(task, self.names[corpus])
        offsets = np.load(folder / "where.npy", mmap_mode="r")
        local = index - first
        with open(folder / "where.txt", "rb") as handle:
            handle.seek(int(offsets[local]))
            return handle.read(int(offsets[local + 1] - offsets[local])).decode("utf-8", "surrogatepass").rstrip("\n")

    def _part(self, index: int) -> tuple[int, int, int, int]:
        return next(part for part in self.parts if part[2] <= index < part[2] + part[3])

    def task_documents(self, tasks: int) -> list[np.ndarray]:
        """Per task, the build-wide numbers of its documents in the order it read them (corpora in order)."""
        per_task: list[list[np.ndarray]] = [[] for _ in range(tasks)]
        for _, task, first, count in self.parts:
            per_task[task].append(np.arange(first, first + count))
        return [np.concatenate(parts) if parts else np.empty(0, np.int64) for parts in per_task]


class DecideStep(PipelineStep):
    """One task over the whole build: duplicates, the held-out split, decontamination (dedup.py)."""

    name = "dapt: deduplicate and split"
    type = "🫂 - DEDUP"

    def __init__(self, work: str, corpora: list[CorpusConfig], heldout: HeldoutConfig, dedup: DedupConfig):
        super().__init__()
        self.work, self.corpora, self.heldout, self.dedup = work, corpora, heldout, dedup

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        decide(BuildLayout(self.work), self.corpora, self.heldout, self.dedup)
        yield from ()


def decide(layout: BuildLayout, corpora: list[CorpusConfig], heldout: HeldoutConfig, dedup: DedupConfig) -> None:
    tasks = len(load_plan(layout.work))
    documents = _Documents(layout, corpora, tasks)
    decision = np.full(documents.count, TRAIN, dtype=np.int8)
    kept_copy = np.full(documents.count, -1, dtype=np.int64)  # a removed document: the one kept in its place
    if dedup.exact != "off":
        _exact(documents, dedup.exact == "across", decision, kept_copy)
    held_order = _hold_out(documents, heldout, decision)
    if dedup.near is not None:
        pairs = _near_pairs(layout, documents, tasks)
        if not dedup.near.across_corpora:
            pairs = pairs[documents.corpus[pairs[:, 0]] == documents.corpus[pairs[:, 1]]]
        _near(pairs, dedup.decontaminate, decision, kept_copy)
    layout.decided.mkdir(parents=True, exist_ok=True)
    for corpus_id, task, first, count in documents.parts:
        np.save(layout.decision(task, documents.names[corpus_id]), decision[first : first + count])
    for corpus_id, corpus in enumerate(corpora):
        summary = _account(layout, documents, corpus, corpus_id, tasks, decision, kept_copy)
        summary["heldout"] = [[documents._part(int(i))[1], int(i) - documents._part(int(i))[2]]
                              for i in held_order[corpus_id]]
        (layout.decided / f"{corpus.name}.json").write_text(json.dumps(summary))


def _exact(documents: _Documents, across: bool, decision: np.ndarray, kept_copy: np.ndarray) -> None:
    """Of documents with equal digests (in one corpus, or in any), all but the first read are duplicates."""
    if documents.count == 0:
        return
    words = documents.digests.copy().view("<u8")  # two 64-bit words per digest
    keys = (np.arange(documents.count), words[:, 1], words[:, 0]) + (() if across else (documents.corpus,))
    order = np.lexsort(keys)
    same = np.ones(len(order), dtype=bool)
    for key in keys[1:]:
        same[1:] &= key[order][1:] == key[order][:-1]
    same[0] = False
    group_start = np.maximum.accumulate(np.where(~same, np.arange(len(order)), 0))
    duplicates = order[same]
    decision[duplicates] = DUPLICATE
    kept_copy[duplicates] = order[group_start[same]]


def _hold_out(documents: _Documents, heldout: HeldoutConfig, decision: np.ndarray) -> list[np.ndarray]:
    """Per corpus, the held-out documents (marked in `decision`), lowest hash first."""
    positions = documents.positions()
    held = []
    for corpus_id in range(len(documents.names)):
        candidates = np.flatnonzero((documents.corpus == corpus_id) & (decision == TRAIN) & (positions < heldout.fraction))
        chosen = candidates[np.lexsort((candidates, positions[candidates]))][: heldout.max_documents]
        decision[chosen] = HELDOUT
        held.append(chosen)
    return held


def _near_pairs(layout: BuildLayout, documents: _Documents, tasks: int) -> np.ndarray:
    """The candidate pairs of datatrove's MinHash buckets, as build-wide document numbers."""
    per_task = documents.task_documents(tasks)
    pairs = []
    for path in sorted(layout.buckets.glob("*.dups")):
        raw = np.fromfile(path, dtype="<u4").reshape(-1, 4)
        raw = raw[raw[:, 0] != SENTINEL]
        pairs.extend(zip((per_task[a][b] for a, b in raw[:, :2]), (per_task[a][b] for a, b in raw[:, 2:])))
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def _near(pairs: np.ndarray, decontaminate: bool, decision: np.ndarray, kept_copy: np.ndarray) -> None:
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs.tolist():
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    clusters: dict[int, list[int]] = {}
    for member in sorted(parent):
        clusters.setdefault(root(member), []).append(member)
    for members in clusters.values():
        alive = [m for m in members if decision[m] in (TRAIN, HELDOUT)]
        held = [m for m in alive if decision[m] == HELDOUT]
        if len(alive) < 2:
            continue
        keeper, reason = (held[0], HELDOUT_NEAR_DUPLICATE) if decontaminate and held else (alive[0], NEAR_DUPLICATE)
        for member in alive:
            if member != keeper and decision[member] == TRAIN:
                decision[member], kept_copy[member] = reason, keeper


def _account(layout: BuildLayout, documents: _Documents, corpus: CorpusConfig, corpus_id: int, tasks: int,
             decision: np.ndarray, kept_copy: np.ndarray) -> dict:
    """The corpus's accounting: its tasks' reports merged, the removals of this step counted in."""
    reads = [json.loads((layout.read(task, corpus.name) / "report.json").read_text())
             for task in range(tasks) if layout.read(task, corpus.name).exists()]
    report = SourceReport.merged(corpus.name, [r["report"] for r in reads])
    lines = {int(unit): count for task in range(tasks) if layout.read_task(task).exists()
             for r in _task_reads(layout, task) for unit, count in r["unit_lines"].items()}
    plan = [unit for units in load_plan(layout.work) for unit in units]
    lines_before = _lines_before(plan, lines)
    for corpus_part in (p for p in documents.parts if p[0] == corpus_id):
        _, task, first, count = corpus_part
        units = np.load(layout.read(task, corpus.name) / "units.npy")
        removed = np.flatnonzero(decision[first : first + count] >= DUPLICATE)
        for local in removed.tolist():
            index = first + local
            reason = REMOVED[int(decision[index])]
            source = plan[int(units[local])].url
            report.remove(source, reason, int(documents.chars[index]))
            if len(report.examples.get(reason, [])) < EXAMPLES_PER_REASON:
                report.examples.setdefault(reason, []).append(
                    f"{documents.where(index)} (kept: {documents.where(int(kept_copy[index]))})")
    report.examples = {reason: [resolve_lines(where, lines_before) for where in shown]
                       for reason, shown in report.examples.items()}
    if corpus.record_format != "text":
        lengths = [np.load(layout.read(task, corpus.name) / "record_lengths.npy")
                   for task in range(tasks) if layout.read(task, corpus.name).exists()]
        report.records = record_statistics(np.concatenate(lengths) if lengths else np.empty((0, 2), np.int64))
    decontaminated = int(np.sum(decision[documents.corpus == corpus_id] == HELDOUT_NEAR_DUPLICATE))
    return {"accounting": report.to_json(), "decontaminated": decontaminated,
            "kept": int(np.sum(np.isin(decision[documents.corpus == corpus_id], (TRAIN, HELDOUT))))}


def _task_reads(layout: BuildLayout, task: int) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(layout.read_task(task).glob("*/report.json"))]


def _lines_before(plan: list, lines: dict[int, int]) -> dict[int, int]:
    """Per unit of a line-format file: the lines of the same file's units before it."""
    before, seen = {}, {}
    for unit in plan:
        if unit.kind == "bytes":
            before[unit.index] = seen.get(unit.url, 0)
            seen[unit.url] = before[unit.index] + lines.get(unit.index, 0)
    return before


def write_heldout(layout: BuildLayout, corpus: CorpusConfig, decided: dict, folder: Path, dtype: np.dtype) -> dict:
    """The corpus's held-out shard, lowest content hash first (as `max_documents` chose them)."""
    records = corpus.record_format != "text"
    outputs: dict[int, ReadOutput] = {}
    writer = ShardWriter(folder, "heldout-00000", dtype, records)
    for task, local in decided["heldout"]:
        if task not in outputs:
            outputs[task] = ReadOutput(layout.read(task, corpus.name), dtype, records)
        outputs[task].copy(writer, np.array([local]))
    return writer.close()
