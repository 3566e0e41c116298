"""The work of a store build, split by bytes into the tasks that run it.

Every corpus's files, in order, make one stream of bytes; task k takes the part between
k/N and (k+1)/N of it. A line-format file (JSONL, TXT read per line) is cut where a task's
share ends, at the next record boundary; a Parquet file between row groups; a
`save_to_disk` dataset between rows. What cannot be cut (a compressed file, a JSON array, a
workbook, a CSV whose quoted fields may span lines) goes whole to the task where most of it
falls. So one 40 GB file and ten thousand small ones both spread over every task, and
reading the tasks' units in task order reads the corpora exactly as one task would: the
store's documents and their order do not depend on the number of tasks.

A unit is plain data (it is written to the build's plan and read back by every task).
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from dapt.base import DaptError
from dapt.data_mix.config import CorpusConfig
from dapt.data_mix.files import SourceFile, open_source, resolve_files

EXTENSION_FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".xlsx": "xlsx",
                     ".parquet": "parquet", ".txt": "txt"}
COMPRESSIBLE = {"jsonl", "csv", "tsv", "txt"}
LINE_FORMATS = {"jsonl"}  # txt per line too (see `_cut_kind`); csv/tsv fields may hold line breaks
SEEK_CHUNK = 1 << 16


@dataclass(frozen=True)
class Unit:
    """A part of one corpus's source to read: bytes [start, end) of a line-format file, rows [start,
    end) of a Parquet file (whole row groups) or a saved dataset, or a whole file (`kind: whole`)."""

    corpus: str
    url: str            # a file, or a `save_to_disk` folder / hub dataset name for `hf_dataset`
    size: int           # bytes of the whole source
    kind: str           # "bytes" | "row_groups" | "rows" | "whole"
    start: int = 0
    end: int = 0
    first_row: int = 0  # row_groups: the number of rows before the first group
    weight: int = 0     # bytes this unit stands for, to balance tasks by
    index: int = 0      # its place among all units of the build (line numbers are resolved by it)

    @property
    def source(self) -> SourceFile:
        return SourceFile(self.url, self.size)

    def to_json(self) -> dict:
        return asdict(self)


def file_format(corpus: CorpusConfig, source: SourceFile) -> str:
    """A file's format, from the corpus `format` or the file's extension (compression suffix aside)."""
    if corpus.format != "auto":
        return corpus.format
    suffixes = source.suffixes
    compressed = bool(suffixes) and source.compression is not None
    if compressed:
        suffixes = suffixes[:-1]
    fmt = EXTENSION_FORMATS.get(suffixes[-1]) if suffixes else None
    if compressed and fmt not in COMPRESSIBLE:
        fmt = None
    if fmt is None:
        raise DaptError(
            f"corpus '{corpus.name}': cannot tell the format of {source} from its extension; set `format` "
            f"to one of {sorted(set(EXTENSION_FORMATS.values()))} (compressed .gz, .bz2, .zst or .xz: "
            f"{sorted(COMPRESSIBLE)})"
        )
    return fmt


def _cut_kind(corpus: CorpusConfig, source: SourceFile) -> str:
    """How a file may be cut between tasks."""
    if source.compression:
        return "whole"  # a compressed stream cannot be entered in the middle
    fmt = file_format(corpus, source)
    if fmt in LINE_FORMATS or (fmt == "txt" and corpus.txt_split == "line"):
        return "bytes"
    return "row_groups" if fmt == "parquet" else "whole"


def whole_units(corpus: CorpusConfig) -> list[Unit]:
    """One unit per source: the corpus read start to end by one reader."""
    if corpus.hf_dataset is not None:
        return [Unit(corpus.name, corpus.hf_dataset.path, 0, "whole")]
    return [Unit(corpus.name, f.url, f.size, "whole", 0, f.size, weight=f.size) for f in resolve_files(corpus.paths, corpus.name)]


def plan_tasks(corpora: list[CorpusConfig], tasks: int) -> list[list[Unit]]:
    """The units of every corpus, in order, cut into `tasks` runs of about equal bytes."""
    sources = [(corpus, unit) for corpus in corpora for unit in _sized_sources(corpus)]
    total = sum(unit.weight for _, unit in sources)
    targets = [total * k / tasks for k in range(1, tasks)]
    plan: list[list[Unit]] = [[] for _ in range(tasks)]
    offset = 0
    for corpus, whole in sources:
        inside = [t - offset for t in targets if offset < t < offset + whole.weight]
        pieces = _cut(corpus, whole, inside) if inside else [_uncut(whole)]
        position = offset
        for piece in pieces:
            # A piece belongs to the task whose share holds its middle.
            plan[bisect.bisect_right(targets, position + piece.weight / 2)].append(piece)
            position += piece.weight
        offset += whole.weight
    number = itertools.count()
    return [[replace(unit, index=next(number)) for unit in units] for units in plan]


def _uncut(unit: Unit) -> Unit:
    return Unit(unit.corpus, unit.url, unit.size, "whole", 0, unit.size, weight=unit.weight) if unit.kind != "rows" else unit


def _sized_sources(corpus: CorpusConfig) -> list[Unit]:
    if corpus.hf_dataset is None:
        return [Unit(corpus.name, f.url, f.size, _cut_kind(corpus, f), 0, f.size, weight=f.size)
                for f in resolve_files(corpus.paths, corpus.name)]
    path = Path(corpus.hf_dataset.path)
    if not path.is_dir():  # a hub dataset, streamed: one reader
        return whole_units(corpus)
    size = sum(p.stat().st_size for p in path.rglob("*.arrow"))
    return [Unit(corpus.name, str(path), size, "rows", 0, _saved_rows(corpus), weight=size)]


def _saved_rows(corpus: CorpusConfig) -> int:
    return len(open_saved_dataset(corpus))


def _cut(corpus: CorpusConfig, unit: Unit, inside: list[float]) -> list[Unit]:
    """`unit` cut near each of the byte positions `inside` it, at boundaries its format allows."""
    if unit.kind == "bytes":
        cuts = sorted({_next_line_start(corpus, unit.source, int(p)) for p in inside} - {0, unit.size})
        bounds = [0, *cuts, unit.size]
        return [Unit(unit.corpus, unit.url, unit.size, "bytes", a, b, weight=b - a)
                for a, b in zip(bounds, bounds[1:]) if b > a]
    if unit.kind == "row_groups":
        return _cut_row_groups(corpus, unit, inside)
    if unit.kind == "rows":
        rows = unit.end
        cuts = sorted({round(rows * p / unit.weight) for p in inside} - {0, rows})
        bounds = [0, *cuts, rows]
        return [Unit(unit.corpus, unit.url, unit.size, "rows", a, b, weight=round(unit.weight * (b - a) / max(rows, 1)))
                for a, b in zip(bounds, bounds[1:]) if b > a]
    return [unit]


def _next_line_start(corpus: CorpusConfig, source: SourceFile, position: int) -> int:
    """The first line start at or after `position` (a line starts after a line break); the file's size if none."""
    with open_source(source, corpus.name, decompress=False) as handle:
        handle.seek(position - 1)
        at = position - 1
        while chunk := handle.read(SEEK_CHUNK):
            found = chunk.find(b"\n")
            if found != -1:
                return at + found + 1
            at += len(chunk)
    return source.size


def _cut_row_groups(corpus: CorpusConfig, unit: Unit, inside: list[float]) -> list[Unit]:
    import pyarrow.parquet as pq

    with open_source(unit.source, corpus.name, decompress=False) as handle:
        metadata = pq.ParquetFile(handle).metadata
    groups = metadata.num_row_groups
    sizes = [metadata.row_group(g).total_byte_size for g in range(groups)]
    scale = unit.weight / max(sum(sizes), 1)
    ends = [sum(sizes[: g + 1]) * scale for g in range(groups)]
    # A cut goes after the group whose end is nearest each position.
    cuts = sorted({min(range(groups), key=lambda g: abs(ends[g] - p)) + 1 for p in inside} - {0, groups})
    bounds = [0, *cuts, groups]
    rows = [metadata.row_group(g).num_rows for g in range(groups)]
    pieces = []
    for a, b in zip(bounds, bounds[1:]):
        weight = round((ends[b - 1] - (ends[a - 1] if a else 0)))
        pieces.append(Unit(unit.corpus, unit.url, unit.size, "row_groups", a, b, first_row=sum(rows[:a]), weight=weight))
    return pieces


def open_saved_dataset(corpus: CorpusConfig):
    """The split of a `save_to_disk` folder that `hf_dataset` names."""
    import datasets

    config = corpus.hf_dataset
    dataset = datasets.load_from_disk(config.path)
    if isinstance(dataset, datasets.DatasetDict):
        if config.split not in dataset:
            raise DaptError(f"corpus '{corpus.name}': {config.path} has no split {config.split!r}; "
                            f"it has {', '.join(dataset)}")
        dataset = dataset[config.split]
    return dataset
