"""The workdir is dapt's own: a marker says dapt made it its own, and a lock keeps one job in it.

dapt replaces what it writes there (a retrained tokenizer, a rebuilt store, old
checkpoints), so it must not mistake a user's folder of the same name for its own. A
workdir holding such names without dapt's marker is refused, naming them; a folder that
holds only other files (the experiment file and its data, as the demo's does) is taken
and marked.

One job at a time: a second job in the same workdir would write the same checkpoints and
tear `metrics.jsonl`. The lock file names its holder (host, pid, Slurm job); a lock whose
process is gone on this host, or that the same Slurm job left before a requeue, is taken
over; a live one, or one from another host, is reported with its owner. Processes that a
job's launcher started inherit its token and run under its lock.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from dapt.base import DaptError

MARKER = ".dapt-workdir"
LOCK = ".dapt-lock"
LOCK_TOKEN = "DAPT_WORKDIR_LOCK"  # in the environment of the processes a lock holder starts
# What dapt writes at the top of a workdir: a folder holding one of these without the marker is not dapt's.
OUTPUTS = ("tokenizer", "tokenizer-extended", "stores", "checkpoints", "carried-over", "export", "metrics.jsonl",
           "results.json", "wandb", "wandb-data", "sweep", "slurm", "eval_tasks", "eval_tasks.json",
           "data_report.json", "mix_plan.png", "tokenizer_eval.png", "report")


def claim_workdir(workdir: Path) -> None:
    """Make `workdir` dapt's (creating it), or refuse a folder whose dapt-named entries dapt did not write."""
    marker = workdir / MARKER
    if marker.exists():
        return
    foreign = sorted(name for name in OUTPUTS if (workdir / name).exists()) if workdir.is_dir() else []
    if foreign:
        raise DaptError(f"workdir: {workdir} holds {', '.join(foreign)} but is not a dapt workdir (no {MARKER} in it), "
                        f"and dapt replaces what it writes there; set `workdir` to another folder, or if dapt wrote "
                        f"them (an earlier version) or they may be replaced, `touch {marker}`")
    workdir.mkdir(parents=True, exist_ok=True)
    marker.write_text("This folder is a dapt workdir: dapt writes and replaces the files it creates here.\n")


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _stale(held: dict) -> bool:
    """Whether the lock's holder is gone: its process on this host, or this very Slurm job before a requeue."""
    job = os.environ.get("SLURM_JOB_ID")
    if job and held.get("slurm_job") == job:
        return True
    return held.get("host") == socket.gethostname() and not _alive(int(held.get("pid", 0)))


@contextmanager
def workdir_lock(workdir: Path):
    """Hold the workdir's lock while the block runs (a no-op inside a job that holds it already)."""
    path = workdir / LOCK
    inherited = os.environ.get(LOCK_TOKEN)
    if inherited and _read(path).get("token") == inherited:
        yield
        return
    token = uuid.uuid4().hex
    workdir.mkdir(parents=True, exist_ok=True)
    # Written whole beside it and linked into place: the lock never exists half written.
    written = path.with_name(f"{LOCK}.{token}")
    written.write_text(json.dumps(_holder() | {"token": token}))
    while True:
        try:
            os.link(written, path)
            written.unlink()
            break
        except FileExistsError:
            held = _read(path)
            if held and not _stale(held):
                written.unlink()
                raise DaptError(f"workdir: {workdir} is in use by another dapt job (pid {held.get('pid')} on "
                                f"{held.get('host')}{', Slurm job ' + held['slurm_job'] if held.get('slurm_job') else ''}, "
                                f"since {held.get('since')}); wait for it to end, or if it is gone, remove {path}") from None
            print(f"workdir: taking over the lock of a job that is gone ({held.get('pid')} on {held.get('host')})",
                  flush=True)
            path.unlink(missing_ok=True)
    previous = os.environ.get(LOCK_TOKEN)
    os.environ[LOCK_TOKEN] = token
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(LOCK_TOKEN, None)
        else:
            os.environ[LOCK_TOKEN] = previous
        if _read(path).get("token") == token:
            path.unlink(missing_ok=True)


def _read(path: Path) -> dict:
    try:
        held = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return held if isinstance(held, dict) else {}
