"""`dapt launch local`: torchrun on this machine, one `dapt train` per process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from dapt.base import DaptError
from dapt.experiment import Experiment
from dapt.launch.preflight import CHECKED


def default_nproc(experiment: Experiment) -> int:
    """The experiment's choice, else one process per GPU, else 2 on a CPU-only machine."""
    return experiment.launch.nproc_per_node or torch.cuda.device_count() or 2


# torchrun passes only SIGTERM/SIGINT/SIGHUP/SIGQUIT to the workers unless told otherwise;
# SIGUSR1 is what Slurm sends before a time limit, and training checkpoints on it.
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def torchrun_command(config_path: Path, nproc: int, resume: bool = True) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        f"--signals-to-handle={FORWARDED_SIGNALS}", "-m", "dapt", "train", str(config_path),
        *([] if resume else ["--no-resume"]),
    ]


def training_environment(**defaults: str) -> dict[str, str]:
    """This process's environment for the launcher, with `defaults` where the user set nothing;
    its callers have run the preflight checks, so the ranks need not run them again."""
    env = dict(os.environ)
    env[CHECKED] = "1"
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    for name, value in defaults.items():
        env.setdefault(name, value)
    return env


def run_training_command(command: list[str], what: str, launcher: str, **env_defaults: str) -> None:
    """Run a launcher in the foreground; its failure is the user's to read above, not a traceback here."""
    print(f"launching {what}: {' '.join(command[1:])}", flush=True)
    completed = subprocess.run(command, env=training_environment(**env_defaults))
    if completed.returncode != 0:
        raise DaptError(f"training failed ({launcher} exit code {completed.returncode}); the messages above say why")


def run_local(config_path: Path, nproc: int, resume: bool = True) -> None:
    run_training_command(torchrun_command(config_path, nproc, resume), f"{nproc} training processes", "torchrun")
