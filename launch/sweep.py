"""`dapt sweep`: many small proxy runs of one experiment, one per mix, to choose the mix.

In: an experiment with a `sweep:` section. The tokenizer and token stores are built
once, in the experiment's workdir, and every proxy run reads them, so the runs differ
only in their mix (and BPB, being per byte, compares them fairly). Each run is a
complete experiment of its own under `<workdir>/sweep/runs/<run>/experiment.yaml`
(rerun it alone with `dapt launch local`). The runs train one after another in one set of
torchrun processes, so that process start, imports and the process group are paid once per
sweep; a run that fails takes its processes down, and the runs after it start in new ones.
Out: the runs' `results.json`, then the table, CSV, plot, fit and proposal written by
`sweep_results`.

A sweep is resumable: a run whose `results.json` exists is kept, a run stopped half
way resumes from its checkpoint, a failed run is reported with its log and the others
go on.
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dapt.base import DaptError
from dapt.experiment import Experiment, load_experiment
from dapt.launch.local import default_nproc, torchrun_command, training_environment
from dapt.launch.preflight import preflight
from dapt.pretrain.carry_over import carry_over_in_a_process
from dapt.launch.sweep_design import ProxyRun, base_weights, design, proxy_yaml, run_dir, sweep_dir, wandb_group
from dapt.launch.sweep_results import write_results
from dapt.launch.sweep_slurm import submit_array
from dapt.pretrain.stop import SIGNALS as STOP_SIGNALS
from dapt.pretrain.train import RUN_MARKER, RUNS_STOPPED
from dapt.workdir import workdir_lock


def select(runs: list[ProxyRun], only: list[str] | None) -> list[ProxyRun]:
    if not only:
        return runs
    known = [run.name for run in runs]
    for name in only:
        if name not in known:
            raise DaptError(f"--only: no run named {name!r} in this sweep; its runs: {', '.join(known)}")
    return [run for run in runs if run.name in only]


def check_unchanged(experiment: Experiment, runs: list[ProxyRun]) -> None:
    """Refuse to resume runs whose experiment the sweep would now write differently:
    their results would be kept as if they belonged to the new sweep."""
    for run in runs:
        config = run_dir(experiment, run) / "experiment.yaml"
        if config.exists() and config.read_text(encoding="utf-8") != proxy_yaml(experiment, run):
            raise DaptError(f"{config} was written by another version of this sweep (its mix, proxy or experiment "
                            f"changed); remove {config.parent} to rerun it, or give this sweep another workdir")


@dataclass
class Launch:
    """How one set of training processes for the pending runs ended."""

    code: int
    started: list[ProxyRun]
    """The runs it started, in order; the last may have failed or been stopped."""
    stopped: bool
    """Rank 0 said a signal stopped the sequence (its run keeps a checkpoint to resume from)."""


STARTED_RUN = re.compile(re.escape(RUN_MARKER) + r"\d+/\d+: (.+)$")


def launch_proxies(pending: list[tuple[ProxyRun, Path]], folder_of: Callable[[ProxyRun], Path], nproc: int,
                   on_line: Callable[[ProxyRun, str], None]) -> Launch:
    """One torchrun training the pending runs one after another in the same processes (`dapt
    train` with several files), so that process start, imports and the process group are paid
    once per sweep, not once per run. Each line goes to the log of the run it belongs to (rank 0
    names each run as it starts) and to `on_line`. SIGTERM or SIGUSR1 sent to this process is
    passed on to torchrun, so that the run in progress checkpoints and the sweep stops."""
    command = torchrun_command(pending[0][1], nproc)
    command[command.index(str(pending[0][1])) + 1:1] = [str(config) for _, config in pending[1:]]
    runs = {str(config): run for run, config in pending}
    started: list[ProxyRun] = []
    stopped = False
    current, log = pending[0][0], None
    process = subprocess.Popen(command, env=training_environment(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, bufsize=1)
    forwarding = threading.current_thread() is threading.main_thread()  # only there can handlers be set
    previous = {number: signal.signal(number, lambda number, _frame: process.send_signal(number))
                for number in STOP_SIGNALS} if forwarding else {}
    try:
        for line in process.stdout:
            marker = STARTED_RUN.search(line.rstrip("\n"))
            if marker and marker.group(1) in runs:
                current = runs[marker.group(1)]
                started.append(current)
            stopped = stopped or RUNS_STOPPED in line
            if log is None or log.name != str(folder_of(current) / "train.log"):
                if log is not None:
                    log.close()
                log = open(folder_of(current) / "train.log", "a", encoding="utf-8")
                log.write(f"$ {' '.join(command)}\n")
            log.write(line)
            log.flush()
            on_line(current, line)
        return Launch(process.wait(), started, stopped)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if process.poll() is None:  # this process is leaving early (an exception): leave no training behind
            process.terminate()
            process.wait()
        if log is not None:
            log.close()


def prepare_proxy(experiment: Experiment, run: ProxyRun) -> Path | None:
    """Write the run's experiment file and check its mix plan before any process starts;
    None when the plan is refused (e.g. past `max_epochs`), the reason in the run's log."""
    folder = run_dir(experiment, run)
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "experiment.yaml"
    config.write_text(proxy_yaml(experiment, run), encoding="utf-8")
    proxy, _ = load_experiment(config)
    from dapt.launch.pipeline import mix_plan

    with open(folder / "train.log", "a", encoding="utf-8") as out, contextlib.redirect_stdout(out):
        try:
            mix_plan(proxy)
        except DaptError as err:
            print(f"dapt: error: {err}")
            return None
    return config


def run_sweep(config_path: Path, only: list[str] | None = None, nproc: int | None = None,
              slurm: bool = False) -> dict | None:
    """Build the shared tokenizer and stores, then train every proxy run not yet done here
    and write the results, or (`slurm`) submit them as a job array and return None."""
    experiment, _ = load_experiment(config_path)
    if experiment.sweep is None:
        raise DaptError(f"{config_path}: no `sweep:` section; add one with `grid:`, `mixes:` or `random:` "
                        "(see the README, Data-mix experiments)")
    check_tasks(experiment)
    with workdir_lock(experiment.workpath):
        return _sweep(experiment, config_path, only, nproc, slurm)


def _sweep(experiment: Experiment, config_path: Path, only: list[str] | None, nproc: int | None,
           slurm: bool) -> dict | None:
    from dapt.launch.pipeline import build_stores, train_tokenizer

    print(f"== sweep {experiment.name}: everything goes to {sweep_dir(experiment)}")
    print("== tokenizer (shared by every run)", flush=True)
    train_tokenizer(experiment)
    print("== token stores (shared by every run)", flush=True)
    build_stores(experiment)
    preflight(experiment, config_path)
    left_out = [f"mix.{key}" for key in ("stages", "budgets") if getattr(experiment.mix, key)]
    if left_out:
        print(f"note: each proxy run trains on one mix from start to end; {' and '.join(left_out)} of the "
              "experiment are left out of the proxy runs and the proposal", flush=True)
    base = base_weights(experiment)
    runs = design(experiment, base)
    check_unchanged(experiment, runs)
    chosen = select(runs, only)
    print(f"== {len(chosen)} proxy run(s) of {len(runs)}, W&B group {wandb_group(experiment)!r}", flush=True)
    statuses = submit_to_slurm(experiment, chosen) if slurm else train_here(experiment, chosen, nproc)
    if statuses is None:
        return None
    for run in chosen:
        if statuses.get(run.name) in ("done", "kept") and experiment.sweep.tasks:
            score_tasks(experiment, run)
    summary = write_results(experiment, runs, base, statuses)
    failed = [name for name, status in statuses.items() if status == "failed"]
    if failed:
        logs = ", ".join(str(run_dir(experiment, ProxyRun(name, {})) / "train.log") for name in failed)
        raise DaptError(f"{len(failed)} of {len(chosen)} proxy run(s) failed ({', '.join(failed)}); logs: {logs}; "
                        "rerun `dapt sweep` to retry them (finished runs are kept)")
    if "stopped" in statuses.values():
        raise DaptError("the sweep was stopped by a signal; rerun `dapt sweep` to resume it (finished runs are kept, "
                        "the stopped run resumes from its checkpoint)")
    return summary


def prepare_pending(experiment: Experiment, runs: list[ProxyRun]) -> tuple[dict[str, str], list[tuple[ProxyRun, Path]]]:
    """The statuses of runs that will not train (finished earlier: kept; mix plan refused: failed)
    and the others with their experiment files, written and checked."""
    statuses, pending = {}, []
    for number, run in enumerate(runs, 1):
        if (run_dir(experiment, run) / "results.json").exists():
            statuses[run.name] = "kept"
            print(f"[{number}/{len(runs)}] {run.name}: finished earlier, kept")
            continue
        config = prepare_proxy(experiment, run)
        if config is None:
            statuses[run.name] = "failed"
            print(f"[{number}/{len(runs)}] {run.name}: its mix plan is refused, log: {run_dir(experiment, run) / 'train.log'}")
        else:
            pending.append((run, config))
    return statuses, pending


def train_here(experiment: Experiment, runs: list[ProxyRun], nproc: int | None,
               on_line: Callable[[ProxyRun, str], None] | None = None) -> dict[str, str]:
    """The runs one after another on this machine, in one set of training processes. A failed
    run is reported, and the runs after it start again in new processes."""
    statuses, pending = prepare_pending(experiment, runs)
    if not pending:
        return statuses
    carried = set()
    for _, config in pending:  # before the ranks start, as `dapt launch` does: once for the runs that share it
        proxy, _ = load_experiment(config)
        if proxy.model.embeddings is not None and proxy.carried_over_dir not in carried:
            carry_over_in_a_process(proxy, config)
            carried.add(proxy.carried_over_dir)
    nproc = nproc or default_nproc(load_experiment(pending[0][1])[0])
    numbers = {run.name: number for number, run in enumerate(runs, 1)}
    by_name = {run.name: run for run in runs}
    started_at: dict[str, float] = {}

    def show_progress(run: ProxyRun, line: str) -> None:
        if line.startswith(RUN_MARKER):
            shares = ", ".join(f"{name} {share:.3f}" for name, share in run.weights.items())
            print(f"[{numbers[run.name]}/{len(runs)}] {run.name}: {shares}", flush=True)
        elif line.startswith(("step ", "resuming ")):
            print(f"  {run.name}: {line.rstrip()}", flush=True)

    def on_output(run: ProxyRun, line: str) -> None:
        if run.name not in started_at:  # its first line (for the first run: the launch)
            for earlier in started_at.keys() - statuses.keys():
                report(by_name[earlier])  # the run before it has ended
            started_at[run.name] = time.perf_counter()
        (on_line or show_progress)(run, line)

    def report(run: ProxyRun, stopped: bool = False) -> None:
        number = f"[{numbers[run.name]}/{len(runs)}] {run.name}"
        if (run_dir(experiment, run) / "results.json").exists():
            statuses[run.name] = "done"
            print(f"{number}: done in {time.perf_counter() - started_at[run.name]:.0f} s", flush=True)
        elif stopped:
            statuses[run.name] = "stopped"
            print(f"{number}: stopped by a signal, its checkpoint kept; rerun `dapt sweep` to resume it", flush=True)
        else:
            statuses[run.name] = "failed"
            print(f"{number}: FAILED, log: {run_dir(experiment, run) / 'train.log'}; the sweep goes on", flush=True)

    while pending:
        launch = launch_proxies(pending, lambda run: run_dir(experiment, run), nproc, on_output)
        for run in launch.started:
            if run.name not in statuses:
                report(run, stopped=launch.stopped)
        if launch.stopped:
            break
        if not launch.started:  # the processes failed before the first run began: no run is to blame,
            for run, _ in pending:  # and a new start would fail the same way
                report(run)
            print(f"the training processes failed before the first run started; see {run_dir(experiment, pending[0][0])}"
                  "/train.log", flush=True)
            break
        pending = pending[len(launch.started):]
    for run in runs:
        statuses.setdefault(run.name, "not run")
    return statuses


def check_tasks(experiment: Experiment) -> None:
    """The sweep's task files are read before anything trains, so that a bad one stops the sweep at once."""
    from dapt.pretrain.tasks import load_task, read_examples

    for path in experiment.sweep.tasks:
        try:
            read_examples(load_task(Path(path)))
        except DaptError as err:
            raise DaptError(f"sweep.tasks: {err}") from None


def score_tasks(experiment: Experiment, run: ProxyRun) -> None:
    """The sweep's few-shot tasks on a finished run's final model (exported once), unless scored already."""
    from dapt.pretrain.export import export_checkpoint
    from dapt.pretrain.tasks import evaluate_tasks

    folder = run_dir(experiment, run)
    if (folder / "eval_tasks.json").exists():
        return
    proxy, _ = load_experiment(folder / "experiment.yaml")
    model_dir = proxy.export_dir
    if not (model_dir / "config.json").exists():
        export_checkpoint(proxy.checkpoints_dir, model_dir)
    results = evaluate_tasks([Path(task) for task in experiment.sweep.tasks], model_dir, folder)
    scores = ", ".join(f"{row['task']} accuracy {row['accuracy']:.3f}" for row in results["tasks"])
    print(f"  {run.name}: {scores}", flush=True)


def submit_to_slurm(experiment: Experiment, runs: list[ProxyRun]) -> dict[str, str] | None:
    """The unfinished runs as one job array; None once submitted. With nothing left to
    submit, the statuses, so that the results are written."""
    statuses, pending = prepare_pending(experiment, runs)
    if not pending:
        return statuses
    submit_array(experiment, [config for _, config in pending])
    return None
