"""What pretraining buys: stdlib-topic accuracy from the pretrained backbone against random initialisation.

For each transfer mode (linear probe = frozen backbone, LoRA, full fine-tuning) two runs with the same budget
(steps, batch, learning rates, seed) through the real CLI: `--from PARENT`, and `--from PARENT` with
`finetune.random_init=true` (the parent's architecture and tokenizer, fresh weights). Prints the held-out
accuracy of each, the gain in points, their ratio, the majority-class accuracy of the same evaluation set and the
CPU model.

The parent is pretrained here by default: the tiny preset for 600 steps (2.5M tokens, three times the preset's
200, as long as the bench's ~20 minutes on 2 cores allow) on the built-in corpus prepared with a held-out
fraction of 0.2 (instead of the corpus preset's 0.02), so that the files pretraining never saw hold
enough functions of every class for a balanced evaluation set (at most 50 per class: 480 functions, asyncio
has only 30 held out). The settings of each mode are the preset's (configs/finetune/stdlib-topic.yaml: 60 steps
of 16, lr 1e-3, head lr 3e-3), except the probe's head learning rate, chosen once from PROBE_HEAD_LRS by the
mean accuracy of the pretrained and random-init probes on a validation split carved from the training files
(`--validate`: evaluation on the 10% of files just above the held-out range, which then leave the training set;
the held-out files are not looked at). The same settings serve both initialisations.

    python bench/finetune_transfer.py                          # prepare + pretrain the parent, then 6 runs
    python bench/finetune_transfer.py --parent runs/bench-transfer/pretrain   # an existing parent
    python bench/finetune_transfer.py --parent ... --validate  # the probe's choice, on the validation split
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ember.pretrain.cpu_matmul import cpu_model

HELDOUT_FRACTION = 0.2
PARENT_STEPS = 600
EVAL_PER_CLASS = 50
PROBE_HEAD_LRS = (3e-3, 3e-2)
PROBE_HEAD_LR = 3e-2  # chosen by `--validate` (see bench/RESULTS.md)
MODES = {"probe": ["finetune.mode=frozen", f"finetune.head_lr={PROBE_HEAD_LR}"], "lora": ["finetune.mode=lora"],
         "full": ["finetune.mode=full"]}


def ember(*args: str) -> None:
    cmd = [sys.executable, "-m", "ember", *args]
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}")


def final_eval(run_dir: Path) -> dict:
    evals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]
    return evals[-1]


def pretrain_parent(out: Path) -> Path:
    """The built-in corpus with a 0.2 held-out fraction, and the tiny preset pretrained on it."""
    data, parent = out / "data", out / "pretrain"
    if not (data / "manifest.json").is_file():
        ember("data", "prepare", "configs/data/stdlib.yaml", "--set", f"output_dir={data}", "--set", f"val_fraction={HELDOUT_FRACTION}")
    ember("pretrain", "configs/pretrain/tiny.yaml", "--set", f"run_dir={parent}", "--set", f"data.datasets=[{{path: {data}}}]",
          "--set", f"train.max_steps={PARENT_STEPS}", "--set", "train.warmup_steps=30",
          "--set", f"train.eval_every={PARENT_STEPS // 2}", "--set", f"train.checkpoint_every={PARENT_STEPS // 2}",
          "--set", "tracking.wandb=disabled")
    return parent


def finetune(config: str, parent: Path, run_dir: Path, sets: list[str]) -> dict:
    ember("finetune", config, "--from", str(parent), "--set", f"run_dir={run_dir}", "--set", "train.resume=false",
          "--set", "tracking.wandb=disabled", *sum((["--set", s] for s in sets), []))
    return final_eval(run_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parent", help="a pretraining run directory (default: prepare and pretrain one, see above)")
    parser.add_argument("--out", default="runs/bench-transfer", help="where the runs go")
    parser.add_argument("--config", default="configs/finetune/stdlib-topic.yaml", help="the fine-tuning preset")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of: " + ", ".join(MODES))
    parser.add_argument("--validate", action="store_true", help="choose the probe's head lr on a validation split of the training files")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra --set for every fine-tuning run")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = Path(args.out)
    started = time.time()
    parent = Path(args.parent) if args.parent else pretrain_parent(out)
    common = [f"finetune.max_eval_examples={EVAL_PER_CLASS * 10}", "train.eval_every=60", *args.overrides]
    if args.validate:
        common.append("finetune.validation_fraction=0.1")
        modes = {f"probe@{lr:g}": ["finetune.mode=frozen", f"finetune.head_lr={lr}"] for lr in PROBE_HEAD_LRS}
    else:
        modes = {mode: MODES[mode] for mode in args.modes.split(",")}
    rows = []
    for mode, sets in modes.items():
        result = {}
        for init in ("pretrained", "random"):
            extra = ["finetune.random_init=true"] if init == "random" else []
            result[init] = finetune(args.config, parent, out / f"{mode}-{init}{'-validation' if args.validate else ''}",
                                    [*sets, *extra, *common])
        rows.append((mode, result))
    split = "validation (training files)" if args.validate else "held-out"
    print(f"\nstdlib-topic, {split} accuracy after the same fine-tuning budget ({args.config}); CPU: {cpu_model()}")
    print(f"{'mode':<11} {'pretrained':>10} {'random init':>11} {'gain (pts)':>10} {'ratio':>6} {'majority':>8}")
    for mode, r in rows:
        p, q = r["pretrained"]["accuracy"], r["random"]["accuracy"]
        ratio = p / q if q else float("inf")
        print(f"{mode:<11} {p:>10.3f} {q:>11.3f} {100 * (p - q):>+10.1f} {ratio:>6.2f} {r['pretrained']['majority_accuracy']:>8.3f}")
    if args.validate:
        best = max(rows, key=lambda row: row[1]["pretrained"]["accuracy"] + row[1]["random"]["accuracy"])
        print(f"probe head lr by the mean of both: {best[0]}")
    print(f"({rows[0][1]['pretrained']['num_examples']} {split} examples; {time.time() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
