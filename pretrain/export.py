"""`dapt export CKPT OUT`: a DeepSpeed checkpoint → a plain Hugging Face model directory.

ZeRO shards are consolidated by DeepSpeed's own `zero_to_fp32` helpers; the model
config (with the base model's `generation_config.json`) and the tokenizer files saved
beside the checkpoints at the start of training make the output loadable by
`AutoModelForCausalLM` / `AutoTokenizer` with no dapt installed. Only tokenizer files
are copied from there, so nothing can land over the weights just written. The weights
go out in the training precision unless asked otherwise, sharded like hub models, with a
model card.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import yaml
from pydantic import ValidationError

from dapt.base import DaptError
from dapt.experiment import Experiment
from dapt.pretrain.checkpoint import META, latest_tag
from dapt.pretrain.config import ExportConfig
from dapt.pretrain.hf_folder import save_model_folder
from dapt.pretrain.model import PRECISION_DTYPES
from dapt.pretrain.model_card import write_model_card
from dapt.tokenizer.files import copy_tokenizer_files

GENERATION_CONFIG = "generation_config.json"


def export_checkpoint(checkpoints: Path, out_dir: Path, tag: str | None = None, dtype: str | None = None,
                      max_shard_size: str | None = None) -> Path:
    """The checkpoint `tag` (default: the latest) as a Hugging Face folder in `out_dir`: weights in `dtype`
    (default: the experiment's `export.dtype`, else its training precision), safetensors shards of at most
    `max_shard_size`, the tokenizer, and a model card with the experiment file beside it."""
    checkpoints = Path(checkpoints)
    tag = tag or latest_tag(checkpoints)
    if tag is None or not (checkpoints / tag).is_dir():
        raise DaptError(f"no checkpoint in {checkpoints} (no `latest` file or tag folder); train first or pass the tag")
    experiment, yaml_text = _trained_from(checkpoints / tag)
    export = experiment.export if experiment else ExportConfig()
    dtype = dtype or export.dtype or (experiment.train.precision if experiment else "fp32")
    for needed in ("model/config.json", "tokenizer/tokenizer.json"):
        if not (checkpoints / needed).exists():
            raise DaptError(f"{checkpoints / needed} is missing; it is written when training starts")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), tag=tag)
    config = AutoConfig.from_pretrained(checkpoints / "model")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied output heads are absent from the state dict by design; anything else is a real mismatch.
    missing = [key for key in missing if not (config.tie_word_embeddings and key == "lm_head.weight")]
    if missing or unexpected:
        raise DaptError(f"checkpoint {checkpoints / tag} does not match its model config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    model.to(PRECISION_DTYPES[dtype])
    out_dir.mkdir(parents=True, exist_ok=True)
    save_model_folder(model, out_dir, max_shard_size or export.max_shard_size)
    if (checkpoints / "model" / GENERATION_CONFIG).exists():  # the base model's, as it was
        shutil.copy2(checkpoints / "model" / GENERATION_CONFIG, out_dir / GENERATION_CONFIG)
    copy_tokenizer_files(checkpoints / "tokenizer", out_dir)
    if experiment is not None:
        results_file = checkpoints.parent / "results.json"  # the run's figures, when this is its last checkpoint
        results = json.loads(results_file.read_text()) if results_file.exists() else None
        write_model_card(out_dir, experiment, yaml_text, results if results and results["checkpoint"] == tag else None,
                         tag)
    return out_dir


def _trained_from(checkpoint: Path) -> tuple[Experiment | None, str | None]:
    """The experiment the checkpoint was trained from, as its META holds it (None for checkpoints of
    earlier versions, or a file this version no longer reads)."""
    meta = checkpoint / META
    text = json.loads(meta.read_text()).get("experiment_yaml") if meta.exists() else None
    if text is None:
        return None, None
    try:
        return Experiment.model_validate(yaml.safe_load(text)), text
    except ValidationError:
        return None, None
