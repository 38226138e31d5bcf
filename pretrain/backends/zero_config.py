"""ember's training recipe translated into a DeepSpeed config; the user's `train.deepspeed` keys go on top."""

from __future__ import annotations

import torch

from ember.config import deep_merge
from ember.pretrain.backends.base import resolve_autocast_dtype


# DeepSpeed's default bucket (5e8 elements, 2 GB in fp32) is allocated afresh for every reduction: on a small
# model most of each step would go to zeroing pages. Buckets are capped at the model's size instead.
MAX_BUCKET_ELEMENTS = 500_000_000
MIN_BUCKET_ELEMENTS = 1 << 20


def bucket_elements(num_params: int) -> int:
    return int(min(MAX_BUCKET_ELEMENTS, max(MIN_BUCKET_ELEMENTS, num_params)))


def deepspeed_config(cfg, world_size: int, device: torch.device, num_params: int) -> dict:
    """The DeepSpeed JSON for ember's TrainConfig, with `train.deepspeed` merged on top."""
    train = cfg.train
    num_accum = train.accumulation_steps(world_size)
    bucket = bucket_elements(num_params)
    zero: dict = {"stage": train.zero_stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    if train.zero_stage == 3:
        zero["stage3_prefetch_bucket_size"] = bucket
        # Parameters below this size stay whole on every rank (fewer tiny all-gathers). DeepSpeed's fixed 1e5
        # would keep *every* weight of a small model whole; scale it with the model instead.
        zero["stage3_param_persistence_threshold"] = min(100_000, num_params // 1000)
    config: dict = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": num_accum,
        "train_batch_size": train.micro_batch_size * num_accum * world_size,
        "zero_optimization": zero,
        "gradient_clipping": train.grad_clip,
        # The client optimizer is torch's AdamW (decay groups, fused kernel); DeepSpeed must keep it.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if train.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if train.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
        config["zero_force_ds_cpu_optimizer"] = False
    if device.type == "cuda" and resolve_autocast_dtype(train.precision, device) == torch.bfloat16:
        config["bf16"] = {"enabled": True}
    return deep_merge(config, train.deepspeed)
