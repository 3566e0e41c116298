"""Which ranks of the job are still there, and one line when one is not.

A lost node ends a job in two ways, neither readable: on gloo its peers' next collective fails
with `Connection closed by peer` (an address, no rank), on NCCL they wait in it until the
process group's timeout and abort with C++ frames. So every rank beats a heartbeat (and what it
is doing) into the job's store (the TCP store the launcher or rank 0 serves at
MASTER_ADDR:MASTER_PORT) from a thread of its own, and watches the next rank's. A collective
that fails looks at every rank's heartbeat and names those that stopped (seconds, on gloo); a
watch whose rank stops beating for LOST_AFTER_S names it in the store for every rank (NCCL,
where nothing fails); a timeout names the ranks that were elsewhere. Each rank then ends in one
line saying whom it lost, what it was doing and the checkpoint a rerun resumes from. A store
that stops answering means the node serving it (rank 0's) is gone. Each rank watches one other,
so the store serves a few requests per rank every HEARTBEAT_S at any scale.
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
STALL_MARGIN_S = 5.0  # the process group's timeout beyond a step's: a few heartbeats
LOST_EXIT_CODE = 3  # a rank that ends because another was lost; torchrun reports it as the failure
COLLECTIVE_ERRORS = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting", "Broken pipe",
                     "NCCL communicator was aborted")


class PeerWatch:
    """This rank's heartbeat and its watch over the next rank. `doing` (what the training loop is
    at, e.g. `step 12`) and `checkpoints` (the run's folder) go into the line said at the end."""

    def __init__(self, env: DistributedEnv, timeout_minutes: float):
        self.env, self.timeout_minutes = env, timeout_minutes
        self.checkpoints = None
        self.doing = "start-up"
        hosts: list = [None] * env.world_size
        dist.all_gather_object(hosts, os.environ.get("SLURMD_NODENAME") or socket.gethostname())  # Slurm's name if any
        self.hosts = hosts
        self._stopped = threading.Event()
        self._store = None
        if env.world_size > 1:
            # A job torchrun restarts keeps its store: each attempt beats under keys of its own.
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            self._store = dist.PrefixStore(f"dapt/peers/{attempt}/", dist.TCPStore(
                env.master_addr, env.master_port, is_master=False, timeout=timedelta(seconds=10)))
            threading.Thread(target=self._watch, name="peer-watch", daemon=True).start()

    @property
    def doing(self) -> str:
        return self._doing

    @doing.setter
    def doing(self, what: str) -> None:
        self._doing, self._step_since = what, None

    def step(self, number: int) -> None:
        """Step `number` starts: a step lasting longer than the timeout is a stall (evaluations and saves
        may take long; a step never does)."""
        self._doing, self._step_since = f"step {number}", time.monotonic()

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
                self._store.set(f"doing/{self.env.rank}", self.doing)
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
            if self._step_since is not None and time.monotonic() - self._step_since > self.timeout_minutes * 60:
                # Before NCCL's own watchdog, which aborts at the process group's timeout (STALL_MARGIN_S later) in C++ frames.
                self._end(f"this step waited longer than train.dist_timeout_minutes = {self.timeout_minutes:g} for the "
                          "other ranks", self._elsewhere())
            if beat != last_beat or finished:
                last_beat, since = beat, time.monotonic()
            elif time.monotonic() - since > LOST_AFTER_S:
                lost = f"lost rank {watched} on node {self.hosts[watched]} (no heartbeat for {LOST_AFTER_S:.0f} s)"
                self._store.set("lost", lost)
                self._end(lost)

    def _end(self, what: str, elsewhere: str = "") -> None:
        sys.stderr.write(f"dapt: error: {self.line(what, elsewhere)}\n")  # as the command says any error
        sys.stderr.flush()
        os._exit(LOST_EXIT_CODE)  # the main thread may be inside a collective that never returns

    def line(self, what: str, elsewhere: str = "") -> str:
        checkpoint = latest_tag(self.checkpoints) if self.checkpoints else None
        resume = (f"the last good checkpoint is {Path(self.checkpoints) / checkpoint}; rerun the job (or let Slurm "
                  "requeue it) to resume from it") if checkpoint else "no checkpoint was written yet; rerun the job"
        return (f"rank {self.env.rank} (node {self.hosts[self.env.rank]}): {what}, during {self.doing}{elsewhere}; "
                f"the job ends here; {resume}")

    def explain(self, err: BaseException) -> str | None:
        """The line for a collective that failed in the training loop (None: not a collective's failure):
        the ranks whose heartbeat has stopped, else the ranks that were elsewhere when it timed out."""
        message = str(err)
        if not isinstance(err, RuntimeError) or not any(marker in message for marker in COLLECTIVE_ERRORS):
            return None
        reason = message.strip().splitlines()[0].split("] ", 1)[-1]  # without the C++ source location
        if self._store is None:
            return self.line(f"a collective failed ({reason})")
        try:
            if "Timed out" in reason:
                return self.line(f"a collective timed out after train.dist_timeout_minutes = {self.timeout_minutes:g} "
                                 f"({reason})", self._elsewhere())
            lost = self._silent_ranks()
            what = (f"lost {', '.join(f'rank {r} on node {self.hosts[r]}' for r in lost[:8])} (no heartbeat)"
                    if lost else f"a collective failed ({reason})")
        except Exception as store_error:  # the store is served where rank 0 runs: that node is gone
            what = (f"a collective failed ({reason}) and the job's store on node {self.hosts[0]} (rank 0's) stopped "
                    f"answering ({type(store_error).__name__})")
        return self.line(what)

    def _silent_ranks(self) -> list[int]:
        """The other ranks whose heartbeat does not move over a few beats and that did not finish."""
        others = [rank for rank in range(self.env.world_size) if rank != self.env.rank]
        before = {rank: self._store.add(f"beat/{rank}", 0) for rank in others}
        time.sleep(2.5 * HEARTBEAT_S)
        return [rank for rank in others if self._store.add(f"beat/{rank}", 0) == before[rank]
                and not self._store.check([f"done/{rank}"])]

    def _elsewhere(self) -> str:
        """The ranks that were not where this one waited, and where they were."""
        places = {rank: self._store.get(f"doing/{rank}").decode() for rank in range(self.env.world_size)
                  if rank != self.env.rank and self._store.check([f"doing/{rank}"])}
        away = [f"rank {rank} (node {self.hosts[rank]}) was at {doing}" for rank, doing in places.items()
                if doing != self.doing]
        return f"; {', '.join(away[:8])}" if away else ""
