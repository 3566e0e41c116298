"""The experiment's `deepspeed:` section completed from `train:` (all but the learning rate's
schedule, which dapt runs itself: lr_schedule.py).

The section is a native DeepSpeed config. As in transformers' integration, a field
that is left out or set to "auto" is filled from the experiment; a field set to a
value that contradicts the experiment is refused, naming both, so that the batch
size or learning rate in the logs is the one that was used.
"""

from __future__ import annotations

import copy
from typing import Any

from dapt.base import DaptError
from dapt.pretrain.config import TrainConfig

AUTO = "auto"


def derived_config(train: TrainConfig, world_size: int, on_gpu: bool) -> dict[str, Any]:
    """What the experiment implies for DeepSpeed."""
    micro_steps = train.global_batch_size // (train.micro_batch_size * world_size)
    return {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": micro_steps,
        "gradient_clipping": train.grad_clip,
        "optimizer": {"type": "AdamW", "params": {
            "lr": train.lr, "betas": list(train.betas), "eps": 1e-8, "weight_decay": train.weight_decay,
            # FusedAdam needs CUDA (and a long compile); on CPU DeepSpeed takes torch's AdamW.
            "torch_adam": not on_gpu}},
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16"},
    }


def resolve_deepspeed_config(user: dict[str, Any], train: TrainConfig, world_size: int, on_gpu: bool) -> dict[str, Any]:
    if "scheduler" in user:
        raise DaptError(f"deepspeed.scheduler: the learning rate follows `train` (schedule: {train.schedule}, lr, "
                        "warmup_steps, min_lr_ratio; lr_schedule.py), which dapt runs itself; drop deepspeed.scheduler")
    resolved = copy.deepcopy(user)
    _fill(resolved, derived_config(train, world_size, on_gpu), "deepspeed")
    resolved.setdefault("zero_optimization", {"stage": 0})
    resolved.setdefault("steps_per_print", 10**9)  # dapt logs progress itself
    return resolved


def _fill(target: dict[str, Any], derived: dict[str, Any], path: str) -> None:
    for key, value in derived.items():
        here = f"{path}.{key}"
        if key not in target or target[key] == AUTO:
            target[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(target[key], dict):
            if "type" in value and target[key].get("type", value["type"]) != value["type"]:
                continue  # the user chose another optimizer or scheduler: their params stand as written
            _fill(target[key], value, here)
        elif target[key] != value and not (isinstance(value, list) and list(target[key]) == value):
            raise DaptError(f"{here} is {target[key]!r} but the experiment implies {value!r}; set it to \"auto\" or drop it")
