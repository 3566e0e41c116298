"""The GPU path, for the first machine that has one: bf16 over NCCL with DeepSpeed's fused Adam, the
chunked loss against whole logits, a save and a resume, and an export that loads. Skipped, saying
so, where there is no CUDA GPU; on CPU the same machinery is tested in fp32 over gloo."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

from dapt.experiment import load_experiment
from dapt.launch.local import torchrun_command
from tests.helpers import experiment_file, losses

pytestmark = pytest.mark.gpu

STEPS = 6


def gpu_run(folder, built_experiment, chunk: int):
    """A tiny model trained in bf16 under ZeRO-2 on every GPU (up to 2), checkpointing at step 3."""
    folder.mkdir()
    path = experiment_file(folder, built_experiment, steps=STEPS)
    config = yaml.safe_load(path.read_text())
    config["deepspeed"] = {"zero_optimization": {"stage": 2}}
    config["train"].update(precision="bf16", lr=1e-2, checkpoint_every=3, loss_chunk_tokens=chunk)
    path.write_text(yaml.safe_dump(config))
    return path


def train_on_gpus(path) -> subprocess.CompletedProcess:
    result = subprocess.run(torchrun_command(path, min(2, torch.cuda.device_count())), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def test_bf16_over_nccl_trains_resumes_and_exports(tmp_path, built_experiment):
    curves = {}
    for chunk in (16, 0):
        path = gpu_run(tmp_path / f"chunk{chunk}", built_experiment, chunk)
        train_on_gpus(path)
        curves[chunk] = losses(path.parent)
    assert curves[16][STEPS] < curves[16][1], curves[16]
    # bf16 rounds the two ways differently: the same first step to bf16's precision, and curves that
    # stay together after updates computed from slightly different gradients.
    assert curves[16][1] == pytest.approx(curves[0][1], rel=1e-2)
    assert curves[16] == pytest.approx(curves[0], rel=5e-2)

    # Resume from step 3's checkpoint, as after a crash there: the same steps 4-6.
    path = tmp_path / "chunk16" / "experiment.yaml"
    experiment, _ = load_experiment(path)
    (experiment.checkpoints_dir / "latest").write_text("step00000003")
    subprocess.run(["rm", "-r", str(experiment.checkpoints_dir / f"step{STEPS:08d}"), str(experiment.results_file)],
                   check=True)
    train_on_gpus(path)
    resumed = losses(path.parent)
    for step in range(4, STEPS + 1):  # CUDA's atomic adds (the embedding's backward) are not bitwise repeatable
        assert resumed[step] == pytest.approx(curves[16][step], rel=1e-2), step

    out = tmp_path / "export"
    exported = subprocess.run([sys.executable, "-m", "dapt", "export", str(experiment.checkpoints_dir), str(out)],
                              capture_output=True, text=True, timeout=600)
    assert exported.returncode == 0, exported.stderr[-3000:]
    from dapt.pretrain.evaluate import evaluate_model_dir

    results = json.loads(experiment.results_file.read_text())
    for name, bpb in evaluate_model_dir(experiment, out).items():
        assert bpb == pytest.approx(results["corpora"][name]["bpb_after"], rel=2e-2), name
