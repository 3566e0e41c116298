"""`dapt launch deepspeed`: the `deepspeed` launcher with a hostfile, one `dapt train` per slot.

In: the experiment file and an MPI-style hostfile (`worker-0 slots=8` per line). The
launcher reaches the hosts over ssh (pdsh, its default) or through `--launcher openmpi |
slurm | mvapich | ...`; each training process finds its rank in the variables the
launcher sets (see pretrain/env.py).
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from dapt.base import DaptError
from dapt.pretrain.env import DEFAULT_PORT
from dapt.launch.local import run_training_command

LOCAL_NAMES = {"localhost", "127.0.0.1", socket.gethostname(), socket.gethostname().split(".")[0]}


def read_hostfile(path: Path) -> dict[str, int]:
    """Hosts and their slots, read by DeepSpeed's own parser so that both agree on the file."""
    from deepspeed.launcher.runner import fetch_hostfile

    if not path.is_file():
        raise DaptError(f"hostfile {path} does not exist; write one line per host: `<host> slots=<processes>`")
    try:
        return dict(fetch_hostfile(str(path)))
    except ValueError as err:
        raise DaptError(f"hostfile {path}: {err}; each line is `<host> slots=<processes>`") from None


def deepspeed_command(config_path: Path, hostfile: Path, hosts: dict[str, int], launcher: str = "pdsh",
                      master_port: int = DEFAULT_PORT, resume: bool = True) -> list[str]:
    master = next(iter(hosts))
    command = [
        sys.executable, "-m", "deepspeed.launcher.runner", f"--hostfile={hostfile}", f"--launcher={launcher}",
        # Naming the master saves the launcher an ssh round trip to ask the first host for its address.
        f"--master_addr={master}", f"--master_port={master_port}",
    ]
    if set(hosts) <= LOCAL_NAMES:
        command.append("--no_ssh_check")  # only this machine: nothing is reached over ssh
    if launcher == "openmpi":
        # mpirun passes no master address to the processes; export the launcher's own.
        command.append(f"--launcher_args=-x MASTER_ADDR={master} -x MASTER_PORT={master_port}")
    # `--no_local_rank`: ranks come from the environment, `dapt train` takes no --local_rank.
    return command + ["--module", "--no_local_rank", "dapt", "train", str(config_path),
                      *([] if resume else ["--no-resume"])]


def run_deepspeed(config_path: Path, hostfile: Path, launcher: str = "pdsh", resume: bool = True) -> None:
    hosts = read_hostfile(hostfile)
    command = deepspeed_command(config_path, hostfile, hosts, launcher, resume=resume)
    processes = sum(hosts.values())
    # One OpenMP thread per rank unless set, as torchrun does: without it every rank starts a
    # thread per core, and on CPU the ranks fight over the cores (measured here: 2 ranks, 30x slower steps).
    run_training_command(command, f"{processes} training processes on {len(hosts)} host(s) with the deepspeed launcher",
                         "deepspeed", OMP_NUM_THREADS="1")
