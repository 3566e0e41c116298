import numpy as np
import pytest

from data_mix import blend
from data_mix.blend import MixSchedule, plan, target_shares
from data_mix.config import CorpusConfig, MixConfig
from data_mix.loader import MixLoader
from launch.base import DaptError

CORPORA = [CorpusConfig(name=n, group=g, paths=["x"]) for n, g in
           [("filings", "fin"), ("news", "fin"), ("wiki", "pub"), ("web", "pub")]]
SIZES = {"filings": 100.0, "news": 300.0, "wiki": 50.0, "web": 550.0}


def test_group_weights_split_by_size_and_temperature():
    shares = target_shares(MixConfig(group_weights={"fin": 0.5, "pub": 0.5}), CORPORA, SIZES)
    assert shares == pytest.approx({"filings": 0.125, "news": 0.375, "wiki": 0.5 * 50 / 600, "web": 0.5 * 550 / 600})
    flat = target_shares(MixConfig(temperature=1e9), CORPORA, SIZES)
    assert flat == pytest.approx({name: 0.25 for name in SIZES}, abs=1e-6)
    assert target_shares(MixConfig(weights={"news": 2, "web": 6}), CORPORA, SIZES) == {
        "filings": 0.0, "news": 0.25, "wiki": 0.0, "web": 0.75}


def bloomberg_like() -> MixSchedule:
    shares = np.array([42.01, 5.31, 2.04, 1.21, 0.70, 25.9, 19.48, 3.35])
    names = [f"c{i}" for i in range(len(shares))]
    return MixSchedule(names, list(shares / shares.sum()), [1000] * len(shares), seed=3)


def test_every_prefix_stays_within_one_sample_of_target():
    schedule = bloomberg_like()
    corpus_ids, _ = schedule.assign(0, 50_000)
    counts = np.cumsum(np.eye(len(schedule.names), dtype=np.int64)[corpus_ids], axis=0)
    targets = np.outer(np.arange(1, 50_001), schedule.shares)
    assert np.abs(counts - targets).max() < 1.0


def test_schedule_is_a_pure_function_of_the_index(monkeypatch):
    monkeypatch.setattr(blend, "SNAPSHOT_EVERY", 1000)
    whole = bloomberg_like().assign(0, 5000)
    fresh = bloomberg_like()
    pieces = [fresh.assign(a, a + 700) for a in range(0, 5000, 700)]
    assert np.array_equal(np.concatenate([p[0] for p in pieces])[:5000], whole[0])
    assert np.array_equal(np.concatenate([p[1] for p in pieces])[:5000], whole[1])
    late = bloomberg_like().assign(3900, 4100)  # a third schedule, starting past two snapshots
    assert np.array_equal(late[1], whole[1][3900:4100])


def test_each_epoch_visits_every_sample_once_in_a_new_order():
    schedule = MixSchedule(["a", "b"], [0.5, 0.5], [10, 10], seed=0)
    corpus_ids, sample_ids = schedule.assign(0, 40)
    a = sample_ids[corpus_ids == 0]
    assert sorted(a[:10]) == list(range(10)) and sorted(a[10:]) == list(range(10))
    assert list(a[:10]) != list(a[10:])


def test_plan_refuses_too_many_epochs():
    schedule = MixSchedule(["a", "b"], [0.5, 0.5], [10, 1000], seed=0)
    corpora = [CorpusConfig(name="a", paths=["x"]), CorpusConfig(name="b", paths=["y"])]
    rows = plan(schedule, corpora, MixConfig(), 100)
    assert rows[0].epochs == 5.0
    with pytest.raises(DaptError, match=r"mix.max_epochs.a: the plan repeats 'a' 5.00 times but at most 4"):
        plan(schedule, corpora, MixConfig(max_epochs={"a": 4}), 100)


class FakeStore:
    """Stands in for a token store: sample i of corpus c is the sequence [c, i, i, ...]."""

    def __init__(self, corpus: int):
        self.corpus = corpus

    def sample(self, index: int, seq_len: int) -> np.ndarray:
        return np.array([self.corpus] + [index] * seq_len)


def global_order(world_size: int, micro_batch: int, steps: int) -> list[tuple[int, int]]:
    schedule = bloomberg_like()
    stores = [FakeStore(c) for c in range(len(schedule.names))]
    loaders = [MixLoader(schedule, stores, 4, micro_batch, 8, rank, world_size) for rank in range(world_size)]
    seen = []
    for step in range(steps):
        for loader in loaders:
            for batch in loader.step(step):
                seen.extend((int(t[0]), int(t[1])) for t in batch.tokens)
                assert batch.corpus_ids.tolist() == [int(t[0]) for t in batch.tokens]
    return seen


def test_every_world_size_and_micro_batch_trains_on_the_same_samples_per_step():
    one = global_order(world_size=1, micro_batch=8, steps=5)
    for world, micro in [(2, 4), (2, 1), (4, 2), (8, 1)]:
        other = global_order(world, micro, steps=5)
        for step in range(5):
            assert sorted(other[step * 8 : (step + 1) * 8]) == sorted(one[step * 8 : (step + 1) * 8])


def test_global_batch_must_divide():
    with pytest.raises(DaptError, match=r"train.global_batch_size \(8\) must be a multiple of micro_batch_size × processes \(3 × 2 = 6\)"):
        MixLoader(bloomberg_like(), [], 4, 3, 8, 0, 2)
