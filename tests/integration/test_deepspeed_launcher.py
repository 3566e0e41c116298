"""A real 2-process run through the `deepspeed` launcher on this machine (the commands it builds and
its hostfile errors are in unit/test_launchers.py)."""

import json


from dapt.launch.cli import main
from tests.helpers import experiment_file, losses


def test_two_ranks_train_under_the_deepspeed_launcher(tmp_path, built_experiment):
    path = experiment_file(tmp_path, built_experiment, steps=2)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    assert main(["launch", "deepspeed", str(path), "--hostfile", str(hostfile)]) == 0
    assert sorted(losses(tmp_path)) == [1, 2]
    checkpoint = tmp_path / "checkpoints" / "step00000002"
    assert json.loads((checkpoint / "dapt-checkpoint.json").read_text())["world_size"] == 2
