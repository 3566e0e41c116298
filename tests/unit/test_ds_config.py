import pytest

from dapt.base import DaptError
from dapt.pretrain.config import TrainConfig
from dapt.pretrain.ds_config import resolve_deepspeed_config

TRAIN = TrainConfig(steps=100, global_batch_size=32, micro_batch_size=4, lr=3e-4, warmup_steps=10, min_lr_ratio=0.1)


def test_auto_and_missing_fields_are_filled_from_train():
    user = {"train_batch_size": "auto", "zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}
    resolved = resolve_deepspeed_config(user, TRAIN, world_size=2, on_gpu=False)
    assert resolved["train_batch_size"] == 32
    assert resolved["train_micro_batch_size_per_gpu"] == 4
    assert resolved["gradient_accumulation_steps"] == 4
    assert resolved["optimizer"]["params"]["lr"] == 3e-4 and resolved["optimizer"]["params"]["torch_adam"] is True
    assert "scheduler" not in resolved, "dapt runs the learning rate's schedule itself (lr_schedule.py)"
    assert resolved["bf16"] == {"enabled": True} and resolved["zero_optimization"] == {"stage": 2}
    assert user["train_batch_size"] == "auto", "the experiment's own section is not modified"


def test_contradicting_value_is_refused_with_both_values():
    with pytest.raises(DaptError, match=r"deepspeed.train_batch_size is 64 but the experiment implies 32; set it to \"auto\""):
        resolve_deepspeed_config({"train_batch_size": 64}, TRAIN, world_size=2, on_gpu=False)
    with pytest.raises(DaptError, match=r"deepspeed.optimizer.params.lr is 0.1"):
        resolve_deepspeed_config({"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}, TRAIN, 2, False)


def test_another_optimizer_keeps_its_own_params():
    user = {"optimizer": {"type": "Lamb", "params": {"lr": 0.01}}}
    assert resolve_deepspeed_config(user, TRAIN, 1, True)["optimizer"] == user["optimizer"]


def test_a_scheduler_of_deepspeeds_own_is_refused_naming_the_train_fields():
    with pytest.raises(DaptError, match=r"deepspeed.scheduler: the learning rate follows `train` \(schedule: cosine"):
        resolve_deepspeed_config({"scheduler": {"type": "WarmupLR", "params": {}}}, TRAIN, 2, False)
