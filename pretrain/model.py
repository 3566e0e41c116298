"""The model to train: a base model from a Hugging Face folder, or a new one built from a config.

A base model is loaded in the training precision (DeepSpeed keeps the fp32 master weights).
Under ZeRO-3 it is built through DeepSpeed's partitioned initialisation: while transformers'
`HfDeepSpeedConfig` is alive, `from_pretrained` creates each rank's share only and rank 0 alone
reads the weights (memory-mapped), so no rank ever holds the whole model. Carrying a base model
over to another vocabulary needs the whole model: rank 0 does it once and writes the result into
the workdir as a Hugging Face folder, which every rank then loads like any base model, and which
later starts reuse while the base model and both tokenizers are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import torch

from dapt.data_mix.store import tokenizer_hash
from dapt.base import DaptError
from dapt.pretrain.config import ModelConfig
from dapt.pretrain.hf_folder import save_model_folder
from dapt.pretrain.new_rows import fit_new_rows
from dapt.tokenizer.evaluate import load_tokenizer
from dapt.tokenizer.files import copy_tokenizer_files
from dapt.tokenizer.transplant import carry_over

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CARRY_OVER_STAMP = "dapt-carry-over.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def check_model(config: ModelConfig, seq_len: int) -> None:
    """What a base model would fail on only once the ranks run, refused now in one line naming the field."""
    if config.config is not None:
        positions = config.config.get("max_position_embeddings")
        if positions is not None and seq_len > positions:
            raise DaptError(f"mix.seq_len: {seq_len} is more than model.config.max_position_embeddings ({positions}); "
                            f"lower mix.seq_len or raise max_position_embeddings")
        return
    path = Path(config.path)
    gguf = [path] if path.suffix == ".gguf" else sorted(path.glob("*.gguf")) if path.is_dir() else []
    if gguf and not (path / "config.json").exists():
        raise DaptError(f"model.path: {gguf[0]} is a GGUF file, not a Hugging Face folder; convert it with "
                        f"`dapt model import-gguf {gguf[0]} DIR` (needs `pip install gguf`) and set model.path to DIR")
    if not (path / "config.json").is_file():
        raise DaptError(f"model.path: {path} is not a Hugging Face model directory (no config.json)")
    model_config = json.loads((path / "config.json").read_text())
    positions = model_config.get("max_position_embeddings")
    if positions is not None and seq_len > positions:
        raise DaptError(f"mix.seq_len: {seq_len} is more than the model's max_position_embeddings ({positions}, in "
                        f"{path / 'config.json'}); lower mix.seq_len to at most {positions}")
    base_tokenizer = Path(config.base_tokenizer or config.path)
    if config.embeddings is not None and not (base_tokenizer / "tokenizer.json").exists():
        field = "model.base_tokenizer" if config.base_tokenizer else "model.path"
        raise DaptError(f"{field}: {base_tokenizer} has no tokenizer.json, and carrying the model over "
                        f"(model.embeddings: {config.embeddings}) needs the tokenizer it was trained with; set "
                        f"`model.base_tokenizer` to that tokenizer's folder")


def build_model(config: ModelConfig, tokenizer, seed: int, activation_checkpointing: bool, folder: Path | None = None,
                dtype: torch.dtype = torch.float32):
    """A new model from `config.config` (the same weights on every rank: same seed), or the Hugging Face
    model in `folder` (default `config.path`) in `dtype`; PyTorch SDPA attention. Partitioned as it is
    built while a transformers `HfDeepSpeedConfig` for ZeRO-3 is alive."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    if config.config is not None:
        fields = dict(config.config)
        model_type = fields.pop("model_type")
        hf_config = AutoConfig.for_model(
            model_type,
            **fields,
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa", dtype=torch.float32)
    else:
        folder = Path(folder or config.path)
        if config.embeddings is None:
            _check_own_tokenizer(config, tokenizer)
        model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa", dtype=dtype)
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def parameter_count(config: ModelConfig, vocab_size: int | None) -> int:
    """The model's parameters, counted on a model built without memory (PyTorch's meta device);
    `vocab_size` is the experiment's tokenizer's, when known (a carry-over resizes the embeddings)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if config.config is not None:
        fields = dict(config.config)
        hf_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    else:
        hf_config = AutoConfig.from_pretrained(config.path)
    if vocab_size is not None and (config.config is not None or config.embeddings is not None):
        hf_config.vocab_size = vocab_size
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return sum(parameter.numel() for parameter in model.parameters())


def _check_own_tokenizer(config: ModelConfig, tokenizer) -> None:
    """Without a carry-over the experiment's tokenizer must be the one the model was trained with."""
    own = Path(config.base_tokenizer or config.path)
    if (own / "tokenizer.json").exists() and load_tokenizer(own).get_vocab() != tokenizer.get_vocab():
        raise DaptError(f"model.path: {config.path} was trained with another tokenizer than the experiment's; set "
                        f"`model.embeddings: transplant` (or `extend`) to carry it over, or use its own tokenizer")
    rows = json.loads((Path(config.path) / "config.json").read_text()).get("vocab_size")
    if rows is not None and rows < len(tokenizer):
        raise DaptError(f"model.path: the model has {rows} embeddings but the tokenizer has {len(tokenizer)} pieces; use "
                        f"the model's own tokenizer (`tokenizer.path`), or carry the model over to this one with "
                        f"`model.embeddings: transplant` (or `extend`)")


def carried_over_model(config: ModelConfig, tokenizer, fit_windows: torch.Tensor | None = None):
    """The base model, whole and in its stored precision, carried over to `tokenizer` in this process;
    with `fit_windows` (token windows of the training text) its new rows are then fitted on them."""
    from transformers import AutoModelForCausalLM

    base_tokenizer = load_tokenizer(Path(config.base_tokenizer or config.path))
    model = AutoModelForCausalLM.from_pretrained(config.path, attn_implementation="sdpa", dtype="auto")
    plan = carry_over(model, base_tokenizer, tokenizer)
    print(plan.summary(), flush=True)
    if fit_windows is not None and len(fit_windows) and plan.averaged:
        first, last = fit_new_rows(model, plan.averaged, fit_windows)
        print(f"embeddings: {len(plan.averaged):,} new rows fitted on {len(fit_windows):,} windows of the training "
              f"text (model.fit_new_rows), loss {first:.3f} → {last:.3f}", flush=True)
    return model


def write_carried_over(config: ModelConfig, tokenizer_dir: Path, out_dir: Path,
                       fit_windows: torch.Tensor | None = None) -> Path:
    """The base model carried over to the experiment's tokenizer, as a Hugging Face folder with that
    tokenizer: written once (by one process), kept while the base model, both tokenizers and the
    fitting windows are unchanged."""
    stamp = carry_over_stamp(config, tokenizer_dir, fit_windows)
    if carried_over_matches(out_dir, stamp):
        print(f"embeddings: carried-over base model up to date in {out_dir}", flush=True)
        return out_dir
    model = carried_over_model(config, load_tokenizer(tokenizer_dir), fit_windows)
    # Written beside, under a name of this process's own, and renamed last: a killed start never leaves a
    # folder that looks complete, and two processes writing the same folder at once do not mix their files.
    temporary = out_dir.with_name(f"{out_dir.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    save_model_folder(model, temporary)
    del model
    copy_tokenizer_files(tokenizer_dir, temporary)
    (temporary / CARRY_OVER_STAMP).write_text(json.dumps(stamp, indent=1))
    shutil.rmtree(out_dir, ignore_errors=True)
    try:
        temporary.rename(out_dir)
    except OSError:
        if not carried_over_matches(out_dir, stamp):
            raise
        shutil.rmtree(temporary)  # another process wrote the same folder first
    print(f"embeddings: base model carried over ({config.embeddings}) into {out_dir}", flush=True)
    return out_dir


def carried_over_matches(out_dir: Path, stamp: dict) -> bool:
    """Whether `out_dir` holds the carried-over model `stamp` describes."""
    return (out_dir / CARRY_OVER_STAMP).exists() and json.loads((out_dir / CARRY_OVER_STAMP).read_text()) == stamp


def carry_over_stamp(config: ModelConfig, tokenizer_dir: Path, fit_windows: torch.Tensor | None) -> dict:
    """What the carried-over folder depends on: the base model, both tokenizers and the windows its new
    rows are fitted on."""
    stamp = _carry_over_stamp(config, tokenizer_dir)
    if fit_windows is not None:
        stamp["fit_windows"] = hashlib.sha256(fit_windows.numpy().tobytes()).hexdigest()
    return stamp


def _carry_over_stamp(config: ModelConfig, tokenizer_dir: Path) -> dict:
    """The base model and both tokenizers. Weight files are known by name, size and modification time
    rather than read through (a 7B model is 14 GB), as build tools know their inputs."""
    base = Path(config.path)
    weights = sorted([p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in base.iterdir()
                     if p.name.endswith(WEIGHT_SUFFIXES) or p.name.endswith(".index.json"))
    return {
        "embeddings": config.embeddings,
        "base_config": hashlib.sha256((base / "config.json").read_bytes()).hexdigest(),
        "base_weights": weights,
        "base_tokenizer": tokenizer_hash(Path(config.base_tokenizer or config.path)),
        "tokenizer": tokenizer_hash(tokenizer_dir),
    }
