"""Where this process sits in the job: rank, world size, local rank, master address.

`dapt train` runs under whichever launcher the user chose, and each announces the
job in its own variables. A table of sources, tried in order, reads them:

- torchrun and the DeepSpeed launcher: RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
  MASTER_PORT. First, because `dapt launch slurm` starts torchrun inside a Slurm step,
  where SLURM_PROCID counts nodes, not training processes.
- OpenMPI (`mpirun`, the DeepSpeed launcher's openmpi backend): OMPI_COMM_WORLD_*;
  MPI has no master address, so MASTER_ADDR must be passed (`mpirun -x MASTER_ADDR`).
- Slurm (`srun dapt train`, one task per GPU): SLURM_PROCID / SLURM_NTASKS /
  SLURM_LOCALID inside an srun step; the master is the first host of the step's (or
  the job's, SLURM_JOB_NODELIST) node list and the port is derived from the job id, so
  every task computes the same pair without talking.

A process started by hand is rank 0 of 1.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable, Mapping

from dapt.base import DaptError

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistributedEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str = "single process"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class Source:
    name: str
    rank: str
    world_size: str
    local_rank: str
    master: Callable[[Mapping[str, str]], tuple[str | None, int]]
    inside: str | None = None
    """A variable that must be set too for the source to apply."""


def _master_from_env(env: Mapping[str, str]) -> tuple[str | None, int]:
    return env.get("MASTER_ADDR"), int(env.get("MASTER_PORT", DEFAULT_PORT))


def _master_from_slurm(env: Mapping[str, str]) -> tuple[str | None, int]:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    host = env.get("MASTER_ADDR") or (first_host(nodelist) if nodelist else None)
    # Jobs sharing a node must not share a port; the job id is the same on every task.
    port = env.get("MASTER_PORT") or DEFAULT_PORT + int(env.get("SLURM_JOB_ID", 0)) % 10000
    return host, int(port)


SOURCES = (
    Source("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", _master_from_env),
    Source("OpenMPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", _master_from_env),
    # Only inside an srun step: the batch shell has SLURM_PROCID=0 and SLURM_NTASKS=N
    # while it is one process, and a `dapt train` started there would wait for N-1 others.
    Source("Slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", _master_from_slurm, inside="SLURM_STEP_ID"),
)


def discover(environ: Mapping[str, str] | None = None) -> DistributedEnv:
    """The first source of SOURCES whose rank and world size are both set describes this process."""
    env = os.environ if environ is None else environ
    for source in SOURCES:
        if source.rank in env and source.world_size in env and (source.inside is None or source.inside in env):
            rank, world_size = int(env[source.rank]), int(env[source.world_size])
            host, port = source.master(env)
            if host is None and world_size > 1:
                raise DaptError(f"{source.name} started {world_size} processes but MASTER_ADDR is not set; "
                                f"pass the host of rank 0, e.g. `mpirun -x MASTER_ADDR=<host> -x MASTER_PORT=29500`")
            if not 0 <= rank < world_size:
                raise DaptError(f"{source.name}: {source.rank}={rank} is outside 0..{world_size - 1} "
                                f"({source.world_size}={world_size}); the launcher's variables are inconsistent")
            return DistributedEnv(rank, world_size, int(env.get(source.local_rank, 0)),
                                  host or "127.0.0.1", port, source.name)
    return DistributedEnv(0, 1, 0, "127.0.0.1", DEFAULT_PORT)


_BRACKETS = re.compile(r"\[([^\]]*)\]")


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list, as `scontrol show hostnames` would print it first.

    The compressed syntax: `node[01-03,07],gpu5` or `rack[1-2]-n[3-4]`; a range keeps its
    zero padding.
    """
    depth, end = 0, len(nodelist)
    for index, char in enumerate(nodelist):  # the first entry ends at the first comma outside brackets
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = index
            break
    entry = nodelist[:end].strip()
    if not entry or depth < 0 or entry.count("[") != entry.count("]"):
        raise DaptError(f"SLURM_JOB_NODELIST={nodelist!r} is not a Slurm node list (e.g. node[01-03,07])")
    return _BRACKETS.sub(lambda match: match.group(1).split(",")[0].split("-")[0], entry)


def export_for_torch(dist_env: DistributedEnv) -> None:
    """torch.distributed's env:// rendezvous reads these names."""
    os.environ.update(
        RANK=str(dist_env.rank), WORLD_SIZE=str(dist_env.world_size), LOCAL_RANK=str(dist_env.local_rank),
        MASTER_ADDR=dist_env.master_addr, MASTER_PORT=str(dist_env.master_port),
    )
