"""`pretrain(cfg)`: a whole pretraining run, from the resolved config to the HF export.

setup (run dir, config.yaml, logs, seed, data, backend) -> resume -> loop -> export -> summary.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ember.config import to_yaml
from ember.errors import UserError
from ember.logs import add_log_file
from ember.pretrain import distributed, memory, run_lock
from ember.pretrain.checkpoint import CheckpointManager, check_resumable_shape, config_hash
from ember.pretrain.kernels import decide_kernels
from ember.pretrain.faults import Preempted, TrainingGuard
from ember.pretrain.loop import LoopState, train
from ember.pretrain.metrics import Metrics
from ember.pretrain.optim import build_optimizer
from ember.pretrain.step import evaluate
from ember.pretrain.tracking import finish_tracking, start_tracking

log = logging.getLogger("ember.pretrain.run")


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class RunData:
    """The run's prepared datasets: where they are, their manifests, and loaders over them."""

    cfg: object
    dirs: list[Path]
    manifests: list

    @property
    def weights(self) -> list[float]:
        return [entry.weight for entry in self.cfg.data.datasets]

    @property
    def has_val(self) -> bool:
        return all(m.num_tokens("val") > self.cfg.train.seq_len for m in self.manifests)

    @property
    def token_ids(self) -> dict[str, int]:
        """bos/eos/pad ids for the HF export; these tokenizers have no bos: documents are separated by eos."""
        eos, pad = self.manifests[0].eos_id, self.manifests[0].pad_id
        return {"eos_token_id": eos, "bos_token_id": eos, "pad_token_id": eos if pad is None else pad}

    def loader(self, split: str, global_batch_size: int, backend, num_workers: int = 0):
        from ember.data.loader import build_loader

        return build_loader(self.dirs, self.weights, split=split, seq_len=self.cfg.train.seq_len, global_batch_size=global_batch_size,
                            rank=backend.rank, world_size=backend.world_size, seed=self.cfg.seed, num_workers=num_workers)


def dataset_dir(entry) -> Path:
    """Where a mixture entry's dataset is (or will be): its `path`, else the `output_dir` of its `prepare` config."""
    from ember.config import load_config
    from ember.data.config import PrepareConfig

    if entry.path is not None:
        return Path(entry.path)
    return Path(load_config(entry.prepare, PrepareConfig, kind="data").output_dir)


def prepare_data(cfg, world_size: int) -> RunData:
    """The mixture's datasets, vocabularies checked. A run alone prepares what is missing first; a worker of a
    distributed job never does (its peers would wait on it): `ember launch` prepares before any worker starts,
    and every worker that finds a dataset missing stops at once with a line saying how to prepare it."""
    from ember.data.manifest import MANIFEST, read_manifest
    from ember.data.prepare import ensure_prepared

    if world_size == 1:
        dirs = [ensure_prepared(entry) for entry in cfg.data.datasets]
    else:
        dirs = [dataset_dir(entry) for entry in cfg.data.datasets]
        for entry, d in zip(cfg.data.datasets, dirs):
            if not (d / MANIFEST).is_file():
                how = f"`ember data prepare {entry.prepare} --set output_dir={d}`" if entry.prepare else "`ember data prepare`"
                raise UserError(f"no prepared dataset here, and workers do not prepare data: run {how} first, "
                                "or start the job with `ember launch`, which prepares it before the workers start", str(d))
    manifests = [read_manifest(d) for d in dirs]
    largest = max(m.vocab_size for m in manifests)
    if cfg.model.vocab_size < largest:
        raise UserError(f"model.vocab_size {cfg.model.vocab_size} is smaller than the dataset vocabulary ({largest} tokens)",
                        "model.vocab_size")
    return RunData(cfg, dirs, manifests)


def setup_run_dir(cfg, rank: int) -> str:
    """Create run_dir, log this rank there, save the resolved config (rank 0); returns the config YAML."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    add_log_file(run_dir)
    config_yaml = to_yaml(cfg)
    if rank == 0:
        write_atomically(run_dir / "config.yaml", config_yaml)
    return config_yaml


def build_metrics(cfg, backend, tokens_per_step: int, resume_step: int) -> Metrics:
    from ember.pretrain.accounting import count_params, flops_per_token
    from ember.pretrain.peak import device_peak_flops

    dtype = backend.autocast_dtype or torch.float32
    per_token = flops_per_token(cfg.model, cfg.train.seq_len)
    tracker = start_tracking(cfg, rank=backend.rank, world_size=backend.world_size, device=backend.device,
                             num_params=count_params(cfg.model)["total"], flops_per_token=per_token, resume_step=resume_step)
    return Metrics(cfg.run_dir, rank=backend.rank, world_size=backend.world_size, device=backend.device,
                   max_steps=cfg.train.max_steps, tokens_per_step=tokens_per_step, flops_per_token=per_token,
                   peak_flops=device_peak_flops(backend.device, dtype), resume_step=resume_step, tracker=tracker)


def resume(checkpoints: CheckpointManager, loader, enabled: bool) -> LoopState:
    """The loop state of the newest valid checkpoint (weights, optimizer, RNG and loader restored), or a fresh one."""
    newest = checkpoints.newest_valid() if enabled else None
    if newest is None:
        return LoopState()
    saved = checkpoints.load(newest)
    loader.load_state_dict(saved["loader"])
    return LoopState(**{k: saved[k] for k in LoopState().to_dict()})


def export_final(cfg, backend, data: RunData) -> Path | None:
    """Write run_dir/hf from the live weights (collective); its path on rank 0."""
    from ember.pretrain.export import write_hf_export

    full = backend.full_state_dict()
    out = None
    if backend.rank == 0:
        out = write_hf_export(full, cfg.model, Path(cfg.run_dir) / "hf", tokenizer_dir=data.manifests[0].tokenizer_dir,
                              token_ids=data.token_ids)
    backend.barrier()
    return out


def pretrain(cfg) -> dict:
    """Train `cfg` (a RunConfig) to `train.max_steps` (resuming when run_dir holds checkpoints); returns the summary."""
    from ember.pretrain.backends import build_backend

    started, t = time.time(), cfg.train
    env = distributed.init_distributed(t.collective_timeout_s)
    num_micro = t.accumulation_steps(env.world_size)  # before anything is written: a bad batch is a user error
    global_batch = t.global_batch_sequences(env.world_size)
    if t.resume:
        check_resumable_shape(cfg.run_dir, cfg.model)
    lock = run_lock.hold(cfg.run_dir) if env.rank == 0 else None  # noqa: F841 (held until this process ends)
    config_yaml = setup_run_dir(cfg, env.rank)
    kernels = decide_kernels(t, env.device, cfg.run_dir)  # rank 0's choice, or the checkpoint's on resume
    seed_everything(cfg.seed)
    data = prepare_data(cfg, env.world_size)
    if not data.has_val:
        log.warning("a dataset has no validation split (prepared with val_fraction 0): no evaluation")

    backend = build_backend(kernels.apply(cfg), lambda model: build_optimizer(model, t))
    succeeded = False
    try:
        checkpoints = CheckpointManager(cfg.run_dir, backend, keep_last=t.keep_last, config_yaml=config_yaml, config_digest=config_hash(cfg),
                                        tokenizer_dir=data.manifests[0].tokenizer_dir, token_ids=data.token_ids,
                                        async_save=t.async_checkpoint, kernels=kernels.to_dict())
        loader = data.loader("train", global_batch, backend, cfg.data.num_workers)
        state = resume(checkpoints, loader, t.resume)
        start_step = state.step
        metrics = build_metrics(cfg, backend, global_batch * t.seq_len, resume_step=start_step)

        def run_eval() -> float | None:
            # A fresh loader each time: every evaluation reads the same validation batches.
            if not data.has_val:
                return None
            return evaluate(backend, data.loader("val", global_batch, backend), t.eval_batches, t.micro_batch_size)

        log.info("training %s to step %d on %d rank(s) (%s): global batch %d x %d tokens, %d micro-batch(es) of %d per rank",
                 cfg.model.arch, t.max_steps, backend.world_size, t.backend, global_batch, t.seq_len, num_micro, t.micro_batch_size)
        train_started = time.time()
        with TrainingGuard(t.hang_timeout_s, backend.rank) as guard, memory.held_maxima(backend) as held_bytes:
            state = train(backend, t, loader, state, micro_batch_size=t.micro_batch_size, evaluate=run_eval,
                          checkpoints=checkpoints, metrics=metrics, guard=guard)
        train_seconds = time.time() - train_started
        log.info("memory held by this rank, most at any micro-batch boundary: %s",
                 ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in held_bytes.items()))
        finished = state.step >= t.max_steps
        hf_dir = export_final(cfg, backend, data) if finished and t.export_hf else None
        succeeded = True
    except Preempted:
        succeeded = True  # every rank stopped after the same step: they can close together
        raise
    finally:
        backend.close(all_ranks_done=succeeded)
    summary = {"step": state.step, "finished": finished, "resumed_from": start_step, "loss": metrics.last_train.get("loss"),
               "val_loss": metrics.last_eval.get("val_loss"), "tokens_seen": state.tokens_seen, "skipped_steps": state.skipped_steps,
               "train_seconds": train_seconds, "wall_seconds": time.time() - started, "hf_dir": str(hf_dir) if hf_dir else None,
               "run_dir": str(cfg.run_dir), "memory_bytes": held_bytes, **kernels.to_dict()}
    metrics.log_summary(summary)
    finish_tracking(metrics.tracker, cfg, checkpoint=checkpoints.newest(), hf_dir=hf_dir)
    val = f", val loss {summary['val_loss']:.4f}" if summary["val_loss"] is not None else ""
    log.info("%s at step %d/%d%s: %d tokens seen, %d step(s) skipped, %.1f s; run dir %s", "finished" if finished else "stopped",
             state.step, t.max_steps, val, state.tokens_seen, state.skipped_steps, train_seconds, cfg.run_dir)
    return summary
