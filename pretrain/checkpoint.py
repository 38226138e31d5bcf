"""Checkpoints: backend payload + trainer_state.json + per-rank RNG states, written atomically.

Layout of `run_dir/checkpoints/`:
    step_00000010/            backend payload (DCP shards or DeepSpeed's files), written by every rank
        trainer_state.json    loop counters, loader state, config hash; written last, marks completeness
        rng/rank{R}.pt        RNG states of rank R (tensors, ints and tuples only: loaded with weights_only)
        config.yaml           the resolved run config (what `ember export` builds the model from)
        tokenizer/            the dataset's tokenizer files, so the checkpoint exports on its own
        manifest.json         size and sha256 of every file above; written last, it commits the checkpoint
    latest                    text file: name of the newest checkpoint
A checkpoint is written as `step_XXXXXXXX.tmp` and renamed when complete, so a killed run
never leaves a half-written directory under a valid name. Resuming checks the newest checkpoint
against its manifest (sizes and checksums); one that fails (a truncated or altered file, a disk
that lost a write) is skipped with a warning naming the file, and the previous one is used.
With `train.async_checkpoint` the backend
payload is written in the background while training goes on; the rename (and `latest`, and pruning)
waits until it is on disk: at the next save, before the final export, or when the backend closes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ember.errors import UserError
from ember.pretrain import distributed

log = logging.getLogger("ember.pretrain.checkpoint")

NAME = re.compile(r"^step_(\d{8})$")
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
# Fields that may change between a run and its resumption without changing the training itself.
RESUMABLE_CHANGES = {"run_dir", "tracking", "launch", "finetune"}
TRAIN_RESUMABLE_CHANGES = {"backend", "zero_stage", "micro_batch_size", "eval_every", "eval_batches", "log_every",
                           "checkpoint_every", "keep_last", "stop_after_steps", "resume", "export_hf", "cpu_offload",
                           "activation_checkpointing", "ac_every", "compile", "deepspeed", "max_nonfinite_steps",
                           "async_checkpoint", "hang_timeout_s", "collective_timeout_s"}


# Model fields that fix the parameters' shapes: a checkpoint loads only into the model it was trained as.
SHAPE_FIELDS = ("arch", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size", "vocab_size",
                "tie_embeddings", "hf_overrides")


def check_resumable_shape(run_dir: Path, model_cfg) -> None:
    """One clear error, on every rank and before anything is written, when the newest checkpoint in `run_dir` was
    trained with another model shape (else the weights would fail to load deep inside the backend)."""
    from ember.config import read_yaml

    found = find_checkpoints(Path(run_dir) / "checkpoints")
    if not found or not (found[-1] / "config.yaml").is_file():
        return
    saved = read_yaml(found[-1] / "config.yaml").get("model")
    current = model_cfg.model_dump(mode="json")
    for name in SHAPE_FIELDS:
        if isinstance(saved, dict) and name in saved and saved[name] != current[name]:
            raise UserError(f"model.{name} is {current[name]!r} but the checkpoint was trained with {saved[name]!r}; "
                            "a run resumes only with its own model shape (use a new run_dir, or train.resume=false)",
                            str(found[-1]))


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def config_hash(cfg) -> str:
    """Hash of the parts of the run config that define the training trajectory."""
    data = cfg.model_dump(mode="json")
    for key in RESUMABLE_CHANGES:
        data.pop(key, None)
    data["data"].pop("num_workers", None)
    data["train"] = {k: v for k, v in data["train"].items() if k not in TRAIN_RESUMABLE_CHANGES}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def read_trainer_state(ckpt_dir: Path) -> dict | None:
    """The trainer state of a complete checkpoint, None when missing or unreadable."""
    try:
        state = json.loads((Path(ckpt_dir) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("step"), int) else None


def find_checkpoints(root: Path) -> list[Path]:
    """Committed checkpoints under `root` (trainer state and manifest present), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and NAME.match(p.name) and (p / MANIFEST_FILE).is_file()
             and read_trainer_state(p) is not None]
    return sorted(found, key=lambda p: p.name)


# ---------------------------------------------------------------- manifest: sizes and checksums


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(ckpt_dir: Path) -> None:
    """Record the size and sha256 of every file of `ckpt_dir`, then the manifest itself (tmp name, rename)."""
    files = sorted(p for p in ckpt_dir.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    entries = {str(p.relative_to(ckpt_dir)): {"size": p.stat().st_size, "sha256": sha256_of(p)} for p in files}
    tmp = ckpt_dir / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps({"files": entries}, indent=1))
    tmp.replace(ckpt_dir / MANIFEST_FILE)


def manifest_problem(ckpt_dir: Path) -> str | None:
    """What is wrong with `ckpt_dir` against its manifest (naming the file), None when every file checks out."""
    try:
        entries = json.loads((ckpt_dir / MANIFEST_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{ckpt_dir / MANIFEST_FILE} is missing or unreadable"
    for name, entry in entries.items():  # sizes first: a truncated file is found without reading the others
        path = ckpt_dir / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != entry["size"]:
            return f"{path} has {path.stat().st_size} bytes, the manifest says {entry['size']}"
    for name, entry in entries.items():
        if sha256_of(ckpt_dir / name) != entry["sha256"]:
            return f"{ckpt_dir / name} does not match its checksum in the manifest"
    return None


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory, or the newest one of a run directory or `checkpoints/` folder; UserError otherwise."""
    path = Path(path)
    if read_trainer_state(path) is not None:
        return path
    for root in (path / "checkpoints", path):
        found = find_checkpoints(root)
        if found:
            return found[-1]
    raise UserError("no complete checkpoint (a step_XXXXXXXX directory with trainer_state.json) found", str(path))


# ---------------------------------------------------------------- RNG states


def rng_state() -> dict:
    keys, pos, has_gauss, gauss = np.random.get_state()[1:]
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- the manager


class CheckpointManager:
    """Saves and restores checkpoints of one run; every method is collective (all ranks call it).

    `async_save` (`train.async_checkpoint`): write in the background. It needs a backend with `begin_save`
    (single/ddp/fsdp); the config refuses it with deepspeed.
    """

    def __init__(self, run_dir: Path, backend, *, keep_last: int, config_yaml: str, config_digest: str,
                 tokenizer_dir: Path | None = None, token_ids: dict[str, int] | None = None, async_save: bool = False,
                 kernels: dict | None = None):
        self.root = Path(run_dir) / "checkpoints"
        self.kernels = kernels  # the run's precision and CPU GEMM (pretrain/kernels.py), kept by a resume
        self.backend, self.keep_last = backend, keep_last
        self.config_yaml, self.config_digest = config_yaml, config_digest
        self.tokenizer_dir, self.token_ids = tokenizer_dir, token_ids or {}
        self.async_save = async_save and hasattr(backend, "begin_save")
        if backend.rank == 0 and self.root.is_dir():  # left by a run killed while saving: never valid
            for stale in self.root.glob("step_*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)

    def newest(self) -> Path | None:
        """The newest checkpoint (no verification)."""
        found = find_checkpoints(self.root)
        return found[-1] if found else None

    def newest_valid(self) -> Path | None:
        """The newest checkpoint that matches its manifest; damaged newer ones are skipped with a warning.

        Collective: rank 0 reads and checks the files, every rank gets its choice.
        """
        chosen = None
        if self.backend.rank == 0:
            for ckpt in reversed(find_checkpoints(self.root)):
                problem = manifest_problem(ckpt)
                if problem is None:
                    chosen = str(ckpt)
                    break
                log.warning("checkpoint %s is damaged (%s): skipped, trying the previous one", ckpt.name, problem)
        chosen = distributed.broadcast_object(chosen)
        return Path(chosen) if chosen else None

    def save(self, state, loader) -> Path:
        """Write checkpoint `step_{state.step}`; returns its directory (visible once published, see the module doc)."""
        if self.async_save:
            self.backend.finish_save()  # the previous checkpoint is published before this one starts
        rank, final = self.backend.rank, self.root / checkpoint_name(state.step)
        tmp = final.with_name(final.name + ".tmp")
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
            (tmp / "rng").mkdir(parents=True)
        self.backend.barrier()
        if self.async_save:
            self.backend.begin_save(tmp, lambda all_ranks: self._publish_written(tmp, final, all_ranks))
        else:
            self.backend.save(tmp)
        torch.save(rng_state(), tmp / "rng" / f"rank{rank}.pt")
        self.backend.barrier()
        if rank == 0:
            self._write_state(tmp, state, loader.state_dict())
        if self.async_save:
            log.info("saving checkpoint %s in the background", final)
        else:
            self._publish_written(tmp, final, all_ranks=True)
        return final

    def wait(self) -> None:
        """Return once every checkpoint saved so far is on disk and published (collective)."""
        if self.async_save:
            self.backend.finish_save()

    def _write_state(self, tmp: Path, state, loader_state: dict) -> None:
        (tmp / "config.yaml").write_text(self.config_yaml)
        if self.tokenizer_dir is not None:
            shutil.copytree(self.tokenizer_dir, tmp / "tokenizer")
        trainer_state = {**state.to_dict(), "loader": loader_state, "world_size": self.backend.world_size,
                         "config_hash": self.config_digest, "token_ids": self.token_ids, "kernels": self.kernels}
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1))

    def _publish_written(self, tmp: Path, final: Path, all_ranks: bool) -> None:
        """Rename `tmp` to `final`, point `latest` at it, prune; the payload is complete on every rank.

        all_ranks False (error path of a background save): each rank alone, no collectives; rank 0 may
        publish because its DCP write returns only after every rank's shards and the metadata are written.
        """
        if self.backend.rank == 0:
            write_manifest(tmp)  # last: a checkpoint without one was never finished
            if final.exists():  # the same step saved again (a resumed run that had nothing left to do)
                shutil.rmtree(final)
            tmp.rename(final)
            pointer = self.root / "latest.tmp"
            pointer.write_text(final.name + "\n")
            pointer.replace(self.root / "latest")
            for old in find_checkpoints(self.root)[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        if all_ranks:
            self.backend.barrier()
        log.info("saved checkpoint %s", final)

    def load(self, ckpt_dir: Path) -> dict:
        """Restore model, optimizer and this rank's RNG states; returns the trainer state."""
        trainer_state = read_trainer_state(ckpt_dir)
        if trainer_state is None:
            raise UserError("not a complete checkpoint (no readable trainer_state.json)", str(ckpt_dir))
        if trainer_state.get("config_hash") != self.config_digest:
            log.warning("the config differs from the one %s was saved with; continuing with the new one", ckpt_dir)
        self.backend.load(ckpt_dir)
        rng_file = Path(ckpt_dir) / "rng" / f"rank{self.backend.rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))
        else:  # resuming on more ranks than were saved
            log.warning("no RNG state for rank %d in %s; keeping the seeded one", self.backend.rank, ckpt_dir)
        log.info("resumed from %s (step %d)", ckpt_dir, trainer_state["step"])
        return trainer_state
