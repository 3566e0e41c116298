"""The fixed cost of the proxy runs of `dapt sweep` against their training time, in one run.

A sweep pays start-up for its proxy runs: process launch and imports, DeepSpeed init,
opening the stores and planning the mix, building the model, W&B init, the held-out
evaluation before training, and at the end the final evaluation, checkpoint and W&B
finish. With a fixed cost F per run and T seconds of training, a sweep of N runs spends
N·(F + T): a fixed cost above ~10% of a run wastes a tenth of the sweep's compute.

`dapt sweep` trains its runs one after another in one set of torchrun processes: launch,
imports and the process group are paid once per sweep, and the evaluation before training
(the same initial weights for every mix) once per start. This benchmark runs N real proxy
runs of the demo (its corpora, tokenizer, model and batch; different mixes) through the
sweep's own runner (`launch.sweep.train_here`, 2 processes on CPU) and times each run's
phases from what it leaves behind, polled every 20 ms: the line rank 0 prints as the run
starts, W&B's folder (W&B init starts), the model recipe under `checkpoints/` (it ends),
the first line of `metrics.jsonl` (evaluation before training), a line per step,
`results.json` (final evaluation and checkpoint), then the next run's line (or the line
saying all runs are done, then the exit).
The training loop's own time is the sum of its step times (logged per step); it is the
baseline. The first run's column (launch, imports and exit included) is what every run paid
when each had its own processes: the comparison row at the end.

    python bench/sweep.py [--runs 3] [--steps 300] [--workdir /tmp/dapt-bench-sweep]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from dapt.data_mix.demo_corpora import write_demo_corpora
from dapt.experiment import load_experiment
from dapt.launch.pipeline import build_stores, train_tokenizer
from dapt.launch.sweep import train_here
from dapt.launch.sweep_design import base_weights, design, run_dir, sweep_dir
from dapt.pretrain.train import ALL_RUNS_DONE, RUN_MARKER

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
TARGET_TRAINING_S = 120.0
GRID_RUNS = 9  # a grid over one group's share in steps of 0.1: a small sweep


class Watcher(threading.Thread):
    """Records when each file a run writes first appears (or first holds a line)."""

    def __init__(self, folders: list[Path]):
        super().__init__(daemon=True)
        self.events: list[dict[str, float]] = [{} for _ in folders]
        self.done = threading.Event()
        self.checks = [{
            "wandb init starts": lambda folder=folder: (folder / "wandb").is_dir(),
            "wandb init done": lambda folder=folder: (folder / "checkpoints" / "model" / "config.json").exists(),
            "eval before done": lambda folder=folder: _lines(folder / "metrics.jsonl") >= 1,
            "first step done": lambda folder=folder: _lines(folder / "metrics.jsonl") >= 2,
            "results written": lambda folder=folder: (folder / "results.json").exists(),
        } for folder in folders]

    def run(self) -> None:
        while not self.done.is_set():
            now = time.perf_counter()
            for events, checks in zip(self.events, self.checks):
                for name, check in checks.items():
                    if name not in events and check():
                        events[name] = now
            time.sleep(0.02)


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def import_seconds() -> float:
    """A fresh interpreter importing what a training process imports: the floor of launch."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, deepspeed, transformers, wandb"], check=True,
                   env=dict(os.environ, DS_ACCELERATOR="cpu"), capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="proxy runs (financial shares spread over 0.2…0.8)")
    parser.add_argument("--steps", type=int, default=300, help="training steps of each proxy run (the demo's)")
    parser.add_argument("--workdir", type=Path, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="dapt-bench-sweep-"))
    write_demo_corpora(root / "data")
    config = yaml.safe_load(DEMO_CONFIG.read_text())
    shares = [round(0.2 + 0.6 * i / max(args.runs - 1, 1), 2) for i in range(args.runs)]
    config["sweep"] = {"grid": {"group": "financial", "shares": shares},
                       "proxy": {"train": {"steps": args.steps, "eval_every": 0}}}
    (root / "sweep.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    experiment, _ = load_experiment(root / "sweep.yaml")
    train_tokenizer(experiment)  # shared by every run of a sweep: built once, not part of a run's cost
    build_stores(experiment)
    runs = design(experiment, base_weights(experiment))
    folders = [run_dir(experiment, run) for run in runs]
    if any(folder.exists() for folder in folders):
        raise SystemExit(f"{sweep_dir(experiment)} holds runs of an earlier benchmark; remove it or pass another --workdir")

    imports = import_seconds()
    watcher = Watcher(folders)
    run_starts: dict[str, float] = {}

    def on_line(run, line: str) -> None:
        if line.startswith(RUN_MARKER):
            run_starts[run.name] = time.perf_counter()
        elif line.startswith(ALL_RUNS_DONE):
            run_starts["(all done)"] = time.perf_counter()

    watcher.start()
    started = time.perf_counter()
    statuses = train_here(experiment, runs, nproc=2, on_line=on_line)
    ended = time.perf_counter()
    watcher.done.set()
    watcher.join()
    if set(statuses.values()) != {"done"}:
        raise SystemExit(f"a proxy run failed ({statuses}); see the train.log files under {sweep_dir(experiment)}")

    starts = [run_starts[run.name] for run in runs] + [run_starts["(all done)"]]
    columns = []
    for number, (folder, at) in enumerate(zip(folders, watcher.events)):
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in records if "perf/samples_per_s" in r]
        batch = experiment.train.global_batch_size
        training = sum(batch / r["perf/samples_per_s"] for r in steps)
        first_step = batch / steps[0]["perf/samples_per_s"]
        columns.append({
            "launch: torchrun, imports (once)": starts[0] - started if number == 0 else 0.0,
            "DeepSpeed init, stores, model": at["wandb init starts"] - starts[number],
            "W&B init (offline)": at["wandb init done"] - at["wandb init starts"],
            "mix plan table + held-out eval before training": at["eval before done"] - at["wandb init done"],
            "final eval + checkpoint": at["results written"] - (at["first step done"] - first_step) - training,
            "W&B finish, engine freed": starts[number + 1] - at["results written"],
            "process exit (once)": ended - starts[-1] if number == len(runs) - 1 else 0.0,
            "training": training,
        })
    phases = [name for name in columns[0] if name != "training"]
    per_run_phases = [name for name in phases if not name.endswith("(once)")]
    fixed = [sum(column[name] for name in per_run_phases) for column in columns]
    later = columns[1:] or columns
    later_training = sum(column["training"] for column in later)
    print(f"proxy run benchmark: {len(runs)} runs of the demo proxy (batch {experiment.train.global_batch_size}x"
          f"{experiment.mix.seq_len}, {args.steps} steps each), 2 processes (torchrun, gloo, CPU), W&B offline, "
          "one set of processes for the sweep; baseline: each run's training loop")
    header = "".join(f"{'run ' + str(i + 1):>9}" for i in range(len(runs)))
    print(f"{'phase (seconds)':<50}{header}{'÷ training, runs 2+':>22}")
    for name in phases:
        cells = "".join(f"{column[name]:>9.1f}" for column in columns)
        print(f"{name:<50}{cells}{sum(c[name] for c in later) / later_training:>22.3f}")
    print(f"{'  (a bare interpreter importing torch, deepspeed,':<50}")
    print(f"{'   transformers and wandb, for scale)':<50}{imports:>9.1f}")
    print(f"{'fixed cost of the run (without the once rows)':<50}{''.join(f'{f:>9.1f}' for f in fixed)}"
          f"{sum(fixed[1:] or fixed) / later_training:>22.3f}")
    training_cells = "".join(f"{column['training']:>9.1f}" for column in columns)
    print(f"{'training loop (baseline)':<50}{training_cells}{1:>22.3f}")
    # A sweep's fixed cost is F(N) = once + N × per_run: per_run from the runs after the first;
    # once is the launch, the exit, and what the first run paid beyond a later one (imports, process group).
    per_run = sum(fixed[1:] or fixed) / len(fixed[1:] or fixed)
    launch_and_exit = sum(column[name] for column in columns for name in phases if name.endswith("(once)"))
    once = launch_and_exit + fixed[0] - per_run
    print(f"fixed cost of a sweep of N runs: {once:.1f} s once + {per_run:.1f} s per run; per run, "
          f"against a proxy run with {TARGET_TRAINING_S:.0f} s of training (target < 10%):")
    for what, count in ((f"this benchmark's {len(runs)} runs", len(runs)),
                        (f"a grid of {GRID_RUNS} runs (0.1, 0.2 … 0.9)", GRID_RUNS),
                        ("many runs (the per-run cost alone)", None)):
        seconds = per_run + (once / count if count else 0.0)
        print(f"  {what:<40}{seconds:>6.1f} s  {seconds / (seconds + TARGET_TRAINING_S):>6.1%}")
    alone = launch_and_exit + fixed[0]  # what every run paid when each had its own processes
    print(f"  {'one set of processes per run (before)':<40}{alone:>6.1f} s  {alone / (alone + TARGET_TRAINING_S):>6.1%}"
          f"   (shared processes: {(per_run + once / GRID_RUNS) / alone:.2f}x at {GRID_RUNS} runs)")


if __name__ == "__main__":
    main()
