"""LoRA through peft under ZeRO 0, 2 and 3 in 2 processes: only the adapters train, the export is the
base model with them merged in (a plain folder) or peft's adapter folder, and both load with the
usual classes and compute the same logits as the trained model."""

import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from dapt.experiment import load_experiment
from tests.helpers import base_folder, saved_weights
from tests.helpers import experiment_file, train


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_lora_trains_the_adapters_alone_and_exports_merged_or_as_adapters(tmp_path, built_experiment, stage):
    from peft import AutoPeftModelForCausalLM, PeftModel

    base = base_folder(tmp_path / "base", built_experiment.tokenizer_dir, tied=True, sharded=False)
    (tmp_path / "run").mkdir()
    path = experiment_file(tmp_path / "run", built_experiment, steps=3)
    config = yaml.safe_load(path.read_text())
    config["model"] = {"path": str(base)}
    config["tokenizer"] = {"path": str(base)}
    config["deepspeed"] = {"zero_optimization": {"stage": stage}}
    config["train"].update(checkpoint_every=0, lr=1e-2, lora={"r": 4, "alpha": 8, "dropout": 0.0})
    path.write_text(yaml.safe_dump(config))
    train(path)
    experiment, _ = load_experiment(path)

    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    for out, extra in ((merged, []), (adapter, ["--lora", "adapter"])):
        exported = subprocess.run([sys.executable, "-m", "dapt", "export", str(experiment.checkpoints_dir), str(out),
                                   *extra], capture_output=True, text=True)
        assert exported.returncode == 0, exported.stderr[-2000:]
    base_weights, merged_weights = saved_weights(base), saved_weights(merged)
    assert set(merged_weights) == set(base_weights)  # a plain folder: no adapter keys left
    changed = {key for key in base_weights if not torch.equal(base_weights[key], merged_weights[key])}
    assert changed and all(key.endswith("proj.weight") for key in changed), sorted(changed)  # adapted layers only
    assert sorted(p.name for p in adapter.iterdir() if p.suffix in (".json", ".safetensors")) == sorted(
        ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"])

    tokens = torch.randint(0, 500, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(merged)(tokens).logits
        on_base = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)(tokens).logits
        auto = AutoPeftModelForCausalLM.from_pretrained(adapter)(tokens).logits  # finds the base from the adapter
        untrained = AutoModelForCausalLM.from_pretrained(base)(tokens).logits
    torch.testing.assert_close(on_base, plain, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(auto, plain, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(untrained, plain, atol=1e-3)
