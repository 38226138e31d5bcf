"""`finetune(cfg)`: a fine-tuning run on the pretraining engine, from the parent to the HF export.

parent (--from) -> task examples (or, continued pretraining, a prepared corpus) -> tokens + label audit of the
examples and of every training batch (before anything is written) -> run dir -> the task's
`ModelBuilder` on the configured backend -> resume -> the engine's loop, run from evaluation to evaluation
(eval metrics in metrics.jsonl, the best weights kept, early stopping) -> export of the best weights to
run_dir/hf (LoRA merged; the adapter also saved alone in peft's format in run_dir/adapter) -> summary.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch

from ember.errors import UserError
from ember.finetune.classify import (
    ClassificationLoss,
    evaluate_classifier,
    format_confusion,
    save_confusion_png,
)
from ember.finetune.dpo import DPOLoss, encode_pairs, evaluate_preferences, reference_logps
from ember.finetune.corpus import open_corpus
from ember.finetune.data import (
    ExampleLoader,
    audit_batches,
    audit_labels,
    encode_classification,
    encode_sft,
    eval_batches,
    load_tokenizer,
)
from ember.finetune.model import is_head, task_builder, task_hf_config, tied_aliases_of
from ember.finetune.parent import resolve_parent
from ember.finetune.tasks import load_task
from ember.pretrain import distributed
from ember.pretrain.backends.builder import meta_model
from ember.pretrain.checkpoint import CheckpointManager
from ember.pretrain.loop import train
from ember.pretrain.optim import fused_available, split_decay_groups
from ember.pretrain.run import build_metrics, resume, seed_everything, setup_run_dir, write_atomically
from ember.pretrain.tracking import finish_tracking
from ember.pretrain.step import CausalLMLoss, evaluate

log = logging.getLogger("ember.finetune.run")

BEST_DIR = "best"
# What a task's targets are, for the label audit's errors.
SUPERVISED_FIELD = {"classification": "label", "sft": "response", "dpo": "chosen / rejected"}


def default_val_fraction() -> float:
    """The built-in corpus's held-out fraction (configs/data/stdlib.yaml)."""
    from ember.config import load_config
    from ember.data.config import PrepareConfig

    return load_config("stdlib", PrepareConfig, kind="data").val_fraction


def build_finetune_optimizer(model: torch.nn.Module, train_cfg, kind: str, head_lr: float | None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, decay / no-decay groups, the head's groups at `head_lr` (the loop
    scales each group's rate by its `lr_scale`)."""
    decay, no_decay = split_decay_groups(model, train_cfg.decay_embeddings)
    params = dict(model.named_parameters())
    scale = (head_lr / train_cfg.lr) if head_lr else 1.0
    groups = []
    for group, names, weight_decay in (("decay", decay, train_cfg.weight_decay), ("no_decay", no_decay, 0.0)):
        body = [params[n] for n in names if not is_head(n, kind)]
        head = [params[n] for n in names if is_head(n, kind)]
        groups.append({"params": body, "weight_decay": weight_decay, "group": group, "lr_scale": 1.0})
        groups.append({"params": head, "weight_decay": weight_decay, "group": f"head_{group}", "lr_scale": scale})
    groups = [g for g in groups if g["params"]]
    everything = [p for g in groups for p in g["params"]]
    return torch.optim.AdamW(groups, lr=train_cfg.lr, betas=tuple(train_cfg.betas), eps=train_cfg.eps,
                             fused=fused_available(everything))


def config_digest(cfg) -> str:
    import hashlib

    data = cfg.model_dump(mode="json")
    for key in ("run_dir", "tracking", "launch"):
        data.pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class Selection:
    """The best evaluation so far (its weights in run_dir/best) and the early-stopping count."""

    def __init__(self, run_dir: Path, metric: str, patience: int):
        self.dir, self.metric, self.patience = Path(run_dir) / BEST_DIR, metric, patience
        state = json.loads((self.dir / "best.json").read_text()) if (self.dir / "best.json").is_file() else {}
        self.best_value, self.best_step = state.get("value"), state.get("step")
        self.evals_without_gain = state.get("evals_without_gain", 0)

    def improved(self, value: float) -> bool:
        if self.best_value is None:
            return True
        return value > self.best_value if self.metric == "accuracy" else value < self.best_value

    def update(self, backend, step: int, value: float) -> None:
        """Collective: after an evaluation, keep the weights when they are the best so far."""
        better = self.improved(value)
        self.evals_without_gain = 0 if better else self.evals_without_gain + 1
        full = backend.full_state_dict() if better else None  # collective on every rank
        if backend.rank == 0:
            if better:
                from safetensors.torch import save_file

                tmp = self.dir.with_name(self.dir.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                save_file({k: v.contiguous() for k, v in full.items()}, tmp / "weights.safetensors")
                shutil.rmtree(self.dir, ignore_errors=True)
                tmp.rename(self.dir)
                self.best_value, self.best_step = value, step
            write_atomically(self.dir / "best.json", json.dumps(
                {"step": self.best_step, "metric": self.metric, "value": self.best_value,
                 "evals_without_gain": self.evals_without_gain}))
        if better:
            self.best_value, self.best_step = value, step
        backend.barrier()

    @property
    def should_stop(self) -> bool:
        return bool(self.patience) and self.evals_without_gain >= self.patience

    def weights(self) -> dict[str, torch.Tensor] | None:
        from safetensors.torch import load_file

        file = self.dir / "weights.safetensors"
        return load_file(file) if file.is_file() else None


def export_model(state: dict[str, torch.Tensor], builder, config, kind: str, ft, out: Path, *, tokenizer_dir, token_ids,
                 adapter_base: Path | None) -> Path:
    """Write the fine-tuned model to `out` as an HF directory (LoRA merged; its adapter to `out/../adapter`)."""
    from ember.pretrain.export import write_hf_model
    from ember.pretrain.model import materialize

    model = materialize(meta_model(builder), "cpu")
    model.load_state_dict(state, strict=False)
    if ft.mode == "lora":
        adapter = out.with_name("adapter")
        tmp = adapter.with_name(adapter.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if adapter_base is not None:
            model.peft_config["default"].base_model_name_or_path = str(Path(adapter_base).resolve())
        model.save_pretrained(str(tmp))
        shutil.rmtree(adapter, ignore_errors=True)
        tmp.rename(adapter)
        model = model.merge_and_unload()
    return write_hf_model(model.state_dict(), config, out, aliases=tied_aliases_of(model), tokenizer_dir=tokenizer_dir,
                          token_ids=token_ids)


def finetune(cfg) -> dict:
    """Fine-tune per `cfg` (a FinetuneRunConfig) to `train.max_steps` or early stopping; returns the summary."""
    from ember.pretrain.backends import build_backend

    started, t, ft = time.time(), cfg.train, cfg.finetune
    env = distributed.init_distributed()
    num_micro = t.accumulation_steps(env.world_size)
    global_batch = t.global_batch_sequences(env.world_size)

    # Everything a user can get wrong is checked before anything is written.
    parent = resolve_parent(ft.init_from) if ft.init_from is not None else None
    if parent is not None:
        cfg.model = parent.model
        ft.parent_run_dir, ft.parent_step = parent.run_dir, parent.step
    elif cfg.model is None:
        raise UserError("no model: give --from (an ember run or an HF model) or a model section", "model")
    tokenizer_dir = parent.tokenizer_dir if parent is not None else None
    tokenizer = load_tokenizer(tokenizer_dir)
    if len(tokenizer) > cfg.model.vocab_size:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens, the checkpoint's vocabulary {cfg.model.vocab_size}",
                        str(ft.init_from))
    token_ids = dict(parent.token_ids) if parent is not None else {}
    eos_id = token_ids.get("eos_token_id", tokenizer.eos_token_id)
    if eos_id is None:
        raise UserError("the tokenizer defines no eos token", str(tokenizer_dir))
    pad_id = token_ids.get("pad_token_id", tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id)
    token_ids = {"eos_token_id": eos_id, "bos_token_id": token_ids.get("bos_token_id", eos_id), "pad_token_id": pad_id}
    corpus, train_set, eval_set = None, [], []
    if ft.kind == "pretrain":
        if t.seq_len > cfg.model.max_seq_len:
            raise UserError(f"train.seq_len {t.seq_len} exceeds the model's max_seq_len {cfg.model.max_seq_len}", "train.seq_len")
        corpus = open_corpus(ft.task, tokenizer, cfg.model.vocab_size, t.seq_len)
        if not corpus.has_val(t.seq_len):
            raise UserError("the corpus has no validation split longer than train.seq_len (prepared with val_fraction 0?): "
                            "continued pretraining selects and stops on its loss", str(corpus.dir))
        kind, labels, where = "pretrain", [], str(corpus.dir)
        loss = CausalLMLoss(t.z_loss)
    else:
        val_fraction = ft.heldout_fraction or (parent.val_fraction if parent is not None else None) or default_val_fraction()
        task = load_task(ft, val_fraction, cfg.seed)
        kind, labels = task.kind, task.labels
        where = f"{ft.task}: field {SUPERVISED_FIELD[kind]}"
    if kind == "dpo":
        if t.micro_batch_size % 2 or global_batch % (2 * env.world_size):
            raise UserError("dpo trains pairs of rows: train.micro_batch_size and the global batch per rank must be even",
                            "train.micro_batch_size, train.global_batch_size")
        train_set = audit_labels(encode_pairs(task.train, tokenizer, eos_id, ft.max_length), f"{where} (training pairs)")
        eval_set = audit_labels(encode_pairs(task.eval, tokenizer, eos_id, ft.max_length), f"{where} (evaluation pairs)")
        if len(train_set) % 2 or len(eval_set) % 2:
            raise UserError("a preference pair lost a side to the label audit (prompt longer than finetune.max_length)",
                            "finetune.max_length")
        loss = DPOLoss(ft.dpo_beta)
    elif kind == "classification":
        train_set = encode_classification(task.train, task.labels, tokenizer, eos_id, ft.max_length)
        eval_set = encode_classification(task.eval, task.labels, tokenizer, eos_id, ft.max_length)
        if ft.class_weights is not None and len(ft.class_weights) != len(task.labels):
            raise UserError(f"class_weights has {len(ft.class_weights)} entries for {len(task.labels)} labels",
                            "finetune.class_weights")
        loss = ClassificationLoss(ft.class_weights)
    elif kind == "sft":
        if "messages" in task.train[0]:  # a chat task (tasks.file_task takes one form per file)
            where = f"{ft.task}: field messages (assistant turns)"
        train_set = audit_labels(encode_sft(task.train, tokenizer, eos_id, ft.max_length, f"{ft.task}, training set"),
                                 f"{where} (training examples)")
        eval_set = audit_labels(encode_sft(task.eval, tokenizer, eos_id, ft.max_length, f"{ft.task}, evaluation set"),
                                f"{where} (evaluation examples)")
        loss = CausalLMLoss(t.z_loss)
    metric = ft.metric if ft.metric != "auto" else ("accuracy" if kind in ("classification", "dpo") else "loss")
    config = task_hf_config(cfg.model, kind, len(labels), token_ids)
    if kind == "classification":
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: i for i, name in enumerate(labels)}
    weights = parent.weights_path if parent is not None and not ft.random_init else None
    builder = task_builder(cfg.model, ft, kind, config, cfg.seed, weights)
    meta_model(builder)  # the transfer mode on the meta device: a LoRA target that matches nothing fails here
    if corpus is not None:
        loader = corpus.loader("train", seq_len=t.seq_len, global_batch_size=global_batch, rank=env.rank,
                               world_size=env.world_size, seed=cfg.seed)
    else:
        loader = ExampleLoader(train_set, global_batch_size=global_batch, rank=env.rank, world_size=env.world_size,
                               seed=cfg.seed, pad_id=pad_id, pack_length=ft.max_length if ft.packing and kind == "sft" else None,
                               group=2 if kind == "dpo" else 1)
        audit_batches(loader, t.max_steps, t.micro_batch_size, f"{where} (training batches)")

    config_yaml = setup_run_dir(cfg, env.rank)
    seed_everything(cfg.seed)
    backend = build_backend(cfg, lambda model: build_finetune_optimizer(model, t, kind, ft.head_lr), builder)
    succeeded = False
    try:
        num_trainable = sum(p.numel() for p in backend.module.parameters() if p.requires_grad)
        log.info("fine-tuning %s (%s, mode %s) from %s: %d train / %d eval examples, %s trainable parameters, %d rank(s) (%s)",
                 ft.task, kind, ft.mode, "random init" if weights is None else ft.init_from, len(train_set), len(eval_set), f"{num_trainable:,}",
                 backend.world_size, t.backend)
        checkpoints = CheckpointManager(cfg.run_dir, backend, keep_last=t.keep_last, config_yaml=config_yaml,
                                        config_digest=config_digest(cfg), tokenizer_dir=tokenizer_dir, token_ids=token_ids)
        if kind == "dpo":
            # The frozen reference is the starting model: score every pair now, before any update or resume.
            for examples in (train_set, eval_set):
                for e, logp in zip(examples, reference_logps(backend, examples, global_batch, pad_id)):
                    e.ref_logp = logp
        state = resume(checkpoints, loader, t.resume)
        start_step = state.step
        metrics = build_metrics(cfg, backend, global_batch * (t.seq_len if corpus else ft.max_length), resume_step=start_step)
        if backend.rank == 0 and start_step == 0:
            metrics.write({"kind": "finetune", "task": ft.task, "task_kind": kind, "mode": ft.mode, "random_init": weights is None,
                           "parent_run_dir": str(ft.parent_run_dir) if ft.parent_run_dir else None,
                           "parent_step": ft.parent_step, "init_from": str(ft.init_from) if ft.init_from else None,
                           "labels": labels, "num_train_examples": len(train_set), "num_eval_examples": len(eval_set),
                           "trainable_parameters": num_trainable, "time": time.time()})

        def run_eval(step: int) -> dict:
            if corpus is not None:  # pretraining's evaluation: the same validation windows every time
                val = corpus.loader("val", seq_len=t.seq_len, global_batch_size=global_batch, rank=backend.rank,
                                    world_size=backend.world_size, seed=cfg.seed)
                return record_eval(step, {"val_loss": evaluate(backend, val, t.eval_batches, t.micro_batch_size, loss)})
            batches = eval_batches(eval_set, global_batch_size=global_batch, rank=backend.rank,
                                   world_size=backend.world_size, pad_id=pad_id)
            if kind == "classification":
                result = evaluate_classifier(backend, batches, loss, len(labels))
            elif kind == "dpo":
                result = evaluate_preferences(backend, batches, loss)
            else:
                result = {"val_loss": evaluate(backend, batches, len(eval_set), t.micro_batch_size, loss)}
            return record_eval(step, result)

        def record_eval(step: int, result: dict) -> dict:
            record = {"kind": "eval", "step": step, **result, "time": time.time()}
            metrics.write(record)
            metrics.last_eval = record
            shown = " | ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float))
            log.info("eval step %d | %s", step, shown)
            return result

        if start_step == 0:
            run_eval(0)  # the starting model, for comparison (not a candidate for the best weights)
        selection = Selection(cfg.run_dir, metric, ft.early_stopping_patience)
        last_step = min(t.max_steps, t.stop_after_steps or t.max_steps)
        eval_every = t.eval_every or t.max_steps
        # The loop runs from one evaluation to the next (a checkpoint at each); evaluation is done here, where
        # the eval metrics, the best weights and early stopping live.
        chunk = t.model_copy(update={"eval_every": 0, "checkpoint_every": 0})
        stopped_early = False
        result: dict = {}
        while state.step < last_step:
            until = min(last_step, (state.step // eval_every + 1) * eval_every)
            state = train(backend, chunk.model_copy(update={"stop_after_steps": until}), loader, state,
                          micro_batch_size=t.micro_batch_size, evaluate=lambda: None, checkpoints=checkpoints,
                          metrics=metrics, loss=loss)
            if state.step % eval_every == 0 or state.step == t.max_steps:
                result = run_eval(state.step)
                key = {"accuracy": "preference_accuracy" if kind == "dpo" else "accuracy", "loss": "val_loss"}[metric]
                selection.update(backend, state.step, result[key])
                if selection.should_stop:
                    log.info("early stopping at step %d: %d evaluations without a better %s (best %.4f at step %d)",
                             state.step, selection.evals_without_gain, metric, selection.best_value, selection.best_step)
                    stopped_early = True
                    break
        finished = state.step >= t.max_steps or stopped_early
        hf_dir = None
        if finished and t.export_hf:
            best = selection.weights() if backend.rank == 0 else None
            final = backend.full_state_dict()  # collective
            if backend.rank == 0:
                hf_dir = export_model(best or final, builder, config, kind, ft, Path(cfg.run_dir) / "hf",
                                      tokenizer_dir=tokenizer_dir, token_ids=token_ids,
                                      adapter_base=parent.hf_dir if parent is not None else None)
            backend.barrier()
        succeeded = True
    finally:
        backend.close(all_ranks_done=succeeded)
    best_eval = result
    if kind == "classification" and result and backend.rank == 0:
        print(format_confusion(result["confusion"], labels))
        save_confusion_png(result["confusion"], labels, Path(cfg.run_dir) / "confusion.png",
                           f"{ft.task} ({ft.mode}), step {state.step}")
    summary = {"step": state.step, "finished": finished, "stopped_early": stopped_early, "resumed_from": start_step,
               "task": ft.task, "mode": ft.mode, "loss": metrics.last_train.get("loss"), "best_step": selection.best_step,
               f"best_{metric}": selection.best_value,
               **{k: v for k, v in best_eval.items() if isinstance(v, (int, float))},
               "parent_run_dir": str(ft.parent_run_dir) if ft.parent_run_dir else None, "parent_step": ft.parent_step,
               "hf_dir": str(hf_dir) if hf_dir else None, "run_dir": str(cfg.run_dir), "wall_seconds": time.time() - started}
    metrics.log_summary(summary)
    finish_tracking(metrics.tracker, cfg, checkpoint=checkpoints.newest(), hf_dir=hf_dir)
    shown = f"{metric} {selection.best_value:.4f} (best, step {selection.best_step})" if selection.best_value is not None else ""
    log.info("%s at step %d/%d: %s; run dir %s", "finished" if finished else "stopped", state.step, t.max_steps, shown, cfg.run_dir)
    return summary
