"""ZeRO stages 1, 2 and 3 (and 3 offloaded) each train a tiny model in 2 processes and export a
model whose held-out BPB equals the one measured in training; under ZeRO-3 the chunked loss trains
as whole logits do. Every run of the module trains in one pair of ranks (`train_together`)."""

import json

import pytest
import yaml

from dapt.experiment import load_experiment
from dapt.pretrain.evaluate import evaluate_model_dir
from tests.helpers import dapt_here, experiment_file, losses, train_together

OFFLOAD = {"offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}
STAGES = {"zero1": {"stage": 1}, "zero2": {"stage": 2}, "zero3": {"stage": 3}, "zero3-offload": {"stage": 3, **OFFLOAD}}
CHUNKS = (16, 0)


def zero_run(folder, built_experiment, zero: dict, steps: int, **train):
    folder.mkdir()
    path = experiment_file(folder, built_experiment, steps=steps)
    config = yaml.safe_load(path.read_text())
    config["deepspeed"] = {"zero_optimization": zero}
    config["train"].update(checkpoint_every=0, lr=1e-2, **train)
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, built_experiment) -> dict:
    """Each stage's 12 steps, and 4 steps under ZeRO-3 with the loss in chunks of 16 positions or whole."""
    root = tmp_path_factory.mktemp("zero")
    paths = {name: zero_run(root / name, built_experiment, zero, steps=12) for name, zero in STAGES.items()}
    paths |= {chunk: zero_run(root / f"chunk{chunk}", built_experiment, {"stage": 3}, steps=4, precision="fp32",
                              loss_chunk_tokens=chunk) for chunk in CHUNKS}
    train_together(list(paths.values()))
    return paths


@pytest.mark.parametrize("stage", STAGES)
def test_zero_stage_trains_and_exports(runs, stage):
    path = runs[stage]
    curve = losses(path.parent)
    assert curve[12] < curve[1] - 0.3, curve
    results = json.loads((path.parent / "results.json").read_text())
    assert all(row["bpb_after"] < row["bpb_before"] for row in results["corpora"].values())

    experiment, _ = load_experiment(path)
    out = path.parent / "export"
    exported = dapt_here("export", str(experiment.checkpoints_dir), str(out))
    assert exported.returncode == 0, exported.stderr[-2000:]
    for name, bpb in evaluate_model_dir(experiment, out).items():
        assert bpb == pytest.approx(results["corpora"][name]["bpb_after"], rel=1e-4), name


def test_the_chunked_loss_trains_as_the_whole_logits_do_under_zero3(runs):
    """Under ZeRO-3 in 2 processes (the head's weight partitioned, its gradient computed in the forward
    pass and handed to the partitioned reduction in the backward): the same losses step by step and
    held-out BPB, chunks of 16 positions against whole logits."""
    curves = {chunk: losses(runs[chunk].parent) for chunk in CHUNKS}
    bpb = {chunk: json.loads((runs[chunk].parent / "results.json").read_text())["corpora"] for chunk in CHUNKS}
    assert curves[16] == pytest.approx(curves[0], abs=1e-5)
    for name, row in bpb[0].items():
        assert bpb[16][name]["bpb_after"] == pytest.approx(row["bpb_after"], abs=1e-5), name
