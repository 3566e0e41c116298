import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dapt.data_mix.config import CorpusConfig
from dapt.data_mix.sources import CorpusReader
from dapt.base import DaptError


def read(**fields):
    reader = CorpusReader(CorpusConfig(name="c", **fields))
    docs = list(reader.documents())
    assert reader.report.balanced(), "read = kept + Σ rejected, per corpus and per file"
    return docs, reader.report


def test_jsonl_accounts_for_every_rejection_reason(tmp_path):
    lines = [
        json.dumps({"text": "first document"}),
        "{not json",
        json.dumps({"body": "no text field"}),
        json.dumps({"text": 42}),
        json.dumps({"text": "   "}),
        json.dumps({"text": "first document"}),
        json.dumps({"text": "x"}),
        json.dumps({"text": "a document far too long"}),
        json.dumps(["not", "a", "record"]),
        json.dumps({"text": "second document"}),
    ]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "caf\xe9 latin-1 bytes"}\n{"text": "third document"}\n')
    docs, report = read(paths=[str(tmp_path / "*.jsonl")], min_chars=2, max_chars=20)
    assert docs == ["first document", "second document", "third document"]
    assert report.read == 12 and report.kept == 3
    assert dict(report.rejected) == {"malformed_record": 2, "missing_field": 1, "not_a_string": 1, "empty": 1,
                                     "duplicate": 1, "shorter_than_min_chars": 1, "longer_than_max_chars": 1,
                                     "invalid_encoding": 1}
    assert report.examples["malformed_record"][0].endswith("a.jsonl:2"), "located by file and line"
    assert report.per_file[str(tmp_path / "b.jsonl")].rejected == {"invalid_encoding": 1}
    assert report.examples["invalid_encoding"] == [f"{tmp_path / 'b.jsonl'}:1 (byte 13)"]


def test_on_error_fail_stops_at_the_first_bad_record(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"text": ""}\n{broken\n')
    with pytest.raises(DaptError, match=r"corpus 'c': malformed record at .*a.jsonl:3; check `format`.*\(or set `on_error: skip`"):
        read(paths=[str(tmp_path / "a.jsonl")], on_error="fail")


def test_encoding_declared_and_replaced(tmp_path):
    (tmp_path / "l.txt").write_bytes("Seppälä Oyj".encode("latin-1"))
    with pytest.raises(DaptError, match=r"rejected \{'invalid_encoding': 1\}\); set the corpus `encoding`"):
        read(paths=[str(tmp_path / "l.txt")])
    assert read(paths=[str(tmp_path / "l.txt")], encoding="latin-1")[0] == ["Seppälä Oyj"]
    assert read(paths=[str(tmp_path / "l.txt")], encoding_errors="replace")[0] == ["Sepp\ufffdl\ufffd Oyj"]


def test_csv_tsv_with_template_quoted_newlines_and_gzip(tmp_path):
    (tmp_path / "n.csv").write_text('headline,body\nUp 5%,"line one\nline two"\nDown,"b"\nbad,row,extra\n')
    docs, report = read(paths=[str(tmp_path / "n.csv")], text_template="{headline}\n\n{body}")
    assert docs == ["Up 5%\n\nline one\nline two", "Down\n\nb"]
    assert report.rejected == {"malformed_record": 1} and report.examples["malformed_record"][0].endswith("n.csv:5")
    with gzip.open(tmp_path / "t.tsv.gz", "wt") as out:
        out.write("id\ttext\n1\talpha beta\n2\tgamma\n")
    assert read(paths=[str(tmp_path / "t.tsv.gz")])[0] == ["alpha beta", "gamma"]


def test_json_array_and_object_holding_records(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"text": "one"}, {"text": "two"}, {"other": 1}]))
    (tmp_path / "b.json").write_text(json.dumps({"meta": {"v": 1}, "data": [{"text": "three"}]}))
    docs, report = read(paths=[str(tmp_path / "*.json")])
    assert docs == ["one", "two", "three"] and report.rejected == {"missing_field": 1}


def test_xlsx_rows_become_records(tmp_path):
    from openpyxl import Workbook

    book = Workbook()
    sheet = book.active
    sheet.append(["ticker", "note"])
    sheet.append(["ACME", "Guidance raised for fiscal 2025."])
    sheet.append(["GBX", 12.5])
    sheet.append([None, None])
    sheet.append(["INTF", "Margins under pressure."])
    book.save(tmp_path / "notes.xlsx")
    docs, report = read(paths=[str(tmp_path / "notes.xlsx")], text_field="note")
    assert docs == ["Guidance raised for fiscal 2025.", "Margins under pressure."]
    assert report.rejected == {"not_a_string": 1} and report.examples["not_a_string"][0].endswith("notes.xlsx:Sheet!3")


def test_parquet_and_txt_by_file_line_and_separator(tmp_path):
    pq.write_table(pa.table({"text": ["alpha", "beta", None]}), tmp_path / "w.parquet")
    docs, report = read(paths=[str(tmp_path / "w.parquet")])
    assert docs == ["alpha", "beta"] and report.rejected["missing_field"] == 1
    (tmp_path / "pages").mkdir()
    (tmp_path / "pages" / "1.txt").write_text("page one\nstill page one")
    with gzip.open(tmp_path / "pages" / "2.txt.gz", "wt") as out:
        out.write("page two")
    assert read(paths=[str(tmp_path / "pages")])[0] == ["page one\nstill page one", "page two"]
    assert read(paths=[str(tmp_path / "pages")], txt_split="line")[0] == ["page one", "still page one", "page two"]
    (tmp_path / "filings.txt").write_text("10-K one\n\n\n10-K two\n\n\n\n\n\n")
    docs, report = read(paths=[str(tmp_path / "filings.txt")], txt_split="separator", separator="\n\n\n")
    assert docs == ["10-K one", "10-K two"] and report.rejected == {"empty": 2}


def test_prompt_completion_records(tmp_path):
    records = [{"prompt": "Q: EPS of ACME?\nA:", "completion": " $2.10"}, {"prompt": "only a prompt"}]
    (tmp_path / "ft.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    docs, report = read(paths=[str(tmp_path / "ft.jsonl")], record_format="prompt_completion")
    assert docs == ["Q: EPS of ACME?\nA: $2.10"] and report.rejected == {"missing_field": 1}
    assert report.examples["missing_field"] == [f"{tmp_path / 'ft.jsonl'}:2"]
    with pytest.raises(DaptError, match=r"missing field at .*ft.jsonl:2; every record of `record_format: "
                                        r"prompt_completion` needs `prompt` and `completion`"):
        read(paths=[str(tmp_path / "ft.jsonl")], record_format="prompt_completion", on_error="fail")


def test_records_are_checked_for_what_tuning_needs(tmp_path):
    """Empty prompts and completions are rejected, a record repeated whole is a duplicate, and a prompt
    seen with another completion is kept and noted with both places; "ab" + "c" is not "a" + "bc"."""
    records = [{"prompt": "Headline: rates cut\nSentiment:", "completion": " positive"},
               {"prompt": "  ", "completion": " negative"},
               {"prompt": "Headline: fine\nSentiment:", "completion": ""},
               {"prompt": "Headline: rates cut\nSentiment:", "completion": " positive"},
               {"prompt": "Headline: rates cut\nSentiment:", "completion": " negative"},
               {"prompt": "ab", "completion": "c"}, {"prompt": "a", "completion": "bc"}]
    path = tmp_path / "ft.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    docs, report = read(paths=[str(path)], record_format="prompt_completion")
    assert len(docs) == 4 and report.balanced()
    assert report.rejected == {"empty_prompt": 1, "empty_completion": 1, "duplicate": 1}
    assert report.notes == {"prompt_with_other_completion": 1}
    assert report.examples["prompt_with_other_completion"] == [f"{path}:5 (first at {path}:1)"]


def test_hugging_face_dataset_saved_to_disk(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a wiki page", "", "another page"]})}).save_to_disk(
        tmp_path / "wiki")
    docs, report = read(hf_dataset={"path": str(tmp_path / "wiki"), "split": "train"})
    assert docs == ["a wiki page", "another page"] and report.rejected == {"empty": 1}
    with pytest.raises(DaptError, match=r"has no split 'test'; it has train"):
        read(hf_dataset={"path": str(tmp_path / "wiki"), "split": "test"})


def test_hub_dataset_without_network_says_what_to_do(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    # Offline mode is read when these libraries are imported, so set it where they keep it.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DaptError, match=r"cannot open Hugging Face dataset 'someone/not-here'.*save_to_disk"):
        read(hf_dataset={"path": "someone/not-here"})


def test_missing_file_and_empty_corpus_are_errors(tmp_path):
    with pytest.raises(DaptError, match=r"corpus 'c': no file matches .*nothing\*.jsonl"):
        read(paths=[str(tmp_path / "nothing*.jsonl")])
    (tmp_path / "e.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(DaptError, match=r"corpus 'c': no documents kept from 1 file\(s\) \(1 read, rejected \{'empty': 1\}\)"):
        read(paths=[str(tmp_path / "e.jsonl")])


def test_unknown_extension_asks_for_format(tmp_path):
    (tmp_path / "x.dat").write_text("hello")
    with pytest.raises(DaptError, match=r"cannot tell the format of .*x.dat.*set `format`"):
        read(paths=[str(tmp_path / "x.dat")])
    assert read(paths=[str(tmp_path / "x.dat")], format="txt")[0] == ["hello"]


LINE = st.one_of(
    st.builds(lambda t: json.dumps({"text": t}), st.text(max_size=30)),
    st.builds(lambda v: json.dumps({"text": v}), st.integers() | st.none() | st.lists(st.integers(), max_size=2)),
    st.builds(lambda t: json.dumps({"other": t}), st.text(max_size=5)),
    st.text(max_size=20).map(lambda t: t.replace("\n", " ")),  # often not JSON at all
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(LINE, min_size=1, max_size=25), garbage=st.binary(max_size=12), min_chars=st.integers(1, 6))
def test_read_equals_kept_plus_rejected_for_corrupted_input(tmp_path, lines, garbage, min_chars):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass") + b"\n" + garbage + b"\n")
    reader = CorpusReader(CorpusConfig(name="c", paths=[str(path)], min_chars=min_chars, max_chars=25))
    try:
        kept = list(reader.documents())
    except DaptError as err:
        assert "no documents kept" in str(err)
        kept = []
    report = reader.report
    assert report.balanced() and report.kept == len(kept)
    assert report.read == report.kept + sum(report.rejected.values())
