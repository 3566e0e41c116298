"""Batch-size warmup in a real 2-process DeepSpeed run: the step grows through
DeepSpeed's own gradient accumulation and consumes exactly the planned samples."""

import json

import yaml

from tests.helpers import experiment_file, losses, train


def test_batch_warmup_grows_the_batch_through_gradient_accumulation(tmp_path, built_experiment):
    path = experiment_file(tmp_path, built_experiment, steps=6)
    config = yaml.safe_load(path.read_text())
    config["deepspeed"] = {"zero_optimization": {"stage": 2}}
    config["train"].update(checkpoint_every=0, batch_warmup={"start_batch_size": 4, "steps": 3})
    path.write_text(yaml.safe_dump(config))
    train(path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/batch_size"] for r in records if "train/batch_size" in r] == [4, 4, 4, 8, 8, 8]
    results = json.loads((tmp_path / "results.json").read_text())
    tokens = sum(row["tokens_seen"] for row in results["corpora"].values())
    assert tokens == (3 * 4 + 3 * 8) * config["mix"]["seq_len"]
    assert len(losses(tmp_path)) == 6
