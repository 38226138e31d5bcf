"""The sbatch script of a run: one `srun` task per node, each starting that node's torchrun.

The rendezvous is on the allocation's first host. SLURM sends the batch script SIGUSR1
`signal_before_s` before the time limit (`--signal=B:USR1@S`); the script forwards it to the
torchrun agents through srun, the agents to the workers, which agree on a step, checkpoint and
exit with `EXIT_PREEMPTED`; the script then requeues the job, which resumes from that checkpoint.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

from ember.errors import UserError
from ember.launch.torchrun import torchrun_command
from ember.pretrain.faults import EXIT_PREEMPTED


def sbatch_script(launch, *, job_name: str, config_path: str, log_dir: str, workdir: str, python: str) -> str:
    """The complete sbatch script for `launch` (a LaunchConfig)."""
    s = launch.slurm
    options = [f"--job-name={job_name}", f"--nodes={launch.nodes}", "--ntasks-per-node=1", f"--time={s.time_limit}",
               f"--output={log_dir}/slurm-%j.out", "--open-mode=append", f"--signal=B:USR1@{s.signal_before_s}"]
    if s.cpus_per_task:
        options.append(f"--cpus-per-task={s.cpus_per_task}")
    if s.gpus_per_node:
        options.append(f"--gpus-per-node={s.gpus_per_node}")
    if s.partition:
        options.append(f"--partition={s.partition}")
    if s.account:
        options.append(f"--account={s.account}")
    options.append("--requeue" if s.requeue else "--no-requeue")
    options += s.sbatch_args
    command = torchrun_command(launch, config_path, "$head:" + str(s.rdzv_port), "$SLURM_JOB_ID", python=python)
    # The endpoint and the run id are the job's: double-quoted, so this script's shell expands them.
    srun = shlex.join(command)
    for variable in (f"$head:{s.rdzv_port}", "$SLURM_JOB_ID"):
        srun = srun.replace(shlex.quote(variable), f'"{variable}"')
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in s.env.items())
    requeue = 'scontrol requeue "$SLURM_JOB_ID"' if s.requeue else 'echo "requeue is off (launch.slurm.requeue)"'
    return f"""#!/usr/bin/env bash
{"".join(f"#SBATCH {o}{chr(10)}" for o in options)}
# Made by `ember launch --scheduler slurm`; submit with: sbatch THIS_FILE
set -uo pipefail
cd {shlex.quote(workdir)}
export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-1}}
{exports}head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
echo "job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}) on $SLURM_JOB_NODELIST, rendezvous on $head:{s.rdzv_port}"

# Before the time limit SLURM signals this script; srun passes the signal on to every node's torchrun.
stopping=0
trap 'stopping=1; echo "pre-timeout signal: workers checkpoint and stop"; kill -USR1 "$srun_pid" 2>/dev/null' USR1
srun --kill-on-bad-exit=1 {srun} &
srun_pid=$!
while :; do
  wait "$srun_pid"; rc=$?
  kill -0 "$srun_pid" 2>/dev/null || break  # `wait` also returns when the trap ran
done
echo "workers exited with code $rc"
if [ "$rc" -eq {EXIT_PREEMPTED} ] || [ "$stopping" -eq 1 ]; then
  {requeue}
fi
exit "$rc"
"""


def submit(script: Path) -> str:
    """`sbatch SCRIPT`; returns the job id."""
    proc = subprocess.run([sbatch_path(), "--parsable", str(script)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"sbatch refused the job: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}",
                        str(script))
    return proc.stdout.strip().split(";")[0]


def sbatch_path() -> str:
    found = shutil.which("sbatch")
    if found is None:
        raise UserError("sbatch is not on PATH: this machine cannot submit to SLURM (--dry-run writes the script only)",
                        "--scheduler slurm")
    return found
