import json

import pytest

from dapt.data_mix.config import CorpusConfig, HeldoutConfig
from dapt.base import DaptError
from dapt.tokenizer.evaluate import evaluate, format_evaluation, plot_evaluation


def test_eval_measures_compression_splits_and_uncovered_text(built_experiment, tmp_path):
    (tmp_path / "foreign.jsonl").write_text("\n".join(
        json.dumps({"text": f"日本銀行の決定 {i} 😀 Ωμέγα"}) for i in range(50)))
    corpora = [built_experiment.corpora[0], CorpusConfig(name="foreign", paths=[str(tmp_path / "foreign.jsonl")])]
    rows = evaluate([built_experiment.tokenizer_dir], corpora, HeldoutConfig(fraction=0.5, max_documents=100))
    by_corpus = {row["corpus"]: row for row in rows}
    filings, foreign = by_corpus["filings"], by_corpus["foreign"]
    assert filings["bytes_per_token"] > 1.5 and filings["fertility"] >= 1.0 and 0 < filings["words_split"] < 1
    assert foreign["uncovered"] > 0.5, "text outside the vocabulary falls back to bytes"
    assert foreign["bytes_per_token"] < filings["bytes_per_token"]
    assert "bytes/token" in format_evaluation(rows)
    assert plot_evaluation(rows, tmp_path / "eval.png").stat().st_size > 5_000


def test_eval_refuses_a_directory_that_is_not_a_tokenizer(built_experiment, tmp_path):
    with pytest.raises(DaptError, match=r"is not a tokenizer directory AutoTokenizer can load"):
        evaluate([tmp_path], built_experiment.corpora[:1], built_experiment.heldout)
