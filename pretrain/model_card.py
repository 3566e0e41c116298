"""The export's `README.md`, written as Hugging Face model cards are: YAML front matter the
hub reads (`base_model`, `library_name`, `license`, `tags`), then what the model is, what it
was trained on and how, so the folder can be uploaded as it is."""

from __future__ import annotations

from pathlib import Path

import yaml

import dapt
from dapt.experiment import Experiment, experiment_hash

CARD = "README.md"


def model_card(experiment: Experiment, yaml_text: str, results: dict | None, tag: str) -> str:
    """The card of the model exported from checkpoint `tag`; `results` (the run's results.json) when
    that checkpoint is the run's last, for the per-corpus figures."""
    model, train, export = experiment.model, experiment.train, experiment.export
    groups = list(experiment.groups())
    front = {"library_name": "transformers", "pipeline_tag": "text-generation",
             "tags": ["dapt", "domain-adaptive-pretraining", *groups, *export.tags]}
    if export.base_model:
        front = {"base_model": export.base_model, **front}
    if export.license:
        front["license"] = export.license
    start = (f"continued pretraining of {export.base_model or f'the model in `{model.path}`'}" if model.path
             else "a model trained from scratch")
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# {experiment.name}", "",
             f"{experiment.name} is {start}, by dapt (domain-adaptive "
             f"pretraining) on a weighted mix of {len(experiment.corpora)} corpora in {len(groups)} group(s): "
             f"{', '.join(groups)}.", "", "## Data", ""]
    lines += _data_table(experiment, results)
    lines += ["", "## Tokenizer", "", _tokenizer_line(experiment), "", "## Training", ""]
    stage = experiment.deepspeed.get("zero_optimization", {}).get("stage", "dapt's default")
    tokens = sum(row["tokens_seen"] for row in results["corpora"].values()) if results else None
    lines += [f"- steps: {train.steps:,}, global batch {train.global_batch_size} sequences of {experiment.mix.seq_len} "
              f"tokens" + (f" ({tokens:,} tokens seen)" if tokens else ""),
              f"- AdamW, lr {train.lr:g} ({_schedule(train)}, {train.warmup_steps} warmup steps, min lr ratio "
              f"{train.min_lr_ratio:g}), weight decay {train.weight_decay:g}, gradient clip {train.grad_clip:g}",
              f"- precision {train.precision}, DeepSpeed ZeRO stage {stage}, seed {experiment.seed}",
              "", "## Provenance", "",
              f"- dapt {dapt.__version__}, experiment hash `{experiment_hash(yaml_text)}`, checkpoint `{tag}`",
              "- the experiment file it was trained from: `experiment.yaml` in this folder", ""]
    return "\n".join(lines)


def _data_table(experiment: Experiment, results: dict | None) -> list[str]:
    if results is None:
        return ["| corpus | group | weight |", "|---|---|---|"] + [
            f"| {c.name} | {c.group} | {_weight(experiment, c)} |" for c in experiment.corpora] + [
            "", "(Exported from a checkpoint before the run's end: its held-out figures are in the run's W&B.)"]
    rows = ["| corpus | group | share of samples | tokens seen | held-out bits per byte, before → after |",
            "|---|---|---:|---:|---|"]
    for corpus in experiment.corpora:
        row = results["corpora"][corpus.name]
        rows.append(f"| {corpus.name} | {corpus.group} | {row['realised_share']:.1%} | {row['tokens_seen']:,} | "
                    f"{row['bpb_before']:.3f} → {row['bpb_after']:.3f} |")
    return rows


def _weight(experiment: Experiment, corpus) -> str:
    mix = experiment.mix
    if mix.weights:
        return f"{mix.weights.get(corpus.name, 0):g}"
    if mix.group_weights:
        return f"group {mix.group_weights.get(corpus.group, 0):g}"
    return "by size"


def _tokenizer_line(experiment: Experiment) -> str:
    model = experiment.model
    if model.embeddings == "extend":
        return (f"The base model's own tokenizer grown by up to {model.extend_pieces:,} pieces learnt on the domain "
                f"corpora ({', '.join(model.extend_domain) or 'all'}); base ids unchanged, new rows initialised from "
                f"the pieces they join" + (f" and fitted for {model.fit_new_rows} steps" if model.fit_new_rows else "")
                + ".")
    if model.embeddings == "transplant":
        return ("A domain tokenizer trained by dapt on the corpora; the base model carried over to it (shared pieces "
                "keep their rows, new ones start from the rows of the base pieces they are made of).")
    if model.path:
        return "The base model's own tokenizer."
    return "A tokenizer trained by dapt on the mix-weighted corpora."


def write_model_card(out_dir: Path, experiment: Experiment, yaml_text: str, results: dict | None, tag: str) -> None:
    """The card and, beside it, the experiment file the model was trained from."""
    (out_dir / CARD).write_text(model_card(experiment, yaml_text, results, tag), encoding="utf-8")
    (out_dir / "experiment.yaml").write_text(yaml_text, encoding="utf-8")


def _schedule(train) -> str:
    if train.schedule != "wsd":
        return train.schedule
    return f"warmup-stable-decay, a {train.decay_shape} decay over the last {train.steps - train.decay_start} steps"
