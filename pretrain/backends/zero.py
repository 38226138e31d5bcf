"""DeepSpeed ZeRO stage 1/2/3, driven directly: ember's recipe translated into a DeepSpeed config.

The loop owns what DeepSpeed would otherwise own: the learning rate (written into the client optimizer's
param groups every step), the accumulation boundary (given per micro batch) and the non-finite guard
(the global norm is measured before the update, so a bad step is dropped with weights and Adam state intact).
"""

from __future__ import annotations

import contextlib
import io
import math
import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from ember.errors import UserError
from ember.pretrain.backends.base import Backend, resolve_autocast_dtype
from ember.pretrain.backends.safe_load import weights_only_torch_load
from ember.pretrain.backends.builder import ModelBuilder, initialised_model, meta_model
from ember.pretrain.backends.parallelize import apply_model_techniques, broadcast_nonpersistent_buffers
from ember.pretrain.backends.single import build_local_model
from ember.pretrain.backends.zero_config import deepspeed_config
from ember.pretrain.distributed import DistEnv, ensure_process_group

CHECKPOINT_TAG = "zero"


def _init_deepspeed_comm(env: DistEnv) -> None:
    import importlib

    import deepspeed

    # The module itself: `deepspeed.comm.torch` as an attribute is the torch package re-exported by deepspeed.comm.
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    ensure_process_group(env)
    if env.device.type == "cpu":
        # On CPU DeepSpeed JIT-compiles a shared-memory all-reduce kernel at init (a minute and a C++ compiler on
        # a fresh machine) that only its inference all-reduce uses; training never does.
        ds_torch_comm.build_shm_op = lambda: None
    # DeepSpeed's comm layer wraps the existing torch process group.
    deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)


class DeepSpeedBackend(Backend):
    name = "deepspeed"

    def __init__(self, env: DistEnv, engine, module: nn.Module, optimizer: torch.optim.Optimizer,
                 autocast_dtype: torch.dtype | None, zero_stage: int):
        super().__init__(env, engine, module, optimizer, autocast_dtype)
        self.engine = engine
        self.zero_stage = zero_stage

    @property
    def zero_optimizer(self):
        """DeepSpeed's ZeRO wrapper around the client optimizer (owns the flat fp32 partitions)."""
        return self.engine.optimizer

    def backward(self, loss: torch.Tensor, *, last_micro_batch: bool) -> None:
        # The boundary decides when ZeRO reduces (and partitions) gradients: only on the last micro batch.
        self.engine.set_gradient_accumulation_boundary(last_micro_batch)
        # The loop already divided the loss by the accumulation steps.
        self.engine.backward(loss, scale_wrt_gas=False)

    def clip_grad_norm(self, max_norm: float) -> float:
        """The global norm from ZeRO's reduced gradient partitions; DeepSpeed clips inside `step`."""
        opt = self.zero_optimizer
        if self.zero_stage == 3:
            from deepspeed.runtime.utils import combine_grad_norm_groups

            norm = combine_grad_norm_groups(opt._get_norm_groups())
        else:
            norm = opt.scaled_global_norm()
        value = float(norm) / float(opt.loss_scale)
        # DeepSpeed's norm helpers report a non-finite norm as -1.
        if value < 0 or not math.isfinite(value):
            value = float("nan")
        opt.clip_grad = max_norm
        return value

    def step(self) -> None:
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()

    def skip_step(self) -> None:
        """Drop the reduced gradients the way ZeRO itself does after an overflow, without an update."""
        opt = self.zero_optimizer
        if self.zero_stage == 3:
            opt._pre_step()
            opt._partition_all_parameters()
            opt._overflow_clean_up(opt.loss_scale)
            opt.invalidate_secondary_tensor()
        else:
            opt.micro_step_id = -1  # INITIAL_MICRO_STEP_ID, as step() resets it
            opt.zero_grad(set_to_none=True)
            opt._release_preflattened_grad_buffers()
            if opt.cpu_offload:
                opt.reset_cpu_buffers()
            else:
                for k in opt.averaged_gradients.keys():
                    opt.averaged_gradients[k] = None
                    opt.all_grad_tensors[k] = None
        self.engine.skipped_steps += 1

    def save(self, ckpt_dir: Path) -> None:
        self.engine.save_checkpoint(str(ckpt_dir), tag=CHECKPOINT_TAG)

    def load(self, ckpt_dir: Path) -> None:
        """Restore model and optimizer; a checkpoint from another world size goes through DeepSpeed's universal
        checkpoint format (converted once, into the checkpoint's `universal` folder, then loaded from there)."""
        tag_dir = Path(ckpt_dir) / CHECKPOINT_TAG
        if not tag_dir.is_dir():
            raise UserError(f"no DeepSpeed checkpoint (folder {CHECKPOINT_TAG!r}) in {ckpt_dir}", str(ckpt_dir))
        num_saved_ranks = len(list(tag_dir.glob("*optim_states.pt")))
        load_dir = Path(ckpt_dir)
        if num_saved_ranks != self.world_size:
            load_dir = self._universal_copy(Path(ckpt_dir))
            self.engine._config.load_universal_checkpoint = True
        # The universal loader gives every param group the first group's hyperparameters (weight decay included);
        # ember's groups differ, so they are put back after the load.
        groups = self.zero_optimizer.optimizer.param_groups
        hyperparameters = [{k: v for k, v in group.items() if k != "params"} for group in groups]
        try:
            with weights_only_torch_load(ckpt_dir):
                path, _ = self.engine.load_checkpoint(str(load_dir), tag=CHECKPOINT_TAG, load_optimizer_states=True,
                                                      load_lr_scheduler_states=False, load_module_strict=True)
        finally:
            self.engine._config.load_universal_checkpoint = False
        for group, saved in zip(groups, hyperparameters):
            group.update(saved)
        if load_dir != Path(ckpt_dir):
            # The universal loader gives every sub-group the same `step` tensor, which the fused AdamW increments in
            # place, once per sub-group: each needs its own.
            state = self.zero_optimizer.optimizer.state
            for values in state.values():
                if torch.is_tensor(values.get("step")):
                    values["step"] = values["step"].clone()
        if path is None:
            raise UserError(f"DeepSpeed could not load the checkpoint in {ckpt_dir}", str(ckpt_dir))

    def _universal_copy(self, ckpt_dir: Path) -> Path:
        """`ckpt_dir` converted to a universal checkpoint in `ckpt_dir/universal` (rank 0 converts, once; any
        world size loads it, and it goes when the checkpoint is pruned)."""
        import argparse

        from deepspeed.checkpoint import ds_to_universal

        out = ckpt_dir / "universal"
        if self.rank == 0 and not (out / "latest_universal").is_file():
            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            # inject_missing_state: ZeRO-1/2 checkpoints lack the universal-info marker that only tensor/pipeline
            # parallel models need to fill in; ember's models have none, so the bare marker is right.
            args = argparse.Namespace(input_folder=str(ckpt_dir / CHECKPOINT_TAG), output_folder=str(tmp / CHECKPOINT_TAG),
                                      num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                                      inject_missing_state=True)
            try:
                with weights_only_torch_load(ckpt_dir), contextlib.redirect_stdout(io.StringIO()):
                    ds_to_universal.main(args)
            except (AssertionError, RuntimeError, ValueError, KeyError, NotImplementedError) as e:
                raise UserError(f"cannot convert this DeepSpeed checkpoint to resume it on {self.world_size} rank(s): "
                                f"{e}", str(ckpt_dir)) from None
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
        self.barrier()
        return out

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """fp32 master weights, gathered from the ZeRO partitions (collective on every rank)."""
        from deepspeed.utils import safe_get_full_fp32_param

        import deepspeed

        full_by_id: dict[int, torch.Tensor] = {}
        for _, param in self.module.named_parameters():
            full = safe_get_full_fp32_param(param) if param.requires_grad else None
            if full is None:  # frozen (fine-tuning): no fp32 master, the parameter itself is the weight
                with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
                    full = param.detach().clone()
            if self.rank == 0:
                full_by_id[id(param)] = full.detach().to("cpu", torch.float32).clone()
        if self.rank != 0:
            return None
        out = {}
        for name, tensor in self.module.state_dict(keep_vars=True).items():
            # Tied weights appear under two names but are one parameter.
            out[name] = full_by_id[id(tensor)] if id(tensor) in full_by_id else tensor.detach().to("cpu", torch.float32).clone()
        return out


def share_master_partitions(zero_optimizer) -> None:
    """ZeRO-3 in fp32: make each rank's parameter partition *be* its fp32 master partition.

    DeepSpeed means to alias the two when dtype and device agree (stage3 `_create_fp32_partitions`), but compares
    a torch.device with a device-name string, which is never equal; every rank would then hold a second fp32 copy
    of its parameter shard. The optimizer updates the master in place, so the partitions stay current.
    """
    low_flats = zero_optimizer.fp16_partitioned_groups_flat
    masters = zero_optimizer.fp32_partitioned_groups_flat
    for i, master in enumerate(masters):
        low = low_flats[i]
        if low is None or low is master or low.dtype != master.dtype or low.device != master.device or low.shape != master.shape:
            return
        low_flats[i] = master
        # Point every parameter's partition (ds_tensor) into the master flat buffer.
        zero_optimizer._unflatten_partitioned_parameters(i)
    # The contiguous buffer the partitions were cut from is no longer referenced by any parameter.
    zero_optimizer.lp_param_buffer = torch.empty(0, dtype=masters[0].dtype, device=masters[0].device)


def build_partitioned_model(builder: ModelBuilder, cfg, ds_config: dict, env: DistEnv) -> nn.Module:
    """ZeRO-3: every parameter is partitioned as it is created, so no rank ever holds the full model on its
    device; rank 0's full CPU init then fills the partitions one parameter at a time."""
    import deepspeed

    # No `dtype=` to zero.Init: it ignores a given dtype off-GPU (operator precedence) and would pick bf16;
    # without one it takes it from the config (bf16 when enabled, else fp32).
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = builder.build()
    apply_model_techniques(model, cfg.train, env.device)
    reference = initialised_model(builder, torch.device("cpu")) if env.rank == 0 else None
    ref_params = dict(reference.named_parameters()) if reference is not None else {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            # Gathered whole on every rank for a moment; rank 0's values are scattered back on exit.
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if env.rank == 0:
                    param.copy_(ref_params[name])
    broadcast_nonpersistent_buffers(model, reference)
    return model


@contextlib.contextmanager
def full_shapes_visible(module: nn.Module):
    """Let code that reads parameter shapes (decay / no-decay grouping by `ndim`) see ZeRO-3 parameters whole.

    Outside forward/backward a partitioned parameter holds an empty placeholder; for the duration it holds a
    one-element tensor expanded to the full shape (`ds_shape`), so nothing is gathered or allocated.
    """
    placeholders = []
    for param in module.parameters():
        full_shape = getattr(param, "ds_shape", None)
        if full_shape is not None and param.shape != full_shape:
            placeholders.append((param, param.data))
            param.data = torch.empty(1, dtype=param.dtype, device=param.device).expand(full_shape)
    try:
        yield
    finally:
        for param, placeholder in placeholders:
            param.data = placeholder


def build_deepspeed(cfg, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], env: DistEnv,
                    builder: ModelBuilder) -> DeepSpeedBackend:
    import deepspeed

    _init_deepspeed_comm(env)
    num_params = sum(p.numel() for p in meta_model(builder).parameters())
    ds_config = deepspeed_config(cfg, env.world_size, env.device, num_params)
    if cfg.train.zero_stage == 3:
        module = build_partitioned_model(builder, cfg, ds_config, env)
    else:
        # Stages 1 and 2 keep whole weights on every rank anyway: each builds the single-process weights
        # (deterministic init, no broadcast needed).
        module = build_local_model(builder, cfg, env.device)
    with full_shapes_visible(module):
        optimizer = make_optimizer(module)
    num_groups = len(optimizer.param_groups)
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config,
                                                      dist_init_required=False)
    if cfg.train.zero_stage == 3 and not cfg.train.cpu_offload:
        share_master_partitions(ds_optimizer)
    inner = getattr(ds_optimizer, "optimizer", ds_optimizer)
    if inner is not optimizer or len(inner.param_groups) != num_groups:
        raise RuntimeError(f"DeepSpeed replaced the client optimizer ({type(inner).__name__}) or its param groups")
    autocast = None if ds_config.get("bf16", {}).get("enabled") else resolve_autocast_dtype(cfg.train.precision, env.device)
    return DeepSpeedBackend(env, engine, module, optimizer, autocast, cfg.train.zero_stage)


def load_full_weights_zero(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """Offline: consolidate the fp32 master weights of a ZeRO checkpoint (any stage) in this process."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with weights_only_torch_load(ckpt_dir):
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=CHECKPOINT_TAG)
    return {name: t.to(torch.float32) for name, t in state.items()}
