"""How a run ends when something goes wrong, and the switches that make things go wrong in tests.

Exit codes of `ember pretrain` (and of `ember launch` and `python -m ember.launch.elastic`, which pass
them on):
    0    finished, or stopped at `train.stop_after_steps` with a checkpoint
    1    a bug or a failed worker (its traceback is in its log)
    2    a user error: one line `error: <what> (<where>)`, on every rank, no restart
    3    a hang: the watchdog ended a rank that made no progress for `train.hang_timeout_s`
    143  preempted: SIGTERM or SIGUSR1 arrived, every rank stopped after the same step and the
         checkpoint of that step is saved; start the job again to resume (128 + SIGTERM, the code
         schedulers treat as retryable: Kubeflow's ExitCode policy restarts 128-255, never 1-127)

Preemption: `StopSignals` turns SIGTERM/SIGUSR1 into a request; after every step `stop_agreed` takes
the maximum over ranks (one small all-reduce), so all ranks stop after the same step whichever rank
was signalled. Hangs: `Watchdog` ends a rank whose loop made no progress for too long, with its
Python stacks in its log. User errors: `end_on_user_error` makes one rank's error end every rank.

Fault injection for tests, read from the environment here and nowhere else:
    EMBER_POISON_STEP=7 | 3,4,5 | 3-5     those steps' loss is NaN (rank 0; the reductions spread it)
    EMBER_FAULT=KIND@RANK:STEP[,...]      at the start of STEP, rank RANK: kill (SIGKILL itself),
                                          term / usr1 (send itself the signal), stall (sleep forever),
                                          error (a user error on that rank only, as a file only it reads)
EMBER_FAULT acts only in a job's first attempt (torchrun's TORCHELASTIC_RESTART_COUNT 0), so the
restarted workers run clean.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("ember.pretrain.faults")

EXIT_USER_ERROR = 2
EXIT_HUNG = 3
EXIT_PREEMPTED = 143
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Set by `ember.launch.elastic` for its workers: the pid of the torchrun agent to tell about a user error.
AGENT_ENV = "EMBER_ELASTIC_AGENT"
POISON_ENV = "EMBER_POISON_STEP"
FAULT_ENV = "EMBER_FAULT"


class Preempted(Exception):
    """Every rank stopped after `step` on a stop signal; the checkpoint of that step is saved."""

    def __init__(self, step: int, signal_name: str):
        self.step, self.signal_name = step, signal_name
        super().__init__(f"preempted by {signal_name}: every rank stopped after step {step} with its checkpoint saved "
                         f"(exit code {EXIT_PREEMPTED}; start the job again to resume)")


# ---------------------------------------------------------------- preemption


class StopSignals:
    """While installed, SIGTERM and SIGUSR1 only set a request that the loop acts on at the end of a step."""

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def stop_agreed(requested: bool, device) -> bool:
    """True on every rank when any rank was asked to stop (collective: every rank calls it after every step)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return requested
    flag = torch.tensor([1.0 if requested else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


# ---------------------------------------------------------------- hangs


class Watchdog:
    """Ends this rank (exit `EXIT_HUNG`) when `beat` has not been called for `timeout_s` seconds.

    A daemon thread: it runs while the main thread is stuck in a collective or a sleep, both of which
    release the GIL. Its line names the rank, the step and the seconds waited; the Python stacks of every
    thread go to the rank's log, so the place it hung is on record. torchrun sees a failed worker and
    restarts the job (`--max-restarts`).
    """

    def __init__(self, timeout_s: float, rank: int, log_file: Path | None):
        self.timeout_s, self.rank, self.log_file = timeout_s, rank, log_file
        self.step, self.last_beat = 0, time.monotonic()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="ember-watchdog", daemon=True)

    def beat(self, step: int) -> None:
        self.step, self.last_beat = step, time.monotonic()

    def __enter__(self) -> Watchdog:
        if self.timeout_s:
            self.last_beat = time.monotonic()
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()

    def _watch(self) -> None:
        while not self._done.wait(min(1.0, self.timeout_s / 4)):
            waited = time.monotonic() - self.last_beat
            if waited >= self.timeout_s:
                self._end(waited)

    def _end(self, waited: float) -> None:
        line = (f"error: rank {self.rank} made no progress for {waited:.0f} s after step {self.step} "
                f"(train.hang_timeout_s={self.timeout_s:g}); its stacks are in its log")
        log.error(line.removeprefix("error: "))
        print(line, file=sys.stderr, flush=True)
        if self.log_file is not None:
            with open(self.log_file, "a") as f:
                f.write(f"--- Python stacks of rank {self.rank}, hung after step {self.step} ---\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
        logging.shutdown()
        os._exit(EXIT_HUNG)


# ---------------------------------------------------------------- what the loop calls


def rank_log_file() -> Path | None:
    """This rank's log file (`logs.add_log_file`), where the watchdog writes the stacks."""
    for handler in logging.getLogger("ember").handlers:
        if isinstance(handler, logging.FileHandler):
            return Path(handler.baseFilename)
    return None


class TrainingGuard:
    """The fault contract around a training loop: stop signals, the hang watchdog and the injected faults.

    `step_started(step)` at the top of every step, `stop_agreed(step, device)` at its end (collective).
    """

    def __init__(self, hang_timeout_s: float, rank: int):
        self.rank = rank
        self.signals = StopSignals()
        self.watchdog = Watchdog(hang_timeout_s, rank, rank_log_file())
        self.faults = planned_faults()

    def __enter__(self) -> TrainingGuard:
        self.signals.__enter__()
        self.watchdog.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.watchdog.__exit__(*exc)
        self.signals.__exit__(*exc)

    def step_started(self, step: int) -> None:
        self.watchdog.beat(step - 1)
        inject(self.faults, step, self.rank)

    def stop_agreed(self, step: int, device) -> bool:
        """Whether every rank stops after `step` (one rank's SIGTERM/SIGUSR1 is enough)."""
        self.watchdog.beat(step)
        return stop_agreed(self.signals.received is not None, device)

    @property
    def signal_name(self) -> str:
        return self.signals.received or "a stop signal to another rank"


# ---------------------------------------------------------------- user errors on one rank


def _job_store():
    """A client of the store torchrun's agent serves to its workers (None when not under torchrun)."""
    import datetime

    import torch.distributed as dist

    if "TORCHELASTIC_RUN_ID" not in os.environ or "MASTER_ADDR" not in os.environ:
        return None
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=datetime.timedelta(seconds=5), wait_for_workers=False)
    except Exception:  # the agent is gone: nobody left to tell
        return None
    return dist.PrefixStore(f"ember/{os.environ['TORCHELASTIC_RUN_ID']}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def peer_user_error() -> bool:
    """Whether another rank of this job stopped on a user error (asked after a collective failed)."""
    store = _job_store()
    try:
        return store is not None and store.check(["user_error"])
    except Exception:
        return False


def end_on_user_error(line: str | None) -> int:
    """A worker's exit on a user error: its own (`line`) or a peer's (None). Returns `EXIT_USER_ERROR`.

    The first rank to report prints its line; the others stay quiet. The torchrun agent of
    `ember.launch.elastic` is told (SIGUSR2), so it stops the other workers at once instead of
    restarting them; without it the peers stop when their next collective finds this rank gone.
    """
    store = _job_store()
    first = True
    if store is not None and line is not None:
        try:
            first = store.add("user_error", 1) == 1
        except Exception:
            pass
    if line is not None and first:
        print(line, file=sys.stderr, flush=True)
    agent = os.environ.get(AGENT_ENV)
    if agent and agent.isdigit() and int(agent) == os.getppid():
        os.kill(int(agent), signal.SIGUSR2)
    return EXIT_USER_ERROR


# ---------------------------------------------------------------- fault injection (tests)


def poisoned_steps() -> set[int]:
    """`EMBER_POISON_STEP=7` or `=3,4,5` or `=3-5`: the steps whose loss is made NaN.

    The NaN is injected on rank 0 only; the gradient reduction and the loss all-reduce carry
    it to the other ranks, which is exactly how a real bad batch spreads.
    """
    steps: set[int] = set()
    for part in filter(None, os.environ.get(POISON_ENV, "").replace(" ", "").split(",")):
        low, _, high = part.partition("-")
        steps.update(range(int(low), int(high or low) + 1))
    return steps


FAULT_KINDS = ("kill", "term", "usr1", "stall", "error")


@dataclass(frozen=True)
class Fault:
    kind: str  # kill | term | usr1 | stall | error
    rank: int
    step: int


def planned_faults() -> list[Fault]:
    """`EMBER_FAULT=kill@1:5,stall@0:9`, in the first attempt of a job only (see the module doc)."""
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return []
    faults = []
    for part in filter(None, os.environ.get(FAULT_ENV, "").replace(" ", "").split(",")):
        kind, _, where = part.partition("@")
        rank, _, step = where.partition(":")
        if kind not in FAULT_KINDS or not rank.isdigit() or not step.isdigit():
            raise ValueError(f"{FAULT_ENV}: {part!r} is not KIND@RANK:STEP with KIND one of {', '.join(FAULT_KINDS)}")
        faults.append(Fault(kind, int(rank), int(step)))
    return faults


def inject(faults: list[Fault], step: int, rank: int) -> None:
    """Act out the faults planned for this rank at the start of `step`."""
    for fault in faults:
        if fault.rank != rank or fault.step != step:
            continue
        log.warning("fault injection (%s): %s at step %d", FAULT_ENV, fault.kind, step)
        if fault.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif fault.kind in ("term", "usr1"):
            os.kill(os.getpid(), signal.SIGTERM if fault.kind == "term" else signal.SIGUSR1)
        elif fault.kind == "error":
            from ember.errors import UserError

            raise UserError(f"injected user error on rank {rank} at step {step}", FAULT_ENV)
        else:
            while True:
                time.sleep(3600)
