"""Rank-aware batches from the mix schedule, resumable from one integer.

Optimizer step s consumes global samples [F(s), F(s) + B(s)), where B(s) is the step's
batch size (constant, or ramped up: data_mix.batches) and F(s) the samples before it,
the same samples for any world size or micro-batch split; rank r takes, in micro-step
a, the `micro_batch` samples starting at F(s) + a·micro_batch·world + r·micro_batch. So the
loader's state is the number of samples consumed plus a fingerprint of the mix and
stores, and a resume under a different fingerprint is refused, naming what changed.

Batches can be prepared by a torch DataLoader's worker processes (`num_workers`):
worker w makes steps w, w+W, ..., which the DataLoader hands back in step order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dapt.data_mix.batches import BatchSizes
from dapt.data_mix.blend import MixSchedule
from dapt.data_mix.store import TokenStore
from dapt.base import DaptError


@dataclass
class StepBatch:
    """One optimizer step for one rank."""

    step: int
    tokens: torch.Tensor  # (micro_steps, micro_batch, seq_len + 1): inputs [..., :-1], targets [..., 1:]
    corpus_ids: torch.Tensor  # (micro_steps, micro_batch): index into the schedule's corpus names
    global_corpus_ids: np.ndarray  # (global_batch,): every rank's samples, for the ledger
    trained_targets: int  # the targets the loss covers in the whole step, every rank's
    # With tuning records in the mix (else None): which targets the loss covers, and each input's
    # position in its record, (micro_steps, micro_batch, seq_len); text runs on from 0.
    trained: torch.Tensor | None = None
    positions: torch.Tensor | None = None


class _Steps(IterableDataset):
    def __init__(self, loader: MixLoader, first: int, stop: int):
        self.loader, self.first, self.stop = loader, first, stop

    def __iter__(self):
        worker = get_worker_info()
        offset, stride = (worker.id, worker.num_workers) if worker else (0, 1)
        for step in range(self.first + offset, self.stop, stride):
            yield self.loader.batch(step)


class MixLoader:
    def __init__(self, schedule: MixSchedule, stores: list[TokenStore], seq_len: int, micro_batch: int,
                 batches: BatchSizes, rank: int, world_size: int, num_workers: int = 0):
        per_pass = micro_batch * world_size
        for size in batches.distinct():
            if size % per_pass:
                field = "train.global_batch_size" if size == batches.full else "a batch size of train.batch_warmup"
                raise DaptError(
                    f"{field} ({size}) must be a multiple of "
                    f"micro_batch_size × processes ({micro_batch} × {world_size} = {per_pass})"
                )
        self.schedule, self.stores, self.seq_len = schedule, stores, seq_len
        self.records = any(store.records for store in stores)
        self.micro_batch, self.batches = micro_batch, batches
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.samples_consumed = 0

    def batch(self, step: int) -> StepBatch:
        """This rank's micro-batches for optimizer step `step`."""
        start, size = self.batches.first_sample(step), self.batches.size(step)
        corpus_ids, sample_ids = self.schedule.assign(start, start + size)
        # Row a·world + r of the (micro_steps·world, micro_batch) grid is rank r's micro-step a.
        micro_steps = size // (self.micro_batch * self.world_size)
        grid = np.arange(size).reshape(micro_steps, self.world_size, self.micro_batch)[:, self.rank]
        windows = [[self.stores[corpus_ids[i]].window(int(sample_ids[i]), self.seq_len) for i in row] for row in grid]
        batch = StepBatch(step, torch.from_numpy(np.array([[w[0] for w in row] for row in windows])),
                          torch.from_numpy(corpus_ids[grid].astype(np.int64)), corpus_ids,
                          self._trained_targets(corpus_ids, sample_ids))
        if self.records:
            every, running = np.ones(self.seq_len, dtype=bool), np.arange(self.seq_len)
            batch.trained = torch.from_numpy(np.array([[every if w[1] is None else w[1] for w in row]
                                                       for row in windows]))
            batch.positions = torch.from_numpy(np.array([[running if w[2] is None else w[2] for w in row]
                                                         for row in windows]))
        return batch

    def _trained_targets(self, corpus_ids: np.ndarray, sample_ids: np.ndarray) -> int:
        if not self.records:
            return len(corpus_ids) * self.seq_len
        return int(sum(self.stores[c].trained_targets(sample_ids[corpus_ids == c], self.seq_len).sum()
                       for c in np.unique(corpus_ids)))

    def iterate(self, steps: int):
        """Step batches from where the loader stands up to `steps`, counting what is consumed."""
        first = self.batches.step_of(self.samples_consumed)
        dataset = _Steps(self, first, steps)
        if self.num_workers:
            batches = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, prefetch_factor=2,
                                 collate_fn=lambda item: item)
        else:
            batches = dataset
        for batch in batches:
            self.samples_consumed = self.batches.first_sample(batch.step + 1)
            yield batch

    def fingerprint(self) -> dict:
        return self.schedule.fingerprint() | {"seq_len": self.seq_len} | self.batches.fingerprint()

    def state_dict(self) -> dict:
        return {"samples_consumed": self.samples_consumed, "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        consumed = int(state["samples_consumed"])
        current, saved = (_as_far_as(fingerprint, consumed) for fingerprint in (self.fingerprint(), state["fingerprint"]))
        changed = [key for key in current if saved.get(key) != current[key]]
        if changed:
            raise DaptError(
                f"the mix changed since this checkpoint ({', '.join(changed)} differ), so resuming would not continue "
                "the same data order; restore the experiment's mix and stores, or train in a new workdir"
            )
        self.samples_consumed = consumed


def _as_far_as(fingerprint: dict, consumed: int) -> dict:
    """What the first `consumed` samples depend on: a stage that begins later may differ (a run
    branched from another, whose decay trains on a mix of its own)."""
    return fingerprint | {"stages": [stage for stage in fingerprint.get("stages", []) if stage[0] < consumed]}
