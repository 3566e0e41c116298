"""A run's checkpoints as one object: when one is due, what it holds beside DeepSpeed's
own state, and how a resume reads it back.

A checkpoint's client state holds the run's `RunState`, the state of each part that
has one (the loader's position, the mix ledger, the step guard), every rank's RNG
states and the experiment file it was trained from. The keys are those checkpoints
have always had, so that checkpoints written by earlier versions still resume.
Writing is `checkpoint.save_checkpoint` (crash-safe); reading, `resume.load_checkpoint`.

A run may also start from another run's checkpoint (`train.branch_from`): several decays of a
warmup-stable-decay run, each with its own mix, from one checkpoint of its constant phase. It
loads as a resume does, under the settings check's branch rules, and is a run of its own: its
own W&B run, metrics and checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch.distributed as dist

from dapt.base import DaptError
from dapt.experiment import experiment_hash
from dapt.pretrain.checkpoint import META, latest_meta, latest_tag, save_checkpoint, tag_for
from dapt.pretrain.config import TrainConfig
from dapt.pretrain.resume import gather_rng_states, load_checkpoint, restore_rng_states
from dapt.pretrain.resume_settings import allowed_changes, check_resume_settings


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class RunState:
    """What a run carries across a resume besides its parts' own state."""

    step: int = 0
    wandb_run_id: str | None = None
    bpb_before: dict[str, float] | None = None  # held-out BPB of the initial weights, per corpus
    bpb_base: dict[str, float] | None = None  # with a carry-over: the base model's, with its own tokenizer
    first_loss: float | None = None
    last_loss: float | None = None


class Checkpointer:
    def __init__(self, folder: Path, train: TrainConfig, yaml_text: str, resume: bool, parts: dict[str, Stateful]):
        """`parts` by their client-state key; with `resume`, the latest checkpoint in `folder` is read back,
        or where there is none yet and `train.branch_from` names another run's, that one."""
        self.folder, self.yaml_text, self.parts = folder, yaml_text, parts
        self.every, self.last_step, self.keep = train.checkpoint_every, train.steps, train.keep_checkpoints
        meta = latest_meta(folder) if resume else None
        self.source = self.latest() if meta else None  # the checkpoint a resume loads
        self.branched = meta is None and train.branch_from is not None
        if self.branched:
            self.source = Path(train.branch_from)
            meta = branch_meta(self.source, train)
        self.saved_world = meta and meta["world_size"]
        self.universal = False
        self.resumed_at: int | None = None  # the step the latest checkpoint holds, once resumed from it
        # Before anything is built: a refused change is one line, not a state-dict traceback after minutes.
        self.changed = (check_resume_settings(meta["experiment_yaml"], yaml_text, str(self.source), allowed_changes(),
                                              branch=self.branched)
                        if meta and "experiment_yaml" in meta else [])

    @property
    def resuming(self) -> bool:
        return self.saved_world is not None

    def configure(self, ds_config: dict) -> None:
        """Before the engine is built: ZeRO shards written by another number of processes must be
        re-partitioned, which DeepSpeed does when loading a universal checkpoint."""
        sharded = ds_config["zero_optimization"].get("stage", 0) > 0  # without ZeRO every rank saves it all
        self.universal = sharded and self.resuming and self.saved_world != dist.get_world_size()
        if self.universal:
            ds_config["checkpoint"] = {"load_universal": True}

    def resume(self, engine) -> RunState | None:
        """Load the latest checkpoint into the engine, the parts and this rank's RNGs; the run's
        state then, or None when the run starts afresh."""
        if not self.resuming:
            return None
        client = load_checkpoint(engine, self.source, self.universal, self.folder)
        for key, part in self.parts.items():
            part.load_state_dict(client[key])
        restore_rng_states(client["rng"])
        state = RunState(**{field.name: client[field.name] for field in dataclasses.fields(RunState)})
        self.resumed_at = state.step
        if dist.get_rank() == 0:
            world = dist.get_world_size()
            moved = f" (written by {self.saved_world} processes, now {world})" if self.saved_world != world else ""
            changed = "".join(f"\n  changed: {line}" for line in self.changed)
            verb = "branching" if self.branched else "resuming"
            print(f"{verb} from {self.source} at step {state.step}{moved}{changed}", flush=True)
        if self.branched:
            state.wandb_run_id = None  # a run of its own
        return state

    def due(self, step: int) -> bool:
        """Whether to save after `step` on the way (the last step always saves, in `save`'s caller)."""
        return bool(self.every) and step % self.every == 0 and step != self.last_step

    def save(self, engine, state: RunState) -> str:
        """A checkpoint of `state.step` on every rank (a collective); its tag. Not again the checkpoint
        this run resumed from (a finished run started again): nothing was trained since, and rewriting
        the checkpoint `latest` names in place would break it if the write failed."""
        if state.step == self.resumed_at:
            return tag_for(state.step)
        client = {**dataclasses.asdict(state), **{key: part.state_dict() for key, part in self.parts.items()},
                  "rng": gather_rng_states(), "experiment_hash": experiment_hash(self.yaml_text),
                  "experiment_yaml": self.yaml_text}
        return save_checkpoint(engine, self.folder, state.step, client, self.keep, self.yaml_text)

    def latest(self) -> Path | None:
        """The checkpoint `latest` names, if any."""
        tag = latest_tag(self.folder)
        return self.folder / tag if tag else None


def branch_meta(checkpoint: Path, train: TrainConfig) -> dict:
    """What the checkpoint a run branches from says of itself, once it is known to be one this run can start from."""
    if not (checkpoint / META).is_file():
        raise DaptError(f"train.branch_from: {checkpoint} is not a checkpoint dapt wrote (no {META} in it); name a "
                        "step folder of another run's checkpoints, e.g. runs/stable/checkpoints/step00008000")
    meta = json.loads((checkpoint / META).read_text())
    step = meta["step"]
    if step >= train.steps:
        raise DaptError(f"train.branch_from: {checkpoint} holds step {step}, and this run ends at train.steps "
                        f"{train.steps}: nothing is left to train; raise train.steps")
    if train.decay_start is not None and step > train.decay_start:
        raise DaptError(f"train.branch_from: {checkpoint} holds step {step}, after this run's decay starts (after "
                        f"step {train.decay_start}); branch from a checkpoint of the constant phase, or lengthen "
                        "train.decay_steps")
    return meta
