"""Config section `launch:`: how `dapt run` and `dapt launch` start training processes."""

from __future__ import annotations

import re

from pydantic import Field, field_validator, model_validator

from dapt.base import StrictModel

# Slurm's time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
_SLURM_TIME = re.compile(r"^(?:(\d+)-(\d+)(?::(\d+)(?::(\d+))?)?|(\d+)(?::(\d+)(?::(\d+))?)?)$")


def slurm_time_seconds(value: str) -> int:
    """Seconds in a Slurm time limit string, for checks before anything is submitted."""
    match = _SLURM_TIME.match(value)
    if match is None:
        raise ValueError(f"{value!r} is not a Slurm time (minutes, H:MM:SS or D-HH:MM:SS, e.g. \"48:00:00\")")
    days, day_hours, day_minutes, day_seconds, *clock = match.groups()
    if days is not None:
        return ((int(days) * 24 + int(day_hours)) * 60 + int(day_minutes or 0)) * 60 + int(day_seconds or 0)
    parts = [int(p) for p in clock if p is not None]
    if len(parts) == 3:
        return (parts[0] * 60 + parts[1]) * 60 + parts[2]
    return parts[0] * 60 + (parts[1] if len(parts) == 2 else 0)  # Slurm reads M and M:S


class SlurmConfig(StrictModel):
    """`launch.slurm`: the defaults of `dapt launch slurm` (its flags override them)."""

    partition: str | None = None
    """Slurm partition (default: the cluster's default partition)."""
    account: str | None = None
    """Account charged for the job (default: the user's default account)."""
    nodes: int = Field(default=1, gt=0)
    """Nodes of the job, one torchrun on each."""
    gpus_per_node: int = Field(default=0, ge=0)
    """GPUs per node, one training process each; 0 for CPU nodes (then `nproc_per_node`, or 2)."""
    cpus_per_task: int | None = Field(default=None, gt=0)
    """CPU cores for each node's torchrun and its training processes (data loading, tokenising)."""
    time: str | None = None
    """Time limit, e.g. "48:00:00" or "2-00:00:00"; training checkpoints before it and requeues."""
    signal_lead_seconds: int = Field(default=300, gt=0, le=65535)
    """How long before the time limit Slurm sends SIGUSR1: enough for one step and one checkpoint
    (Slurm may send it up to a minute earlier)."""
    job_name: str | None = None
    """Default: the experiment's name."""
    sbatch_options: list[str] = []
    """More `#SBATCH` options, one each, e.g. ["--qos=high", "--constraint=h100", "--exclusive"]."""

    @field_validator("partition", "account", "job_name", "time")
    @classmethod
    def _one_line(cls, value: str | None) -> str | None:
        # A line break would end the `#SBATCH` comment and start a shell command.
        if value is not None and (not value.strip() or any(c in value for c in "\n\r\0")):
            raise ValueError(f"must be a non-empty single line (got {value!r})")
        return value

    @field_validator("sbatch_options")
    @classmethod
    def _options(cls, values: list[str]) -> list[str]:
        for value in values:
            cls._one_line(value)
            if not value.startswith("-"):
                raise ValueError(f"{value!r} is not an sbatch option; write it as on the sbatch command line, e.g. --qos=high")
        return values

    @field_validator("time")
    @classmethod
    def _time(cls, value: str | None) -> str | None:
        if value is not None:
            slurm_time_seconds(value)
        return value

    @model_validator(mode="after")
    def _lead_within_limit(self) -> SlurmConfig:
        if self.time is not None and self.signal_lead_seconds >= slurm_time_seconds(self.time):
            raise ValueError(f"signal_lead_seconds ({self.signal_lead_seconds}) must be shorter than the time limit "
                             f"({self.time}), or training is told to stop before it starts")
        return self


class LaunchConfig(StrictModel):
    nproc_per_node: int | None = Field(default=None, gt=0)
    """Training processes on this machine; default: one per GPU, or 2 on a CPU-only machine."""
    slurm: SlurmConfig = SlurmConfig()
    """Defaults of `dapt launch slurm` (its flags override them)."""
