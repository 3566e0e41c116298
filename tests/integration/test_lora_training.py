"""LoRA through peft under ZeRO 0, 2 and 3 in 2 processes: only the adapters train, the export is the
base model with them merged in (a plain folder) or peft's adapter folder, and both load with the
usual classes and compute the same logits as the trained model."""

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from dapt.experiment import load_experiment
from tests.helpers import base_folder, dapt_here, experiment_file, saved_weights, train_together


STAGES = (0, 2, 3)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, built_experiment) -> dict:
    """A tiny base folder, and per ZeRO stage 3 steps training LoRA adapters on it, in one pair of ranks."""
    root = tmp_path_factory.mktemp("lora")
    base = base_folder(root / "base", built_experiment.tokenizer_dir, tied=True, sharded=False)
    paths = {}
    for stage in STAGES:
        (root / f"zero{stage}").mkdir()
        path = experiment_file(root / f"zero{stage}", built_experiment, steps=3)
        config = yaml.safe_load(path.read_text())
        config["model"] = {"path": str(base)}
        config["tokenizer"] = {"path": str(base)}
        config["deepspeed"] = {"zero_optimization": {"stage": stage}}
        config["train"].update(checkpoint_every=0, lr=1e-2, lora={"r": 4, "alpha": 8, "dropout": 0.0})
        path.write_text(yaml.safe_dump(config))
        paths[stage] = path
    train_together(list(paths.values()))
    return base, paths


@pytest.mark.parametrize("stage", STAGES)
def test_lora_trains_the_adapters_alone_and_exports_merged_or_as_adapters(runs, stage):
    from peft import AutoPeftModelForCausalLM, PeftModel

    base, path = runs[0], runs[1][stage]
    experiment, _ = load_experiment(path)

    merged, adapter = path.parent / "merged", path.parent / "adapter"
    for out, extra in ((merged, []), (adapter, ["--lora", "adapter"])):
        exported = dapt_here("export", str(experiment.checkpoints_dir), str(out), *extra)
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
