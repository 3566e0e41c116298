"""Shared fixtures: tiny corpora made by the project's own demo writer, a tokenizer
trained once per session, and a helper that writes experiment files."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"))
os.environ.setdefault("WANDB_MODE", "offline")

from data_mix.demo_corpora import write_demo_corpora  # noqa: E402

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def offline_run_records(run_dir: Path) -> list[dict]:
    """The records of an offline W&B run folder, read back with W&B's own `wandb leet inspect`."""
    import json
    import subprocess
    import sys

    inspect = subprocess.run([str(Path(sys.executable).with_name("wandb")), "leet", "inspect", "--json", str(run_dir)],
                             capture_output=True, text=True, timeout=120, env={**os.environ, "WANDB_MODE": "offline"})
    assert inspect.returncode == 0, inspect.stderr[-2000:]
    return [json.loads(line) for line in inspect.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="session")
def small_corpora(tmp_path_factory) -> Path:
    """A folder holding data/ with the four demo corpora at a tenth of their size."""
    root = tmp_path_factory.mktemp("corpora")
    write_demo_corpora(root / "data", seed=7, scale=0.1)
    return root


def write_experiment(folder: Path, overrides: dict | None = None, text: str | None = None) -> Path:
    """The demo experiment (or `text`) written into `folder`, with top-level sections replaced."""
    path = folder / "experiment.yaml"
    if text is not None:
        path.write_text(textwrap.dedent(text))
        return path
    config = yaml.safe_load(DEMO_CONFIG.read_text())
    for key, value in (overrides or {}).items():
        config[key] = value
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def small_corpora_section(small_corpora: Path) -> list[dict]:
    """The demo's `corpora:` section with its paths pointing into `small_corpora`, for an
    experiment file written anywhere else."""
    corpora = yaml.safe_load(DEMO_CONFIG.read_text())["corpora"]
    return [{**corpus, "paths": [str(small_corpora / p) for p in corpus["paths"]]} for corpus in corpora]


@pytest.fixture(scope="session")
def built_experiment(small_corpora: Path):
    """The small corpora with a trained tokenizer and built stores (no training)."""
    from launch.experiment import load_experiment
    from launch.pipeline import build_stores, train_tokenizer

    path = write_experiment(small_corpora, {"tokenizer": {"train": {"vocab_size": 600, "sample_bytes": 4.0e5}}})
    experiment, _ = load_experiment(path)
    train_tokenizer(experiment)
    build_stores(experiment)
    return experiment
