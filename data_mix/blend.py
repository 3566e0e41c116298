"""Mix weights → a deterministic schedule: global sample n → (corpus, sample in corpus).

The schedule is a pure function of (stages of target shares, seed, n):

* Which corpus: Tijdeman's deadline-first rule (`schedule.c`): slot n goes, among the
  corpora owed at least d = 1/(2k-2) of a sample, to the one whose shortfall would
  first reach 1 - d. On every prefix of every stage each corpus stays within
  1 - 1/(2k-2) samples of its target: 0.93 for 8 corpora, where Megatron's
  largest-error rule reaches 1.23 on BloombergGPT's weights. The loop runs in C.
* No array grows with the run: per stage, only the per-corpus counts at every
  `SNAPSHOT_EVERY`-th slot (4M) are remembered, and any range is replayed from the
  snapshot before it (at ~90M slots/s, under 50 ms); the counts where the last range
  ended are kept too, so consecutive steps replay nothing. Resuming needs one
  integer, the samples consumed.
* Which sample of the corpus: its k-th draw is position k mod size of epoch
  k // size, and each epoch visits the corpus in the order of a keyed permutation
  (`permute.py`) whose key derives from (seed, corpus name, epoch): O(1) memory, a new
  order every epoch, and adding a corpus never reshuffles another.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from dapt.data_mix.batches import BatchSizes
from dapt.data_mix.config import CorpusConfig, MixConfig, WeightsConfig
from dapt.data_mix.kernel import MAX_CORPORA, run_schedule
from dapt.data_mix.permute import permute
from dapt.base import DaptError

SNAPSHOT_EVERY = 1 << 22


def target_shares(
    weights: WeightsConfig,
    corpora: list[CorpusConfig],
    sizes: dict[str, float],
    temperature: float = 1.0,
    budgets: dict[str, float] | None = None,
    total_tokens: float | None = None,
) -> dict[str, float]:
    """Token share per corpus, from budgets, per-corpus or per-group weights, or natural sizes."""
    names = [c.name for c in corpora]
    tempered = {name: float(sizes[name]) ** (1.0 / temperature) for name in names}
    if weights.weights is not None:
        raw = {name: weights.weights.get(name, 0.0) for name in names}
    elif weights.group_weights is not None:
        raw = {}
        for corpus in corpora:
            group_total = sum(tempered[c.name] for c in corpora if c.group == corpus.group)
            share = weights.group_weights.get(corpus.group, 0.0)
            raw[corpus.name] = share * tempered[corpus.name] / group_total if group_total else 0.0
    else:
        raw = tempered
    fixed = {name: budget / total_tokens for name, budget in (budgets or {}).items()}
    if sum(fixed.values()) > 1:
        raise DaptError(f"mix.budgets: {sum(budgets.values()):,.0f} tokens asked but the run trains on {total_tokens:,.0f}")
    free = {name: value for name, value in raw.items() if name not in fixed}
    total = sum(free.values())
    if total <= 0 and sum(fixed.values()) < 1:
        raise DaptError("mix: every corpus has a zero share; give at least one corpus a positive weight")
    rest = 1.0 - sum(fixed.values())
    return {name: fixed[name] if name in fixed else rest * free[name] / total for name in names}


def seed_of(*parts: object) -> int:
    """A seed derived from names, not positions: adding a corpus never reshuffles another."""
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


@dataclass(frozen=True)
class Stage:
    start: int  # first global sample of the stage
    shares: np.ndarray  # per corpus, summing to 1


class MixSchedule:
    """Which corpus, and which of its samples, global sample n comes from."""

    def __init__(self, names: list[str], stages: list[Stage], samples_per_corpus: list[int], seed: int):
        if len(names) > MAX_CORPORA:
            raise DaptError(f"corpora: a mix takes at most {MAX_CORPORA} corpora, got {len(names)}")
        if not stages or stages[0].start != 0:
            raise ValueError("the first stage must start at sample 0")
        self.names, self.stages, self.seed = names, stages, seed
        self.samples_per_corpus = samples_per_corpus
        for stage in stages:
            for name, share, size in zip(names, stage.shares, samples_per_corpus):
                if share > 0 and size == 0:
                    raise DaptError(f"corpus '{name}' has a share of the mix but not one training sample; "
                                    "it needs more text than one sequence")
        self._snapshots = [[np.zeros(len(names), dtype=np.int64)] for _ in stages]
        self._bases: list[np.ndarray] = [np.zeros(len(names), dtype=np.int64)]
        self._cursor: tuple[int, int, np.ndarray] | None = None  # (stage, offset, counts) where the last range ended

    @property
    def shares(self) -> np.ndarray:
        """The first stage's shares (the whole run's when there are no stages)."""
        return self.stages[0].shares

    def fingerprint(self) -> dict:
        """What the sequence depends on; a resume under another fingerprint would change it."""
        return {
            "corpora": list(self.names), "seed": self.seed, "samples_per_corpus": list(self.samples_per_corpus),
            "stages": [[stage.start, [round(float(s), 12) for s in stage.shares]] for stage in self.stages],
        }

    def counts_before(self, n: int) -> np.ndarray:
        """Samples each corpus has received among global samples [0, n)."""
        index = self._stage_of(n)
        return self._base(index) + self._stage_counts(index, n - self.stages[index].start)

    def assign(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(corpus index, sample index inside that corpus's store) for samples [start, stop)."""
        corpus_ids, ranks = self.draws(start, stop)
        sample_ids = np.empty_like(ranks)
        for corpus in np.unique(corpus_ids):
            mask = corpus_ids == corpus
            sample_ids[mask] = self._within_corpus(int(corpus), ranks[mask])
        return corpus_ids, sample_ids

    def draws(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(corpus index, how many earlier draws that corpus had) for samples [start, stop)."""
        pieces = []
        position = start
        while position < stop:
            index = self._stage_of(position)
            stage = self.stages[index]
            end = min(stop, self.stages[index + 1].start) if index + 1 < len(self.stages) else stop
            counts = self._stage_counts(index, position - stage.start)
            corpus_ids, ranks = run_schedule(stage.shares, counts, position - stage.start, end - stage.start, record=True)
            self._cursor = (index, end - stage.start, counts)
            if index > 0:  # ranks count from the stage's start; earlier stages' draws come first
                ranks += self._base(index)[corpus_ids]
            pieces.append((corpus_ids, ranks))
            position = end
        if len(pieces) == 1:
            return pieces[0]
        if not pieces:
            return np.empty(0, dtype=np.int32), np.empty(0, dtype=np.int64)
        return np.concatenate([p[0] for p in pieces]), np.concatenate([p[1] for p in pieces])

    def _stage_of(self, n: int) -> int:
        return max(i for i, stage in enumerate(self.stages) if stage.start <= n)

    def _stage_counts(self, index: int, offset: int) -> np.ndarray:
        """Per-corpus draws in the first `offset` slots of stage `index`, from the nearest snapshot."""
        if self._cursor is not None and self._cursor[:2] == (index, offset):
            return self._cursor[2].copy()
        shares, snapshots = self.stages[index].shares, self._snapshots[index]
        while len(snapshots) * SNAPSHOT_EVERY <= offset:
            counts = snapshots[-1].copy()
            start = (len(snapshots) - 1) * SNAPSHOT_EVERY
            run_schedule(shares, counts, start, start + SNAPSHOT_EVERY, record=False)
            snapshots.append(counts)
        counts = snapshots[offset // SNAPSHOT_EVERY].copy()
        run_schedule(shares, counts, (offset // SNAPSHOT_EVERY) * SNAPSHOT_EVERY, offset, record=False)
        return counts

    def _base(self, index: int) -> np.ndarray:
        """Cumulative draws per corpus before stage `index` starts."""
        while len(self._bases) <= index:
            done = len(self._bases) - 1
            length = self.stages[done + 1].start - self.stages[done].start
            self._bases.append(self._bases[done] + self._stage_counts(done, length))
        return self._bases[index]

    def _within_corpus(self, corpus: int, ranks: np.ndarray) -> np.ndarray:
        size = self.samples_per_corpus[corpus]
        epochs, offsets = np.divmod(ranks, size)
        out = np.empty_like(ranks)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            out[mask] = permute(offsets[mask], size, seed_of(self.seed, self.names[corpus], int(epoch)))
        return out


def build_schedule(corpora: list[CorpusConfig], mix: MixConfig, seed: int, train_stores: dict, batches: BatchSizes,
                   steps: int, decay_start: int | None = None) -> MixSchedule:
    """The run's schedule from the training stores: natural sizes are counted in tokens. `decay_start`:
    the step from which `mix.decay`'s weights hold (a warmup-stable-decay run's decay)."""
    names = [c.name for c in corpora]
    sizes = {name: len(train_stores[name].tokens) for name in names}
    total_tokens = batches.first_sample(steps) * mix.seq_len
    stages = []
    decay = [(decay_start, mix.decay)] if mix.decay is not None and decay_start is not None else []
    for start_step, weights in [(0, mix), *((s.start_step, s) for s in mix.stages), *decay]:
        shares = target_shares(weights, corpora, sizes, mix.temperature, mix.budgets, total_tokens)
        stages.append(Stage(batches.first_sample(start_step), np.array([shares[n] for n in names], dtype=np.float64)))
    samples = [train_stores[name].num_samples(mix.seq_len) for name in names]
    return MixSchedule(names, stages, samples, seed)
