"""Config sections of pretraining: `model:`, `train:` and `wandb:`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from launch.base import StrictModel


class ModelConfig(StrictModel):
    path: str | None = None
    """A Hugging Face causal LM directory, relative to the experiment file."""
    config: dict[str, Any] | None = None
    """A Hugging Face model config (e.g. `model_type: llama`) to build a new model from;
    `vocab_size` and the special token ids are taken from the tokenizer."""

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.path is None) == (self.config is None):
            raise ValueError("give exactly one of `path` (an existing model) or `config` (a new one)")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("config: needs `model_type` (e.g. llama)")
        return self


class TrainConfig(StrictModel):
    steps: int = Field(gt=0)
    """Optimizer steps."""
    global_batch_size: int = Field(gt=0)
    """Sequences per optimizer step, over all processes."""
    micro_batch_size: int = Field(gt=0)
    """Sequences per process per forward pass; the rest is gradient accumulation."""
    lr: float = Field(gt=0)
    warmup_steps: int = Field(default=0, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(default=0.1, ge=0.0, le=1.0)
    """The lr decays to lr × min_lr_ratio (linear decay goes to zero: set 0)."""
    weight_decay: float = Field(default=0.1, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(default=1.0, ge=0.0)
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    activation_checkpointing: bool = False
    checkpoint_every: int = Field(default=0, ge=0)
    """Save every N steps (0: only at the end)."""
    keep_checkpoints: int = Field(default=2, gt=0)
    eval_every: int = Field(default=0, ge=0)
    """Held-out bits-per-byte every N steps (0: only before and after training)."""
    eval_max_tokens: int = Field(default=200_000, gt=0)
    """Held-out tokens evaluated per corpus."""
    log_every: int = Field(default=10, gt=0)
    peak_flops_per_device: float | None = Field(default=None, gt=0)
    """Peak FLOP/s of one device, for MFU; default: looked up by GPU name (none on CPU)."""
    loader_workers: int = Field(default=0, ge=0)
    """DataLoader worker processes preparing batches ahead of the step (0: in the training process)."""
    max_skipped_in_a_row: int = Field(default=5, gt=0)
    """Steps with a non-finite loss or gradient norm are skipped; this many in a row stop the run."""
    spike_window: int = Field(default=100, ge=4)
    """Recent steps whose loss a new one is compared with, for the loss-spike detector."""
    spike_threshold: float = Field(default=6.0, gt=0)
    """A loss this many standard deviations above the window's mean is logged as a spike."""

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be smaller than steps ({self.steps})")
        if self.schedule == "linear" and self.min_lr_ratio != 0:
            raise ValueError("schedule linear decays to zero (DeepSpeed WarmupDecayLR): set min_lr_ratio: 0, or use cosine")
        return self


class WandbConfig(StrictModel):
    project: str = "dapt"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = []
    mode: Literal["offline", "online", "disabled"] = "offline"
