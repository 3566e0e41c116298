"""The corpus path on datatrove: work split by bytes, stores of shards that do not depend on the
number of tasks, exact and near deduplication counted, held-out decontamination."""

import json
import random
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dapt.data_mix.build import build_stores
from dapt.data_mix.config import CorpusConfig, DataConfig, DedupConfig, HeldoutConfig, NearDedupConfig
from dapt.data_mix.split import content_hash
from dapt.data_mix.store import TokenStore
from dapt.data_mix.units import plan_tasks

WORDS = ("revenue margin guidance quarter dividend filing covenant liquidity issuer coupon yield spread equity "
         "bond rating outlook segment backlog hedge exposure tranche maturity").split()


def article(rng: random.Random, words: int = 120) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)) + "."


def heldout_and_copy(rng: random.Random, fraction: float) -> tuple[str, str]:
    """A document the split holds out and a near copy of it (one word changed) that it trains on."""
    while True:
        text = article(rng, 200)
        copy = text[:-1] + " amended."
        if content_hash(text) < fraction <= content_hash(copy):
            return text, copy


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Two corpora: one big JSONL file beside small ones, a Parquet file of several row groups, a CSV;
    exact copies inside and across corpora, near copies, and a near copy of a held-out document."""
    rng = random.Random(7)
    folder = tmp_path_factory.mktemp("build-tasks")
    texts = [article(rng) for _ in range(1500)]
    held, held_copy = heldout_and_copy(rng, 0.1)
    big = texts[:900] + [texts[5], texts[6], held_copy]  # two exact copies, a near copy of a held-out document
    (folder / "big.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in big))
    for number in range(6):
        small = texts[900 + 20 * number : 920 + 20 * number]
        (folder / f"small-{number}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in small))
    # Near copies of documents of the small files, the split training on both sides.
    trained = [t for t in texts[900:1020] if min(content_hash(t), content_hash(t[:-1] + " restated.")) >= 0.1][:2]
    near = [t[:-1] + " restated." for t in trained] + [held]
    (folder / "near.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in near))
    table = pa.table({"text": texts[1100:1400] + [texts[10]]})  # texts[10]: a copy of a document of the other corpus
    pq.write_table(table, folder / "wire.parquet", row_group_size=50)
    (folder / "press.csv").write_text("text\n" + "".join(f'"{t}"\n' for t in texts[1400:1500]))
    finance = CorpusConfig(name="finance", paths=[str(folder / "big.jsonl"), str(folder / "small-*.jsonl"),
                                                  str(folder / "near.jsonl")])
    wire = CorpusConfig(name="wire", paths=[str(folder / "wire.parquet"), str(folder / "press.csv")])
    return folder, [finance, wire]


DEDUP = DedupConfig(exact="across", near=NearDedupConfig())
HELDOUT = HeldoutConfig(fraction=0.1)


@pytest.fixture(scope="module")
def builds(corpora, built_experiment, tmp_path_factory):
    """The same corpora built with 1, 2 and 7 tasks."""
    _, configs = corpora
    out = {}
    for tasks in (1, 2, 7):
        stores = tmp_path_factory.mktemp(f"stores-{tasks}")
        manifests = build_stores(configs, HELDOUT, DEDUP, DataConfig(tasks=tasks, workers=2),
                                 built_experiment.tokenizer_dir, stores)
        out[tasks] = (stores, {m["corpus"]: m for m in manifests})
    return out


def test_the_largest_task_holds_at_most_one_and_a_half_times_the_mean(corpora):
    _, configs = corpora
    for tasks in (2, 4, 7):
        plan = plan_tasks(configs, tasks)
        weights = [sum(unit.weight for unit in units) for units in plan]
        assert max(weights) <= 1.5 * (sum(weights) / tasks), (tasks, weights)
        assert sum(1 for units in plan for unit in units if unit.url.endswith("big.jsonl")) > 1, "the big file is cut"


def test_one_two_and_seven_tasks_build_the_same_stores(builds):
    one_folder, one = builds[1]
    for tasks in (2, 7):
        folder, manifests = builds[tasks]
        for name in ("finance", "wire"):
            assert manifests[name]["splits"] == one[name]["splits"]
            assert manifests[name]["accounting"] == one[name]["accounting"], name
            for split in ("train", "heldout"):
                ours, theirs = TokenStore(folder / name, split), TokenStore(one_folder / name, split)
                assert np.array_equal(np.asarray(ours.tokens), np.asarray(theirs.tokens)), (tasks, name, split)
                assert np.array_equal(ours.doc_ends, theirs.doc_ends) and np.array_equal(ours.doc_bytes, theirs.doc_bytes)
        assert len(manifests["finance"]["shards"]["train"]) > 1, "a store of several shards"


def test_duplicates_near_duplicates_and_decontamination_are_counted(builds):
    _, manifests = builds[2]
    finance, wire = manifests["finance"]["accounting"], manifests["wire"]["accounting"]
    for accounting in (finance, wire):
        assert accounting["invariant_holds"] and accounting["read"] == accounting["kept"] + sum(accounting["rejected"].values())
    assert finance["rejected"]["duplicate"] == 2 and wire["rejected"]["duplicate"] == 1
    assert finance["rejected"]["near_duplicate"] == 2 and "near.jsonl:1 (kept: " in finance["examples"]["near_duplicate"][0]
    assert finance["rejected"]["heldout_near_duplicate"] == 1 and manifests["finance"]["decontaminated"] == 1
    example = finance["examples"]["duplicate"][0]
    assert "big.jsonl:901 (kept: " in example and "big.jsonl:6)" in example, example
    assert "wire.parquet:row 301 (kept: " in wire["examples"]["duplicate"][0] and "big.jsonl:11)" in wire["examples"]["duplicate"][0]
    assert "big.jsonl:903 (kept: " in finance["examples"]["heldout_near_duplicate"][0]


def test_a_saved_dataset_is_cut_between_rows(built_experiment, tmp_path):
    import datasets

    rng = random.Random(3)
    datasets.Dataset.from_dict({"text": [article(rng, 60) for _ in range(400)]}).save_to_disk(str(tmp_path / "saved"))
    corpus = CorpusConfig(name="saved", hf_dataset={"path": str(tmp_path / "saved")})
    plan = plan_tasks([corpus], 3)
    assert [(u.kind, u.start, u.end) for units in plan for u in units] == [("rows", 0, 133), ("rows", 133, 267),
                                                                         ("rows", 267, 400)]
    stores = {}
    for tasks in (1, 3):
        [manifest] = build_stores([corpus], HELDOUT, DedupConfig(), DataConfig(tasks=tasks, workers=2),
                                  built_experiment.tokenizer_dir, tmp_path / f"stores-{tasks}")
        stores[tasks] = (manifest, np.asarray(TokenStore(tmp_path / f"stores-{tasks}" / "saved", "train").tokens))
    assert stores[1][0]["accounting"] == stores[3][0]["accounting"] and np.array_equal(stores[1][1], stores[3][1])
    assert len(stores[3][0]["shards"]["train"]) == 3


def test_a_store_from_before_shards_opens_and_is_named_stale(built_experiment, tmp_path):
    """A store of the earlier layout (one `<split>.bin` per split, no shards in its manifest) still reads;
    the build and the preflight call it stale, naming `dapt data build`."""
    import shutil

    from dapt.data_mix.build import BuildRequest

    source = built_experiment.stores_dir / "news"
    old = tmp_path / "stores" / "news"
    old.mkdir(parents=True)
    manifest = json.loads((source / "manifest.json").read_text())
    for split in ("train", "heldout"):
        store = TokenStore(source, split)
        np.asarray(store.tokens).tofile(old / f"{split}.bin")
        np.save(old / f"{split}.docs.npy", np.stack([store.doc_ends, store.doc_bytes], axis=1))
    manifest.pop("shards")
    manifest.pop("files")
    manifest["fingerprint"]["version"] = 3
    (old / "manifest.json").write_text(json.dumps(manifest))
    for split in ("train", "heldout"):
        assert np.array_equal(np.asarray(TokenStore(old, split).tokens), np.asarray(TokenStore(source, split).tokens))
    [corpus] = [c for c in built_experiment.corpora if c.name == "news"]
    request = BuildRequest([corpus], built_experiment.heldout, DedupConfig(), built_experiment.tokenizer_dir, old.parent)
    assert request.staleness(corpus) == "built by another version of dapt's store format"
    shutil.rmtree(old.parent)


def test_a_bad_record_in_a_task_stops_the_build_naming_where_it_is(built_experiment, tmp_path):
    from dapt.base import DaptError

    lines = [json.dumps({"text": f"document {i} about the coupon"}) for i in range(40)]
    lines[30] = "not json"
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    corpus = CorpusConfig(name="c", paths=[str(tmp_path / "a.jsonl")], on_error="fail")
    offset = sum(len(line) + 1 for line in lines[:30])
    with pytest.raises(DaptError, match=r"corpus 'c': malformed record at .*a.jsonl:line (\d+) after byte (\d+); ") as raised:
        build_stores([corpus], HELDOUT, DedupConfig(), DataConfig(tasks=2, workers=2), built_experiment.tokenizer_dir,
                     tmp_path / "stores")
    line, start = map(int, re.search(r"line (\d+) after byte (\d+)", str(raised.value)).groups())
    assert start + sum(len(l) + 1 for l in lines[30 - line + 1 : 30]) == offset, "the line counted from that byte is the bad one"
