"""Which ranks of the job are still there, and one line when one is not.

A lost node ends a job in two ways, neither readable: on gloo its peers' next collective fails
with `Connection closed by peer` (an address, no rank), on NCCL they wait in it until the
process group's timeout and abort with C++ frames. So every rank beats a heartbeat into the
job's store (the TCP store the launcher or rank 0 serves at MASTER_ADDR:MASTER_PORT) from a
thread of its own, and watches the next rank's: a rank whose beat stops for LOST_AFTER_S is
named (its rank and node) in the store for every rank to read, and each rank then ends in
one line saying whom it lost, what it was doing and the checkpoint a rerun resumes from. A
store that stops answering means the node serving it (rank 0's) is gone. Each rank watches
one other, so the store serves a few requests per rank every HEARTBEAT_S at any scale.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from dapt.pretrain.checkpoint import latest_tag
from dapt.pretrain.env import DistributedEnv

HEARTBEAT_S = 2.0
LOST_AFTER_S = 20.0
LOST_EXIT_CODE = 3  # a rank that ends because another was lost; torchrun reports it as the failure
COLLECTIVE_ERRORS = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting", "Broken pipe",
                     "NCCL communicator was aborted")


class PeerWatch:
    """This rank's heartbeat and its watch over the next rank. `doing` (what the training loop is
    at, e.g. `step 12`) and `checkpoints` (the run's folder) go into the line said at the end."""

    def __init__(self, env: DistributedEnv, timeout_minutes: float):
        self.env, self.timeout_minutes = env, timeout_minutes
        self.doing, self.checkpoints = "start-up", None
        hosts: list = [None] * env.world_size
        dist.all_gather_object(hosts, os.environ.get("SLURMD_NODENAME") or socket.gethostname())  # Slurm's name if any
        self.hosts = hosts
        self.verdict: str | None = None
        self._stopped = threading.Event()
        self._store = None
        if env.world_size > 1:
            # A job torchrun restarts keeps its store: each attempt beats under keys of its own.
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            self._store = dist.PrefixStore(f"dapt/peers/{attempt}/", dist.TCPStore(
                env.master_addr, env.master_port, is_master=False, timeout=timedelta(seconds=10)))
            threading.Thread(target=self._watch, name="peer-watch", daemon=True).start()

    def stop(self) -> None:
        """Training is over on this rank: its beat stops, and it says so, so that no rank still
        finishing (rank 0 closing W&B) reads that as a lost rank."""
        self._stopped.set()
        if self._store is not None:
            try:
                self._store.set(f"done/{self.env.rank}", "1")
            except Exception:  # the store's node is gone: nobody is left to mistake this rank for lost
                pass

    def _watch(self) -> None:
        watched = (self.env.rank + 1) % self.env.world_size
        last_beat, since = None, time.monotonic()
        while not self._stopped.wait(HEARTBEAT_S):
            try:
                self._store.add(f"beat/{self.env.rank}", 1)
                beat = self._store.add(f"beat/{watched}", 0)
                told = self._store.get("lost").decode() if self._store.check(["lost"]) else None
                finished = self._store.check([f"done/{watched}"])
            except Exception as err:  # the store is served where rank 0 runs: that node is gone
                if not self._stopped.is_set():
                    self._end(f"the job's store at {self.env.master_addr}:{self.env.master_port} (node "
                              f"{self.hosts[0]}, rank 0's) stopped answering ({type(err).__name__})")
                return
            if told:
                self._end(told)
            if beat != last_beat or finished:
                last_beat, since = beat, time.monotonic()
            elif time.monotonic() - since > LOST_AFTER_S:
                lost = f"lost rank {watched} on node {self.hosts[watched]} (no heartbeat for {LOST_AFTER_S:.0f} s)"
                self._store.set("lost", lost)
                self._end(lost)

    def _end(self, what: str) -> None:
        self.verdict = what
        sys.stderr.write(f"dapt: error: {self.line(what)}\n")  # as the command says any error
        sys.stderr.flush()
        os._exit(LOST_EXIT_CODE)  # the main thread may be inside a collective that never returns

    def line(self, what: str) -> str:
        checkpoint = latest_tag(self.checkpoints) if self.checkpoints else None
        resume = (f"the last good checkpoint is {Path(self.checkpoints) / checkpoint}; rerun the job (or let Slurm "
                  "requeue it) to resume from it") if checkpoint else "no checkpoint was written yet; rerun the job"
        return (f"rank {self.env.rank} (node {self.hosts[self.env.rank]}): {what}, during {self.doing}; "
                f"the job ends here; {resume}")

    def explain(self, err: BaseException) -> str | None:
        """The line for a collective that failed in the training loop (None: not a collective's failure).
        A peer's loss is what the watch names, so it is given until then to name one."""
        message = str(err)
        if not isinstance(err, RuntimeError) or not any(marker in message for marker in COLLECTIVE_ERRORS):
            return None
        deadline = time.monotonic() + LOST_AFTER_S + 3 * HEARTBEAT_S
        while self._store is not None and self.verdict is None and time.monotonic() < deadline:
            time.sleep(0.2)  # the watch ends the process with its own line if it finds the lost rank
        reason = message.strip().splitlines()[0]
        reason = reason.split("] ", 1)[-1]  # without the C++ source location
        timeout = (f"; collectives wait train.dist_timeout_minutes = {self.timeout_minutes:g}"
                   if "Timed out" in reason else "")
        return self.line(f"a collective failed ({reason}){timeout}")
