"""ZeRO stages 1, 2 and 3 each train a tiny model in 2 processes and export a model
whose held-out BPB equals the one measured in training."""

import json
import subprocess
import sys

import pytest
import yaml

from dapt.experiment import load_experiment
from tests.helpers import experiment_file, losses, train


OFFLOAD = {"offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}


@pytest.mark.parametrize("stage, offload", [(1, False), (2, False), (3, False), (3, True)],
                         ids=["zero1", "zero2", "zero3", "zero3-offload"])
def test_zero_stage_trains_and_exports(tmp_path, built_experiment, stage, offload):
    path = experiment_file(tmp_path, built_experiment, steps=12)
    config = yaml.safe_load(path.read_text())
    config["deepspeed"] = {"zero_optimization": {"stage": stage, **(OFFLOAD if offload else {})}}
    config["train"].update(checkpoint_every=0, lr=1e-2)
    path.write_text(yaml.safe_dump(config))
    train(path)
    curve = losses(tmp_path)
    assert curve[12] < curve[1] - 0.3, curve
    results = json.loads((tmp_path / "results.json").read_text())
    assert all(row["bpb_after"] < row["bpb_before"] for row in results["corpora"].values())

    experiment, _ = load_experiment(path)
    out = tmp_path / "export"
    subprocess.run([sys.executable, "-m", "dapt", "export", str(experiment.checkpoints_dir), str(out)],
                   check=True, capture_output=True)
    from dapt.pretrain.evaluate import evaluate_model_dir

    exported = evaluate_model_dir(experiment, out)
    for name, bpb in exported.items():
        assert bpb == pytest.approx(results["corpora"][name]["bpb_after"], rel=1e-4), name


def test_the_chunked_loss_trains_as_the_whole_logits_do_under_zero3(tmp_path, built_experiment):
    """Under ZeRO-3 in 2 processes (the head's weight partitioned, its gradient computed in the forward
    pass and handed to the partitioned reduction in the backward): the same losses step by step and
    held-out BPB, chunks of 16 positions against whole logits."""
    curves = {}
    for chunk in (16, 0):
        folder = tmp_path / f"chunk{chunk}"
        folder.mkdir()
        path = experiment_file(folder, built_experiment, steps=4)
        config = yaml.safe_load(path.read_text())
        config["deepspeed"] = {"zero_optimization": {"stage": 3}}
        config["train"].update(checkpoint_every=0, lr=1e-2, precision="fp32", loss_chunk_tokens=chunk)
        path.write_text(yaml.safe_dump(config))
        train(path)
        curves[chunk] = losses(folder)
        curves[chunk, "bpb"] = json.loads((folder / "results.json").read_text())["corpora"]
    assert curves[16] == pytest.approx(curves[0], abs=1e-5)
    for name, row in curves[0, "bpb"].items():
        assert curves[16, "bpb"][name]["bpb_after"] == pytest.approx(row["bpb_after"], abs=1e-5), name
