"""Config sections of the data path: the corpora, the held-out split and the mix."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dapt.base import StrictModel

CORPUS_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


def is_url(path: str) -> bool:
    """Whether a source path is a URL an fsspec filesystem reads (`s3://…`), not a local path."""
    return "://" in path and not path.startswith("file://")


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


class NearDedupConfig(StrictModel):
    """MinHash LSH over word shingles (datatrove's stages): documents whose signatures agree on every
    hash of at least one band are near-duplicates; with `bands` b of `rows` r that happens to pairs
    whose Jaccard similarity is above about (1/b)^(1/r)."""

    shingle: int = Field(default=5, ge=1)
    """Words per shingle."""
    bands: int | None = Field(default=None, ge=1)
    """Bands of the signature (datatrove's `num_buckets`); default: chosen from `threshold`."""
    rows: int | None = Field(default=None, ge=1)
    """Hashes per band (datatrove's `hashes_per_bucket`); default: chosen from `threshold`."""
    threshold: float = Field(default=0.75, gt=0.0, lt=1.0)
    """The Jaccard similarity above which documents count as near-duplicates, when `bands` and `rows`
    are left out: they are chosen among 112 hashes so that (1/bands)^(1/rows) is nearest it."""
    across_corpora: bool = True
    """Also across corpora (a press release in `news` and in `web`); else within each corpus only."""

    @model_validator(mode="after")
    def _both_or_neither(self) -> NearDedupConfig:
        if (self.bands is None) != (self.rows is None):
            raise ValueError("give `bands` and `rows` together, or neither (then `threshold` chooses them)")
        return self

    def lsh(self) -> tuple[int, int]:
        """(bands, rows)."""
        if self.bands is not None:
            return self.bands, self.rows
        shapes = [(b, 112 // b) for b in range(1, 113) if 112 % b == 0]
        return min(shapes, key=lambda shape: abs((1 / shape[0]) ** (1 / shape[1]) - self.threshold))


class DedupConfig(StrictModel):
    """Deduplication of the corpora when their stores are built; every document removed is counted."""

    exact: Literal["corpus", "across", "off"] = "corpus"
    """Identical documents (same text): removed within each corpus, across all corpora, or kept."""
    near: NearDedupConfig | None = None
    """Near-duplicates by MinHash (syndicated articles, boilerplate); off unless given."""
    decontaminate: bool = True
    """With `near`: a training document that near-duplicates a held-out one is removed from training,
    so that held-out bits-per-byte is not measured on text the model trained on."""

    def spans_corpora(self) -> bool:
        return self.exact == "across" or (self.near is not None and self.near.across_corpora)


class SlurmDataConfig(StrictModel):
    """The Slurm job array of a store build (`data.executor: slurm`)."""

    partition: str | None = None
    """Default: the experiment's `launch.slurm.partition`."""
    time: str = "24:00:00"
    """Each task's time limit."""
    cpus_per_task: int = Field(default=1, ge=1)
    """Cores per task (a task tokenises on one; more help its reading and decompression)."""
    mem_per_cpu_gb: int = Field(default=4, ge=1)
    """Memory per core of a task."""
    sbatch_args: dict[str, str] = {}
    """More `#SBATCH` directives, e.g. `{account: fin, constraint: cpu}`."""


class DataConfig(StrictModel):
    """How store builds run: datatrove's executors (local processes, a Slurm job array, a Ray cluster)."""

    executor: Literal["local", "slurm", "ray"] = "local"
    """`local`: processes on this machine; `slurm`: a job array per stage; `ray`: an existing Ray cluster."""
    tasks: int | None = Field(default=None, ge=1)
    """Parts the corpora are split into, by bytes; default: one per core (local), else 64."""
    workers: int | None = Field(default=None, ge=1)
    """Tasks running at once; default: one per core (local), all (Slurm, Ray)."""
    slurm: SlurmDataConfig = SlurmDataConfig()
    """The job arrays of `executor: slurm`."""
    ray_address: str | None = None
    """An existing Ray cluster (`ray://host:10001`, `auto`); default: the one `ray.init()` finds or starts."""


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
    decay: WeightsConfig | None = None
    """With `train.schedule: wsd`, the weights of the decay, a stage from its first step (annealing on
    the best data, as Llama 3, OLMo 2 and MiniCPM did); default: the weights before it go on."""

    @model_validator(mode="after")
    def _check_mix(self) -> MixConfig:
        for section in ("budgets", "max_epochs"):
            for key, value in getattr(self, section).items():
                if value <= 0:
                    raise ValueError(f"{section}.{key}: must be > 0, got {value}")
        starts = [stage.start_step for stage in self.stages]
        if starts != sorted(set(starts)):
            raise ValueError(f"stages: start_step values must increase, got {starts}")
        if self.budgets and (self.stages or self.decay):
            raise ValueError("budgets fix a corpus's share for the whole run, so they cannot be combined with stages "
                             "or a decay's weights")
        return self
