"""Training throughput on tuning records: dapt's packed windows against one record per padded
sequence (the baseline: a batch of records padded to its longest, as a collator that pads does),
on the same records, in one run.

Both sides run the same forward, backward and AdamW step with dapt's loss on the completion
tokens only, so the only difference is the layout: packed windows hold several whole records
(`data_mix.records.pack`, positions restarting per record so that each reads only itself), and
a padded batch computes its padding too. Records are token ids with a long-tailed length, as
instruction data has (prompt log-normal, completion a label to a paragraph), or the records of
a built store (`--store DIR`, its training split). The model is a small Llama, or a base model
folder (`--base-model DIR`).

    python bench/packing.py [--records 384] [--seq-len 512] [--store STORE_DIR] [--base-model DIR]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from dapt.data_mix.records import pack, window
from dapt.pretrain.loss import install_chunked_loss, next_token_loss


def synthetic_records(count: int, seq_len: int, vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, trained, record ends) of `count` records no longer than a window."""
    rng = np.random.default_rng(0)
    prompts = np.clip(rng.lognormal(np.log(60), 0.9, count).astype(int), 4, seq_len // 2)
    completions = np.clip(rng.lognormal(np.log(12), 1.2, count).astype(int), 1, seq_len // 2)
    lengths = prompts + completions + 1  # the EOS, trained on
    trained = np.concatenate([np.r_[np.zeros(p), np.ones(c + 1)] for p, c in zip(prompts, completions)])
    return rng.integers(0, vocab, lengths.sum()), trained.astype(np.uint8), np.cumsum(lengths)


def store_records(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from dapt.data_mix.store import TokenStore

    store = TokenStore(folder, "train")
    if not store.records:
        raise SystemExit(f"{folder} is not a store of tuning records")
    return np.asarray(store.tokens, dtype=np.int64), np.asarray(store.trained), store.doc_ends


def packed_batches(ids, trained, ends, seq_len: int, batch: int) -> list[tuple]:
    bounds = pack(ends, seq_len)
    windows = [window(ids, trained, ends, bounds, w, seq_len, pad=0) for w in range(len(bounds) - 1)]
    return [tuple(torch.from_numpy(np.stack(part)) for part in zip(*windows[i:i + batch]))
            for i in range(0, len(windows), batch)]


def padded_batches(ids, trained, ends, batch: int) -> list[tuple]:
    """A batch of records in store order, right-padded to its longest: causal attention never reads
    the padding after a record, which the loss leaves out."""
    starts = np.concatenate([[0], ends[:-1]])
    out = []
    for first in range(0, len(ends), batch):
        spans = list(zip(starts[first:first + batch], ends[first:first + batch]))
        longest = max(end - start for start, end in spans)
        tokens = np.zeros((len(spans), longest), dtype=np.int64)
        targets = np.zeros((len(spans), longest - 1), dtype=bool)
        for row, (start, end) in enumerate(spans):
            tokens[row, :end - start] = ids[start:end]
            targets[row, :end - start - 1] = trained[start + 1:end]
        out.append((torch.from_numpy(tokens), torch.from_numpy(targets), None))
    return out


def model_for(base_model: str | None, vocab: int):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if base_model:
        return AutoModelForCausalLM.from_pretrained(base_model, attn_implementation="sdpa", dtype=torch.float32)
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096)
    return LlamaForCausalLM(config)


def run(model, batches: list[tuple]) -> float:
    """Seconds for one pass over `batches` (forward, backward, AdamW step each) after one warm-up batch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    trained_total = sum(int(targets.sum()) for _, targets, _ in batches)

    def step(tokens, targets, positions) -> None:
        next_token_loss(model, tokens, targets / trained_total, positions)[0].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(*batches[0])
    started = time.perf_counter()
    for batch in batches:
        step(*batch)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=384, help="synthetic records (without --store)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=4, help="packed windows per batch")
    parser.add_argument("--store", help="a store of tuning records built by `dapt data build`")
    parser.add_argument("--base-model", help="a Hugging Face causal LM folder (default: a small Llama)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    vocab = 8000
    ids, trained, ends = store_records(Path(args.store)) if args.store else synthetic_records(args.records, args.seq_len,
                                                                                               vocab)
    if args.base_model is None:
        ids = ids % vocab
    record_tokens = int(ends[-1])
    packed = packed_batches(ids, trained, ends, args.seq_len, args.windows)
    # As many records per padded batch as a packed batch holds on average: the same real tokens a batch.
    per_batch = max(1, round(len(ends) / len(packed)))
    padded = padded_batches(ids, trained, ends, per_batch)
    rows = []
    for name, batches in (("one record per padded sequence (baseline)", padded), ("dapt: packed windows", packed)):
        model = model_for(args.base_model, vocab)
        install_chunked_loss(model, 256)
        seconds = run(model, batches)
        computed = sum(tokens[:, :-1].numel() for tokens, _, _ in batches)
        rows.append((name, len(batches), computed, seconds, record_tokens / seconds))
    print(f"{len(ends)} records, {record_tokens:,} tokens ({int(trained.sum()):,} trained), windows of "
          f"{args.seq_len + 1}; model: {args.base_model or 'Llama 256x4'}; fp32, {torch.get_num_threads()} threads")
    print("| layout | batches | positions computed | padding | s | record tokens/s | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, count, computed, seconds, speed in rows:
        print(f"| {name} | {count} | {computed:,} | {1 - record_tokens / computed:.1%} | {seconds:.1f} | {speed:,.0f} "
              f"| {speed / rows[0][4]:.2f} |")


if __name__ == "__main__":
    main()
