"""Preference tuning (DPO) on prompt / chosen / rejected, in the engine's batch contract.

Rows come in pairs, chosen then rejected, each labelled like SFT (targets on the response and its eos only). The
reference model is the starting model, frozen: its summed log-probabilities of every pair are computed once,
before the first update, with the very weights training starts from, and travel with the examples
(`ModelBatch.ref_logps`), so no second copy of the model is kept or sharded. The loss of a pair is
-log sigmoid(beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))), summed over the pairs
and divided by the global number of pairs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ember.finetune.data import Encoded, encode_sft
from ember.pretrain.fused_loss import IGNORE_INDEX
from ember.pretrain.step import ModelBatch, autocast


def encode_pairs(examples: list[dict], tokenizer, eos_id: int, max_length: int) -> list[Encoded]:
    """Chosen and rejected of every example as two SFT rows, chosen first."""
    chosen = encode_sft([{"prompt": e["prompt"], "response": e["chosen"]} for e in examples], tokenizer, eos_id, max_length)
    rejected = encode_sft([{"prompt": e["prompt"], "response": e["rejected"]} for e in examples], tokenizer, eos_id, max_length)
    return [row for pair in zip(chosen, rejected) for row in pair]


def sequence_logps(backend, batch: ModelBatch) -> torch.Tensor:
    """(rows,) sum of the log-probabilities of each row's supervised targets."""
    with autocast(backend):
        logits = backend.model(**batch.model_inputs()).logits.float()  # (rows, seq, vocab)
    token = -F.cross_entropy(logits.transpose(1, 2), batch.labels, ignore_index=IGNORE_INDEX, reduction="none")
    return token.sum(-1)


class DPOLoss:
    def __init__(self, beta: float):
        self.beta = beta

    def num_targets(self, batch: ModelBatch) -> int:
        return batch.input_ids.shape[0] // 2

    def rewards(self, policy_logps: torch.Tensor, batch: ModelBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Implied rewards (pairs,) of chosen and rejected: beta * (policy - reference) log-probabilities, from the
        policy's (rows,) summed log-probabilities."""
        delta = self.beta * (policy_logps - batch.ref_logps)
        return delta[0::2], delta[1::2]

    def __call__(self, backend, batch: ModelBatch, normalizer: float) -> tuple[torch.Tensor, torch.Tensor]:
        chosen, rejected = self.rewards(sequence_logps(backend, batch), batch)
        loss = -F.logsigmoid(chosen - rejected).sum() / normalizer
        return loss, loss


@torch.no_grad()
def reference_logps(backend, examples: list[Encoded], batch_rows: int, pad_id: int) -> list[float]:
    """Every row's summed log-probability under the current (starting) weights; each rank scores a share, all
    ranks get all (the model is sharded: every rank runs every forward)."""
    from ember.finetune.data import collate_padded

    backend.model.eval()
    out: list[float] = []
    world, rank = backend.world_size, backend.rank
    per_rank = batch_rows // world
    for start in range(0, len(examples), batch_rows):
        chunk = examples[start:start + batch_rows]
        chunk = chunk + [chunk[-1]] * (batch_rows - len(chunk))  # equal work on every rank
        mine = collate_padded(chunk[rank * per_rank:(rank + 1) * per_rank], pad_id).to(backend.device)
        logps = sequence_logps(backend, mine)
        if world > 1:
            gathered = [torch.zeros_like(logps) for _ in range(world)]
            dist.all_gather(gathered, logps)
            logps = torch.cat(gathered)
        out += logps.tolist()[: min(batch_rows, len(examples) - start)]
    backend.model.train()
    return out


def ranked_first(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """1 where `first` is above `second`, 0.5 on a tie, 0 below (a tie is a coin flip, not a loss)."""
    return (first > second).double() + 0.5 * (first == second).double()


@torch.no_grad()
def evaluate_preferences(backend, batches, loss: DPOLoss) -> dict:
    """Held-out DPO loss, mean reward margin (chosen's implied reward minus rejected's) and two accuracies:

    - `preference_accuracy`: the fraction of pairs whose chosen response the model itself finds more likely than
      the rejected one (summed log-probabilities, as in the loss). It is defined for any model the same way, so
      the starting model has a real score to beat (DPO raises chosen over rejected relative to the reference, so
      it should rise).
    - `reward_accuracy`: the fraction of pairs whose chosen implied reward is above the rejected one's (the usual
      DPO "reward accuracy"). At the start the policy is the reference, every reward is 0 and every pair ties:
      ties count 0.5, so the starting model scores chance (0.5), not 0 by construction.
    """
    backend.model.eval()
    sums = torch.zeros(5, dtype=torch.float64)  # loss, margin, preference accuracy, reward accuracy, pairs
    for batch in batches:
        batch = batch.to(backend.device)
        keep = batch.labels[0::2].ne(IGNORE_INDEX).any(-1)  # filler pairs have no targets
        policy = sequence_logps(backend, batch)  # (rows,)
        chosen_logp, rejected_logp = policy[0::2][keep], policy[1::2][keep]
        chosen, rejected = (r[keep] for r in loss.rewards(policy, batch))
        margin = chosen - rejected
        sums += torch.tensor([float(-F.logsigmoid(margin).sum()), float(margin.sum()),
                              float(ranked_first(chosen_logp, rejected_logp).sum()), float(ranked_first(chosen, rejected).sum()),
                              float(keep.sum())], dtype=torch.float64)
    backend.model.train()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    n = max(float(sums[4]), 1.0)
    return {"val_loss": float(sums[0]) / n, "reward_margin": float(sums[1]) / n, "preference_accuracy": float(sums[2]) / n,
            "reward_accuracy": float(sums[3]) / n, "num_pairs": int(sums[4])}
