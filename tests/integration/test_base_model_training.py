"""Continued pretraining of a base model given as a Hugging Face folder that holds its weights and
its tokenizer together, in 2 processes: the export is the trained model (not the base weights),
whatever the head, the ZeRO stage or the sharding of the base."""

import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from dapt.experiment import load_experiment
from tests.helpers import experiment_file, train
from tests.helpers import CHAT_TEMPLATE, base_folder, saved_weights


@pytest.mark.parametrize("tied, stage, sharded", [(True, 2, False), (False, 3, True), (True, 3, True)],
                         ids=["tied-zero2", "untied-zero3-sharded", "tied-zero3-sharded"])
def test_the_export_is_the_trained_model_not_the_base(tmp_path, built_experiment, tied, stage, sharded):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    base = base_folder(tmp_path / "base", built_experiment.tokenizer_dir, tied, sharded)
    assert sharded == (base / "model.safetensors.index.json").exists()
    (tmp_path / "run").mkdir()
    path = experiment_file(tmp_path / "run", built_experiment, steps=4)
    config = yaml.safe_load(path.read_text())
    config["model"] = {"path": str(base)}
    config["tokenizer"] = {"path": str(base)}  # the model's own tokenizer, beside its weights
    config["deepspeed"] = {"zero_optimization": {"stage": stage}}
    config["train"].update(checkpoint_every=0, lr=1e-2)
    path.write_text(yaml.safe_dump(config))
    train(path)
    experiment, _ = load_experiment(path)
    checkpoints = experiment.checkpoints_dir
    # Only the tokenizer's files were copied beside the checkpoints, never the base model's weights or config.
    assert sorted(p.name for p in (checkpoints / "tokenizer").iterdir()) == sorted(
        ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "sentencepiece.model"])

    out = tmp_path / "export"
    exported = subprocess.run([sys.executable, "-m", "dapt", "export", str(checkpoints), str(out)],
                              capture_output=True, text=True)
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
