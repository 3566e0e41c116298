"""Config section `launch:`: how `dapt run` and `dapt launch` start training processes."""

from __future__ import annotations

from pydantic import Field

from launch.base import StrictModel


class LaunchConfig(StrictModel):
    nproc_per_node: int | None = Field(default=None, gt=0)
    """Training processes on this machine; default: one per GPU, or 2 on a CPU-only machine."""
