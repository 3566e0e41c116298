"""`dapt export CKPT OUT`: a DeepSpeed checkpoint → a plain Hugging Face model directory.

ZeRO shards are consolidated by DeepSpeed's own `zero_to_fp32` helpers; the model
config (with the base model's `generation_config.json`) and the tokenizer files saved
beside the checkpoints at the start of training make the output loadable by
`AutoModelForCausalLM` / `AutoTokenizer` with no dapt installed. Only tokenizer files
are copied from there, so nothing can land over the weights just written.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from dapt.base import DaptError
from dapt.pretrain.checkpoint import latest_tag
from dapt.pretrain.hf_folder import save_model_folder
from dapt.tokenizer.files import copy_tokenizer_files

GENERATION_CONFIG = "generation_config.json"


def export_checkpoint(checkpoints: Path, out_dir: Path, tag: str | None = None) -> Path:
    checkpoints = Path(checkpoints)
    tag = tag or latest_tag(checkpoints)
    if tag is None or not (checkpoints / tag).is_dir():
        raise DaptError(f"no checkpoint in {checkpoints} (no `latest` file or tag folder); train first or pass the tag")
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
    out_dir.mkdir(parents=True, exist_ok=True)
    save_model_folder(model, out_dir)
    if (checkpoints / "model" / GENERATION_CONFIG).exists():  # the base model's, as it was
        shutil.copy2(checkpoints / "model" / GENERATION_CONFIG, out_dir / GENERATION_CONFIG)
    copy_tokenizer_files(checkpoints / "tokenizer", out_dir)
    return out_dir
