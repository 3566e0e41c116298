"""Faults a user meets, each injected for real, and what dapt does about it.

The README's fault table is this module and its integration twin: one row per test. Nothing is mocked: the
faults are a missing tokenizer, a cut or edited store, a changed source file, a folder
that is not dapt's, a second job, a torn metrics line, too little disk and one very long
document; those that need a run first are in integration/test_faults_in_a_run.py.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dapt.workdir import LOCK, MARKER, claim_workdir, workdir_lock
from tests.conftest import reusing, small_corpora_section, write_experiment
from tests.helpers import TINY, dapt, dapt_here


def refused(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The error of a command that refused to start: no traceback, no training process started."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "launching" not in result.stdout, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    return result.stderr


def tiny_run(folder: Path, built_experiment, steps: int = 6, **train) -> Path:
    """A tiny model on the session's tokenizer and stores, checkpointing every 3 steps."""
    return write_experiment(folder, {
        "workdir": str(folder / "run"), **reusing(built_experiment), "model": {"config": TINY},
        "mix": {"seq_len": 32, "group_weights": {"financial": 0.5, "public": 0.5}},
        "train": {"steps": steps, "global_batch_size": 8, "micro_batch_size": 2, "lr": 1e-3, "warmup_steps": 1,
                  "precision": "fp32", "checkpoint_every": 3, "keep_checkpoints": 1, "eval_max_tokens": 500,
                  "log_every": 1, **train}})


def edit(path: Path, change) -> Path:
    config = yaml.safe_load(path.read_text())
    change(config)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture
def own_stores(tmp_path, small_corpora, built_experiment) -> Path:
    """An experiment with its own copy of the corpora and its own stores, built (the session's tokenizer)."""
    shutil.copytree(small_corpora / "data", tmp_path / "data")
    corpora = [{**c, "paths": [p.replace(str(small_corpora), str(tmp_path)) for p in c["paths"]]}
               for c in small_corpora_section(small_corpora)]
    path = write_experiment(tmp_path, {"workdir": str(tmp_path / "run"), "corpora": corpora,
                                       "tokenizer": {"path": str(built_experiment.tokenizer_dir)}})
    result = dapt("data", "build", str(path))
    assert result.returncode == 0, result.stderr
    return path


# -- before a job starts ---------------------------------------------------------------------------

def test_no_tokenizer_stops_every_launcher_before_a_rank_starts(tmp_path, small_corpora):
    path = write_experiment(tmp_path, {"workdir": str(tmp_path / "run"), "corpora": small_corpora_section(small_corpora)})
    for command in (["launch", "local"], ["train"], ["launch", "slurm"]):
        error = refused(dapt_here(*command, str(path)), "the job would fail, so nothing was started",
                        f"no tokenizer at {tmp_path / 'run' / 'tokenizer'}: run `dapt tokenizer train {path}`")
        assert "Repo id" not in error


def test_wandb_online_without_login_or_server_is_one_line(tmp_path, built_experiment):
    path = tiny_run(tmp_path, built_experiment)
    edit(path, lambda c: c.update(wandb={"mode": "online"}))
    no_login = {"HOME": str(tmp_path), "NETRC": str(tmp_path / "none"), "WANDB_API_KEY": ""}
    refused(dapt("launch", "local", str(path), env=no_login), "no W&B credentials for api.wandb.ai: run `wandb login`")
    closed_port = {"WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"}
    refused(dapt("launch", "local", str(path), env=closed_port), "http://127.0.0.1:9 did not answer within 5 s",
            "set `wandb.mode: offline`")


def test_a_cut_or_edited_store_is_named_and_rebuilt(own_stores, tmp_path):
    stores = tmp_path / "run" / "stores"
    train_bin = sorted((stores / "news").glob("train-*.bin"))[-1]  # a shard of a store of several
    os.truncate(train_bin, train_bin.stat().st_size - 1000)
    (stores / "web" / "manifest.json").write_text("{ not json")
    os.truncate(stores / "filings" / "heldout-00000.bin", (stores / "filings" / "heldout-00000.bin").stat().st_size - 1)
    error = refused(dapt("launch", "local", str(own_stores)))
    assert "news" in error and f"{train_bin.name} holds" in error and "where its manifest says" in error
    assert "web" in error and "manifest.json is unreadable" in error
    assert "filings" in error and "heldout-00000.bin holds" in error
    assert f"run `dapt data build {own_stores}`" in error
    rebuilt = dapt("data", "build", str(own_stores))
    assert rebuilt.returncode == 0, rebuilt.stderr
    for corpus in ("news", "web", "filings"):
        assert f"store {corpus}: built" in rebuilt.stdout, rebuilt.stdout
    assert "store encyclopedia: up to date" in rebuilt.stdout
    assert f"{train_bin.name} holds" in rebuilt.stdout and "rebuilding it" in rebuilt.stdout


def test_a_source_changed_after_the_build_is_named(own_stores, tmp_path):
    source = sorted((tmp_path / "data" / "filings").iterdir())[0]
    with open(source, "a") as handle:
        handle.write(json.dumps({"text": "A filing added after the build."}) + "\n")
    refused(dapt("launch", "local", str(own_stores)), f"source file {source} changed since the build")
    touched_only = sorted((tmp_path / "data" / "filings").iterdir())[1]
    os.utime(touched_only)  # a new modification time, the same bytes: no change
    assert f"{touched_only}" not in dapt("launch", "local", str(own_stores)).stderr


def test_verify_finds_a_flipped_byte(own_stores, tmp_path):
    assert dapt("data", "inspect", "--verify", str(own_stores)).returncode == 0
    heldout = tmp_path / "run" / "stores" / "news" / "heldout-00000.bin"
    data = bytearray(heldout.read_bytes())
    data[10] ^= 1
    heldout.write_bytes(bytes(data))  # same size: only the checksum tells
    result = dapt("data", "inspect", "--verify", str(own_stores))
    assert result.returncode == 2
    assert "news" in result.stderr and "heldout-00000.bin does not match the checksum written at build time" in result.stderr


def test_a_folder_that_is_not_dapts_is_refused_and_left_alone(tmp_path, small_corpora):
    work = tmp_path / "mine"
    (work / "tokenizer").mkdir(parents=True)
    (work / "tokenizer" / "MARKER").write_text("mine")
    (work / "results.json").write_text('{"mine": true}')
    path = write_experiment(tmp_path, {"workdir": str(work), "corpora": small_corpora_section(small_corpora)})
    refused(dapt("tokenizer", "train", str(path)), f"workdir: {work} holds results.json, tokenizer but is not a "
                                                    f"dapt workdir", f"touch {work / MARKER}")
    assert (work / "tokenizer" / "MARKER").read_text() == "mine"
    assert (work / "results.json").read_text() == '{"mine": true}'
    claim_workdir(tmp_path / "fresh")  # a new folder, or one holding only the user's other files, is taken
    assert (tmp_path / "fresh" / MARKER).exists()


def test_a_second_job_in_a_workdir_is_refused_naming_the_first(tmp_path, built_experiment):
    path = tiny_run(tmp_path, built_experiment)
    with workdir_lock(tmp_path / "run"):  # this test process is the running job
        error = refused(dapt("launch", "local", str(path), env={"DAPT_WORKDIR_LOCK": ""}),
                        f"is in use by another dapt job (pid {os.getpid()} on {socket.gethostname()}")
        assert str(tmp_path / "run" / LOCK) in error
    assert not (tmp_path / "run" / LOCK).exists()


def test_the_lock_of_a_job_that_is_gone_is_taken_over(tmp_path, capsys):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid, "token": "old"}))
    with workdir_lock(tmp_path):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    assert "taking over the lock of a job that is gone" in capsys.readouterr().out


def test_a_torn_metrics_line_is_left_out_on_resume(tmp_path, capsys):
    from dapt.pretrain.tracking import _metrics_file

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "train/loss": 5.0}\n{"step": 2, "train/loss": 4.0}\n{"step": 3, "tra')
    _metrics_file(metrics, resume_step=2).close()
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2]
    assert "1 line(s) cut short by an interrupted run left out" in capsys.readouterr().out


def test_a_long_document_builds_in_bounded_memory(tmp_path, built_experiment):
    """One 20 MB document: the build's peak memory grows by less than 10 times its size."""
    from dapt.data_mix.demo_corpora import filing
    import random

    rng, parts = random.Random(0), []
    while sum(map(len, parts)) < 20_000_000:
        parts.append(filing(rng))
    (tmp_path / "long.jsonl").write_text(json.dumps({"text": "\n".join(parts)}) + "\n")
    (tmp_path / "short.jsonl").write_text(json.dumps({"text": parts[0]}) + "\n")
    script = (
        "import resource, sys\nfrom pathlib import Path\n"
        "from dapt.data_mix.build import build_store\nfrom dapt.data_mix.config import CorpusConfig, HeldoutConfig\n"
        "if __name__ == '__main__':\n"
        "    corpus = CorpusConfig(name=Path(sys.argv[1]).stem, group='g', paths=[sys.argv[1]])\n"
        f"    build_store(corpus, HeldoutConfig(), Path({str(built_experiment.tokenizer_dir)!r}), Path(sys.argv[2]))\n"
        "    print(max(resource.getrusage(w).ru_maxrss for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))\n")
    (tmp_path / "build.py").write_text(script)

    def peak_kb(name: str) -> int:
        result = subprocess.run([sys.executable, str(tmp_path / "build.py"), str(tmp_path / name), str(tmp_path / "stores")],
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        return int(result.stdout.split()[-1])

    size = (tmp_path / "long.jsonl").stat().st_size
    grown = (peak_kb("long.jsonl") - peak_kb("short.jsonl")) * 1024
    assert grown < 10 * size, f"{grown / size:.1f} times the document"


# -- while a job runs ------------------------------------------------------------------------------


def test_too_little_disk_for_a_checkpoint_is_named_before_the_job(tmp_path, built_experiment):
    path = tiny_run(tmp_path, built_experiment)
    huge = {**TINY, "hidden_size": 16384, "intermediate_size": 53248, "num_hidden_layers": 120,
            "num_attention_heads": 128, "num_key_value_heads": 8}  # ~400B parameters: no disk here holds 6 PB
    edit(path, lambda c: c["model"].update(config=huge))
    refused(dapt("launch", "local", str(path)), "free on the disk of", "M parameters, fp32 weights and Adam's fp32 state",
            "free space there or set `workdir` to a larger disk")
