"""One experiment = one YAML file, validated into typed config objects.

Every section is a strict pydantic model that lives next to the package that uses
it; this module composes them, resolves paths against the file's folder, checks
what spans sections (weights name real corpora), and turns every problem into a
`DaptError` that names the file, the line, the field path and what is allowed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from dapt.data_mix.config import CorpusConfig, DataConfig, DedupConfig, HeldoutConfig, MixConfig, is_url
from dapt.base import DaptError, StrictModel
from dapt.config_file import config_error, dotted, line_of, read_yaml
from dapt.workdir import claim_workdir
from dapt.launch.config import LaunchConfig
from dapt.launch.sweep_config import SweepConfig
from dapt.pretrain.config import ExportConfig, ModelConfig, TrainConfig, WandbConfig
from dapt.tokenizer.config import TokenizerConfig


class Experiment(StrictModel):
    name: str = Field(min_length=1)
    """The experiment's name: the W&B run's, and the sweep's prefix."""
    workdir: str = "runs/experiment"
    """Everything this experiment writes goes here (relative to the experiment file)."""
    seed: int = 1234
    """Seed of the model's initialisation and of the mix (each corpus's permutations derive from it and its name)."""
    corpora: list[CorpusConfig] = Field(min_length=1)
    """The corpora to mix: files or a Hugging Face dataset each, with a name and a group."""
    heldout: HeldoutConfig = HeldoutConfig()
    """The held-out split of every corpus, for bits-per-byte."""
    dedup: DedupConfig = DedupConfig()
    """Exact and near deduplication of the corpora, and held-out decontamination."""
    data: DataConfig = DataConfig()
    """How store builds run: local processes, a Slurm job array or a Ray cluster (datatrove's executors)."""
    tokenizer: TokenizerConfig
    """The tokenizer: trained on the corpora (`train:`) or an existing one (`path:`)."""
    mix: MixConfig = MixConfig()
    """How the corpora are blended: weights, sequence length, stages."""
    model: ModelConfig
    """The model: a base model to continue (`path:`) or a new one (`config:`)."""
    train: TrainConfig
    """The optimisation: steps, batch sizes, learning rate, precision, checkpoints, evaluation."""
    deepspeed: dict[str, Any] = {}
    """A native DeepSpeed config; fields set to `auto` (or left out) are filled from `train`."""
    wandb: WandbConfig = WandbConfig()
    """Weights & Biases logging (offline by default)."""
    export: ExportConfig = ExportConfig()
    """The exported Hugging Face folder: precision, shard size, and what its model card says."""
    launch: LaunchConfig = LaunchConfig()
    """Processes per node and the Slurm defaults."""
    sweep: SweepConfig | None = None
    """Proxy runs over many mixes (`dapt sweep`); ignored by the other commands."""
    stores: str | None = None
    """Token stores built by another experiment with the same corpora and tokenizer, e.g. a
    sweep's; default: `<workdir>/stores`."""

    @property
    def workpath(self) -> Path:
        return Path(self.workdir)

    @property
    def domain_tokenizer_dir(self) -> Path:
        """The given tokenizer, or where `dapt tokenizer train` writes."""
        return Path(self.tokenizer.path) if self.tokenizer.path else self.workpath / "tokenizer"

    @property
    def tokenizer_dir(self) -> Path:
        """The tokenizer in use: the domain tokenizer, or with `model.embeddings: extend` the base one extended by it."""
        return self.workpath / "tokenizer-extended" if self.model.embeddings == "extend" else self.domain_tokenizer_dir

    @property
    def base_tokenizer_dir(self) -> Path | None:
        """The base model's own tokenizer (Hugging Face convention: beside its weights)."""
        return Path(self.model.base_tokenizer or self.model.path) if self.model.path else None

    @property
    def carried_over_dir(self) -> Path:
        """With `model.embeddings`: the base model carried over to the experiment's tokenizer (by the carry-over stage)."""
        return Path(self.model.carried_over) if self.model.carried_over else self.workpath / "carried-over"

    @property
    def stores_dir(self) -> Path:
        return Path(self.stores) if self.stores else self.workpath / "stores"

    @property
    def checkpoints_dir(self) -> Path:
        return self.workpath / "checkpoints"

    @property
    def export_dir(self) -> Path:
        return self.workpath / "export"

    @property
    def results_file(self) -> Path:
        return self.workpath / "results.json"

    def corpus_names(self) -> list[str]:
        return [c.name for c in self.corpora]

    def extend_domain_corpora(self) -> list[CorpusConfig]:
        """With `model.embeddings: extend`, the corpora whose text the new pieces are learnt on."""
        named = set(self.model.extend_domain)
        return [c for c in self.corpora if not named or c.name in named or c.group in named]

    def groups(self) -> dict[str, list[str]]:
        """Each group with the names of its corpora, in the order the corpora are listed."""
        members: dict[str, list[str]] = {}
        for corpus in self.corpora:
            members.setdefault(corpus.group, []).append(corpus.name)
        return members


def load_experiment(path: str | Path) -> tuple[Experiment, str]:
    """The validated experiment with absolute paths, and the YAML text it came from."""
    path = Path(path)
    data, root, text = read_yaml(path, "experiment")
    if not isinstance(data, dict):
        raise DaptError(f"{path}: an experiment file must be a YAML mapping (name:, corpora:, ...)")
    try:
        experiment = Experiment.model_validate(data)
    except ValidationError as err:
        raise config_error(err, Experiment, path, root) from None
    _check_names(experiment, path, root)
    if experiment.sweep is not None:
        _check_sweep(experiment, path, root)
    experiment = _resolve_paths(experiment, path.parent.resolve())
    claim_workdir(experiment.workpath)
    return experiment, text


def experiment_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _check_names(experiment: Experiment, path: Path, root: yaml.Node) -> None:
    """Cross-section checks: every weight names a corpus or group that exists."""
    names = experiment.corpus_names()
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise DaptError(f"{path}:{line_of(root, ('corpora',))}: corpora: name {duplicated[0]!r} is used twice; names must be unique")
    groups = sorted(experiment.groups())
    mix = experiment.mix
    sections = [(("mix",), mix)] + [(("mix", "stages", i), stage) for i, stage in enumerate(mix.stages)]
    sections += [(("mix", "decay"), mix.decay)] if mix.decay is not None else []
    for prefix, weights in sections:
        for section, known, kind in (("weights", names, "corpus"), ("group_weights", groups, "group")):
            for key in getattr(weights, section) or {}:
                if key not in known:
                    _unknown(path, root, (*prefix, section, key), kind, known)
    for section in ("budgets", "max_epochs"):
        for key in getattr(mix, section):
            if key not in names:
                _unknown(path, root, ("mix", section, key), "corpus", names)
    model = experiment.model
    for index, name in enumerate(model.extend_domain):
        if name not in groups and name not in names:
            loc = ("model", "extend_domain", index)
            raise DaptError(f"{path}:{line_of(root, loc)}: {dotted(loc)}: unknown group or corpus {name!r}; "
                            f"known groups: {', '.join(groups)}; corpora: {', '.join(names)}")
    if model.embeddings == "extend" and not model.extend_domain and len(groups) > 1:
        raise DaptError(f"{path}:{line_of(root, ('model',))}: model.extend_domain: required with `embeddings: extend` "
                        f"when the corpora form more than one group ({', '.join(groups)}): name the groups or corpora "
                        f"whose text the new pieces are learnt on, e.g. `extend_domain: [{groups[0]}]`")
    if experiment.train.lora is not None and model.path is None:
        loc = ("train", "lora")
        raise DaptError(f"{path}:{line_of(root, loc)}: train.lora: adapters tune a pretrained model, whose weights "
                        "stay frozen; set `model.path` to one (a model built from `model.config` trains whole)")
    for index, corpus in enumerate(experiment.corpora):
        if corpus.record_format != "text" and corpus.max_tokens > mix.seq_len + 1:
            loc = ("corpora", index, "max_tokens")
            raise DaptError(f"{path}:{line_of(root, loc)}: {dotted(loc)}: {corpus.max_tokens} tokens do not fit a "
                            f"window of mix.seq_len + 1 = {mix.seq_len + 1} tokens, and records are never cut "
                            f"across windows; set `max_tokens` to at most {mix.seq_len + 1} or raise `mix.seq_len`")
    for index, stage in enumerate(mix.stages):
        if stage.start_step >= experiment.train.steps:
            loc = ("mix", "stages", index, "start_step")
            raise DaptError(f"{path}:{line_of(root, loc)}: {dotted(loc)}: {stage.start_step} is not before the "
                            f"last step ({experiment.train.steps}); the stage would never start")
    _check_decay(experiment, path, root)


def _check_decay(experiment: Experiment, path: Path, root: yaml.Node) -> None:
    """`mix.decay` is the decay of a warmup-stable-decay run, after every other stage."""
    mix, decay_start = experiment.mix, experiment.train.decay_start
    if mix.decay is None:
        return
    loc = ("mix", "decay")
    if decay_start is None:
        raise DaptError(f"{path}:{line_of(root, loc)}: mix.decay: the weights of a learning-rate decay phase need "
                        f"`train.schedule: wsd` (the schedule is {experiment.train.schedule}); set it, or drop mix.decay")
    for index, stage in enumerate(mix.stages):
        if stage.start_step >= decay_start:
            loc = ("mix", "stages", index, "start_step")
            raise DaptError(f"{path}:{line_of(root, loc)}: {dotted(loc)}: {stage.start_step} is not before the decay, "
                            f"which starts after step {decay_start} with mix.decay's weights; start the stage "
                            "earlier, or put its weights in mix.decay")


def _check_sweep(experiment: Experiment, path: Path, root: yaml.Node) -> None:
    """Names in `sweep:` exist, and the proxy's `train:` overrides make a valid `train:` section."""
    sweep, names = experiment.sweep, experiment.corpus_names()
    groups = sorted(experiment.groups())
    for index, mix in enumerate(sweep.mixes or []):
        for section, known, kind in (("weights", names, "corpus"), ("group_weights", groups, "group")):
            for key in getattr(mix, section) or {}:
                if key not in known:
                    _unknown(path, root, ("sweep", "mixes", index, section, key), kind, known)
    if sweep.grid is not None:
        if sweep.grid.group not in groups:
            loc = ("sweep", "grid", "group")
            raise DaptError(f"{path}:{line_of(root, loc)}: sweep.grid.group: unknown group {sweep.grid.group!r}; "
                            f"known: {', '.join(groups)}")
        if len(groups) < 2:
            loc = ("sweep", "grid")
            raise DaptError(f"{path}:{line_of(root, loc)}: sweep.grid: needs at least two groups of corpora to trade "
                            f"shares between, found only {groups}; set `group:` on the corpora")
    objective = sweep.objective
    for loc, name in [(("sweep", "objective", "minimise"), objective.minimise),
                      *((("sweep", "objective", "no_worse", i), n) for i, n in enumerate(objective.no_worse))]:
        if name not in groups and name not in names:
            raise DaptError(f"{path}:{line_of(root, loc)}: {dotted(loc)}: unknown group or corpus {name!r}; "
                            f"known groups: {', '.join(groups)}; corpora: {', '.join(names)}")
    try:
        TrainConfig.model_validate(experiment.train.model_dump() | sweep.proxy.train)
    except ValidationError as err:
        raise config_error(err, TrainConfig, path, root, within=("sweep", "proxy", "train")) from None


def _unknown(path: Path, root: yaml.Node, loc: tuple, kind: str, known: list[str]) -> None:
    raise DaptError(f"{path}:{line_of(root, loc)}: {dotted(loc)}: unknown {kind} {loc[-1]!r}; known: {', '.join(known)}")


def _resolve_paths(experiment: Experiment, base: Path) -> Experiment:
    """Every path in the file is relative to the file's folder."""

    def absolute(value: str) -> str:
        return str(base / Path(value).expanduser())

    def resolve_corpus(corpus: CorpusConfig) -> CorpusConfig:
        update: dict = {"paths": [p if is_url(p) else absolute(p) for p in corpus.paths]}
        dataset = corpus.hf_dataset
        if dataset is not None and (base / dataset.path).is_dir():  # a save_to_disk folder; else a hub name
            update["hf_dataset"] = dataset.model_copy(update={"path": absolute(dataset.path)})
        return corpus.model_copy(update=update)

    corpora = [resolve_corpus(c) for c in experiment.corpora]
    tokenizer, model = experiment.tokenizer, experiment.model
    if tokenizer.path is not None:
        tokenizer = tokenizer.model_copy(update={"path": absolute(tokenizer.path)})
    if model.path is not None:
        model = model.model_copy(update={"path": absolute(model.path)})
    if model.base_tokenizer is not None:
        model = model.model_copy(update={"base_tokenizer": absolute(model.base_tokenizer)})
    if model.carried_over is not None:
        model = model.model_copy(update={"carried_over": absolute(model.carried_over)})
    stores = absolute(experiment.stores) if experiment.stores else None
    train = experiment.train
    if train.branch_from is not None:
        train = train.model_copy(update={"branch_from": absolute(train.branch_from)})
    sweep = experiment.sweep
    if sweep is not None and sweep.tasks:
        sweep = sweep.model_copy(update={"tasks": [absolute(task) for task in sweep.tasks]})
    if sweep is not None and sweep.proxy.model is not None and sweep.proxy.model.path is not None:
        proxy_model = sweep.proxy.model.model_copy(update={"path": absolute(sweep.proxy.model.path)})
        sweep = sweep.model_copy(update={"proxy": sweep.proxy.model_copy(update={"model": proxy_model})})
    return experiment.model_copy(
        update={"corpora": corpora, "tokenizer": tokenizer, "model": model, "workdir": absolute(experiment.workdir),
                "stores": stores, "sweep": sweep, "train": train}
    )
