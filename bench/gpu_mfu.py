"""Tokens/s and MFU of dapt's training step against the transformers Trainer with
DeepSpeed, in one run on one device: the same Llama-shape model (~1.1B parameters,
Llama-3.2-1B-like widths), sequence length 2048, bf16, ZeRO-2, the same micro-batch
and gradient accumulation, AdamW with the same hyper-parameters, random tokens.

dapt's side is its real step (`pretrain.train.train_step` with its chunked loss, on an engine
configured by `resolve_deepspeed_config`, with the step guard); the Trainer's side is
`transformers.Trainer(args=TrainingArguments(deepspeed=...))`, timed per optimizer
step by a callback. MFU uses dapt's formula (pretrain/metrics.py: 6·N + 12·L·H·S per
token) and the device's dense bf16 peak.

    python bench/gpu_mfu.py                       # on a GPU (H100/H200: peak known)
    python bench/gpu_mfu.py --tiny --steps 4      # a small model on CPU, to check the script runs
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

import numpy as np
import torch

from dapt.data_mix.loader import StepBatch
from dapt.pretrain.config import TrainConfig
from dapt.pretrain.ds_config import resolve_deepspeed_config
from dapt.pretrain.guard import StepGuard
from dapt.pretrain.loss import install_chunked_loss
from dapt.pretrain.metrics import flops_per_token, peak_flops
from dapt.pretrain.train import train_step

ONE_B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=32000)
TINY = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=2000)


def llama(shape: dict, seq_len: int, on_gpu: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**shape, max_position_embeddings=seq_len, tie_word_embeddings=False)
    return LlamaForCausalLM._from_config(config, attn_implementation="sdpa",
                                         dtype=torch.bfloat16 if on_gpu else torch.float32)


def random_tokens(steps: int, micro_steps: int, micro: int, seq_len: int, vocab: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab, (steps, micro_steps, micro, seq_len + 1))


def time_dapt(model, train: TrainConfig, tokens: np.ndarray, on_gpu: bool) -> list[float]:
    import deepspeed

    config = resolve_deepspeed_config({"zero_optimization": {"stage": 2}}, train, world_size=1, on_gpu=on_gpu)
    install_chunked_loss(model, train.loss_chunk_tokens)  # as the trainer does
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    guard = StepGuard(train.max_skipped_in_a_row, train.spike_window, train.spike_threshold)
    device = engine.device
    times = []
    for step, step_tokens in enumerate(tokens):
        corpus_ids = torch.zeros(step_tokens.shape[:2], dtype=torch.int64)
        batch = StepBatch(step, torch.from_numpy(step_tokens), corpus_ids, corpus_ids.numpy().ravel(),
                          step_tokens[..., 1:].size)
        started = time.perf_counter()
        sums, applied = train_step(engine, batch, 1, device)
        guard.record((sums[0].sum() / sums[1].sum()).item(), applied)  # .item() waits for the step to finish
        times.append(time.perf_counter() - started)
    engine.destroy()
    return times


def time_trainer(model, train: TrainConfig, tokens: np.ndarray, on_gpu: bool) -> list[float]:
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    flat = tokens.reshape(-1, tokens.shape[-1])
    dataset = Dataset.from_dict({"input_ids": flat[:, :-1].tolist(), "labels": flat[:, :-1].tolist()})
    ds_config = {"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"},
                 "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                 "train_batch_size": "auto", "gradient_clipping": "auto"}
    if not on_gpu:
        ds_config["zero_force_ds_cpu_optimizer"] = False
    stamps: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if not stamps:
                stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            if on_gpu:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=os.path.join(os.environ.get("TMPDIR", "/tmp"), "gpu_mfu_trainer"), max_steps=len(tokens),
        per_device_train_batch_size=train.micro_batch_size,
        gradient_accumulation_steps=train.global_batch_size // train.micro_batch_size,
        learning_rate=train.lr, weight_decay=train.weight_decay, adam_beta1=train.betas[0], adam_beta2=train.betas[1],
        max_grad_norm=train.grad_clip, lr_scheduler_type="constant", bf16=on_gpu, use_cpu=not on_gpu,
        deepspeed=ds_config, report_to=[], save_strategy="no", logging_steps=10**9, dataloader_drop_last=True,
    )
    Trainer(model=model, args=args, train_dataset=dataset, callbacks=[StepTimes()]).train()
    return [b - a for a, b in zip(stamps, stamps[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per side (the first 2 not timed)")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=4, help="micro-batches per optimizer step")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--tiny", action="store_true", help="a small model on CPU, to check the script runs")
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available() and not args.tiny
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29511"))
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", verbose=False)
    shape, seq_len = (TINY, 64) if args.tiny else (ONE_B, args.seq_len)
    train = TrainConfig(steps=10**6, global_batch_size=args.micro_batch * args.accumulation,
                        micro_batch_size=args.micro_batch, lr=3e-4, schedule="constant",
                        precision="bf16" if on_gpu else "fp32")
    tokens = random_tokens(args.steps, args.accumulation, args.micro_batch, seq_len, shape["vocab_size"])

    results = {}
    for side, timer in (("transformers Trainer + DeepSpeed (baseline)", time_trainer), ("dapt train step", time_dapt)):
        model = llama(shape, seq_len, on_gpu)
        per_token = flops_per_token(model, seq_len)
        parameters = sum(p.numel() for p in model.parameters())
        step_times = timer(model, train, tokens, on_gpu)[2:]
        results[side] = train.global_batch_size * seq_len / statistics.median(step_times)
        del model
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()

    peak = peak_flops(None) if on_gpu else None
    device = torch.cuda.get_device_name() if on_gpu else "CPU"
    print(f"MFU benchmark: Llama {parameters / 1e6:,.0f}M parameters, seq {seq_len}, batch {train.global_batch_size} "
          f"({args.micro_batch} x {args.accumulation} accumulation), {train.precision}, ZeRO-2, 1 x {device}, "
          f"{args.steps - 2} timed steps; baseline: transformers Trainer with DeepSpeed")
    print(f"{'what':<46}{'tokens/s':>12}{'MFU':>9}{'ratio':>9}")
    baseline = results["transformers Trainer + DeepSpeed (baseline)"]
    for side, tokens_per_s in results.items():
        utilisation = f"{tokens_per_s * per_token / peak:.1%}" if peak else "n/a"
        print(f"{side:<46}{tokens_per_s:>12,.0f}{utilisation:>9}{tokens_per_s / baseline:>9.3f}")


if __name__ == "__main__":
    main()
