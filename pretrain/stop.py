"""Stop on request: SIGTERM or SIGUSR1 (what Slurm sends before a time limit or
preemption) makes training save a checkpoint and exit cleanly.

A signal reaches only the rank it was sent to, so each rank records it and all
ranks agree once per step (an all-reduce of the flag) to stop after the same step.
"""

from __future__ import annotations

import signal

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
