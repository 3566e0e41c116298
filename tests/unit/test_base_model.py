"""A base model given as a Hugging Face folder that holds its weights and its tokenizer together: what
it can get wrong is refused before any process starts, in one line naming the field (its training
is in integration/test_base_model_training.py)."""

import glob
import json

from transformers import AutoModelForCausalLM

from dapt.experiment import load_experiment
from tests.conftest import write_experiment
from tests.helpers import assert_one_line_error, base_folder, dapt_here, TINY
from dapt.tokenizer.files import copy_tokenizer_files


def test_checks_a_base_model_needs_before_anything_starts(tmp_path, built_experiment):
    base = base_folder(tmp_path / "base", built_experiment.tokenizer_dir, tied=True, sharded=False)
    run = tmp_path / "run"
    run.mkdir()

    def refused(model: dict, pattern: str, seq_len: int = 32, tokenizer: dict | None = None, command="train") -> None:
        path = write_experiment(run, {"workdir": str(run), "model": model, "mix": {"seq_len": seq_len},
                                      "tokenizer": tokenizer or {"path": str(base)}})
        args = ("launch", "local", str(path)) if command == "launch" else (command, str(path))
        assert_one_line_error(dapt_here(*args), pattern)

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
    assert_one_line_error(dapt_here("tokenizer", "train", str(path)),
                          f"tokenizer.path: {weights_only} holds a model (config.json) but has no tokenizer.json")
    # a tokenizer without an end-of-sequence token
    no_eos = tmp_path / "no-eos"
    copy_tokenizer_files(base, no_eos)
    settings = json.loads((no_eos / "tokenizer_config.json").read_text())
    settings.pop("eos_token")
    (no_eos / "tokenizer_config.json").write_text(json.dumps(settings))
    path = write_experiment(run, {"workdir": str(run), "model": {"config": TINY}, "mix": {"seq_len": 32},
                                  "tokenizer": {"path": str(no_eos)}})
    assert_one_line_error(dapt_here("tokenizer", "train", str(path)),
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
    assert_one_line_error(dapt_here("demo", "--workdir", str(tmp_path / "demo2"), "--base-model", str(tmp_path)),
                          f"--base-model: {tmp_path} is not a Hugging Face model folder (no config.json)")
    assert not (tmp_path / "demo2").exists()  # refused before anything is written


def test_import_gguf_refuses_what_is_not_a_gguf_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert_one_line_error(dapt_here("model", "import-gguf", str(tmp_path / "model.safetensors"), str(tmp_path / "out")),
                          f"{tmp_path / 'model.safetensors'} is not a .gguf file")
