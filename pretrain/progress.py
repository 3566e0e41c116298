"""Rank 0's view of a run: on a terminal, a bar with step, loss, tokens/s and ETA; in a
log file (Slurm, CI), a line every `every` steps with the same figures."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    def __init__(self, total: int, first: int, every: int, enabled: bool):
        self.total, self.first, self.every, self.enabled = total, first, every, enabled
        self.started = time.perf_counter()
        terminal = enabled and sys.stdout.isatty()
        self.bar = tqdm(total=total, initial=first, unit="step", dynamic_ncols=True) if terminal else None

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        elif step % self.every == 0 or step in (self.first + 1, self.total):
            per_step = (time.perf_counter() - self.started) / (step - self.first)
            eta = per_step * (self.total - step)
            print(f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s  "
                  f"ETA {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}", flush=True)

    def write(self, message: str) -> None:
        """A line that does not break the bar."""
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
