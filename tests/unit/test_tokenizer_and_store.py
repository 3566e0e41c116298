import json
import os

import numpy as np
import pytest
from transformers import AutoTokenizer

from dapt.data_mix.split import content_hash, heldout_threshold
from dapt.data_mix.config import CorpusConfig, DataConfig, HeldoutConfig
from dapt.data_mix.build import build_store
from dapt.data_mix.store import TokenStore, open_stores, tokenizer_hash
from dapt.base import DaptError
from tests.conftest import assert_loads_alike

HOSTILE = [
    "Seppälä Oyj (HEL: SEPP) booked €1,234.56m — up 7½% y/y.",
    "  leading spaces,\ttabs,\r\nwindows newlines and trailing spaces  ",
    "日本銀行 raised rates; 😀 emoji; combining é vs é; zero\u200bwidth",
]


def test_tokenizer_loads_with_autotokenizer_and_round_trips(built_experiment):
    tokenizer = AutoTokenizer.from_pretrained(built_experiment.tokenizer_dir)
    assert_loads_alike(built_experiment.tokenizer_dir)  # transformers 4.x reads it too, into the same ids
    assert (built_experiment.tokenizer_dir / "sentencepiece.model").exists()
    assert tokenizer.eos_token == "</s>" and tokenizer.pad_token == "<pad>"
    heldout = TokenStore(built_experiment.stores_dir / "filings", "heldout")
    for text in HOSTILE:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    assert len(heldout.tokens) > 0


def test_tokenizer_matches_sentencepiece(built_experiment):
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(built_experiment.tokenizer_dir / "sentencepiece.model"))
    tokenizer = AutoTokenizer.from_pretrained(built_experiment.tokenizer_dir)
    text = "Total revenue was $1,234.5 million for the quarter.\n\nShares rose 3.2%."
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == processor.encode(text)


def test_store_layout_documents_and_manifest(built_experiment):
    folder = built_experiment.stores_dir / "news"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["dtype"] == "uint16" and manifest["tokenizer_hash"] == tokenizer_hash(built_experiment.tokenizer_dir)
    accounting = manifest["accounting"]
    assert accounting["read"] == accounting["kept"] + sum(accounting["rejected"].values())
    splits = manifest["splits"]
    assert splits["train"]["documents"] + splits["heldout"]["documents"] == accounting["kept"]
    store = TokenStore(folder, "train")
    eos = manifest["eos_token_id"]
    ends = store.doc_ends
    assert np.all(np.asarray(store.tokens[ends - 1]) == eos), "every document ends with EOS"
    assert np.count_nonzero(np.asarray(store.tokens) == eos) == len(ends)
    assert store.sample(0, 64).shape == (65,)
    assert not list(built_experiment.stores_dir.glob(".*building*")), "no temporary store left behind"


def test_store_build_is_idempotent(built_experiment):
    corpus = built_experiment.corpora[0]
    manifest = build_store(corpus, built_experiment.heldout, built_experiment.tokenizer_dir, built_experiment.stores_dir)
    assert manifest["rebuilt"] is False


def test_store_from_another_tokenizer_is_refused(built_experiment):
    with pytest.raises(DaptError, match=r"built with another tokenizer; rebuild it with `dapt data build`"):
        open_stores(built_experiment.stores_dir, built_experiment.corpora, "train", expected_tokenizer="0" * 32)


def test_heldout_split_does_not_depend_on_order():
    docs = [f"document number {i}" for i in range(500)]

    def heldout(order, config):
        hashes = np.array([content_hash(d) for d in order])
        threshold = heldout_threshold(hashes, config)
        return {d for d, h in zip(order, hashes) if h < threshold}

    capped = HeldoutConfig(fraction=0.1, max_documents=20)
    assert len(heldout(docs, capped)) == 20
    assert heldout(list(reversed(docs)), capped) == heldout(docs, capped)
    uncapped = HeldoutConfig(fraction=0.1, max_documents=10_000)
    before = heldout(docs, uncapped)
    after = heldout(docs + [f"new file {i}" for i in range(100)], uncapped)
    assert 20 < len(before) < 80
    assert after & set(docs) == before, "adding files moves no old document across the split"


def test_heldout_takes_the_lowest_hashes_up_to_the_cap(built_experiment):
    manifest = json.loads((built_experiment.stores_dir / "filings" / "manifest.json").read_text())
    kept = manifest["accounting"]["kept"]
    heldout_docs = manifest["splits"]["heldout"]["documents"]
    config = built_experiment.heldout
    assert 0 < heldout_docs <= config.max_documents
    assert abs(heldout_docs - kept * config.fraction) < 4 * (kept * config.fraction) ** 0.5 + 1


def test_killed_build_resumes_at_the_task_and_never_leaves_a_complete_looking_store(tmp_path, built_experiment):
    import signal
    import subprocess
    import sys
    import time

    big = tmp_path / "big.jsonl"
    line = json.dumps({"text": "Net revenue rose 4.5% to $1,234.5 million in the quarter. " * 40})
    big.write_text("\n".join(line[:-2] + f' {i}"}}' for i in range(12000)))
    script = f"""
from pathlib import Path
from dapt.data_mix.build import build_store
from dapt.data_mix.config import CorpusConfig, DataConfig, HeldoutConfig
build_store(CorpusConfig(name="big", paths=[{str(big)!r}]), HeldoutConfig(), Path({str(built_experiment.tokenizer_dir)!r}),
            Path({str(tmp_path / 'stores')!r}), DataConfig(tasks=4, workers=2))
"""
    process = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    deadline = time.time() + 120
    completions = tmp_path / "stores" / ".build"
    while not list(completions.glob("*/logs/read/completions/*")) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the executor and its task processes, as a lost node
    process.wait()
    finished = len(list(completions.glob("*/logs/read/completions/*")))
    assert 0 < finished < 4, "killed between the first and the last read task"
    assert not (tmp_path / "stores" / "big").exists(), "a killed build leaves no store under the final name"
    resumed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert f"read: 4 task(s), {finished} finished before" in resumed, resumed
    manifest = build_store(CorpusConfig(name="big", paths=[str(big)]), HeldoutConfig(), built_experiment.tokenizer_dir,
                           tmp_path / "stores", DataConfig(tasks=4, workers=2))
    assert not manifest["rebuilt"] and manifest["accounting"]["kept"] == 12000 and manifest["accounting"]["invariant_holds"]
    assert len(manifest["shards"]["train"]) == 4
    assert not list((tmp_path / "stores").glob(".build/*")), "the finished build clears its work folder"


def test_prepare_and_inspect_commands(built_experiment, small_corpora):
    import subprocess
    import sys

    config = str(small_corpora / "experiment.yaml")
    prepared = subprocess.run([sys.executable, "-m", "dapt", "data", "prepare", config, "--json"],
                              capture_output=True, text=True, check=True)
    reports = json.loads(prepared.stdout)
    assert [r["corpus"] for r in reports] == built_experiment.corpus_names()
    assert all(r["invariant_holds"] and r["read"] == r["kept"] + sum(r["rejected"].values()) for r in reports)
    inspected = subprocess.run([sys.executable, "-m", "dapt", "data", "inspect", config, "--sample", "1"],
                               capture_output=True, text=True, check=True).stdout
    assert "bytes/tok" in inspected and "--- news, sample 1 ---" in inspected


def test_a_replacing_normalizer_runs_in_python_to_the_same_ids(built_experiment):
    """dapt's own tokenizers replace " " with "▁": the build does that with str.replace, the
    tokenizer's ids unchanged, hostile text and special tokens in it included."""
    from tokenizers import AddedToken, Tokenizer, normalizers

    from dapt.data_mix import tokenise

    encoder, eos = tokenise.load_encoder(built_experiment.tokenizer_dir)
    fast = tokenise.normalizing_in_python(encoder)
    assert isinstance(fast, tokenise.PythonNormalized)
    texts = [*HOSTILE, "a </s> b<unk>c ▁ d", "  ", "x" * 3000]
    expected = [e.ids for e in encoder.encode_batch_fast(texts, add_special_tokens=False)]
    assert [e.ids for e in fast.encode_batch_fast(texts)] == expected
    tokenise.start_encoder(str(built_experiment.tokenizer_dir), "uint16")
    flat, lengths = tokenise.encode_texts(texts)
    assert flat.tolist() == [token for ids in expected for token in [*ids, eos]]
    assert lengths.tolist() == [len(ids) + 1 for ids in expected]

    # Where the replacing could match differently, the tokenizer keeps its own normalizer.
    spaced = Tokenizer.from_str(encoder.to_str())
    spaced.add_tokens([AddedToken("net income", normalized=False)])
    stripping = Tokenizer.from_str(encoder.to_str())
    stripping.add_special_tokens([AddedToken("<sep>", lstrip=True)])
    nfkc = Tokenizer.from_str(encoder.to_str())
    nfkc.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" ", "▁")])
    for kept in (spaced, stripping, nfkc):
        assert tokenise.normalizing_in_python(kept) is kept
