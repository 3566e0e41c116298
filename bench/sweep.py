"""The fixed cost of a proxy run of `dapt sweep` against its training time, in one run.

A sweep pays start-up for every proxy run: process launch and imports, DeepSpeed init,
opening the stores and planning the mix, building the model, W&B init, the held-out
evaluation before training, and at the end the final evaluation, checkpoint and W&B
finish. With a fixed cost F and T seconds of training, a sweep of N runs spends
N·(F + T): a fixed cost above ~10% of a run wastes a tenth of the sweep's compute.

One real proxy run of the demo (its corpora, tokenizer, model and batch) is started by
the sweep's own runner (`launch.sweep.run_proxy`, torchrun with 2 processes on CPU).
Phases are read from what the run leaves behind while it runs, polled every 20 ms:
W&B's folder appears when W&B init starts, the model recipe under `checkpoints/` when it
ends, the first line of `metrics.jsonl` after the evaluation before training, a line
per step, `results.json` after the final evaluation and checkpoint, then the exit. The
training loop's own time is the sum of its step times (logged per step). Baseline: that
training time; the last row scales the fixed cost to a proxy run with 2 minutes of training.

    python bench/sweep.py [--steps 300] [--workdir /tmp/dapt-bench-sweep]
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

from data_mix.demo_corpora import write_demo_corpora
from launch.experiment import load_experiment
from launch.pipeline import build_stores, train_tokenizer
from launch.sweep import base_weights, design, run_dir, run_proxy

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
TARGET_TRAINING_S = 120.0


class Watcher(threading.Thread):
    """Records when each file the run writes first appears (or first holds a line)."""

    def __init__(self, folder: Path):
        super().__init__(daemon=True)
        self.events: dict[str, float] = {}
        self.done = threading.Event()
        self.checks = {
            "wandb init starts": lambda: (folder / "wandb").is_dir(),
            "wandb init done": lambda: (folder / "checkpoints" / "model" / "config.json").exists(),
            "eval before done": lambda: _lines(folder / "metrics.jsonl") >= 1,
            "first step done": lambda: _lines(folder / "metrics.jsonl") >= 2,
            "results written": lambda: (folder / "results.json").exists(),
        }

    def run(self) -> None:
        while not self.done.is_set():
            now = time.perf_counter()
            for name, check in self.checks.items():
                if name not in self.events and check():
                    self.events[name] = now
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
    parser.add_argument("--steps", type=int, default=300, help="training steps of the proxy run (the demo's)")
    parser.add_argument("--workdir", type=Path, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="dapt-bench-sweep-"))
    write_demo_corpora(root / "data")
    config = yaml.safe_load(DEMO_CONFIG.read_text())
    config["sweep"] = {"mixes": [{"group_weights": {"financial": 0.5, "public": 0.5}}],
                       "proxy": {"train": {"steps": args.steps, "eval_every": 0}}}
    (root / "sweep.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    experiment, _ = load_experiment(root / "sweep.yaml")
    train_tokenizer(experiment)  # shared by every run of a sweep: built once, not part of a run's cost
    build_stores(experiment)
    (run,) = design(experiment, base_weights(experiment))
    folder = run_dir(experiment, run)
    if folder.exists():
        raise SystemExit(f"{folder} exists from an earlier benchmark; remove it or pass another --workdir")

    imports = import_seconds()
    watcher = Watcher(folder)
    lines: list[tuple[float, str]] = []
    watcher.start()
    started = time.perf_counter()
    status = run_proxy(experiment, run, nproc=2, on_line=lambda line: lines.append((time.perf_counter(), line)))
    ended = time.perf_counter()
    watcher.done.set()
    watcher.join()
    if status != "done":
        raise SystemExit(f"the proxy run failed; see {folder / 'train.log'}")

    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "perf/samples_per_s" in r]
    batch = experiment.train.global_batch_size
    training = sum(batch / r["perf/samples_per_s"] for r in steps)
    first_step = batch / steps[0]["perf/samples_per_s"]
    at = watcher.events
    phases = [
        ("plan, launch, imports, DeepSpeed init, stores, model", at["wandb init starts"] - started),
        ("W&B init (offline)", at["wandb init done"] - at["wandb init starts"]),
        ("mix plan table + held-out eval before training", at["eval before done"] - at["wandb init done"]),
        ("final eval + checkpoint", at["results written"] - (at["first step done"] - first_step)
         - training),
        ("W&B finish, process exit", ended - at["results written"]),
    ]
    fixed = sum(seconds for _, seconds in phases)
    total = ended - started
    print(f"proxy run benchmark: demo model and batch ({experiment.train.global_batch_size}x{experiment.mix.seq_len}), "
          f"{len(steps)} steps, 2 processes (torchrun, gloo, CPU), W&B offline; baseline: the run's training loop")
    print(f"{'phase':<52}{'seconds':>9}{'÷ training':>12}")
    for name, seconds in phases:
        print(f"{name:<52}{seconds:>9.1f}{seconds / training:>12.3f}")
    print(f"{'  (within the first: one bare interpreter importing':<52}")
    print(f"{'   torch, deepspeed, transformers and wandb)':<52}{imports:>9.1f}{imports / training:>12.3f}")
    print(f"{'fixed cost (sum of the above)':<52}{fixed:>9.1f}{fixed / training:>12.3f}")
    print(f"{'training loop (baseline)':<52}{training:>9.1f}{1:>12.3f}")
    print(f"{'whole proxy run':<52}{total:>9.1f}{total / training:>12.3f}")
    share = fixed / (fixed + TARGET_TRAINING_S)
    print(f"fixed cost as a share of a proxy run with {TARGET_TRAINING_S:.0f} s of training: {share:.1%} (target < 10%)")


if __name__ == "__main__":
    main()
