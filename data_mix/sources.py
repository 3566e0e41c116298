"""Read a corpus's files into documents, counting every record that is not kept.

In: a `CorpusConfig` (paths already resolved against the experiment file).
Out: an iterator of document strings and a `SourceReport` whose counts obey
read = kept + sum(rejected), so nothing the user gave disappears unreported.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from data_mix.config import CorpusConfig
from launch.base import DaptError

EXTENSION_FORMATS = {".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet", ".txt": "txt"}
MAX_EXAMPLES = 3


@dataclass
class SourceReport:
    """Accounting of one corpus read: what came in, what was kept, why the rest was not."""

    corpus: str
    files: int = 0
    read: int = 0
    kept: int = 0
    kept_chars: int = 0
    rejected: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def reject(self, reason: str, where: str) -> None:
        self.rejected[reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{reason} at {where}")

    def balanced(self) -> bool:
        return self.read == self.kept + sum(self.rejected.values())

    def to_json(self) -> dict:
        return {
            "corpus": self.corpus, "files": self.files, "read": self.read, "kept": self.kept,
            "kept_chars": self.kept_chars, "rejected": dict(self.rejected), "examples": self.examples,
        }


def resolve_files(corpus: CorpusConfig) -> list[Path]:
    """Expand globs and folders; a pattern that matches nothing is an error naming it."""
    files: list[Path] = []
    for pattern in corpus.paths:
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise DaptError(f"corpus '{corpus.name}': no file matches {pattern}; check `paths` in the experiment file")
        for match in map(Path, matches):
            files.extend(sorted(p for p in match.rglob("*") if p.is_file()) if match.is_dir() else [match])
    return files


def file_format(corpus: CorpusConfig, path: Path) -> str:
    if corpus.format != "auto":
        return corpus.format
    fmt = EXTENSION_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DaptError(
            f"corpus '{corpus.name}': cannot tell the format of {path} from its extension; "
            f"set `format` to one of {sorted(set(EXTENSION_FORMATS.values()))}"
        )
    return fmt


class CorpusReader:
    """Yields the kept documents of one corpus; `report` holds the accounting afterwards."""

    def __init__(self, corpus: CorpusConfig):
        self.corpus = corpus
        self.report = SourceReport(corpus.name)

    def documents(self) -> Iterator[str]:
        self.report = SourceReport(self.corpus.name)
        seen: set[bytes] = set()
        for path in resolve_files(self.corpus):
            self.report.files += 1
            for where, value in self._records(path):
                self.report.read += 1
                text = self._keep(value, where, seen)
                if text is not None:
                    self.report.kept += 1
                    self.report.kept_chars += len(text)
                    yield text
        if self.report.kept == 0:
            raise DaptError(
                f"corpus '{self.corpus.name}': no documents kept from {self.report.files} file(s) "
                f"({self.report.read} read, rejected {dict(self.report.rejected) or 'none'}); "
                "check `paths`, `text_field` and `min_chars`"
            )

    def _keep(self, value: object, where: str, seen: set[bytes]) -> str | None:
        if value is None:
            self.report.reject("missing_field", where)
            return None
        if not isinstance(value, str):
            self.report.reject("not_a_string", where)
            return None
        if not value.strip():
            self.report.reject("empty", where)
            return None
        if len(value) < self.corpus.min_chars:
            self.report.reject("shorter_than_min_chars", where)
            return None
        digest = hashlib.blake2b(value.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        if digest in seen:
            self.report.reject("duplicate", where)
            return None
        seen.add(digest)
        return value

    def _records(self, path: Path) -> Iterator[tuple[str, object]]:
        """(location, text or None) per record; None means the text field is missing."""
        fmt = file_format(self.corpus, path)
        try:
            if fmt == "txt":
                yield from self._txt(path)
            elif fmt == "jsonl":
                yield from self._jsonl(path)
            elif fmt == "csv":
                yield from self._csv(path)
            else:
                yield from self._parquet(path)
        except UnicodeDecodeError as err:
            raise DaptError(
                f"corpus '{self.corpus.name}': {path} is not valid {self.corpus.encoding} at byte {err.start}; "
                "set the corpus `encoding` (e.g. latin-1)"
            ) from None

    def _text_of(self, record: dict) -> object:
        if self.corpus.text_template is None:
            return record.get(self.corpus.text_field)
        try:
            return self.corpus.text_template.format_map(record)
        except KeyError:
            return None

    def _txt(self, path: Path) -> Iterator[tuple[str, object]]:
        text = path.read_text(encoding=self.corpus.encoding)
        if self.corpus.txt_split == "file":
            yield str(path), text
        else:
            for number, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    yield f"{path}:{number}", line

    def _jsonl(self, path: Path) -> Iterator[tuple[str, object]]:
        with open(path, encoding=self.corpus.encoding) as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    self.report.read += 1
                    self.report.reject("malformed_record", f"{path}:{number}")
                    continue
                yield f"{path}:{number}", self._text_of(record) if isinstance(record, dict) else None

    def _csv(self, path: Path) -> Iterator[tuple[str, object]]:
        csv.field_size_limit(sys.maxsize)
        with open(path, encoding=self.corpus.encoding, newline="") as handle:
            reader = csv.DictReader(handle)
            for record in reader:
                yield f"{path}:{reader.line_num}", self._text_of(record)

    def _parquet(self, path: Path) -> Iterator[tuple[str, object]]:
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for record in batch.to_pylist():
                row += 1
                yield f"{path}:row {row}", self._text_of(record)
