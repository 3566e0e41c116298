"""`dapt launch local` and `dapt launch deepspeed`: the commands they build, hostfile errors,
and a real 2-process run through the `deepspeed` launcher on this machine.
(`dapt launch slurm` is in unit/test_slurm.py and e2e/test_slurm.py.)"""

import pytest
import torch

from dapt.base import DaptError
from dapt.launch.deepspeed_launcher import deepspeed_command, read_hostfile
from dapt.experiment import load_experiment
from dapt.launch.local import default_nproc, torchrun_command
from tests.conftest import write_experiment


def test_local_defaults_to_one_process_per_gpu_or_two(tmp_path):
    expected = torch.cuda.device_count() or 2
    assert default_nproc(load_experiment(write_experiment(tmp_path, {"launch": {}}))[0]) == expected
    assert default_nproc(load_experiment(write_experiment(tmp_path, {"launch": {"nproc_per_node": 3}}))[0]) == 3


def test_local_forwards_sigusr1_and_no_resume(tmp_path):
    command = torchrun_command(tmp_path / "e.yaml", 2, resume=False)
    assert "--standalone" in command and "--nproc-per-node=2" in command
    assert "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in command
    assert command[-4:] == ["dapt", "train", str(tmp_path / "e.yaml"), "--no-resume"]


def test_one_local_host_needs_no_ssh(tmp_path):
    command = deepspeed_command(tmp_path / "e.yaml", tmp_path / "hosts", {"localhost": 2})
    assert command[1:3] == ["-m", "deepspeed.launcher.runner"]
    assert "--no_ssh_check" in command and "--master_addr=localhost" in command
    assert command[command.index("--module"):] == ["--module", "--no_local_rank", "dapt", "train", str(tmp_path / "e.yaml")]


def test_many_hosts_over_openmpi_get_the_master_exported(tmp_path):
    command = deepspeed_command(tmp_path / "e.yaml", tmp_path / "hosts", {"worker-0": 8, "worker-1": 8},
                                launcher="openmpi", resume=False)
    assert "--no_ssh_check" not in command, "pdsh and mpirun reach remote hosts over ssh"
    assert "--master_addr=worker-0" in command and "--launcher=openmpi" in command
    assert "--launcher_args=-x MASTER_ADDR=worker-0 -x MASTER_PORT=29500" in command
    assert command[-1] == "--no-resume"


@pytest.mark.parametrize("text, message", [
    ("worker-0 slots=8\nworker-1 8\n", "Hostfile contains a bad entry: worker-1 8"),
    ("worker-0 slots=8\nworker-0 slots=4\n", "multiple entries for worker-0"),
    ("# nothing\n", "Hostfile is empty"),
])
def test_bad_hostfile_is_named(tmp_path, text, message):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(text)
    with pytest.raises(DaptError, match=f"hostfile {hostfile}: .*{message}.*each line is `<host> slots=<processes>`"):
        read_hostfile(hostfile)


def test_missing_hostfile(tmp_path):
    with pytest.raises(DaptError, match="hostfile .*/nope does not exist"):
        read_hostfile(tmp_path / "nope")
