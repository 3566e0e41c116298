"""Environment discovery: each launcher's variables, as that launcher sets them, to rank / world / master."""

import pytest

from dapt.base import DaptError
from dapt.pretrain.env import DistributedEnv, discover, first_host

TORCHRUN = {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "node01", "MASTER_PORT": "29400",
            "LOCAL_WORLD_SIZE": "8", "GROUP_RANK": "0"}
# What srun gives task 3 of `srun --nodes 2 --ntasks-per-node 2` in job 4242 (as seen on a real Slurm).
SLURM_STEP = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
              "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_NODELIST": "gpu[07-08]",
              "SLURM_NODEID": "1"}
OPENMPI = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
           "MASTER_ADDR": "10.0.0.1"}

CASES = {
    "by hand": ({}, DistributedEnv(0, 1, 0, "127.0.0.1", 29500, "single process")),
    "torchrun": (TORCHRUN, DistributedEnv(5, 16, 1, "node01", 29400, "torchrun")),
    "deepspeed launcher": ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                            "MASTER_PORT": "29500", "CROSS_RANK": "0"},
                           DistributedEnv(1, 2, 1, "127.0.0.1", 29500, "torchrun")),
    "srun one task per GPU": (SLURM_STEP, DistributedEnv(3, 4, 1, "gpu07", 29500 + 4242, "Slurm")),
    "srun, MASTER_PORT given": (SLURM_STEP | {"MASTER_PORT": "12345"}, DistributedEnv(3, 4, 1, "gpu07", 12345, "Slurm")),
    # `dapt launch slurm`: torchrun inside a one-task-per-node srun step; SLURM_PROCID counts nodes there.
    "torchrun under srun": (SLURM_STEP | TORCHRUN, DistributedEnv(5, 16, 1, "node01", 29400, "torchrun")),
    # The batch shell has SLURM_PROCID and SLURM_NTASKS but is no task of a step.
    "sbatch shell, no srun": ({k: v for k, v in SLURM_STEP.items() if k != "SLURM_STEP_ID"} | {"SLURM_PROCID": "0"},
                              DistributedEnv(0, 1, 0, "127.0.0.1", 29500, "single process")),
    "mpirun -x MASTER_ADDR": (OPENMPI, DistributedEnv(2, 4, 0, "10.0.0.1", 29500, "OpenMPI")),
    "mpirun one process": ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1"},
                           DistributedEnv(0, 1, 0, "127.0.0.1", 29500, "OpenMPI")),
}


@pytest.mark.parametrize("name", CASES)
def test_discovery(name):
    environ, expected = CASES[name]
    assert discover(environ) == expected


@pytest.mark.parametrize("nodelist, first", [
    ("vm", "vm"),
    ("node[01-03,07]", "node01"),
    ("node[07,01-03]", "node07"),
    ("gpu-a100-[009-012],cpu1", "gpu-a100-009"),
    ("rack[2-3]-n[08-09]", "rack2-n08"),
    ("a1,b[1-2]", "a1"),
    ("host.example.org", "host.example.org"),
])
def test_first_host_of_a_compressed_nodelist(nodelist, first):
    assert first_host(nodelist) == first


@pytest.mark.parametrize("environ, message", [
    ({k: v for k, v in OPENMPI.items() if k != "MASTER_ADDR"}, "OpenMPI started 4 processes but MASTER_ADDR is not set"),
    (TORCHRUN | {"RANK": "16"}, "RANK=16 is outside 0..15"),
    (SLURM_STEP | {"SLURM_JOB_NODELIST": "gpu[07-08", "SLURM_STEP_NODELIST": ""}, "is not a Slurm node list"),
])
def test_inconsistent_variables_are_refused(environ, message):
    with pytest.raises(DaptError, match=message):
        discover(environ)
