"""Config section of the launcher: how many processes on how many nodes, and where."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ember.config import Section


class LaunchConfig(Section):
    """Process layout for `ember launch`."""

    launcher: Literal["local", "torchrun", "slurm", "k8s"] = Field("local", description="how processes are started")
    nnodes: int = Field(1, gt=0, description="number of nodes")
    nproc_per_node: int = Field(1, gt=0, description="processes (GPUs) per node")
