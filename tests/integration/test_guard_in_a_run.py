"""The step guard in a 2-process run: non-finite steps are skipped on every rank (the weights do not
move) and counted, too many in a row stop the run naming the last good checkpoint."""

import json
import os
import subprocess

import torch
import yaml

from dapt.launch.local import torchrun_command
from dapt.pretrain.guard import INJECT_ENV
from tests.helpers import experiment_file, losses


def module_weights(checkpoints, step: int) -> dict[str, torch.Tensor]:
    return torch.load(checkpoints / f"step{step:08d}" / "mp_rank_00_model_states.pt", weights_only=False)["module"]


def guarded_run(tmp_path, built_experiment, stage: int, nan_steps: str, max_in_a_row: int):
    """A 2-process run whose rank 0 sees a NaN loss at `nan_steps`, with a checkpoint after every step."""
    path = experiment_file(tmp_path, built_experiment, steps=5)
    config = yaml.safe_load(path.read_text())
    config["deepspeed"] = {"zero_optimization": {"stage": stage}}
    config["train"].update(checkpoint_every=1, keep_checkpoints=10, max_skipped_in_a_row=max_in_a_row)
    path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, **{INJECT_ENV: nan_steps})
    result = subprocess.run(torchrun_command(path, 2), capture_output=True, text=True, timeout=600, env=env)
    return result, tmp_path / "checkpoints"


def assert_same_weights(checkpoints, a: int, b: int, same: bool):
    first, second = module_weights(checkpoints, a), module_weights(checkpoints, b)
    assert all(torch.equal(first[k], second[k]) for k in first) == same, (a, b)


def test_a_nan_step_under_zero2_is_skipped_on_every_rank_and_training_goes_on(tmp_path, built_experiment):
    result, checkpoints = guarded_run(tmp_path, built_experiment, stage=2, nan_steps="4", max_in_a_row=3)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "step 4: non-finite loss or gradient norm, update skipped (1 so far)" in result.stdout
    assert_same_weights(checkpoints, 2, 3, same=False)
    assert_same_weights(checkpoints, 3, 4, same=True)
    assert_same_weights(checkpoints, 4, 5, same=False)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["skipped_steps"] == 1
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/skipped_steps"] for r in records if "train/skipped_steps" in r] == [0, 0, 0, 1, 1]
    assert len(losses(tmp_path)) == 5


def test_nan_steps_in_a_row_without_zero_stop_the_run_naming_the_last_good_checkpoint(tmp_path, built_experiment):
    result, checkpoints = guarded_run(tmp_path, built_experiment, stage=0, nan_steps="4,5", max_in_a_row=2)
    assert result.returncode != 0
    assert "step 5: 2 steps in a row had a non-finite loss" in result.stderr
    assert str(checkpoints / "step00000004") in result.stderr
    assert_same_weights(checkpoints, 2, 3, same=False)
    assert_same_weights(checkpoints, 3, 4, same=True)
