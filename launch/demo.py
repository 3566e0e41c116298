"""`dapt demo`: write the built-in demo corpora and experiment file, then run the whole flow.

`dapt demo --base-model DIR` continues pretraining a pretrained model instead of training a tiny
one: the same corpora and mix, the model's own tokenizer, settings sized for a model of ~100M
parameters on a CPU in minutes. `DIR` is linked into the workdir as `base-model`, so the
experiment file keeps every path relative to itself. Beside it goes `tuning.yaml`, which tunes
that model on the demo's labelled headlines with the web text replayed (`configs/tuning.yaml`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from dapt.data_mix.demo_corpora import write_demo_corpora
from dapt.base import DaptError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEMO_CONFIG = CONFIGS / "demo.yaml"
TUNING_CONFIG = CONFIGS / "tuning.yaml"
LABELLED_HEADLINES = CONFIGS / "tasks" / "headline_sentiment.jsonl"
BASE_MODEL_LINK = "base-model"
# What changes from configs/demo.yaml when the model is a pretrained one.
BASE_MODEL_SECTIONS = {
    "name": "finance-demo-base-model",
    "tokenizer": {"path": BASE_MODEL_LINK},  # the model's own, beside its weights
    "model": {"path": BASE_MODEL_LINK},
    "train": {"steps": 20, "global_batch_size": 8, "micro_batch_size": 2, "lr": 5.0e-5, "warmup_steps": 2,
              "schedule": "cosine", "min_lr_ratio": 0.1, "grad_clip": 1.0, "precision": "fp32",
              "eval_max_tokens": 4000, "log_every": 5},
}


def prepare_demo(workdir: Path, base_model: Path | None = None) -> Path:
    """The demo's data under `workdir/data` and its experiment file as `workdir/demo.yaml`."""
    if base_model is not None and not (base_model / "config.json").is_file():
        raise DaptError(f"--base-model: {base_model} is not a Hugging Face model folder (no config.json)")
    workdir.mkdir(parents=True, exist_ok=True)
    written = write_demo_corpora(workdir / "data")
    print(f"demo corpora (synthetic stand-ins for real ones) in {workdir / 'data'}:")
    for name, size in written.items():
        print(f"  {name:<14}{size / 1e6:6.2f} MB")
    config = workdir / "demo.yaml"
    if base_model is None:
        shutil.copy(DEMO_CONFIG, config)
        return config
    link = workdir / BASE_MODEL_LINK
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(base_model.resolve(), target_is_directory=True)
    shutil.copy(TUNING_CONFIG, workdir / TUNING_CONFIG.name)
    shutil.copy(LABELLED_HEADLINES, workdir / "data" / LABELLED_HEADLINES.name)
    sections = yaml.safe_load(DEMO_CONFIG.read_text()) | BASE_MODEL_SECTIONS
    header = f"# dapt demo --base-model {base_model}: configs/demo.yaml continuing pretraining of that model\n"
    config.write_text(header + yaml.safe_dump(sections, sort_keys=False))
    return config
