import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_mix.config import CorpusConfig
from data_mix.sources import CorpusReader
from launch.base import DaptError


def read(tmp_path, **fields):
    reader = CorpusReader(CorpusConfig(name="c", **fields))
    return list(reader.documents()), reader.report


def test_jsonl_accounts_for_every_record(tmp_path):
    lines = [
        json.dumps({"text": "first document"}),
        "{not json",
        json.dumps({"body": "no text field"}),
        json.dumps({"text": 42}),
        json.dumps({"text": "   "}),
        json.dumps({"text": "first document"}),
        json.dumps({"text": "x"}),
        json.dumps({"text": "second document"}),
    ]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    docs, report = read(tmp_path, paths=[str(tmp_path / "*.jsonl")], min_chars=2)
    assert docs == ["first document", "second document"]
    assert report.read == 8 and report.kept == 2 and report.balanced()
    assert dict(report.rejected) == {"malformed_record": 1, "missing_field": 1, "not_a_string": 1, "empty": 1,
                                     "duplicate": 1, "shorter_than_min_chars": 1}
    assert report.examples[0].endswith("a.jsonl:2"), "the first rejection names file and line"


def test_csv_with_template_and_quoted_newlines(tmp_path):
    (tmp_path / "n.csv").write_text('headline,body\nUp 5%,"line one\nline two"\nDown,"b"\n')
    docs, report = read(tmp_path, paths=[str(tmp_path / "n.csv")], text_template="{headline}\n\n{body}")
    assert docs == ["Up 5%\n\nline one\nline two", "Down\n\nb"]
    assert report.balanced()


def test_parquet_and_txt_per_file_and_per_line(tmp_path):
    pq.write_table(pa.table({"text": ["alpha", "beta", None]}), tmp_path / "w.parquet")
    docs, report = read(tmp_path, paths=[str(tmp_path / "w.parquet")])
    assert docs == ["alpha", "beta"] and report.rejected["missing_field"] == 1
    (tmp_path / "pages").mkdir()
    (tmp_path / "pages" / "1.txt").write_text("page one\nstill page one")
    (tmp_path / "pages" / "2.txt").write_text("page two")
    docs, _ = read(tmp_path, paths=[str(tmp_path / "pages")])
    assert docs == ["page one\nstill page one", "page two"]
    docs, _ = read(tmp_path, paths=[str(tmp_path / "pages")], txt_split="line")
    assert docs == ["page one", "still page one", "page two"]


def test_declared_encoding_and_bad_bytes(tmp_path):
    (tmp_path / "l.txt").write_bytes("Seppälä Oyj".encode("latin-1"))
    with pytest.raises(DaptError, match=r"l.txt is not valid utf-8 at byte 4; set the corpus `encoding`"):
        read(tmp_path, paths=[str(tmp_path / "l.txt")])
    docs, _ = read(tmp_path, paths=[str(tmp_path / "l.txt")], encoding="latin-1")
    assert docs == ["Seppälä Oyj"]


def test_missing_file_and_empty_corpus_are_errors(tmp_path):
    with pytest.raises(DaptError, match=r"corpus 'c': no file matches .*nothing\*.jsonl"):
        read(tmp_path, paths=[str(tmp_path / "nothing*.jsonl")])
    (tmp_path / "e.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(DaptError, match=r"corpus 'c': no documents kept from 1 file\(s\) \(1 read, rejected \{'empty': 1\}\)"):
        read(tmp_path, paths=[str(tmp_path / "e.jsonl")])


def test_unknown_extension_asks_for_format(tmp_path):
    (tmp_path / "x.dat").write_text("hello")
    with pytest.raises(DaptError, match=r"cannot tell the format of .*x.dat.*set `format`"):
        read(tmp_path, paths=[str(tmp_path / "x.dat")])
    docs, _ = read(tmp_path, paths=[str(tmp_path / "x.dat")], format="txt")
    assert docs == ["hello"]
