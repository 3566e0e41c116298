"""Config section `sweep:`: which mixes `dapt sweep` tries, how small its proxy runs are,
and what the proposed mix should optimise.

Names (corpora, groups) are checked against the experiment in `launch.experiment`,
since only the whole file knows them.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from dapt.data_mix.config import WeightsConfig
from dapt.base import StrictModel
from dapt.launch.config import SlurmConfig
from dapt.pretrain.config import ModelConfig


class GridConfig(StrictModel):
    """One run per share of `group`; the other groups split the rest as in the base mix."""

    group: str
    """The group whose share varies (e.g. `financial`)."""
    shares: list[float] = Field(min_length=2)
    """Token shares of `group`, each in [0, 1] (e.g. `[0.1, 0.5, 0.9]`)."""

    @model_validator(mode="after")
    def _check(self) -> GridConfig:
        for index, share in enumerate(self.shares):
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"shares[{index}]: a share must lie in [0, 1], got {share}")
        if len({f"{share:.2f}" for share in self.shares}) != len(self.shares):  # runs are named by it
            raise ValueError(f"shares: each share once, at least 0.01 apart, got {self.shares}")
        return self


class RandomConfig(StrictModel):
    """RegMix: `count` mixes drawn from Dirichlet(concentration × base corpus shares)."""

    count: int = Field(gt=0)
    """Number of random mixes (proxy runs)."""
    concentration: float = Field(default=10.0, gt=0.0)
    """How close draws stay to the base mix: large stays near it, 1 spreads them widely."""


class ProxyConfig(StrictModel):
    """What a proxy run changes from the experiment: a smaller model and budget."""

    model: ModelConfig | None = None
    """The proxy model (e.g. `config: {model_type: llama, hidden_size: 64, ...}`); default: the experiment's."""
    train: dict[str, Any] = {}
    """Keys of `train:` to override (steps, batch sizes, lr, eval_every, eval_max_tokens, ...)."""
    deepspeed: dict[str, Any] | None = None
    """A DeepSpeed config replacing the experiment's; default: the experiment's."""
    nproc: int | None = Field(default=None, gt=0)
    """Processes per proxy run (its `launch.nproc_per_node`); default: as `dapt launch local` chooses."""
    slurm: SlurmConfig | None = None
    """Slurm options of a proxy run under `dapt sweep --slurm` (e.g. `{nodes: 1, time: "1:00:00"}`);
    default: the experiment's `launch.slurm`."""


class ObjectiveConfig(StrictModel):
    """The proposal minimises the held-out BPB of `minimise` while each of `no_worse`
    stays within `tolerance` of its BPB under the base mix (both as the fit predicts)."""

    minimise: str = "financial"
    """A group or corpus; a group's BPB is the mean over its corpora."""
    no_worse: list[str] = ["public"]
    """Groups or corpora that may not get worse than under the base mix by more than `tolerance`."""
    tolerance: float = Field(default=0.02, ge=0.0)
    """Allowed relative rise of their BPB (0.02: 2%)."""


class SweepConfig(StrictModel):
    """Many proxy runs over mixes: give exactly one of `mixes`, `grid` or `random`."""

    mixes: list[WeightsConfig] | None = Field(default=None, min_length=1)
    """Explicit weight sets, each `weights:` (per corpus) or `group_weights:` (per group), all of one kind."""
    grid: GridConfig | None = None
    """Mixes on a grid of one group's share, the other groups keeping their relative weights."""
    random: RandomConfig | None = None
    """Mixes drawn at random around the experiment's weights."""
    proxy: ProxyConfig = ProxyConfig()
    """What a proxy run changes from the experiment: a smaller model, fewer steps, its processes."""
    seed: int = 0
    """Seed of the random mixes."""
    objective: ObjectiveConfig = ObjectiveConfig()
    """What the proposed mix minimises, and which corpora or groups it may not make worse."""
    tasks: list[str] = []
    """Few-shot task files (as for `dapt eval --tasks`) scored on every finished proxy run;
    their accuracy and macro-F1 join the results table."""

    @model_validator(mode="after")
    def _one_design(self) -> SweepConfig:
        given = [name for name in ("mixes", "grid", "random") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of `mixes`, `grid` or `random`, got {', '.join(given) or 'none'}")
        for index, mix in enumerate(self.mixes or []):
            if mix.weights is None and mix.group_weights is None:
                raise ValueError(f"mixes[{index}]: give `weights` (per corpus) or `group_weights` (per group)")
            if (mix.weights is None) != (self.mixes[0].weights is None):
                raise ValueError(f"mixes[{index}]: all mixes must use the same kind of weights as mixes[0] "
                                 "(`weights` or `group_weights`), so that they can be compared and fitted")
        return self

    @property
    def level(self) -> str:
        """What the sweep varies and fits on: group shares or corpus shares."""
        if self.grid is not None or (self.mixes is not None and self.mixes[0].group_weights is not None):
            return "group"
        return "corpus"
