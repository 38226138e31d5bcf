"""Learning-rate schedules: linear warmup, then cosine, linear or warmup-stable-decay (WSD).

`lr_at` is a pure function of the step, so a resumed run needs no scheduler state: the
step counter in the checkpoint is enough to continue on exactly the same curve.
"""

from __future__ import annotations

import math

from ember.pretrain.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimiser step `step` (1-based: the first update is step 1).

    Warmup rises linearly to `lr` at step `warmup_steps`; the decay then ends exactly at
    `lr * min_lr_ratio` on step `max_steps` and stays there after it.
    """
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step <= cfg.warmup_steps:
        return peak * step / cfg.warmup_steps
    if cfg.schedule == "wsd":
        # Stable at the peak, then a linear decay over the last `decay_fraction` of the run.
        decay_start = max(cfg.warmup_steps, cfg.max_steps - round(cfg.decay_fraction * cfg.max_steps))
        if step <= decay_start:
            return peak
        progress = min(1.0, (step - decay_start) / (cfg.max_steps - decay_start))
        return peak - (peak - floor) * progress
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    if cfg.schedule == "cosine":
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak - (peak - floor) * progress  # linear
