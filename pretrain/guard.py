"""Training safety: a step with a non-finite loss or gradient is skipped and counted,
too many in a row stop the run, and loss spikes are flagged.

The skip itself is DeepSpeed's: its ZeRO (1–3), bf16 and fp16 optimizers check the
global gradient norm at the optimizer step and, when it is NaN/inf, drop the
gradients, leave the weights and the lr schedule alone and report
`engine.was_step_applied() == False`. Two gaps are closed here. A non-finite
loss whose gradient happens to be finite (an inf cross-entropy) would be applied,
so its gradient is made NaN on purpose and the same check discards the step on
every rank. And an fp32 engine without ZeRO has no check at all, so its
gradients (all-reduced, hence equal on every rank) are checked here and the step
is skipped through the same flag DeepSpeed's wrappers use.
"""

from __future__ import annotations

import math
import os
from collections import deque

import torch

from dapt.base import DaptError

# Fault injection for testing the guard: rank 0's loss at these (1-based) steps is made NaN.
INJECT_ENV = "DAPT_INJECT_NAN_AT_STEPS"


def injected_nan_steps(rank: int) -> set[int]:
    if rank != 0 or not os.environ.get(INJECT_ENV):
        return set()
    return {int(step) for step in os.environ[INJECT_ENV].split(",")}


def engine_checks_overflow(engine) -> bool:
    """Whether DeepSpeed's optimizer wrapper skips steps with a non-finite gradient itself."""
    return hasattr(engine.optimizer, "overflow")


def loss_for_backward(loss: torch.Tensor) -> torch.Tensor:
    """The micro-batch loss to back-propagate; a non-finite one poisons the gradient so the step is skipped."""
    # A tensor op, not an `if`: deciding in Python would wait for the device on every micro-batch.
    return loss * torch.where(torch.isfinite(loss), 1.0, float("nan"))


def step_skipping_nonfinite_gradients(engine) -> None:
    """`engine.step()` for engines without their own check: a non-finite gradient (all-reduced, so the
    same on every rank) is dropped and the step skipped the way DeepSpeed skips an fp16 overflow."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if not grads or torch.isfinite(torch.nn.utils.get_total_norm(grads)):
        engine.step()
        return
    engine.zero_grad()  # torch's optimizers leave a parameter without a gradient untouched
    clipping = engine._config.gradient_clipping
    engine._config.gradient_clipping = 0.0  # DeepSpeed's fp32 clipping fails when no parameter has a gradient
    engine.optimizer.overflow = True  # the flag DeepSpeed's own wrappers raise: lr schedule held, step counted
    try:
        engine.step()
    finally:
        engine._config.gradient_clipping = clipping
        del engine.optimizer.overflow


class StepGuard:
    """Counts skipped steps and stops after `max_in_a_row`; flags losses far above the recent ones."""

    def __init__(self, max_in_a_row: int, spike_window: int, spike_threshold: float):
        self.max_in_a_row, self.spike_threshold = max_in_a_row, spike_threshold
        self.recent: deque[float] = deque(maxlen=spike_window)
        self.skipped = self.skipped_in_a_row = self.spikes = 0

    def record(self, loss: float, applied: bool) -> dict[str, float]:
        """The step's safety metrics."""
        metrics: dict[str, float] = {}
        if not applied or not math.isfinite(loss):
            self.skipped += 1
            self.skipped_in_a_row += 1
        else:
            self.skipped_in_a_row = 0
            zscore = self._zscore(loss)
            if zscore is not None:
                metrics["train/loss_zscore"] = zscore
                if zscore > self.spike_threshold:
                    self.spikes += 1
                    metrics["train/loss_spike"] = loss
            if zscore is None or zscore <= self.spike_threshold:
                self.recent.append(loss)  # spikes stay out of the baseline they are measured against
        metrics["train/skipped_steps"] = self.skipped
        metrics["train/loss_spikes"] = self.spikes
        return metrics

    @property
    def exhausted(self) -> bool:
        return self.skipped_in_a_row >= self.max_in_a_row

    def stop_error(self, step: int, last_checkpoint: str | None) -> DaptError:
        where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved yet"
        return DaptError(
            f"step {step}: {self.skipped_in_a_row} steps in a row had a non-finite loss or gradient norm, so training "
            f"stopped; {where}. Lower train.lr or raise train.warmup_steps, or check these steps' data, then resume "
            f"(train.max_skipped_in_a_row sets the limit)"
        )

    def _zscore(self, loss: float) -> float | None:
        if len(self.recent) < max(2, self.recent.maxlen // 2):
            return None
        mean = sum(self.recent) / len(self.recent)
        std = math.sqrt(sum((x - mean) ** 2 for x in self.recent) / (len(self.recent) - 1))
        return (loss - mean) / max(std, 1e-6 * max(abs(mean), 1.0))

    def state_dict(self) -> dict:
        return {"recent": list(self.recent), "skipped": self.skipped, "skipped_in_a_row": self.skipped_in_a_row,
                "spikes": self.spikes}

    def load_state_dict(self, state: dict) -> None:
        self.recent.extend(state["recent"])
        self.skipped, self.skipped_in_a_row, self.spikes = state["skipped"], state["skipped_in_a_row"], state["spikes"]
