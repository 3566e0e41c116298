"""Crash-safe DeepSpeed checkpoints.

DeepSpeed as shipped writes `latest` from rank 0 before other ranks' shards are
on disk and never fsyncs. Here every rank saves under a unique tag without
`latest`, fsyncs its files, and after a barrier rank 0 replaces `latest`
atomically (write a temporary file, fsync, rename, fsync the folder). A crash at
any point leaves `latest` naming a complete checkpoint. Old tags beyond
`keep` are removed only after the new `latest` is in place.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist

from dapt.base import DaptError, disk_size

LATEST = "latest"
META = "dapt-checkpoint.json"  # beside each checkpoint: what a resume must know before building the engine


# Bytes per parameter in a checkpoint beyond the weights: Adam's two moments and the fp32 master
# weights (which DeepSpeed keeps for fp32 training too, as its optimizer's flat partitions).
OPTIMIZER_BYTES_PER_PARAMETER = 12


def checkpoint_bytes(parameters: int, weight_bytes: int) -> int:
    """About what one checkpoint of a model of `parameters` takes on disk, weights in `weight_bytes` each."""
    return parameters * (weight_bytes + OPTIMIZER_BYTES_PER_PARAMETER)


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def save_checkpoint(engine, folder: Path, step: int, client_state: dict, keep: int, experiment_yaml: str) -> str:
    tag = tag_for(step)
    if dist.get_rank() == 0:  # first: a folder holding META is dapt's, so clean-up may remove it, and no other
        (folder / tag).mkdir(parents=True, exist_ok=True)
        (folder / tag / META).write_text(json.dumps({"step": step, "world_size": dist.get_world_size(),
                                                     "experiment_yaml": experiment_yaml}))
    dist.barrier()
    try:
        engine.save_checkpoint(str(folder), tag=tag, client_state=client_state, save_latest=False)
        _fsync_tree(folder / tag)
    except Exception as err:  # a full disk surfaces from torch's writer as `basic_ios::clear: iostream error`
        raise _save_failed(engine, folder, tag, err) from err
    dist.barrier()
    if dist.get_rank() == 0:
        temporary = folder / f"{LATEST}.tmp"
        with open(temporary, "w") as handle:
            handle.write(tag)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, folder / LATEST)
        _fsync_dir(folder)
        for old in checkpoint_folders(folder)[:-keep]:  # the one just written is the newest
            shutil.rmtree(old)
    dist.barrier()
    return tag


def _save_failed(engine, folder: Path, tag: str, err: Exception) -> DaptError:
    """The error of a failed save, after removing what it left: the folder, its free space, the size
    needed, the checkpoint a rerun resumes from."""
    latest = latest_tag(folder)
    shutil.rmtree(folder / tag, ignore_errors=True)
    free = shutil.disk_usage(folder).free
    previous = folder / latest if latest else None
    if previous is not None:
        needed = sum(p.stat().st_size for p in previous.rglob("*") if p.is_file())
    else:
        parameters = list(engine.module.parameters())
        needed = checkpoint_bytes(sum(getattr(p, "ds_numel", p.numel()) for p in parameters),
                                  parameters[0].element_size())
    cause = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    room = ("not enough space left for it" if free < needed else
            "the disk has room for it, so the cause is that error")
    kept = f"the last good checkpoint, {previous}, is kept and a rerun resumes from it" if previous else \
        "there is no earlier checkpoint to resume from"
    return DaptError(f"saving checkpoint {folder / tag} failed ({cause}): {disk_size(free)} free on that disk, a "
                     f"checkpoint takes about {disk_size(needed)} ({room}); the partial folder was removed, {kept}")


def checkpoint_folders(folder: Path) -> list[Path]:
    """The checkpoints dapt wrote in `folder` (a folder of another name or without META is not one), in the
    order they were written: after `--no-resume` a run's step-8 checkpoint is newer than an old run's step 30."""
    found = [p for p in folder.glob("step*") if p.is_dir() and p.name[4:].isdigit() and (p / META).exists()]
    return sorted(found, key=lambda p: ((p / META).stat().st_mtime_ns, p.name))


def latest_tag(folder: Path) -> str | None:
    path = folder / LATEST
    return path.read_text().strip() if path.exists() else None


def latest_meta(folder: Path) -> dict | None:
    """What the latest checkpoint says of itself before it is loaded (None without one): its step, the
    number of processes that wrote it, and (since dapt wrote it there) the experiment file it was trained from."""
    tag = latest_tag(folder)
    if tag is None:
        return None
    return json.loads((folder / tag / META).read_text())
