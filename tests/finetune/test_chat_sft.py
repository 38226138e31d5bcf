"""SFT from chat messages and from Hugging Face datasets, with the parent's real tokenizer and real dataset files:
the loss lands on the assistant turns only, with the tokenizer's chat template or the built-in one."""

from __future__ import annotations

import json
import shutil

import pytest

from ember.errors import UserError
from ember.finetune.config import FinetuneConfig
from ember.finetune.data import audit_labels, encode_sft, load_tokenizer
from ember.finetune.tasks import load_task
from ember.pretrain.fused_loss import IGNORE_INDEX

CHAT = [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 4 + 4?"},
        {"role": "assistant", "content": "8"}, {"role": "user", "content": "Thanks."}]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tokenizer(small_dataset):
    return load_tokenizer(small_dataset / "tokenizer")


@pytest.fixture(scope="module")
def chatml_tokenizer(small_dataset, tmp_path_factory):
    """The same tokenizer with a chat template of its own in tokenizer_config.json."""
    directory = tmp_path_factory.mktemp("chatml") / "tokenizer"
    shutil.copytree(small_dataset / "tokenizer", directory)
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    config_file.write_text(json.dumps({**config, "chat_template": CHATML}))
    return load_tokenizer(directory)


def supervised_runs(tokenizer, example) -> list[str]:
    """The target tokens, decoded per run of consecutive supervised positions."""
    runs: list[list[int]] = [[]]
    for target in example.labels:
        if target == IGNORE_INDEX:
            runs.append([])
        else:
            runs[-1].append(target)
    return [tokenizer.decode(run) for run in runs if run]


def test_builtin_template_supervises_exactly_the_assistant_turns(tokenizer):
    assert tokenizer.chat_template is None  # ember's trained tokenizers bring no template
    [example] = encode_sft([{"messages": CHAT}], tokenizer, tokenizer.eos_token_id, max_length=512)
    eos = tokenizer.eos_token
    # The turns up to the last assistant turn, each a role line, its content and an end marker; then the eos.
    rendered = "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in CHAT[:5]) + eos
    assert tokenizer.decode(example.ids) == rendered
    assert supervised_runs(tokenizer, example) == ["5<|end|>\n", f"8<|end|>\n{eos}"]


def test_the_tokenizers_own_chat_template_is_used(chatml_tokenizer):
    [example] = encode_sft([{"messages": CHAT}], chatml_tokenizer, chatml_tokenizer.eos_token_id, max_length=512)
    text = chatml_tokenizer.decode(example.ids)
    assert text.startswith("<|im_start|>system\nAnswer with a number.<|im_end|>\n") and "<|end|>" not in text
    assert supervised_runs(chatml_tokenizer, example) == ["5<|im_end|>\n", f"8<|im_end|>\n{chatml_tokenizer.eos_token}"]


def test_a_template_that_masks_everything_fails_the_label_audit(tokenizer):
    no_answer = [{"messages": [{"role": "user", "content": "hello?"}]}] * 4
    encoded = encode_sft(no_answer, tokenizer, tokenizer.eos_token_id, max_length=64)
    assert all(t == IGNORE_INDEX for e in encoded for t in e.labels)
    with pytest.raises(UserError, match="label audit: none of the 4 examples"):
        audit_labels(encoded, "chat.jsonl: field messages")


def test_a_template_that_rewrites_earlier_turns_is_an_error(small_dataset, tmp_path):
    directory = tmp_path / "tokenizer"
    shutil.copytree(small_dataset / "tokenizer", directory)
    config_file = directory / "tokenizer_config.json"
    counting = "{{ messages | length }} turns\n{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "chat_template": counting}))
    tokenizer = load_tokenizer(directory)
    with pytest.raises(UserError, match="turn by turn") as error:
        encode_sft([{"messages": CHAT}], tokenizer, tokenizer.eos_token_id, 64, "chat.jsonl")
    assert error.value.line().endswith("(chat.jsonl: example 1)")


def test_malformed_messages_name_the_example(tokenizer):
    with pytest.raises(UserError, match="list of {role, content}") as error:
        encode_sft([{"messages": CHAT}, {"messages": [{"role": "user"}]}], tokenizer, 0, 64, "chat.jsonl")
    assert "chat.jsonl: example 2" in error.value.line()


def chats(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": str(i)}]} for i in range(n)]


def test_a_save_to_disk_dataset_of_chats_is_an_sft_task(tokenizer, tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(chats(30))}).save_to_disk(str(tmp_path / "chats"))
    task = load_task(FinetuneConfig(task=str(tmp_path / "chats"), kind="sft", eval_fraction=0.3), 0.05, 0)
    assert task.kind == "sft" and task.train and task.eval
    assert sorted(e["messages"][1]["content"] for e in task.train + task.eval) == sorted(str(i) for i in range(30))
    encoded = audit_labels(encode_sft(task.train, tokenizer, tokenizer.eos_token_id, 64), "chats")
    for example, record in zip(encoded, task.train):
        assert supervised_runs(tokenizer, example) == [f"{record['messages'][1]['content']}<|end|>\n{tokenizer.eos_token}"]
    with pytest.raises(UserError, match="no split 'validation'"):
        load_task(FinetuneConfig(task=str(tmp_path / "chats"), kind="sft", hub_split="validation"), 0.05, 0)


def test_a_dataset_that_load_dataset_resolves_is_an_sft_task(tmp_path):
    (tmp_path / "pairs").mkdir()
    records = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(20)]
    (tmp_path / "pairs" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    task = load_task(FinetuneConfig(task=f"hf:{tmp_path / 'pairs'}", kind="sft", eval_fraction=0.3), 0.05, 0)
    assert sorted(task.train + task.eval, key=lambda e: int(e["prompt"][1:])) == records
    with pytest.raises(UserError, match="cannot load the dataset") as error:
        load_task(FinetuneConfig(task=f"hf:{tmp_path / 'missing'}", kind="sft"), 0.05, 0)
    assert f"hf:{tmp_path / 'missing'}" in error.value.line()
