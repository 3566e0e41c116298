"""The learning rate of every step, as formulas: what training runs at, what the mix plan plots
and what the tests hold a run to, across resumes and branches.

Step s (1-based) trains at iteration i = s − 1, as in transformers: warmup rises linearly from
`warmup_start_lr` over `warmup_steps` (a run without warmup starts at the peak), then
- `constant` stays at `lr`;
- `cosine` and `linear` fall from `lr` towards lr × min_lr_ratio over the rest of the run, at
  progress p = (i − W) / (T − W);
- `wsd` stays at `lr` until the decay's first step D, then falls to lr × min_lr_ratio in the decay's
  shape at p = (i − D) / (T − D).

These are transformers' formulas (`get_cosine_with_min_lr_schedule_with_warmup`,
`get_linear_schedule_with_warmup`, `get_constant_schedule_with_warmup`, `get_wsd_schedule`; the
tests hold them equal at every step), written as a function of the step because the mix plan plots
them before any optimizer exists, and because warmup here may start from `warmup_start_lr`
(transformers' warms from 0, or in warmup-stable-decay from the floor). dapt runs them as its own
scheduler rather than DeepSpeed's: DeepSpeed has no warmup-stable-decay, and its linear decay cannot
start at the peak without warmup (the warmup's start is also its floor).
"""

from __future__ import annotations

import math

import numpy as np

from dapt.pretrain.config import TrainConfig

FALLS = {"linear": lambda p: 1 - p, "cosine": lambda p: (1 + math.cos(math.pi * p)) / 2, "1-sqrt": lambda p: 1 - math.sqrt(p)}


def lr_at(train: TrainConfig, iteration: int) -> float:
    """The learning rate of iteration `iteration` (0-based: step iteration + 1 trains at it)."""
    peak, floor, warmup = train.lr, train.lr * train.min_lr_ratio, train.warmup_steps
    if iteration < warmup:
        return train.warmup_start_lr + (peak - train.warmup_start_lr) * iteration / warmup
    if train.schedule == "constant":
        return peak
    falls_from = train.decay_start if train.schedule == "wsd" else warmup
    if iteration < falls_from:
        return peak
    progress = min(1.0, (iteration - falls_from) / (train.steps - falls_from))
    shape = train.decay_shape if train.schedule == "wsd" else train.schedule
    return floor + (peak - floor) * FALLS[shape](progress)


def lr_curve(train: TrainConfig) -> np.ndarray:
    """The learning rate of every step of the run: element s − 1 is step s's."""
    return np.array([lr_at(train, iteration) for iteration in range(train.steps)])


class LearningRateSchedule:
    """The schedule as a scheduler DeepSpeed drives like its own: `step()` after every optimizer step,
    `state_dict()` into checkpoints (the same state as DeepSpeed's schedulers: checkpoints written
    with those load). The rate is a function of the iteration alone, so a resume, at any world size,
    continues exactly where the iteration says."""

    def __init__(self, optimizer, train: TrainConfig):
        self.optimizer, self.train = optimizer, train
        self.last_batch_iteration = -1
        self._last_lr = [0.0 for _ in optimizer.param_groups]

    def get_lr(self) -> list[float]:
        rate = lr_at(self.train, max(0, self.last_batch_iteration))
        return [rate for _ in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        return self._last_lr

    def step(self, last_batch_iteration: int | None = None) -> None:
        self.last_batch_iteration = self.last_batch_iteration + 1 if last_batch_iteration is None else last_batch_iteration
        self._last_lr = self.get_lr()
        for group, rate in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = rate

    def state_dict(self) -> dict:
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, state: dict) -> None:
        self.step(state["last_batch_iteration"])
