"""Continued pretraining of a base model given as a Hugging Face folder that holds its weights and
its tokenizer together, in 2 processes: the export is the trained model (not the base weights),
whatever the head, the ZeRO stage or the sharding of the base."""

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from dapt.experiment import load_experiment
from tests.helpers import base_folder, CHAT_TEMPLATE, dapt_here, experiment_file, saved_weights, train_together


CASES = {"tied-zero2": (True, 2, False), "untied-zero3-sharded": (False, 3, True), "tied-zero3-sharded": (True, 3, True)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, built_experiment) -> dict:
    """Each case's base folder and experiment file, every run trained in one pair of ranks."""
    root, runs = tmp_path_factory.mktemp("base_model"), {}
    for name, (tied, stage, sharded) in CASES.items():
        base = base_folder(root / name / "base", built_experiment.tokenizer_dir, tied, sharded)
        (root / name / "run").mkdir()
        path = experiment_file(root / name / "run", built_experiment, steps=4)
        config = yaml.safe_load(path.read_text())
        config["model"] = {"path": str(base)}
        config["tokenizer"] = {"path": str(base)}  # the model's own tokenizer, beside its weights
        config["deepspeed"] = {"zero_optimization": {"stage": stage}}
        config["train"].update(checkpoint_every=0, lr=1e-2)
        path.write_text(yaml.safe_dump(config))
        runs[name] = base, path
    train_together([path for _, path in runs.values()])
    return runs


@pytest.mark.parametrize("case", CASES)
def test_the_export_is_the_trained_model_not_the_base(runs, case):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tied, _, sharded = CASES[case]
    base, path = runs[case]
    assert sharded == (base / "model.safetensors.index.json").exists()
    experiment, _ = load_experiment(path)
    checkpoints = experiment.checkpoints_dir
    # Only the tokenizer's files were copied beside the checkpoints, never the base model's weights or config.
    assert sorted(p.name for p in (checkpoints / "tokenizer").iterdir()) == sorted(
        ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "sentencepiece.model"])

    out = path.parent / "export"
    exported = dapt_here("export", str(checkpoints), str(out))
    assert exported.returncode == 0, exported.stderr[-2000:]
    weights = saved_weights(out)
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints))
    base_weights = saved_weights(base)
    assert set(weights) == set(base_weights)
    for key, value in weights.items():
        assert torch.equal(value, consolidated[key]), key  # exactly the trained weights, in fp32
    changed = [key for key in weights if not torch.equal(weights[key], base_weights[key])]
    assert len(changed) == len(weights), f"unchanged by training: {sorted(set(weights) - set(changed))}"
    assert (out / "generation_config.json").read_bytes() == (base / "generation_config.json").read_bytes()
    assert (out / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.generation_config.max_new_tokens == 17
    assert loaded.config.tie_word_embeddings == tied
    assert AutoTokenizer.from_pretrained(out).chat_template == CHAT_TEMPLATE
