"""SFT examples as the engine's batches: response-only labels, EOS supervised, the label audit, and packing that
gives every example the loss it has alone, on every attention path ember uses."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from ember.errors import UserError
from ember.finetune.data import (
    Encoded,
    ExampleLoader,
    audit_batches,
    audit_labels,
    collate_packed,
    collate_padded,
    encode_sft,
    pack_rows,
)
from ember.pretrain.fused_loss import IGNORE_INDEX

EOS = 0


class CharTokenizer:
    """One token per character (ids 1..), enough to check the masking position by position."""

    def __call__(self, texts, add_special_tokens=False):
        class Out:
            input_ids = [[ord(c) - 96 for c in text] for text in texts]

        return Out()


def test_only_response_tokens_and_the_eos_are_targets():
    [example] = encode_sft([{"prompt": "abc", "response": "de"}], CharTokenizer(), EOS, max_length=32)
    assert example.ids == [1, 2, 3, 4, 5, EOS]
    # Inputs a b c d e predict b c d e EOS; only d, e and EOS (the response and its end) are supervised.
    assert example.labels == [IGNORE_INDEX, IGNORE_INDEX, 4, 5, EOS]
    batch = collate_padded([example, Encoded(ids=[1, 2, EOS], labels=[IGNORE_INDEX, EOS])], pad_id=9)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5], [1, 2, 9, 9, 9]]
    assert batch.labels.tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 4, 5, EOS], [IGNORE_INDEX, EOS] + [IGNORE_INDEX] * 3]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]


def test_label_audit_fails_closed_when_every_example_is_masked():
    # A prompt that fills max_length leaves no response token, not even the EOS.
    masked = encode_sft([{"prompt": "abcdefgh", "response": "xy"}] * 3, CharTokenizer(), EOS, max_length=6)
    assert all(t == IGNORE_INDEX for e in masked for t in e.labels)
    with pytest.raises(UserError, match="label audit"):
        audit_labels(masked, "task")
    kept = audit_labels(masked + encode_sft([{"prompt": "a", "response": "b"}], CharTokenizer(), EOS, 6), "task")
    assert len(kept) == 1


@pytest.mark.parametrize("pack_length", [None, 3])  # packed: one 3-token example per row
def test_batch_audit_names_the_first_micro_batch_with_no_target(pack_length):
    """Every micro-batch any rank will step must hold a target; here one batch of the run is masked throughout."""
    supervised = encode_sft([{"prompt": "ab", "response": "c"}], CharTokenizer(), EOS, 16)[0]
    masked = Encoded(ids=supervised.ids, labels=[IGNORE_INDEX] * len(supervised.labels))
    # Group 4 keeps each run of 4 examples together: the stream is 4 supervised, 4 masked, then 4 supervised.
    loader = ExampleLoader([supervised] * 4 + [masked] * 4 + [supervised] * 4, global_batch_size=4, rank=0,
                           world_size=2, seed=0, pad_id=9, pack_length=pack_length, group=4)
    order = [e is masked for e in itertools.islice(loader._stream(0), 12)]
    step = order.index(True) // 4 + 1  # the epoch's order decides which step meets the masked examples
    audit_batches(loader, step - 1, micro_batch_size=1, where="task")  # the steps before it pass
    with pytest.raises(UserError, match=f"label audit: step {step}'s micro-batch 1 on rank 0 has no supervised token") as error:
        audit_batches(loader, 3, micro_batch_size=1, where="task.jsonl: field response")
    assert error.value.line().endswith("(task.jsonl: field response)")
    assert loader.samples_consumed == 0  # the audit only looked


def test_packing_restarts_positions_and_keeps_labels_apart():
    examples = encode_sft([{"prompt": "ab", "response": "c"}, {"prompt": "d", "response": "ef"}], CharTokenizer(), EOS, 16)
    rows, used = pack_rows(iter(examples), num_rows=1, length=8)
    assert used == 2
    batch = collate_packed(rows, pad_id=9, length=8)
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 0, 1]]
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 9, 9]]
    # The first example's EOS target sits at its last input; nothing crosses into the next example.
    assert batch.labels.tolist() == [[IGNORE_INDEX, 3, EOS, 5, 6, EOS, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch.attention_mask is None


def tiny_model(attn: str):
    from ember.pretrain.config import ModelConfig
    from ember.pretrain.cpu_attention import use_onednn_attention
    from ember.pretrain.model import build_model, hf_config, init_weights

    model_cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, ffn_hidden_size=64, vocab_size=40, max_seq_len=64)
    config = hf_config(model_cfg)
    config._attn_implementation = "eager" if attn == "eager" else "sdpa"
    model = build_model(config)
    init_weights(model, model_cfg, seed=1)
    if attn == "ember_onednn":
        assert use_onednn_attention(model)
    return model.eval()


def per_example_losses(model, batch) -> list[float]:
    """Mean cross-entropy of each example's targets; examples are the runs of restarting positions."""
    logits = model(**batch.model_inputs()).logits.float()  # (rows, seq, vocab)
    token_loss = F.cross_entropy(logits.transpose(1, 2), batch.labels, ignore_index=IGNORE_INDEX, reduction="none")
    positions = batch.position_ids if batch.position_ids is not None else torch.arange(batch.input_ids.shape[1]).expand_as(batch.input_ids)
    losses = []
    for row in range(batch.input_ids.shape[0]):
        starts = (positions[row] == 0).nonzero().squeeze(1).tolist() + [batch.input_ids.shape[1]]
        for a, b in zip(starts, starts[1:]):
            keep = batch.labels[row, a:b] != IGNORE_INDEX
            if keep.any():
                losses.append(float(token_loss[row, a:b][keep].mean()))
    return losses


@pytest.mark.parametrize("attn", ["sdpa", "eager", "ember_onednn"])
def test_packed_examples_have_their_unpacked_losses(attn):
    gen = torch.Generator().manual_seed(0)
    examples = []
    for prompt_len, response_len in ((5, 4), (3, 7), (6, 2), (2, 5)):
        ids = torch.randint(1, 40, (prompt_len + response_len + 1,), generator=gen).tolist()
        labels = [t if i + 1 >= prompt_len else IGNORE_INDEX for i, t in enumerate(ids[1:])]
        examples.append(Encoded(ids=ids, labels=labels))
    model = tiny_model(attn)
    with torch.no_grad():
        alone = [per_example_losses(model, collate_padded([e], pad_id=0))[0] for e in examples]
        rows, used = pack_rows(iter(examples), num_rows=2, length=24)
        assert used == 4 and all(len(r) == 2 for r in rows)  # two examples in each row
        packed = per_example_losses(model, collate_packed(rows, pad_id=0, length=24))
    assert packed == pytest.approx(alone, abs=1e-5)
