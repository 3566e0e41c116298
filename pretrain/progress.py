"""Rank 0's view of long work (training steps, fitting new rows): on a terminal, a bar with
the step, the work's own figures and an ETA; in a log file (Slurm, CI), a line every `every`
steps with the same figures."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    def __init__(self, total: int, first: int, every: int, enabled: bool, what: str | None = None):
        self.total, self.first, self.every, self.enabled = total, first, every, enabled
        self.label = f"{what}, step" if what else "step"
        self.started = time.perf_counter()
        terminal = enabled and sys.stdout.isatty()
        self.bar = tqdm(total=total, initial=first, desc=what, unit="step", dynamic_ncols=True) if terminal else None

    def update(self, step: int, figures: dict[str, str]) -> None:
        """`step` done; `figures` (name → formatted value) shown beside it."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(figures, refresh=False)
        elif step % self.every == 0 or step in (self.first + 1, self.total):
            per_step = (time.perf_counter() - self.started) / (step - self.first)
            eta = per_step * (self.total - step)
            shown = "  ".join(f"{name} {value}" for name, value in figures.items())
            print(f"{self.label} {step}/{self.total}  {shown}  "
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
