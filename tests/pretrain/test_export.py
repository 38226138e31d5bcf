"""The HF export loads in plain transformers and computes what ember computed."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from ember_cli import run_ember  # noqa: E402
from pretrain_runs import records, trained_run  # noqa: E402

from ember.config import read_yaml, validate  # noqa: E402
from ember.run_config import RunConfig  # noqa: E402


@pytest.fixture(scope="module")
def run(small_dataset, tmp_path_factory) -> Path:
    return trained_run(small_dataset, tmp_path_factory)


def hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def test_export_reproduces_embers_final_validation_loss(run, small_dataset):
    """ember's own forward (in the loop) and plain transformers on the export see the same batches: same loss."""
    from ember.data.loader import build_loader

    cfg = validate(read_yaml(run / "config.yaml"), RunConfig)
    model = hf_model(run / "hf")
    val = build_loader([small_dataset], [1.0], split="val", seq_len=cfg.train.seq_len, global_batch_size=cfg.train.global_batch_sequences(1),
                       rank=0, world_size=1, seed=cfg.seed)
    losses = []
    with torch.no_grad():
        for _, batch in zip(range(cfg.train.eval_batches), val):
            for micro in batch.tokens.split(cfg.train.micro_batch_size):
                logits = model(input_ids=micro[:, :-1]).logits
                losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), micro[:, 1:].flatten()).item())
    final_eval = records(run, "eval")[-1]
    assert final_eval["step"] == 12
    assert sum(losses) / len(losses) == pytest.approx(final_eval["val_loss"], abs=1e-5)


def test_export_logits_equal_the_checkpoint_weights(run):
    """The export holds the final checkpoint's weights: logits within 1e-5 of ember's model (its training kernels
    included: oneDNN on non-Intel CPUs) loaded from the checkpoint."""
    from ember.pretrain.backends import load_full_weights
    from ember.pretrain.backends.parallelize import apply_model_techniques
    from ember.pretrain.model import build_meta_model, materialize

    cfg = validate(read_yaml(run / "config.yaml"), RunConfig)
    ours = build_meta_model(cfg.model)
    apply_model_techniques(ours, cfg.train, torch.device("cpu"))
    materialize(ours, "cpu")  # computes the RoPE buffers, which no checkpoint holds, and re-ties the head
    ours.load_state_dict(load_full_weights(run / "checkpoints" / "step_00000012"))
    ours.eval()
    theirs = hf_model(run / "hf")
    ids = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-5


def test_export_generates_text_with_its_tokenizer(run):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(run / "hf"))
    model = hf_model(run / "hf")
    assert model.config.eos_token_id == tok.eos_token_id
    ids = tok("def main(", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids.shape[1] and isinstance(tok.decode(out[0]), str)


def test_offline_export_of_a_checkpoint_matches_the_end_of_run_export(run, tmp_path):
    proc = run_ember("export", str(run / "checkpoints" / "step_00000012"), "--to", "hf", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours, end_of_run = load_file(tmp_path / "out" / "model.safetensors"), load_file(run / "hf" / "model.safetensors")
    assert ours.keys() == end_of_run.keys()
    assert all(torch.equal(ours[k], end_of_run[k]) for k in ours)
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    # A run directory exports its newest checkpoint.
    proc = run_ember("export", str(run), "--to", "hf", str(tmp_path / "out2"))
    assert proc.returncode == 0 and math.isclose(
        load_file(tmp_path / "out2" / "model.safetensors")["model.norm.weight"].sum().item(), ours["model.norm.weight"].sum().item())


def test_export_of_something_that_is_not_a_checkpoint_is_one_clear_error(tmp_path):
    proc = run_ember("export", str(tmp_path), "--to", "hf", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: no complete checkpoint")
    assert not (tmp_path / "out").exists()


def test_export_never_deletes_what_the_target_held(run, tmp_path):
    """A non-empty directory that holds no ember export is refused (exit 2, untouched) unless --overwrite, which
    keeps its other files; an earlier ember export has its own files replaced and the ones a user added kept."""
    target = tmp_path / "target"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    ckpt = str(run / "checkpoints" / "step_00000012")
    proc = run_ember("export", ckpt, "--to", "hf", str(target))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: the export target is a non-empty directory") and str(target) in lines[-1]
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"] and [p.name for p in target.iterdir()] == ["notes.txt"]

    proc = run_ember("export", ckpt, "--to", "hf", str(target), "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (target / "notes.txt").read_text() == "mine" and (target / "model.safetensors").is_file()
    end_of_run = load_file(run / "hf" / "model.safetensors")
    assert all(torch.equal(t, end_of_run[k]) for k, t in load_file(target / "model.safetensors").items())

    # Now an ember export: exported again without --overwrite; the user's files stay, the export's are replaced.
    (target / "README.md").write_text("model card")
    (target / "model.safetensors").write_bytes(b"stale")
    proc = run_ember("export", ckpt, "--to", "hf", str(target))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (target / "notes.txt").read_text() == "mine" and (target / "README.md").read_text() == "model card"
    assert load_file(target / "model.safetensors").keys() == end_of_run.keys()
    assert not (tmp_path / "target.tmp").exists()


def test_a_new_export_replaces_only_the_files_of_the_previous_one(tmp_path):
    from ember.errors import UserError
    from ember.pretrain.export_dir import MARKER, check_export_target, export_files, publish_export

    def stage(**files: str) -> Path:
        staged = tmp_path / "out.tmp"
        staged.mkdir()
        for name, text in files.items():
            (staged / name).write_text(text)
        return staged

    out = tmp_path / "out"
    publish_export(stage(**{"config.json": "1", "old_vocab.txt": "1"}), out)
    assert export_files(out) == {"config.json", "old_vocab.txt"} and not (tmp_path / "out.tmp").exists()
    (out / "notes.txt").write_text("mine")
    check_export_target(out, overwrite=False)  # an earlier ember export: allowed
    publish_export(stage(**{"config.json": "2", "vocab.json": "2"}), out)
    # Its own stale file goes, the new files are in place, the user's file stays.
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.json", "vocab.json", "notes.txt", MARKER])
    assert (out / "config.json").read_text() == "2" and (out / "notes.txt").read_text() == "mine"

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.bin").write_text("keep")
    with pytest.raises(UserError, match="holds no earlier ember export"):
        check_export_target(foreign, overwrite=False)
    check_export_target(foreign, overwrite=True)
    (foreign / "config.json").mkdir()  # a directory the export would have to replace: refused, not deleted
    with pytest.raises(UserError, match="directory named 'config.json'"):
        publish_export(stage(**{"config.json": "3"}), foreign)
    assert (foreign / "config.json").is_dir() and (foreign / "data.bin").read_text() == "keep"
    assert sorted(p.name for p in foreign.iterdir()) == ["config.json", "data.bin"] and not (tmp_path / "out.tmp").exists()
