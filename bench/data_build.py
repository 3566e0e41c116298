"""Benchmark of `dapt data build` on a generated corpus, against (a) the raw batched
fast tokenizer on the same text (the ceiling) and (b) `datasets` load + map(tokenize,
batched=True, num_proc=cores) + save_to_disk (the usual baseline), in one run; and
dapt's peak RSS at two corpus sizes (it should not grow with the corpus).

    python bench/data_build.py [--size-mb 200]

Each measurement runs in its own process; its peak RSS is that process's peak plus
its largest worker's (an upper bound when workers run together is their sum).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = r"""
import json, os, resource, sys, time
from pathlib import Path
kind, corpus, tokenizer_dir, out = sys.argv[1:5]
if kind == "dapt":  # each timer starts after the imports: a one-off cost, not per corpus
    from dapt.data_mix.build import build_store
    from dapt.data_mix.config import CorpusConfig, HeldoutConfig
    started = time.perf_counter()
    manifest = build_store(CorpusConfig(name="bench", paths=[corpus]), HeldoutConfig(), Path(tokenizer_dir), Path(out))
    tokens = manifest["splits"]["train"]["tokens"] + manifest["splits"]["heldout"]["tokens"]
elif kind == "raw":
    from transformers import AutoTokenizer
    started = time.perf_counter()
    encoder = AutoTokenizer.from_pretrained(tokenizer_dir).backend_tokenizer
    texts = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
    started = time.perf_counter()  # the ceiling: tokenising text already in memory
    tokens = sum(len(e.ids) + 1 for i in range(0, len(texts), 1024)
                 for e in encoder.encode_batch_fast(texts[i:i + 1024], add_special_tokens=False))
else:
    import datasets
    from transformers import AutoTokenizer
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    data = datasets.load_dataset("json", data_files=corpus, split="train", cache_dir=out + "/cache")
    mapped = data.map(lambda b: tokenizer(b["text"]), batched=True, num_proc=os.cpu_count(), remove_columns=["text"])
    mapped.save_to_disk(out + "/saved")
    tokens = sum(len(ids) for ids in mapped["input_ids"])
seconds = time.perf_counter() - started
# Worker processes count too: this process's peak plus the largest child's (children end before this).
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"tokens": tokens, "seconds": seconds, "peak_rss_mb": peak / 1024}))
"""


def make_corpus(path: Path, size_mb: float, pool: list[str]) -> None:
    """JSONL of demo-style documents, each made unique, up to `size_mb` MB."""
    rng = random.Random(0)
    written, number = 0, 0
    with open(path, "w", encoding="utf-8") as out:
        while written < size_mb * 1e6:
            text = f"{rng.choice(pool)}\n\nDocument {number}: {rng.choice(pool)[:300]}"
            line = json.dumps({"text": text}) + "\n"
            out.write(line)
            written += len(line)
            number += 1


def run(kind: str, corpus: Path, tokenizer_dir: Path, scratch: Path) -> dict:
    out = scratch / f"{kind}-{corpus.stem}"
    out.mkdir()
    result = subprocess.run([sys.executable, "-c", WORKER, kind, str(corpus), str(tokenizer_dir), str(out)],
                            capture_output=True, text=True, check=True, env=os.environ | {"TOKENIZERS_PARALLELISM": "true"})
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=200.0, help="size of the large corpus (the small one is half)")
    args = parser.parse_args()

    from dapt.data_mix.demo_corpora import article, filing, news, web_page
    from dapt.tokenizer.config import TokenizerTrainConfig
    from dapt.tokenizer.train import train_from_sample

    rng = random.Random(1)
    pool = [filing(rng) for _ in range(300)] + ["\n\n".join(news(rng)) for _ in range(300)]
    pool += ["\n\n".join(article(rng)) for _ in range(300)] + [web_page(rng) for _ in range(300)]
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        lines = [line for doc in pool for line in doc.split("\n") if line]
        tokenizer_dir = train_from_sample(lines, TokenizerTrainConfig(vocab_size=4000), scratch / "tokenizer")
        large, small = scratch / "large.jsonl", scratch / "small.jsonl"
        make_corpus(large, args.size_mb, pool)
        make_corpus(small, args.size_mb / 2, pool)
        results = {
            "raw": run("raw", small, tokenizer_dir, scratch),
            "dapt": run("dapt", large, tokenizer_dir, scratch),
            "dapt_small": run("dapt", small, tokenizer_dir, scratch),
            "datasets": run("datasets", large, tokenizer_dir, scratch),
        }
    rate = {name: r["tokens"] / r["seconds"] for name, r in results.items()}
    size = f"{args.size_mb:g} MB"
    print(f"data build benchmark on {os.cpu_count()} cores; baselines: raw batched fast tokenizer, datasets map + save")
    print(f"{'what':<52}{'tokens/s':>12}{'peak RSS':>12}{'dapt ÷ it':>12}")
    rows = [
        (f"raw encode_batch_fast, text in memory ({args.size_mb / 2:g} MB)", "raw"),
        (f"datasets load + map(num_proc) + save_to_disk ({size})", "datasets"),
        (f"dapt data build ({args.size_mb / 2:g} MB)", "dapt_small"),
        (f"dapt data build ({size})", "dapt"),
    ]
    for label, name in rows:
        ratio = "" if name.startswith("dapt") else f"{rate['dapt'] / rate[name]:.2f}x"
        print(f"{label:<52}{rate[name]:>12,.0f}{results[name]['peak_rss_mb']:>9,.0f} MB{ratio:>12}")


if __name__ == "__main__":
    main()
