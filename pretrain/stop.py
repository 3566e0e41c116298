"""Stop on request: SIGTERM or SIGUSR1 (what Slurm sends before a time limit or
preemption) makes training save a checkpoint and exit cleanly.

A signal reaches only the rank it was sent to, so each rank records it and all
ranks agree once per step (an all-reduce of the flag) to stop after the same step.

And stop without one when the launcher is gone: torchrun starts its workers in a
session of their own, so a `kill -9` of the launcher's process group leaves them
training, writing checkpoints that a rerun would race with.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self, device: torch.device):
        self.device = device
        self.received: int | None = None
        for number in SIGNALS:
            signal.signal(number, self._record)

    def _record(self, number: int, _frame) -> None:
        self.received = number

    def agreed(self) -> bool:
        """True on every rank as soon as any rank has received a stop signal."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def exit_with_launcher(rank: int, every_s: float = 1.0) -> None:
    """End this process within `every_s` of its launcher's death (it is then adopted by another
    parent); the last checkpoint is what a rerun resumes from."""
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(every_s)
        sys.stderr.write(f"dapt train: rank {rank}: its launcher (pid {launcher}) is gone, so it stops too; "
                         f"a rerun resumes from the last checkpoint\n")
        sys.stderr.flush()
        os._exit(1)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()
