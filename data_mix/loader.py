"""Rank-aware batches from the mix schedule, resumable from one integer.

Optimizer step s consumes global samples [s·B, (s+1)·B) for global batch B, the same
samples for any world size or micro-batch split; rank r takes, in micro-step a, the
`micro_batch` samples starting at s·B + a·micro_batch·world + r·micro_batch. So
resuming needs only the number of samples consumed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from data_mix.blend import MixSchedule
from data_mix.store import TokenStore
from launch.base import DaptError


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # (micro_batch, seq_len + 1): inputs are [:, :-1], targets [:, 1:]
    corpus_ids: torch.Tensor  # (micro_batch,) index into the schedule's corpus names


class MixLoader:
    def __init__(
        self,
        schedule: MixSchedule,
        stores: list[TokenStore],
        seq_len: int,
        micro_batch: int,
        global_batch: int,
        rank: int,
        world_size: int,
    ):
        per_pass = micro_batch * world_size
        if global_batch % per_pass:
            raise DaptError(
                f"train.global_batch_size ({global_batch}) must be a multiple of "
                f"micro_batch_size × processes ({micro_batch} × {world_size} = {per_pass})"
            )
        self.schedule, self.stores, self.seq_len = schedule, stores, seq_len
        self.micro_batch, self.global_batch = micro_batch, global_batch
        self.rank, self.world_size = rank, world_size
        self.grad_accum = global_batch // per_pass

    def step(self, step: int) -> list[MicroBatch]:
        """This rank's micro-batches for optimizer step `step`."""
        start = step * self.global_batch
        corpus_ids, sample_ids = self.schedule.assign(start, start + self.global_batch)
        batches = []
        for micro in range(self.grad_accum):
            first = micro * self.micro_batch * self.world_size + self.rank * self.micro_batch
            rows = range(first, first + self.micro_batch)
            tokens = np.stack([self.stores[corpus_ids[i]].sample(int(sample_ids[i]), self.seq_len) for i in rows])
            batches.append(MicroBatch(torch.from_numpy(tokens), torch.from_numpy(corpus_ids[first : first + self.micro_batch].astype(np.int64))))
        return batches
