"""Sequence classification: the loss in the engine's contract, and evaluation (accuracy, macro-F1, confusion)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ember.pretrain.fused_loss import IGNORE_INDEX
from ember.pretrain.step import ModelBatch, autocast

log = logging.getLogger("ember.finetune.classify")


class ClassificationLoss:
    """Cross-entropy of the class logits, summed over the labelled rows (optionally class-weighted) and divided
    by the normaliser the step gives (the global number of labelled rows)."""

    def __init__(self, class_weights: list[float] | None = None):
        self.class_weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None

    def num_targets(self, batch: ModelBatch) -> int:
        return int((batch.labels != IGNORE_INDEX).sum())

    def logits(self, backend, batch: ModelBatch) -> torch.Tensor:
        with autocast(backend):
            return backend.model(**batch.model_inputs()).logits.float()  # (rows, num_labels)

    def __call__(self, backend, batch: ModelBatch, normalizer: float) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.logits(backend, batch)
        weight = self.class_weights.to(logits.device) if self.class_weights is not None else None
        loss = F.cross_entropy(logits, batch.labels, weight=weight, ignore_index=IGNORE_INDEX, reduction="sum") / normalizer
        return loss, loss


def confusion_matrix(preds: list[int], labels: list[int], num_labels: int) -> list[list[int]]:
    """matrix[true][predicted]"""
    matrix = [[0] * num_labels for _ in range(num_labels)]
    for p, y in zip(preds, labels):
        matrix[y][p] += 1
    return matrix


def macro_f1(matrix: list[list[int]]) -> float:
    """Mean F1 over the classes that occur in the labels or the predictions."""
    scores = []
    for c in range(len(matrix)):
        tp = matrix[c][c]
        actual, predicted = sum(matrix[c]), sum(row[c] for row in matrix)
        if actual == 0 and predicted == 0:
            continue
        scores.append(2 * tp / (actual + predicted))
    return sum(scores) / len(scores) if scores else 0.0


@torch.no_grad()
def evaluate_classifier(backend, batches, loss: ClassificationLoss, num_labels: int) -> dict:
    """Loss, accuracy, macro-F1 and the confusion matrix over every evaluation example (each rank scores its
    rows; predictions are gathered once at the end)."""
    backend.model.eval()
    preds: list[int] = []
    labels: list[int] = []
    loss_sum = 0.0
    for batch in batches:
        batch = batch.to(backend.device)
        logits = loss.logits(backend, batch)
        keep = batch.labels != IGNORE_INDEX
        loss_sum += float(F.cross_entropy(logits[keep], batch.labels[keep], reduction="sum")) if keep.any() else 0.0
        preds += logits.argmax(-1)[keep].tolist()
        labels += batch.labels[keep].tolist()
    backend.model.train()
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (preds, labels, loss_sum))
        preds = [p for g in gathered for p in g[0]]
        labels = [y for g in gathered for y in g[1]]
        loss_sum = sum(g[2] for g in gathered)
    matrix = confusion_matrix(preds, labels, num_labels)
    correct = sum(matrix[c][c] for c in range(num_labels))
    total = max(len(labels), 1)
    majority = max((sum(row) for row in matrix), default=0) / total
    return {"val_loss": loss_sum / total, "accuracy": correct / total, "macro_f1": macro_f1(matrix),
            "majority_accuracy": majority, "num_examples": len(labels), "confusion": matrix}


def format_confusion(matrix: list[list[int]], names: list[str]) -> str:
    width = max(len(n) for n in names)
    header = " " * (width + 2) + " ".join(f"{i:>4}" for i in range(len(names)))
    rows = [f"{name:>{width}} |" + " ".join(f"{v:>4}" for v in row) + f"   ({i})" for i, (name, row) in enumerate(zip(names, matrix))]
    return "\n".join(["true \\ predicted", header, *rows])


def save_confusion_png(matrix: list[list[int]], names: list[str], path: Path, title: str) -> Path | None:
    """The confusion matrix as a PNG (written to a temporary name, then renamed); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no confusion-matrix PNG")
        return None
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(names), 1 + 0.6 * len(names)))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right")
    ax.set_yticks(range(len(names)), names)
    for y, row in enumerate(matrix):
        for x, v in enumerate(row):
            if v:
                ax.text(x, y, str(v), ha="center", va="center", fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
