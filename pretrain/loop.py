"""The training loop: one loop for every backend, and for fine-tuning.

Per step: take the global batch's local slice, set the learning rate, forward/backward
the micro-batches, clip, then update or (non-finite loss/gradient) skip. Metrics,
evaluation and checkpoints are explicit calls at their cadence, not hooks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

from ember.errors import UserError
from ember.pretrain.config import TrainConfig
from ember.pretrain.schedule import lr_at
from ember.pretrain.faults import Preempted, TrainingGuard, poisoned_steps
from ember.pretrain.step import CausalLMLoss, as_model_batch, train_step

log = logging.getLogger("ember.pretrain.loop")


@dataclass
class LoopState:
    """Counters that a checkpoint carries so a resumed run continues exactly."""

    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0
    tokens_by_source: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class NonFiniteStop(UserError):
    """Too many consecutive steps had a non-finite loss or gradient norm."""


def train(backend, cfg: TrainConfig, loader, state: LoopState, *, micro_batch_size: int, evaluate, checkpoints, metrics,
          loss=None, guard: TrainingGuard | None = None) -> LoopState:
    """Train from `state.step` to `max_steps` (or `stop_after_steps`); returns the final state.

    `loader` yields pretraining token batches or `step.ModelBatch`es; `loss` defaults to the causal-LM loss.
    `guard` (entered by the caller) carries the fault contract: after a stop signal on any rank, every rank
    saves the checkpoint of the same step and raises `Preempted`.
    """
    guard = guard or TrainingGuard(0, backend.rank)
    last_step = min(cfg.max_steps, cfg.stop_after_steps or cfg.max_steps)
    poisoned = poisoned_steps()
    batches = iter(loader)
    while state.step < last_step:
        step = state.step + 1
        guard.step_started(step)
        batch = next(batches)
        model_batch = as_model_batch(batch)
        lr = lr_at(step, cfg)
        for group in backend.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # lr_scale: a group's own rate (a fine-tuning head's)
        started = time.perf_counter()
        result = train_step(backend, model_batch, micro_batch_size=micro_batch_size, grad_clip=cfg.grad_clip,
                            loss=loss or CausalLMLoss(cfg.z_loss), poison=step in poisoned)
        if result.finite:
            backend.step()
            state.consecutive_nonfinite = 0
        else:
            backend.skip_step()
            state.skipped_steps += 1
            state.consecutive_nonfinite += 1
            log.warning("step %d: loss %s, grad norm %s: update skipped (%d in a row, %d in all)", step,
                        result.loss, result.grad_norm, state.consecutive_nonfinite, state.skipped_steps)
        state.step = step
        state.tokens_seen += model_batch.input_ids.numel() * backend.world_size  # every rank holds an equal slice
        for source, num in getattr(batch, "source_tokens", {}).items():
            state.tokens_by_source[source] = state.tokens_by_source.get(source, 0) + int(num)
        metrics.record_step(time.perf_counter() - started)
        if step % cfg.log_every == 0 or step == last_step:
            metrics.log_train(step, loss=result.loss, lr=lr, grad_norm=result.grad_norm, state=state, loader=loader)
        if state.consecutive_nonfinite >= cfg.max_nonfinite_steps:
            raise NonFiniteStop(f"{state.consecutive_nonfinite} consecutive steps had a non-finite loss or gradient norm; "
                                "training stopped (lower train.lr or train.grad_clip, or check the data)",
                                f"step {step}, train.max_nonfinite_steps={cfg.max_nonfinite_steps}")
        if step == cfg.max_steps or (cfg.eval_every and step % cfg.eval_every == 0):
            metrics.log_eval(step, evaluate())
        saved = step == last_step or bool(cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
        if saved:
            checkpoints.save(state, loader)
        if step < last_step and guard.stop_agreed(step, backend.device):
            if not saved:
                checkpoints.save(state, loader)
            checkpoints.wait()  # the exit code promises the checkpoint is on disk
            raise Preempted(step, guard.signal_name)
    return state
