"""The step guard on its own: loss spikes are flagged and kept out of the baseline, skips in a row
exhaust it and a good step resets the count (in a run: integration/test_guard_in_a_run.py)."""

import json


from dapt.pretrain.guard import StepGuard


def test_spikes_are_flagged_and_kept_out_of_the_baseline():
    guard = StepGuard(max_in_a_row=3, spike_window=8, spike_threshold=6.0)
    for step in range(20):
        metrics = guard.record(3.0 + 0.01 * (step % 3), applied=True)
    assert "train/loss_spike" not in metrics and guard.spikes == 0
    assert guard.record(5.0, applied=True)["train/loss_spike"] == 5.0
    assert guard.record(5.0, applied=True)["train/loss_spikes"] == 2, "the first spike did not raise the baseline"
    assert "train/loss_spike" not in guard.record(3.01, applied=True)


def test_skips_in_a_row_exhaust_the_guard_and_a_good_step_resets_the_count():
    guard = StepGuard(max_in_a_row=2, spike_window=8, spike_threshold=6.0)
    guard.record(float("nan"), applied=False)
    guard.record(3.0, applied=True)
    guard.record(float("inf"), applied=True)
    assert not guard.exhausted and guard.skipped == 2
    restored = StepGuard(max_in_a_row=2, spike_window=8, spike_threshold=6.0)
    restored.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    assert restored.record(3.0, applied=False)["train/skipped_steps"] == 3
    assert restored.exhausted
    assert "step00000001" in str(restored.stop_error(4, "ckpt/step00000001"))
