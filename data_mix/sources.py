"""Read a corpus into documents, accounting for every record that is not kept.

In: a `CorpusConfig` (paths already resolved against the experiment file).
Out: an iterator of document strings and a `SourceReport` that obeys
read = kept + Σ rejected, per corpus and per file, so nothing the user gave
disappears unreported.

Formats: jsonl, json (an array of records, or an object holding one), csv, tsv,
xlsx, parquet, txt (a document per file, per line or per separator), the line
formats gzip-compressed (`.gz`), and Hugging Face datasets (a `save_to_disk`
folder, or a hub name read by streaming). Line formats are decoded line by line,
so an undecodable line is rejected with its file, line and byte offset instead of
failing the file. Everything streams except json, which is parsed whole.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from dapt.data_mix.config import CorpusConfig
from dapt.data_mix.files import open_source
from dapt.data_mix.records import ChatRenderer, Record, prompt_completion
from dapt.data_mix.split import content_digest
from dapt.data_mix.units import Unit, file_format, open_saved_dataset, whole_units
from dapt.base import DaptError

# Problems of the record itself: `on_error: fail` stops on them. Filters (empty, length, duplicate) never do.
BAD_RECORD = {"malformed_record", "invalid_encoding", "missing_field", "not_a_string"}
EXAMPLES_PER_REASON = 3


@dataclass
class Rejected:
    """A record that cannot be read, with why and where; `text` is what could be decoded."""

    reason: str
    where: str
    text: str = ""


HINTS = {
    "invalid_encoding": "set the corpus `encoding` (e.g. latin-1) or `encoding_errors: replace`",
    "missing_field": "check `text_field` or `text_template` against the records' fields",
    "malformed_record": "check `format` (and that the files are what their extension says)",
    "not_a_string": "point `text_field` at a field that holds text",
    "shorter_than_min_chars": "lower `min_chars`",
    "longer_than_max_chars": "raise `max_chars`",
    "empty_prompt": "give every record a prompt (the loss covers only the completion)",
    "empty_completion": "give every record a completion",
    "no_assistant_turn": "give every chat record an assistant turn to train on",
    "longer_than_max_tokens": "raise the corpus `max_tokens` (and `mix.seq_len`), or set `over_length: truncate`",
}


@dataclass(frozen=True)
class Document:
    """A kept document: its text (or tuning `Record`), content digest and UTF-8 bytes, and where it was read."""

    value: str | Record
    digest: bytes
    num_bytes: int
    source: str
    where: str
    unit: int = 0
    """The build-wide index of the unit (part of a file) it was read from."""

    @property
    def text(self) -> str:
        return self.value.text if isinstance(self.value, Record) else self.value


@dataclass
class Counts:
    read: int = 0
    kept: int = 0
    kept_chars: int = 0
    rejected: Counter = field(default_factory=Counter)

    def balanced(self) -> bool:
        return self.read == self.kept + sum(self.rejected.values())

    def to_json(self) -> dict:
        return {"read": self.read, "kept": self.kept, "kept_chars": self.kept_chars, "rejected": dict(self.rejected)}


@dataclass
class SourceReport:
    """Accounting of one corpus read: what came in, what was kept, why the rest was not."""

    corpus: str
    total: Counts = field(default_factory=Counts)
    per_file: dict[str, Counts] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    """The first few locations per rejection reason, and per note."""
    notes: Counter = field(default_factory=Counter)
    """Kept records worth a look, by kind (a prompt truncated, a prompt seen with another completion)."""
    records: dict | None = None
    """Tuning records, once tokenised: their prompts' and completions' tokens (percentiles)."""

    def note(self, kind: str, where: str) -> None:
        self.notes[kind] += 1
        shown = self.examples.setdefault(kind, [])
        if len(shown) < EXAMPLES_PER_REASON:
            shown.append(where)

    def reject_kept(self, document: Document, reason: str) -> None:
        """A document counted as kept turns out to be rejected (a record over `max_tokens`, known once tokenised)."""
        self.remove(document.source, reason, len(document.text))
        shown = self.examples.setdefault(reason, [])
        if len(shown) < EXAMPLES_PER_REASON:
            shown.append(document.where)

    def remove(self, source: str, reason: str, chars: int) -> None:
        """Count a kept document of `source` as rejected for `reason` (its example is the caller's to add)."""
        for counts in (self.total, self.per_file[source]):
            counts.kept -= 1
            counts.kept_chars -= chars
            counts.rejected[reason] += 1

    @classmethod
    def merged(cls, corpus: str, parts: list[dict]) -> SourceReport:
        """One report of the reports (`to_json`) of a corpus's parts, read in this order."""
        report = cls(corpus)
        for part in parts:
            for name, counts in part["per_file"].items():
                for tally in (report.per_file.setdefault(name, Counts()), report.total):
                    tally.read += counts["read"]
                    tally.kept += counts["kept"]
                    tally.kept_chars += counts["kept_chars"]
                    tally.rejected.update(counts["rejected"])
            for kind, shown in part["examples"].items():
                merged = report.examples.setdefault(kind, [])
                merged.extend(shown[: EXAMPLES_PER_REASON - len(merged)])
            report.notes.update(part["notes"])
        return report

    @property
    def read(self) -> int:
        return self.total.read

    @property
    def kept(self) -> int:
        return self.total.kept

    @property
    def rejected(self) -> Counter:
        return self.total.rejected

    def balanced(self) -> bool:
        return self.total.balanced() and all(c.balanced() for c in self.per_file.values())

    def to_json(self) -> dict:
        return {"corpus": self.corpus, "files": len(self.per_file), **self.total.to_json(),
                "invariant_holds": self.balanced(), "examples": self.examples, "notes": dict(self.notes),
                **({"records": self.records} if self.records is not None else {}),
                "per_file": {name: counts.to_json() for name, counts in self.per_file.items()}}


def resolve_lines(where: str, lines_before: dict[int, int]) -> str:
    """A location read by a task from the middle of a file (`path:⟨unit+line⟩`) with its line number in the
    whole file, once the lines of the file's earlier units are known."""
    return re.sub(r"⟨(\d+)\+(\d+)⟩", lambda m: str(lines_before[int(m[1])] + int(m[2])), where)


class CorpusReader:
    """Yields the kept documents of one corpus; `report` holds the accounting afterwards.
    Documents are text, or `Record`s for a corpus of tuning records (their text for `documents`);
    `chat` renders chat records (`record_format: messages`) with a tokenizer's template."""

    def __init__(self, corpus: CorpusConfig, chat: ChatRenderer | None = None, deduplicate: bool = True):
        self.corpus, self.chat, self.deduplicate = corpus, chat, deduplicate
        self.report = SourceReport(corpus.name)
        self.unit_lines: dict[int, int] = {}
        """Per unit of a line-format file read (by its index): how many lines it held."""

    def documents(self) -> Iterator[str]:
        for document in self.documents_with_digests():
            yield document.text

    def documents_with_digests(self, units: list[Unit] | None = None) -> Iterator[Document]:
        """Each kept document with its content digest, UTF-8 bytes, file and place: what the store
        build needs, computed once. `units`: a part of the corpus (a build task's); default all of it."""
        whole = units is None
        self.report = SourceReport(self.corpus.name)
        self._completions: dict[bytes, tuple[str, str]] = {}  # per prompt: its first completion and where
        seen: set[bytes] = set()
        units = whole_units(self.corpus) if whole else units
        self._unit_starts = {unit.index: unit.start for unit in units}
        for unit, records in self._sources(units):
            source = unit.url
            counts = self.report.per_file.setdefault(source, Counts())
            for where, value in records:
                kept = self._keep(value, where, seen, counts)
                if kept is not None:
                    text = value.text if isinstance(value, Record) else value
                    for tally in (counts, self.report.total):
                        tally.kept += 1
                        tally.kept_chars += len(text)
                    yield Document(value, *kept, source, where, unit.index)
        if whole and self.report.kept == 0:
            common = self.report.rejected.most_common(1)
            hint = self.hint(common[0][0]) if common else "check `paths`"
            raise DaptError(
                f"corpus '{self.corpus.name}': no documents kept from {len(self.report.per_file)} file(s) "
                f"({self.report.read} read, rejected {dict(self.report.rejected) or 'none'}); {hint}"
            )

    def hint(self, reason: str) -> str:
        if reason == "missing_field" and self.corpus.record_format != "text":
            fields = ("`messages`" if self.corpus.record_format == "messages" else "the fields of `prompt_template` and "
                      "`completion_template`" if self.corpus.prompt_template or self.corpus.completion_template
                      else "`prompt` and `completion`")
            return f"every record of `record_format: {self.corpus.record_format}` needs {fields}"
        return HINTS.get(reason, "check `paths`")

    def _reject(self, reason: str, where: str, counts: Counts) -> None:
        if reason in BAD_RECORD and self.corpus.on_error == "fail":
            # A task reading from the middle of a file does not know the lines before its part: say where it starts.
            where = re.sub(r"⟨(\d+)\+(\d+)⟩", lambda m: f"line {m[2]} after byte {self._unit_starts[int(m[1])]}", where)
            raise DaptError(f"corpus '{self.corpus.name}': {reason.replace('_', ' ')} at {where}; {self.hint(reason)} "
                            "(or set `on_error: skip` to count and skip such records)")
        counts.rejected[reason] += 1
        self.report.total.rejected[reason] += 1
        shown = self.report.examples.setdefault(reason, [])
        if len(shown) < EXAMPLES_PER_REASON:
            shown.append(where)

    def _keep(self, value: object, where: str, seen: set[bytes], counts: Counts) -> tuple[bytes, int] | None:
        """(digest, UTF-8 bytes) of a document that is kept; None (and counted) otherwise."""
        counts.read += 1
        self.report.total.read += 1
        reason = None
        text = value.text if isinstance(value, Record) else value
        if isinstance(value, Rejected):
            reason = value.reason
        elif value is None:
            reason = "missing_field"
        elif not isinstance(text, str):
            reason = "not_a_string"
        elif isinstance(value, Record) and (not value.prompt.strip() or not value.completion.strip()):
            reason = "empty_prompt" if not value.prompt.strip() else "empty_completion"
        elif not text.strip():
            reason = "empty"
        elif len(text) < self.corpus.min_chars:
            reason = "shorter_than_min_chars"
        elif self.corpus.max_chars is not None and len(text) > self.corpus.max_chars:
            reason = "longer_than_max_chars"
        else:
            data = text.encode("utf-8", "surrogatepass")
            # A record's digest tells its segments apart: "ab" + "c" is not "a" + "bc".
            digest = content_digest(json.dumps(value.segments).encode() if isinstance(value, Record) else data)
            if self.deduplicate and digest in seen:
                reason = "duplicate"
            else:
                if self.deduplicate:
                    seen.add(digest)
                if isinstance(value, Record):
                    self._note_conflict(value, where)
                return digest, len(data)
        self._reject(reason, value.where if isinstance(value, Rejected) else where, counts)
        return None

    def _note_conflict(self, record: Record, where: str) -> None:
        """Count a prompt seen before with another completion (conflicting labels); kept all the same."""
        prompt = content_digest(record.prompt.encode("utf-8", "surrogatepass"))
        first = self._completions.setdefault(prompt, (record.completion, where))
        if first[0] != record.completion:
            self.report.note("prompt_with_other_completion", f"{where} (first at {first[1]})")

    # Each source yields (location, text | None | Rejected) per record; None: the field is missing.

    def _sources(self, units: list[Unit]) -> Iterator[tuple[Unit, Iterator[tuple[str, object]]]]:
        readers = {"txt": self._txt, "jsonl": self._jsonl, "json": self._json, "csv": self._delimited,
                   "tsv": self._delimited, "xlsx": self._xlsx, "parquet": self._parquet}
        for unit in units:
            if self.corpus.hf_dataset is not None:
                yield unit, self._hf_dataset(unit)
                continue
            fmt = file_format(self.corpus, unit.source)
            yield unit, readers[fmt](unit, fmt)

    def _text_of(self, record: object) -> object:
        if not isinstance(record, dict):
            return Rejected("malformed_record", "")
        if self.corpus.record_format != "text":
            corpus = self.corpus
            value = (prompt_completion(record, corpus.prompt_template, corpus.completion_template)
                     if corpus.record_format == "prompt_completion" else self._chat_record(record.get("messages")))
            return Rejected(value, "") if isinstance(value, str) else value
        if self.corpus.text_template is None:
            return record.get(self.corpus.text_field)
        try:
            return self.corpus.text_template.format_map(record)
        except KeyError:
            return None

    def _chat_record(self, messages: object) -> Record | str | None:
        if self.chat is not None:
            return self.chat.record(messages)
        # Without a chat template (training a tokenizer on the records, sizing them): their contents.
        if messages is None or not isinstance(messages, list):
            return None if messages is None else "malformed_record"
        contents = [m.get("content") if isinstance(m, dict) else None for m in messages]
        if not all(isinstance(c, str) for c in contents):
            return "malformed_record"
        return Record(tuple((content + "\n", m.get("role") == "assistant") for content, m in zip(contents, messages)))

    def _record(self, where: str, record: object) -> tuple[str, object]:
        value = self._text_of(record)
        if isinstance(value, Rejected):
            value = Rejected(value.reason, where)
        return where, value

    def _decoded_lines(self, unit: Unit) -> Iterator[tuple[int, str, str | Rejected]]:
        """(line number in the unit, location, text or Rejected) per line of the unit, decoded on its own with the corpus encoding."""
        offset, number, ranged = unit.start, 0, unit.kind == "bytes"
        with open_source(unit.source, self.corpus.name) as handle:
            if ranged and unit.start:
                handle.seek(unit.start)  # a line start: units are cut after line breaks
            for raw in handle:
                if ranged and offset >= unit.end:
                    break
                number += 1
                # A unit from the middle of a file knows its lines, not the lines before it: a placeholder
                # the build resolves (`resolve_lines`) once every unit has been read.
                where = f"{unit.url}:{number}" if not unit.start else f"{unit.url}:⟨{unit.index}+{number}⟩"
                try:
                    yield number, where, raw.decode(self.corpus.encoding, self.corpus.encoding_errors)
                except UnicodeDecodeError as err:
                    yield number, where, Rejected("invalid_encoding", f"{where} (byte {offset + err.start})",
                                          raw.decode(self.corpus.encoding, "replace"))
                except LookupError:
                    raise DaptError(f"corpus '{self.corpus.name}': unknown encoding {self.corpus.encoding!r}") from None
                offset += len(raw)
        if ranged:
            self.unit_lines[unit.index] = number

    def _decode_whole(self, unit: Unit) -> str | Rejected:
        with open_source(unit.source, self.corpus.name) as handle:
            raw = handle.read()
        try:
            return raw.decode(self.corpus.encoding, self.corpus.encoding_errors)
        except UnicodeDecodeError as err:
            return Rejected("invalid_encoding", f"{unit.url} (byte {err.start})")
        except LookupError:
            raise DaptError(f"corpus '{self.corpus.name}': unknown encoding {self.corpus.encoding!r}") from None

    def _txt(self, unit: Unit, _fmt: str) -> Iterator[tuple[str, object]]:
        if self.corpus.txt_split == "line":
            for _, where, line in self._decoded_lines(unit):
                if isinstance(line, Rejected) or line.strip():
                    yield where, line if isinstance(line, Rejected) else line.rstrip("\r\n")
            return
        text = self._decode_whole(unit)
        if isinstance(text, Rejected) or self.corpus.txt_split == "file":
            yield unit.url, text
            return
        for number, part in enumerate(text.split(self.corpus.separator), 1):
            yield f"{unit.url}:document {number}", part

    def _jsonl(self, unit: Unit, _fmt: str) -> Iterator[tuple[str, object]]:
        for _, where, line in self._decoded_lines(unit):
            if isinstance(line, Rejected):
                yield where, line
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                yield where, Rejected("malformed_record", where)
                continue
            yield self._record(where, record)

    def _json(self, unit: Unit, _fmt: str) -> Iterator[tuple[str, object]]:
        path = unit.url
        text = self._decode_whole(unit)
        if isinstance(text, Rejected):
            yield path, text
            return
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            yield path, Rejected("malformed_record", f"{path}:{err.lineno}")
            return
        if isinstance(data, dict):  # {"data": [...]}: the one list of records inside
            lists = [value for value in data.values() if isinstance(value, list)]
            if len(lists) != 1:
                raise DaptError(f"corpus '{self.corpus.name}': {path} is a JSON object without exactly one list of "
                                "records; give an array of records")
            data = lists[0]
        if not isinstance(data, list):
            raise DaptError(f"corpus '{self.corpus.name}': {path} holds neither an array of records nor an object with one")
        for number, record in enumerate(data):
            yield self._record(f"{path}:record {number}", record)

    def _delimited(self, unit: Unit, fmt: str) -> Iterator[tuple[str, object]]:
        path = unit.url
        bad_lines: set[int] = set()

        def lines() -> Iterator[str]:
            for number, _, line in self._decoded_lines(unit):
                if isinstance(line, Rejected):
                    bad_lines.add(number)
                    yield line.text
                else:
                    yield line

        csv.field_size_limit(sys.maxsize)
        reader = csv.reader(lines(), delimiter="\t" if fmt == "tsv" else ",")
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error:
            raise DaptError(f"corpus '{self.corpus.name}': {path} has no readable header row") from None
        previous = reader.line_num
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error:
                yield f"{path}:{reader.line_num}", Rejected("malformed_record", f"{path}:{reader.line_num}")
                previous = reader.line_num
                continue
            where = f"{path}:{previous + 1}"
            spanned = range(previous + 1, reader.line_num + 1)
            previous = reader.line_num
            if not row:
                continue
            if any(number in bad_lines for number in spanned):
                yield where, Rejected("invalid_encoding", where)
            elif len(row) != len(header):
                yield where, Rejected("malformed_record", where)
            else:
                yield self._record(where, dict(zip(header, row)))

    def _xlsx(self, unit: Unit, _fmt: str) -> Iterator[tuple[str, object]]:
        from openpyxl import load_workbook

        with open_source(unit.source, self.corpus.name) as handle:
            workbook = load_workbook(handle, read_only=True, data_only=True)
            try:
                for sheet in workbook.worksheets:
                    rows = sheet.iter_rows(values_only=True)
                    header = [str(cell) if cell is not None else "" for cell in next(rows, ())]
                    for number, row in enumerate(rows, 2):
                        if all(cell is None for cell in row):
                            continue
                        yield self._record(f"{unit.url}:{sheet.title}!{number}", dict(zip(header, row)))
            finally:
                workbook.close()

    def _parquet(self, unit: Unit, _fmt: str) -> Iterator[tuple[str, object]]:
        import pyarrow.parquet as pq

        groups = range(unit.start, unit.end) if unit.kind == "row_groups" else None
        row = unit.first_row
        with open_source(unit.source, self.corpus.name) as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=4096, row_groups=groups):
                for record in batch.to_pylist():
                    row += 1
                    yield self._record(f"{unit.url}:row {row}", record)

    def _hf_dataset(self, unit: Unit) -> Iterator[tuple[str, object]]:
        import datasets

        config = self.corpus.hf_dataset
        first = unit.start if unit.kind == "rows" else 0
        if Path(config.path).is_dir():
            dataset = open_saved_dataset(self.corpus)
            if unit.kind == "rows":
                dataset = dataset.select(range(unit.start, unit.end))
        else:
            try:
                dataset = datasets.load_dataset(config.path, config.name, split=config.split, streaming=True)
            except Exception as err:  # the hub raises many kinds: offline, missing, gated
                raise DaptError(
                    f"corpus '{self.corpus.name}': cannot open Hugging Face dataset {config.path!r} "
                    f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'}); without a "
                    "network, `save_to_disk` it elsewhere and give that folder as `hf_dataset.path`"
                ) from None
        for row, record in enumerate(dataset, first):
            yield self._record(f"{config.path}:row {row}", record)
