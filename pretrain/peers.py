"""Which ranks of the job are still there, and one line when one is not.

A lost node ends a job in two ways, neither readable: on gloo its peers' next collective fails
with `Connection closed by peer` (an address, no rank), on NCCL they wait in it until the
process group's timeout and abort with C++ frames. So every rank beats a heartbeat (and what it
is doing) into the job's store (the TCP store the launcher or rank 0 serves at
MASTER_ADDR:MASTER_PORT) from a thread of its own, and watches the next rank's:

- a collective that fails (gloo) makes one rank look at every rank's heartbeat and name those
  that stopped, within seconds;
- a watched rank whose beat stops for LOST_AFTER_S is named (NCCL, where nothing fails);
- a step that waits for the others longer than `train.dist_timeout_minutes` while another rank
  is elsewhere is a stall, named with where the others were.

One rank names what happened, under a key of the store that every rank reads on its next beat;
each then ends in one line saying whom it lost, what it was doing and the checkpoint a rerun
resumes from. Each rank watches one other, so the store serves a few requests per rank every
HEARTBEAT_S whatever the job's size. A store that stops answering for LOST_AFTER_S means the
node serving it (rank 0's) is gone.
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
LOST_EXIT_CODE = 3  # a rank that ends because of another; torchrun reports it as the failure
COLLECTIVE_ERRORS = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting", "Broken pipe",
                     "NCCL communicator was aborted")


class PeerWatch:
    """This rank's heartbeat and its watch over the next rank. `doing` (what the training loop is
    at) and `checkpoints` (the run's folder) go into the line said at the end."""

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
            self._thread = threading.Thread(target=self._watch, name="peer-watch", daemon=True)
            self._thread.start()

    @property
    def doing(self) -> str:
        return self._doing

    @doing.setter
    def doing(self, what: str) -> None:
        self._doing, self._step_since = what, None

    def step(self, number: int) -> None:
        """Step `number` starts: a step waiting longer than the timeout while others are elsewhere is a
        stall (evaluations and saves may take long, and are bounded by the process group's timeout)."""
        self._doing, self._step_since = f"step {number}", time.monotonic()

    def stop(self) -> None:
        """Training is over on this rank: its beat stops, and it says so, so that no rank still finishing
        (rank 0 closing W&B) reads that as a lost rank. Where rank 0 serves the store (the DeepSpeed
        launcher, srun), rank 0 keeps it up until every rank has said so."""
        self._stopped.set()
        if self._store is None:
            return
        # The thread's store request in flight ends first: a process leaving while a thread is inside the
        # store's C++ client aborts ("terminate called without an active exception").
        self._thread.join(timeout=HEARTBEAT_S + 15)
        try:
            self._store.set(f"done/{self.env.rank}", "1")
            if self.env.is_main:
                self._store.wait([f"done/{rank}" for rank in range(self.env.world_size)],
                                 timedelta(seconds=LOST_AFTER_S))
        except Exception:  # a rank that never finishes, or the store's node gone: nothing left to keep up
            pass

    def _watch(self) -> None:
        watched = (self.env.rank + 1) % self.env.world_size
        last_beat, beat_since, answered = None, time.monotonic(), time.monotonic()
        while not self._stopped.wait(HEARTBEAT_S):
            try:
                told = self._beat()
                beat = self._store.add(f"beat/{watched}", 0)
                finished = self._store.check([f"done/{watched}"])
                answered = time.monotonic()
                if told:
                    self._end(told)
                step_since = self._step_since  # read once: the training loop moves it
                if step_since is not None and time.monotonic() - step_since > self.timeout_minutes * 60:
                    self._stalled()
                if beat != last_beat or finished:
                    last_beat, beat_since = beat, time.monotonic()
                elif time.monotonic() - beat_since > LOST_AFTER_S:
                    self._tell(f"lost rank {watched} on node {self.hosts[watched]} (no heartbeat for "
                               f"{LOST_AFTER_S:.0f} s)")
            except Exception as err:  # one slow answer is not a lost store; LOST_AFTER_S without one is
                if not self._stopped.is_set() and time.monotonic() - answered > LOST_AFTER_S:
                    self._end(f"the job's store at {self.env.master_addr}:{self.env.master_port} (node "
                              f"{self.hosts[0]}, rank 0's) stopped answering ({type(err).__name__})")

    def _beat(self) -> str | None:
        """This rank's heartbeat and place; what another rank has named, if it has."""
        self._store.add(f"beat/{self.env.rank}", 1)
        self._store.set(f"doing/{self.env.rank}", self.doing)
        return self._store.get("told").decode() if self._store.check(["told"]) else None

    def _stalled(self) -> None:
        """This step has waited past the timeout: a stall if another rank is elsewhere (one rank looks)."""
        if self._store.add("looking", 1) != 1:
            return  # another rank is looking; its verdict arrives under `told`
        elsewhere = self._elsewhere()
        if elsewhere:
            self._tell(f"{self.doing} waited longer than train.dist_timeout_minutes = {self.timeout_minutes:g} "
                       f"for the other ranks{elsewhere}")
        self._store.add("looking", -1)  # all at the same step: slow, not stalled; look again later

    def _tell(self, what: str) -> None:
        """Name what happened for every rank (each ends with it on its next beat), and end this one."""
        told = f"{what} (seen by rank {self.env.rank} on node {self.hosts[self.env.rank]})"
        self._store.set("told", told)
        self._end(told)

    def _end(self, what: str) -> None:
        sys.stderr.write(f"dapt: error: {self.line(what)}\n")  # as the command says any error
        sys.stderr.flush()
        os._exit(LOST_EXIT_CODE)  # the main thread may be inside a collective that never returns

    def line(self, what: str) -> str:
        checkpoint = latest_tag(self.checkpoints) if self.checkpoints else None
        resume = (f"the last good checkpoint is {Path(self.checkpoints) / checkpoint}; rerun the job (or let Slurm "
                  "requeue it) to resume from it") if checkpoint else "no checkpoint was written yet; rerun the job"
        return (f"rank {self.env.rank} (node {self.hosts[self.env.rank]}), during {self.doing}: {what}; "
                f"the job ends here; {resume}")

    def explain(self, err: BaseException) -> str | None:
        """For a collective that failed in the training loop, the ranks whose heartbeat stopped, named by
        one rank for all, each ending with that line (None: not a collective's failure, or a job of one
        process; a line: the store is gone too)."""
        message = str(err)
        if (self._store is None or not isinstance(err, RuntimeError)
                or not any(marker in message for marker in COLLECTIVE_ERRORS)):
            return None
        reason = message.strip().splitlines()[0].split("] ", 1)[-1]  # without the C++ source location
        try:
            if self._store.add("probing", 1) == 1:
                lost = self._silent_ranks()
                self._tell(f"lost {', '.join(f'rank {r} on node {self.hosts[r]}' for r in lost[:8])} (no heartbeat)"
                           if lost else f"a collective failed ({reason})")
            deadline = time.monotonic() + LOST_AFTER_S
            while time.monotonic() < deadline and not self._store.check(["told"]):
                time.sleep(HEARTBEAT_S / 4)  # the rank probing names it for all
            if self._store.check(["told"]):
                self._end(self._store.get("told").decode())
        except Exception as store_error:  # the store is served where rank 0 runs: that node is gone
            return self.line(f"a collective failed ({reason}), and the job's store on node {self.hosts[0]} "
                             f"(rank 0's) stopped answering ({type(store_error).__name__})")
        return self.line(f"a collective failed ({reason})")

    def _silent_ranks(self) -> list[int]:
        """The other ranks whose heartbeat does not move over a few beats and that did not finish."""
        others = [rank for rank in range(self.env.world_size) if rank != self.env.rank]
        before = {rank: self._store.add(f"beat/{rank}", 0) for rank in others}
        time.sleep(2.5 * HEARTBEAT_S)
        return [rank for rank in others if self._store.add(f"beat/{rank}", 0) == before[rank]
                and not self._store.check([f"done/{rank}"])]

    def _elsewhere(self) -> str:
        """The ranks that were not where this one waited, and where they were."""
        places = [self._store.get(f"doing/{rank}").decode() if self._store.check([f"doing/{rank}"]) else "start-up"
                  for rank in range(self.env.world_size)]
        away = [f"rank {rank} (node {self.hosts[rank]}) was at {doing}" for rank, doing in enumerate(places)
                if rank != self.env.rank and doing != self.doing]
        return f"; {', '.join(away[:8])}" if away else ""
