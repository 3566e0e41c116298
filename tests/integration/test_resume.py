"""Resume and stop-by-signal with a real 2-process DeepSpeed run (ZeRO-2, gloo, fp32)."""

import json
import shutil
import signal
import subprocess
import time

import pytest
import yaml

from dapt.experiment import load_experiment
from dapt.launch.local import torchrun_command
from tests.helpers import experiment_file, losses, train, train_together


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, built_experiment) -> dict:
    """6 steps at ZeRO 2 and at ZeRO 0, checkpointing every 3, trained together on one pair of ranks."""
    root, paths = tmp_path_factory.mktemp("uninterrupted"), {}
    for stage in (2, 0):
        (root / f"zero{stage}").mkdir()
        paths[stage] = experiment_file(root / f"zero{stage}", built_experiment, steps=6, wandb="offline")
        config = yaml.safe_load(paths[stage].read_text())
        config["deepspeed"] = {"zero_optimization": {"stage": stage}}
        paths[stage].write_text(yaml.safe_dump(config))
    train_together(list(paths.values()))
    return paths


def rewound_to_step_3(uninterrupted: dict, stage: int, folder):
    """A copy in `folder` of the uninterrupted run at ZeRO `stage`, with what came after step 3's
    checkpoint undone, as a crash there would have."""
    shutil.copytree(uninterrupted[stage].parent, folder, dirs_exist_ok=True)
    path = folder / "experiment.yaml"
    config = yaml.safe_load(path.read_text())
    config["workdir"] = str(folder)
    path.write_text(yaml.safe_dump(config))
    uninterrupted_losses = losses(folder)
    uninterrupted_lrs = losses(folder, "train/lr")
    assert uninterrupted_lrs[1] == 1e-3, "without warmup the first step trains at the peak rate"
    first = json.loads((folder / "results.json").read_text())
    experiment, _ = load_experiment(path)
    (experiment.checkpoints_dir / "latest").write_text("step00000003")
    subprocess.run(["rm", "-r", str(experiment.checkpoints_dir / "step00000006"), str(folder / "results.json")],
                   check=True)
    return path, experiment, uninterrupted_losses, uninterrupted_lrs, first


def test_resume_continues_bitwise_like_the_uninterrupted_run(tmp_path, uninterrupted):
    path, experiment, uninterrupted, lrs, first = rewound_to_step_3(uninterrupted, 2, tmp_path)
    resumed_run = train(path)
    assert "resuming from" in resumed_run.stdout and "at step 3" in resumed_run.stdout
    resumed = losses(tmp_path)
    assert [resumed[s] for s in (4, 5, 6)] == [uninterrupted[s] for s in (4, 5, 6)], "bitwise equal losses"
    assert losses(tmp_path, "train/lr") == lrs, "the schedule goes on where it stopped"
    second = json.loads((tmp_path / "results.json").read_text())
    assert second["wandb_run_id"] == first["wandb_run_id"]
    assert {n: r["tokens_seen"] for n, r in second["corpora"].items()} == {n: r["tokens_seen"] for n, r in first["corpora"].items()}
    assert second["corpora"]["news"]["bpb_after"] == first["corpora"]["news"]["bpb_after"]


def test_sigusr1_checkpoints_and_the_rerun_finishes(tmp_path, built_experiment):
    path = experiment_file(tmp_path, built_experiment, steps=60, wandb="offline")
    process = subprocess.Popen(torchrun_command(path, 2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and '"step": 4,' in metrics.read_text()):
        time.sleep(0.2)
    process.send_signal(signal.SIGUSR1)
    output, _ = process.communicate(timeout=120)
    assert "stopped by a signal after step" in output, output[-3000:]
    stopped_at = max(losses(tmp_path))
    experiment, _ = load_experiment(path)
    assert (experiment.checkpoints_dir / "latest").read_text() == f"step{stopped_at:08d}"
    assert 4 <= stopped_at < 60
    rerun = train(path)
    assert f"at step {stopped_at}" in rerun.stdout
    assert sorted(losses(tmp_path)) == list(range(1, 61))


@pytest.mark.parametrize("stage", [2, 0])
def test_resume_at_another_world_size_keeps_the_data_order(tmp_path, uninterrupted, stage):
    path, experiment, uninterrupted, lrs, first = rewound_to_step_3(uninterrupted, stage, tmp_path)
    result = subprocess.run(torchrun_command(path, 1), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "written by 2 processes, now 1" in result.stdout
    assert losses(tmp_path, "train/lr") == lrs, "the schedule goes on where it stopped"
    resumed = losses(tmp_path)
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-4), step
    second = json.loads((tmp_path / "results.json").read_text())
    assert {n: r["tokens_seen"] for n, r in second["corpora"].items()} == {n: r["tokens_seen"] for n, r in first["corpora"].items()}
    assert not list(experiment.checkpoints_dir.glob("universal-*")), "the converted copy is removed once loaded"
