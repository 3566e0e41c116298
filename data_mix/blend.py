"""Mix weights → a deterministic schedule: global sample n → (corpus, sample in corpus).

The schedule is a pure function of (target shares, seed, n). Corpus choice follows
the greedy rule "give sample n to the corpus furthest below its target w·(n+1)",
ties to the lowest index, which keeps every corpus within one sample of its
target on every prefix. It is computed, not stored: only the per-corpus counts at
every `SNAPSHOT_EVERY`-th sample are remembered, so memory does not grow with the
run and any range of samples is reproduced from the nearest snapshot. Inside a
corpus, each epoch walks a fresh permutation seeded by (seed, corpus name, epoch).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from data_mix.config import CorpusConfig, MixConfig
from launch.base import DaptError

SNAPSHOT_EVERY = 1 << 16


def target_shares(mix: MixConfig, corpora: list[CorpusConfig], sizes: dict[str, float]) -> dict[str, float]:
    """Token share per corpus, from per-corpus or per-group weights or natural sizes."""
    names = [c.name for c in corpora]
    tempered = {name: float(sizes[name]) ** (1.0 / mix.temperature) for name in names}
    if mix.weights is not None:
        raw = {name: mix.weights.get(name, 0.0) for name in names}
    elif mix.group_weights is not None:
        raw = {}
        for corpus in corpora:
            group_total = sum(tempered[c.name] for c in corpora if c.group == corpus.group)
            raw[corpus.name] = mix.group_weights.get(corpus.group, 0.0) * tempered[corpus.name] / group_total
    else:
        raw = tempered
    total = sum(raw.values())
    if total <= 0:
        raise DaptError("mix: every corpus has a zero share; give at least one corpus a positive weight")
    return {name: value / total for name, value in raw.items()}


def _seed_of(*parts: object) -> int:
    """A seed derived from names, not positions: adding a corpus never reshuffles another."""
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


class MixSchedule:
    """Which corpus, and which of its samples, global sample n comes from."""

    def __init__(self, names: list[str], shares: list[float], samples_per_corpus: list[int], seed: int):
        self.names = names
        self.shares = np.asarray(shares, dtype=np.float64)
        self.samples_per_corpus = samples_per_corpus
        self.seed = seed
        for name, share, size in zip(names, shares, samples_per_corpus):
            if share > 0 and size == 0:
                raise DaptError(f"corpus '{name}' has a share of the mix but no training sample; it needs more text than one window")
        self._snapshots = [np.zeros(len(names), dtype=np.int64)]

    def counts_before(self, n: int) -> np.ndarray:
        """Samples each corpus has received among global samples [0, n)."""
        counts, _ = self._walk(n, n)
        return counts

    def assign(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(corpus index, sample index inside that corpus's store) for samples [start, stop)."""
        _, (corpus_ids, ranks) = self._walk(start, stop)
        sample_ids = np.empty_like(ranks)
        for corpus in np.unique(corpus_ids):
            mask = corpus_ids == corpus
            sample_ids[mask] = self._within_corpus(int(corpus), ranks[mask])
        return corpus_ids, sample_ids

    def _walk(self, start: int, stop: int) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """Replay the greedy rule from the snapshot before `start`, recording [start, stop)."""
        while len(self._snapshots) * SNAPSHOT_EVERY <= start:
            base = (len(self._snapshots) - 1) * SNAPSHOT_EVERY
            counts, _ = self._replay(base, self._snapshots[-1], base + SNAPSHOT_EVERY, record_from=None)
            self._snapshots.append(counts)
        base = (start // SNAPSHOT_EVERY) * SNAPSHOT_EVERY
        return self._replay(base, self._snapshots[start // SNAPSHOT_EVERY], stop, record_from=start)

    def _replay(self, n: int, counts: np.ndarray, stop: int, record_from: int | None):
        counts = counts.copy()
        shares = self.shares.tolist()
        current = counts.tolist()
        size = 0 if record_from is None else stop - record_from
        corpus_ids = np.empty(size, dtype=np.int32)
        ranks = np.empty(size, dtype=np.int64)
        for position in range(n, stop):
            deficits = [share * (position + 1) - count for share, count in zip(shares, current)]
            choice = deficits.index(max(deficits))
            if record_from is not None and position >= record_from:
                corpus_ids[position - record_from] = choice
                ranks[position - record_from] = current[choice]
            current[choice] += 1
        return np.asarray(current, dtype=np.int64), (corpus_ids, ranks)

    def _within_corpus(self, corpus: int, ranks: np.ndarray) -> np.ndarray:
        size = self.samples_per_corpus[corpus]
        epochs, offsets = np.divmod(ranks, size)
        out = np.empty_like(ranks)
        for epoch in np.unique(epochs):
            order = np.random.default_rng(_seed_of(self.seed, self.names[corpus], int(epoch))).permutation(size)
            mask = epochs == epoch
            out[mask] = order[offsets[mask]]
        return out


@dataclass
class PlanRow:
    corpus: str
    group: str
    share: float
    samples: int
    available: int

    @property
    def epochs(self) -> float:
        return self.samples / self.available if self.available else 0.0


def plan(schedule: MixSchedule, corpora: list[CorpusConfig], mix: MixConfig, total_samples: int) -> list[PlanRow]:
    """Samples and epochs per corpus for the whole run; refuses repetition past `max_epochs`."""
    counts = schedule.counts_before(total_samples)
    rows = [
        PlanRow(c.name, c.group, float(schedule.shares[i]), int(counts[i]), schedule.samples_per_corpus[i])
        for i, c in enumerate(corpora)
    ]
    for row in rows:
        cap = mix.max_epochs.get(row.corpus)
        if cap is not None and row.epochs > cap:
            raise DaptError(
                f"mix.max_epochs.{row.corpus}: the plan repeats '{row.corpus}' {row.epochs:.2f} times "
                f"but at most {cap} are allowed; lower its weight, shorten the run or raise the cap"
            )
    return rows


def format_plan(rows: list[PlanRow], seq_len: int) -> str:
    lines = [f"{'corpus':<14}{'group':<12}{'share':>8}{'samples':>10}{'tokens':>12}{'epochs':>8}"]
    for row in rows:
        lines.append(
            f"{row.corpus:<14}{row.group:<12}{row.share:>8.2%}{row.samples:>10,}{row.samples * seq_len:>12,}{row.epochs:>8.2f}"
        )
    return "\n".join(lines)


def build_schedule(corpora: list[CorpusConfig], mix: MixConfig, seed: int, train_stores: dict) -> MixSchedule:
    """The run's schedule from the training stores: natural sizes are counted in tokens."""
    sizes = {c.name: len(train_stores[c.name].tokens) for c in corpora}
    shares = target_shares(mix, corpora, sizes)
    names = [c.name for c in corpora]
    samples = [train_stores[name].num_samples(mix.seq_len) for name in names]
    return MixSchedule(names, [shares[name] for name in names], samples, seed)
