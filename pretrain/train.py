"""`dapt train`: continued pretraining on every rank of a torchrun/DeepSpeed job.

In: the experiment, its tokenizer and token stores (built by `dapt tokenizer
train` and `dapt data build`). Out: checkpoints, `metrics.jsonl`, a W&B run and
`results.json` (per corpus: held-out BPB before and after, tokens seen, planned vs
realised share). `Trainer.fit` only sequences; the math of one step, evaluation,
checkpointing, safety and tracking live in their own functions and modules.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from dapt.base import DaptError
from dapt.data_mix.batches import batch_sizes
from dapt.data_mix.blend import build_schedule
from dapt.data_mix.ledger import MixLedger
from dapt.data_mix.loader import MixLoader, StepBatch
from dapt.data_mix.plan import plan
from dapt.data_mix.store import experiment_stores
from dapt.experiment import Experiment
from dapt.pretrain.checkpointer import Checkpointer, RunState
from dapt.pretrain.ds_config import resolve_deepspeed_config
from dapt.pretrain.env import DistributedEnv, discover, export_for_torch
from dapt.pretrain.carry_over import require_carried_over
from dapt.pretrain.evaluate import Evaluator, recorded_base_bpb
from dapt.pretrain.export import GENERATION_CONFIG
from dapt.pretrain.guard import (StepGuard, engine_checks_overflow, injected_nan_steps, loss_for_backward,
                           step_skipping_nonfinite_gradients)
from dapt.pretrain.hf_folder import make_config_portable
from dapt.pretrain.loss import check_chunked_loss, check_packed_records, install_chunked_loss, next_token_loss
from dapt.pretrain.lora import with_lora
from dapt.pretrain.lr_schedule import LearningRateSchedule
from dapt.pretrain.metrics import flops_per_token, mfu, peak_flops
from dapt.pretrain.model import PRECISION_DTYPES, build_model
from dapt.pretrain.peers import STALL_MARGIN_S, PeerWatch
from dapt.pretrain.progress import Progress
from dapt.pretrain.stop import StopRequest, exit_with_launcher
from dapt.pretrain.tracking import Tracker
from dapt.tokenizer.files import copy_tokenizer_files
from dapt.workdir import workdir_lock


def train_step(engine, batch: StepBatch, num_corpora: int, device: torch.device,
               inject_nan: bool = False) -> tuple[torch.Tensor, bool]:
    """One optimizer step: the gradient of the mean loss over every target the loss covers in the
    step, every rank's and micro-batch's (tuning records: their completions). Returns per corpus
    [Σ loss, targets, samples], summed over ranks, and whether the update was applied (not skipped
    for a non-finite loss or gradient)."""
    # DeepSpeed divides each micro-batch's gradient by the micro-batches and averages the ranks':
    # weighting each target by their product over the step's targets leaves the mean over them all.
    scale = engine.gradient_accumulation_steps() * dist.get_world_size() / batch.trained_targets
    sums = torch.zeros(3, num_corpora, dtype=torch.float64, device=device)
    for micro, (tokens, corpus_ids) in enumerate(zip(batch.tokens.to(device), batch.corpus_ids.to(device))):
        poison = float("nan") if inject_nan else 1.0
        trained = (torch.ones(tokens[:, 1:].shape, dtype=torch.bool, device=device) if batch.trained is None
                   else batch.trained[micro].to(device))
        positions = None if batch.positions is None else batch.positions[micro].to(device)
        loss, per_token = next_token_loss(engine, tokens, trained * scale, positions)
        engine.backward(loss_for_backward(loss * poison))
        if engine.is_gradient_accumulation_boundary() and not engine_checks_overflow(engine):
            step_skipping_nonfinite_gradients(engine)
        else:
            engine.step()
        sums[0].index_add_(0, corpus_ids, (per_token * trained).sum(dim=1).double() * poison)
        sums[1].index_add_(0, corpus_ids, trained.sum(dim=1).double())
        sums[2].index_add_(0, corpus_ids, torch.ones(len(corpus_ids), dtype=torch.float64, device=device))
    dist.all_reduce(sums)
    return sums, engine.was_step_applied()


def step_metrics(sums: torch.Tensor, names: list[str], engine, lr: float, seconds: float, seq_len: int,
                 flops_per_token: float, peak_flops_per_device: float | None) -> dict[str, float]:
    """The step's metrics from `train_step`'s sums: losses per target the loss covers."""
    samples = sums[2].sum().item()
    metrics = {
        "train/loss": sums[0].sum().item() / sums[1].sum().item(),
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


# Rank 0 prints these lines, so that whoever reads the job's output (`dapt sweep`) can tell
# which run a line belongs to and how the sequence ended.
RUN_MARKER = "== training run "
ALL_RUNS_DONE = "== training runs done: "
RUNS_STOPPED = "== training stopped by a signal"

def train_one_after_another(configs: list[Path], resume: bool = True, timeout_minutes: float = 30.0) -> None:
    """Train each experiment on this rank, resuming from its workdir's latest checkpoint unless
    `resume` is off. Several experiments (the proxy runs of a sweep) train one after another in
    these processes: process start, imports and the process group are paid once, not per run,
    and each run is exactly what it would be alone (same seed, data order and checkpoints).
    A stop by signal ends the sequence; its run resumes on the next start. `timeout_minutes`: how long
    a collective waits for every rank (`train.dist_timeout_minutes`)."""
    env = discover()
    export_for_torch(env)
    if env.source != DistributedEnv.source:  # started by a launcher (torchrun, deepspeed, srun, mpirun)
        exit_with_launcher(env.rank)
    # One stop request for the whole sequence: a signal that arrives between two runs still stops it.
    # The process group waits a little longer than a step may: the watch names a stalled step first.
    stop = StopRequest(init_distributed(env, timeout_minutes + STALL_MARGIN_S / 60))
    watch = PeerWatch(env, timeout_minutes)
    try:
        _train_runs(configs, resume, env, stop, watch)
    except (RuntimeError, DaptError) as err:  # a collective failed: one line naming whom and when, not C++ frames
        failure = err.__cause__ if isinstance(err, DaptError) else err  # a failed save names its collective's cause
        line = watch.explain(failure) if failure is not None else None
        if line is None:
            raise
        raise DaptError(line) from None
    finally:
        watch.stop()


def _train_runs(configs: list[Path], resume: bool, env: DistributedEnv, stop: StopRequest, watch: PeerWatch) -> None:
    from dapt.experiment import load_experiment

    measured_at_start: dict[str, dict[str, float]] = {}  # see `Evaluator`: runs here that start alike share it
    for number, config in enumerate(configs, 1):
        if number > 1 and stop.agreed():
            break
        experiment, text = load_experiment(config)
        _say(env, f"{RUN_MARKER}{number}/{len(configs)}: {config}")
        watch.checkpoints, watch.doing = experiment.checkpoints_dir, f"the start of {config}"
        # One job per workdir: rank 0 holds its lock (a no-op under a dapt launcher, which holds it already).
        with workdir_lock(experiment.workpath) if env.is_main else contextlib.nullcontext():
            trainer = Trainer(experiment, text, resume, env, stop, measured_at_start, watch)
            try:
                trainer.fit()
            finally:
                trainer.release()
        if trainer.stopped:
            break
    else:
        _say(env, f"{ALL_RUNS_DONE}{len(configs)}")
        return
    _say(env, RUNS_STOPPED)


def _say(env, line: str) -> None:
    """One line from rank 0, written whole, so that other ranks' output cannot split it."""
    if env.is_main:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def init_distributed(dist_env, timeout_minutes: float) -> torch.device:
    """NCCL on GPUs, gloo on CPU, collectives bounded by `timeout_minutes`; this rank's device."""
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", verbose=False,
                               timeout=timedelta(minutes=timeout_minutes))
    if not on_gpu:
        return torch.device("cpu")
    device = torch.device("cuda", dist_env.local_rank)
    torch.cuda.set_device(device)
    return device


class Trainer:
    """One rank's run in a process whose group is up (`train_one_after_another`): the constructor
    builds the data side, the engine, the tracker and the run's checkpointer and evaluator, and
    resumes; `fit` sequences steps, evaluations and checkpoints."""

    def __init__(self, experiment: Experiment, yaml_text: str, resume: bool, env: DistributedEnv, stop: StopRequest,
                 measured_at_start: dict[str, dict[str, float]], watch: PeerWatch):
        self.experiment, self.stop, self.watch = experiment, stop, watch
        self.train, self.mix, self.names = experiment.train, experiment.mix, experiment.corpus_names()
        self.env, self.device = env, stop.device
        self._build_data()
        self.base_bpb: dict[str, float] | None = None  # rank 0's, with a carry-over: measured by the carry-over stage
        self.checkpointer = Checkpointer(experiment.checkpoints_dir, self.train, yaml_text, resume,
                                         parts={"loader": self.loader, "ledger": self.ledger, "guard": self.guard})
        self._build_engine()
        resumed = self.checkpointer.resume(self.engine)
        self.state = resumed or RunState()
        self._start_tracking(resumed is not None and not self.checkpointer.branched)
        self.evaluator = Evaluator(experiment, self.device, self.tracker, measured_at_start)
        if resumed is None:
            self.state.bpb_before = self.evaluator.at_start(self.engine.module, base=self.base_bpb)
            self.state.bpb_base = self.base_bpb
        self.stopped = False
        self.summary: dict | None = None  # the W&B summary, once the run has finished

    def _build_data(self) -> None:
        from transformers import AutoTokenizer

        experiment, train = self.experiment, self.train
        self.tokenizer = AutoTokenizer.from_pretrained(experiment.tokenizer_dir)
        self.train_stores = train_stores = experiment_stores(experiment, "train")
        self.batches = batch_sizes(train)
        self.schedule = build_schedule(experiment.corpora, self.mix, experiment.seed, train_stores, self.batches,
                                       train.steps, train.decay_start)
        self.loader = MixLoader(self.schedule, [train_stores[n] for n in self.names], self.mix.seq_len,
                                train.micro_batch_size, self.batches, self.env.rank, self.env.world_size,
                                num_workers=train.loader_workers)
        self.ledger = MixLedger(self.names, self.mix.seq_len)
        self.guard = StepGuard(train.max_skipped_in_a_row, train.spike_window, train.spike_threshold)

    def _build_engine(self) -> None:
        import deepspeed

        from transformers.integrations import HfDeepSpeedConfig

        experiment, train = self.experiment, self.train
        self.ds_config = resolve_deepspeed_config(experiment.deepspeed, train, self.env.world_size,
                                                  torch.cuda.is_available())
        self.checkpointer.configure(self.ds_config)
        self.model_folder = self._base_model_folder()  # before the next line: a carry-over needs the whole model
        # While this lives, transformers builds the model partitioned across the ranks (ZeRO-3).
        zero3 = self.ds_config["zero_optimization"].get("stage", 0) == 3
        self.zero3_loading = HfDeepSpeedConfig(self.ds_config) if zero3 else None
        model = build_model(experiment.model, self.tokenizer, experiment.seed, train.activation_checkpointing,
                            folder=self.model_folder, dtype=PRECISION_DTYPES[train.precision])
        self.model_flops, self.peak = flops_per_token(model, self.mix.seq_len), peak_flops(train.peak_flops_per_device)
        install_chunked_loss(model, train.loss_chunk_tokens)  # before LoRA: the head is not a layer to adapt
        if train.lora is not None:
            model = with_lora(model, train.lora)
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=self.ds_config,
                                                    lr_scheduler=lambda optimizer: LearningRateSchedule(optimizer, train))
        # Step s trains at the schedule's iteration s - 1, as in transformers; a resume then loads the
        # checkpoint's iteration over this.
        self.engine.lr_scheduler.step(0)
        if self.loader.records:
            check_packed_records(self.engine, model.config.vocab_size, self.device)
        unchunked = check_chunked_loss(self.engine, model.config.vocab_size, self.mix.seq_len, self.device)
        if unchunked and self.env.is_main:
            print(f"note: {unchunked}", flush=True)

    def _base_model_folder(self) -> Path | None:
        """The folder every rank loads: `model.path`, or with `model.embeddings` the base model carried
        over to the experiment's tokenizer by the carry-over stage, before the ranks started."""
        model = self.experiment.model
        if model.embeddings is None:
            return Path(model.path) if model.path else None
        require_carried_over(self.experiment)
        if self.env.is_main:
            self.base_bpb = recorded_base_bpb(self.experiment, PRECISION_DTYPES[self.train.precision])
        return self.experiment.carried_over_dir

    def _start_tracking(self, resumed: bool) -> None:
        experiment, mix, state = self.experiment, self.mix, self.state
        self.tracker = Tracker(experiment.workpath, experiment.wandb, experiment.name,
                               {"experiment": experiment.model_dump(), "deepspeed": self.ds_config}, self.env.is_main,
                               run_id=state.wandb_run_id, resume_step=state.step if resumed else None)
        state.wandb_run_id = self.tracker.run_id
        if not self.env.is_main:
            return
        _save_model_recipe(self.engine.module, self.model_folder, experiment.tokenizer_dir, experiment.checkpoints_dir)
        if not resumed:
            rows = plan(self.schedule, experiment.corpora, mix, self.batches, self.train.steps)
            self.tracker.table("mix/plan", ["corpus", "group", "share", "tokens_available", "tokens_drawn", "epochs"],
                               [[r.corpus, r.group, r.share, r.available_samples * mix.seq_len,
                                 r.samples * mix.seq_len, r.epochs] for r in rows])

    def step(self, batch: StepBatch, seconds_since: float, inject_nan: bool) -> tuple[dict[str, float], bool]:
        """One optimizer step: its metrics (logged) and whether its update was applied."""
        engine, state = self.engine, self.state
        state.step = batch.step + 1
        lr = engine.get_lr()[0]  # the rate this step uses; the scheduler moves on inside it
        if engine.train_batch_size() != self.batches.size(batch.step):
            engine.set_train_batch_size(self.batches.size(batch.step))  # more micro-batches per step, same micro size
        sums, applied = train_step(engine, batch, len(self.names), self.device, inject_nan)
        self.ledger.record(batch.global_corpus_ids)
        metrics = step_metrics(sums, self.names, engine, lr, time.perf_counter() - seconds_since, self.mix.seq_len,
                               self.model_flops, self.peak)
        metrics |= self.ledger.metrics()
        state.last_loss = metrics["train/loss"]
        state.first_loss = state.last_loss if state.first_loss is None else state.first_loss
        metrics |= self.guard.record(state.last_loss, applied)
        self.tracker.log(metrics, step=state.step)
        return metrics, applied

    def fit(self) -> dict | None:
        """Train to `train.steps`, or until a stop by signal (then `stopped`, with a checkpoint to resume
        from); the results on rank 0. The tracker is closed however the run ends: as failed if it raised."""
        progress = Progress(self.train.steps, self.state.step, self.train.log_every, self.env.is_main)
        failed = True
        try:
            self._steps(progress)
            results = None if self.stopped else self._finish()
            failed = False
            return results
        finally:
            progress.close()
            self.tracker.close(summary=self.summary, failed=failed)

    def _steps(self, progress: Progress) -> None:
        guard, main, state = self.guard, self.env.is_main, self.state
        inject_nan_at = injected_nan_steps(self.env.rank)
        started = time.perf_counter()
        for batch in self.loader.iterate(self.train.steps):
            self.watch.step(batch.step + 1)
            metrics, applied = self.step(batch, started, inject_nan=batch.step + 1 in inject_nan_at)
            done = state.step
            if not applied and main:
                progress.write(f"step {done}: non-finite loss or gradient norm, update skipped ({guard.skipped} so far)")
            elif "train/loss_spike" in metrics and main:
                progress.write(f"step {done}: loss spike {state.last_loss:.4f} "
                               f"(z-score {metrics['train/loss_zscore']:.1f})")
            if guard.exhausted:
                latest = self.checkpointer.latest()
                raise guard.stop_error(done, latest and str(latest))
            progress.update(done, {"loss": f"{state.last_loss:.4f}", "lr": f"{metrics['train/lr']:.2e}",
                                   "tok/s": f"{metrics['perf/tokens_per_s']:,.0f}"})
            if self.stop.agreed():
                self.watch.doing = f"the checkpoint save after step {done}, on a stop signal"
                tag = self.checkpointer.save(self.engine, state)
                if main:
                    progress.write(f"stopped by a signal after step {done}; checkpoint {tag} saved, rerun to resume")
                self.stopped = True
                return
            if self.evaluator.due(done):
                self.watch.doing = f"the evaluation after step {done}"
                self.evaluator.evaluate(self.engine.module, step=done)
            if self.checkpointer.due(done):
                self.watch.doing = f"the checkpoint save after step {done}"
                self.checkpointer.save(self.engine, state)
            self.watch.doing = f"loading the batch of step {done + 1}"  # a rank slow here is not stalled in a step
            started = time.perf_counter()  # after evaluation and checkpoints, so that throughput is training alone

    def _finish(self) -> dict | None:
        self.watch.doing = f"the final evaluation and checkpoint of step {self.train.steps}"
        bpb_after = self.evaluator.evaluate(self.engine.module, step=self.train.steps)
        tag = self.checkpointer.save(self.engine, self.state)
        results = None
        if self.env.is_main:
            total = self.batches.first_sample(self.train.steps)
            planned = self.schedule.counts_before(total) / total
            results = _results(self.names, planned.tolist(), self.ledger, self.state, bpb_after, tag, self.tracker)
            results |= {"skipped_steps": self.guard.skipped, "loss_spikes": self.guard.spikes}
            self.experiment.results_file.write_text(json.dumps(results, indent=1))
        self.summary = {"final_loss": self.state.last_loss}
        dist.barrier()
        return results

    def release(self) -> None:
        """Free the engine (its hooks, optimizer and buffers), so that another run can follow in this process."""
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        self.engine.destroy()
        del self.engine
        self.zero3_loading = None
        unset_hf_deepspeed_config()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _save_model_recipe(module, model_folder: Path | None, tokenizer_dir: Path, checkpoints: Path) -> None:
    """What `dapt export` needs beside the weights: the model config with the base model's generation
    config, and the tokenizer's files (only those: the tokenizer folder is often the base model's)."""
    checkpoints.mkdir(parents=True, exist_ok=True)
    module.config.save_pretrained(checkpoints / "model")
    make_config_portable(checkpoints / "model")
    if model_folder is not None and (model_folder / GENERATION_CONFIG).exists():
        shutil.copy2(model_folder / GENERATION_CONFIG, checkpoints / "model" / GENERATION_CONFIG)
    shutil.rmtree(checkpoints / "tokenizer", ignore_errors=True)
    copy_tokenizer_files(tokenizer_dir, checkpoints / "tokenizer")


def _results(names, planned_shares, ledger: MixLedger, state: RunState, after, tag, tracker) -> dict:
    tokens, shares, before = ledger.tokens(), ledger.shares(), state.bpb_before
    base = {name: {"bpb_base": value} for name, value in (state.bpb_base or {}).items()}
    return {
        "corpora": {
            name: {"bpb_before": before[name], "bpb_after": after[name], "tokens_seen": tokens[name],
                   "planned_share": planned_shares[i], "realised_share": shares[name], **base.get(name, {})}
            for i, name in enumerate(names)
        },
        "first_loss": state.first_loss,
        "final_loss": state.last_loss,
        "checkpoint": tag,
        "wandb_run_id": tracker.run_id,
        "wandb_run_dir": tracker.run_dir,
    }
