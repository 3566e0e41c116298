"""Downstream tasks through lm-evaluation-harness on a model trained in 2 processes: one taught the
mapping gets it right, an untrained one is near chance."""

import json


from dapt.pretrain.tasks import load_task, read_examples, split_examples
from tests.unit.test_tasks import EXAMPLE_TASK, TINY, teach_the_mapping


def test_a_model_taught_the_mapping_gets_it_right_and_an_untrained_one_is_near_chance(built_experiment, tmp_path):
    from transformers import AutoTokenizer

    from dapt.pretrain.config import ModelConfig
    from dapt.pretrain.model import build_model
    from dapt.pretrain.tasks import evaluate_tasks

    task = load_task(EXAMPLE_TASK)
    train, _ = split_examples(task, read_examples(task))
    tokenizer = AutoTokenizer.from_pretrained(built_experiment.tokenizer_dir)
    model = build_model(ModelConfig(config=TINY), tokenizer, seed=0, activation_checkpointing=False)
    scores = {}
    for name, steps in (("untrained", 0), ("taught", 80)):
        teach_the_mapping(model, tokenizer, task, train, steps)
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        results = evaluate_tasks([EXAMPLE_TASK], tmp_path / name, tmp_path / f"run-{name}", shots=2)
        scores[name] = results["tasks"][0]
        assert json.loads((tmp_path / f"run-{name}" / "eval_tasks.json").read_text()) == results
    untrained, taught = scores["untrained"], scores["taught"]
    assert taught["items"] == untrained["items"] > 20 and taught["shots"] == 2
    assert taught["accuracy"] >= 0.9 and taught["macro_f1"] >= 0.9, taught
    # An untrained model has no idea: about the majority label's share at best (three labels).
    assert untrained["accuracy"] <= untrained["chance"] + 0.15 and untrained["macro_f1"] < 0.5, untrained
