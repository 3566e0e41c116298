"""A model carried over to a domain tokenizer, then partitioned by ZeRO-3 in 2 processes: its step-0
held-out BPB is the carry-over's."""

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from dapt.tokenizer.transplant import carry_over
from tests.unit.test_transplant import base_and_domain  # noqa: F401  (the fixture, shared with the unit tests)


def test_zero3_trains_from_the_transplanted_weights(base_and_domain, built_experiment, tmp_path):
    """ZeRO-3 partitions the model after `build_model` carried it over: its step-0 held-out BPB
    equals that of the same transplant done in this process."""
    import yaml

    from dapt.experiment import load_experiment
    from dapt.pretrain.evaluate import evaluate_model_dir
    from tests.helpers import experiment_file, train

    base_dir, _, _, _ = base_and_domain
    path = experiment_file(tmp_path, built_experiment, steps=2)
    config = yaml.safe_load(path.read_text())
    config["model"] = {"path": str(base_dir), "embeddings": "transplant"}
    config["deepspeed"] = {"zero_optimization": {"stage": 3}}
    config["train"].update(checkpoint_every=0)
    path.write_text(yaml.safe_dump(config))
    train(path)
    experiment, _ = load_experiment(path)
    carried = AutoModelForCausalLM.from_pretrained(base_dir)
    carry_over(carried, AutoTokenizer.from_pretrained(base_dir), AutoTokenizer.from_pretrained(experiment.tokenizer_dir))
    carried.save_pretrained(tmp_path / "carried")
    results = json.loads((tmp_path / "results.json").read_text())
    for name, bpb in evaluate_model_dir(experiment, tmp_path / "carried").items():
        assert bpb == pytest.approx(results["corpora"][name]["bpb_before"], rel=1e-4), name
