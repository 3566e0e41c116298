"""A collective that times out names the rank, the operation and the step, and where the other ranks
were: two real gloo processes, one of them busy elsewhere (a slow checkpoint save) past the process
group's timeout."""

import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dapt.pretrain.env import DistributedEnv
from dapt.pretrain.peers import PeerWatch

TIMEOUT_S = 3


def _rank(rank: int, port: int, lines) -> None:
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timedelta(seconds=TIMEOUT_S))
    watch = PeerWatch(DistributedEnv(rank, 2, 0, "127.0.0.1", port), TIMEOUT_S / 60)
    if rank == 1:
        watch.doing = "the checkpoint save after step 6"
        time.sleep(TIMEOUT_S + 4)  # alive and beating, but not in the collective rank 0 waits in
        watch.stop()
        store.set("rank 1 ended", "")
    else:
        watch.doing = "step 7"
        try:
            dist.all_reduce(torch.zeros(1))
        except RuntimeError as err:
            lines.put(watch.explain(err))
        watch.stop()
        store.wait(["rank 1 ended"])  # rank 0 serves the store: rank 1 would find it gone


def test_a_timed_out_collective_names_the_rank_the_step_and_where_the_others_were():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    lines = context.Queue()
    mp.start_processes(_rank, args=(port, lines), nprocs=2, start_method="spawn")
    line = lines.get(timeout=10)
    host = socket.gethostname()
    assert line.startswith(f"rank 0 (node {host}): a collective timed out after train.dist_timeout_minutes = 0.05 ("), line
    assert f"during step 7; rank 1 (node {host}) was at the checkpoint save after step 6; the job ends here" in line, line
