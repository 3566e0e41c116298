"""The learning rate of every step: the formulas (lr_schedule.py), the scheduler DeepSpeed drives
with them, and the settings of warmup-stable-decay."""

import math

import pytest
import torch
from pydantic import ValidationError

from dapt.pretrain.config import TrainConfig
from dapt.pretrain.lr_schedule import LearningRateSchedule, lr_at, lr_curve

BASE = dict(steps=100, global_batch_size=8, micro_batch_size=2, lr=1e-3, min_lr_ratio=0.1)


def schedule(**settings) -> TrainConfig:
    return TrainConfig(**(BASE | settings))


@pytest.mark.parametrize("name", ["cosine", "linear", "constant", "wsd"])
def test_warmup_rises_from_its_start_and_no_warmup_starts_at_the_peak(name):
    rewarmed = lr_curve(schedule(schedule=name, warmup_steps=10, warmup_start_lr=2e-4))
    assert rewarmed[0] == 2e-4 and rewarmed[5] == pytest.approx(2e-4 + 0.5 * 8e-4) and rewarmed[10] == 1e-3
    assert lr_curve(schedule(schedule=name))[0] == 1e-3


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_a_decay_over_the_run_falls_from_the_peak_towards_the_floor(name):
    rates = lr_curve(schedule(schedule=name, warmup_steps=10))
    assert all(later <= earlier for earlier, later in zip(rates[10:], rates[11:]))
    assert rates[55] == pytest.approx(1e-4 + (1e-3 - 1e-4) * 0.5), "both halfway down at p = 0.5 (step 56)"
    assert 1e-4 < rates[-1] < 1.1e-4


@pytest.mark.parametrize("shape, rate_at_half", [("linear", 0.5), ("cosine", 0.5), ("1-sqrt", 1 - math.sqrt(0.5))])
def test_warmup_stable_decay_holds_the_peak_then_decays_in_its_shape(shape, rate_at_half):
    train = schedule(schedule="wsd", warmup_steps=5, decay_steps=20, decay_shape=shape, min_lr_ratio=0.0)
    assert train.decay_start == 80
    rates = lr_curve(train)
    assert set(rates[5:81]) == {1e-3}, "constant from the end of warmup to the decay's first step"
    assert rates[90] == pytest.approx(1e-3 * rate_at_half), "step 91: p = 10 / 20"
    assert all(later < earlier for earlier, later in zip(rates[80:], rates[81:]))
    assert schedule(schedule="wsd").decay_start == 80, "default: the last fifth decays"


@pytest.mark.parametrize("name", ["cosine", "linear", "constant", "wsd"])
def test_the_formulas_are_the_ones_transformers_schedulers_run(name):
    """Where transformers has the schedule (warmup from 0; its warmup-stable-decay warms from the floor,
    so with floor 0), dapt's rate is its rate at every step."""
    from transformers import optimization

    train = schedule(schedule=name, warmup_steps=10, min_lr_ratio=0.0 if name in ("linear", "wsd") else 0.1,
                     **({"decay_steps": 30, "decay_shape": "1-sqrt"} if name == "wsd" else {}))
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=train.lr)
    theirs = {
        "cosine": lambda: optimization.get_cosine_with_min_lr_schedule_with_warmup(optimizer, 10, 100, min_lr_rate=0.1),
        "linear": lambda: optimization.get_linear_schedule_with_warmup(optimizer, 10, 100),
        "constant": lambda: optimization.get_constant_schedule_with_warmup(optimizer, 10),
        "wsd": lambda: optimization.get_wsd_schedule(optimizer, 10, 30, num_training_steps=100, decay_type="1-sqrt"),
    }[name]()
    rates = []
    for _ in range(100):
        rates.append(theirs.get_last_lr()[0])
        optimizer.step()
        theirs.step()
    assert lr_curve(train) == pytest.approx(rates, abs=1e-12)


def test_the_scheduler_deepspeed_steps_runs_the_formula_and_resumes_from_its_state():
    train = schedule(schedule="wsd", warmup_steps=3, decay_steps=10, warmup_start_lr=1e-4)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=train.lr)
    scheduler = LearningRateSchedule(optimizer, train)
    scheduler.step(0)  # as the trainer starts it: step 1 trains at iteration 0
    seen = []
    for _ in range(95):
        seen.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
    assert seen == [lr_at(train, i) for i in range(95)]
    # A resume (or a branch): a fresh scheduler given the checkpoint's state goes on where it stood.
    resumed_optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=train.lr)
    resumed = LearningRateSchedule(resumed_optimizer, train)
    resumed.step(0)
    resumed.load_state_dict(scheduler.state_dict())
    assert resumed_optimizer.param_groups[0]["lr"] == lr_at(train, 95) == resumed.get_last_lr()[0]


@pytest.mark.parametrize("settings, message", [
    (dict(decay_steps=10), "decay_steps is a setting of `schedule: wsd`"),
    (dict(schedule="wsd", warmup_steps=50, decay_steps=60), r"leave fewer steps before the decay \(40\) than warmup_steps"),
    (dict(warmup_start_lr=0.01), r"warmup_start_lr \(0.01\) is above lr"),
])
def test_schedule_settings_that_cannot_hold_are_refused(settings, message):
    with pytest.raises(ValidationError, match=message):
        schedule(**settings)
