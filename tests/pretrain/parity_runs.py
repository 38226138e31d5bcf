"""Runs of `ember pretrain` shared by the parity and resharding tests, each run once per session.

Every run is the same 6-step job (global batch 8 x 32 tokens, fp32, the fused loss and the CPU kernels as
configured, a checkpoint every 2 steps) on some backend, world size and micro-batch split. A run may continue a
copy of another run's directory from one of its checkpoints, possibly on another world size: that is resharding.
Each run goes through the command's own code (load_config, then ember.pretrain.run.pretrain: config checks, run
directory, kernels, data, backend, loop, checkpoints, export), several to a launch (`pretrain_jobs.py`); what
it did is read back as a user would: `metrics.jsonl` (every step's loss and pre-clip gradient norm) and the
Hugging Face export (the final weights).
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ember_cli import run_script
from pretrain_runs import records, write_config

STEPS = 6
GLOBAL_BATCH = 8
CHECKPOINT_EVERY = 2
REL_TOL = 1e-4
BACKENDS = {
    "single": ("train.backend=single",),
    "ddp": ("train.backend=ddp",),
    "fsdp": ("train.backend=fsdp",),
    "zero1": ("train.backend=deepspeed", "train.zero_stage=1"),
    "zero2": ("train.backend=deepspeed", "train.zero_stage=2"),
    "zero3": ("train.backend=deepspeed", "train.zero_stage=3"),
}

_root = Path(tempfile.mkdtemp(prefix="ember-parity-"))
atexit.register(shutil.rmtree, _root, ignore_errors=True)
_runs: dict[str, "Run"] = {}
JOBS_SCRIPT = Path(__file__).parent / "backend_scripts" / "pretrain_jobs.py"


@dataclass(frozen=True)
class Spec:
    """A run: `backend` on `world_size` ranks, per-rank micro-batches of `micro` sequences; with `after=(earlier,
    step)` it continues a copy of run `earlier` from its step-`step` checkpoint."""

    backend: str
    world_size: int
    micro: int
    after: tuple["Spec", int] | None = None

    @property
    def name(self) -> str:
        return f"{self.backend}-w{self.world_size}-m{self.micro}" + (f"-after-{self.after[0].name}-at{self.after[1]}" if self.after else "")

    @property
    def depth(self) -> int:
        return self.after[0].depth + 1 if self.after else 0


@dataclass
class Run:
    """A finished run: {step: loss}, {step: pre-clip gradient norm}, final weights (HF names) from its export."""

    run_dir: Path | None
    losses: dict[int, float]
    grad_norms: dict[int, float]
    final_weights: dict[str, torch.Tensor] | None = None
    spec: Spec | None = None

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        if self.final_weights is None:
            self.final_weights = load_file(self.run_dir / "hf" / "model.safetensors")
        return self.final_weights


def micro_batch_size(world_size: int, num_micro: int) -> int:
    """Sequences per micro-batch so that each of `world_size` ranks runs `num_micro` micro-batches per step."""
    assert GLOBAL_BATCH % (world_size * num_micro) == 0
    return GLOBAL_BATCH // (world_size * num_micro)


PARALLEL_BACKENDS = ["ddp", "fsdp", "zero1", "zero2", "zero3"]
RESHARDED = ["fsdp", "zero1", "zero2", "zero3"]  # the backends whose checkpoints continue on another world size
MICRO_SPLITS = [1, 4]  # micro-batches per rank per step


def _plan() -> list[Spec]:
    """Every run the parity and resharding tests ask for. Runs of the same world size and resume depth start
    together in one launch: a tiny run costs mostly interpreter and torchrun start-up."""
    plan = [Spec("single", 1, micro_batch_size(1, k)) for k in MICRO_SPLITS]
    plan += [Spec(b, 2, micro_batch_size(2, k)) for b in PARALLEL_BACKENDS for k in MICRO_SPLITS]
    for b in RESHARDED:
        two = Spec(b, 2, micro_batch_size(2, 1))
        one = Spec(b, 1, micro_batch_size(2, 1), after=(two, 2))  # 2 -> 1 rank at step 2 (twice the accumulation)
        plan += [one, Spec(b, 2, micro_batch_size(2, 1), after=(one, 4)), Spec(b, 4, micro_batch_size(4, 1), after=(two, 2))]
    return plan


PLAN = _plan()


def config(dataset: Path) -> Path:
    path = _root / "run.yaml"
    if not path.is_file():
        write_config(path, dataset, _root / "unused", max_steps=STEPS, global_batch_size=GLOBAL_BATCH, log_every=1,
                     eval_every=0, checkpoint_every=CHECKPOINT_EVERY, keep_last=STEPS, precision="fp32")
    return path


def copy_at_step(source: Path, dest: Path, step: int) -> None:
    """`dest`: `source`'s run directory as it was when its step-`step` checkpoint was the newest (a run stopped there)."""
    shutil.copytree(source, dest)
    shutil.rmtree(dest / "hf")
    for ckpt in (dest / "checkpoints").glob("step_*"):
        if int(ckpt.name.split("_")[1].split(".")[0]) > step:
            shutil.rmtree(ckpt)
    (dest / "checkpoints" / "latest").write_text(f"step_{step:08d}\n")


def run(dataset: Path, backend: str, world_size: int, micro: int, *, after: tuple[Run, int] | None = None) -> Run:
    """`backend` on `world_size` ranks with per-rank micro-batches of `micro` sequences; with `after=(earlier, step)`
    it continues a copy of run `earlier` from its step-`step` checkpoint. Cached per session."""
    return _finished(dataset, Spec(backend, world_size, micro, (after[0].spec, after[1]) if after else None))


def _finished(dataset: Path, spec: Spec) -> Run:
    """`spec`'s run; the first request of one in PLAN also runs the rest of its launch."""
    if spec.name not in _runs:
        batch = [s for s in PLAN if (s.world_size, s.depth) == (spec.world_size, spec.depth) and s.name not in _runs]
        _launch(dataset, batch if spec in batch else [spec])
    return _runs[spec.name]


def _launch(dataset: Path, specs: list[Spec]) -> None:
    """Run `specs` (one world size) one after another in one launch of `pretrain_jobs.py`: `ember pretrain`'s code
    path, one rank as a plain process as a user would, more under torchrun."""
    jobs = []
    for spec in specs:
        run_dir = _root / spec.name
        if spec.after:
            copy_at_step(_finished(dataset, spec.after[0]).run_dir, run_dir, spec.after[1])
        sets = [f"run_dir={run_dir}", f"train.micro_batch_size={spec.micro}", *BACKENDS[spec.backend]]
        jobs.append({"config": str(config(dataset)), "sets": sets})
    jobs_file = _root / f"jobs-{specs[0].name}.json"
    jobs_file.write_text(json.dumps(jobs))
    proc = run_script(JOBS_SCRIPT, str(jobs_file), nproc=specs[0].world_size)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for spec in specs:
        run_dir = _root / spec.name
        if spec.after:
            step = spec.after[1]
            assert f"resumed from {run_dir / 'checkpoints' / f'step_{step:08d}'}" in proc.stderr, proc.stderr[-2000:]
        train = records(run_dir, "train")
        assert [r["step"] for r in train] == list(range(1, STEPS + 1)), spec.name
        _runs[spec.name] = Run(run_dir, {r["step"]: r["loss"] for r in train}, {r["step"]: r["grad_norm"] for r in train},
                               spec=spec)


def relative_difference(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||: one number per tensor, blind to elements that are zero in both."""
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))


def assert_same_training(got: Run, want: Run, steps, what: str, *, weights: bool = True) -> None:
    """Every step's loss and pre-clip gradient norm in `steps`, and the final weights, within REL_TOL of `want`."""
    for step in steps:
        for metric, a, b in (("loss", got.losses, want.losses), ("grad norm", got.grad_norms, want.grad_norms)):
            assert abs(a[step] - b[step]) <= REL_TOL * abs(b[step]), f"{what}: step {step} {metric} {a[step]} vs {b[step]}"
    if weights:
        assert_same_weights(got.weights, want.weights, what)


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == want.keys(), what
    worst = max(want, key=lambda k: relative_difference(got[k], want[k]))
    assert relative_difference(got[worst], want[worst]) <= REL_TOL, (
        f"{what}: final {worst} differs by {relative_difference(got[worst], want[worst]):.2e} (relative norm)")


def plain_pytorch_run(dataset: Path) -> Run:
    """The same job as a textbook loop in this process: the HF model as built (no fused loss, no oneDNN kernels),
    the whole global batch in one forward, mean cross-entropy, backward, clip, AdamW. The reference that ember's
    own step must reproduce: a gradient scaled by a constant (a wrong 1/accumulation) shows in its norm."""
    from ember.config import read_yaml, validate
    from ember.data.loader import build_loader
    from ember.pretrain.model import build_meta_model, init_weights
    from ember.pretrain.optim import build_optimizer
    from ember.pretrain.schedule import lr_at
    from ember.run_config import RunConfig

    cfg = validate(read_yaml(config(dataset)), RunConfig)
    t = cfg.train
    model = build_meta_model(cfg.model)
    model.to_empty(device="cpu")
    init_weights(model, cfg.model, cfg.seed)
    optimizer = build_optimizer(model, t)
    loader = build_loader([dataset], [1.0], split="train", seq_len=t.seq_len, global_batch_size=GLOBAL_BATCH, rank=0,
                          world_size=1, seed=cfg.seed)
    losses, grad_norms = {}, {}
    for step, batch in zip(range(1, STEPS + 1), loader):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, t)
        inputs, labels = batch.tokens[:, :-1], batch.tokens[:, 1:]  # (global_batch, seq_len) each
        logits = model(input_ids=inputs).logits  # (global_batch, seq_len, vocab)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        loss.backward()
        grad_norms[step] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip))
        losses[step] = loss.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return Run(None, losses, grad_norms, {k: v.detach().clone() for k, v in model.state_dict().items()})
