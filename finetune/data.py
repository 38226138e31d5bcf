"""Task examples -> token ids and labels -> the engine's `ModelBatch`es, through a resumable loader.

Labels follow the engine's contract: next-token targets aligned with the inputs, IGNORE_INDEX where a position is
not supervised (prompt, padding, the boundary between packed examples), or one class id per row. The loader
draws examples in seeded epoch orders, each global batch the same whatever the world size (rank r takes its rows
of it), and its state is the number of examples consumed. A chat example's turns go through the tokenizer's chat
template (a built-in one when it has none) and only its assistant turns are targets. The label audit runs before
training: on the examples (those with no target are dropped, none left is an error) and on every micro-batch
the loader will give any rank.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ember.errors import UserError
from ember.pretrain.fused_loss import IGNORE_INDEX
from ember.pretrain.step import ModelBatch

log = logging.getLogger("ember.finetune.data")


@dataclass
class Encoded:
    """One example as tokens: `ids` (the whole sequence) and `labels` aligned with `ids[:-1]` as inputs, or a
    class id (`label`) for classification."""

    ids: list[int]
    labels: list[int] | None = None
    label: int | None = None
    ref_logp: float | None = None  # preference tuning: the reference model's summed log-probability of the targets


@dataclass
class PreferenceBatch(ModelBatch):
    """Pairs of rows (chosen, rejected) with the reference model's log-probabilities of each row."""

    ref_logps: torch.Tensor | None = None  # (rows,)


def load_tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    if tokenizer_dir is None or not Path(tokenizer_dir).is_dir():
        raise UserError("no tokenizer next to the starting weights (a checkpoint's tokenizer/ or the HF directory's files)",
                        str(tokenizer_dir))
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def encode_classification(examples: list[dict], labels: list[str], tokenizer, eos_id: int, max_length: int) -> list[Encoded]:
    """Text ids (truncated) + eos; the classifier reads the last non-padding token, here always the eos."""
    index = {name: i for i, name in enumerate(labels)}
    texts = tokenizer([e["text"] for e in examples], add_special_tokens=False).input_ids
    return [Encoded(ids=ids[: max_length - 1] + [eos_id], label=index[e["label"]]) for e, ids in zip(examples, texts)]


# A plain template for tokenizers that bring none: each turn is a role tag line, its content and an end marker.
BUILTIN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def check_messages(messages, where: str) -> None:
    if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content"), str) for m in messages):
        raise UserError("messages must be a list of {role, content} objects with string values", where)


def chat_segments(messages: list[dict], tokenizer, where: str) -> list[tuple[str, bool]]:
    """A conversation rendered with the tokenizer's chat template (the built-in one when it has none), as text
    pieces flagged supervised: each assistant turn's content and the template's end of that turn.

    The template renders the conversation one turn longer at a time; the text an assistant turn adds after the
    generation prompt is what the model learns to write. Turns after the last assistant turn teach nothing and go.
    """
    template = getattr(tokenizer, "chat_template", None) or BUILTIN_CHAT_TEMPLATE

    def render(turns: list[dict], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(turns, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)

    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages[: last + 1]):
        pieces = [(render(messages[:i], True), False)] if message["role"] == "assistant" else []
        pieces.append((render(messages[: i + 1], False), message["role"] == "assistant"))
        for text, supervised in pieces:
            if not text.startswith(done):
                raise UserError(f"the chat template does not render the conversation turn by turn (turn {i + 1} "
                                "rewrites the text before it), so its assistant turns cannot be located", where)
            segments.append((text[len(done):], supervised))
            done = text
    return segments


def sft_segments(example: dict) -> list[tuple[str, bool]]:
    return [(example["prompt"], False), (example["response"], True)]


def encode_sft(examples: list[dict], tokenizer, eos_id: int, max_length: int, where: str = "finetune.task") -> list[Encoded]:
    """Prompt + response (or a chat's turns) + eos; only the response's (the assistant turns') tokens and the eos
    are targets (truncated at max_length + 1). The eos ends a conversation whose text does not end with it."""
    pieces = []
    for i, e in enumerate(examples):
        if "messages" in e:
            check_messages(e["messages"], f"{where}: example {i + 1}")
            pieces.append(chat_segments(e["messages"], tokenizer, f"{where}: example {i + 1}"))
        else:
            pieces.append(sft_segments(e))
    texts = [text for segments in pieces for text, _ in segments]
    token_lists = iter(tokenizer(texts, add_special_tokens=False).input_ids if texts else [])
    out = []
    for segments in pieces:
        ids: list[int] = []
        supervised: list[bool] = []
        for _, flag in segments:
            tokens = next(token_lists)
            ids += tokens
            supervised += [flag] * len(tokens)
        if not ids or ids[-1] != eos_id:
            ids.append(eos_id)
            supervised.append(bool(segments) and segments[-1][1])  # the end of a response / assistant turn
        ids, supervised = ids[: max_length + 1], supervised[: max_length + 1]
        # Input position t predicts token t + 1: supervised when that token is a response's (or the eos).
        labels = [tok if flag else IGNORE_INDEX for tok, flag in zip(ids[1:], supervised[1:])]
        out.append(Encoded(ids=ids, labels=labels))
    return out


def audit_labels(encoded: list[Encoded], where: str) -> list[Encoded]:
    """Fail closed when no example has a supervised token; drop (and count) the examples that have none."""
    kept = [e for e in encoded if e.labels is None or any(t != IGNORE_INDEX for t in e.labels)]
    if not kept:
        raise UserError(f"label audit: none of the {len(encoded)} examples has a supervised token (prompts longer "
                        "than finetune.max_length, empty responses, or a chat template that masks every turn?)", where)
    if len(kept) < len(encoded):
        log.warning("label audit: %d of %d examples have no supervised token (prompt fills max_length) and are dropped",
                    len(encoded) - len(kept), len(encoded))
    supervised = sum(sum(t != IGNORE_INDEX for t in e.labels) for e in kept if e.labels is not None)
    total = sum(len(e.labels) for e in kept if e.labels is not None)
    if total:
        log.info("label audit: %d examples, %.1f%% of their target positions supervised", len(kept), 100 * supervised / total)
    return kept


def num_supervised(e: Encoded) -> int:
    if e.labels is None:
        return int(e.label != IGNORE_INDEX)
    return sum(t != IGNORE_INDEX for t in e.labels)


# ---------------------------------------------------------------- collation


def collate_padded(examples: list[Encoded], pad_id: int) -> ModelBatch:
    """Right-padded rows: classification (labels: one class id per row) or causal LM (labels per position)."""
    if examples[0].label is not None:
        length = max(len(e.ids) for e in examples)
        ids = torch.full((len(examples), length), pad_id, dtype=torch.long)  # (rows, seq)
        mask = torch.zeros((len(examples), length), dtype=torch.long)
        for row, e in enumerate(examples):
            ids[row, : len(e.ids)] = torch.tensor(e.ids)
            mask[row, : len(e.ids)] = 1
        return ModelBatch(input_ids=ids, labels=torch.tensor([e.label for e in examples]), attention_mask=mask)
    length = max(len(e.ids) - 1 for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.ids) - 1
        ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(e.ids[:-1]), torch.tensor(e.labels), 1
    if examples[0].ref_logp is not None:
        return PreferenceBatch(input_ids=ids, labels=labels, attention_mask=mask,
                               ref_logps=torch.tensor([e.ref_logp for e in examples], dtype=torch.float32))
    return ModelBatch(input_ids=ids, labels=labels, attention_mask=mask)


def collate_packed(rows: list[list[Encoded]], pad_id: int, length: int) -> ModelBatch:
    """Rows of `length` tokens, each holding whole examples end to end; position ids restart at every example
    (HF builds the block-diagonal causal mask from them: no attention across examples) and the padding at a
    row's end is one more block with no targets. No attention mask, so the packing is what the model sees."""
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)  # (rows, seq)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), length), dtype=torch.long)
    for r, examples in enumerate(rows):
        at = 0
        for e in examples:
            n = len(e.ids) - 1
            ids[r, at : at + n] = torch.tensor(e.ids[:-1])
            labels[r, at : at + n] = torch.tensor(e.labels)
            positions[r, at : at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(length - at)
    return ModelBatch(input_ids=ids, labels=labels, position_ids=positions)


def pack_rows(examples: Iterator[Encoded], num_rows: int, length: int) -> tuple[list[list[Encoded]], int]:
    """Fill `num_rows` rows of `length` input tokens greedily from `examples` (in order); (rows, examples used)."""
    rows: list[list[Encoded]] = [[]]
    used, room = 0, length
    for e in examples:
        n = len(e.ids) - 1
        if n > room:
            if len(rows) == num_rows:
                break
            rows.append([])
            room = length
        rows[-1].append(e)
        room -= n
        used += 1
    rows += [[] for _ in range(num_rows - len(rows))]
    return rows, used


# ---------------------------------------------------------------- loaders


class ExampleLoader:
    """Training batches: this rank's rows of every global batch of `global_batch_size` rows, forever.

    Example order: a fresh seeded permutation per epoch. With `pack_length`, each global row packs as many
    consecutive examples as fit in `pack_length` tokens. State: the number of examples consumed.
    """

    def __init__(self, examples: list[Encoded], *, global_batch_size: int, rank: int, world_size: int, seed: int,
                 pad_id: int, pack_length: int | None = None, group: int = 1):
        if not examples:
            raise UserError("no training examples", "finetune.task")
        if global_batch_size % world_size:
            raise UserError(f"global batch {global_batch_size} is not divisible by the world size {world_size}",
                            "train.global_batch_size")
        self.examples, self.global_batch_size = examples, global_batch_size
        self.rank, self.world_size, self.seed, self.pad_id, self.pack_length = rank, world_size, seed, pad_id, pack_length
        self.group = group  # examples that stay together and in order (a preference pair: 2)
        self.samples_consumed = 0

    def state_dict(self) -> dict:
        return {"samples_consumed": self.samples_consumed, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.samples_consumed = int(state["samples_consumed"])

    def _stream(self, start: int) -> Iterator[Encoded]:
        """Examples from global index `start` on: epoch e is the permutation (of groups) seeded by (seed, e)."""
        g = self.group
        n = len(self.examples) // g
        epoch, offset = divmod(start // g, n)
        for e in itertools.count(epoch):
            order = list(range(n))
            random.Random(self.seed * 1_000_003 + e).shuffle(order)
            for i in order[offset:]:
                yield from self.examples[i * g:(i + 1) * g]
            offset = 0

    def _rows(self, batch: ModelBatch) -> ModelBatch:
        per_rank = batch.input_ids.shape[0] // self.world_size
        mine = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        return type(batch)(**{k: (v[mine] if v is not None else None) for k, v in vars(batch).items()})

    def global_rows(self, start: int) -> Iterator[tuple[list[list[Encoded]], int]]:
        """From example `start` on: each global batch as its rows (the examples each row holds) and the number of
        examples it consumed."""
        while True:
            stream = self._stream(start)
            if self.pack_length:
                rows, used = pack_rows(stream, self.global_batch_size, self.pack_length)
            else:
                used = self.global_batch_size
                rows = [[e] for e in itertools.islice(stream, used)]
            start += used
            yield rows, used

    def __iter__(self) -> Iterator[ModelBatch]:
        for rows, used in self.global_rows(self.samples_consumed):
            if self.pack_length:
                batch = collate_packed(rows, self.pad_id, self.pack_length)
            else:
                batch = collate_padded([row[0] for row in rows], self.pad_id)
            self.samples_consumed += used
            yield self._rows(batch)


def audit_batches(loader: ExampleLoader, num_steps: int, micro_batch_size: int, where: str) -> None:
    """The label audit of the batches themselves, before training: every micro-batch that any rank will step in
    the first `num_steps` global batches (a resumed run's included) holds a supervised token. Every rank checks
    every rank's share (the order is the same everywhere), so all stop together."""
    per_rank = loader.global_batch_size // loader.world_size
    for step, (rows, _) in enumerate(itertools.islice(loader.global_rows(0), num_steps), 1):
        counts = [sum(num_supervised(e) for e in row) for row in rows]  # (global rows,)
        for rank in range(loader.world_size):
            mine = counts[rank * per_rank:(rank + 1) * per_rank]
            for micro, at in enumerate(range(0, per_rank, micro_batch_size)):
                if not any(mine[at:at + micro_batch_size]):
                    raise UserError(f"label audit: step {step}'s micro-batch {micro + 1} on rank {rank} has no supervised "
                                    f"token (its {len(mine[at:at + micro_batch_size])} rows are all masked)", where)


def eval_batches(examples: list[Encoded], *, global_batch_size: int, rank: int, world_size: int, pad_id: int) -> Iterator[ModelBatch]:
    """Every evaluation example once, in order; the last global batch is filled with rows that have no targets."""
    filler = examples[0]
    for start in range(0, len(examples), global_batch_size):
        chunk = examples[start : start + global_batch_size]
        if filler.label is not None:
            chunk += [Encoded(ids=filler.ids, label=IGNORE_INDEX)] * (global_batch_size - len(chunk))
        else:
            chunk += [Encoded(ids=filler.ids, labels=[IGNORE_INDEX] * len(filler.labels), ref_logp=None if filler.ref_logp is None else 0.0)] * \
                (global_batch_size - len(chunk))
        batch = collate_padded(chunk, pad_id)
        per_rank = global_batch_size // world_size
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        yield type(batch)(**{k: (v[mine] if v is not None else None) for k, v in vars(batch).items()})
