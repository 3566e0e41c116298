"""Sequences per optimizer step: constant, or ramped up over the first steps (batch-size
warmup; BloombergGPT trained its first 7,200 steps at 1,024 sequences, then 2,048).

The sizes depend on the config alone, never on the world size, so step s always
consumes the same global samples [first_sample(s), first_sample(s + 1)) and a run
resumes from its sample count at any world size.
"""

from __future__ import annotations

import bisect

import numpy as np

from dapt.pretrain.config import TrainConfig


class BatchSizes:
    def __init__(self, full: int, start: int | None = None, ramp_steps: int = 0, increment: int | None = None):
        """From `start` the size grows linearly in multiples of `increment` and reaches `full` at `ramp_steps`."""
        self.full, self.ramp_steps = full, ramp_steps if start is not None else 0
        self.start = start if start is not None else full
        self.increment = increment or self.start
        ramp = [self.size(step) for step in range(self.ramp_steps)]
        self._ramp_firsts = np.concatenate([[0], np.cumsum(ramp, dtype=np.int64)]).tolist()

    def size(self, step: int) -> int:
        if step >= self.ramp_steps:
            return self.full
        grown = (self.full - self.start) * step // self.ramp_steps
        return self.start + grown // self.increment * self.increment

    def first_sample(self, step: int) -> int:
        """The global index of the first sample of `step` (the samples consumed before it)."""
        if step <= self.ramp_steps:
            return self._ramp_firsts[step]
        return self._ramp_firsts[-1] + (step - self.ramp_steps) * self.full

    def step_of(self, sample: int) -> int:
        """The step that consumes global sample `sample`."""
        if sample >= self._ramp_firsts[-1]:
            return self.ramp_steps + (sample - self._ramp_firsts[-1]) // self.full
        return bisect.bisect_right(self._ramp_firsts, sample) - 1

    def distinct(self) -> list[int]:
        return sorted({self.size(step) for step in range(self.ramp_steps)} | {self.full})

    def fingerprint(self) -> dict:
        return {"global_batch": self.full, "batch_warmup": [self.start, self.ramp_steps, self.increment]}


def batch_sizes(train: TrainConfig) -> BatchSizes:
    """The sizes `train:` asks for: `global_batch_size` throughout, or ramped by `batch_warmup`."""
    warmup = train.batch_warmup
    if warmup is None:
        return BatchSizes(train.global_batch_size)
    return BatchSizes(train.global_batch_size, warmup.start_batch_size, warmup.steps, warmup.increment)
