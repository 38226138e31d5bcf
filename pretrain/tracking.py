"""Weights & Biases tracking of one run (rank 0 only), a sink of `Metrics` beside metrics.jsonl.

One W&B run per job: its id is kept in `run_dir/wandb_run.json`, so every restart (torchrun, SLURM
requeue, manual rerun) continues it with `resume="allow"`. W&B's own files live in `run_dir/wandb/`.

Each step reaches the run once. W&B cannot take a step back, and a killed process loses what W&B had
not yet flushed (its offline log is written every 15 s). So a resumed process first asks W&B what the
run holds (offline: wandb's reader on the earlier .wandb files; online: the resumed run's step), logs
the records of metrics.jsonl up to its checkpoint that W&B lacks, and then skips the replayed steps W&B
already has (they are bit-identical on CPU).

Tracking never stops training: the first failure of W&B (init, network, disk) logs one warning and
turns tracking off for the rest of the process; metrics.jsonl goes on regardless.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger("ember.pretrain.tracking")

STATE_FILE = "wandb_run.json"
# Config keys whose values are never sent anywhere (a config should hold none, but a user may paste one in).
SECRET_KEY = re.compile(r"(^|_)(api_?key|secret|password|passwd|auth_token|access_token)$", re.IGNORECASE)


def has_wandb_login() -> bool:
    """An API key in the environment, or a `wandb login` entry in the netrc for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(setting: str) -> str:
    """online | offline | disabled. auto: WANDB_MODE when set, else online with a login, else offline."""
    if setting != "auto":
        return setting
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("online", "offline", "disabled"):
        return env
    if env == "dryrun":
        return "offline"
    return "online" if has_wandb_login() else "offline"


def redact(value):
    """The config with every secret-looking key's value replaced (nested dicts and lists walked)."""
    if isinstance(value, dict):
        return {k: "<redacted>" if SECRET_KEY.search(str(k)) else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def flatten(record: dict, prefix: str, skip: tuple = ("kind", "step", "time")) -> dict:
    """One record of metrics.jsonl as W&B keys: `train/loss`, `train/tokens_by_source/stdlib`, ..."""
    out = {}
    for key, value in record.items():
        if key in skip:
            continue
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}/", ()))
        elif value is not None:
            out[f"{prefix}{key}"] = value
    return out


def git_commit() -> str | None:
    """The commit of the ember source tree that runs (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def system_facts(world_size: int, device) -> dict:
    """What a run ran on and with: code version, packages, world size, device and its model."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from ember.pretrain.cpu_matmul import cpu_model

    packages = {}
    for name in ("ember", "torch", "transformers", "deepspeed", "wandb", "numpy"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            pass
    on_gpu = getattr(device, "type", str(device)) == "cuda"
    return {"git_commit": git_commit(), "packages": packages, "python": platform.python_version(), "world_size": world_size,
            "device": str(device), "device_model": torch.cuda.get_device_name(device) if on_gpu else cpu_model(),
            "hostname": platform.node()}


def read_state(run_dir: Path) -> dict:
    path = Path(run_dir) / STATE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_state(run_dir: Path, state: dict) -> None:
    path = Path(run_dir) / STATE_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(path)


def parent_run_id(cfg) -> str | None:
    """A fine-tuning run's parent: the W&B run of the run directory its checkpoint came from
    (`finetune.parent_run_dir`, else the folders above `finetune.init_from`)."""
    finetune = getattr(cfg, "finetune", None)
    if finetune is None:
        return None
    folders = [Path(d) for d in (getattr(finetune, "parent_run_dir", None),) if d]
    source = getattr(finetune, "init_from", None)
    if source:
        folders += [Path(source).resolve(), *Path(source).resolve().parents]  # run_dir/checkpoints/step_X
    for folder in folders:
        run_id = read_state(folder).get("id")
        if run_id:
            return run_id
    return None


class Tracker:
    """One W&B run. `log` takes metrics.jsonl records; any W&B failure warns once and stops tracking."""

    def __init__(self, run, held: dict[str, int]):
        self.run = run
        self.held = held  # per record kind, the last step the W&B run already holds from earlier processes

    @property
    def active(self) -> bool:
        return self.run is not None

    def _fail(self, what: str, error: Exception) -> None:
        log.warning("W&B %s failed, tracking stops for this run (metrics.jsonl goes on): %s: %s",
                    what, type(error).__name__, error)
        self.close(exit_code=1)

    def log(self, record: dict) -> None:
        if not self.active:
            return
        kind, step = record.get("kind"), record.get("step")
        try:
            if kind == "summary":
                self.run.summary.update(flatten(record, "", skip=("kind", "time")))
                return
            if kind not in ("train", "eval") or step is None or step <= self.held.get(kind, 0):
                return  # a step the run holds from an earlier process (replayed after resume)
            self.run.log(flatten(record, f"{kind}/"), step=step)
        except Exception as e:  # noqa: BLE001 - a tracking failure must never stop training
            self._fail("logging", e)

    def update_summary(self, values: dict) -> None:
        if self.active:
            try:
                self.run.summary.update(values)
            except Exception as e:  # noqa: BLE001
                self._fail("summary", e)

    def log_reference(self, path: Path, name: str, kind: str) -> None:
        """A directory as an artifact by reference: W&B records its files' checksums, uploads nothing."""
        if not self.active or not Path(path).exists():
            return
        try:
            import wandb

            artifact = wandb.Artifact(re.sub(r"[^\w.-]", "-", name), type=kind)
            artifact.add_reference(Path(path).resolve().as_uri())
            self.run.log_artifact(artifact)
        except Exception as e:  # noqa: BLE001
            self._fail("artifact", e)

    def close(self, exit_code: int = 0) -> None:
        run, self.run = self.run, None
        if run is not None:
            try:
                run.finish(exit_code=exit_code)
            except Exception as e:  # noqa: BLE001
                log.warning("W&B finish failed: %s: %s", type(e).__name__, e)


def offline_steps_held(run_dir: Path, run_id: str) -> dict[str, int]:
    """Last train and eval step in the offline .wandb files earlier processes wrote, read by wandb's own reader."""
    import shutil

    reader = Path(sys.executable).with_name("wandb")
    reader = str(reader) if reader.exists() else shutil.which("wandb")
    held: dict[str, int] = {}
    for path in sorted(Path(run_dir, "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")):
        out = subprocess.run([reader, "leet", "inspect", "--json", str(path)], capture_output=True, text=True, timeout=60)
        for line in out.stdout.splitlines():
            if '"history"' not in line:
                continue
            history = json.loads(line).get("history", {})
            step = int(history.get("step", {}).get("num", 0))
            for kind in ("train", "eval"):
                if any(key.startswith(kind + "/") for key in history.get("item", {})):
                    held[kind] = max(held.get(kind, 0), step)
    return held


def records_up_to(run_dir: Path, step: int) -> list[dict]:
    """metrics.jsonl's train and eval records up to `step` (a resumed run's checkpoint)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line torn by the kill
        if record.get("kind") in ("train", "eval") and record.get("step", 0) <= step:
            out.append(record)
    return out


def start_tracking(cfg, *, rank: int, world_size: int, device, num_params: int, flops_per_token: float,
                   resume_step: int) -> Tracker | None:
    """The W&B run of this job on rank 0 (None elsewhere, when disabled, or when W&B fails to start).

    `resume_step` is the checkpoint step the run resumes from (0 for a fresh start)."""
    tracking = cfg.tracking
    mode = resolve_mode(tracking.wandb)
    if rank != 0 or mode == "disabled":
        return None
    run_dir = Path(cfg.run_dir)
    state = read_state(run_dir) if cfg.train.resume else {}
    if not state.get("id"):
        import secrets

        state = {"id": secrets.token_hex(4)}  # W&B ids: [a-z0-9], 8 characters are enough within a project
    parent = None
    try:
        import wandb

        held = offline_steps_held(run_dir, state["id"]) if mode == "offline" else {}
        parent = parent_run_id(cfg)
        config = redact(cfg.model_dump(mode="json"))
        config["system"] = system_facts(world_size, device)
        if parent:
            config["parent_run"] = parent
        run = wandb.init(
            project=tracking.project, entity=tracking.entity, group=tracking.group, job_type=tracking.job_type or
            ("finetune" if getattr(cfg, "finetune", None) else "pretrain"), tags=list(tracking.tags) or None,
            name=tracking.name or run_dir.resolve().name, notes=tracking.notes, id=state["id"], resume="allow",
            mode=mode, dir=str(run_dir), config=config,
            settings=wandb.Settings(silent=True, console="off", init_timeout=tracking.init_timeout_s),
        )
        write_state(run_dir, state)
        if mode == "online" and run.step > 0:  # a resumed online run: the server holds steps below run.step
            held = {"train": run.step - 1, "eval": run.step - 1}
        run.summary.update({"num_params": num_params, "flops_per_token": flops_per_token})
    except Exception as e:  # noqa: BLE001 - no W&B failure stops training
        log.warning("W&B did not start, training goes on without it (metrics.jsonl is written): %s: %s",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None
    tracker = Tracker(run, held)
    backfill = [r for r in records_up_to(run_dir, resume_step) if r["step"] > held.get(r["kind"], 0)]
    for record in backfill:  # what an earlier process logged but W&B never stored
        tracker.log(record)
    log.info("W&B run %s (%s, %s)%s%s", state["id"], mode, run_dir / "wandb", f", parent run {parent}" if parent else "",
             f", {len(backfill)} record(s) W&B had lost logged again" if backfill else "")
    return tracker


def finish_tracking(tracker: Tracker | None, cfg, *, checkpoint: Path | None, hf_dir: Path | None) -> None:
    """End the run's W&B run; with `tracking.artifacts`, the final checkpoint and HF export first, by reference."""
    if tracker is None:
        return
    if cfg.tracking.artifacts:
        name = Path(cfg.run_dir).resolve().name
        if checkpoint is not None:
            tracker.log_reference(checkpoint, f"{name}-checkpoint", "checkpoint")
        if hf_dir is not None:
            tracker.log_reference(hf_dir, f"{name}-hf", "model")
    tracker.close()


def log_scaling_report(sweep: dict, rows: list[dict], summary: dict, paths: list[Path], *, mode: str, run_dir: Path) -> None:
    """A sweep's fit as one W&B run of its group: the runs as a table, the figures as images, the law in the summary."""
    mode = resolve_mode(mode)
    if mode == "disabled":
        return
    try:
        import wandb

        run = wandb.init(project="ember", group=sweep["name"], job_type="scaling-report", name=f"{sweep['name']}-report",
                         mode=mode, dir=str(run_dir), config={"sweep": sweep["name"], "num_runs": len(rows)},
                         settings=wandb.Settings(silent=True, console="off", init_timeout=60))
        columns = ["name", "params", "tokens", "flops", "loss"]
        table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])
        run.log({"runs": table, **{f"figures/{p.stem}": wandb.Image(str(p)) for p in paths if p.suffix == ".png"}})
        run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        run.finish()
    except Exception as e:  # noqa: BLE001 - the report is on disk already
        log.warning("W&B logging of the scaling report failed (the report is on disk): %s: %s", type(e).__name__, e)
