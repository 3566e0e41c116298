"""`dapt launch slurm` without Slurm: the sbatch script it renders, its quoting and option errors (the
script run by a real Slurm is in e2e/test_slurm.py)."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from dapt.base import DaptError
from dapt.experiment import load_experiment
from dapt.launch.config import SlurmConfig
from dapt.launch.slurm import launch_slurm, render_script, slurm_options
from tests.conftest import write_experiment
from tests.helpers import dapt_here as dapt

START_SLURM = Path(__file__).resolve().parents[1] / "slurm" / "start_local_slurm.sh"
HOSTILE = "x; touch PWNED; $(touch PWNED) `touch PWNED` ' \""


# --- the script, without Slurm -------------------------------------------------------------

def test_dry_run_prints_the_script_with_flags_over_the_config(tmp_path):
    path = write_experiment(tmp_path, {"launch": {"slurm": {"partition": "cpu", "nodes": 2, "time": "1:00:00", "cpus_per_task": 16,
                                                            "sbatch_options": ["--qos=high"]}}})
    done = dapt("launch", "slurm", str(path), "--dry-run", "--nodes", "8", "--gpus-per-node", "4")
    status, script = done.returncode, done.stdout
    assert status == 0
    for directive in ("--nodes=8", "--gpus-per-node=4", "--partition=cpu", "--cpus-per-task=16", "--time=1:00:00", "--qos=high",
                      "--ntasks-per-node=1", "--requeue", "--signal=B:USR1@300", "--open-mode=append"):
        assert f"#SBATCH {directive}\n" in script, directive
    assert "--nproc-per-node=4 " in script, "one training process per GPU"
    assert "srun --ntasks-per-node=1 --cpus-per-task=16 " in script, "Slurm 22.05 srun does not inherit it"
    assert "--rdzv-backend=c10d" in script and 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0, "valid bash"
    assert not (tmp_path / "slurm").exists(), "a dry run writes nothing"


def test_a_carried_over_base_model_is_made_on_the_first_node_before_torchrun(tmp_path):
    """With `model.embeddings` the job carries the base model over before any rank starts, and stops
    with its reason if that fails; without it, the script does not mention it."""
    (tmp_path / "carried").mkdir()
    (tmp_path / "plain").mkdir()
    carried = write_experiment(tmp_path / "carried", {"model": {"path": str(tmp_path), "embeddings": "transplant"}})
    experiment, _ = load_experiment(carried)
    script = render_script(experiment, carried, experiment.launch.slurm)
    assert script.index('-m dapt model carry-over "$config" || {') < script.index("\nsrun --ntasks")
    plain = write_experiment(tmp_path / "plain", {})
    experiment, _ = load_experiment(plain)
    assert "carry-over" not in render_script(experiment, plain, experiment.launch.slurm)


def test_every_value_is_shell_quoted(tmp_path):
    folder = tmp_path / HOSTILE.replace("/", "")
    folder.mkdir()
    path = write_experiment(folder, {"name": HOSTILE, "launch": {"slurm": {"partition": HOSTILE, "account": HOSTILE}}})
    experiment, _ = load_experiment(path)
    script = render_script(experiment, path, experiment.launch.slurm)
    directives = [shlex.split(line) for line in script.splitlines() if line.startswith("#SBATCH")]
    assert ["#SBATCH", f"--partition={HOSTILE}"] in directives, "sbatch reads each option as one word"
    assert ["#SBATCH", f"--job-name={HOSTILE}"] in directives
    # The assignments at the top hold the user's paths; bash must read them back verbatim.
    assignments = "\n".join(line for line in script.splitlines() if re.match(r"(config|python|latest)=", line))
    read_back = subprocess.run(["bash", "-c", assignments + '\nprintf "%s\\n" "$config" "$latest"'],
                               capture_output=True, text=True, cwd=tmp_path)
    assert read_back.stdout.splitlines() == [str(path.resolve()), str(experiment.checkpoints_dir / "latest")]
    assert not list(tmp_path.rglob("PWNED")), "no value ran a command"


@pytest.mark.parametrize("slurm, message", [
    ({"time": "48h"}, r"launch.slurm.time: '48h' is not a Slurm time"),
    ({"partition": "gpu\nrm -rf ~"}, "launch.slurm.partition: must be a non-empty single line"),
    ({"sbatch_options": ["qos=high"]}, "'qos=high' is not an sbatch option"),
    ({"time": "10", "signal_lead_seconds": 600}, r"signal_lead_seconds \(600\) must be shorter than the time limit"),
    ({"nodes": 0}, "launch.slurm.nodes: .*greater than 0"),
])
def test_bad_slurm_options_are_refused(tmp_path, slurm, message):
    with pytest.raises(DaptError, match=message):
        load_experiment(write_experiment(tmp_path, {"launch": {"slurm": slurm}}))


def test_bad_flag_names_its_field(tmp_path):
    experiment, _ = load_experiment(write_experiment(tmp_path))
    with pytest.raises(DaptError, match=r"launch.slurm.time: .*'2 days' is not a Slurm time.* \(with --time '2 days'\)$"):
        slurm_options(experiment, {"time": "2 days", "nodes": None})


def test_submitting_without_slurm_says_what_to_do(tmp_path, monkeypatch):
    path = write_experiment(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DaptError, match="sbatch not found: run this on a Slurm login node, or add --dry-run"):
        launch_slurm(load_experiment(path)[0], path, SlurmConfig(), dry_run=False)
    assert not list((tmp_path / "slurm").iterdir()), "no script kept for a job that was not submitted"
    from dapt.launch.sweep_design import sweep_dir
    from dapt.launch.sweep_slurm import submit_array

    experiment = load_experiment(path)[0]
    (tmp_path / "run").mkdir()
    run = write_experiment(tmp_path / "run")
    with pytest.raises(DaptError, match="sbatch not found"):
        submit_array(experiment, [run])
    assert not list((sweep_dir(experiment) / "slurm").glob("*.sbatch")), "the job array's script is not kept either"


# --- a real Slurm ----------------------------------------------------------------------------


def test_start_script_refuses_without_slurm_and_says_why(tmp_path):
    """Where Slurm is missing the script says so (and the fixture skips with that reason)."""
    result = subprocess.run(["/bin/bash", str(START_SLURM), str(tmp_path / "state")], capture_output=True, text=True,
                            env={"PATH": str(tmp_path), "HOME": str(tmp_path)})
    assert result.returncode == 1
    assert "cannot start a local Slurm: 'munged' is not installed" in result.stderr
