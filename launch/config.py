"""Config section of the launcher: where the processes run, how many, and what the scheduler is told.

`ember launch` flags (--scheduler, --nodes, --procs-per-node, --max-restarts, --rdzv-endpoint,
--k8s-api) override these fields.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ember.config import Section


def check_endpoint(value: str | None) -> str | None:
    """`HOST:PORT` with a port in 1..65535 (None: the launcher picks one)."""
    if value is None:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not HOST:PORT (a port is needed, e.g. 10.0.0.1:29400)")
    return value


class SlurmConfig(Section):
    """What the sbatch script asks SLURM for."""

    partition: str | None = Field(None, description="SLURM partition (default: the cluster's default partition)")
    account: str | None = Field(None, description="SLURM account to charge")
    time_limit: str = Field("24:00:00", description="wall-clock limit of one allocation (sbatch --time); a requeued job gets a new one")
    gpus_per_node: int = Field(0, ge=0, description="GPUs per node (sbatch --gpus-per-node; 0: CPU job)")
    cpus_per_task: int | None = Field(None, gt=0, description="CPUs per node for its torchrun and workers (default: the node's share SLURM gives)")
    signal_before_s: int = Field(120, gt=0, description="seconds before the time limit at which the workers get SIGUSR1 (checkpoint, requeue)")
    requeue: bool = Field(True, description="requeue the job after the pre-timeout signal or a preemption (it resumes from its checkpoint)")
    rdzv_port: int = Field(29400, gt=0, lt=65536, description="rendezvous port on the allocation's first host")
    env: dict[str, str] = Field(default_factory=dict, description="environment variables exported in the job")
    sbatch_args: list[str] = Field(default_factory=list, description="extra sbatch options, one per #SBATCH line (e.g. --qos=high)")


class K8sConfig(Section):
    """What the Kubernetes manifest (Kubeflow PyTorchJob or TrainJob) asks for."""

    api: Literal["pytorchjob", "trainjob"] = Field(
        "pytorchjob", description="pytorchjob: Kubeflow training operator v1 (kubeflow.org/v1); trainjob: Kubeflow Trainer v2")
    name: str | None = Field(None, description="job name (default: the run directory's name, as a DNS label)")
    namespace: str = Field("default", description="Kubernetes namespace")
    image: str = Field("ember:latest", description="container image with ember installed")
    cpu: str = Field("2", description="CPU request and limit per node (pod)")
    memory: str = Field("16Gi", description="memory request and limit per node (pod)")
    gpus_per_node: int = Field(0, ge=0, description="nvidia.com/gpu per node (pod)")
    runs_claim: str = Field("ember-runs", description="PersistentVolumeClaim mounted at the run directory's parent (checkpoints, logs)")
    data_claim: str = Field("ember-data", description="PersistentVolumeClaim mounted at the datasets' parent directory")
    runtime: str = Field("torch-distributed", description="TrainJob: the ClusterTrainingRuntime to run on")
    env: dict[str, str] = Field(default_factory=dict, description="environment variables of the training container")


class LaunchConfig(Section):
    """Process layout and scheduler for `ember launch`."""

    scheduler: Literal["local", "torchrun", "slurm", "k8s"] = Field(
        "local", description="local: torchrun here; torchrun: print the per-node command; slurm: sbatch; k8s: a Kubeflow manifest")
    nodes: int = Field(1, gt=0, description="number of nodes")
    procs_per_node: int = Field(1, gt=0, description="worker processes per node (one per GPU on GPU nodes)")
    max_restarts: int = Field(0, ge=0, description="times torchrun restarts the workers after a failure (they resume from the newest checkpoint)")
    rdzv_endpoint: str | None = Field(None, description="HOST:PORT of the c10d rendezvous (default: a free port here; slurm: the first host)")
    run_id: str | None = Field(None, description="rendezvous id shared by all nodes (default: the run directory's name)")
    shutdown_timeout_s: int = Field(60, gt=0, description="seconds workers get to write their checkpoint after a stop signal before torchrun kills them")
    slurm: SlurmConfig = Field(default_factory=SlurmConfig, description="sbatch settings (scheduler slurm)")
    k8s: K8sConfig = Field(default_factory=K8sConfig, description="Kubernetes settings (scheduler k8s)")

    @field_validator("rdzv_endpoint")
    @classmethod
    def _endpoint_has_port(cls, value: str | None) -> str | None:
        return check_endpoint(value)
