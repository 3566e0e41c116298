"""Held-out bits-per-byte per corpus.

BPB = Σ nats / ln 2 / Σ UTF-8 bytes over whole held-out documents. Each corpus's
held-out stream is prefixed with EOS, so every token of every evaluated document
(its EOS included) is predicted exactly once, with the preceding text as context
up to `seq_len`. Windows are shared out across ranks and the sums all-reduced.
Because it is per byte, BPB compares models with different tokenizers fairly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dapt.base import DaptError
from dapt.data_mix.store import TokenStore, experiment_stores, tokenizer_hash
from dapt.experiment import Experiment, experiment_hash
from dapt.pretrain.loss import next_token_loss
from dapt.pretrain.model import CARRY_OVER_STAMP
from dapt.pretrain.tracking import Tracker
from dapt.tokenizer.evaluate import load_tokenizer

BASE_BPB_FILE = "dapt-base-bpb.json"  # in the carried-over folder: the base model's start, see `base_model_bpb`


def _eval_documents(store: TokenStore, max_tokens: int) -> int:
    """How many documents are evaluated: the first whole ones that fit in `max_tokens` (at least one)."""
    return max(1, int(np.searchsorted(store.doc_ends, max_tokens, side="right")))


def _eval_stream(store: TokenStore, max_tokens: int) -> tuple[np.ndarray, int]:
    """EOS + the evaluated documents (each ending in its EOS), and their bytes."""
    docs = _eval_documents(store, max_tokens)
    end = int(store.doc_ends[docs - 1])
    eos = store.manifest["eos_token_id"]
    stream = np.concatenate([[eos], np.asarray(store.tokens[:end], dtype=np.int64)])
    return stream, int(store.doc_bytes[:docs].sum())


def window_nats(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Summed next-token nats of a batch of equal-length windows, in float64."""
    return next_token_loss(model, windows)[1].double().sum()


@torch.no_grad()
def heldout_bpb(
    model: torch.nn.Module,
    stores: dict[str, TokenStore],
    seq_len: int,
    max_tokens: int,
    batch_size: int,
    device: torch.device,
) -> dict[str, float]:
    """Per corpus, bits per byte of its first held-out documents (`max_tokens` tokens of them); of a
    corpus of tuning records, bits per byte of their completions, each record read alone as in training."""
    was_training = model.training
    model.eval()
    results = {}
    for name, store in stores.items():
        if store.records:
            nats, num_bytes = _record_nats(model, store, seq_len, max_tokens, batch_size, device)
        else:
            stream, num_bytes = _eval_stream(store, max_tokens)
            nats = _stream_nats(model, stream, seq_len, batch_size, device, shared=True)
        results[name] = nats / math.log(2) / num_bytes
    model.train(was_training)
    return results


def _stream_nats(model: torch.nn.Module, stream: np.ndarray, seq_len: int, batch_size: int, device: torch.device,
                 shared: bool) -> float:
    """Summed nats of predicting every token of `stream` but the first, in windows of `seq_len`;
    `shared`: the windows are shared out across the process group's ranks and the sum all-reduced."""
    starts = list(range(0, len(stream) - 1, seq_len))
    full = [s for s in starts if s + seq_len + 1 <= len(stream)]
    batches = [full[i : i + batch_size] for i in range(0, len(full), batch_size)]
    batches += [[s] for s in starts[len(full):]]  # the stream's last, shorter window

    def nats(batch: list[int]) -> torch.Tensor:
        end = min(len(stream), batch[0] + seq_len + 1)
        windows = np.stack([stream[s : s + end - batch[0]] for s in batch])
        return window_nats(model, torch.from_numpy(windows).to(device))

    return _summed(batches, nats, device, shared)


def _record_nats(model: torch.nn.Module, store: TokenStore, seq_len: int, max_tokens: int, batch_size: int,
                 device: torch.device) -> tuple[float, int]:
    """Summed nats of the completions of a record store's first held-out windows (the records that
    fit in `max_tokens` tokens, at least one window), packed as in training; and their UTF-8 bytes.
    Shared out across the process group's ranks."""
    bounds = store.window_bounds(seq_len)
    records = _eval_documents(store, max_tokens)
    count = max(1, int(np.searchsorted(bounds, records, side="right")) - 1)
    indices = list(range(count))

    def nats(batch: list[int]) -> torch.Tensor:
        ids, trained, positions = (torch.from_numpy(np.stack(part)).to(device)
                                   for part in zip(*(store.window(i, seq_len) for i in batch)))
        losses = next_token_loss(model, ids, trained.float(), positions)[1]
        return (losses.double() * trained).sum()

    total = _summed([indices[i : i + batch_size] for i in range(0, count, batch_size)], nats, device, shared=True)
    return total, int(store.doc_trained_bytes[: bounds[count]].sum())


def _summed(batches: list, nats, device: torch.device, shared: bool) -> float:
    """Σ `nats(batch)` over `batches` (float64); `shared`: shared out across the process group's ranks
    and the sum all-reduced."""
    shared = shared and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if shared else (0, 1)
    # Every rank makes the same number of forward passes (ZeRO-3 gathers parameters
    # collectively in each one); a rank short of batches recomputes one and discards it.
    total = torch.zeros((), dtype=torch.float64, device=device)
    for round_start in range(0, len(batches), world):
        index = round_start + rank
        batch_nats = nats(batches[index] if index < len(batches) else batches[0])
        if index < len(batches):
            total += batch_nats
    if world > 1:
        dist.all_reduce(total)
    return total.item()


@torch.no_grad()
def retokenized_bpb(model: torch.nn.Module, model_tokenizer, tokenizer, stores: dict[str, TokenStore], seq_len: int,
                    max_tokens: int, batch_size: int, device: torch.device) -> dict[str, float]:
    """Held-out BPB of a model that reads another tokenizer's ids (a base model with its own, beside the
    model carried over from it) on the documents `heldout_bpb` evaluates: each given back as text by
    `tokenizer`, the stores' own, and encoded by `model_tokenizer`, over the bytes of that text.
    In this process alone (no ranks share the work)."""
    model.eval()
    results = {}
    eos = model_tokenizer.eos_token_id
    for name, store in stores.items():
        ends = [0, *store.doc_ends[:_eval_documents(store, max_tokens)].tolist()]
        texts = [tokenizer.decode(store.tokens[start : end - 1].tolist(), clean_up_tokenization_spaces=False)
                 for start, end in zip(ends[:-1], ends[1:])]  # each without its EOS
        ids = [eos]
        for encoded in model_tokenizer(texts, add_special_tokens=False)["input_ids"]:
            ids += [*encoded, eos]
        num_bytes = sum(len(text.encode("utf-8")) for text in texts)
        nats = _stream_nats(model, np.asarray(ids, dtype=np.int64), seq_len, batch_size, device, shared=False)
        results[name] = nats / math.log(2) / num_bytes
    return results


def base_model_bpb(experiment: Experiment, dtype: torch.dtype, device: torch.device) -> dict[str, float]:
    """With a carry-over (`model.embeddings`), the base model's held-out BPB with its own tokenizer on
    the documents the run evaluates: where the carried-over model should start. Measured once, by the
    carry-over stage alone, and kept in the carried-over folder while the base model, both tokenizers,
    the held-out stores and the evaluation settings stay as they were."""
    from transformers import AutoModelForCausalLM

    model_config, train = experiment.model, experiment.train
    recorded = recorded_base_bpb(experiment, dtype)
    if recorded is not None:
        return recorded
    stores = _base_bpb_stores(experiment)
    print(f"embeddings: measuring the base model's held-out BPB with its own tokenizer on {', '.join(stores)}",
          flush=True)
    base = Path(model_config.base_tokenizer or model_config.path)
    model = AutoModelForCausalLM.from_pretrained(model_config.path, attn_implementation="sdpa", dtype=dtype).to(device)
    bpb = retokenized_bpb(model, load_tokenizer(base), load_tokenizer(experiment.tokenizer_dir), stores,
                          experiment.mix.seq_len, train.eval_max_tokens, train.micro_batch_size, device)
    del model
    record = experiment.carried_over_dir / BASE_BPB_FILE
    record.write_text(json.dumps({"key": _base_bpb_key(experiment, stores, dtype), "bpb": bpb}, indent=1))
    return bpb


def recorded_base_bpb(experiment: Experiment, dtype: torch.dtype) -> dict[str, float] | None:
    """The base model's held-out BPB the carry-over stage measured for these settings; None without one."""
    record = experiment.carried_over_dir / BASE_BPB_FILE
    if not record.exists() or not (experiment.carried_over_dir / CARRY_OVER_STAMP).exists():
        return None
    saved = json.loads(record.read_text())
    return saved["bpb"] if saved["key"] == _base_bpb_key(experiment, _base_bpb_stores(experiment), dtype) else None


def _base_bpb_stores(experiment: Experiment) -> dict[str, TokenStore]:
    # Text corpora only: a record corpus's figure is its completions', which this measurement does not read.
    return {name: store for name, store in experiment_stores(experiment, "heldout").items() if not store.records}


def _base_bpb_key(experiment: Experiment, stores: dict[str, TokenStore], dtype: torch.dtype) -> str:
    train = experiment.train
    return experiment_hash(json.dumps([
        (experiment.carried_over_dir / CARRY_OVER_STAMP).read_text(), {n: s.manifest for n, s in stores.items()},
        experiment.mix.seq_len, train.eval_max_tokens, train.micro_batch_size, str(dtype),
    ], sort_keys=True, default=str))


class Evaluator:
    """A run's held-out evaluations: when one is due, and its BPB per corpus logged.

    The measurement before training depends only on what builds the initial weights and on
    the evaluation itself, so runs trained one after another in a process that differ in
    nothing else (a sweep's mixes) measure it once: `measured_at_start` outlives the runs.
    """

    def __init__(self, experiment: Experiment, device: torch.device, tracker: Tracker,
                 measured_at_start: dict[str, dict[str, float]]):
        self.experiment, self.device, self.tracker = experiment, device, tracker
        self.measured_at_start = measured_at_start
        self.stores = experiment_stores(experiment, "heldout")
        self.every, self.last_step = experiment.train.eval_every, experiment.train.steps

    def due(self, step: int) -> bool:
        """Whether to evaluate after `step` on the way (the last step always evaluates, in `evaluate`'s caller)."""
        return bool(self.every) and step % self.every == 0 and step != self.last_step

    def evaluate(self, model: torch.nn.Module, step: int, measured: dict[str, float] | None = None) -> dict[str, float]:
        """Held-out BPB per corpus, logged at `step`; `measured` when these weights were evaluated already."""
        experiment = self.experiment
        bpb = measured or heldout_bpb(model, self.stores, experiment.mix.seq_len, experiment.train.eval_max_tokens,
                                      experiment.train.micro_batch_size, self.device)
        self.tracker.log({f"eval/bpb/{name}": value for name, value in bpb.items()}, step=step)
        return bpb

    def at_start(self, model: torch.nn.Module, base: dict[str, float] | None = None) -> dict[str, float]:
        """Held-out BPB of the initial weights, logged at step 0; with `base` (a carry-over's base model
        with its own tokenizer) that too, and the two side by side."""
        start = self._start_key()
        self.measured_at_start[start] = bpb = self.evaluate(model, step=0, measured=self.measured_at_start.get(start))
        if base:
            self.tracker.log({f"eval/bpb_base/{name}": value for name, value in base.items()}, step=0)
            print(f"step 0: held-out BPB of the carried-over model (model.embeddings: "
                  f"{self.experiment.model.embeddings}) against the base model with its own tokenizer: "
                  + ", ".join(f"{name} {bpb[name]:.3f} vs {base[name]:.3f} ({bpb[name] / base[name] - 1:+.1%})"
                              for name in base), flush=True)
        return bpb

    def _start_key(self) -> str:
        """Everything the initial weights and their evaluation depend on."""
        experiment, train = self.experiment, self.experiment.train
        return experiment_hash(json.dumps([
            experiment.model.model_dump(mode="json"), experiment.seed, experiment.deepspeed, train.precision,
            tokenizer_hash(experiment.tokenizer_dir), str(experiment.stores_dir), experiment.corpus_names(),
            experiment.mix.seq_len, train.eval_max_tokens, train.micro_batch_size, train.activation_checkpointing,
        ], sort_keys=True, default=str))


def evaluate_model_dir(experiment: Experiment, model_dir: Path) -> dict[str, float]:
    """Held-out BPB of a Hugging Face model directory on the experiment's stores, in this process."""
    from transformers import AutoModelForCausalLM

    if not (model_dir / "config.json").exists():
        raise DaptError(f"{model_dir} is not a Hugging Face model directory (no config.json); run `dapt export` first")
    stores = experiment_stores(experiment, "heldout")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    train = experiment.train
    return heldout_bpb(model, stores, experiment.mix.seq_len, train.eval_max_tokens, train.micro_batch_size, torch.device("cpu"))
