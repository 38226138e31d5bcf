"""`ember launch --dry-run`: the sbatch script, the per-node torchrun command, and Kubeflow manifests that
validate against the CRDs' OpenAPI schemas; bad input is one line, exit 2, nothing written or submitted."""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ember_cli import REPO, run_ember

CRDS = REPO.parent / "shared" / "data" / "k8s"
TINY = "configs/pretrain/tiny.yaml"


def dry_run(run_dir: Path, *args: str):
    proc = run_ember("launch", TINY, "--dry-run", "--set", f"run_dir={run_dir}", *args)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_slurm_script_is_complete_and_saved(tmp_path):
    proc = dry_run(tmp_path / "run", "--scheduler", "slurm", "--nodes", "2", "--procs-per-node", "4", "--max-restarts", "3",
                   "--set", "launch.slurm.partition=cpu", "--set", "launch.slurm.account=lm", "--set", "launch.slurm.gpus_per_node=4")
    script = (tmp_path / "run" / "launch" / "sbatch.sh").read_text()
    assert script in proc.stdout  # printed as saved
    for option in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=4", "--partition=cpu", "--account=lm", "--requeue",
                   "--signal=B:USR1@120", "--time=24:00:00", f"--output={tmp_path / 'run' / 'launch'}/slurm-%j.out"):
        assert f"#SBATCH {option}\n" in script, option
    assert "srun --kill-on-bad-exit=1" in script and '--rdzv-endpoint "$head:29400"' in script
    assert "--nnodes 2 --nproc-per-node 4 --max-restarts 3" in script and 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert subprocess.run(["bash", "-n", str(tmp_path / "run" / "launch" / "sbatch.sh")]).returncode == 0
    # the workers read the resolved config with absolute paths
    saved = yaml.safe_load((tmp_path / "run" / "launch" / "config.yaml").read_text())
    assert saved["run_dir"] == str(tmp_path / "run") and Path(saved["data"]["datasets"][0]["path"]).is_absolute()


def test_k8s_dry_run_saves_and_prints_the_manifest(tmp_path):
    proc = dry_run(tmp_path / "run", "--scheduler", "k8s", "--nodes", "2")
    saved = (tmp_path / "run" / "launch" / "pytorchjob.yaml").read_text()
    assert saved in proc.stdout and "kind: PyTorchJob" in saved


def test_torchrun_prints_the_per_node_command(tmp_path):
    proc = dry_run(tmp_path / "run", "--scheduler", "torchrun", "--nodes", "2", "--rdzv-endpoint", "10.1.2.3:29400")
    command = (tmp_path / "run" / "launch" / "torchrun.sh").read_text().splitlines()[-1]
    assert command in proc.stdout
    assert "--nnodes 2 --nproc-per-node 1 " in command and "--rdzv-endpoint 10.1.2.3:29400" in command
    assert "--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in command
    assert command.endswith(f"-m ember pretrain {tmp_path / 'run' / 'launch' / 'config.yaml'}")


# ---------------------------------------------------------------- Kubernetes manifests against the CRDs


def strict(schema):
    """The CRD schema with unknown fields refused: Kubernetes prunes them silently, which would hide a typo."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@functools.cache
def crd_validator(file_name: str, version: str):
    jsonschema = pytest.importorskip("jsonschema")
    path = CRDS / file_name
    if not path.is_file():
        pytest.skip(f"no CRD schema at {path} (the shared reference data is absent)")
    crd = yaml.safe_load(path.read_text())
    schema = next(v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == version)
    schema = strict(copy.deepcopy(schema))
    schema["properties"]["metadata"] = {"type": "object", "required": ["name"],
                                        "properties": {"name": {"type": "string", "pattern": "^[a-z]([-a-z0-9]*[a-z0-9])?$"},
                                                       "namespace": {"type": "string"}, "labels": {"type": "object"}}}
    return jsonschema.Draft7Validator(schema)


KINDS = {"pytorchjob": ("kubeflow.org_pytorchjobs.yaml", "v1", "PyTorchJob"),
         "trainjob": ("trainer.kubeflow.org_trainjobs.yaml", "v1alpha1", "TrainJob")}


@pytest.mark.parametrize("api", sorted(KINDS))
@pytest.mark.parametrize("nodes", [1, 4])
def test_k8s_manifest_validates_against_its_crd(tmp_path, api, nodes):
    file_name, version, kind = KINDS[api]
    validator = crd_validator(file_name, version)
    from ember.config import load_config
    from ember.launch.launch_cmd import launch_files
    from ember.run_config import RunConfig

    # in process (the CLI path of the same function is tested above): the manifest as `--dry-run` saves it
    cfg = load_config(REPO / TINY, RunConfig, [f"run_dir={tmp_path / 'run'}", "launch.scheduler=k8s", f"launch.k8s.api={api}",
                                               f"launch.nodes={nodes}", "launch.procs_per_node=2", "launch.k8s.gpus_per_node=2"])
    manifest = yaml.safe_load(launch_files(cfg).files[f"{api}.yaml"])
    assert manifest["kind"] == kind
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]
    assert not errors, errors
    if api == "pytorchjob":
        specs = manifest["spec"]["pytorchReplicaSpecs"]
        assert specs["Master"]["replicas"] == 1 and specs.get("Worker", {"replicas": 0})["replicas"] == nodes - 1
        container = specs["Master"]["template"]["spec"]["containers"][0]
    else:
        assert manifest["spec"]["trainer"]["numNodes"] == nodes
        container = manifest["spec"]["trainer"]
    assert f"--nnodes {nodes} --nproc-per-node 2" in " ".join(container["command"])
    # the validator is not blind: a misspelt field fails it
    broken = copy.deepcopy(manifest)
    broken["spec"]["runPolicy" if api == "pytorchjob" else "trainer"]["numNodess"] = 1
    assert list(validator.iter_errors(broken))


# ---------------------------------------------------------------- bad input


def assert_refused(proc, run_dir: Path, *words: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert not (run_dir / "launch").exists(), "nothing may be written"


@pytest.mark.parametrize("args, words", [
    (["--scheduler", "pbs"], ["launch.scheduler", "'pbs'", "--scheduler pbs"]),
    (["--nodes", "0", "--scheduler", "slurm"], ["launch.nodes", "--nodes 0"]),
    (["--scheduler", "torchrun", "--nodes", "2", "--rdzv-endpoint", "node01"], ["HOST:PORT", "--rdzv-endpoint node01"]),
    (["--scheduler", "local", "--nodes", "2"], ["--nodes"]),
])
def test_bad_flags(tmp_path, args, words):
    run_dir = tmp_path / "run"
    proc = run_ember("launch", TINY, "--set", f"run_dir={run_dir}", *args)
    assert_refused(proc, run_dir, *words)
    assert not run_dir.exists()


def test_sbatch_missing_from_path(tmp_path):
    run_dir = tmp_path / "run"
    env = {"PATH": str(Path(sys.executable).parent)}  # the venv only: no sbatch
    proc = run_ember("launch", TINY, "--scheduler", "slurm", "--set", f"run_dir={run_dir}", env=env)
    assert_refused(proc, run_dir, "sbatch", "PATH")
    assert not run_dir.exists()


def test_run_dir_held_by_a_live_job(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from ember.pretrain.run_lock import hold; "
                               f"f = hold({str(run_dir)!r}); print('held', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True, cwd=REPO, env=os.environ)
    try:
        assert holder.stdout.readline().strip() == "held"
        for scheduler in ("local", "slurm"):
            proc = run_ember("launch", TINY, "--scheduler", scheduler, "--dry-run", "--set", f"run_dir={run_dir}")
            assert_refused(proc, run_dir, "in use by another live job", f"pid {holder.pid}", str(run_dir))
    finally:
        holder.kill()
        holder.wait()
    # the lock dies with its holder: the directory is free again
    dry_run(run_dir, "--scheduler", "slurm")
