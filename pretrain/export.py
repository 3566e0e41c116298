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
from dapt.pretrain.lora import ADAPTER, lora_model
from dapt.pretrain.model import PRECISION_DTYPES
from dapt.pretrain.model_card import write_model_card
from dapt.tokenizer.files import copy_tokenizer_files

GENERATION_CONFIG = "generation_config.json"


def export_checkpoint(checkpoints: Path, out_dir: Path, tag: str | None = None, dtype: str | None = None,
                      max_shard_size: str | None = None, lora: str | None = None) -> Path:
    """The checkpoint `tag` (default: the latest) as a Hugging Face folder in `out_dir`: weights in `dtype`
    (default: the experiment's `export.dtype`, else its training precision), safetensors shards of at most
    `max_shard_size`, the tokenizer, and a model card with the experiment file beside it. A LoRA run's
    adapters are merged in, or with `lora` "adapter" (default: `export.lora`) written as peft's folder."""
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
    from transformers import AutoConfig, AutoModelForCausalLM

    state = _consolidated_weights(checkpoints, tag)
    config = AutoConfig.from_pretrained(checkpoints / "model")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    adapters = experiment.train.lora if experiment else None
    if adapters is None:
        missing, unexpected = model.load_state_dict(state, strict=False)
    else:
        model, missing, unexpected = lora_model(model, adapters, state)
    # Tied output heads are absent from the state dict by design; anything else is a real mismatch.
    missing = [key for key in missing if not (config.tie_word_embeddings and key.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise DaptError(f"checkpoint {checkpoints / tag} does not match its model config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    out_dir.mkdir(parents=True, exist_ok=True)
    if adapters is not None and (lora or export.lora) == "adapter":
        _save_adapter(model, experiment, out_dir, checkpoints / "tokenizer")
        return out_dir
    if adapters is not None:
        model = model.merge_and_unload()  # W + (alpha / r) B A, a plain model again
    model.to(PRECISION_DTYPES[dtype])
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


def _consolidated_weights(checkpoints: Path, tag: str) -> dict[str, torch.Tensor]:
    """The model's weights in fp32: gathered from the ZeRO partitions by DeepSpeed's own helper, or,
    without ZeRO (stage 0), as the checkpoint holds them whole."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    model_states = checkpoints / tag / "mp_rank_00_model_states.pt"
    if model_states.exists():
        saved = torch.load(model_states, map_location="cpu", weights_only=False)
        if saved.get("param_shapes") is None:  # no ZeRO partitions to gather
            return {name: value.float() for name, value in saved["module"].items()}
        del saved
    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), tag=tag)


def _save_adapter(model, experiment: Experiment, out_dir: Path, tokenizer_dir: Path) -> None:
    """The LoRA adapters as peft writes them, pointing at the base model they go on, with the tokenizer."""
    if experiment.model.embeddings is not None:
        raise DaptError("export.lora: adapter: this run carried the base model over to another tokenizer "
                        f"(model.embeddings: {experiment.model.embeddings}), so its adapters do not fit "
                        f"{experiment.model.path}; export the merged model (export.lora: merged)")
    model.peft_config[ADAPTER].base_model_name_or_path = experiment.export.base_model or experiment.model.path
    model.save_pretrained(out_dir)
    copy_tokenizer_files(tokenizer_dir, out_dir)


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
