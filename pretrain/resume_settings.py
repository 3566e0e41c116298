"""A resume under changed settings: every difference from the checkpoint's experiment, by field.

A checkpoint carries the experiment file it was trained from. Before a resume builds
anything, the two are compared field by field:

- the model and tokenizer (`model.*`, `tokenizer.*`) cannot change: the weights belong
  to one model;
- the data order (`corpora`, `mix.*`, `seed`, `heldout.*`, `stores`, the batch sizes)
  cannot change either: the run would not continue the same sequence of samples;
- the optimizer and its schedule (`train.lr`, `train.steps`, …, a native `deepspeed:`
  config) change only when named in `--allow-changed`, as Megatron's
  `--override-opt_param-scheduler`: the schedule would jump silently otherwise;
- anything else (evaluation, logging, checkpoint frequency, W&B) is listed and taken.
"""

from __future__ import annotations

import os

import yaml

from dapt.base import DaptError

ALLOW_CHANGED = "DAPT_ALLOW_CHANGED"  # the --allow-changed fields, for the ranks a launcher starts
FIXED_MODEL = ("model", "tokenizer")
FIXED_DATA = ("corpora", "mix", "seed", "heldout", "stores", "train.global_batch_size", "train.micro_batch_size",
              "train.batch_warmup")
OPTIMIZER = ("train.lr", "train.steps", "train.warmup_steps", "train.warmup_start_lr", "train.schedule",
             "train.min_lr_ratio", "train.decay_steps", "train.decay_shape", "train.weight_decay", "train.betas",
             "train.grad_clip", "train.precision", "deepspeed")


def differences(before: object, after: object, path: str = "") -> list[tuple[str, object, object]]:
    """(field path, value before, value after) wherever two parsed experiments differ."""
    if isinstance(before, dict) and isinstance(after, dict):
        keys = sorted(before.keys() | after.keys(), key=str)
        return [change for key in keys
                for change in differences(before.get(key), after.get(key), f"{path}.{key}" if path else str(key))]
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        return [change for index, (old, new) in enumerate(zip(before, after))
                for change in differences(old, new, f"{path}.{index}")]
    return [] if before == after else [(path, before, after)]


def _settings(text: str) -> dict:
    """The experiment's fields with their defaults filled in, so that a default written out is no change;
    as written, if this version of dapt no longer reads the file."""
    from pydantic import ValidationError

    from dapt.experiment import Experiment

    data = yaml.safe_load(text) or {}
    try:
        return Experiment.model_validate(data).model_dump(mode="json")
    except ValidationError:
        return data


def _under(path: str, prefixes: tuple[str, ...]) -> bool:
    return any(path == prefix or path.startswith(prefix + ".") for prefix in prefixes)


def _show(value: object) -> str:
    text = "unset" if value is None else repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def allowed_changes() -> list[str]:
    """The fields `--allow-changed` named, here or in the launcher that started this process."""
    return [name for name in os.environ.get(ALLOW_CHANGED, "").split(",") if name]


# A branch (another run's checkpoint, `train.branch_from`) continues the data order only as far as it
# was read: later stages and the decay's mix are its own, which the loader checks against the
# samples already drawn; and its schedule is its own, so optimizer settings change without asking.
BRANCH_DATA = ("mix.stages", "mix.decay")


def check_resume_settings(saved_yaml: str, current_yaml: str, checkpoint: str, allowed: list[str],
                          branch: bool = False) -> list[str]:
    """The changed fields that are taken (as lines to print); a change that is refused raises, naming them all."""
    found = differences(_settings(saved_yaml), _settings(current_yaml))
    found = [change for change in found if change[0] != "name"]  # the experiment's name is only a label
    lines = [f"{path}: {_show(old)} → {_show(new)}" for path, old, new in found]

    def refused(prefixes) -> list[str]:
        return [line for line, (path, _, _) in zip(lines, found) if _under(path, prefixes)]

    if model := refused(FIXED_MODEL):
        raise DaptError(f"{'; '.join(model)} since checkpoint {checkpoint}: a checkpoint resumes only into the model "
                        f"it was saved from; restore the field, or start afresh (--no-resume, or another workdir)")
    if data := [line for line in refused(FIXED_DATA) if not (branch and line.startswith(BRANCH_DATA))]:
        run = "the branch" if branch else "the resumed run"
        raise DaptError(f"{'; '.join(data)} since checkpoint {checkpoint}: {run} would not continue the "
                        f"same data order; restore the field, or train in another workdir")
    allowed = [*allowed, *OPTIMIZER] if branch else allowed
    blocked = [line for line, (path, _, _) in zip(lines, found)
               if _under(path, OPTIMIZER) and not _under(path, tuple(allowed))]
    if blocked:
        names = " ".join(path for path, _, _ in found if _under(path, OPTIMIZER) and not _under(path, tuple(allowed)))
        raise DaptError(f"{'; '.join(blocked)} since checkpoint {checkpoint}: the optimizer or its schedule would "
                        f"change mid-run; to resume with the new values say so with `--allow-changed {names}`, "
                        f"or restore them")
    return lines
