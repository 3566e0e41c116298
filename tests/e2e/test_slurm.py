"""`dapt launch slurm` on a real one-node Slurm (munged, slurmctld, slurmd started by
tests/slurm/start_local_slurm.sh): a complete 2-process run, and a run that checkpoints on SIGUSR1,
requeues itself and resumes, then loses its node and resumes again."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dapt.base import DaptError
from dapt.experiment import load_experiment
from dapt.launch.slurm import launch_slurm
from tests.conftest import write_experiment
from tests.helpers import dapt_here as dapt, experiment_file, losses
from tests.unit.test_slurm import START_SLURM

SLURM_STATE = Path("/tmp/dapt-slurm")
STEPS = 50  # steps take ~0.1 s: enough that the stop lands mid-run


# --- the script, without Slurm -------------------------------------------------------------


# --- a real Slurm ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slurm_env():
    """The environment for Slurm's client commands; skips (with the reason) where Slurm cannot start."""
    started = subprocess.run(["bash", str(START_SLURM), str(SLURM_STATE)], capture_output=True, text=True, timeout=120)
    if started.returncode != 0:
        pytest.skip(f"no local Slurm: {started.stderr.strip() or started.stdout.strip()}")
    # sbatch passes the submitting environment on to the job, as it does for users.
    os.environ["SLURM_CONF"] = str(SLURM_STATE / "slurm.conf")
    yield dict(os.environ)
    del os.environ["SLURM_CONF"]
    if "already running" not in started.stdout:
        subprocess.run(["bash", str(START_SLURM), str(SLURM_STATE), "stop"], check=False)


def job_info(job_id: str, env: dict) -> dict[str, str]:
    line = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, env=env).stdout
    return dict(re.findall(r"(JobState|Restarts|ExitCode|Reason)=(\S+)", line))


def wait_for_job(job_id: str, env: dict, timeout: float = 300, until=None) -> dict[str, str]:
    """Poll until the job ends (or `until()` holds); a job still running at the timeout is cancelled."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job_info(job_id, env)
        if until is not None and until():
            return info
        if info.get("JobState") in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}:
            return info
        time.sleep(0.1)
    subprocess.run(["scancel", job_id], env=env)
    pytest.fail(f"job {job_id} did not finish in {timeout} s: {info}")


def submit(path: Path) -> str:
    done = dapt("launch", "slurm", str(path))
    status, output = done.returncode, done.stdout
    assert status == 0
    return re.search(r"submitted job (\d+)", output).group(1)


def slurm_output(workdir: Path, job_id: str) -> str:
    return (workdir / "slurm" / f"{job_id}.out").read_text()


def test_srun_tasks_find_their_rank_in_slurm_variables(slurm_env):
    code = "import json; from dapt.pretrain.env import discover; print(json.dumps(discover().__dict__))"
    result = subprocess.run(["srun", "--ntasks=2", sys.executable, "-c", code],
                            capture_output=True, text=True, env=slurm_env, timeout=60)
    assert result.returncode == 0, result.stderr
    tasks = sorted((json.loads(line) for line in result.stdout.splitlines()), key=lambda t: t["rank"])
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    assert [(t["rank"], t["world_size"], t["local_rank"], t["source"]) for t in tasks] == [(0, 2, 0, "Slurm"), (1, 2, 1, "Slurm")]
    assert {t["master_addr"] for t in tasks} == {host} and len({t["master_port"] for t in tasks}) == 1


def slurm_experiment(folder: Path, built_experiment) -> Path:
    """The resume tests' tiny run, saving only at the end or when stopped (saves cost seconds here)."""
    path = experiment_file(folder, built_experiment, steps=STEPS, wandb="offline")
    config = yaml.safe_load(path.read_text())
    config["train"]["checkpoint_every"] = 0
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_sbatch_reads_a_hostile_partition_as_one_name(slurm_env, tmp_path):
    path = write_experiment(tmp_path, {"launch": {"slurm": {"partition": "x; touch PWNED"}}})
    experiment, _ = load_experiment(path)
    with pytest.raises(DaptError, match="sbatch refused the job: .*invalid partition specified: x; touch PWNED"):
        launch_slurm(experiment, path, experiment.launch.slurm, dry_run=False)
    assert not list(tmp_path.rglob("PWNED")) and not list((tmp_path / "slurm").iterdir())


@pytest.fixture(scope="module")
def finished_job(slurm_env, built_experiment, tmp_path_factory):
    """The tiny experiment run to the end by `dapt launch slurm`: 1 node, torchrun with 2 ranks."""
    workdir = tmp_path_factory.mktemp("slurm-uninterrupted")
    path = slurm_experiment(workdir, built_experiment)
    job_id = submit(path)
    return workdir, job_id, wait_for_job(job_id, slurm_env)


def test_submitted_job_completes_and_both_ranks_train(finished_job):
    workdir, job_id, info = finished_job
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", slurm_output(workdir, job_id)
    assert (workdir / "slurm" / f"job-{job_id}.sbatch").is_file(), "the script is kept for the record"
    assert f"training finished: checkpoint step{STEPS:08d}" in slurm_output(workdir, job_id)
    assert sorted(losses(workdir)) == list(range(1, STEPS + 1))
    checkpoint = workdir / "checkpoints" / f"step{STEPS:08d}"
    assert json.loads((checkpoint / "dapt-checkpoint.json").read_text())["world_size"] == 2
    assert len(list(checkpoint.glob("*zero_pp_rank_[01]_*optim_states.pt"))) == 2, "each rank saved its ZeRO shard"
    rank_logs = sorted(p.relative_to(workdir).parts[-2] for p in (workdir / "logs").rglob("stderr.log"))
    assert rank_logs == ["0", "1"], "one log per rank"


def test_a_job_stopped_by_sigusr1_then_by_a_lost_node_resumes_the_same_run_each_time(slurm_env, finished_job,
                                                                                     built_experiment, tmp_path):
    """Attempt 1 is told to stop (SIGUSR1): it checkpoints and requeues itself. Attempt 2's node dies
    under it: Slurm requeues the job, and attempt 3 resumes from the last checkpoint (the one of the
    stop). The run ends as the uninterrupted one did, in one W&B run."""
    path = slurm_experiment(tmp_path, built_experiment)
    job_id = submit(path)
    metrics = tmp_path / "metrics.jsonl"
    wait_for_job(job_id, slurm_env, until=lambda: metrics.exists() and '"step": 2,' in metrics.read_text())
    # What `#SBATCH --signal=B:USR1@<lead>` does before the time limit, sent now.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=slurm_env, check=True)
    output = tmp_path / "slurm" / f"{job_id}.out"
    wait_for_job(job_id, slurm_env, until=lambda: "stopped by a signal after step" in output.read_text())
    stopped_at = int(re.search(r"stopped by a signal after step (\d+)", output.read_text()).group(1))
    assert 2 <= stopped_at < STEPS - 10
    wait_for_job(job_id, slurm_env, until=lambda: f'"step": {stopped_at + 2},' in metrics.read_text())
    lose_the_node(job_id, slurm_env)
    info = wait_for_job(job_id, slurm_env)
    output = slurm_output(tmp_path, job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "2", output
    assert "attempt 1 " in output and "attempt 3 " in output and f"requeueing job {job_id}" in output
    resumed = f"resuming from {tmp_path / 'checkpoints' / f'step{stopped_at:08d}'} at step {stopped_at}"
    assert output.count(resumed) == 2, output

    results = json.loads((tmp_path / "results.json").read_text())
    run_dirs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(run_dirs) >= 3 and {d.name.rsplit("-", 1)[1] for d in run_dirs} == {results["wandb_run_id"]}, \
        "the requeued attempts log to the same W&B run"
    # No sample repeated or skipped: every step logged once, with the uninterrupted run's loss,
    # and the ledger's tokens per corpus equal to the uninterrupted run's.
    uninterrupted_dir = finished_job[0]
    assert losses(tmp_path) == losses(uninterrupted_dir)
    uninterrupted = json.loads((uninterrupted_dir / "results.json").read_text())
    assert {n: c["tokens_seen"] for n, c in results["corpora"].items()} == \
           {n: c["tokens_seen"] for n, c in uninterrupted["corpora"].items()}


def lose_the_node(job_id: str, env: dict) -> None:
    """The job's node dies (slurmd and the job's processes killed at once), Slurm is told so (what
    its timeout for a node that stops answering would do, minutes later) and requeues the job, then
    the node boots again."""
    node = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    subprocess.run(["bash", str(START_SLURM), str(SLURM_STATE), "lose-node", job_id], check=True, timeout=60)
    subprocess.run(["scontrol", "update", f"NodeName={node}", "State=DOWN", "Reason=lost in a test"], env=env, check=True)
    wait_for_job(job_id, env, until=lambda: job_info(job_id, env).get("Restarts") == "2")
    subprocess.run(["bash", str(START_SLURM), str(SLURM_STATE), "node-back"], check=True, timeout=60)


# --- the store build as Slurm job arrays -------------------------------------------------------

def test_a_store_build_runs_as_slurm_tasks_and_a_cancelled_task_reruns_alone(slurm_env, built_experiment, tmp_path):
    """4 read tasks as a job array; one is cancelled, the build names it; the rerun runs only it, and the
    stores equal the local executor's."""
    from dapt.data_mix.store import TokenStore

    path = experiment_file(tmp_path, built_experiment, steps=1)
    config = yaml.safe_load(path.read_text())
    config |= {"stores": str(tmp_path / "stores"), "data": {"executor": "slurm", "tasks": 4,
                                                           "slurm": {"partition": "debug", "time": "00:10:00", "mem_per_cpu_gb": 1,
                                                                     # no task starts before the cancel below
                                                                     "sbatch_args": {"begin": "now+3"}}}}
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "dapt", "data", "build", str(path)]
    build = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=slurm_env)
    deadline, task = time.time() + 120, []
    while not task and time.time() < deadline:  # the read array's element 3 (beside it: datatrove's stats job)
        listed = subprocess.run(["squeue", "-h", "-r", "-n", "dapt-build-read", "-o", "%i"], capture_output=True,
                                text=True, env=slurm_env).stdout.split()
        task = [job for job in listed if job.endswith("_3")]
        time.sleep(0.1)
    assert task, "the read stage was submitted as a job array"
    subprocess.run(["scancel", task[0]], check=True, env=slurm_env)  # as a preempted or lost task
    out, err = build.communicate(timeout=300)
    assert build.returncode != 0 and len(err.strip().splitlines()) == 1, out + err
    assert "task 3 of stage 'read' failed" in err and "task_00003.log" in err and "rerun the same command" in err, err
    rerun = subprocess.run(command, capture_output=True, text=True, env=slurm_env, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "read: 4 task(s), 3 finished before" in rerun.stdout, rerun.stdout
    # The session's stores were built by the local executor with 2 tasks: a store does not depend on either.
    for corpus in built_experiment.corpora:
        name = corpus.name
        manifest = json.loads((built_experiment.stores_dir / name / "manifest.json").read_text())
        built = json.loads((tmp_path / "stores" / name / "manifest.json").read_text())
        assert built["splits"] == manifest["splits"] and built["accounting"] == manifest["accounting"]
        for split in ("train", "heldout"):
            assert (TokenStore(tmp_path / "stores" / name, split).tokens[:].tolist()
                    == TokenStore(built_experiment.stores_dir / name, split).tokens[:].tolist())
