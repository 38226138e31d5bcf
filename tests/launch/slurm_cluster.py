"""A one-node SLURM cluster on this machine for the tests: munged, slurmctld and slurmd from Debian's slurm-wlm.

`make test` installs the packages (.ci/install-slurm); this starts the daemons as root with a slurm.conf in a
temporary directory (clients find it through SLURM_CONF) and stops what it started. What it took here:
/run/munge owned by the munge user before munged starts as that user; SlurmctldHost = the short host name,
SlurmUser=root, proctrack/linuxproc, task/none, select/cons_tres, one node and one default partition.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ember_cli import free_port

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")


@dataclass
class Cluster:
    conf: Path
    started: list[Path]  # pid files of the daemons this fixture started

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), capture_output=True, text=True, env={**os.environ, **self.env}, timeout=60)

    def job_state(self, job: str) -> str:
        out = self.run("scontrol", "show", "job", job).stdout
        return next((w.split("=", 1)[1] for w in out.split() if w.startswith("JobState=")), "UNKNOWN")

    def stop(self) -> None:
        self.run("scancel", "--full", "--user", "root")
        for pid_file in reversed(self.started):
            try:
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
            except (OSError, ValueError):
                pass


def why_not() -> str | None:
    """Why no cluster can start here (None: it can)."""
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        return f"SLURM not installed ({', '.join(missing)} missing; `make test` installs slurm-wlm and munge as root)"
    if os.geteuid() != 0:
        return "the SLURM daemons need root here"
    return None


def _wait(what: str, ready, timeout_s: float = 30.0) -> str | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return None
        time.sleep(0.5)
    return f"{what} did not come up within {timeout_s:.0f} s"


def _start_munge(root: Path) -> tuple[Path | None, str | None]:
    """munged as the munge user (reused when one is running); (its pid file if started here, problem)."""
    if subprocess.run(["sh", "-c", "munge -n | unmunge"], capture_output=True).returncode == 0:
        return None, None
    if not Path("/etc/munge/munge.key").is_file():
        subprocess.run(["mungekey", "--create"], capture_output=True)
        shutil.chown("/etc/munge/munge.key", "munge", "munge")
    for folder in ("/run/munge", "/var/lib/munge", "/var/log/munge"):
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.chown(folder, "munge", "munge")
    proc = subprocess.run(["runuser", "-u", "munge", "--", "munged"], capture_output=True, text=True)
    if proc.returncode != 0:
        return None, f"munged did not start: {proc.stderr.strip()}"
    problem = _wait("munged", lambda: subprocess.run(["sh", "-c", "munge -n | unmunge"], capture_output=True).returncode == 0)
    return Path("/run/munge/munged.pid"), problem


def start(root: Path) -> tuple[Cluster | None, str | None]:
    """(cluster, None), or (None, why it could not start)."""
    problem = why_not()
    if problem:
        return None, problem
    munge_pid, problem = _start_munge(root)
    if problem:
        return None, problem
    host = socket.gethostname().split(".")[0]
    for folder in ("state", "spool"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(f"""ClusterName=ember-test
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
# A requeued job may start again cred_expire s after its requeue (default 120 s): the pre-timeout test waits on it.
AuthInfo=cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
NodeName={host} CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
    cluster = Cluster(conf, [p for p in (munge_pid,) if p])
    env = {**os.environ, **cluster.env}
    for daemon in ("slurmctld", "slurmd"):
        proc = subprocess.run([daemon, "-f", str(conf)], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            cluster.stop()
            return None, f"{daemon} did not start: {proc.stderr.strip() or proc.returncode}"
        cluster.started.append(root / f"{daemon}.pid")
    problem = _wait("the SLURM node", lambda: cluster.run("sinfo", "-h", "-o", "%T").stdout.strip() in ("idle", "mixed"))
    if problem:
        log = (root / "slurmd.log").read_text()[-500:] if (root / "slurmd.log").is_file() else ""
        cluster.stop()
        return None, f"{problem}: {log}"
    return cluster, None
