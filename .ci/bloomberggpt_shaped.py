"""Write a BloombergGPT-shaped experiment into the current folder: the wheel's own
configs/bloomberggpt.yaml (eight corpora in two groups, the paper's weights, epoch caps)
with small synthetic corpora at its paths, and a tokenizer, sequence length and step
count small enough for a CPU. Used by .ci/wheel-check to run `dapt mix plan` on it."""

import json
import random
from importlib.resources import files
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from dapt.data_mix.demo_corpora import article, filing, news, web_page

rng = random.Random(0)
TEXTS = {"finpile_web": lambda: web_page(rng), "news": lambda: "\n\n".join(news(rng)), "filings": lambda: filing(rng),
         "press": lambda: "\n\n".join(news(rng)), "bloomberg": lambda: "\n\n".join(news(rng)),
         "pile": lambda: "\n\n".join(article(rng)), "c4": lambda: web_page(rng), "wikipedia": lambda: "\n\n".join(article(rng))}

config = yaml.safe_load((files("dapt.configs") / "bloomberggpt.yaml").read_text())
for corpus in config["corpora"]:
    pattern = Path(corpus["paths"][0])  # e.g. data/finpile/web/*.jsonl
    pattern.parent.mkdir(parents=True, exist_ok=True)
    texts = [TEXTS[corpus["name"]]() for _ in range(300)]
    if pattern.suffix == ".parquet":
        pq.write_table(pa.table({"text": texts}), pattern.parent / "part-0.parquet")
    else:
        (pattern.parent / "part-0.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
config["tokenizer"]["train"] |= {"vocab_size": 1000, "sample_bytes": 2.0e6}
config["mix"]["seq_len"] = 128
config["train"] |= {"steps": 400, "global_batch_size": 64, "micro_batch_size": 8, "warmup_steps": 10}
Path("bloomberggpt.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
print("wrote bloomberggpt.yaml and its eight corpora under data/")
