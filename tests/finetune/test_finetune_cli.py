"""`ember finetune` through the real CLI on a tiny pretrained parent: stdlib-topic in every transfer mode, the
exports, what each mode may change, bad input, and 2-process fine-tuning against one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from ember_cli import run_ember, run_torchrun
from safetensors.torch import load_file

from pretrain_runs import records

# Small and quick: 64 training examples of at most 32 tokens, 4 steps, an evaluation every 2.
TOPIC = ["finetune.max_train_examples=64", "finetune.max_eval_examples=48", "finetune.max_length=32", "train.max_steps=4", "train.warmup_steps=0", "train.eval_every=2",
         "train.global_batch_size=8", "train.micro_batch_size=4", "train.lr=3e-3", "train.log_every=1",
         "train.cpu_matmul=torch", "train.precision=fp32", "tracking.wandb=disabled"]


def finetune(config: Path, parent: Path, run_dir: Path, *sets: str, nproc: int = 0, expect: int = 0):
    args = ["finetune", str(config), "--from", str(parent), "--set", f"run_dir={run_dir}",
            *[a for s in (*TOPIC, *sets) for a in ("--set", s)]]
    proc = run_torchrun(nproc, *args) if nproc else run_ember(*args)
    assert proc.returncode == expect, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def builtin_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "topic.yaml"
    path.write_text(yaml.safe_dump({"finetune": {"task": "stdlib-topic"}}))
    return path


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    """stdlib-topic's examples written once to a jsonl file task: the mode and backend runs skip parsing the stdlib."""
    from ember.finetune.config import FinetuneConfig
    from ember.finetune.tasks import load_task

    task = load_task(FinetuneConfig(task="stdlib-topic", max_train_examples=80, max_eval_examples=40), 0.05, 7)
    root = tmp_path_factory.mktemp("cfg")
    (root / "topic.jsonl").write_text("".join(json.dumps(e) + "\n" for e in task.train + task.eval))
    path = root / "topic-file.yaml"
    path.write_text(yaml.safe_dump({"finetune": {"task": str(root / "topic.jsonl"), "kind": "classification",
                                                 "labels": task.labels, "eval_fraction": 0.3}}))
    return path


_RUNS: dict[tuple, Path] = {}


def mode_run(parent: Path, config: Path, tmp_path_factory, *sets: str) -> Path:
    """One single-process fine-tuning run per distinct `--set` list, shared by the tests."""
    key = (config, *sets)
    if key not in _RUNS:
        run_dir = tmp_path_factory.mktemp("ft") / "run"
        finetune(config, parent, run_dir, *sets)
        _RUNS[key] = run_dir
    return _RUNS[key]


def two_rank_run(parent: Path, config: Path, tmp_path_factory, backend: str, *sets: str, zero_stage: int = 2) -> Path:
    """One torchrun launch (2 ranks) per distinct backend and `--set` list, shared by the tests."""
    key = ("2 ranks", config, backend, zero_stage, *sets)
    if key not in _RUNS:
        run_dir = tmp_path_factory.mktemp("ft2") / "run"
        finetune(config, parent, run_dir, f"train.backend={backend}", f"train.zero_stage={zero_stage}", *sets, nproc=2)
        _RUNS[key] = run_dir
    return _RUNS[key]


def assert_same_losses_per_step(one: Path, two: Path, steps: int = 4) -> None:
    single, double = records(one, "train"), records(two, "train")
    assert [r["step"] for r in double] == [r["step"] for r in single] == list(range(1, steps + 1))
    for a, b in zip(single, double):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4), (a["step"], a["loss"], b["loss"])
    evals_one, evals_two = records(one, "eval"), records(two, "eval")
    assert [r["step"] for r in evals_two] == [r["step"] for r in evals_one]
    for a, b in zip(evals_one, evals_two):
        assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-4), (a["step"], a["val_loss"], b["val_loss"])


def parent_weights(parent: Path) -> dict[str, torch.Tensor]:
    return load_file(parent / "hf" / "model.safetensors")


def export_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "hf" / "model.safetensors")


def changed(run_dir: Path, parent: Path) -> set[str]:
    """Backbone tensors of the export that differ (bitwise) from the parent's."""
    before, after = parent_weights(parent), export_weights(run_dir)
    return {name for name, t in after.items() if name in before and not torch.equal(t, before[name])}


@pytest.mark.slow
def test_full_run_records_eval_metrics_and_the_parent_and_exports_a_classifier(parent, builtin_config, tmp_path_factory):
    from transformers import AutoModelForSequenceClassification

    run = mode_run(parent, builtin_config, tmp_path_factory)
    start = records(run, "finetune")[0]
    assert start["parent_run_dir"] == str(parent) and start["parent_step"] == 6
    saved = yaml.safe_load((run / "config.yaml").read_text())["finetune"]
    assert saved["parent_run_dir"] == str(parent) and saved["parent_step"] == 6
    evals = records(run, "eval")
    assert [r["step"] for r in evals] == [0, 2, 4]  # the starting model, then every 2 steps
    for r in evals:
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["macro_f1"] <= 1
        assert r["num_examples"] == sum(map(sum, r["confusion"])) == start["num_eval_examples"] > 0
    summary = records(run, "summary")[-1]
    assert summary["parent_step"] == 6 and summary["best_step"] in (2, 4)
    assert (run / "confusion.png").stat().st_size > 0
    model = AutoModelForSequenceClassification.from_pretrained(run / "hf")
    assert model.config.num_labels == 10 and len(model.config.id2label) == 10
    assert changed(run, parent)  # full fine-tuning moved the backbone


@pytest.mark.slow
def test_frozen_mode_leaves_every_backbone_parameter_bitwise_unchanged(parent, config, tmp_path_factory):
    run = mode_run(parent, config, tmp_path_factory, "finetune.mode=frozen")
    assert changed(run, parent) == set()
    losses = [r["loss"] for r in records(run, "train")]
    assert losses[-1] != losses[0]  # the head did train


@pytest.mark.slow
def test_last_k_changes_only_those_blocks(parent, config, tmp_path_factory):
    run = mode_run(parent, config, tmp_path_factory, "finetune.mode=last_k", "finetune.last_k=1")
    moved = changed(run, parent)
    assert moved and all(name.startswith("model.layers.1.") for name in moved), moved


@pytest.mark.slow
def test_lora_trains_only_adapters_and_the_merged_export_equals_base_plus_adapter(parent, config, tmp_path_factory):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    run = mode_run(parent, config, tmp_path_factory, "finetune.mode=lora", "finetune.lora.rank=4")
    # Merged, only the adapted projections differ from the parent: everything else was frozen.
    moved = changed(run, parent)
    assert moved and all(name.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj", "o_proj") for name in moved), moved
    merged = AutoModelForSequenceClassification.from_pretrained(run / "hf").eval()
    base = AutoModelForSequenceClassification.from_pretrained(parent / "hf", num_labels=10,
                                                              pad_token_id=merged.config.pad_token_id)
    adapted = PeftModel.from_pretrained(base, run / "adapter").eval()
    ids = torch.randint(2, merged.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - adapted(input_ids=ids).logits).abs().max() < 1e-5


@pytest.mark.slow
@pytest.mark.distributed
# Classification, full and LoRA, on fsdp and on DeepSpeed (ZeRO-1 and ZeRO-3; packed SFT below takes ZeRO-2).
@pytest.mark.parametrize("backend, mode, zero_stage", [("fsdp", "full", 2), ("fsdp", "lora", 2), ("deepspeed", "full", 1),
                                                       ("deepspeed", "lora", 3)])
def test_two_processes_match_one_per_step(parent, config, tmp_path_factory, backend, mode, zero_stage):
    sets = ["finetune.mode=lora", "finetune.lora.rank=4"] if mode == "lora" else ["finetune.mode=full"]
    one = mode_run(parent, config, tmp_path_factory, *sets)
    two = two_rank_run(parent, config, tmp_path_factory, backend, *sets, zero_stage=zero_stage)
    assert_same_losses_per_step(one, two)


@pytest.fixture(scope="module")
def sft_config(tmp_path_factory) -> Path:
    """stdlib-docstring examples (signature and docstring -> body) of four packages' short functions, as a jsonl
    file task with packing: many packed rows hold two examples."""
    from ember.finetune.tasks import stdlib_functions

    functions = [f for f in stdlib_functions(0.05, {"email", "json", "logging", "xml"})
                 if f.has_docstring and f.body.strip() and len(f.header) + len(f.body) < 160]
    root = tmp_path_factory.mktemp("sft")
    (root / "docstring.jsonl").write_text("".join(json.dumps({"prompt": f.header, "response": f.body}) + "\n" for f in functions))
    path = root / "docstring.yaml"
    path.write_text(yaml.safe_dump({"finetune": {"task": str(root / "docstring.jsonl"), "kind": "sft", "packing": True,
                                                 "eval_fraction": 0.2}}))
    return path


SFT_PACKED = ("finetune.max_length=128", "finetune.max_eval_examples=16", "train.eval_every=4")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"])
def test_packed_sft_on_two_processes_matches_one_per_step(parent, sft_config, tmp_path_factory, backend):
    one = mode_run(parent, sft_config, tmp_path_factory, *SFT_PACKED)
    two = two_rank_run(parent, sft_config, tmp_path_factory, backend, *SFT_PACKED)
    assert records(one, "finetune")[0]["task_kind"] == "sft"
    assert records(two, "train")[-1]["samples_consumed"] > 4 * 8  # more examples than rows: packed
    assert_same_losses_per_step(one, two)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_run_resumes_bit_exact(parent, config, tmp_path_factory):
    whole = two_rank_run(parent, config, tmp_path_factory, "fsdp", "finetune.mode=full")
    cut = tmp_path_factory.mktemp("cut") / "run"
    finetune(config, parent, cut, "train.backend=fsdp", "train.zero_stage=2", "train.stop_after_steps=2", nproc=2)
    finetune(config, parent, cut, "train.backend=fsdp", "train.zero_stage=2", nproc=2)
    assert [r["loss"] for r in records(cut, "train")] == [r["loss"] for r in records(whole, "train")]
    assert records(cut, "eval")[-1]["accuracy"] == records(whole, "eval")[-1]["accuracy"]


# ---------------------------------------------------------------- early stopping, best weights, class weights, head rate

# An evaluation after every step, patience 1: the run stops at the first evaluation whose accuracy is not above the
# best before it; every step's checkpoint is kept.
SELECTION = ("finetune.mode=full", "train.max_steps=8", "train.eval_every=1", "finetune.early_stopping_patience=1",
             "train.keep_last=10")
# The same schedule stopped after step 1, with the head at 4x the rate and every class weighted 2.
HEAD_AND_WEIGHTS = ("finetune.mode=full", "train.max_steps=8", "train.eval_every=8", "train.stop_after_steps=1",
                    "finetune.head_lr=1.2e-2", "finetune.class_weights=[2, 2, 2, 2, 2, 2, 2, 2, 2, 2]")


def checkpoint_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    from ember.pretrain.backends import load_full_weights

    return load_full_weights(run_dir / "checkpoints" / f"step_{step:08d}")


@pytest.fixture(scope="module")
def selection_run(parent, config, tmp_path_factory) -> Path:
    return mode_run(parent, config, tmp_path_factory, *SELECTION)


@pytest.mark.slow
def test_early_stopping_ends_the_run_at_the_first_evaluation_without_gain(selection_run):
    evals = [r for r in records(selection_run, "eval") if r["step"] > 0]
    best, first_without_gain = -1.0, None
    for r in evals:
        if r["accuracy"] <= best:
            first_without_gain = r["step"]
            break
        best = r["accuracy"]
    assert first_without_gain is not None and first_without_gain < 8, [r["accuracy"] for r in evals]
    summary = records(selection_run, "summary")[-1]
    assert summary["stopped_early"] and summary["step"] == first_without_gain
    assert [r["step"] for r in records(selection_run, "train")] == list(range(1, first_without_gain + 1))
    assert evals[-1]["step"] == first_without_gain


@pytest.mark.slow
def test_the_export_holds_the_weights_of_the_best_evaluation(selection_run):
    evals = [r for r in records(selection_run, "eval") if r["step"] > 0]
    best = max(evals, key=lambda r: r["accuracy"])  # the first of equals: a later tie is no gain
    summary = records(selection_run, "summary")[-1]
    assert summary["best_step"] == best["step"] < summary["step"] and summary["best_accuracy"] == best["accuracy"]
    exported = export_weights(selection_run)
    at_best, at_end = checkpoint_weights(selection_run, best["step"]), checkpoint_weights(selection_run, summary["step"])
    shared = sorted(set(exported) & set(at_best))
    assert "score.weight" in shared and len(shared) == len(at_best), set(at_best) - set(exported)
    assert all(torch.equal(exported[n], at_best[n]) for n in shared)
    assert not all(torch.equal(exported[n], at_end[n]) for n in shared)  # the last step's weights were not exported


@pytest.mark.slow
def test_class_weights_scale_the_loss_and_the_head_trains_at_its_own_rate(parent, config, tmp_path_factory, selection_run):
    run = mode_run(parent, config, tmp_path_factory, *HEAD_AND_WEIGHTS)
    plain, weighted = records(selection_run, "train")[0], records(run, "train")[0]
    assert plain["step"] == weighted["step"] == 1 and plain["lr"] == weighted["lr"]
    # The loss is sum_i w[y_i] * CE_i / (labelled rows): weights of 2 double it (a weighted mean would not).
    assert weighted["loss"] == pytest.approx(2 * plain["loss"], rel=1e-6)
    # Both runs start from the same weights on the same batch; Adam's first update moves each weight by its
    # group's rate (|m / sqrt(v)| = 1 at step 1), so the head moves (4 - 1) x lr further, the backbone no further.
    lr = plain["lr"]
    a, b = checkpoint_weights(selection_run, 1), checkpoint_weights(run, 1)
    head = ((b["score.weight"] - a["score.weight"]).abs() / (3 * lr)).median()
    assert float(head) == pytest.approx(1.0, abs=0.03)
    body = torch.cat([(b[n] - a[n]).abs().flatten() / lr for n in a if n != "score.weight"]).median()
    assert float(body) < 0.01


# ---------------------------------------------------------------- bad input


def one_error_line(proc) -> str:
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def test_from_a_directory_that_is_neither_a_run_nor_an_hf_model(builtin_config, tmp_path):
    config = builtin_config
    (tmp_path / "junk").mkdir()
    proc = run_ember("finetune", str(config), "--from", str(tmp_path / "junk"), "--set", f"run_dir={tmp_path / 'out'}")
    assert "neither an ember run" in one_error_line(proc)
    assert not (tmp_path / "out").exists()


def test_bad_task_input_is_a_user_error_that_writes_nothing(parent, tmp_path):
    """In process (the CLI's one-line, exit-2 rendering of a UserError is checked above): each bad task file
    stops the run before anything is written."""
    from ember.config import load_config
    from ember.errors import UserError
    from ember.finetune.run import finetune as run_finetune
    from ember.run_config import FinetuneRunConfig

    config_file = tmp_path / "cls.yaml"
    config_file.write_text(yaml.safe_dump({"finetune": {"task": "unused"}}))

    def attempt(records_, *sets) -> str:
        task = tmp_path / "task.jsonl"
        task.write_text("".join(json.dumps(r) + "\n" for r in records_))
        out = tmp_path / "out"
        cfg = load_config(config_file, FinetuneRunConfig, [f"run_dir={out}", f"finetune.task={task}", f"finetune.init_from={parent}",
                                                           "finetune.kind=classification", *sets], kind="finetune")
        with pytest.raises(UserError) as error:
            run_finetune(cfg)
        assert not out.exists(), error.value.line()
        return error.value.line()

    two_classes = [{"text": f"text {i}", "label": "xy"[i % 2]} for i in range(40)]
    assert "no field 'label'" in attempt([{"text": "a"}, {"text": "b", "label": "x"}])
    assert "not in the label set" in attempt([{"text": "a", "label": "z"}], "finetune.labels=[x, y]")
    assert "no examples" in attempt([])
    assert "match no linear layer" in attempt(two_classes, "finetune.mode=lora", "finetune.lora.target_modules=[nope]")
    # Every prompt fills max_length: the label audit stops the run before anything is written, naming the field.
    masked = attempt([{"prompt": f"def f{i}(x):\n    return x + {i}\n" * 8, "response": "pass"} for i in range(40)],
                     "finetune.kind=sft", "finetune.max_length=8")
    assert "label audit: none of the" in masked and f"{tmp_path / 'task.jsonl'}: field response (training examples)" in masked


def test_a_checkpoint_whose_vocabulary_differs_from_the_tokenizer(parent, builtin_config, tmp_path):
    config = builtin_config
    import shutil

    hf = tmp_path / "hf"
    shutil.copytree(parent / "hf", hf)
    cfg = json.loads((hf / "config.json").read_text())
    cfg["vocab_size"] = 100  # smaller than the tokenizer's 512
    (hf / "config.json").write_text(json.dumps(cfg))
    proc = run_ember("finetune", str(config), "--from", str(hf), "--set", f"run_dir={tmp_path / 'out'}")
    assert "vocabulary" in one_error_line(proc)
    assert not (tmp_path / "out").exists()
