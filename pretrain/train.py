"""`dapt train`: continued pretraining on every rank of a torchrun/DeepSpeed job.

In: the experiment, its tokenizer and token stores (built by `dapt tokenizer
train` and `dapt data build`). Out: checkpoints, `metrics.jsonl`, a W&B run and
`results.json` (per corpus: held-out BPB before and after, tokens seen, planned vs
realised share). The step loop only sequences; the math of one step, evaluation,
checkpointing and tracking live in their own functions and modules.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data_mix.blend import build_schedule
from data_mix.ledger import MixLedger
from data_mix.loader import MixLoader, StepBatch
from data_mix.plan import plan
from data_mix.store import open_stores, tokenizer_hash
from launch.env import discover, export_for_torch
from launch.experiment import Experiment, experiment_hash
from pretrain.checkpoint import latest_tag, save_checkpoint, saved_world_size
from pretrain.ds_config import resolve_deepspeed_config
from pretrain.evaluate import heldout_bpb
from pretrain.guard import (StepGuard, engine_checks_overflow, injected_nan_steps, loss_for_backward,
                           step_skipping_nonfinite_gradients)
from pretrain.metrics import flops_per_token, mfu, peak_flops
from pretrain.model import build_model
from pretrain.progress import Progress
from pretrain.resume import gather_rng_states, load_latest, restore_rng_states
from pretrain.stop import StopRequest
from pretrain.tracking import Tracker


def train_step(engine, batch: StepBatch, num_corpora: int, device: torch.device,
               inject_nan: bool = False) -> tuple[torch.Tensor, bool]:
    """One optimizer step. Returns per corpus [Σ per-sample token-mean loss, samples], summed over
    ranks, and whether the update was applied (not skipped for a non-finite loss or gradient)."""
    sums = torch.zeros(2, num_corpora, dtype=torch.float64, device=device)
    for tokens, corpus_ids in zip(batch.tokens.to(device), batch.corpus_ids.to(device)):
        logits = engine(input_ids=tokens[:, :-1]).logits
        per_token = F.cross_entropy(logits.float().transpose(1, 2), tokens[:, 1:], reduction="none")
        per_sample = per_token.mean(dim=1) * (float("nan") if inject_nan else 1.0)
        engine.backward(loss_for_backward(per_sample))
        if engine.is_gradient_accumulation_boundary() and not engine_checks_overflow(engine):
            step_skipping_nonfinite_gradients(engine)
        else:
            engine.step()
        sums[0].index_add_(0, corpus_ids, per_sample.detach().double())
        sums[1].index_add_(0, corpus_ids, torch.ones_like(per_sample, dtype=torch.float64))
    dist.all_reduce(sums)
    return sums, engine.was_step_applied()


def step_metrics(sums: torch.Tensor, names: list[str], engine, lr: float, seconds: float, seq_len: int,
                 flops_per_token: float, peak_flops_per_device: float | None) -> dict[str, float]:
    samples = sums[1].sum().item()
    metrics = {
        "train/loss": sums[0].sum().item() / samples,
        "train/lr": lr,
        "train/batch_size": samples,
        "perf/samples_per_s": samples / seconds,
        "perf/tokens_per_s": samples * seq_len / seconds,
    }
    utilisation = mfu(metrics["perf/tokens_per_s"], flops_per_token, peak_flops_per_device, dist.get_world_size())
    if utilisation is not None:
        metrics["perf/mfu"] = utilisation
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is not None:
        metrics["train/grad_norm"] = float(grad_norm)
    for index, name in enumerate(names):
        if sums[1, index] > 0:
            metrics[f"train/loss/{name}"] = (sums[0, index] / sums[1, index]).item()
    return metrics


def run_training(experiment: Experiment, yaml_text: str, resume: bool = True) -> dict | None:
    """Train on this rank, resuming from the workdir's latest checkpoint unless `resume` is off;
    rank 0 returns the results it wrote (None on a stop by signal)."""
    dist_env = discover()
    export_for_torch(dist_env)
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from transformers import AutoTokenizer

    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", verbose=False)
    device = torch.device("cuda", dist_env.local_rank) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    train, mix, names = experiment.train, experiment.mix, experiment.corpus_names()

    tokenizer = AutoTokenizer.from_pretrained(experiment.tokenizer_dir)
    expected = tokenizer_hash(experiment.tokenizer_dir)
    train_stores = open_stores(experiment.stores_dir, experiment.corpora, "train", expected)
    heldout_stores = open_stores(experiment.stores_dir, experiment.corpora, "heldout", expected)
    batches = train.batch_sizes()
    schedule = build_schedule(experiment.corpora, mix, experiment.seed, train_stores, batches, train.steps)
    loader = MixLoader(schedule, [train_stores[n] for n in names], mix.seq_len, train.micro_batch_size,
                       batches, dist_env.rank, dist_env.world_size, num_workers=train.loader_workers)
    ledger = MixLedger(names, mix.seq_len)
    guard = StepGuard(train.max_skipped_in_a_row, train.spike_window, train.spike_threshold)

    model = build_model(experiment.model, tokenizer, experiment.seed, train.activation_checkpointing)
    model_flops, peak = flops_per_token(model, mix.seq_len), peak_flops(train.peak_flops_per_device)
    ds_config = resolve_deepspeed_config(experiment.deepspeed, train, dist_env.world_size, on_gpu)
    checkpoints = experiment.checkpoints_dir
    saved_world = saved_world_size(checkpoints) if resume else None
    universal = saved_world is not None and saved_world != dist_env.world_size
    if universal:  # ZeRO shards written by another number of processes must be re-partitioned
        ds_config["checkpoint"] = {"load_universal": True}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    state = load_latest(engine, checkpoints, universal) if resume and saved_world is not None else None
    if state is not None:
        loader.load_state_dict(state["loader"])
        ledger.load_state_dict(state["ledger"])
        guard.load_state_dict(state["guard"])
        restore_rng_states(state["rng"])
    tracker = Tracker(experiment.workpath, experiment.wandb, experiment.name,
                      {"experiment": experiment.model_dump(), "deepspeed": ds_config}, dist_env.is_main,
                      run_id=state and state["wandb_run_id"], resume_step=state and state["step"])
    if dist_env.is_main:
        _save_model_recipe(engine.module, experiment.tokenizer_dir, checkpoints)
        if state is not None:
            moved = f" (written by {saved_world} processes, now {dist_env.world_size})" if universal else ""
            print(f"resuming from {checkpoints / latest_tag(checkpoints)} at step {state['step']}{moved}", flush=True)
        else:
            rows = plan(schedule, experiment.corpora, mix, batches, train.steps)
            tracker.table("mix/plan", ["corpus", "group", "share", "tokens_available", "tokens_drawn", "epochs"],
                          [[r.corpus, r.group, r.share, r.available_samples * mix.seq_len, r.samples * mix.seq_len,
                            r.epochs] for r in rows])

    def evaluate(step: int) -> dict[str, float]:
        bpb = heldout_bpb(engine.module, heldout_stores, mix.seq_len, train.eval_max_tokens, train.micro_batch_size, device)
        tracker.log({f"eval/bpb/{name}": value for name, value in bpb.items()}, step=step)
        return bpb

    def checkpoint(step: int) -> str:
        client = {"step": step, "loader": loader.state_dict(), "ledger": ledger.state_dict(), "guard": guard.state_dict(),
                  "rng": gather_rng_states(),
                  "wandb_run_id": tracker.run_id, "bpb_before": bpb_before, "first_loss": first_loss, "last_loss": loss,
                  "experiment_hash": experiment_hash(yaml_text), "experiment_yaml": yaml_text}
        return save_checkpoint(engine, checkpoints, step, client, train.keep_checkpoints)

    bpb_before = state["bpb_before"] if state else evaluate(step=0)
    first_loss, loss = (state["first_loss"], state["last_loss"]) if state else (None, None)
    stop = StopRequest(device)
    progress = Progress(train.steps, state["step"] if state else 0, train.log_every, dist_env.is_main)
    inject_nan_at = injected_nan_steps(dist_env.rank)
    started = time.perf_counter()
    for batch in loader.iterate(train.steps):
        done = batch.step + 1
        lr = engine.get_lr()[0]  # the rate this step uses; the scheduler moves on inside it
        if engine.train_batch_size() != batches.size(batch.step):
            engine.set_train_batch_size(batches.size(batch.step))  # more micro-batches per step, same micro size
        sums, applied = train_step(engine, batch, len(names), device, inject_nan=done in inject_nan_at)
        ledger.record(batch.global_corpus_ids)
        metrics = step_metrics(sums, names, engine, lr, time.perf_counter() - started, mix.seq_len, model_flops, peak)
        metrics |= ledger.metrics()
        loss = metrics["train/loss"]
        first_loss = loss if first_loss is None else first_loss
        metrics |= guard.record(loss, applied)
        tracker.log(metrics, step=done)
        if not applied and dist_env.is_main:
            progress.write(f"step {done}: non-finite loss or gradient norm, update skipped ({guard.skipped} so far)")
        elif "train/loss_spike" in metrics and dist_env.is_main:
            progress.write(f"step {done}: loss spike {loss:.4f} (z-score {metrics['train/loss_zscore']:.1f})")
        if guard.exhausted:
            progress.close()
            tracker.close()
            tag = latest_tag(checkpoints)
            raise guard.stop_error(done, tag and str(checkpoints / tag))
        progress.update(done, loss, metrics["train/lr"], metrics["perf/tokens_per_s"])
        if stop.agreed():
            progress.close()
            tag = checkpoint(done)
            if dist_env.is_main:
                print(f"stopped by a signal after step {done}; checkpoint {tag} saved, rerun to resume", flush=True)
            tracker.close()
            return None
        if train.eval_every and done % train.eval_every == 0 and done != train.steps:
            evaluate(step=done)
        if train.checkpoint_every and done % train.checkpoint_every == 0 and done != train.steps:
            checkpoint(done)
        started = time.perf_counter()  # after evaluation and checkpoints, so that throughput is training alone
    progress.close()
    bpb_after = evaluate(step=train.steps)
    tag = checkpoint(train.steps)

    results = None
    if dist_env.is_main:
        total = batches.first_sample(train.steps)
        planned = schedule.counts_before(total) / total
        results = _results(names, planned.tolist(), ledger, bpb_before, bpb_after, first_loss, loss, tag, tracker)
        results |= {"skipped_steps": guard.skipped, "loss_spikes": guard.spikes}
        experiment.results_file.write_text(json.dumps(results, indent=1))
    tracker.close(summary={"final_loss": loss})
    dist.barrier()
    return results


def _save_model_recipe(module, tokenizer_dir: Path, checkpoints: Path) -> None:
    """What `dapt export` needs beside the weights: the model config and the tokenizer."""
    checkpoints.mkdir(parents=True, exist_ok=True)
    module.config.save_pretrained(checkpoints / "model")
    shutil.copytree(tokenizer_dir, checkpoints / "tokenizer", dirs_exist_ok=True)


def _results(names, planned_shares, ledger: MixLedger, before, after, first_loss, final_loss, tag, tracker) -> dict:
    tokens, shares = ledger.tokens(), ledger.shares()
    return {
        "corpora": {
            name: {"bpb_before": before[name], "bpb_after": after[name], "tokens_seen": tokens[name],
                   "planned_share": planned_shares[i], "realised_share": shares[name]}
            for i, name in enumerate(names)
        },
        "first_loss": first_loss,
        "final_loss": final_loss,
        "checkpoint": tag,
        "wandb_run_id": tracker.run_id,
        "wandb_run_dir": tracker.run_dir,
    }
