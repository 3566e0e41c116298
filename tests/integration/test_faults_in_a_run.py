"""Faults a user meets once a job has run, each injected for real, and what dapt does about it (the
README's fault table is this module and unit/test_faults.py, one row per test): a launcher killed
with -9, a write that fails during a save (the process's file-size limit, as a full disk fails it),
a resume with changed settings, a fresh start beside the user's own folders."""

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dapt.workdir import claim_workdir
from tests.helpers import dapt, dapt_here
from tests.unit.test_faults import edit, refused, tiny_run


# -- while a job runs ------------------------------------------------------------------------------

def rank_processes(config: Path) -> list[int]:
    """The training processes of `config` still alive (not the launcher)."""
    alive = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if f"dapt train {config}" in command and "torch.distributed.run" not in command:
            alive.append(int(entry.name))
    return alive


@pytest.fixture(scope="module")
def trained(tmp_path_factory, built_experiment) -> Path:
    """Six steps trained in a workdir where the user keeps folders of their own under checkpoints/."""
    folder = tmp_path_factory.mktemp("trained")
    path = tiny_run(folder, built_experiment)
    claim_workdir(folder / "run")
    (folder / "run" / "checkpoints" / "step_notes").mkdir(parents=True)
    (folder / "run" / "checkpoints" / "step00000001").mkdir()
    (folder / "run" / "checkpoints" / "step00000001" / "MARKER").write_text("mine")
    result = dapt("launch", "local", str(path), "--nproc", "2")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return path


def test_clean_up_removes_only_dapts_checkpoints(trained, tmp_path):
    checkpoints = trained.parent / "run" / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step00000006"
    assert not (checkpoints / "step00000003").exists()  # keep_checkpoints: 1
    assert (checkpoints / "step_notes").is_dir() and (checkpoints / "step00000001" / "MARKER").read_text() == "mine"
    # Started afresh in a copy: its step-3 checkpoint is the newest, and the old run's step 6 the one to go.
    shutil.copytree(trained.parent / "run", tmp_path / "run")
    config = yaml.safe_load(trained.read_text())
    config["workdir"], config["train"]["steps"] = str(tmp_path / "run"), 3
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    afresh = dapt("launch", "local", str(path), "--no-resume")
    assert afresh.returncode == 0, afresh.stderr[-3000:]
    copied = tmp_path / "run" / "checkpoints"
    assert (copied / "latest").read_text() == "step00000003" and (copied / "step00000003").is_dir()
    assert not (copied / "step00000006").exists()


def test_resume_with_changed_settings_names_each_field(trained):
    original = trained.read_text()
    checkpoint = trained.parent / "run" / "checkpoints" / "step00000006"
    edit(trained, lambda c: c["train"].update(lr=1e-5))
    refused(dapt_here("launch", "local", str(trained)), f"train.lr: 0.001 → 1e-05 since checkpoint {checkpoint}",
            "`--allow-changed train.lr`")
    trained.write_text(original)
    edit(trained, lambda c: c["model"]["config"].update(hidden_size=64))
    refused(dapt_here("launch", "local", str(trained)), "model.config.hidden_size: 32 → 64",
            "resumes only into the model it was saved from")
    trained.write_text(original)
    edit(trained, lambda c: c["mix"].update(group_weights={"financial": 0.7, "public": 0.3}))
    refused(dapt_here("launch", "local", str(trained)), "mix.group_weights.financial: 0.5 → 0.7", "same data order")
    trained.write_text(original)
    edit(trained, lambda c: c["train"].update(lr=5e-4, steps=7, eval_every=100))
    resumed = dapt("launch", "local", str(trained), "--allow-changed", "train.lr", "train.steps")
    trained.write_text(original)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "at step 6" in resumed.stdout
    for line in ("changed: train.lr: 0.001 → 0.0005", "changed: train.steps: 6 → 7", "changed: train.eval_every: 0 → 100"):
        assert line in resumed.stdout, resumed.stdout


def test_a_failed_save_is_named_cleaned_and_the_last_checkpoint_kept(trained, tmp_path):
    from dapt.pretrain.checkpoint import latest_meta

    shutil.copytree(trained.parent / "run", tmp_path / "run")
    checkpoints = tmp_path / "run" / "checkpoints"
    latest, meta = (checkpoints / "latest").read_text(), latest_meta(checkpoints)
    config = yaml.safe_load(meta["experiment_yaml"])  # as it trained, to its next checkpoint, in the copy
    next_save = (meta["step"] // 3 + 1) * 3  # checkpoint_every: 3
    config["workdir"], config["train"]["steps"] = str(tmp_path / "run"), next_save
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))

    def small_files() -> None:  # as a full disk does, the kernel fails the write that goes past the limit
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))

    failed = dapt("launch", "local", str(path), "--allow-changed", "train.steps", preexec_fn=small_files)
    assert failed.returncode != 0
    saved = checkpoints / f"step{next_save:08d}"
    assert f"saving checkpoint {saved} failed" in failed.stderr, failed.stderr[-3000:]
    assert " free on that disk, a checkpoint takes about" in failed.stderr
    assert f"the last good checkpoint, {checkpoints / latest}, is kept" in failed.stderr
    assert not saved.exists()
    assert (checkpoints / "latest").read_text() == latest
    rerun = dapt("launch", "local", str(path), "--allow-changed", "train.steps")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from {checkpoints / latest}" in rerun.stdout


# Larger than every file of the run but its checkpoint's (the tiny model's weights are ~0.2 MB).
FILE_LIMIT = 128 * 1024


def test_ranks_die_with_their_launcher(tmp_path, built_experiment):
    path = tiny_run(tmp_path, built_experiment, steps=5000, warmup_steps=1)
    launcher = subprocess.Popen([sys.executable, "-m", "dapt", "launch", "local", str(path)], start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in launcher.stdout:  # until training is under way
        if line.startswith("step "):
            break
    assert len(rank_processes(path)) == 2
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + 10
    while rank_processes(path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert rank_processes(path) == []
