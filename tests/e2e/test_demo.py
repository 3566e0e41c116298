"""The whole flow end to end: `dapt demo` in 2 DeepSpeed processes over gloo, as a user runs it."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

from tests.conftest import DEMO_CONFIG, assert_loads_alike, assert_scored_alike

EXAMPLE_TASK = DEMO_CONFIG.parent / "tasks" / "headline_sentiment.yaml"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    result = subprocess.run([sys.executable, "-m", "dapt", "demo", "--workdir", str(workdir)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    from dapt.experiment import load_experiment

    experiment, _ = load_experiment(workdir / "demo.yaml")
    return workdir, experiment, result.stdout


def test_demo_trains_both_ranks_and_the_loss_falls(demo_run):
    workdir, experiment, stdout = demo_run
    results = json.loads((workdir / "results.json").read_text())
    assert results["final_loss"] < 0.5 * results["first_loss"]
    for name, row in results["corpora"].items():
        assert row["bpb_after"] < 0.5 * row["bpb_before"], name
    assert "held-out BPB before → after" in stdout and "training loss" in stdout
    assert "launching 2 training processes" in stdout


def test_demo_realises_the_planned_mix(demo_run):
    workdir, experiment, _ = demo_run
    results = json.loads((workdir / "results.json").read_text())
    samples = experiment.train.steps * experiment.train.global_batch_size
    seen = sum(row["tokens_seen"] for row in results["corpora"].values())
    assert seen == samples * experiment.mix.seq_len
    groups = {c.name: c.group for c in experiment.corpora}
    financial = sum(r["realised_share"] for n, r in results["corpora"].items() if groups[n] == "financial")
    assert financial == pytest.approx(0.5, abs=1 / samples)
    for row in results["corpora"].values():
        assert abs(row["realised_share"] - row["planned_share"]) * samples < 1.0


def test_demo_logs_metrics_and_an_offline_wandb_run(demo_run):
    workdir, experiment, _ = demo_run
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and set(records[0]) == {"step"} | {f"eval/bpb/{c}" for c in experiment.corpus_names()}
    assert any("train/loss/filings" in r and "train/grad_norm" in r for r in records)
    assert records[-1]["step"] == experiment.train.steps and "eval/bpb/web" in records[-1]
    assert list((workdir / "wandb").glob("offline-run-*/run-*.wandb"))
    results = json.loads((workdir / "results.json").read_text())
    last_train = [r for r in records if "train/loss" in r][-1]
    assert {name: last_train[f"mix/tokens/{name}"] for name in results["corpora"]} == {
        name: row["tokens_seen"] for name, row in results["corpora"].items()}


def test_demo_checkpoint_carries_loader_state_and_ledger(demo_run):
    import torch

    workdir, experiment, _ = demo_run
    tag = (experiment.checkpoints_dir / "latest").read_text()
    state = torch.load(experiment.checkpoints_dir / tag / "mp_rank_00_model_states.pt", weights_only=False)
    samples = experiment.train.steps * experiment.train.global_batch_size
    assert state["loader"]["samples_consumed"] == samples
    assert sum(state["ledger"]["samples"]) == samples and state["ledger"]["corpora"] == experiment.corpus_names()


def test_demo_export_loads_generates_and_matches_the_checkpoint(demo_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dapt.pretrain.evaluate import evaluate_model_dir

    workdir, experiment, stdout = demo_run
    assert_loads_alike(experiment.export_dir, model=True)
    model = AutoModelForCausalLM.from_pretrained(experiment.export_dir)
    tokenizer = AutoTokenizer.from_pretrained(experiment.export_dir)
    inputs = tokenizer("Shares of", return_tensors="pt", add_special_tokens=False)
    output = model.generate(**inputs, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert output.shape[1] > inputs["input_ids"].shape[1]
    results = json.loads((workdir / "results.json").read_text())
    exported = evaluate_model_dir(experiment, experiment.export_dir)
    for name, bpb in exported.items():
        assert bpb == pytest.approx(results["corpora"][name]["bpb_after"], rel=1e-4), name


def test_demo_export_is_scored_by_lm_eval_alike_under_transformers_4_and_5(demo_run, tmp_path):
    """`dapt eval --tasks` on the export, then the task folder it wrote rerun by lm-eval alone."""
    from dapt.pretrain.tasks import evaluate_tasks

    _, experiment, _ = demo_run
    results = evaluate_tasks([EXAMPLE_TASK], experiment.export_dir, tmp_path, shots=2)
    assert results["tasks"][0]["items"] > 20
    assert_scored_alike(experiment.export_dir, results, tmp_path / "eval_tasks")


def test_demo_export_carries_a_model_card_and_its_experiment(demo_run):
    workdir, experiment, _ = demo_run
    card = (experiment.export_dir / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers" and {"dapt", "financial", "public"} <= set(front["tags"])
    results = json.loads((workdir / "results.json").read_text())
    for name, row in results["corpora"].items():  # the per-corpus figures of the run, as the table shows them
        assert f"| {row['tokens_seen']:,} | {row['bpb_before']:.3f} → {row['bpb_after']:.3f} |" in card, name
    assert f"checkpoint `{results['checkpoint']}`" in card
    assert (experiment.export_dir / "experiment.yaml").read_text() == (workdir / "demo.yaml").read_text()


def test_a_sharded_bf16_export_loads_and_keeps_the_checkpoints_bpb(demo_run, tmp_path):
    """bf16 weights change held-out BPB by their rounding only: within 1% of the fp32 checkpoint's."""
    from safetensors import safe_open

    from dapt.pretrain.evaluate import evaluate_model_dir

    workdir, experiment, _ = demo_run
    out = tmp_path / "bf16"
    result = subprocess.run([sys.executable, "-m", "dapt", "export", str(experiment.checkpoints_dir), str(out),
                             "--dtype", "bf16", "--max-shard-size", "1MB"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    with safe_open(out / shards[0], "pt") as weights:
        assert weights.get_tensor(next(iter(weights.keys()))).dtype == torch.bfloat16
    assert_loads_alike(out, model=True)
    results = json.loads((workdir / "results.json").read_text())
    for name, bpb in evaluate_model_dir(experiment, out).items():
        assert bpb == pytest.approx(results["corpora"][name]["bpb_after"], rel=0.01), name
