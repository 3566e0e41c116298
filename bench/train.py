"""Step time of dapt's training step against a bare PyTorch loop, in one run: the same
tiny Llama, the same batches, AdamW with the same hyper-parameters and clipping, fp32
on CPU in one process. dapt's side is its real step (`pretrain.train.train_step` on a
DeepSpeed ZeRO-0 engine configured by `resolve_deepspeed_config`) plus the per-step
bookkeeping of its loop (per-corpus loss reduction, ledger, metrics).

    python bench/train.py [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from dapt.data_mix.ledger import MixLedger
from dapt.data_mix.loader import StepBatch
from dapt.pretrain.config import TrainConfig
from dapt.pretrain.ds_config import resolve_deepspeed_config
from dapt.pretrain.guard import StepGuard
from dapt.pretrain.loss import install_chunked_loss
from dapt.pretrain.train import step_metrics, train_step

VOCAB, SEQ, MICRO, CORPORA = 8000, 256, 8, 4


def tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ)
    return LlamaForCausalLM(config)


def batches(steps: int) -> list[StepBatch]:
    rng = np.random.default_rng(0)
    out = []
    for step in range(steps):
        tokens = torch.from_numpy(rng.integers(0, VOCAB, (1, MICRO, SEQ + 1)))
        corpora = rng.integers(0, CORPORA, (1, MICRO))
        out.append(StepBatch(step, tokens, torch.from_numpy(corpora), corpora.ravel(), tokens[..., 1:].numel()))
    return out


def bare_step(model, optimizer, batch: StepBatch) -> float:
    tokens = batch.tokens[0]
    logits = model(input_ids=tokens[:, :-1]).logits
    loss = F.cross_entropy(logits.float().transpose(1, 2), tokens[:, 1:], reduction="none").mean(dim=1).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per side (after 3 warm-up steps)")
    args = parser.parse_args()
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29517",
                      DS_ACCELERATOR="cpu")  # one process, no launcher; read when deepspeed is imported
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    train = TrainConfig(steps=1000, global_batch_size=MICRO, micro_batch_size=MICRO, lr=1e-3, warmup_steps=1,
                        schedule="constant", precision="fp32", weight_decay=0.1)
    config = resolve_deepspeed_config({"zero_optimization": {"stage": 0}}, train, world_size=1, on_gpu=False)
    model = tiny_llama(0)
    install_chunked_loss(model, train.loss_chunk_tokens)  # as the trainer does: dapt's default chunked loss
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    bare = tiny_llama(0)
    optimizer = torch.optim.AdamW(bare.parameters(), lr=train.lr, betas=train.betas, eps=1e-8, weight_decay=train.weight_decay)
    ledger = MixLedger([f"c{i}" for i in range(CORPORA)], SEQ)
    names = ledger.names
    steps = batches(3 + args.steps)

    guard = StepGuard(train.max_skipped_in_a_row, train.spike_window, train.spike_threshold)

    def dapt_step(batch: StepBatch) -> float:
        started = time.perf_counter()
        lr = engine.get_lr()[0]
        sums, applied = train_step(engine, batch, CORPORA, torch.device("cpu"))
        ledger.record(batch.global_corpus_ids)
        metrics = step_metrics(sums, names, engine, lr, time.perf_counter() - started, SEQ, 1.0, None) | ledger.metrics()
        return (metrics | guard.record(metrics["train/loss"], applied))["train/loss"]

    times: dict[str, list[float]] = {"bare": [], "dapt": []}
    losses: dict[str, list[float]] = {"bare": [], "dapt": []}
    for index, batch in enumerate(steps):  # the two sides alternate, so drift hits both alike
        for side, step in (("bare", lambda b: bare_step(bare, optimizer, b)), ("dapt", dapt_step)):
            started = time.perf_counter()
            losses[side].append(step(batch))
            if index >= 3:
                times[side].append(time.perf_counter() - started)
    bare_time, dapt_time = statistics.median(times["bare"]), statistics.median(times["dapt"])
    deviation = max(abs(a - b) for a, b in zip(losses["bare"], losses["dapt"]))
    parameters = sum(p.numel() for p in bare.parameters())
    print(f"train step benchmark: Llama {parameters / 1e6:.1f}M, batch {MICRO}x{SEQ}, fp32, CPU, 1 process, "
          f"{args.steps} steps; baseline: bare PyTorch AdamW loop")
    print(f"{'what':<44}{'median step':>14}{'ratio':>10}")
    print(f"{'bare PyTorch loop (baseline)':<44}{bare_time * 1e3:>11.1f} ms{1.0:>10.3f}")
    print(f"{'dapt train step (DeepSpeed ZeRO-0)':<44}{dapt_time * 1e3:>11.1f} ms{dapt_time / bare_time:>10.3f}")
    print(f"largest loss difference over {len(steps)} steps: {deviation:.2e}")


if __name__ == "__main__":
    main()
