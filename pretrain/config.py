"""Config sections of pretraining: `model:`, `train:` and `wandb:`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from dapt.base import StrictModel


class ModelConfig(StrictModel):
    path: str | None = None
    """A Hugging Face causal LM directory, relative to the experiment file."""
    config: dict[str, Any] | None = None
    """A Hugging Face model config (e.g. `model_type: llama`) to build a new model from;
    `vocab_size` and the special token ids are taken from the tokenizer."""
    embeddings: Literal["transplant", "extend"] | None = None
    """How the model at `path` meets a tokenizer other than its own. `transplant`: the
    experiment's tokenizer replaces the vocabulary; `extend`: the base tokenizer plus the
    pieces learnt on the `extend_domain` text (at most `extend_pieces`) becomes the experiment's
    tokenizer, cutting every other text as the base did. Rows of shared pieces are copied, new
    rows are the mean of the base rows of their text's base pieces.
    Unset: the tokenizer must be the model's own."""
    base_tokenizer: str | None = None
    """The base model's own tokenizer directory (default: `path`, the Hugging Face convention)."""
    extend_pieces: int = Field(default=8000, gt=0)
    """extend: at most how many pieces to add, those that save the most tokens on the domain text first."""
    extend_phrase_words: int = Field(default=1, ge=1, le=8)
    """extend: the most words a new piece may span. Above 1 (e.g. 4), on a byte-level BPE base
    with a regex pre-tokenizer (GPT-2, SmolLM2, Llama 3), the runs of domain words that save
    the most tokens are kept whole by the pre-tokenizer and may become one piece (` net sales`);
    a consumer that pre-tokenises by its own rules (llama.cpp) does not see those runs."""
    fit_new_rows: int = Field(default=0, ge=0)
    """transplant / extend: Adam steps (8 windows of `mix.seq_len` tokens each) fitting the new rows
    alone on the training text (the domain's, for `extend` with `extend_phrase_words: 1`) before
    training starts, the rest of the model frozen; 0 keeps them the mean of their pieces' rows.
    Done once, on one process's device."""
    extend_domain: list[str] = []
    """extend: the groups or corpora that are the domain, whose text the new pieces are learnt on
    (required when the corpora form more than one group; public text needs no new pieces)."""
    carried_over: str | None = None
    """transplant / extend: where the base model carried over to the experiment's tokenizer is kept
    (default: `<workdir>/carried-over`). Runs that start alike may share one folder: a sweep's proxy
    runs share the sweep's, one copy instead of one per run."""

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.path is None) == (self.config is None):
            raise ValueError("give exactly one of `path` (an existing model) or `config` (a new one)")
        if self.embeddings is not None and self.path is None:
            raise ValueError(f"embeddings: {self.embeddings} carries a base model over; it needs `path`, not `config`")
        if self.fit_new_rows and self.embeddings is None:
            raise ValueError("fit_new_rows fits the new rows of a carry-over; set `embeddings: transplant` or `extend`")
        if self.carried_over and self.embeddings is None:
            raise ValueError("carried_over is where a carry-over is kept; set `embeddings: transplant` or `extend`")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("config: needs `model_type` (e.g. llama)")
        return self


class BatchWarmupConfig(StrictModel):
    """Batch-size warmup: `start_batch_size` sequences per step at first, growing linearly in
    multiples of `increment` to `global_batch_size` at step `steps`."""

    start_batch_size: int = Field(gt=0)
    """Sequences per step at the first step."""
    steps: int = Field(gt=0)
    """The step at which `global_batch_size` is reached."""
    increment: int | None = Field(default=None, gt=0)
    """Default: `start_batch_size` (e.g. 1,024 then 2,048 as in BloombergGPT)."""


class LoraSettings(StrictModel):
    """Low-rank adapters (LoRA, through `peft`): only they are trained, the base weights stay frozen."""

    r: int = Field(default=16, gt=0)
    """The adapters' rank."""
    alpha: float = Field(default=32.0, gt=0)
    """Scale of the adapters' update: alpha / r."""
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    """Dropout on the adapters' input."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt (e.g. `[q_proj, v_proj]`), or every linear layer but the output head."""


class TrainConfig(StrictModel):
    steps: int = Field(gt=0)
    """Optimizer steps."""
    global_batch_size: int = Field(gt=0)
    """Sequences per optimizer step, over all processes."""
    micro_batch_size: int = Field(gt=0)
    """Sequences per process per forward pass; the rest is gradient accumulation."""
    lr: float = Field(gt=0)
    """Peak learning rate (AdamW), reached after `warmup_steps`."""
    warmup_steps: int = Field(default=0, ge=0)
    """Steps of linear warmup from `warmup_start_lr` (0) to `lr`: step s ≤ W trains at lr·(s−1)/W, as in
    transformers; 0: the first step trains at `lr`."""
    warmup_start_lr: float = Field(default=0.0, ge=0.0)
    """The rate warmup starts from: 0, or when continuing a model whose own run ended at some rate, that
    rate, so that training re-warms from where the model left off instead of from nothing."""
    schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    """The learning rate after warmup: cosine or linear decay over the run, constant, or `wsd`
    (warmup-stable-decay: constant at `lr`, then a decay over the last `decay_steps`, whose data can
    be a mix of its own, `mix.decay`)."""
    min_lr_ratio: float = Field(default=0.1, ge=0.0, le=1.0)
    """The lr decays to lr × min_lr_ratio."""
    decay_steps: int | None = Field(default=None, gt=0)
    """`schedule: wsd`: the steps of the decay that ends the run; default: the last fifth of the steps."""
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = "1-sqrt"
    """`schedule: wsd`: how the rate falls from `lr` to lr × min_lr_ratio over the decay, at progress p
    from 0 to 1: `linear` 1 − p, `cosine` (1 + cos πp) / 2, `1-sqrt` 1 − √p (Hägele et al. 2024: at
    equal decay length it matches a cosine run's loss)."""
    weight_decay: float = Field(default=0.1, ge=0.0)
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: float = Field(default=1.0, ge=0.0)
    """Clip the global gradient norm to this (0: no clipping)."""
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    """Training precision; bf16 and fp16 keep fp32 master weights, and the model is loaded in it."""
    activation_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, about a third more compute)."""
    lora: LoraSettings | None = None
    """Train LoRA adapters instead of every weight (`{}` for the defaults)."""
    loss_chunk_tokens: int = Field(default=256, ge=0)
    """The loss and held-out BPB are computed this many positions at a time, the output head's matmul
    and the loss's gradient inside each chunk, so the whole [tokens, vocabulary] logits never exist
    (0: whole logits)."""
    branch_from: str | None = None
    """Another run's checkpoint folder (…/checkpoints/step00008000) to start from, as a resume would:
    its weights, optimizer state, data position and step. This run then trains on to `steps` with
    its own schedule and the stages of its mix that begin after that step: several decays of one
    warmup-stable-decay run, each with its own `mix.decay`, from a checkpoint of its constant phase,
    none retraining it. Its own checkpoints, once it has any, are what it resumes from."""
    checkpoint_every: int = Field(default=0, ge=0)
    """Save every N steps (0: only at the end)."""
    keep_checkpoints: int = Field(default=2, gt=0)
    """The newest checkpoints kept; older ones are removed once a new one is complete."""
    eval_every: int = Field(default=0, ge=0)
    """Held-out bits-per-byte every N steps (0: only before and after training)."""
    eval_max_tokens: int = Field(default=200_000, gt=0)
    """Held-out tokens evaluated per corpus."""
    log_every: int = Field(default=10, gt=0)
    """Print progress every N steps (every step is logged to metrics.jsonl and W&B)."""
    peak_flops_per_device: float | None = Field(default=None, gt=0)
    """Peak FLOP/s of one device, for MFU; default: looked up by GPU name (none on CPU)."""
    loader_workers: int = Field(default=0, ge=0)
    """DataLoader worker processes preparing batches ahead of the step (0: in the training process)."""
    batch_warmup: BatchWarmupConfig | None = None
    """Ramp the batch size up over the first steps (BloombergGPT: 1,024 then 2,048 sequences)."""
    max_skipped_in_a_row: int = Field(default=5, gt=0)
    """Steps with a non-finite loss or gradient norm are skipped; this many in a row stop the run."""
    spike_window: int = Field(default=100, ge=4)
    """Recent steps whose loss a new one is compared with, for the loss-spike detector."""
    spike_threshold: float = Field(default=6.0, gt=0)
    """A loss this many standard deviations above the window's mean is logged as a spike."""
    dist_timeout_minutes: float = Field(default=30.0, gt=0)
    """How long a step may wait for the other ranks (while one of them is elsewhere) before the job ends
    naming the step and where the others were; collectives outside a step (a checkpoint's barrier, an
    evaluation) wait this plus a few seconds (the process group's timeout). The default outlasts a 70B
    model's checkpoint save on a shared filesystem (~1 TB of weights and Adam state at ~1 GB/s: ~17
    minutes); a lost node is found sooner, by the ranks' heartbeats."""

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be smaller than steps ({self.steps})")
        if self.batch_warmup is not None:
            self._check_batch_warmup(self.batch_warmup)
        if self.warmup_start_lr > self.lr:
            raise ValueError(f"warmup_start_lr ({self.warmup_start_lr}) is above lr ({self.lr}): warmup rises to lr")
        if self.decay_steps is not None and self.schedule != "wsd":
            raise ValueError(f"decay_steps is a setting of `schedule: wsd` (the schedule is {self.schedule}): "
                             "set `schedule: wsd`, or drop decay_steps")
        if self.decay_start is not None and self.decay_start < self.warmup_steps:
            raise ValueError(f"decay_steps ({self.steps - self.decay_start}) leave fewer steps before the decay "
                             f"({self.decay_start}) than warmup_steps ({self.warmup_steps}); shorten one of them")
        return self

    @property
    def decay_start(self) -> int | None:
        """`schedule: wsd`: the steps before the decay (warmup and the constant phase); None otherwise."""
        if self.schedule != "wsd":
            return None
        return self.steps - (self.decay_steps or max(1, round(self.steps / 5)))


    def _check_batch_warmup(self, warmup: BatchWarmupConfig) -> None:
        increment = warmup.increment or warmup.start_batch_size
        if warmup.start_batch_size >= self.global_batch_size:
            raise ValueError(f"batch_warmup.start_batch_size ({warmup.start_batch_size}) must be smaller than "
                             f"global_batch_size ({self.global_batch_size})")
        if (self.global_batch_size - warmup.start_batch_size) % increment:
            raise ValueError(f"batch_warmup: global_batch_size - start_batch_size ({self.global_batch_size} - "
                             f"{warmup.start_batch_size}) must be a multiple of the increment ({increment})")
        if warmup.steps >= self.steps:
            raise ValueError(f"batch_warmup.steps ({warmup.steps}) must be smaller than steps ({self.steps})")


class ExportConfig(StrictModel):
    lora: Literal["merged", "adapter"] = "merged"
    """A LoRA run's export: the base model with the adapters merged in, or the adapter folder
    (`adapter_config.json`, `adapter_model.safetensors`) that peft loads on top of the base model."""
    dtype: Literal["fp32", "bf16", "fp16"] | None = None
    """Precision of the exported weights (default: `train.precision`; a 7B model is 28 GB in fp32, 14 in bf16)."""
    max_shard_size: str = "5GB"
    """Largest safetensors file of the export, as transformers' `max_shard_size` (e.g. 2GB); larger models are sharded."""
    base_model: str | None = None
    """The Hugging Face hub id of `model.path`, named as `base_model` in the export's model card."""
    license: str | None = None
    """The exported model's license (e.g. apache-2.0), in the model card."""
    tags: list[str] = []
    """Model card tags beside `dapt`, `domain-adaptive-pretraining` and the corpus groups."""


class WandbConfig(StrictModel):
    project: str = "dapt"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team or user; default: your default entity)."""
    group: str | None = None
    """W&B group, to compare runs side by side (a sweep sets its own)."""
    tags: list[str] = []
    """W&B tags."""
    mode: Literal["offline", "online", "disabled"] = "offline"
    """offline (the default: nothing needs a network; `wandb sync` uploads), online, or disabled."""
