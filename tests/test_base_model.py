"""Continued pretraining of a base model given as a Hugging Face folder that holds its weights and
its tokenizer together: the export is the trained model (not the base weights), whatever the
head, the ZeRO stage or the sharding of the base; and what a base model can get wrong is refused
before any process starts, in one line naming the field."""

import glob
import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from dapt.experiment import load_experiment
from tests.conftest import write_experiment
from tests.test_cli import assert_one_line_error, dapt
from tests.test_resume import TINY, experiment_file, train
from dapt.tokenizer.files import copy_tokenizer_files

CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


def base_folder(folder, tokenizer_dir, tied: bool, sharded: bool):
    """A tiny Llama saved as hub models are: weights (sharded or not), config, a generation config of
    its own, and its tokenizer with a chat template, all in one folder."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    fields = {key: value for key, value in TINY.items() if key != "model_type"}
    config = AutoConfig.for_model("llama", **fields, tie_word_embeddings=tied, vocab_size=len(tokenizer),
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.max_new_tokens = 17
    model.generation_config.repetition_penalty = 1.3
    model.save_pretrained(folder, max_shard_size="40KB" if sharded else "5GB")
    copy_tokenizer_files(tokenizer_dir, folder)  # the same tokenizer.json, so the session's stores fit it
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return folder


def saved_weights(folder) -> dict[str, torch.Tensor]:
    weights = {}
    for path in sorted(folder.glob("*.safetensors")):
        weights |= load_file(path)
    return weights


@pytest.mark.slow
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


def test_checks_a_base_model_needs_before_anything_starts(tmp_path, built_experiment):
    base = base_folder(tmp_path / "base", built_experiment.tokenizer_dir, tied=True, sharded=False)
    run = tmp_path / "run"
    run.mkdir()

    def refused(model: dict, pattern: str, seq_len: int = 32, tokenizer: dict | None = None, command="train") -> None:
        path = write_experiment(run, {"workdir": str(run), "model": model, "mix": {"seq_len": seq_len},
                                      "tokenizer": tokenizer or {"path": str(base)}})
        args = ("launch", "local", str(path)) if command == "launch" else (command, str(path))
        assert_one_line_error(dapt(*args), pattern)

    # TINY's max_position_embeddings is 64.
    refused({"path": str(base)}, "mix.seq_len: 128 is more than the model's max_position_embeddings (64, in", seq_len=128)
    refused({"path": str(base)}, "mix.seq_len: 128 is more than the model's max_position_embeddings", 128, command="run")
    refused({"path": str(base)}, "mix.seq_len: 128 is more than the model's max_position_embeddings", 128, command="launch")
    refused({"config": TINY}, "mix.seq_len: 128 is more than model.config.max_position_embeddings (64)", seq_len=128)
    gguf = tmp_path / "model.Q4_0.gguf"
    gguf.write_bytes(b"GGUF")
    refused({"path": str(gguf)}, f"model.path: {gguf} is a GGUF file, not a Hugging Face folder; convert it with "
                                 f"`dapt model import-gguf {gguf} DIR`")
    weights_only = tmp_path / "weights-only"
    AutoModelForCausalLM.from_pretrained(base).save_pretrained(weights_only)
    refused({"path": str(weights_only), "embeddings": "transplant"},
            f"model.path: {weights_only} has no tokenizer.json, and carrying the model over (model.embeddings: "
            f"transplant) needs the tokenizer it was trained with; set `model.base_tokenizer`")
    # tokenizer.path pointing at a model folder that lacks its tokenizer
    path = write_experiment(run, {"workdir": str(run), "model": {"path": str(weights_only)},
                                  "mix": {"seq_len": 32}, "tokenizer": {"path": str(weights_only)}})
    assert_one_line_error(dapt("tokenizer", "train", str(path)),
                          f"tokenizer.path: {weights_only} holds a model (config.json) but has no tokenizer.json")
    # a tokenizer without an end-of-sequence token
    no_eos = tmp_path / "no-eos"
    copy_tokenizer_files(base, no_eos)
    settings = json.loads((no_eos / "tokenizer_config.json").read_text())
    settings.pop("eos_token")
    (no_eos / "tokenizer_config.json").write_text(json.dumps(settings))
    path = write_experiment(run, {"workdir": str(run), "model": {"config": TINY}, "mix": {"seq_len": 32},
                                  "tokenizer": {"path": str(no_eos)}})
    assert_one_line_error(dapt("tokenizer", "train", str(path)),
                          f"tokenizer.path: {no_eos} has no end-of-sequence token, which is put between documents; "
                          f"set `eos_token` in its tokenizer_config.json")


def test_the_demo_on_a_base_model_links_it_and_uses_its_own_tokenizer(tmp_path, built_experiment):
    from dapt.launch.demo import prepare_demo

    base = base_folder(tmp_path / "base", built_experiment.tokenizer_dir, tied=True, sharded=False)
    config = prepare_demo(tmp_path / "demo", base)
    experiment, _ = load_experiment(config)
    assert (tmp_path / "demo" / "base-model").resolve() == base.resolve()
    assert experiment.model.path == experiment.tokenizer.path == str(tmp_path / "demo" / "base-model")
    assert experiment.model.embeddings is None and experiment.model.config is None
    tuning, _ = load_experiment(tmp_path / "demo" / "tuning.yaml")  # tuning that model beside it, paths in place
    assert tuning.model.path == experiment.model.path and tuning.train.lora is not None
    assert all(glob.glob(corpus.paths[0]) for corpus in tuning.corpora)
    assert {corpus.name for corpus in tuning.corpora} == {"sentiment", "web"}
    assert_one_line_error(dapt("demo", "--workdir", str(tmp_path / "demo2"), "--base-model", str(tmp_path)),
                          f"--base-model: {tmp_path} is not a Hugging Face model folder (no config.json)")
    assert not (tmp_path / "demo2").exists()  # refused before anything is written


def test_import_gguf_refuses_what_is_not_a_gguf_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert_one_line_error(dapt("model", "import-gguf", str(tmp_path / "model.safetensors"), str(tmp_path / "out")),
                          f"{tmp_path / 'model.safetensors'} is not a .gguf file")
