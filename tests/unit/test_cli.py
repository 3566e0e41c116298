"""Bad input through the real `dapt` command: one line naming the culprit, non-zero exit, no traceback."""

import json

import pytest

from tests.conftest import write_experiment
from tests.helpers import assert_one_line_error, dapt


def test_missing_corpus_file(tmp_path):
    path = write_experiment(tmp_path, {"corpora": [{"name": "news", "paths": ["data/news-2024.jsonl"]}], "mix": {"seq_len": 64}})
    assert_one_line_error(dapt("tokenizer", "train", str(path)), "corpus 'news': no file matches")


def test_stores_before_tokenizer(tmp_path):
    path = write_experiment(tmp_path)
    assert_one_line_error(dapt("data", "build", str(path)), "run `dapt tokenizer train` first")


def test_misspelt_config_key(tmp_path):
    path = write_experiment(tmp_path, {"wandb": {"projct": "x"}})
    assert_one_line_error(dapt("mix", "plan", str(path)), "wandb.projct: unknown key; did you mean `project`?")


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": " "}) + "\n")
    corpora = [{"name": "filings", "paths": ["empty.jsonl"]}]
    path = write_experiment(tmp_path, {"corpora": corpora, "mix": {"seq_len": 64}})
    assert_one_line_error(dapt("tokenizer", "train", str(path)), "corpus 'filings': no documents kept from 1 file(s) (2 read")


def test_yaml_syntax_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: demo\ncorpora:\n  - {name: a, paths: [x]\ntrain: {steps: 1}\n")
    assert_one_line_error(dapt("run", str(path)), "broken.yaml:4: YAML syntax error")


def test_export_without_checkpoint(tmp_path):
    assert_one_line_error(dapt("export", str(tmp_path), str(tmp_path / "out")), "no checkpoint in")


@pytest.mark.parametrize("command", [["--help"], ["data", "--help"], ["launch", "local", "--help"]])
def test_help_works(command):
    assert dapt(*command).returncode == 0
