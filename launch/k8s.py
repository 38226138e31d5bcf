"""Kubernetes manifests of a run: a Kubeflow PyTorchJob (training operator v1) or TrainJob (Trainer v2).

Every pod runs one node's torchrun (`launch/torchrun.py`), meeting at the master pod's c10d
rendezvous. The run directory and the datasets live on PersistentVolumeClaims mounted at the
same paths as in the config, so the saved config works unchanged inside the pods. Kubeflow's
`ExitCode` restart policy restarts a pod on exit codes 128-255 only: a preempted run
(`EXIT_PREEMPTED` = 143) is restarted, a user error (2) is not. Trainer v2.2 removed
ElasticPolicy; neither manifest uses it: elasticity here is torchrun's restarts.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import yaml

from ember.launch.torchrun import torchrun_command

CONTAINER = {"pytorchjob": "pytorch", "trainjob": "node"}  # the container names each operator expects


def dns_name(text: str) -> str:
    """A Kubernetes object name (DNS-1035 label) from a run name."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    if not name or not name[0].isalpha():
        name = "ember-" + name
    return name[:50].rstrip("-")


def _resources(k8s) -> dict:
    amounts = {"cpu": k8s.cpu, "memory": k8s.memory}
    if k8s.gpus_per_node:
        amounts["nvidia.com/gpu"] = str(k8s.gpus_per_node)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _volumes(k8s, run_dir: Path, data_dirs: list[Path]) -> tuple[list[dict], list[dict]]:
    """(volumes, volumeMounts): the runs claim at run_dir's parent, the data claim at the datasets' common parent."""
    mounts = [("runs", k8s.runs_claim, run_dir.parent)]
    if data_dirs:
        data_root = Path(*Path(data_dirs[0]).parent.parts[: min(len(Path(d).parent.parts) for d in data_dirs)])
        if not str(run_dir.parent).startswith(str(data_root)) and not str(data_root).startswith(str(run_dir.parent)):
            mounts.append(("data", k8s.data_claim, data_root))
    volumes = [{"name": name, "persistentVolumeClaim": {"claimName": claim}} for name, claim, _ in mounts]
    volume_mounts = [{"name": name, "mountPath": str(path)} for name, _, path in mounts]
    return volumes, volume_mounts


def _env(k8s) -> list[dict]:
    env = {"OMP_NUM_THREADS": "1", **k8s.env}
    return [{"name": k, "value": v} for k, v in env.items()]


def pytorchjob(launch, *, name: str, config_path: str, run_dir: Path, data_dirs: list[Path]) -> dict:
    """A kubeflow.org/v1 PyTorchJob: one Master pod and nodes - 1 Worker pods."""
    k8s = launch.k8s
    volumes, mounts = _volumes(k8s, run_dir, data_dirs)
    # $(MASTER_ADDR) and $(MASTER_PORT) are set in every pod by the operator; Kubernetes expands them.
    command = torchrun_command(launch, config_path, "$(MASTER_ADDR):$(MASTER_PORT)", name)
    container = {"name": CONTAINER["pytorchjob"], "image": k8s.image, "command": command, "env": _env(k8s),
                 "resources": _resources(k8s), "volumeMounts": mounts}

    def replicas(count: int) -> dict:
        return {"replicas": count, "restartPolicy": "ExitCode",
                "template": {"spec": {"containers": [copy.deepcopy(container)], "volumes": copy.deepcopy(volumes)}}}

    specs = {"Master": replicas(1)}
    if launch.nodes > 1:
        specs["Worker"] = replicas(launch.nodes - 1)
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
            "metadata": {"name": name, "namespace": k8s.namespace, "labels": {"app.kubernetes.io/created-by": "ember"}},
            "spec": {"nprocPerNode": str(launch.procs_per_node),
                     "runPolicy": {"backoffLimit": max(launch.max_restarts, 1) * launch.nodes, "cleanPodPolicy": "None"},
                     "pytorchReplicaSpecs": specs}}


def trainjob(launch, *, name: str, config_path: str, run_dir: Path, data_dirs: list[Path]) -> dict:
    """A trainer.kubeflow.org/v1alpha1 TrainJob on the torch runtime, with ember's command and the volumes."""
    k8s = launch.k8s
    volumes, mounts = _volumes(k8s, run_dir, data_dirs)
    # The torch runtime sets PET_MASTER_ADDR / PET_MASTER_PORT in every node's container.
    command = torchrun_command(launch, config_path, "$(PET_MASTER_ADDR):$(PET_MASTER_PORT)", name)
    return {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
            "metadata": {"name": name, "namespace": k8s.namespace, "labels": {"app.kubernetes.io/created-by": "ember"}},
            "spec": {"runtimeRef": {"name": k8s.runtime, "kind": "ClusterTrainingRuntime", "apiGroup": "trainer.kubeflow.org"},
                     "trainer": {"image": k8s.image, "command": command, "numNodes": launch.nodes,
                                 "numProcPerNode": launch.procs_per_node, "resourcesPerNode": _resources(k8s), "env": _env(k8s)},
                     "podSpecOverrides": [{"targetJobs": [{"name": CONTAINER["trainjob"]}], "volumes": volumes,
                                           "containers": [{"name": CONTAINER["trainjob"], "volumeMounts": mounts}]}]}}


def manifest(launch, **kwargs) -> tuple[str, str]:
    """(file name, YAML text) of the manifest `launch.k8s.api` asks for."""
    build = pytorchjob if launch.k8s.api == "pytorchjob" else trainjob
    kind = "pytorchjob" if launch.k8s.api == "pytorchjob" else "trainjob"
    header = f"# Made by `ember launch --scheduler k8s`; submit with: kubectl apply -f {kind}.yaml\n"
    return f"{kind}.yaml", header + yaml.safe_dump(build(launch, **kwargs), sort_keys=False)
