"""Helpers that test modules of every tier share: the `dapt` command as a user runs it, and a tiny
model trained in 2 processes on the session's tokenizer and stores (see `conftest.py`)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from dapt.launch.local import torchrun_command
from dapt.tokenizer.files import copy_tokenizer_files
from tests.conftest import reusing, write_experiment

# A Llama small enough that a step costs milliseconds: the runs test the machinery, not the model.
TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64}


def dapt(*args, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """The `dapt` command in a process of its own, its output captured."""
    return subprocess.run([sys.executable, "-m", "dapt", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})}, **kwargs)


def dapt_here(*args: str) -> subprocess.CompletedProcess:
    """The `dapt` command run in this process, what it printed captured as `dapt` above: for checks of
    what a command does or says, where a process of its own would only spend seconds importing torch
    again (tests/unit/test_cli.py holds the command's own process to the same one-line errors)."""
    from dapt.launch.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(args))
    return subprocess.CompletedProcess(["dapt", *args], status, out.getvalue(), err.getvalue())


def assert_one_line_error(result: subprocess.CompletedProcess, pattern: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert pattern in lines[0], lines[0]


def experiment_file(folder, built_experiment, steps: int, wandb: str = "disabled"):
    """A tiny training run on the session's stores (tokenizer and stores shared, not rebuilt). W&B is
    left out (seconds a run to start its service and flush) unless the test reads it: `wandb="offline"`."""
    config = {
        "workdir": str(folder),
        **reusing(built_experiment),
        "model": {"config": TINY},
        "mix": {"seq_len": 32, "group_weights": {"financial": 0.5, "public": 0.5}},
        "train": {"steps": steps, "global_batch_size": 8, "micro_batch_size": 2, "lr": 1e-3, "warmup_steps": 0,
                  "precision": "fp32", "checkpoint_every": 3, "eval_max_tokens": 500, "log_every": 1},
        "wandb": {"project": "dapt-tests", "mode": wandb},
    }
    return write_experiment(folder, config)


def train(path, *extra) -> subprocess.CompletedProcess:
    """`dapt train` on 2 ranks under torchrun, as `dapt launch local` starts it."""
    result = subprocess.run(torchrun_command(path, 2) + list(extra), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def train_together(paths: list) -> subprocess.CompletedProcess:
    """`dapt train` of several experiments one after another on the same 2 ranks, as `dapt sweep` runs
    its proxy runs: process start, imports and the process group are paid once, and each run is
    what it would be alone (its own seed, data order, engine and checkpoints)."""
    return train(paths[0], *map(str, paths[1:]))


def losses(workdir, metric: str = "train/loss") -> dict[int, float]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if metric in r]
    assert len(steps) == len(set(steps)), "no step is recorded twice"
    return {r["step"]: r[metric] for r in records if metric in r}


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


def base_cut_of(base, extended, text: str) -> list[int]:
    """The extended tokenizer's tokens of `text`, each new piece replaced by the base's tokens of its
    text: the base's own tokens of `text` when the new pieces only join what the base cut."""
    encoding = extended(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = []
    for token, (start, end) in zip(encoding["input_ids"], encoding["offset_mapping"]):
        ids += [token] if token < len(base) else base(text[start:end], add_special_tokens=False)["input_ids"]
    return ids
