"""Class weights: the classification loss is sum_i w[y_i] * CE_i over the labelled rows, divided by the step's
normaliser (the number of labelled rows of the global batch), on a real classifier on the single backend."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ember.finetune.classify import ClassificationLoss
from ember.finetune.model import task_builder, task_hf_config
from ember.pretrain.backends import build_backend
from ember.pretrain.fused_loss import IGNORE_INDEX
from ember.pretrain.step import ModelBatch
from ember.run_config import FinetuneRunConfig


def test_each_row_weighs_by_its_class_and_the_sum_is_divided_by_the_labelled_rows():
    cfg = FinetuneRunConfig(model={"hidden_size": 32, "num_layers": 1, "num_heads": 2, "ffn_hidden_size": 64,
                                   "vocab_size": 40, "max_seq_len": 16},
                            finetune={"task": "unused"}, train={"precision": "fp32", "cpu_matmul": "torch"})
    config = task_hf_config(cfg.model, "classification", 3, {"eos_token_id": 0, "bos_token_id": 0, "pad_token_id": 1})
    backend = build_backend(cfg, lambda model: torch.optim.AdamW(model.parameters()),
                            task_builder(cfg.model, cfg.finetune, "classification", config, seed=0))
    try:
        ids = torch.randint(2, 40, (6, 8), generator=torch.Generator().manual_seed(0))  # (rows, seq)
        labels = torch.tensor([0, 1, 2, 2, IGNORE_INDEX, 0])  # 5 labelled rows
        batch = ModelBatch(input_ids=ids, labels=labels, attention_mask=torch.ones_like(ids))
        weights = [3.0, 0.5, 1.0]
        with torch.no_grad():
            loss, _ = ClassificationLoss(weights)(backend, batch, normalizer=5.0)
            plain, _ = ClassificationLoss(None)(backend, batch, normalizer=5.0)
            logits = ClassificationLoss().logits(backend, batch)  # (rows, classes)
        keep = labels != IGNORE_INDEX
        per_row = F.cross_entropy(logits[keep], labels[keep], reduction="none")  # (labelled rows,)
        expected = sum(weights[y] * ce for y, ce in zip(labels[keep].tolist(), per_row.tolist())) / 5
        assert float(loss) == pytest.approx(expected, rel=1e-6)
        assert float(plain) == pytest.approx(float(per_row.sum()) / 5, rel=1e-6)
        assert abs(float(loss) - float(plain)) > 1e-3  # the weights did change the loss
    finally:
        backend.close(all_ranks_done=True)

