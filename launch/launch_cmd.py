"""`ember launch CONFIG --scheduler local|torchrun|slurm|k8s`: start a run here, or write what starts it elsewhere.

The order is fixed so that a mistake costs nothing: config and flags are validated, the run
directory's lock and the scheduler's command are checked, and only then are the datasets prepared
(before any worker starts), the files written under `run_dir/launch/` and printed, and the job
started or submitted. `--dry-run` stops after writing and printing (`dry_run`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ember.errors import UserError

# Flags that override a field of the config's `launch:` section (flag, dest, field).
FLAG_FIELDS = (
    ("--scheduler", "scheduler", "scheduler"),
    ("--nodes", "nodes", "nodes"),
    ("--procs-per-node", "procs_per_node", "procs_per_node"),
    ("--max-restarts", "max_restarts", "max_restarts"),
    ("--rdzv-endpoint", "rdzv_endpoint", "rdzv_endpoint"),
    ("--k8s-api", "k8s_api", "k8s.api"),
)


@dataclass
class LaunchFiles:
    """What `ember launch` writes under run_dir/launch/: the workers' config and the scheduler's files."""

    launch_dir: Path
    config_yaml: str
    files: dict[str, str] = field(default_factory=dict)  # file name -> text
    command: list[str] | None = None  # the local torchrun command (scheduler local)

    @property
    def config_path(self) -> Path:
        return self.launch_dir / "config.yaml"

    def write(self) -> None:
        self.launch_dir.mkdir(parents=True, exist_ok=True)
        for name, text in {"config.yaml": self.config_yaml, **self.files}.items():
            tmp = self.launch_dir / f".{name}.tmp"
            tmp.write_text(text)
            if name.endswith(".sh"):
                tmp.chmod(0o755)
            tmp.replace(self.launch_dir / name)

    def show(self) -> None:
        print(f"# {self.config_path}: the resolved run config every worker reads (`ember config show` prints it)")
        for name, text in self.files.items():
            print(f"# ---- {self.launch_dir / name}\n{text}", end="" if text.endswith("\n") else "\n")
        sys.stdout.flush()


def load_launch_config(args: argparse.Namespace):
    """The run config with the flags applied over its `launch:` section; errors name the flag that was wrong."""
    from ember.config import load_config
    from ember.run_config import RunConfig

    overrides, flag_of = list(args.overrides), {}
    for flag, dest, dotted in FLAG_FIELDS:
        value = getattr(args, dest)
        if value is not None:
            text = f"launch.{dotted}={json.dumps(value)}"  # JSON is YAML: strings stay strings
            overrides.append(text)
            flag_of[f"--set {text}"] = f"{flag} {value}"
    try:
        return load_config(args.config, RunConfig, overrides, kind="pretrain")
    except UserError as e:
        raise UserError(e.what, flag_of.get(e.where, e.where)) from None


def dataset_dirs(cfg) -> list[Path]:
    """Absolute directories of the mixture's datasets (prepared or not)."""
    from ember.pretrain.run import dataset_dir

    return [dataset_dir(entry).resolve() for entry in cfg.data.datasets]


def worker_config(cfg, data_dirs: list[Path]):
    """`cfg` as the workers get it: absolute run_dir and dataset paths, so it works from any directory."""
    datasets = [entry.model_copy(update={"path": path}) for entry, path in zip(cfg.data.datasets, data_dirs)]
    return cfg.model_copy(update={"run_dir": Path(cfg.run_dir).resolve(),
                                  "data": cfg.data.model_copy(update={"datasets": datasets})})


def local_endpoint(launch) -> str:
    from ember.pretrain.distributed import free_port

    return launch.rdzv_endpoint or f"127.0.0.1:{free_port()}"


def launch_files(cfg) -> LaunchFiles:
    """The files of `cfg.launch.scheduler` for this run, computed without writing anything."""
    from ember.config import to_yaml
    from ember.launch import k8s, slurm
    from ember.launch.torchrun import node_script, torchrun_command

    launch, data_dirs = cfg.launch, dataset_dirs(cfg)
    wcfg = worker_config(cfg, data_dirs)
    run_dir = Path(wcfg.run_dir)
    out = LaunchFiles(run_dir / "launch", to_yaml(wcfg))
    config_path, run_id = str(out.config_path), launch.run_id or k8s.dns_name(run_dir.name)
    if launch.scheduler == "local":
        out.command = torchrun_command(launch, config_path, local_endpoint(launch), run_id, python=sys.executable)
        out.files["local.sh"] = node_script(out.command, 1, {})
    elif launch.scheduler == "torchrun":
        import socket

        endpoint = launch.rdzv_endpoint or f"{socket.gethostname()}:29400"
        out.files["torchrun.sh"] = node_script(torchrun_command(launch, config_path, endpoint, run_id, python=sys.executable),
                                               launch.nodes, {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    elif launch.scheduler == "slurm":
        out.files["sbatch.sh"] = slurm.sbatch_script(launch, job_name=run_id, config_path=config_path, log_dir=str(out.launch_dir),
                                                     workdir=os.getcwd(), python=sys.executable)
    else:
        name, text = k8s.manifest(launch, name=launch.k8s.name or run_id, config_path=config_path, run_dir=run_dir,
                                  data_dirs=data_dirs)
        out.files[name] = text
    return out


def check_before_writing(cfg, dry_run: bool) -> None:
    """Every refusal that needs no file written: layout, the run directory's lock, the scheduler's command."""
    from ember.launch.slurm import sbatch_path
    from ember.pretrain.run_lock import check_free

    launch = cfg.launch
    if launch.scheduler == "local" and launch.nodes > 1:
        raise UserError(f"--scheduler local runs on this machine only, not on {launch.nodes} nodes "
                        "(--scheduler torchrun prints the per-node command)", "--nodes")
    check_free(Path(cfg.run_dir))
    if dry_run:
        return
    if launch.scheduler == "slurm":
        sbatch_path()
    if launch.scheduler == "k8s" and shutil.which("kubectl") is None:
        raise UserError("kubectl is not on PATH: cannot submit the manifest (--dry-run writes it only)", "--scheduler k8s")


def dry_run(cfg) -> int:
    """Write the launch files under run_dir/launch/ and print them; start nothing."""
    files = launch_files(cfg)
    files.write()
    files.show()
    return 0


def simulate_job(cfg, gpu_mem: int) -> None:
    """Rank 0 of the job's nodes x procs_per_node ranks, simulated as `ember estimate --simulate` does (on a GPU
    target, except a local launch on this GPU-less machine)."""
    import torch
    from rich.console import Console

    from ember.launch.estimate_cmd import print_simulation, simulation_report

    launch = cfg.launch
    target = "cpu" if launch.scheduler == "local" and not torch.cuda.is_available() else "gpu"
    report = simulation_report(cfg, launch.nodes * launch.procs_per_node, 0, target, gpu_mem)
    print_simulation(Console(width=120), report)


def prepare_datasets(cfg) -> None:
    """Prepare every dataset of the mixture that is missing, here and now, before any worker starts."""
    from ember.data.prepare import ensure_prepared

    for entry in cfg.data.datasets:
        ensure_prepared(entry)


def run_local(cfg, files: LaunchFiles) -> int:
    """torchrun on this machine, holding the run directory's lock for its workers; returns its exit code."""
    from ember.pretrain.run_lock import HELD_ENV, hold

    lock = hold(Path(cfg.run_dir))
    env = {**os.environ, HELD_ENV: str(Path(cfg.run_dir).resolve())}
    print(f"$ {shlex.join(files.command)}", flush=True)
    try:
        return subprocess.call(files.command, env=env)
    finally:
        if lock is not None:
            lock.close()


def run_launch(args: argparse.Namespace) -> int:
    cfg = load_launch_config(args)
    if args.simulate and not args.dry_run:
        raise UserError("--simulate plans the job without starting it: add --dry-run", "--simulate")
    if args.simulate:  # its refusals come before anything is written
        from ember.launch.estimate_cmd import parse_bytes
        from ember.pretrain.simulate.rank import check_at_scale

        gpu_mem = parse_bytes(args.gpu_mem, "--gpu-mem")
        check_at_scale(cfg, cfg.launch.nodes * cfg.launch.procs_per_node)
    check_before_writing(cfg, args.dry_run)
    if args.dry_run:
        code = dry_run(cfg)
        if args.simulate:
            simulate_job(cfg, gpu_mem)
        return code
    prepare_datasets(cfg)
    files = launch_files(cfg)
    files.write()
    files.show()
    scheduler = cfg.launch.scheduler
    if scheduler == "local":
        return run_local(cfg, files)
    if scheduler == "torchrun":
        print(f"# run {files.launch_dir / 'torchrun.sh'} on each of the {cfg.launch.nodes} node(s)")
        return 0
    if scheduler == "slurm":
        from ember.launch.slurm import submit

        job = submit(files.launch_dir / "sbatch.sh")
        print(f"submitted SLURM job {job}; its log: {files.launch_dir}/slurm-{job}.out")
        return 0
    name = next(iter(files.files))
    return subprocess.call(["kubectl", "apply", "-f", str(files.launch_dir / name)])


def register(sub: argparse._SubParsersAction) -> None:
    from ember.launch.options import add_set_option

    p = sub.add_parser(
        "launch", help="start a run here (torchrun), or write the per-node torchrun command, an sbatch script or a Kubeflow manifest",
        description="Start a run on this machine with torchrun, or write what starts it on several nodes: the per-node torchrun "
                    "command, a SLURM sbatch script (submitted unless --dry-run) or a Kubeflow PyTorchJob / TrainJob. Missing "
                    "datasets are prepared first. Every file is printed and saved under run_dir/launch/. The flags override "
                    "the config's launch: section. Exit codes: 0 done, 1 failure, 2 user error, 3 hang, 143 preempted "
                    "(checkpoint saved; start again to resume).",
    )
    p.add_argument("config", help="run config YAML, or a preset name from configs/pretrain/ (e.g. tiny)")
    p.add_argument("--scheduler", help="local (torchrun here), torchrun (per-node command), slurm (sbatch) or k8s (Kubeflow manifest)")
    p.add_argument("--nodes", type=int, help="number of nodes (launch.nodes)")
    p.add_argument("--procs-per-node", type=int, help="worker processes per node, one per GPU on GPU nodes (launch.procs_per_node)")
    p.add_argument("--max-restarts", type=int, help="torchrun restarts after a failure; workers resume from the newest checkpoint")
    p.add_argument("--rdzv-endpoint", help="HOST:PORT of the c10d rendezvous (default: a free local port; slurm: the first host)")
    p.add_argument("--k8s-api", help="pytorchjob (Kubeflow training operator v1) or trainjob (Kubeflow Trainer v2)")
    p.add_argument("--dry-run", action="store_true", help="write and print the files, start or submit nothing")
    p.add_argument("--simulate", action="store_true",
                   help="with --dry-run: simulate rank 0 of the job on fake tensors and show its memory per rank "
                        "(as `ember estimate --simulate`)")
    p.add_argument("--gpu-mem", default="80GiB", help="memory of one GPU for --simulate (default 80GiB)")
    add_set_option(p)
    p.set_defaults(func=run_launch)
