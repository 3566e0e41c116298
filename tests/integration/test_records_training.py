"""Tuning records mixed with replayed text, trained in 2 processes: the same steps at any world size."""

import json

import pytest
from tests.helpers import TINY
from tests.unit.test_records import headline_records


def test_tuning_records_mixed_with_replayed_text_train_alike_at_any_world_size(tmp_path, built_experiment):
    """Records at 75% beside public text at 25%, in 2 processes and in 1 with the same global batch:
    the same losses step by step (the loss is the mean over the step's completion tokens, whatever
    the ranks and micro-batches hold), per-corpus losses logged, and the completions' held-out BPB
    falls while the public corpus' is measured beside it."""
    import subprocess


    from dapt.experiment import load_experiment
    from dapt.launch.local import torchrun_command
    from dapt.launch.pipeline import build_stores
    from tests.conftest import reusing, write_experiment

    sections = reusing(built_experiment)
    sections["corpora"].append({"name": "sentiment", "group": "tuning", "paths": [str(headline_records(tmp_path))],
                                "record_format": "prompt_completion", "max_tokens": 65})
    sections["stores"] = str(tmp_path / "stores")
    config = {**sections, "model": {"config": TINY},
              "mix": {"seq_len": 64, "weights": {"sentiment": 0.75, "web": 0.25}},
              "train": {"steps": 4, "global_batch_size": 8, "micro_batch_size": 2, "lr": 3e-3, "warmup_steps": 1,
                        "precision": "fp32", "checkpoint_every": 0, "eval_max_tokens": 2000, "log_every": 1}}
    runs = {}
    for processes in (2, 1):
        folder = tmp_path / f"{processes}-processes"
        folder.mkdir()
        path = write_experiment(folder, {**config, "workdir": str(folder)})
        experiment, _ = load_experiment(path)
        manifests = {m["corpus"]: m for m in build_stores(experiment)}
        accounting = manifests["sentiment"]["accounting"]
        assert manifests["sentiment"]["records"] and accounting["invariant_holds"] and accounting["kept"] >= 80
        result = subprocess.run(torchrun_command(path, processes), capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        runs[processes] = ([m for m in metrics if "train/loss" in m], json.loads((folder / "results.json").read_text()))
    (two, results), (one, _) = runs[2], runs[1]
    assert [m["train/loss"] for m in two] == pytest.approx([m["train/loss"] for m in one], abs=1e-5)
    assert all("train/loss/sentiment" in m for m in two)
    sentiment, web = results["corpora"]["sentiment"], results["corpora"]["web"]
    assert sentiment["bpb_after"] < sentiment["bpb_before"] and web["bpb_after"] > 0
    assert sentiment["realised_share"] == pytest.approx(0.75, abs=0.1)
