"""A step that waits for the other ranks longer than `train.dist_timeout_minutes` ends the job in one
line naming the rank, the step and where the other ranks were: two real gloo processes, one of them
busy elsewhere (a slow checkpoint save) while the other waits in the step's all-reduce."""

import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dapt.pretrain.env import DistributedEnv
from dapt.pretrain.peers import LOST_EXIT_CODE, PeerWatch

TIMEOUT_S = 3


def _rank(rank: int, port: int) -> None:
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0, timeout=timedelta(seconds=60))
    # As dapt starts it: the process group waits longer than a step may, so the watch speaks first.
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timedelta(seconds=60))
    watch = PeerWatch(DistributedEnv(rank, 2, 0, "127.0.0.1", port), TIMEOUT_S / 60)
    if rank == 1:
        watch.doing = "the checkpoint save after step 6"
        time.sleep(60)  # alive and beating, but not in the all-reduce rank 0 waits in
    else:
        watch.step(7)
        dist.all_reduce(torch.zeros(1))


def test_a_stalled_step_names_the_rank_the_step_and_where_the_others_were(capfd):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.perf_counter()
    with pytest.raises(mp.ProcessExitedException, match=f"exit code {LOST_EXIT_CODE}"):
        mp.start_processes(_rank, args=(port,), nprocs=2, start_method="spawn")
    assert time.perf_counter() - started < 30
    host = socket.gethostname()
    line = next(line for line in capfd.readouterr().err.splitlines() if line.startswith("dapt: error: rank 0"))
    assert line.startswith(f"dapt: error: rank 0 (node {host}), during step 7: step 7 waited longer than "
                           "train.dist_timeout_minutes = 0.05 for the other ranks; "
                           f"rank 1 (node {host}) was at the checkpoint save after step 6 (seen by rank 0"), line
