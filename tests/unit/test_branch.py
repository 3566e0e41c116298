"""Which checkpoints a run can branch from (`train.branch_from`), and which settings a branch may change."""

import json

import pytest
import yaml

from dapt.base import DaptError
from dapt.pretrain.checkpoint import META
from dapt.pretrain.checkpointer import branch_meta
from dapt.pretrain.config import TrainConfig
from dapt.pretrain.resume_settings import check_resume_settings

STABLE = {"name": "stable", "corpora": [{"name": "filings", "group": "financial", "paths": ["f.txt"]},
                                         {"name": "web", "group": "public", "paths": ["w.txt"]}],
          "tokenizer": {"path": "tok"}, "model": {"path": "base"},
          "mix": {"group_weights": {"financial": 0.5, "public": 0.5}},
          "train": {"steps": 100, "global_batch_size": 8, "micro_batch_size": 2, "lr": 1e-3, "schedule": "wsd",
                    "decay_steps": 20}}


def branch_of(**changes) -> dict:
    branch = json.loads(json.dumps(STABLE)) | {"name": "decay-a"}
    for section, values in changes.items():
        branch[section] = branch.get(section, {}) | values
    return branch


def test_a_branch_takes_its_own_schedule_and_decay_mix_but_not_another_data_order():
    branch = branch_of(train={"steps": 110, "decay_steps": 40, "decay_shape": "cosine", "branch_from": "ckpt"},
                       mix={"decay": {"weights": {"filings": 1.0}}})
    taken = check_resume_settings(yaml.safe_dump(STABLE), yaml.safe_dump(branch), "ckpt", [], branch=True)
    assert "train.steps: 100 → 110" in taken and any(line.startswith("mix.decay") for line in taken)
    with pytest.raises(DaptError, match="mix.decay: unset → .* the resumed run would not continue"):
        check_resume_settings(yaml.safe_dump(STABLE), yaml.safe_dump(branch), "ckpt", [])  # not in a resume
    moved = branch_of(mix={"group_weights": {"financial": 0.7, "public": 0.3}})
    with pytest.raises(DaptError, match=r"mix.group_weights.financial: 0.5 → 0.7; .* since checkpoint ckpt: the "
                                        "branch would not continue the same data order"):
        check_resume_settings(yaml.safe_dump(STABLE), yaml.safe_dump(moved), "ckpt", [], branch=True)
    other_model = branch_of(model={"path": "another"})
    with pytest.raises(DaptError, match="resumes only into the model it was saved from"):
        check_resume_settings(yaml.safe_dump(STABLE), yaml.safe_dump(other_model), "ckpt", [], branch=True)


def test_a_branch_starts_from_a_checkpoint_before_its_decay(tmp_path):
    train = TrainConfig(**STABLE["train"] | {"steps": 110, "decay_steps": 40})  # the decay starts after step 70
    with pytest.raises(DaptError, match=rf"train.branch_from: {tmp_path} is not a checkpoint dapt wrote \(no {META}"):
        branch_meta(tmp_path, train)
    for step, message in ((110, "nothing is left to train; raise train.steps"),
                          (71, r"after this run's decay starts \(after step 70\); branch from a checkpoint of the constant")):
        (tmp_path / META).write_text(json.dumps({"step": step, "world_size": 2, "experiment_yaml": ""}))
        with pytest.raises(DaptError, match=message):
            branch_meta(tmp_path, train)
    (tmp_path / META).write_text(json.dumps({"step": 70, "world_size": 2, "experiment_yaml": ""}))
    assert branch_meta(tmp_path, train)["step"] == 70
