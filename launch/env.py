"""Where this process sits in the job: rank, world size, local rank, master address.

torchrun and the DeepSpeed launcher export RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT; a process started by hand is rank 0 of 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class DistributedEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def discover(environ: dict[str, str] | None = None) -> DistributedEnv:
    env = os.environ if environ is None else environ
    return DistributedEnv(
        rank=int(env.get("RANK", 0)),
        world_size=int(env.get("WORLD_SIZE", 1)),
        local_rank=int(env.get("LOCAL_RANK", 0)),
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=int(env.get("MASTER_PORT", 29500)),
    )


def export_for_torch(dist_env: DistributedEnv) -> None:
    """torch.distributed's env:// rendezvous reads these names."""
    os.environ.update(
        RANK=str(dist_env.rank), WORLD_SIZE=str(dist_env.world_size), LOCAL_RANK=str(dist_env.local_rank),
        MASTER_ADDR=dist_env.master_addr, MASTER_PORT=str(dist_env.master_port),
    )
