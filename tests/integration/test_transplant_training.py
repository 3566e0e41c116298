"""A model carried over to a domain tokenizer, then partitioned by ZeRO-3 in 2 processes: the carry-over
is a stage before the ranks start, so however long it takes no rank waits for it, and the ranks'
step-0 held-out BPB is the carried-over folder's."""

import json
import time

import pytest
import yaml

from tests.unit.test_transplant import base_and_domain  # noqa: F401  (the fixture, shared with the unit tests)



def test_a_carry_over_longer_than_the_process_group_timeout_still_reaches_step_1(base_and_domain, built_experiment,
                                                                                   tmp_path):
    """Rank 0 once carried the model over while the others waited at a barrier, bounded by the process
    group's timeout: a fit longer than it killed every rank before step 1. Now `dapt model carry-over`
    runs first, and ZeRO-3 partitions what it wrote."""
    from dapt.experiment import load_experiment
    from dapt.pretrain.carry_over import carry_over_problem
    from dapt.pretrain.evaluate import evaluate_model_dir
    from dapt.pretrain.peers import STALL_MARGIN_S
    from tests.helpers import dapt, experiment_file, train

    base_dir, _, _, _ = base_and_domain
    path = experiment_file(tmp_path, built_experiment, steps=2)
    config = yaml.safe_load(path.read_text())
    config["model"] = {"path": str(base_dir), "embeddings": "transplant", "fit_new_rows": 1500}
    config["deepspeed"] = {"zero_optimization": {"stage": 3}}
    config["train"].update(checkpoint_every=0)
    path.write_text(yaml.safe_dump(config))
    experiment, _ = load_experiment(path)
    assert "run `dapt model carry-over" in carry_over_problem(experiment, path)  # what `dapt train` ranks would say

    started = time.perf_counter()
    result = dapt("model", "carry-over", str(path))
    carry_over_seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fitting new rows, step 1500/1500" in result.stdout  # its progress, in a log: a line every tenth
    assert carry_over_problem(experiment, path) is None

    # The process group's timeout, shorter than the carry-over took (however fast this machine is).
    timeout_s = max(1.2, (carry_over_seconds - STALL_MARGIN_S) / 2)
    assert timeout_s + STALL_MARGIN_S < carry_over_seconds
    config["train"]["dist_timeout_minutes"] = timeout_s / 60
    path.write_text(yaml.safe_dump(config))
    output = train(path).stdout
    assert "step 1/2" in output
    results = json.loads((tmp_path / "results.json").read_text())
    for name, bpb in evaluate_model_dir(experiment, experiment.carried_over_dir).items():
        assert bpb == pytest.approx(results["corpora"][name]["bpb_before"], rel=1e-4), name
