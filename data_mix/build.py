"""`dapt data build`: the corpora read, validated, deduplicated, split and tokenised into token stores.

The work runs as datatrove pipelines (build_steps.py) on one of its executors: local processes
by default, a Slurm job array (`data.executor: slurm`), or a Ray cluster. The corpora are split
into tasks by bytes (units.py); each task writes its part of every store as a shard, and this
module writes each store's manifest once every task is done. A build's work folder is named by
what it builds (a hash of the stores' fingerprints and the task count): a build that was stopped
resumes there, rerunning only the tasks datatrove has not marked finished.

A store's fingerprint is what it depends on (config, sources, tokenizer, held-out split and
deduplication); an unchanged fingerprint means the store is kept. Checking it is cheap on an
unchanged corpus: a local source is checksummed again only when its size or modification time
changed, an object in storage is compared by its ETag.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from dapt.base import DaptError
from dapt.data_mix.build_steps import BuildLayout, ReadStep, WriteStep
from dapt.data_mix.config import CorpusConfig, DataConfig, DedupConfig, HeldoutConfig
from dapt.data_mix.dedup import DecideStep, write_heldout
from dapt.data_mix.files import file_stat, file_version, resolve_files
from dapt.data_mix.store import (MANIFEST, file_records, read_manifest, shard_files, size_problem, token_dtype,
                                 tokenizer_hash)
from dapt.data_mix.tokenise import load_encoder
from dapt.data_mix.units import file_format, plan_tasks

STORE_VERSION = 4  # 4: stores of shards, deduplicated by `dedup`


def _sources_now(corpus: CorpusConfig, built: dict | None) -> tuple[dict, dict]:
    """(version, stat) of each source of the corpus now; a local file's checksum is reused from the
    build when its size and modification time are unchanged."""
    if not corpus.paths:
        return {"hf_dataset": corpus.hf_dataset.model_dump()}, {}
    then = (built or {}).get("fingerprint", {}).get("sources", {})
    then_stats = (built or {}).get("source_stats", {})
    versions, stats = {}, {}
    for source in resolve_files(corpus.paths, corpus.name):
        stats[source.url] = file_stat(source, corpus.name)
        unchanged = then_stats.get(source.url) == stats[source.url] and source.url in then
        versions[source.url] = (then[source.url] if unchanged else
                                file_version(source, corpus.name) if not source.remote else
                                "stat:" + ":".join(map(str, stats[source.url])))
    return versions, stats


class BuildRequest:
    """The stores an experiment's corpora make, with what each depends on now."""

    def __init__(self, corpora: list[CorpusConfig], heldout: HeldoutConfig, dedup: DedupConfig, tokenizer_dir: Path,
                 stores_dir: Path):
        self.corpora, self.heldout, self.dedup = corpora, heldout, dedup
        self.tokenizer_dir, self.stores_dir = Path(tokenizer_dir), Path(stores_dir)
        self.tokenizer = tokenizer_hash(self.tokenizer_dir)  # first: a missing tokenizer is the error to report
        self.built = {c.name: _manifest_or_none(self.stores_dir / c.name) for c in corpora}
        self.sources = {c.name: _sources_now(c, self.built[c.name]) for c in corpora}
        own = {c.name: {"version": STORE_VERSION, "corpus_config": c.model_dump(), "heldout": heldout.model_dump(),
                        "dedup": dedup.model_dump(), "tokenizer_hash": self.tokenizer,
                        "sources": self.sources[c.name][0]} for c in corpora}
        # Deduplicated across corpora, a store depends on the others' sources too.
        together = _digest(own) if dedup.spans_corpora() else None
        self.fingerprints = {name: fp | ({"deduplicated_with": together} if together else {}) for name, fp in own.items()}

    @classmethod
    def of(cls, experiment) -> BuildRequest:
        """The experiment's stores (to tell which are up to date)."""
        return cls(experiment.corpora, experiment.heldout, experiment.dedup, experiment.tokenizer_dir,
                   experiment.stores_dir)

    def staleness(self, corpus: CorpusConfig) -> str | None:
        """Why the corpus's store does not hold what would be built now, or None when it does."""
        manifest = self.built[corpus.name]
        folder = self.stores_dir / corpus.name
        if manifest is None:
            return "not built yet" if not (folder / MANIFEST).exists() else f"its {MANIFEST} is unreadable"
        built, now = manifest.get("fingerprint", {}), self.fingerprints[corpus.name]
        if built.get("version") != STORE_VERSION:
            return "built by another version of dapt's store format"
        if built.get("tokenizer_hash") != now["tokenizer_hash"]:
            return f"built with another tokenizer than {self.tokenizer_dir}"
        if built.get("corpus_config") != now["corpus_config"]:
            return f"corpus '{corpus.name}' is configured differently since the build"
        if built.get("heldout") != now["heldout"]:
            return "`heldout` is configured differently since the build"
        if built.get("dedup") != now["dedup"]:
            return "`dedup` is configured differently since the build"
        then, sources = built.get("sources", {}), now["sources"]
        if not corpus.paths and then != sources:
            return "its `hf_dataset` changed since the build"
        added, removed = sorted(sources.keys() - then.keys()), sorted(then.keys() - sources.keys())
        if added or removed:
            return f"source files {'added: ' + ', '.join(added) if added else 'removed: ' + ', '.join(removed)} since the build"
        changed = [url for url in sources if sources[url] != then[url]]
        if changed:
            return f"source file {changed[0]} changed since the build"
        if built.get("deduplicated_with") != now.get("deduplicated_with"):
            return "another corpus it is deduplicated with changed since the build"
        return size_problem(folder, manifest)


def _manifest_or_none(folder: Path) -> dict | None:
    try:
        return read_manifest(folder)
    except DaptError:
        return None


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def build_store(corpus: CorpusConfig, heldout: HeldoutConfig, tokenizer_dir: Path, stores_dir: Path,
                data: DataConfig | None = None, dedup: DedupConfig | None = None) -> dict:
    """Build (or keep, when up to date) one corpus's store; returns its manifest."""
    return build_stores([corpus], heldout, dedup or DedupConfig(), data or DataConfig(), tokenizer_dir, stores_dir)[0]


def build_stores(corpora: list[CorpusConfig], heldout: HeldoutConfig, dedup: DedupConfig, data: DataConfig,
                 tokenizer_dir: Path, stores_dir: Path, slurm_partition: str | None = None) -> list[dict]:
    """Build the stores that are not up to date (all of them when deduplicated across corpora); the
    manifests of all, in the corpora's order, each with `rebuilt`."""
    stores_dir = Path(stores_dir)
    request = BuildRequest(corpora, heldout, dedup, tokenizer_dir, stores_dir)
    stale = {c.name: request.staleness(c) for c in corpora}
    todo = [c for c in corpora if stale[c.name]]
    if todo and dedup.spans_corpora():
        todo = list(corpora)
    for corpus in todo:
        if request.built[corpus.name] is not None:
            print(f"store {corpus.name}: {stale[corpus.name] or 'deduplicated with a corpus that changed'}; rebuilding it",
                  flush=True)
    if todo:
        _build(request, todo, data, slurm_partition)
    return [read_manifest(stores_dir / c.name) | {"rebuilt": c in todo} for c in corpora]


def default_tasks(data: DataConfig) -> int:
    return data.tasks or (len(os.sched_getaffinity(0)) if data.executor == "local" else 64)


def _build(request: BuildRequest, corpora: list[CorpusConfig], data: DataConfig, slurm_partition: str | None) -> None:
    encoder, eos = load_encoder(request.tokenizer_dir)
    vocab_size = encoder.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab_size)
    tasks = default_tasks(data)
    fingerprints = {c.name: request.fingerprints[c.name] for c in corpora}
    layout = BuildLayout(request.stores_dir / ".build" / _digest({"stores": fingerprints, "tasks": tasks}))
    for leftover in (request.stores_dir / ".build").glob("*"):  # builds of what is no longer asked for
        if leftover != layout.work:
            shutil.rmtree(leftover, ignore_errors=True)
    _write_plan(layout, corpora, tasks)
    from dapt.data_mix.executors import run_stages

    near = request.dedup.near
    stages = [("read", tasks, [ReadStep(str(layout.work), corpora, str(request.tokenizer_dir), dtype.str, near is not None)])]
    if near is not None:
        from dapt.data_mix.near import bucket_stage, signature_step

        stages[0][2].append(signature_step(layout, near))
        stages.append(bucket_stage(layout, near))
    stages += [("decide", 1, [DecideStep(str(layout.work), corpora, request.heldout, request.dedup)]),
               ("write", tasks, [WriteStep(str(layout.work), corpora, dtype.str)])]
    started = time.perf_counter()
    run_stages(stages, layout, data, slurm_partition)
    for corpus in corpora:
        _finish_store(request, corpus, layout, dtype, vocab_size, eos)
    print(f"stores built in {time.perf_counter() - started:.1f} s by {tasks} task(s) ({data.executor}); "
          f"the build's logs were in {layout.work}/logs", flush=True)
    shutil.rmtree(layout.work, ignore_errors=True)


def _write_plan(layout: BuildLayout, corpora: list[CorpusConfig], tasks: int) -> None:
    """The units of every task, written once: a resumed build reads the same plan."""
    path = layout.work / "plan.json"
    if path.exists():
        return
    for corpus in corpora:  # a format that cannot be told is the user's to fix before any task starts
        if corpus.paths:
            for source in resolve_files(corpus.paths, corpus.name):
                file_format(corpus, source)
    plan = plan_tasks(corpora, tasks)
    layout.work.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"tasks": [[unit.to_json() for unit in units] for units in plan]}))
    os.replace(temporary, path)


def _finish_store(request: BuildRequest, corpus: CorpusConfig, layout: BuildLayout, dtype: np.dtype, vocab_size: int,
                  eos: int) -> None:
    """Move the corpus's shards into its store and write its manifest; the store replaces the old one whole."""
    decided = json.loads((layout.decided / f"{corpus.name}.json").read_text())
    staging = request.stores_dir / f".{corpus.name}.building"
    shutil.rmtree(staging, ignore_errors=True)
    written = layout.shard(corpus.name)
    sidecars = sorted(written.glob("train-*.json")) if written.exists() else []
    shards = [path.name.removesuffix(".json") for path in sidecars]
    train = [json.loads(path.read_text()) for path in sidecars]
    for path in sidecars:
        path.unlink()
    if written.exists():
        os.replace(written, staging)  # the shards move, not copied: they may be terabytes
    else:
        staging.mkdir(parents=True)
    heldout = write_heldout(layout, corpus, decided, staging, dtype)
    records = corpus.record_format != "text"
    totals = {key: sum(shard["counts"][key] for shard in train) for key in heldout}
    names = {"train": shards, "heldout": ["heldout-00000"]}
    # Checksums of the training shards were taken by the tasks that wrote them.
    files = {name: record for shard in train for name, record in shard["files"].items()}
    files |= file_records(staging, list(shard_files("heldout-00000", records)))
    accounting = decided["accounting"]
    if totals.get("documents", 0) == 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise DaptError(f"corpus '{corpus.name}': no document is left for training ({accounting['kept']} kept, "
                        f"{heldout['documents']} held out; rejected {accounting['rejected'] or 'none'}); lower "
                        "`heldout.fraction`, or see why records were rejected with `dapt data prepare`")
    fingerprint = request.fingerprints[corpus.name]
    manifest = {
        "corpus": corpus.name, "group": corpus.group, "dtype": dtype.name, "vocab_size": vocab_size,
        "eos_token_id": eos, "tokenizer_hash": fingerprint["tokenizer_hash"], "records": records,
        "splits": {"train": totals, "heldout": heldout}, "shards": names, "accounting": accounting,
        "decontaminated": decided["decontaminated"], "fingerprint": fingerprint,
        "files": files, "source_stats": request.sources[corpus.name][1],
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
    final = request.stores_dir / corpus.name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
