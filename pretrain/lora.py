"""LoRA (`train.lora`): low-rank adapters through `peft`, trained while the base weights stay frozen.

`with_lora` wraps the model as peft does (`get_peft_model`); DeepSpeed then sees only the
adapters as trainable, under every ZeRO stage (ZeRO-3 partitions the adapters that peft adds
to an already partitioned model when its engine starts). The checkpoints hold the wrapped
model's state, and `lora_model` rebuilds the same wrapping around a base model to read one
back: `dapt export` then writes the merged weights as a plain Hugging Face folder (the
default), or the adapter folder that `peft` loads on top of the base model.
"""

from __future__ import annotations

import torch

from dapt.pretrain.config import LoraSettings

ADAPTER = "default"  # peft's name for a model's one adapter


def peft_config(settings: LoraSettings):
    from peft import LoraConfig

    targets = settings.target_modules if isinstance(settings.target_modules, str) else list(settings.target_modules)
    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=targets,
                      task_type="CAUSAL_LM")


def with_lora(model: torch.nn.Module, settings: LoraSettings) -> torch.nn.Module:
    """`model` with LoRA adapters on `settings.target_modules`, everything else frozen."""
    from peft import get_peft_model

    return get_peft_model(model, peft_config(settings), adapter_name=ADAPTER)


def lora_model(base: torch.nn.Module, settings: LoraSettings, state: dict[str, torch.Tensor]
               ) -> tuple[torch.nn.Module, list[str], list[str]]:
    """The wrapped model of a LoRA run around `base`, holding `state` (a checkpoint's, consolidated),
    and the keys missing from `state` and those it has that the model lacks."""
    model = with_lora(base, settings)
    missing, unexpected = model.load_state_dict(state, strict=False)
    return model, missing, unexpected
