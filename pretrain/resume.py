"""What a resume needs beyond DeepSpeed's own checkpoint: every rank's RNG states,
and finding the checkpoint to resume from.

DeepSpeed saves no RNG state, so dropout or any sampling would differ after a
resume. Each rank's python, numpy and torch (and CUDA) states are gathered into the
checkpoint's client state, and each rank restores its own, so that a resumed run
continues bitwise like an uninterrupted one (fp32, same world size).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pretrain.checkpoint import latest_tag


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


def load_latest(engine, folder: Path) -> dict | None:
    """Load the checkpoint `latest` names into the engine; its client state, or None if there is none."""
    tag = latest_tag(folder)
    if tag is None:
        return None
    _, client_state = engine.load_checkpoint(str(folder), tag=tag)
    return client_state
