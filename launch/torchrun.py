"""The torchrun command that starts one node's workers: the same line on every node.

c10d rendezvous at `rdzv_endpoint` (the host that owns it serves the store; the others join it),
torchrun's restarts, and SIGUSR1 handled like SIGTERM: forwarded to the workers, which then
checkpoint and exit (`pretrain/faults.py`). It runs through `ember.launch.elastic`, torchrun with
ember's exit codes.
"""

from __future__ import annotations

import shlex

STOP_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def torchrun_command(launch, config_path: str, rdzv_endpoint: str, run_id: str, python: str = "python") -> list[str]:
    """argv of one node's torchrun for `launch` (a LaunchConfig), training `config_path`."""
    return [
        python, "-m", "ember.launch.elastic",
        "--nnodes", str(launch.nodes), "--nproc-per-node", str(launch.procs_per_node),
        "--max-restarts", str(launch.max_restarts),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", run_id,
        "--signals-to-handle", STOP_SIGNALS, "--shutdown-timeout", str(launch.shutdown_timeout_s),
        "-m", "ember", "pretrain", config_path,
    ]


def node_script(command: list[str], nodes: int, env: dict[str, str]) -> str:
    """A shell script holding the per-node command, as saved under run_dir/launch/."""
    lines = ["#!/usr/bin/env bash",
             f"# Run this same command on each of the {nodes} node(s); they meet at the rendezvous endpoint.",
             "set -euo pipefail"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    lines.append(shlex.join(command))
    return "\n".join(lines) + "\n"
