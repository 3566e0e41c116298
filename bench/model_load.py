"""Host memory of the ranks while a base model is loaded and the ZeRO-3 engine built, dapt against
every rank loading the whole model in fp32 (what dapt did before, and what a plain
`from_pretrained(dtype=torch.float32)` + `deepspeed.initialize` script does).

    python bench/model_load.py --base-model DIR [--nproc 2] [--precision bf16] [--domain-tokenizer DIR]

Each rank samples its anonymous resident memory (RssAnon: what it has allocated; a memory-mapped
weight file is the page cache's, shared by the ranks and given back under pressure) every few
milliseconds, from after its imports and process group. Reported per way: the ranks' peaks added
up while the model is built, as a multiple of one fp32 copy of the weights, and through
`deepspeed.initialize` (which adds the optimizer's fp32 master weights and gradient partitions,
whatever loaded the model). The base model is measured as stored in DIR and saved in bf16, as
hub models usually are. With `--domain-tokenizer`, a third way: rank 0 carries the model over to
that tokenizer (`model.embeddings: transplant`) and writes it once, then every rank loads the
result as dapt's training does.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

WAYS = {"every rank fp32 (baseline)": "baseline", "dapt": "dapt", "dapt, carried over by rank 0": "carry-over"}


def anonymous_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakSampler(threading.Thread):
    """The highest RssAnon seen since the last `take`, sampled every 2 ms."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = anonymous_bytes()
        self.start()

    def run(self) -> None:
        while True:
            self.peak = max(self.peak, anonymous_bytes())
            time.sleep(0.002)

    def take(self) -> int:
        self.peak = max(self.peak, anonymous_bytes())
        peak, self.peak = self.peak, anonymous_bytes()
        return peak


def worker(way: str, base: Path, precision: str, domain_tokenizer: Path | None, workdir: Path, out: Path) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations import HfDeepSpeedConfig

    from dapt.pretrain.config import ModelConfig, TrainConfig
    from dapt.pretrain.ds_config import resolve_deepspeed_config
    from dapt.pretrain.model import PRECISION_DTYPES, build_model, write_carried_over

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    world = dist.get_world_size()
    train = TrainConfig(steps=10, global_batch_size=world, micro_batch_size=1, lr=1e-4, precision=precision)
    ds_config = resolve_deepspeed_config({"zero_optimization": {"stage": 3}}, train, world, on_gpu=False)
    tokenizer = AutoTokenizer.from_pretrained(domain_tokenizer if way == "carry-over" else base)
    dist.barrier()
    floor = anonymous_bytes()
    sampler = PeakSampler()
    if way == "baseline":
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    else:
        config = ModelConfig(path=str(base), embeddings="transplant" if way == "carry-over" else None)
        folder = None
        if way == "carry-over":
            if dist.get_rank() == 0:
                write_carried_over(config, domain_tokenizer, workdir / "carried-over")
            dist.barrier()
            folder = workdir / "carried-over"
        zero3_loading = HfDeepSpeedConfig(ds_config)  # noqa: F841 (alive while the model is built, as in training)
        model = build_model(config, tokenizer, seed=0, activation_checkpointing=False, folder=folder,
                            dtype=PRECISION_DTYPES[precision])
    load = sampler.take()
    deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    engine = max(load, sampler.take())
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps({"load": load - floor, "engine": engine - floor}))


def measure(way: str, base: Path, args, scratch: Path) -> dict[str, list[int]]:
    out = scratch / f"{base.name}-{way}"
    out.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               __file__, "--worker", way, "--base-model", str(base), "--precision", args.precision,
               "--workdir", str(out), "--out", str(out)]
    if args.domain_tokenizer:
        command += ["--domain-tokenizer", str(args.domain_tokenizer)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    if result.returncode != 0:
        raise SystemExit(f"{way} failed:\n{result.stderr[-3000:]}")
    ranks = [json.loads(path.read_text()) for path in sorted(out.glob("rank*.json"))]
    return {"load": [r["load"] for r in ranks], "engine": [r["engine"] for r in ranks]}


def stored_in_bf16(base: Path, scratch: Path) -> Path:
    """The base model saved in bf16 beside its tokenizer, as the hub ships most models."""
    from transformers import AutoModelForCausalLM

    from dapt.tokenizer.files import copy_tokenizer_files

    folder = scratch / f"{base.name}-stored-bf16"
    AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).save_pretrained(folder)
    copy_tokenizer_files(base, folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", type=Path, required=True, help="a Hugging Face model folder")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--domain-tokenizer", type=Path, help="also measure a carry-over to this tokenizer")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.base_model, args.precision, args.domain_tokenizer, args.workdir, args.out)
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.base_model)).parameters())
    fp32 = parameters * 4
    ways = [w for w in WAYS.items() if w[1] != "carry-over" or args.domain_tokenizer]
    print(f"host memory (RssAnon) of {args.nproc} ranks loading {args.base_model.name} ({parameters / 1e6:.1f}M parameters, "
          f"{fp32 / 2**20:,.0f} MiB in fp32) with ZeRO-3, {args.precision} training; baseline: {ways[0][0]}")
    print(f"{'stored':<10}{'way':<32}{'load, MiB per rank':>20}{'load ÷ fp32':>13}{'+ engine, MiB per rank':>24}"
          f"{'+ engine ÷ fp32':>17}{'load ÷ baseline':>17}")
    with tempfile.TemporaryDirectory() as scratch:
        stored = {"as given": args.base_model, "bf16": stored_in_bf16(args.base_model, Path(scratch))}
        for stored_as, base in stored.items():
            baseline = None
            for label, way in ways:
                peaks = measure(way, base, args, Path(scratch))
                load, engine = sum(peaks["load"]), sum(peaks["engine"])
                baseline = baseline or load
                per_rank = lambda values: " + ".join(f"{v / 2**20:,.0f}" for v in values)  # noqa: E731
                print(f"{stored_as:<10}{label:<32}{per_rank(peaks['load']):>20}{load / fp32:>13.2f}"
                      f"{per_rank(peaks['engine']):>24}{engine / fp32:>17.2f}{load / baseline:>17.2f}", flush=True)


if __name__ == "__main__":
    main()
