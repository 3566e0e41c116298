"""Resume and stop-by-signal with a real 2-process DeepSpeed run (ZeRO-2, gloo, fp32)."""

import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from dapt.experiment import load_experiment
from dapt.launch.local import torchrun_command
from dapt.pretrain.lr_schedule import lr_at
from tests.helpers import experiment_file, losses, train, train_together


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, built_experiment) -> dict:
    """6 steps at ZeRO 2 and at ZeRO 0, checkpointing every 3, trained together on one pair of ranks.
    The ZeRO-2 run is warmup-stable-decay: the peak rate for 3 steps, then 3 steps of decay on a mix
    of their own (mostly financial), so that its resumes cross both switches."""
    root, paths = tmp_path_factory.mktemp("uninterrupted"), {}
    for stage in (2, 0):
        (root / f"zero{stage}").mkdir()
        paths[stage] = experiment_file(root / f"zero{stage}", built_experiment, steps=6, wandb="offline")
        config = yaml.safe_load(paths[stage].read_text())
        config["deepspeed"] = {"zero_optimization": {"stage": stage}}
        if stage == 2:
            config["train"] |= {"schedule": "wsd", "decay_steps": 3, "decay_shape": "linear", "min_lr_ratio": 0.0}
            config["mix"]["decay"] = {"group_weights": {"financial": 0.9, "public": 0.1}}
        paths[stage].write_text(yaml.safe_dump(config))
    train_together(list(paths.values()))
    return paths


def rewound_to_step_3(uninterrupted: dict, stage: int, folder):
    """A copy in `folder` of the uninterrupted run at ZeRO `stage`, with what came after step 3's
    checkpoint undone, as a crash there would have."""
    shutil.copytree(uninterrupted[stage].parent, folder, dirs_exist_ok=True)
    path = folder / "experiment.yaml"
    config = yaml.safe_load(path.read_text())
    config["workdir"] = str(folder)
    path.write_text(yaml.safe_dump(config))
    uninterrupted_losses = losses(folder)
    uninterrupted_lrs = losses(folder, "train/lr")
    assert uninterrupted_lrs[1] == 1e-3, "without warmup the first step trains at the peak rate"
    first = json.loads((folder / "results.json").read_text())
    experiment, _ = load_experiment(path)
    (experiment.checkpoints_dir / "latest").write_text("step00000003")
    subprocess.run(["rm", "-r", str(experiment.checkpoints_dir / "step00000006"), str(folder / "results.json")],
                   check=True)
    return path, experiment, uninterrupted_losses, uninterrupted_lrs, first


def test_resume_continues_bitwise_like_the_uninterrupted_run(tmp_path, uninterrupted):
    uninterrupted_runs = uninterrupted
    path, experiment, uninterrupted, lrs, first = rewound_to_step_3(uninterrupted_runs, 2, tmp_path)
    resumed_run = train(path)
    assert "resuming from" in resumed_run.stdout and "at step 3" in resumed_run.stdout
    resumed = losses(tmp_path)
    assert [resumed[s] for s in (4, 5, 6)] == [uninterrupted[s] for s in (4, 5, 6)], "bitwise equal losses"
    assert losses(tmp_path, "train/lr") == lrs, "the schedule goes on where it stopped"
    assert lrs == {step: lr_at(experiment.train, step - 1) for step in range(1, 7)}, "the formula at every step"
    assert [lrs[step] for step in (3, 4, 5, 6)] == [1e-3, 1e-3, pytest.approx(1e-3 * 2 / 3), pytest.approx(1e-3 / 3)]
    groups = {corpus.name: corpus.group for corpus in experiment.corpora}
    cosine_run = json.loads((uninterrupted_runs[0].parent / "results.json").read_text())

    def financial_tokens(results: dict) -> int:
        return sum(row["tokens_seen"] for name, row in results["corpora"].items() if groups[name] == "financial")
    assert financial_tokens(first) > financial_tokens(cosine_run), "the decay's steps drew on its own mix"
    second = json.loads((tmp_path / "results.json").read_text())
    assert second["wandb_run_id"] == first["wandb_run_id"]
    assert {n: r["tokens_seen"] for n, r in second["corpora"].items()} == {n: r["tokens_seen"] for n, r in first["corpora"].items()}
    assert second["corpora"]["news"]["bpb_after"] == first["corpora"]["news"]["bpb_after"]


def test_a_decay_branched_from_the_constant_phase_trains_on_its_own_mix_without_retraining_it(tmp_path, uninterrupted):
    """A second decay of the warmup-stable-decay run, as a run of its own: from its step-3 checkpoint
    (the last of the constant phase), 4 steps of cosine decay on a mostly public mix. It trains steps
    4 to 7 only, each at its own schedule's rate, in its own W&B run, and leaves the stable run as it was."""
    stable_dir = uninterrupted[2].parent
    stable_checkpoints = sorted(path.name for path in (stable_dir / "checkpoints").iterdir())
    config = yaml.safe_load(uninterrupted[2].read_text())
    config["workdir"] = str(tmp_path)
    config["train"] |= {"steps": 7, "decay_steps": 4, "decay_shape": "cosine",
                        "branch_from": str(stable_dir / "checkpoints" / "step00000003")}
    config["mix"]["decay"] = {"group_weights": {"financial": 0.1, "public": 0.9}}
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    branched = train(path)
    assert f"branching from {stable_dir / 'checkpoints' / 'step00000003'} at step 3" in branched.stdout
    assert "changed: mix.decay.group_weights.financial: 0.9 → 0.1" in branched.stdout
    experiment, _ = load_experiment(path)
    rates = losses(tmp_path, "train/lr")
    assert sorted(rates) == [4, 5, 6, 7], "the constant phase is not trained again"
    assert rates == {step: lr_at(experiment.train, step - 1) for step in range(4, 8)}
    assert rates[4] == 1e-3 and rates[5] == pytest.approx(1e-3 * (1 + math.cos(math.pi / 4)) / 2)
    stable, branch = (json.loads((folder / "results.json").read_text()) for folder in (stable_dir, tmp_path))
    assert branch["wandb_run_id"] != stable["wandb_run_id"]
    public = [corpus.name for corpus in experiment.corpora if corpus.group == "public"]
    assert sum(branch["corpora"][n]["tokens_seen"] for n in public) > sum(stable["corpora"][n]["tokens_seen"] for n in public)
    assert sorted(path.name for path in (stable_dir / "checkpoints").iterdir()) == stable_checkpoints


def test_sigusr1_checkpoints_and_the_rerun_finishes(tmp_path, built_experiment):
    path = experiment_file(tmp_path, built_experiment, steps=60, wandb="offline")
    process = subprocess.Popen(torchrun_command(path, 2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and '"step": 4,' in metrics.read_text()):
        time.sleep(0.2)
    process.send_signal(signal.SIGUSR1)
    output, _ = process.communicate(timeout=120)
    assert "stopped by a signal after step" in output, output[-3000:]
    stopped_at = max(losses(tmp_path))
    experiment, _ = load_experiment(path)
    assert (experiment.checkpoints_dir / "latest").read_text() == f"step{stopped_at:08d}"
    assert 4 <= stopped_at < 60
    rerun = train(path)
    assert f"at step {stopped_at}" in rerun.stdout
    assert sorted(losses(tmp_path)) == list(range(1, 61))


@pytest.mark.parametrize("stage", [2, 0])
def test_resume_at_another_world_size_keeps_the_data_order(tmp_path, uninterrupted, stage):
    path, experiment, uninterrupted, lrs, first = rewound_to_step_3(uninterrupted, stage, tmp_path)
    result = subprocess.run(torchrun_command(path, 1), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "written by 2 processes, now 1" in result.stdout
    assert losses(tmp_path, "train/lr") == lrs, "the schedule goes on where it stopped"
    resumed = losses(tmp_path)
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-4), step
    second = json.loads((tmp_path / "results.json").read_text())
    assert {n: r["tokens_seen"] for n, r in second["corpora"].items()} == {n: r["tokens_seen"] for n, r in first["corpora"].items()}
    assert not list(experiment.checkpoints_dir.glob("universal-*")), "the converted copy is removed once loaded"


# --- a job across two nodes, as the Slurm script starts it on each ---------------------------

def node_agents(path, nodes: list[str], tmp_path) -> list[subprocess.Popen]:
    """The per-node command of the sbatch script `dapt launch slurm` writes, run for each node of a
    `len(nodes)`-node job on this host (its `srun` runs the command on one node here), each node's
    processes in a session of their own so that the test can take a node away whole."""
    import socket

    from dapt.launch.slurm import render_script

    experiment, _ = load_experiment(path)
    script = render_script(experiment, path, experiment.launch.slurm)
    start = script.index("\nsrun --ntasks")
    command = script[start:script.index(" &\n", start)]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    prelude = (f"srun() {{ while [[ $1 == --* ]]; do shift; done; \"$@\"; }}\n"  # one node's task, run here
               f"python={shlex.quote(sys.executable)} logs={shlex.quote(str(tmp_path / 'logs'))} "
               f"config={shlex.quote(str(path))} head_node=127.0.0.1 rdzv_port={port}\n")
    agents = []
    for node in nodes:
        env = {**os.environ, "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": str(len(nodes)), "SLURMD_NODENAME": node}
        log = open(tmp_path / f"{node}.out", "w")
        agents.append(subprocess.Popen(["bash", "-c", prelude + command], env=env, stdout=log, stderr=subprocess.STDOUT,
                                       text=True, start_new_session=True))
        if len(agents) == 1:  # the first node serves the rendezvous, as the head node of a Slurm job does
            wait_for_port(port)
    return agents


def wait_for_port(port: int, timeout: float = 120) -> None:
    import socket

    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing serves the rendezvous at 127.0.0.1:{port} after {timeout} s")


def one_process_per_node(path) -> None:
    config = yaml.safe_load(path.read_text())
    config["launch"] = {"nproc_per_node": 1}
    path.write_text(yaml.safe_dump(config))


def untrained_copy(uninterrupted: dict, folder):
    """The uninterrupted ZeRO-2 run's experiment in `folder`, nothing trained yet; and its losses."""
    path, _, uninterrupted_losses, _, _ = rewound_to_step_3(uninterrupted, 2, folder)
    for trained in ("checkpoints", "wandb", "metrics.jsonl"):
        subprocess.run(["rm", "-r", str(folder / trained)], check=True)
    return path, uninterrupted_losses


def test_two_nodes_train_as_one_node_with_two_processes(tmp_path, uninterrupted):
    """Two torchrun agents (`--nnodes 2`, c10d rendezvous), one process each, train to the losses of
    one agent with two processes; W&B logs from global rank 0 alone; each node keeps its ranks' logs."""
    path, uninterrupted_losses = untrained_copy(uninterrupted, tmp_path)
    one_process_per_node(path)
    agents = node_agents(path, ["node-a", "node-b"], tmp_path)
    assert [agent.wait(timeout=600) for agent in agents] == [0, 0], (tmp_path / "node-a.out").read_text()[-3000:]
    two_nodes = losses(tmp_path)
    assert sorted(two_nodes) == list(range(1, 7))
    for step, loss in two_nodes.items():
        assert loss == pytest.approx(uninterrupted_losses[step], abs=1e-6), step
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1
    for node in ("node-a", "node-b"):
        assert list((tmp_path / "logs" / node).rglob("stdout.log")), node


STEPS_AFTER_A_LOSS = 20  # node b is lost after step 5: the rest is the resume's


def test_a_lost_node_ends_the_job_in_seconds_and_one_node_resumes_it(tmp_path, built_experiment):
    """Node b is taken away whole (kill -9 of every process on it) mid-run: rank 0 ends within a minute
    with one line naming the lost rank and the checkpoint to resume from, and the run resumes from it
    on one node (2 processes → 1)."""
    import psutil

    path = experiment_file(tmp_path, built_experiment, steps=STEPS_AFTER_A_LOSS, wandb="disabled")
    one_process_per_node(path)
    agents = node_agents(path, ["node-a", "node-b"], tmp_path)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and '"step": 5,' in metrics.read_text()):
        time.sleep(0.2)
    # The rendezvous gives rank 0 to either node: the other one is lost, not the one serving the job's store.
    rank_0 = next(node for node in (0, 1) if "== training run " in (tmp_path / f"node-{'ab'[node]}.out").read_text())
    survivor, lost = agents[rank_0], psutil.Process(agents[1 - rank_0].pid)
    for process in [lost, *lost.children(recursive=True)]:
        process.kill()
    lost_at = time.time()
    assert survivor.wait(timeout=120) != 0
    assert time.time() - lost_at < 60
    output = (tmp_path / f"node-{'ab'[rank_0]}.out").read_text()
    line = next(line for line in output.splitlines() if "dapt: error: rank 0" in line)  # torchrun prefixes its rank
    assert re.search(r", during (step \d+|the checkpoint save after step \d+): lost rank 1 on node node-[ab] ", line), line
    assert f"the last good checkpoint is {tmp_path / 'checkpoints'}/step000000" in line, line
    assert "Traceback" not in output.split("dapt: error: rank 0")[0][-2000:]
    resumed = subprocess.run(torchrun_command(path, 1), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "written by 2 processes, now 1" in resumed.stdout
    assert sorted(losses(tmp_path)) == list(range(1, STEPS_AFTER_A_LOSS + 1))


FAKE_PDSH = """import subprocess, sys
# pdsh runs the command on every host of -w over ssh, %n being the host's rank; here every host is this machine.
args = sys.argv[1:]
hosts = args[args.index("-w") + 1].split(",")
command = " ".join(args[args.index("-w") + 2:])
nodes = [subprocess.Popen(["bash", "-c", command.replace("%n", str(rank))]) for rank in range(len(hosts))]
sys.exit(max(node.wait() for node in nodes))
"""


def test_two_hosts_of_the_deepspeed_launcher_train_as_one_node_with_two_processes(tmp_path, uninterrupted, monkeypatch):
    """`dapt launch deepspeed` over a hostfile of two hosts with one slot each: the launcher's own per-node
    command (`deepspeed.launcher.launch --node_rank=%n`, what pdsh runs on each host over ssh) on this
    machine for both, training to the losses of one node with two processes. (dapt's side of the
    launcher is the same for one host; its commands and hostfile errors are in unit/test_launchers.py.)"""
    from dapt.launch.cli import main

    path, uninterrupted_losses = untrained_copy(uninterrupted, tmp_path / "run")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    pdsh = tmp_path / "bin" / "pdsh"
    pdsh.parent.mkdir()
    pdsh.write_text(f"#!{sys.executable}\n{FAKE_PDSH}")
    pdsh.chmod(0o755)
    monkeypatch.setenv("PATH", f"{pdsh.parent}:{os.environ['PATH']}")
    assert main(["launch", "deepspeed", str(path), "--hostfile", str(hostfile)]) == 0
    two_hosts = losses(tmp_path / "run")
    assert sorted(two_hosts) == list(range(1, 7))
    for step, loss in two_hosts.items():
        assert loss == pytest.approx(uninterrupted_losses[step], abs=1e-6), step
    checkpoint = tmp_path / "run" / "checkpoints" / "step00000006"
    assert json.loads((checkpoint / "dapt-checkpoint.json").read_text())["world_size"] == 2
