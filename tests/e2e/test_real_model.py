"""The whole flow on a real pretrained model (SmolLM2-135M from a Hugging Face folder holding its
weights and tokenizer), as a user continuing pretraining runs it: `dapt run` in 2 processes, then the
export loaded with transformers alone. Once with the model's own tokenizer (ZeRO-2), once carried over
(`extend`, ZeRO-3) to its tokenizer grown by dapt on the demo's financial corpora; each run is made
once for the module and several tests read its export, checkpoint, metrics and output."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dapt.experiment import load_experiment
from dapt.pretrain.evaluate import evaluate_model_dir
from tests.conftest import assert_loads_alike, small_corpora_section, write_experiment

# A 135M model trained in 2 processes on 2 CPU cores takes minutes a run, more than a test's default.
pytestmark = pytest.mark.timeout(900)

STEPS = 3


def real_model_run(folder, small_corpora, smollm2, tokenizer: dict, model: dict, stage: int):
    path = write_experiment(folder, {
        "workdir": str(folder), "corpora": small_corpora_section(small_corpora), "tokenizer": tokenizer,
        "model": model, "mix": {"seq_len": 64, "group_weights": {"financial": 0.5, "public": 0.5}},
        "train": {"steps": STEPS, "global_batch_size": 4, "micro_batch_size": 2, "lr": 1e-4, "warmup_steps": 1,
                  "precision": "fp32", "eval_max_tokens": 256, "log_every": 1},
        "deepspeed": {"zero_optimization": {"stage": stage}}, "launch": {"nproc_per_node": 2},
    })
    result = subprocess.run([sys.executable, "-m", "dapt", "run", str(path)], capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    experiment, _ = load_experiment(path)
    return experiment, json.loads(experiment.results_file.read_text()), result.stdout


@pytest.fixture(scope="module")
def own_tokenizer_run(tmp_path_factory, small_corpora, smollm2):
    """SmolLM2 continued with its own tokenizer, the folder's: ZeRO-2 (the carried-over run is ZeRO-3)."""
    return real_model_run(tmp_path_factory.mktemp("own"), small_corpora, smollm2, {"path": str(smollm2)},
                          {"path": str(smollm2)}, stage=2)


@pytest.fixture(scope="module")
def carried_over_run(tmp_path_factory, small_corpora, smollm2):
    """SmolLM2 carried over to its tokenizer grown by 300 financial pieces, new rows fitted, under ZeRO-3."""
    return real_model_run(tmp_path_factory.mktemp("extended"), small_corpora, smollm2,
                          {"train": {"sample_bytes": 2.0e5}},
                          {"path": str(smollm2), "embeddings": "extend", "extend_pieces": 300,
                           "extend_domain": ["financial"], "fit_new_rows": 2}, stage=3)


def assert_export_loads_generates_and_matches(experiment, results):
    out = experiment.export_dir
    assert_loads_alike(out, model=True)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    inputs = tokenizer("Total revenue for the quarter was", return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > inputs["input_ids"].shape[1]
    for name, bpb in evaluate_model_dir(experiment, out).items():
        assert bpb == pytest.approx(results["corpora"][name]["bpb_after"], abs=1e-4), name


def assert_trained_from(experiment, results, start: Path, smollm2: Path):
    """Every corpus's held-out BPB fell, the embeddings moved away from the `start` folder's, and the
    export carries the base model's chat template."""
    assert all(row["bpb_after"] < row["bpb_before"] for row in results["corpora"].values()), results
    before = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32).state_dict()
    exported = AutoModelForCausalLM.from_pretrained(experiment.export_dir, dtype=torch.float32).state_dict()
    assert not torch.equal(before["model.embed_tokens.weight"], exported["model.embed_tokens.weight"])
    assert (experiment.export_dir / "chat_template.jinja").read_text() == (smollm2 / "chat_template.jinja").read_text()


def test_continued_pretraining_of_a_real_model_with_its_own_tokenizer(own_tokenizer_run, smollm2):
    assert_loads_alike(smollm2, model=True)  # the folder `dapt model import-gguf` wrote
    experiment, results, _ = own_tokenizer_run
    assert_export_loads_generates_and_matches(experiment, results)
    corpora = results["corpora"].values()
    assert all(1.0 < row["bpb_before"] < 3.0 for row in corpora), results  # a pretrained model, not a random one
    assert_trained_from(experiment, results, smollm2, smollm2)


def test_a_carried_over_real_model_trains_and_exports_under_zero3(carried_over_run, smollm2):
    experiment, results, _ = carried_over_run
    extended = AutoTokenizer.from_pretrained(experiment.export_dir)
    assert len(extended) > len(AutoTokenizer.from_pretrained(smollm2))
    assert_export_loads_generates_and_matches(experiment, results)
    assert_trained_from(experiment, results, experiment.carried_over_dir, smollm2)
    # The checkpoint the export came from: ZeRO-3's partitions, one per rank.
    tag = (experiment.checkpoints_dir / "latest").read_text()
    assert tag == f"step{STEPS:08d}" and results["checkpoint"].endswith(tag)
    assert len(list((experiment.checkpoints_dir / tag).glob("*zero_pp_rank_*_model_states.pt"))) == 2


def test_every_rank_trains_from_the_folder_the_carry_over_stage_wrote(carried_over_run):
    experiment, results, output = carried_over_run
    assert "new rows fitted on 16 windows of the training text" in output
    assert "embeddings: 49,152 rows copied from the base model" in output
    assert_loads_alike(experiment.tokenizer_dir)  # tokenizer-extended/
    assert_loads_alike(experiment.carried_over_dir, model=True)
    # Every rank trained from the folder the carry-over stage wrote: the step-0 figure is that folder's.
    for name, bpb in evaluate_model_dir(experiment, experiment.carried_over_dir).items():
        assert bpb == pytest.approx(results["corpora"][name]["bpb_before"], abs=1e-4), name


def test_a_carried_over_model_starts_where_the_base_does_on_public_text(carried_over_run):
    """Beside the carried-over model's start, where the base model stands with its own tokenizer on the
    same documents: public text is cut as the base cuts it, so there the carried-over model starts
    where the base does; and both figures are in the run's metrics at step 0."""
    experiment, results, output = carried_over_run
    assert "against the base model with its own tokenizer: " in output
    corpora = results["corpora"]
    assert all(1.0 < row["bpb_base"] < 3.0 for row in corpora.values()), results  # a pretrained base
    for name in experiment.groups()["public"]:
        assert corpora[name]["bpb_before"] == pytest.approx(corpora[name]["bpb_base"], rel=0.01), name
    records = [json.loads(line) for line in (experiment.workpath / "metrics.jsonl").read_text().splitlines()]
    start = {key: value for r in records if r["step"] == 0 for key, value in r.items()}
    for name, row in corpora.items():
        assert (start[f"eval/bpb/{name}"], start[f"eval/bpb_base/{name}"]) == (row["bpb_before"], row["bpb_base"])
    assert sorted(r["step"] for r in records if "train/loss" in r) == list(range(1, STEPS + 1))


@pytest.mark.parametrize("phrase_words", [1, 4])
def test_extending_the_real_tokenizer_shortens_the_domain_and_leaves_the_rest(tmp_path, small_corpora, smollm2,
                                                                              phrase_words):
    """SmolLM2's byte-level BPE grown by merges learnt on the financial corpora, inside words (every
    public document cut exactly as before) or also across up to 4 words (` compared with`: the
    financial corpora at least 5% shorter); every document cut where the base cuts it or at fewer of
    those places, so no corpus gets longer, and no digit merged."""
    from dapt.launch.pipeline import train_tokenizer
    from dapt.tokenizer.evaluate import heldout_texts, load_tokenizer, tokenizer_statistics
    from tests.helpers import base_cut_of

    path = write_experiment(tmp_path, {
        "workdir": str(tmp_path), "corpora": small_corpora_section(small_corpora), "tokenizer": {"train": {"sample_bytes": 2e5}},
        "model": {"path": str(smollm2), "embeddings": "extend", "extend_pieces": 2000, "extend_domain": ["financial"],
                  "extend_phrase_words": phrase_words}})
    experiment, _ = load_experiment(path)
    base, extended = load_tokenizer(smollm2), load_tokenizer(train_tokenizer(experiment))
    added = [extended.convert_ids_to_tokens(i) for i in range(len(base), len(extended))]
    assert added and not set("0123456789").intersection("".join(added)), "SmolLM2 reads numbers digit by digit"
    assert any("Ġ" in piece[1:] for piece in added) == (phrase_words > 1)
    for corpus in experiment.corpora:
        texts = heldout_texts(corpus, experiment.heldout)
        before, after = (tokenizer_statistics(t, texts)["bytes_per_token"] for t in (base, extended))
        if corpus.group == "financial":  # measured: filings +2.3%, news +5.5% inside words; +50%, +55% across
            assert after > (1.05 if phrase_words > 1 else 1.01) * before, corpus.name
        elif phrase_words == 1:
            assert [extended.tokenize(t) for t in texts] == [base.tokenize(t) for t in texts], corpus.name
        assert after >= before, corpus.name
        for text in texts:
            assert base_cut_of(base, extended, text) == base(text, add_special_tokens=False)["input_ids"]
            assert extended.decode(extended(text, add_special_tokens=False)["input_ids"]) == text


def test_a_real_model_tuned_on_headline_records_with_lora_beats_its_few_shot_accuracy(tmp_path, small_corpora, smollm2):
    """SmolLM2 tuned with LoRA on the demo's headline sentiment records (prompt and completion made from
    the labelled rows by templates) with 10% of public text replayed: the held-out records' accuracy
    and macro-F1 (zero-shot, through lm-eval) far above the base model's 3-shot ones on the same
    records, the completions' held-out BPB down, the public corpus' measured before and after; the
    export is a plain folder, and the adapters also load with peft on the base model."""
    from peft import AutoPeftModelForCausalLM

    labelled = Path(__file__).parents[2] / "configs" / "tasks" / "headline_sentiment.jsonl"
    corpora = [{"name": "sentiment", "group": "tuning", "paths": [str(labelled)], "record_format": "prompt_completion",
                "prompt_template": "Headline: {text}\nSentiment:", "completion_template": " {label}", "max_tokens": 64},
               {"name": "web", "group": "public", "paths": [str(small_corpora / "data" / "web" / "*.txt")]}]
    path = write_experiment(tmp_path, {
        "workdir": str(tmp_path), "corpora": corpora, "heldout": {"fraction": 0.5, "max_documents": 200},
        "tokenizer": {"path": str(smollm2)}, "model": {"path": str(smollm2)},
        "mix": {"seq_len": 64, "weights": {"sentiment": 0.9, "web": 0.1}},
        "train": {"steps": 6, "global_batch_size": 8, "micro_batch_size": 4, "lr": 7e-4, "warmup_steps": 2,
                  "precision": "fp32", "eval_max_tokens": 1000, "log_every": 1, "lora": {"r": 16, "alpha": 32}},
        "deepspeed": {"zero_optimization": {"stage": 2}}, "launch": {"nproc_per_node": 2},
    })
    result = subprocess.run([sys.executable, "-m", "dapt", "run", str(path)], capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    experiment, _ = load_experiment(path)
    corpora_results = json.loads(experiment.results_file.read_text())["corpora"]
    sentiment, web = corpora_results["sentiment"], corpora_results["web"]
    assert sentiment["bpb_after"] < sentiment["bpb_before"] / 5 and web["bpb_before"] > 0 and web["bpb_after"] > 0

    def scores(*extra) -> dict:
        evaluated = subprocess.run([sys.executable, "-m", "dapt", "eval", str(path), "--records", "sentiment", *extra],
                                   capture_output=True, text=True, timeout=900)
        assert evaluated.returncode == 0, evaluated.stderr[-3000:]
        return json.loads((experiment.workpath / "eval_tasks.json").read_text())["tasks"][0]

    tuned, base = scores(), scores("--model", str(smollm2), "--shots", "3")
    assert tuned["items"] == base["items"] > 30 and tuned["shots"] == 0 and base["shots"] == 3
    assert tuned["accuracy"] >= base["accuracy"] + 0.3 and tuned["macro_f1"] >= base["macro_f1"] + 0.3, (tuned, base)

    adapter = tmp_path / "adapter"
    exported = subprocess.run([sys.executable, "-m", "dapt", "export", str(experiment.checkpoints_dir), str(adapter),
                               "--lora", "adapter"], capture_output=True, text=True, timeout=600)
    assert exported.returncode == 0, exported.stderr[-3000:]
    tokens = AutoTokenizer.from_pretrained(adapter)("Headline: Hooli Inc. shares climbed 9.3%\nSentiment:",
                                                    return_tensors="pt")["input_ids"]
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(experiment.export_dir)(tokens).logits
        on_base = AutoPeftModelForCausalLM.from_pretrained(adapter)(tokens).logits
    torch.testing.assert_close(on_base, merged, rtol=1e-4, atol=1e-4)
