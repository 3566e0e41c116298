"""Benchmark of the mix: dapt's schedule and loader against Megatron's blend and
`datasets.interleave_datasets`, on BloombergGPT's eight shares, in one run.

    pip install -e '.[bench]'      # adds megatron-core (without its dependencies)
    python bench/mix.py [--quick]

Prints one table. Every ratio is dapt ÷ baseline, both measured in this run.
"""

from __future__ import annotations

import argparse
import glob
import importlib.machinery
import importlib.util
import json
import os
import sysconfig
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from dapt.data_mix.batches import BatchSizes
from dapt.data_mix.blend import MixSchedule, Stage
from dapt.data_mix.loader import MixLoader
from dapt.data_mix.plan import worst_prefix_deviation
from dapt.data_mix.store import TokenStore, file_records

NAMES = ["finpile_web", "news", "filings", "press", "bloomberg", "pile", "c4", "wikipedia"]
SHARES = np.array([42.01, 5.31, 2.04, 1.21, 0.70, 25.9, 19.48, 3.35])
SHARES = SHARES / SHARES.sum()


def schedule(samples_per_corpus: list[int] | None = None) -> MixSchedule:
    return MixSchedule(NAMES, [Stage(0, SHARES)], samples_per_corpus or [10**6] * len(NAMES), seed=1234)


def timed(function):
    started = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started


def schedule_generation(samples: int) -> tuple[float, int]:
    """Samples/s to reach sample `samples` from nothing, and the peak Python-side memory it took."""
    tracemalloc.start()
    fresh = schedule()
    _, seconds = timed(lambda: fresh.counts_before(samples))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return samples / seconds, peak


def write_random_store(folder: Path, corpus: str, tokens: int, rng: np.random.Generator) -> TokenStore:
    """A store with the documented layout, filled with random ids (reading cost is what is measured)."""
    folder.mkdir(parents=True)
    splits = {}
    for split, count in (("train", tokens), ("heldout", 1000)):
        rng.integers(0, 32000, count, dtype=np.uint16).tofile(folder / f"{split}.bin")
        ends = np.arange(1000, count + 1, 1000, dtype=np.int64)
        np.save(folder / f"{split}.docs.npy", np.stack([ends, np.full_like(ends, 4000)], axis=1))
        splits[split] = {"documents": len(ends), "tokens": count}
    manifest = {"corpus": corpus, "dtype": "uint16", "splits": splits, "tokenizer_hash": "random ids",
                "files": file_records(folder, records=False)}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return TokenStore(folder, "train")


def loader_throughput(workers: int, steps: int) -> float:
    seq_len, micro, global_batch = 512, 8, 64
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as scratch:
        stores = [write_random_store(Path(scratch) / n, n, 4_000_000, rng) for n in NAMES]
        mix = schedule([s.num_samples(seq_len) for s in stores])
        loader = MixLoader(mix, stores, seq_len, micro, BatchSizes(global_batch), rank=0, world_size=1, num_workers=workers)
        _, seconds = timed(lambda: sum(1 for _ in loader.iterate(steps)))
    return steps * global_batch / seconds


def interleave_datasets_baseline(samples: int) -> tuple[float, float]:
    from datasets import Dataset, interleave_datasets

    parts = [Dataset.from_dict({"corpus": [i] * int(share * samples * 1.5 + 100)}) for i, share in enumerate(SHARES)]
    def run():
        mixed = interleave_datasets(parts, probabilities=SHARES.tolist(), seed=0, stopping_strategy="first_exhausted")
        return np.concatenate([batch["corpus"] for batch in mixed.select(range(samples)).iter(batch_size=10_000)])
    corpus_ids, seconds = timed(run)
    return samples / seconds, worst_prefix_deviation(corpus_ids, SHARES)


def megatron_helper():
    """Megatron's compiled blend, loaded from the megatron-core wheel without importing megatron.core."""
    paths = glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "megatron/core/datasets/helpers_cpp*.so"))
    if not paths:
        return None
    loader = importlib.machinery.ExtensionFileLoader("helpers_cpp", paths[0])
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("helpers_cpp", loader))
    loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10^8 instead of 10^9 samples for the long schedule")
    args = parser.parse_args()
    long_run = 10**8 if args.quick else 10**9
    rows: list[tuple[str, str, str, str]] = []

    small_rate, small_memory = schedule_generation(10**6)
    long_rate, long_memory = schedule_generation(long_run)
    rows.append(("(a) schedule to 1e6 samples: samples/s", f"{small_rate / 1e6:.1f}M", "", ""))
    rows.append((f"(a) schedule to {long_run:.0e} samples: samples/s", f"{long_rate / 1e6:.1f}M", "", ""))
    rows.append((f"(a) peak memory at 1e6 / {long_run:.0e}", f"{small_memory / 1e3:.0f} / {long_memory / 1e3:.0f} KB", "", ""))

    for workers in (0, 2):
        rows.append((f"(b) loader, seq 512, {workers} workers: samples/s", f"{loader_throughput(workers, 200):,.0f}", "", ""))

    samples = 10**6
    (corpus_ids, _), seconds = timed(lambda: schedule().assign(0, samples))
    ours_rate, ours_deviation = samples / seconds, worst_prefix_deviation(corpus_ids, SHARES)
    theirs_rate, theirs_deviation = interleave_datasets_baseline(samples)
    rows.append(("(c) 1e6 (corpus, sample) pairs: samples/s", f"{ours_rate / 1e6:.2f}M", f"{theirs_rate / 1e6:.3f}M",
                 f"{ours_rate / theirs_rate:.0f}x"))
    rows.append(("(c) worst prefix deviation (samples)", f"{ours_deviation:.3f}", f"{theirs_deviation:.1f}",
                 f"{ours_deviation / theirs_deviation:.4f}"))

    helper = megatron_helper()
    samples = 10**7
    fresh = schedule()
    (corpus_ids, _), ours_seconds = timed(lambda: fresh.draws(0, samples))
    ours_deviation = worst_prefix_deviation(corpus_ids, SHARES)
    kept = sum(snapshot.nbytes for stage in fresh._snapshots for snapshot in stage)
    if helper is None:
        rows.append(("(d) Megatron helper", "", "not installed: pip install -e '.[bench]'", ""))
    else:
        def megatron_build():  # allocating the output is part of the build, as it is for dapt
            indices = np.zeros(samples, dtype=np.int16), np.zeros(samples, dtype=np.int64)
            helper.build_blending_indices(*indices, SHARES, len(SHARES), samples, False)
            return indices

        (dataset_index, sample_index), theirs_seconds = timed(megatron_build)
        theirs_deviation = worst_prefix_deviation(dataset_index, SHARES)
        rows.append(("(d) build 1e7 samples: seconds", f"{ours_seconds:.3f}", f"{theirs_seconds:.3f}",
                     f"{theirs_seconds / ours_seconds:.2f}x faster"))
        rows.append(("(d) bytes kept per sample", f"{kept / samples:.1e}",
                     f"{(dataset_index.nbytes + sample_index.nbytes) / samples:.0f}", ""))
        rows.append(("(d) worst prefix deviation (samples)", f"{ours_deviation:.3f}", f"{theirs_deviation:.3f}",
                     f"{ours_deviation / theirs_deviation:.2f}"))

    print("mix benchmark: 8 corpora at BloombergGPT's shares; baselines: (c) datasets.interleave_datasets, (d) Megatron-core blend")
    print(f"{'what':<46}{'dapt':>18}{'baseline':>22}{'ratio':>14}")
    for what, ours, theirs, ratio in rows:
        print(f"{what:<46}{ours:>18}{theirs:>22}{ratio:>14}")


if __name__ == "__main__":
    main()
