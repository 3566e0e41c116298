"""The model to train: a local Hugging Face causal LM, or a new one built from a config."""

from __future__ import annotations

from pathlib import Path

import torch

from launch.base import DaptError
from pretrain.config import ModelConfig
from tokenizer.evaluate import load_tokenizer
from tokenizer.transplant import carry_over


def build_model(config: ModelConfig, tokenizer, seed: int, activation_checkpointing: bool):
    """Every rank builds the same weights (same seed); PyTorch SDPA attention."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    if config.config is not None:
        fields = dict(config.config)
        model_type = fields.pop("model_type")
        hf_config = AutoConfig.for_model(
            model_type,
            **fields,
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa", dtype=torch.float32)
    else:
        if not (Path(config.path) / "config.json").exists():
            raise DaptError(f"model.path: {config.path} is not a Hugging Face model directory (no config.json)")
        model = AutoModelForCausalLM.from_pretrained(config.path, attn_implementation="sdpa", dtype=torch.float32)
        if config.embeddings is not None:
            # Before DeepSpeed sees the model: every rank carries the full weights over the same
            # way, and ZeRO-3 then partitions rows that already follow the new vocabulary.
            base_tokenizer = load_tokenizer(Path(config.base_tokenizer or config.path))
            print(carry_over(model, base_tokenizer, tokenizer).summary(), flush=True)
        elif _own_vocabulary(Path(config.base_tokenizer or config.path)) not in (None, tokenizer.get_vocab()):
            raise DaptError(f"model.path: {config.path} was trained with another tokenizer than the experiment's; set "
                            f"`model.embeddings: transplant` (or `extend`) to carry it over, or use its own tokenizer")
        elif model.get_input_embeddings().num_embeddings < len(tokenizer):
            raise DaptError(
                f"model.path: the model has {model.get_input_embeddings().num_embeddings} embeddings but the tokenizer "
                f"has {len(tokenizer)} pieces; use the model's own tokenizer (`tokenizer.path`), or carry the model "
                f"over to this one with `model.embeddings: transplant` (or `extend`)"
            )
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _own_vocabulary(folder: Path) -> dict[str, int] | None:
    """The vocabulary of the tokenizer saved beside a model, if there is one."""
    return load_tokenizer(folder).get_vocab() if (folder / "tokenizer.json").exists() else None
