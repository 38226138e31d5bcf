"""`python -m ember.launch.elastic TORCHRUN_ARGS`: torchrun itself, with ember's fault contract at its ends.

The arguments are torchrun's, parsed and run by torch's own `torch.distributed.run`; the elastic agent,
rendezvous and restarts are torch's. Three things differ, all about how a job ends:
- a worker that stops on a user error (its own or a peer's) sends this agent SIGUSR2 (env
  `EMBER_ELASTIC_AGENT`): the agent stops the other workers at once instead of restarting them, and
  exits 2; the worker has printed the one error line;
- workers that stopped on a preemption exit `EXIT_PREEMPTED`, and so does this agent (also when the
  agent itself got the stop signal and passed it on to them, and when torch's agent, seeing the first
  worker leave, ended a slower one with a signal: one `EXIT_PREEMPTED` proves the agreed step's checkpoint
  was published, since a worker leaves with it only after the collective save);
- any other failure is one line naming the rank and its exit code instead of torchrun's traceback.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from ember.pretrain.faults import AGENT_ENV, EXIT_PREEMPTED, EXIT_USER_ERROR, STOP_SIGNALS


class _Stopped:
    """Why the agent was told to stop (set by the signal handler)."""

    user_error = False


def quiet_torch_logs(prefix: str) -> None:
    """Silence torch's loggers under `prefix`: what they would say, ember says in one line."""
    for name in [n for n in logging.root.manager.loggerDict if n.startswith(prefix)]:
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _on_worker_user_error(signum, frame) -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException

    _Stopped.user_error = True
    quiet_torch_logs("torch.distributed")  # the worker printed the one line of this job's end
    # torch's own shutdown path for a signalled agent: SIGTERM to every worker, no restart.
    raise SignalException("a worker stopped on a user error", sigval=signal.SIGTERM)


def exit_code(failures: dict[int, int]) -> tuple[int, str | None]:
    """The agent's exit code and its one line, from the failed workers' exit codes by global rank."""
    codes = set(failures.values())
    if EXIT_USER_ERROR in codes:
        return EXIT_USER_ERROR, None  # the worker printed its line
    if EXIT_PREEMPTED in codes and all(code == EXIT_PREEMPTED or code < 0 for code in codes):
        return EXIT_PREEMPTED, None  # rank 0 printed where it stopped; a signalled rank was on its way out
    rank, code = min(failures.items())
    how = f"signal {-code}" if code < 0 else f"exit code {code}"
    return 1, f"error: worker rank {rank} failed ({how}; its log is run_dir/logs/rank{rank}.log)"


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    os.environ[AGENT_ENV] = str(os.getpid())
    signal.signal(signal.SIGUSR2, _on_worker_user_error)
    args = parse_args(argv)
    quiet_torch_logs("torch.distributed.elastic.multiprocessing")  # per-process failure reports: see exit_code
    try:
        run(args)
    except ChildFailedError as e:
        code, line = exit_code({rank: failure.exitcode for rank, failure in e.failures.items()})
        if line:
            print(line, file=sys.stderr)
        return code
    except SignalException as e:
        if _Stopped.user_error:
            return EXIT_USER_ERROR
        name = signal.Signals(e.sigval).name
        if e.sigval in STOP_SIGNALS:  # passed on to the workers, which checkpoint the agreed step and exit
            print(f"stopped by {name}: the workers were told to checkpoint and exit", file=sys.stderr)
            return EXIT_PREEMPTED
        print(f"stopped by {name}", file=sys.stderr)
        return 128 + e.sigval
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # torch's elastic threads may still hold the interpreter; everything is written
