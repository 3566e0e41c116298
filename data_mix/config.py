"""Config sections of the data path: the corpora, the held-out split and the mix."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dapt.base import StrictModel

CORPUS_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class HFDatasetConfig(StrictModel):
    """A Hugging Face dataset: a `save_to_disk` folder, or a hub name read by streaming."""

    path: str
    """A local `save_to_disk` folder (relative to the experiment file) or a hub name like `allenai/c4`."""
    name: str | None = None
    """The dataset's configuration (e.g. `en`)."""
    split: str = "train"
    """The dataset split to read (hub datasets; a `save_to_disk` folder of a DatasetDict)."""


class CorpusConfig(StrictModel):
    """One corpus: files (or a Hugging Face dataset) of one kind of text, read into documents."""

    name: str = Field(pattern=CORPUS_NAME)
    """Short name used in metrics and store folders (letters, digits, `_ . -`)."""
    group: str = "default"
    """Free-text group (e.g. `financial`, `public`) that `mix.group_weights` refers to."""
    paths: list[str] = []
    """Files, globs or folders, relative to the experiment file."""
    hf_dataset: HFDatasetConfig | None = None
    """Read a Hugging Face dataset instead of `paths`."""
    format: Literal["auto", "jsonl", "json", "csv", "tsv", "xlsx", "parquet", "txt"] = "auto"
    """File format; `auto` decides by extension (`.gz` allowed for jsonl, csv, tsv and txt)."""
    text_field: str = "text"
    """Field holding the text in records (jsonl, json, csv, tsv, xlsx, parquet, datasets)."""
    text_template: str | None = None
    """Join several fields, e.g. `"{headline}\n\n{body}"`; replaces `text_field`."""
    record_format: Literal["text", "prompt_completion", "messages"] = "text"
    """`prompt_completion`: tuning records with `prompt` and `completion` fields, the loss on the
    completion only; `messages`: chat records (`messages: [{role, content}]`) rendered with the
    tokenizer's chat template, the loss on the assistant turns. Records are packed whole into windows."""
    prompt_template: str | None = None
    """`prompt_completion` from other fields, e.g. `"Headline: {text}\nSentiment:"` (default: the `prompt` field)."""
    completion_template: str | None = None
    """`prompt_completion` from other fields, e.g. `" {label}"` (default: the `completion` field)."""
    max_tokens: int = Field(default=2048, ge=2)
    """Tuning records: the most tokens one record may take, everything around its text counted."""
    over_length: Literal["reject", "truncate"] = "reject"
    """Tuning records over `max_tokens`: rejected, or their prompt cut from the left (counted either way)."""
    txt_split: Literal["file", "line", "separator"] = "file"
    """For txt files: one document per file, per non-empty line, or per `separator`."""
    separator: str | None = None
    """With `txt_split: separator`: the string between documents (e.g. `"\n\n\n"`)."""
    encoding: str = "utf-8"
    """Text encoding of the files (e.g. `latin-1`)."""
    encoding_errors: Literal["strict", "replace"] = "strict"
    """`strict`: undecodable bytes make the record bad; `replace`: they become U+FFFD and it is kept."""
    on_error: Literal["fail", "skip"] = "skip"
    """A bad record (malformed, undecodable, missing or non-text field): `fail` stops at the first
    one with its location; `skip` counts it by reason and goes on."""
    min_chars: int = Field(default=1, ge=1)
    """Documents shorter than this are rejected (and counted)."""
    max_chars: int | None = Field(default=None, gt=0)
    """Documents longer than this are rejected (and counted)."""

    @model_validator(mode="after")
    def _one_source(self) -> CorpusConfig:
        if bool(self.paths) == (self.hf_dataset is not None):
            raise ValueError("give either `paths` (files) or `hf_dataset`, exactly one of them")
        if (self.txt_split == "separator") != (self.separator is not None):
            raise ValueError("`separator` goes with `txt_split: separator`, and that needs a `separator`")
        if self.record_format != "text" and (self.text_template is not None or self.text_field != "text"):
            raise ValueError(f"`record_format: {self.record_format}` reads its own fields; drop `text_field` and "
                             "`text_template`")
        if (self.prompt_template or self.completion_template) and self.record_format != "prompt_completion":
            raise ValueError("`prompt_template` and `completion_template` make `record_format: prompt_completion` records")
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise ValueError(f"max_chars ({self.max_chars}) is below min_chars ({self.min_chars})")
        return self


class HeldoutConfig(StrictModel):
    """Per corpus, documents whose content hash falls below `fraction` are held out."""

    fraction: float = Field(default=0.01, gt=0.0, le=0.5)
    """Share of each corpus held out for evaluation, chosen by a hash of each document's text."""
    max_documents: int = Field(default=2000, gt=0)
    """Cap on held-out documents per corpus (extra ones return to training)."""


class WeightsConfig(StrictModel):
    """Target token shares: per corpus, per group, or (neither given) natural."""

    weights: dict[str, float] | None = None
    """Token share per corpus, normalised; corpora left out get none."""
    group_weights: dict[str, float] | None = None
    """Token share per group; inside a group corpora get shares ∝ size^(1/temperature)."""

    @model_validator(mode="after")
    def _check_weights(self):
        if self.weights is not None and self.group_weights is not None:
            raise ValueError("set either `weights` (per corpus) or `group_weights` (per group), not both")
        for section in ("weights", "group_weights"):
            values = getattr(self, section) or {}
            for key, value in values.items():
                if value < 0:
                    raise ValueError(f"{section}.{key}: must be >= 0, got {value}")
            if values and sum(values.values()) <= 0:
                raise ValueError(f"{section}: all weights are zero; give at least one a positive share")
        return self


class StageConfig(WeightsConfig):
    """From `start_step` on, the mix follows these weights (curricula, replay, annealing)."""

    start_step: int = Field(gt=0)
    """The optimizer step from which these weights hold."""


class MixConfig(WeightsConfig):
    """How corpora are blended into training samples of `seq_len` tokens."""

    seq_len: int = Field(default=2048, ge=8)
    """Tokens per training sample (windows are cut when read, so stores need no rebuild)."""
    temperature: float = Field(default=1.0, gt=0.0)
    """Where shares are natural (inside a group, or no weights): share ∝ size^(1/temperature)."""
    budgets: dict[str, float] = {}
    """Tokens to draw from a corpus over the whole run; its share becomes budget / run tokens."""
    max_epochs: dict[str, float] = {}
    """Refuse a plan that repeats a corpus more often than this."""
    stages: list[StageConfig] = []
    """Later weight sets, each from its `start_step`; the top-level weights hold before the first."""

    @model_validator(mode="after")
    def _check_mix(self) -> MixConfig:
        for section in ("budgets", "max_epochs"):
            for key, value in getattr(self, section).items():
                if value <= 0:
                    raise ValueError(f"{section}.{key}: must be > 0, got {value}")
        starts = [stage.start_step for stage in self.stages]
        if starts != sorted(set(starts)):
            raise ValueError(f"stages: start_step values must increase, got {starts}")
        if self.budgets and self.stages:
            raise ValueError("budgets fix a corpus's share for the whole run, so they cannot be combined with stages")
        return self
