"""The stages of the flow as the CLI runs them, each printing what it did.

tokenizer → token stores → mix plan → training (torchrun) → export → summary.
`run_flow` (`dapt run`) calls them in order; each stage is also its own subcommand.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from dapt.data_mix.batches import batch_sizes
from dapt.data_mix.blend import build_schedule, target_shares
from dapt.data_mix.build import BuildRequest, build_stores as build_corpus_stores
from dapt.data_mix.config import DataConfig
from dapt.data_mix.plan import format_plan, plan, plot_plan
from dapt.data_mix.report import format_accounting, format_statistics, prepare, sample_documents, store_statistics
from dapt.data_mix.sources import CorpusReader
from dapt.data_mix.store import checksum_problem, experiment_stores, read_manifest, tokenizer_hash
from dapt.base import DaptError
from dapt.experiment import Experiment, load_experiment
from dapt.workdir import workdir_lock
from dapt.launch.local import default_nproc, run_local
from dapt.launch.preflight import preflight
from dapt.pretrain.carry_over import carry_over_in_a_process
from dapt.pretrain.checkpoint import latest_tag, tag_for
from dapt.pretrain.export import export_checkpoint
from dapt.pretrain.lr_schedule import lr_curve
from dapt.pretrain.model import check_model
from dapt.pretrain.report import build_report
from dapt.tokenizer.evaluate import (evaluate, format_evaluation, load_tokenizer, plot_evaluation,
                                     worse_than_base)
from dapt.tokenizer.train import draw_sample, train_from_sample
from dapt.tokenizer.extend import extend_tokenizer

RECIPE = "dapt-recipe.json"
# Text drawn (by mix share) to rank domain pieces for `extend` when the tokenizer was given, not trained.
EXTEND_SAMPLE_BYTES = 1e8


def train_tokenizer(experiment: Experiment) -> Path:
    """Train the experiment's tokenizer, unless one trained from the same recipe exists; with
    `model.embeddings: extend`, grow the base model's tokenizer on the domain text instead.
    Against a base model's own tokenizer, say per corpus how the two compress. Returns the
    tokenizer in use."""
    out_dir = _extended_tokenizer(experiment) if experiment.model.embeddings == "extend" else _domain_tokenizer(experiment)
    base_dir = experiment.base_tokenizer_dir
    if base_dir is not None and base_dir.resolve() != out_dir.resolve() and (base_dir / "tokenizer.json").exists():
        evaluate_tokenizers(experiment, [out_dir])
    return out_dir


def evaluate_tokenizers(experiment: Experiment, tokenizer_dirs: list[Path]) -> list[dict]:
    """`dapt tokenizer eval`: the tokenizers (default: the experiment's) side by side on each corpus's
    held-out text, beside the base model's own tokenizer when there is a base model; a warning for
    each corpus the base's compresses better. A table, and a plot in the workdir."""
    paths = tokenizer_dirs or [experiment.tokenizer_dir]
    base = experiment.base_tokenizer_dir
    if base is not None and (base / "tokenizer.json").exists():
        given = next((path for path in paths if path.resolve() == base.resolve()), None)
        paths, base = ([base, *paths], base) if given is None else (paths, given)
    else:
        base = None
    rows = evaluate(paths, experiment.corpora, experiment.heldout)
    experiment.workpath.mkdir(parents=True, exist_ok=True)
    figure = plot_evaluation(rows, experiment.workpath / "tokenizer_eval.png")
    print(format_evaluation(rows, base and str(base)))
    for line in worse_than_base(rows, str(base)) if base else []:
        print(line)
    print(f"plot: {figure}")
    return rows


def _extended_tokenizer(experiment: Experiment) -> Path:
    """The base model's tokenizer grown on the domain text (`tokenizer-extended/`), unless up to date."""
    out_dir, base_dir, model = experiment.tokenizer_dir, experiment.base_tokenizer_dir, experiment.model
    base = load_tokenizer(base_dir)  # a base tokenizer that does not load is named before any work
    # A BPE base learns its new merges on the domain text itself; a unigram base takes the domain tokenizer's pieces.
    unigram = json.loads(base.backend_tokenizer.to_str())["model"]["type"] == "Unigram"
    domain_dir = _domain_tokenizer(experiment) if unigram else None
    config = experiment.tokenizer.train
    sample_bytes = config.sample_bytes if config else EXTEND_SAMPLE_BYTES
    domain = experiment.extend_domain_corpora()
    stamp = {"base": tokenizer_hash(base_dir), "domain_tokenizer": domain_dir and tokenizer_hash(domain_dir),
             "pieces": model.extend_pieces, "phrase_words": model.extend_phrase_words, "sample_bytes": sample_bytes,
             "domain": [c.model_dump() for c in domain], "heldout": experiment.heldout.model_dump()}
    if (out_dir / RECIPE).exists() and json.loads((out_dir / RECIPE).read_text()).get("stamp") == stamp:
        print(f"tokenizer: extended tokenizer up to date in {out_dir}")
        return out_dir
    if not unigram:
        print(f"tokenizer: growing {base_dir}'s BPE by merges learnt on {', '.join(c.name for c in domain)} "
              f"(up to {sample_bytes:,.0f} bytes by mix share); no domain tokenizer is needed for it")
    mix_shares = _mix_shares(experiment)  # reads every corpus through to size it: once
    shares = {c.name: mix_shares[c.name] for c in domain}
    total = sum(shares.values())  # the domain's own shares; even ones if the mix gives it none
    domain_shares = {name: share / total if total else 1 / len(shares) for name, share in shares.items()}
    lines = draw_sample(domain, domain_shares, experiment.heldout, sample_bytes)
    added = extend_tokenizer(base_dir, lines, model.extend_pieces, out_dir, domain_dir, model.extend_phrase_words)
    (out_dir / RECIPE).write_text(json.dumps({"stamp": stamp}, indent=1))
    short = (f" (of {model.extend_pieces:,} asked: no other piece saves more than one token on this text)"
             if len(added) < model.extend_pieces else "")
    spanning = sum(1 for piece in added if " " in piece[1:])
    words = f", {spanning:,} of them spanning words" if model.extend_phrase_words > 1 else ""
    print(f"tokenizer: {base_dir} extended by {len(added):,} domain pieces{short}{words} "
          f"(e.g. {', '.join(map(repr, added[:5]))}) in {out_dir}")
    return out_dir


def _domain_tokenizer(experiment: Experiment) -> Path:
    out_dir = experiment.domain_tokenizer_dir
    if experiment.tokenizer.train is None:
        if not (out_dir / "tokenizer.json").exists():
            held = " holds a model (config.json) but" if (out_dir / "config.json").exists() else ""
            raise DaptError(f"tokenizer.path: {out_dir}{held} has no tokenizer.json; give a Hugging Face tokenizer "
                            f"directory (save the model's tokenizer into it with `save_pretrained`)")
        if load_tokenizer(out_dir).eos_token is None:
            raise DaptError(f"tokenizer.path: {out_dir} has no end-of-sequence token, which is put between documents; "
                            f"set `eos_token` in its tokenizer_config.json")
        print(f"tokenizer: using {out_dir}")
        return out_dir
    sources = [c.model_dump() for c in experiment.corpora]
    recipe = {"train": experiment.tokenizer.train.model_dump(), "corpora": sources,
              "mix": experiment.mix.model_dump(), "heldout": experiment.heldout.model_dump()}
    stamp = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
    if (out_dir / RECIPE).exists() and json.loads((out_dir / RECIPE).read_text()).get("stamp") == stamp:
        print(f"tokenizer: up to date in {out_dir}")
        return out_dir
    config = experiment.tokenizer.train
    print(f"tokenizer: training {config.backend} {config.model} (vocab {config.vocab_size:,}) "
          f"on up to {config.sample_bytes:,.0f} bytes drawn by mix share")
    lines = draw_sample(experiment.corpora, _mix_shares(experiment), experiment.heldout, config.sample_bytes)
    train_from_sample(lines, config, out_dir)
    (out_dir / RECIPE).write_text(json.dumps({"stamp": stamp, "recipe": recipe}, indent=1))
    pieces = len(load_tokenizer(out_dir))
    # The trainers stop early rather than invent pieces the sample does not support; say so, or a
    # user who asked for 32k would find out only from the model's embedding size.
    short = (f" (fewer than the {config.vocab_size:,} of `tokenizer.train.vocab_size`: this sample supports no "
             f"more; a larger `sample_bytes` or more varied text does)") if pieces < config.vocab_size else ""
    print(f"tokenizer: {pieces:,} pieces written to {out_dir}{short}")
    return out_dir


def _mix_shares(experiment: Experiment) -> dict[str, float]:
    sizes = {c.name: sum(len(d.encode("utf-8")) for d in CorpusReader(c).documents()) for c in experiment.corpora}
    return target_shares(experiment.mix, experiment.corpora, sizes, experiment.mix.temperature)


def prepare_data(experiment: Experiment, as_json: bool = False) -> list[dict]:
    """Read and validate every corpus; a table (or JSON) and `data_report.json` in the workdir."""
    reports = [r.to_json() for r in prepare(experiment.corpora, experiment.tokenizer_dir)]
    waiting = [c.name for c in experiment.corpora
               if c.record_format != "text" and not (experiment.tokenizer_dir / "tokenizer.json").exists()]
    if waiting:
        print(f"note: the tuning records of {', '.join(waiting)} are measured in tokens (and checked against "
              f"`max_tokens`) once the tokenizer exists at {experiment.tokenizer_dir} (`dapt tokenizer train`); "
              "`dapt data build` does it then", flush=True)
    path = experiment.workpath / "data_report.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(reports, indent=1))
    print(json.dumps(reports, indent=1) if as_json else f"{format_accounting(reports)}\nreport: {path}")
    return reports


def build_stores(experiment: Experiment, data: DataConfig | None = None) -> list[dict]:
    """One token store per corpus; prints the read/kept/rejected accounting and the split.
    `data`: the executor settings, default the experiment's `data`."""
    experiment.stores_dir.mkdir(parents=True, exist_ok=True)
    manifests = build_corpus_stores(experiment.corpora, experiment.heldout, experiment.dedup, data or experiment.data,
                                    experiment.tokenizer_dir, experiment.stores_dir, experiment.launch.slurm.partition)
    for manifest in manifests:
        splits = manifest["splits"]
        cleaned = f", {manifest['decontaminated']:,} training documents removed as near-copies of held-out ones" \
            if manifest.get("decontaminated") else ""
        print(f"store {manifest['corpus']}: {'built' if manifest['rebuilt'] else 'up to date'}, "
              f"{splits['train']['tokens']:,} training tokens in {len(manifest['shards']['train'])} shard(s), "
              f"{splits['heldout']['documents']:,} held-out documents{cleaned}", flush=True)
    print(format_accounting([m["accounting"] for m in manifests]))
    return manifests


def inspect_stores(experiment: Experiment, samples: int, verify: bool = False) -> list[dict]:
    from transformers import AutoTokenizer

    experiment_stores(experiment, "train")
    if verify:
        verify_stores(experiment)
    rows = [store_statistics(experiment.stores_dir / c.name) for c in experiment.corpora]
    print(format_statistics(rows))
    if samples:
        tokenizer = AutoTokenizer.from_pretrained(experiment.tokenizer_dir)
        for corpus in experiment.corpora:
            for number, text in enumerate(sample_documents(experiment.stores_dir / corpus.name, tokenizer, samples,
                                                            experiment.seed), 1):
                print(f"\n--- {corpus.name}, sample {number} ---\n{text}")
    return rows


def verify_stores(experiment: Experiment) -> None:
    """Every store against the checksums written when it was built, and against its sources now."""
    problems = []
    request = BuildRequest.of(experiment)
    for corpus in experiment.corpora:
        folder = experiment.stores_dir / corpus.name
        problem = request.staleness(corpus) or checksum_problem(folder, read_manifest(folder))
        print(f"store {corpus.name}: {problem or 'verified (sizes, checksums, sources)'}")
        if problem:
            problems.append(f"token store {folder}: {problem}")
    if problems:
        raise DaptError("\n".join(problems) + "\nrebuild with `dapt data build` (it rebuilds stores that changed)")


def mix_plan(experiment: Experiment) -> str:
    stores = experiment_stores(experiment, "train")
    train = experiment.train
    batches = batch_sizes(train)
    schedule = build_schedule(experiment.corpora, experiment.mix, experiment.seed, stores, batches, train.steps,
                              train.decay_start)
    rows = plan(schedule, experiment.corpora, experiment.mix, batches, train.steps)
    table = format_plan(rows, experiment.mix.seq_len)
    figure = plot_plan(schedule, rows, batches, train.steps, experiment.workpath / "mix_plan.png", lr_curve(train))
    total = batches.first_sample(train.steps)
    print(f"mix plan: {total:,} samples of {experiment.mix.seq_len} tokens over {train.steps:,} steps\n{table}\nplot: {figure}")
    return table


def summary_table(results: dict, experiment: Experiment) -> str:
    groups = {c.name: c.group for c in experiment.corpora}
    lines = [f"{'corpus':<14}{'group':<11}{'held-out BPB before → after':>29}{'tokens seen':>13}{'share planned / realised':>27}"]
    for name, row in results["corpora"].items():
        lines.append(
            f"{name:<14}{groups[name]:<11}{row['bpb_before']:>18.3f} → {row['bpb_after']:<8.3f}{row['tokens_seen']:>13,}"
            f"{row['planned_share']:>17.2%} / {row['realised_share']:<7.2%}"
        )
    based = {name: row for name, row in results["corpora"].items() if "bpb_base" in row}
    if based:
        lines.append(f"step 0 against the base model with its own tokenizer ({experiment.model.embeddings}): " + ", ".join(
            f"{name} {row['bpb_before']:.3f} vs {row['bpb_base']:.3f}" for name, row in based.items()))
    lines.append(f"training loss {results['first_loss']:.3f} → {results['final_loss']:.3f}")
    return "\n".join(lines)


def sample_generation(model_dir: Path, prompt: str, new_tokens: int = 40) -> str:
    """Load the export as a user would and continue a prompt: proof that it generates."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0], skip_special_tokens=True)


def load_training_experiment(config: Path) -> Experiment:
    """The experiment of a command that starts training, its model checked before any process starts."""
    experiment, _ = load_experiment(config)
    check_model(experiment.model, experiment.mix.seq_len)
    return experiment


def run_flow(config: Path, nproc: int | None, resume: bool = True) -> None:
    """`dapt run`: every stage in order, training in `nproc` processes started by torchrun."""
    experiment = load_training_experiment(config)
    with workdir_lock(experiment.workpath):
        _run_stages(experiment, config, nproc, resume)


def _run_stages(experiment: Experiment, config: Path, nproc: int | None, resume: bool) -> None:
    print(f"== {experiment.name}: everything goes to {experiment.workdir}")
    print("== 1/5 tokenizer", flush=True)
    train_tokenizer(experiment)
    print("== 2/5 token stores", flush=True)
    build_stores(experiment)
    print("== 3/5 mix", flush=True)
    mix_plan(experiment)
    preflight(experiment, config, resume)
    if experiment.model.embeddings is not None:
        print(f"== the base model carried over ({experiment.model.embeddings})", flush=True)
        carry_over_in_a_process(experiment, config)
    print("== 4/5 training", flush=True)
    run_local(config, nproc or default_nproc(experiment), resume)
    if not experiment.results_file.exists() or latest_tag(experiment.checkpoints_dir) != tag_for(experiment.train.steps):
        raise DaptError("training stopped before its last step (by a signal); rerun the same command to resume it")
    print("== 5/5 export", flush=True)
    export_checkpoint(experiment.checkpoints_dir, experiment.export_dir)
    prompt = "Total revenue was"
    print(f"exported to {experiment.export_dir}; it continues {prompt!r} as:\n  {sample_generation(experiment.export_dir, prompt)!r}")
    results = json.loads(experiment.results_file.read_text())
    print(f"\n{summary_table(results, experiment)}")
    print(f"\nW&B run (offline): {results['wandb_run_dir']}\nmetrics: {experiment.workpath / 'metrics.jsonl'}")
    print(f"report: {build_report(experiment.workpath)} (`dapt report` redraws it)")
