"""Forgetting against replay: a real base model continued on the demo's financial corpora with
0%, 5% and 25% of its tokens replayed from the public corpora, at equal tokens, and the held-out
bits-per-byte of both groups before and after. The baseline is the run without replay: what it
forgets of public text is what replay is for.

    python bench/replay.py --base-model ~/.cache/dapt-tests/smollm2-135m [--steps 40] [--seq-len 256]
        [--lr 1e-4] [--shares 0 0.05 0.25] [--workdir runs/replay-bench]

The runs are one `dapt sweep` (a grid over the public group's share; the financial group takes the
rest) on the base model with its own tokenizer, so that they share the token stores and the
process group; each run's held-out BPB per corpus is read back from its `results.json`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def experiment(workdir: Path, args: argparse.Namespace) -> Path:
    """The sweep's experiment: the demo corpora, the base model with its own tokenizer, a grid over replay."""
    from dapt.data_mix.demo_corpora import write_demo_corpora

    write_demo_corpora(workdir / "data", seed=7, scale=args.scale)
    corpora = yaml.safe_load(DEMO_CONFIG.read_text())["corpora"]
    config = {
        "name": "replay-bench", "workdir": str(workdir), "corpora": corpora,
        "heldout": {"fraction": 0.1, "max_documents": 200},
        "tokenizer": {"path": str(args.base_model)}, "model": {"path": str(args.base_model)},
        "mix": {"seq_len": args.seq_len, "group_weights": {"financial": 1.0, "public": 0.0}},
        "train": {"steps": args.steps, "global_batch_size": 8, "micro_batch_size": 4, "lr": args.lr,
                  "warmup_steps": max(1, args.steps // 10), "schedule": "cosine", "precision": "fp32",
                  "eval_max_tokens": args.eval_tokens, "log_every": 10},
        "deepspeed": {"zero_optimization": {"stage": 2}},
        "wandb": {"mode": "disabled"},
        "sweep": {"grid": {"group": "public", "shares": args.shares}},
    }
    path = workdir / "experiment.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def group_bpb(corpora: dict, members: list[str], when: str) -> float:
    return float(np.mean([corpora[name][f"bpb_{when}"] for name in members]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", type=Path, required=True, help="a Hugging Face folder (weights and tokenizer)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.05, 0.25], help="public shares (replay)")
    parser.add_argument("--scale", type=float, default=0.3, help="size of the demo corpora")
    parser.add_argument("--eval-tokens", type=int, default=20_000, help="held-out tokens per corpus per evaluation")
    parser.add_argument("--workdir", type=Path, help="kept for inspection (default: a temporary folder)")
    args = parser.parse_args()
    if 0.0 not in args.shares:
        sys.exit("--shares must include 0: the run without replay is the baseline")

    with tempfile.TemporaryDirectory() as scratch:
        workdir = (args.workdir or Path(scratch) / "replay").resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        path = experiment(workdir, args)
        done = subprocess.run([sys.executable, "-m", "dapt", "sweep", str(path)])
        if done.returncode != 0:
            sys.exit(f"the sweep failed (exit {done.returncode}); its runs' logs are under {workdir / 'sweep' / 'runs'}")
        groups: dict[str, list[str]] = {}
        for corpus in yaml.safe_load(path.read_text())["corpora"]:
            groups.setdefault(corpus["group"], []).append(corpus["name"])
        rows = []
        for results in sorted((workdir / "sweep" / "runs").glob("*/results.json")):
            run = yaml.safe_load((results.parent / "experiment.yaml").read_text())
            corpora = json.loads(results.read_text())["corpora"]
            tokens = sum(row["tokens_seen"] for row in corpora.values())
            rows.append((run["mix"]["group_weights"]["public"], tokens,
                         *(group_bpb(corpora, groups[g], w) for g in ("financial", "public") for w in ("before", "after"))))
    rows.sort()
    baseline = rows[0]
    print(f"replay benchmark: {args.base_model.name}, {args.steps} steps of 8 x {args.seq_len} tokens, lr {args.lr:g}; "
          "held-out BPB, mean over each group's corpora; baseline: the run without replay (0%)")
    print(f"{'public replay':>14}{'tokens':>10}{'financial before → after':>27}{'public before → after':>24}"
          f"{'public forgotten':>18}{'public ÷ 0% run':>17}")
    for share, tokens, fin_before, fin_after, pub_before, pub_after in rows:
        print(f"{share:>14.0%}{tokens:>10,}{fin_before:>16.3f} → {fin_after:<8.3f}{pub_before:>13.3f} → {pub_after:<8.3f}"
              f"{pub_after / pub_before - 1:>+17.1%}{pub_after / baseline[5]:>16.3f}x")


if __name__ == "__main__":
    main()
