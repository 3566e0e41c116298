"""matplotlib for the PNGs dapt writes (mix plan, tokenizer comparison, sweep, report): the
file backend, whatever display the machine has, and one way of saving a figure."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot().close(figure)
    return path
