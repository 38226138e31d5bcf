"""Config section of the fine-tuning stage: the task, which weights train, and the parent it starts from."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ember.config import Section


class LoraConfig(Section):
    """Low-rank adapters through peft (mode: lora); merged into the base weights at export."""

    rank: int = Field(8, gt=0, description="rank r of the adapter matrices")
    alpha: float = Field(16.0, gt=0, description="scaling numerator: the update is scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input")
    target_modules: list[str] = Field(["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1,
                                      description="names (last component) of the linear layers that get adapters")


class FinetuneConfig(Section):
    """Fine-tune a pretrained checkpoint (or a fresh model) on a downstream task."""

    init_from: Path | None = Field(None, description="ember run / checkpoint or HF model directory to start from (set by --from); None: random init")
    random_init: bool = Field(False, description="take only the architecture and tokenizer of --from, with freshly initialised weights (the baseline that shows what pretraining bought)")
    task: str = Field(description="built-in task (stdlib-topic, stdlib-docstring, stdlib-prefs); a jsonl / parquet file, a "
                                  "save_to_disk dataset directory or hf:NAME (datasets.load_dataset); kind pretrain: a "
                                  "dataset prepared by `ember data prepare` with the parent's tokenizer")
    kind: Literal["auto", "classification", "sft", "dpo", "pretrain"] = Field(
        "auto", description="task type of a file or dataset task (auto: the built-in task's); pretrain: continued pretraining on a prepared corpus")
    hub_split: str = Field("train", description="dataset task (save_to_disk directory or hf:NAME): the split to read")
    mode: Literal["full", "frozen", "last_k", "lora"] = Field("full", description="which weights train: all, only the head (linear probe), the last k blocks and the head, or LoRA adapters (and the head)")
    last_k: int = Field(1, gt=0, description="mode last_k: number of trailing decoder blocks that train")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="mode lora: adapter settings")
    head_lr: float | None = Field(None, gt=0, description="learning rate of the new head (default: train.lr)")
    max_length: int = Field(256, gt=1, description="tokens per example (longer ones are truncated); with packing, per packed row")
    packing: bool = Field(False, description="sft: pack short examples into rows of max_length (position ids restart, no attention across examples)")
    # sft examples are prompt + response fields, or a `messages` list of {role, content} turns: rendered with the
    # tokenizer's chat template (a built-in one when it has none), the loss on the assistant turns only.
    num_labels: int = Field(10, ge=2, description="stdlib-topic: the largest top-level stdlib packages that are the classes")
    max_train_examples: int | None = Field(None, gt=0, description="use at most this many training examples (chosen by seed)")
    max_eval_examples: int | None = Field(None, gt=0, description="use at most this many evaluation examples (chosen by seed)")
    text_field: str = Field("text", description="classification file: field holding the text")
    label_field: str = Field("label", description="classification file: field holding the label")
    labels: list[str] | None = Field(None, description="classification: the label set, in class-id order (default: the sorted labels of the data)")
    class_weights: list[float] | None = Field(None, description="classification: loss weight of each class, in class-id order")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="file tasks: fraction of examples (by hash) held out for evaluation")
    heldout_fraction: float | None = Field(None, gt=0, lt=1, description="built-in tasks: the pretraining split's val_fraction; eval examples come only from files it held out (default: the parent's manifest, else configs/data/stdlib.yaml)")
    validation_fraction: float | None = Field(None, gt=0, lt=1, description="built-in tasks: evaluate instead on the training files whose hash lies just above the held-out range (this fraction of all files), which then leave the training set: a validation split for choosing settings without looking at the held-out files")
    dpo_beta: float = Field(0.1, gt=0, description="dpo: strength of the pull towards the reference model (beta)")
    early_stopping_patience: int = Field(0, ge=0, description="stop after this many evaluations without improving the eval metric (0: off)")
    metric: Literal["auto", "accuracy", "loss"] = Field("auto", description="eval metric for early stopping and the best checkpoint (auto: accuracy for classification, loss otherwise)")
    parent_run_dir: Path | None = Field(None, description="run directory of the checkpoint this run started from (recorded by ember finetune)")
    parent_step: int | None = Field(None, description="step of the checkpoint this run started from (recorded by ember finetune)")

    @model_validator(mode="after")
    def _weights_match_labels(self):
        if self.class_weights is not None and self.labels is not None and len(self.class_weights) != len(self.labels):
            raise ValueError(f"class_weights has {len(self.class_weights)} entries for {len(self.labels)} labels")
        return self
