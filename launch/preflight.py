"""The checks every command that starts training runs first, before a rank or an sbatch starts.

A job that can only fail should fail here, in one line per problem naming the field or
file and the command that fixes it, not as a traceback on every rank after torchrun (or
the Slurm queue) has started it: the tokenizer, the token stores against their
manifests and sources, the model folder, W&B when it is online, and the free disk space
a checkpoint needs.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from dapt.base import DaptError, disk_size
from dapt.data_mix.build import BuildRequest
from dapt.data_mix.store import tokenizer_hash
from dapt.experiment import Experiment
from dapt.pretrain.carry_over import carry_over_problem
from dapt.pretrain.checkpoint import checkpoint_bytes, latest_meta, latest_tag
from dapt.pretrain.checkpointer import branch_meta
from dapt.pretrain.model import check_model, parameter_count
from dapt.pretrain.resume_settings import allowed_changes, check_resume_settings
from dapt.pretrain.tracking import online_problem

# Set for the processes a dapt launcher starts, whose launcher has run the checks.
CHECKED = "DAPT_PREFLIGHT_DONE"
WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def preflight(experiment: Experiment, config: Path, resume: bool = True, wandb: bool = True,
              carried_over: bool = False) -> None:
    """Every problem that would stop the job once started, reported together; `wandb`: also
    try the W&B server when the run logs online (only one process of a job needs to);
    `carried_over`: the base model must have been carried over already (on a rank: a launcher
    does it before starting the ranks)."""
    problems = [*_tokenizer_and_stores(experiment, config), *_model(experiment), _disk(experiment),
                _resume(experiment, config) if resume else None]
    if wandb and experiment.wandb.mode == "online":
        problems.append(online_problem())
    problems = [problem for problem in problems if problem]
    if carried_over and not problems:  # the carry-over is judged against the stores and the tokenizer
        problems = [problem for problem in [carry_over_problem(experiment, config)] if problem]
    if problems:
        raise DaptError(f"{config}: the job would fail, so nothing was started:\n  " + "\n  ".join(problems))


def _tokenizer_and_stores(experiment: Experiment, config: Path) -> list[str]:
    try:
        tokenizer_hash(experiment.tokenizer_dir)
    except DaptError:
        return [f"no tokenizer at {experiment.tokenizer_dir}: run `dapt tokenizer train {config}` "
                f"(or set `tokenizer.path` to a tokenizer folder)"]
    problems = []
    request = BuildRequest.of(experiment)
    for corpus in experiment.corpora:
        stale = request.staleness(corpus)
        if stale:
            problems.append(f"token store of corpus '{corpus.name}' ({experiment.stores_dir / corpus.name}): {stale}; "
                            f"run `dapt data build {config}`")
    return problems


def _model(experiment: Experiment) -> list[str]:
    try:
        check_model(experiment.model, experiment.mix.seq_len)
    except DaptError as err:
        return [str(err)]
    return []


def _resume(experiment: Experiment, config: Path) -> str | None:
    """A resume under settings the checkpoint cannot take, or a branch from a checkpoint it cannot start from."""
    meta = latest_meta(experiment.checkpoints_dir)
    checkpoint, branch = (experiment.checkpoints_dir / str(latest_tag(experiment.checkpoints_dir))), False
    try:
        if meta is None and experiment.train.branch_from is not None:
            checkpoint, branch = Path(experiment.train.branch_from), True
            meta = branch_meta(checkpoint, experiment.train)
        if meta and "experiment_yaml" in meta:
            check_resume_settings(meta["experiment_yaml"], config.read_text(encoding="utf-8"), str(checkpoint),
                                  allowed_changes(), branch=branch)
    except DaptError as err:
        return str(err)
    return None


def _disk(experiment: Experiment) -> str | None:
    """Room for one more checkpoint where checkpoints go (the newest is written before old ones are removed)."""
    from dapt.tokenizer.evaluate import load_tokenizer

    folder = experiment.checkpoints_dir
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    free = shutil.disk_usage(existing).free
    vocab = len(load_tokenizer(experiment.tokenizer_dir)) if (experiment.tokenizer_dir / "tokenizer.json").exists() else None
    parameters = parameter_count(experiment.model, vocab)
    needed = checkpoint_bytes(parameters, WEIGHT_BYTES[experiment.train.precision])
    if free < needed:
        return (f"workdir: {disk_size(free)} free on the disk of {existing}, and one checkpoint of this model "
                f"({parameters / 1e6:,.0f}M parameters, {experiment.train.precision} weights and Adam's fp32 state) "
                f"takes about {disk_size(needed)}; free space there or set `workdir` to a larger disk")
    return None


def checked_by_launcher() -> bool:
    """Whether a dapt launcher ran the checks before starting this process."""
    return os.environ.get(CHECKED) == "1"
