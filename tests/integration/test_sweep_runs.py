"""`dapt sweep` for real: a 3-run sweep over the financial share of the demo corpora, resumed after one
run; runs sharing one process group, a killed run failing alone, a signal stopping the sweep."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dapt.experiment import load_experiment
from dapt.launch.sweep import train_here
from dapt.launch.sweep_design import ProxyRun, design, run_dir, sweep_dir
from tests.unit.test_sweep import TASK_FILE, TINY_PROXY, sweep_experiment


@pytest.fixture(scope="module")
def share_sweep(tmp_path_factory, built_experiment):
    """A real sweep over the financial share 0.1 / 0.5 / 0.9: first one run alone, then
    the whole sweep, which must keep that run and train the other two."""
    folder = tmp_path_factory.mktemp("sweep")
    sweep = {"grid": {"group": "financial", "shares": [0.1, 0.5, 0.9]}, "proxy": TINY_PROXY,
             "tasks": [str(TASK_FILE)]}
    path = sweep_experiment(folder, sweep, built_experiment, wandb={"project": "dapt-sweep-test", "mode": "offline"})
    experiment, _ = load_experiment(path)

    def dapt_sweep(*extra: str) -> str:
        result = subprocess.run([sys.executable, "-m", "dapt", "sweep", str(path), *extra],
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout

    first = dapt_sweep("--only", "financial-0.50")
    kept = run_dir(experiment, ProxyRun("financial-0.50", {})) / "results.json"
    written = kept.stat().st_mtime_ns
    second = dapt_sweep()
    assert kept.stat().st_mtime_ns == written, "the finished run was kept, not retrained"
    return experiment, first, second


def test_sweep_resumes_after_one_finished_run(share_sweep):
    experiment, first, second = share_sweep
    assert "1 proxy run(s) of 3" in first and "financial-0.50: done" in first
    assert "financial-0.50: finished earlier, kept" in second
    assert "financial-0.10: done" in second and "financial-0.90: done" in second
    rows = list(csv.DictReader(open(sweep_dir(experiment) / "results.csv")))
    assert [(r["run"], r["status"]) for r in rows] == [("financial-0.10", "done"), ("financial-0.50", "done"),
                                                      ("financial-0.90", "done")]
    assert "fit: a fit needs at least 4 finished runs" in second
    assert all(0.0 <= float(r["task:headline_sentiment/accuracy"]) <= 1.0 for r in rows), "every run was scored"
    assert first.count("headline_sentiment accuracy") == 1 and second.count("headline_sentiment accuracy") == 2
    assert (sweep_dir(experiment) / "bpb_vs_share.png").exists()


def test_all_runs_share_one_wandb_group_with_their_mix_in_the_config(share_sweep):
    experiment, _, _ = share_sweep
    for share in (0.1, 0.5, 0.9):
        folder = run_dir(experiment, ProxyRun(f"financial-{share:.2f}", {}))
        (record,) = (folder / "wandb").glob("offline-run-*/run-*.wandb")
        data = record.read_bytes()
        assert f"{experiment.name}-sweep".encode() in data, "the W&B group is recorded in the run"
        proxy, _ = load_experiment(folder / "experiment.yaml")
        assert proxy.mix.group_weights == {"financial": share, "public": round(1 - share, 6)}
        assert b"group_weights" in data, "the mix is part of the run's W&B config"


def test_financial_bpb_falls_and_public_bpb_rises_with_the_financial_share(share_sweep):
    experiment, _, _ = share_sweep
    runs = json.loads((sweep_dir(experiment) / "results.json").read_text())["runs"]
    financial = [run["bpb"]["financial"] for run in runs]
    public = [run["bpb"]["public"] for run in runs]
    assert financial[0] > financial[1] > financial[2], financial
    assert public[0] < public[1] < public[2], public
    for corpus, group in (("filings", "financial"), ("news", "financial"), ("encyclopedia", "public"), ("web", "public")):
        ends = runs[0]["bpb"][corpus], runs[2]["bpb"][corpus]
        assert (ends[0] > ends[1]) == (group == "financial"), (corpus, ends)


def _kill_one_rank_of(config: Path) -> None:
    """SIGKILL the rank-1 process training `config`, as an out-of-memory kill would."""
    import psutil

    for process in psutil.process_iter(["cmdline", "environ"]):
        if str(config) in " ".join(process.info["cmdline"] or []) and (process.info["environ"] or {}).get("LOCAL_RANK") == "1":
            process.kill()


def test_runs_share_one_process_group_and_a_killed_run_fails_alone(tmp_path, built_experiment, capsys):
    same = {"group_weights": {"financial": 0.5, "public": 0.5}}
    sweep = {"mixes": [same, same, {"group_weights": {"financial": 0.8, "public": 0.2}},
                       {"group_weights": {"financial": 0.2, "public": 0.8}}], "proxy": TINY_PROXY}
    experiment, _ = load_experiment(sweep_experiment(tmp_path, sweep, built_experiment))
    runs = design(experiment, {"financial": 0.5, "public": 0.5})
    victim = run_dir(experiment, runs[2]) / "experiment.yaml"

    def kill_the_third_run_at_step_10(run: ProxyRun, line: str) -> None:
        if run == runs[2] and line.startswith("step 10/"):
            _kill_one_rank_of(victim)

    statuses = train_here(experiment, runs, nproc=2, on_line=kill_the_third_run_at_step_10)
    assert statuses == {"mix-00": "done", "mix-01": "done", "mix-02": "failed", "mix-03": "done"}
    assert "mix-02: FAILED" in capsys.readouterr().out

    def losses(run: ProxyRun) -> list[float]:
        lines = (run_dir(experiment, run) / "metrics.jsonl").read_text().splitlines()
        return [record["train/loss"] for record in map(json.loads, lines) if "train/loss" in record]

    assert len(losses(runs[0])) == 40 and losses(runs[1]) == losses(runs[0]), \
        "a run trained after another in the same processes is the run trained alone"
    logs = [(run_dir(experiment, run) / "train.log").read_text() for run in runs]
    first_start = "dapt train " + " ".join(str(run_dir(experiment, run) / "experiment.yaml") for run in runs)
    assert first_start in logs[0] and "training run 2/4" not in logs[0], "each run's lines go to its own log"
    assert "training run 3/4" in logs[2] and "step 40/" not in logs[2]
    assert f"dapt train {run_dir(experiment, runs[3]) / 'experiment.yaml'}\n" in logs[3], \
        "the run after the failed one starts in new processes"


def test_a_signal_to_the_sweep_stops_it_and_a_rerun_resumes_the_stopped_run(tmp_path, built_experiment):
    sweep = {"grid": {"group": "financial", "shares": [0.2, 0.5, 0.8]}, "proxy": TINY_PROXY}
    experiment, _ = load_experiment(sweep_experiment(tmp_path, sweep, built_experiment))
    runs = design(experiment, {"financial": 0.5, "public": 0.5})

    def signal_the_sweep_during_the_second_run(run: ProxyRun, line: str) -> None:
        if run == runs[1] and line.startswith("step 10/"):
            os.kill(os.getpid(), signal.SIGUSR1)  # as Slurm signals a job before its time limit

    statuses = train_here(experiment, runs, nproc=2, on_line=signal_the_sweep_during_the_second_run)
    assert statuses == {"financial-0.20": "done", "financial-0.50": "stopped", "financial-0.80": "not run"}
    assert not (run_dir(experiment, runs[2]) / "metrics.jsonl").exists(), "no run starts after the stop"
    lines: list[str] = []
    statuses = train_here(experiment, runs, nproc=2, on_line=lambda run, line: lines.append(f"{run.name}: {line}"))
    assert statuses == {"financial-0.20": "kept", "financial-0.50": "done", "financial-0.80": "done"}
    assert any(line.startswith("financial-0.50: resuming from ") for line in lines), "the stopped run resumed"
