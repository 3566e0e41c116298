"""`dapt demo`: write the built-in demo corpora and experiment file, then run the whole flow."""

from __future__ import annotations

import shutil
from pathlib import Path

from data_mix.demo_corpora import write_demo_corpora

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def prepare_demo(workdir: Path) -> Path:
    """The demo's data under `workdir/data` and its experiment file as `workdir/demo.yaml`."""
    workdir.mkdir(parents=True, exist_ok=True)
    written = write_demo_corpora(workdir / "data")
    print(f"demo corpora (synthetic stand-ins for real ones) in {workdir / 'data'}:")
    for name, size in written.items():
        print(f"  {name:<14}{size / 1e6:6.2f} MB")
    config = workdir / "demo.yaml"
    shutil.copy(DEMO_CONFIG, config)
    return config
