"""Config sections of the pretraining engine: model shape, training recipe, tracking."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from ember.config import Section
from ember.errors import UserError


class ModelConfig(Section):
    """A transformer built with transformers' `AutoModelForCausalLM.from_config`."""

    arch: str = Field("llama", description="Hugging Face model_type: llama, gpt_neox, qwen2, mistral, mixtral, ...")
    hidden_size: int = Field(gt=0, description="width of the residual stream")
    num_layers: int = Field(gt=0, description="number of decoder blocks")
    num_heads: int = Field(gt=0, description="attention heads")
    num_kv_heads: int | None = Field(None, gt=0, description="key/value heads for grouped-query attention (default: num_heads)")
    ffn_hidden_size: int = Field(gt=0, description="inner width of the MLP")
    vocab_size: int = Field(gt=0, description="vocabulary size (the tokenizer's, rounded up is fine)")
    max_seq_len: int = Field(2048, gt=0, description="longest context the position encoding supports")
    tie_embeddings: bool = Field(False, description="share input embedding and output head weights")
    norm_eps: float = Field(1e-5, gt=0, description="epsilon of the RMS/LayerNorm")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency")
    init: Literal["scaled", "hf"] = Field("scaled", description="weight init: 'scaled' (normal(0, init_std), residual projections scaled by 1/sqrt(2*num_layers)) or the architecture's own")
    init_std: float = Field(0.02, gt=0, description="standard deviation of the normal init")
    hf_overrides: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments for the HF config (e.g. num_local_experts for mixtral)")

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {kv}")
        return self


class TrainConfig(Section):
    """The training recipe: backend, batch, optimiser, schedule, cadence of eval/logs/checkpoints."""

    backend: Literal["single", "ddp", "fsdp", "deepspeed"] = Field("single", description="parallel backend")
    zero_stage: Literal[1, 2, 3] = Field(3, description="DeepSpeed ZeRO stage (backend=deepspeed)")
    seq_len: int = Field(256, gt=0, description="tokens per training sequence")
    global_batch_size: int | None = Field(None, gt=0, description="sequences per optimiser step, all ranks (or global_batch_tokens; neither: micro_batch_size x world size)")
    global_batch_tokens: int | None = Field(None, gt=0, description="tokens per optimiser step over all ranks; must be a multiple of seq_len")
    micro_batch_size: int = Field(8, gt=0, description="sequences per rank per forward/backward; accumulation makes up the rest")
    max_steps: int = Field(100, gt=0, description="optimiser steps to train")
    lr: float = Field(3e-4, gt=0, description="peak learning rate")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final learning rate as a fraction of lr")
    warmup_steps: int = Field(0, ge=0, description="linear warmup steps")
    schedule: Literal["cosine", "linear", "wsd"] = Field("cosine", description="decay after warmup: cosine, linear, or warmup-stable-decay")
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: fraction of max_steps spent decaying at the end")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decoupled weight decay (not applied to norms and biases)")
    decay_embeddings: bool = Field(False, description="apply weight decay to embeddings too")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    grad_clip: float = Field(1.0, ge=0, description="clip the global gradient norm to this (0: off)")
    z_loss: float = Field(0.0, ge=0, description="weight of the z-loss on the log-partition (0: off)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on GPUs and on CPUs with AMX, fp32 elsewhere (decided once per run, kept on resume)")
    activation_checkpointing: bool = Field(False, description="recompute block activations in backward")
    ac_every: int = Field(1, gt=0, description="checkpoint every k-th block when activation_checkpointing")
    compile: bool = Field(False, description="torch.compile each decoder block")
    fused_loss: bool = Field(True, description="LM head and cross-entropy computed in row chunks, never storing the full logits")
    cpu_matmul: Literal["auto", "onednn", "torch"] = Field(
        "auto", description="fp32 GEMM on CPU: oneDNN's or torch's default (MKL); auto: whichever a short probe finds faster here (decided once per run, kept on resume)")
    cpu_offload: bool = Field(False, description="offload parameters/optimizer to CPU (fsdp, deepspeed)")
    deepspeed: dict[str, Any] = Field(default_factory=dict, description="DeepSpeed config keys merged on top of the generated one")
    eval_every: int = Field(50, ge=0, description="evaluate on the validation split every N steps (0: only at the end)")
    eval_batches: int = Field(8, gt=0, description="validation global batches (of the training global batch size) per evaluation")
    log_every: int = Field(10, gt=0, description="write metrics every N steps")
    checkpoint_every: int = Field(0, ge=0, description="save a checkpoint every N steps (0: only at the end)")
    keep_last: int = Field(2, gt=0, description="checkpoints to keep")
    async_checkpoint: bool = Field(False, description="write DCP checkpoints in the background while training continues (fsdp/ddp/single)")
    max_nonfinite_steps: int = Field(5, gt=0, description="stop after this many consecutive steps with a non-finite loss or gradient")
    stop_after_steps: int | None = Field(None, gt=0, description="end this process after this step (checkpoint saved, schedule unchanged); rerun to resume")
    resume: bool = Field(True, description="continue from the newest valid checkpoint in run_dir/checkpoints when there is one")
    export_hf: bool = Field(True, description="write a Hugging Face model directory to run_dir/hf at the end of the run")
    hang_timeout_s: float = Field(1800.0, ge=0, description="end a rank whose loop made no progress for this long (stacks in its log, exit 3; 0: off)")
    collective_timeout_s: float = Field(1800.0, gt=0, description="timeout of a collective operation (process group timeout)")

    @model_validator(mode="after")
    def _batch(self):
        if self.global_batch_size and self.global_batch_tokens:
            raise ValueError("give global_batch_size or global_batch_tokens, not both")
        if self.global_batch_tokens and self.global_batch_tokens % self.seq_len:
            raise ValueError(f"global_batch_tokens {self.global_batch_tokens} is not a multiple of seq_len {self.seq_len}")
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} exceeds max_steps {self.max_steps}")
        return self

    @model_validator(mode="after")
    def _async_checkpoint(self):
        if self.async_checkpoint and self.backend == "deepspeed":
            raise ValueError("async_checkpoint needs DCP checkpoints (fsdp, ddp or single); DeepSpeed writes its own")
        return self

    def global_batch_sequences(self, world_size: int) -> int:
        """Sequences per optimiser step over all ranks (default: one micro-batch per rank)."""
        if self.global_batch_size:
            return self.global_batch_size
        if self.global_batch_tokens:
            return self.global_batch_tokens // self.seq_len
        return self.micro_batch_size * world_size

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per rank per step; the global batch must split exactly over ranks and micro-batches."""
        global_batch = self.global_batch_sequences(world_size)
        per_step = world_size * self.micro_batch_size
        if global_batch % per_step:
            field = "train.global_batch_tokens" if self.global_batch_tokens else "train.global_batch_size"
            raise UserError(f"the global batch of {global_batch} sequences does not split into {world_size} rank(s) x "
                            f"train.micro_batch_size {self.micro_batch_size}", f"{field}, train.micro_batch_size")
        return global_batch // per_step


class TrackingConfig(Section):
    """Where metrics go: metrics.jsonl always, Weights & Biases (rank 0, files in run_dir/wandb) as chosen."""

    wandb: Literal["online", "offline", "disabled", "auto"] = Field(
        "auto", description="auto: WANDB_MODE when set, else online with WANDB_API_KEY or a `wandb login`, else offline")
    project: str = Field("ember", description="W&B project")
    entity: str | None = Field(None, description="W&B entity (team or user)")
    group: str | None = Field(None, description="W&B group (a scaling sweep groups its runs)")
    job_type: str | None = Field(None, description="W&B job type (default: pretrain, or finetune with a finetune section)")
    name: str | None = Field(None, description="run name (default: the run directory's name)")
    tags: list[str] = Field(default_factory=list, description="W&B tags")
    notes: str | None = Field(None, description="W&B notes shown with the run")
    artifacts: bool = Field(False, description="log the final checkpoint and the HF export as W&B artifacts by reference (nothing uploaded)")
    init_timeout_s: float = Field(60.0, gt=0, description="seconds W&B may take to start before the run goes on without it")
