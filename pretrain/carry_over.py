"""The carry-over stage (`model.embeddings`): the base model carried over to the experiment's
tokenizer, its new rows fitted (`model.fit_new_rows`) and the base model's own held-out BPB
measured, in one process before any rank starts. `dapt model carry-over` runs it; `dapt run`,
`dapt launch local|deepspeed` and the Slurm job (on its first node, before torchrun) run it first.

Why a stage and not rank 0's work at start: the other ranks would wait for it at a barrier, and a
barrier is bounded by the process group's timeout, which a 7B model's carry-over and fit outlast;
every rank then died before step 1. Now the ranks only load the folder it wrote.
"""

from __future__ import annotations

import contextlib
import fcntl
import subprocess
import sys
from pathlib import Path

import torch

from dapt.base import DaptError
from dapt.data_mix.store import TokenStore, experiment_stores
from dapt.experiment import Experiment
from dapt.pretrain.evaluate import BASE_BPB_FILE, base_model_bpb, recorded_base_bpb
from dapt.pretrain.model import (CARRY_OVER_STAMP, PRECISION_DTYPES, carried_over_matches, carry_over_stamp,
                                 write_carried_over)
from dapt.pretrain.new_rows import fit_windows


def carry_over_base_model(experiment: Experiment, config: Path) -> Path | None:
    """Write (or keep, when up to date) the carried-over folder and the base model's held-out BPB;
    the folder, or None without `model.embeddings`. On this machine's first GPU when it has one."""
    if experiment.model.embeddings is None:
        return None
    if carry_over_problem(experiment, config) is None:
        print(f"embeddings: carried-over base model up to date in {experiment.carried_over_dir}", flush=True)
        return experiment.carried_over_dir
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    windows = new_row_windows(experiment, experiment_stores(experiment, "train"))
    folder = experiment.carried_over_dir
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Runs sharing the folder (a sweep's array tasks) may start together: one writes, the others then
    # find it done. Where the filesystem has no locks, each writes a whole folder of its own and renames it.
    with open(folder.with_name(folder.name + ".lock"), "w") as lock:
        with contextlib.suppress(OSError):
            fcntl.flock(lock, fcntl.LOCK_EX)
        write_carried_over(experiment.model, experiment.tokenizer_dir, folder, windows)
        base_model_bpb(experiment, PRECISION_DTYPES[experiment.train.precision], device)
    return folder


def carry_over_in_a_process(experiment: Experiment, config: Path) -> None:
    """The carry-over stage as its own process (`dapt model carry-over`), as a launcher runs it before
    the ranks: the GPU memory it took (the whole model, the new rows' optimizer) is given back before
    rank 0 needs it, which a process that goes on waiting for the training would keep."""
    if experiment.model.embeddings is None:
        return
    if carry_over_problem(experiment, config) is None:  # up to date: no process to start
        print(f"embeddings: carried-over base model up to date in {experiment.carried_over_dir}", flush=True)
        return
    done = subprocess.run([sys.executable, "-m", "dapt", "model", "carry-over", str(config)])
    if done.returncode != 0:
        raise DaptError(f"carrying the base model over ({config}) failed; the messages above say why")


def carry_over_problem(experiment: Experiment, config: Path) -> str | None:
    """Why the ranks could not start from the carried-over folder as it stands (missing, or made for
    another base model, tokenizer, text or evaluation); None when they can."""
    if experiment.model.embeddings is None:
        return None
    folder = experiment.carried_over_dir
    windows = new_row_windows(experiment, experiment_stores(experiment, "train"))
    stamp = carry_over_stamp(experiment.model, experiment.tokenizer_dir, windows)
    if carried_over_matches(folder, stamp) and recorded_base_bpb(experiment, PRECISION_DTYPES[experiment.train.precision]):
        return None
    state = "is out of date" if folder.exists() else "does not exist yet"
    return (f"model.embeddings: the base model carried over to the experiment's tokenizer ({folder}) {state}; "
            f"run `dapt model carry-over {config}` (dapt run and dapt launch do it before the ranks start)")


def require_carried_over(experiment: Experiment) -> None:
    """On a rank: the carried-over folder and the base model's measurement must be there, written by the stage."""
    folder = experiment.carried_over_dir
    if not (folder / CARRY_OVER_STAMP).exists() or not (folder / BASE_BPB_FILE).exists():
        raise DaptError(f"model.embeddings: no carried-over base model in {folder}; run `dapt model carry-over` on "
                        "the experiment file before the ranks start (dapt run and dapt launch do it)")


def new_row_windows(experiment: Experiment, train_stores: dict[str, TokenStore]) -> torch.Tensor | None:
    """With `model.fit_new_rows`, the training text the new rows are fitted on: all of it, or the
    domain's for `extend` with pieces inside words (which other text seldom holds; runs of words
    such as ` of the` it holds often)."""
    model = experiment.model
    if not model.fit_new_rows:
        return None
    inside_words = model.embeddings == "extend" and model.extend_phrase_words == 1
    domain = experiment.extend_domain_corpora() if inside_words else experiment.corpora
    return fit_windows([train_stores[c.name] for c in domain], experiment.mix.seq_len, model.fit_new_rows,
                       experiment.seed)
