"""What a resume needs beyond DeepSpeed's own checkpoint: every rank's RNG states, loading the
checkpoint to resume (or branch) from, and re-partitioning it for another world size.

DeepSpeed saves no RNG state, so dropout or any sampling would differ after a
resume. Each rank's python, numpy and torch (and CUDA) states are gathered into the
checkpoint's client state, and each rank restores its own, so that a resumed run
continues bitwise like an uninterrupted one (fp32, same world size).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dapt.base import DaptError


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def gather_rng_states() -> list[dict]:
    """Every rank's RNG states, in rank order (a collective: call it on every rank)."""
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, _rng_state())
    return states


def restore_rng_states(states: list[dict]) -> None:
    """This rank's own states; with another world size the states of rank 0 are reused."""
    rank = dist.get_rank()
    state = states[rank] if rank < len(states) else states[0]
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_checkpoint(engine, checkpoint: Path, universal: bool, scratch: Path) -> dict:
    """Load the checkpoint folder `checkpoint` (this run's latest, or another run's it branches from)
    into the engine; its client state.

    With `universal` (the checkpoint was written by another number of processes), rank 0
    first converts it with DeepSpeed's `ds_to_universal`, whose per-parameter form any
    world size can load (the engine must be configured with `checkpoint.load_universal`),
    into `scratch` (this run's own checkpoints folder: another run's is left as it is);
    the converted copy is removed once loaded.
    """
    folder, tag = checkpoint.parent, checkpoint.name
    if universal:
        folder, tag = scratch, _to_universal(checkpoint, scratch)
    _, client_state = engine.load_checkpoint(str(folder), tag=tag)
    if client_state is None:
        raise DaptError(f"could not load checkpoint {checkpoint}; move it away or train with --no-resume")
    if universal:
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(folder / tag)
    return client_state


def _to_universal(checkpoint: Path, scratch: Path) -> str:
    universal = f"universal-{checkpoint.name}"
    if dist.get_rank() == 0 and not (scratch / universal).exists():
        scratch.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(checkpoint),
                   "--output_folder", str(scratch / f"{universal}.tmp"), "--inject_missing_state"]
        result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
        if result.returncode != 0:
            raise DaptError(f"converting {checkpoint} to a universal checkpoint failed: {result.stderr.strip()[-500:]}")
        os.replace(scratch / f"{universal}.tmp", scratch / universal)
    dist.barrier()
    return universal
