"""What pretraining buys: stdlib-topic accuracy from the pretrained backbone against random initialisation.

For each transfer mode (linear probe = frozen backbone, LoRA, full fine-tuning) two runs with the same budget
(steps, batch, learning rates, seed) through the real CLI: `--from PARENT`, and `--from PARENT` with
`finetune.random_init=true` (the parent's architecture and tokenizer, fresh weights). Prints the held-out
accuracy of each, the gain in points, their ratio, the majority-class accuracy and the CPU model.

    python bench/finetune_transfer.py                      # pretrains configs/pretrain/tiny.yaml first
    python bench/finetune_transfer.py --parent runs/tiny   # an existing pretraining run
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

MODES = {"probe": ["finetune.mode=frozen"], "lora": ["finetune.mode=lora"], "full": ["finetune.mode=full"]}


def ember(*args: str) -> None:
    cmd = [sys.executable, "-m", "ember", *args]
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}")


def final_eval(run_dir: Path) -> dict:
    evals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]
    return evals[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parent", help="a pretraining run directory (default: pretrain configs/pretrain/tiny.yaml)")
    parser.add_argument("--out", default="runs/bench-transfer", help="where the runs go")
    parser.add_argument("--config", default="configs/finetune/stdlib-topic.yaml", help="the fine-tuning preset")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra --set for every fine-tuning run")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = Path(args.out)
    parent = Path(args.parent) if args.parent else out / "pretrain"
    started = time.time()
    if not args.parent:
        ember("pretrain", "configs/pretrain/tiny.yaml", "--set", f"run_dir={parent}", "--set", "tracking.wandb=disabled")
    rows = []
    for mode, sets in MODES.items():
        result = {}
        for init in ("pretrained", "random"):
            run_dir = out / f"{mode}-{init}"
            extra = ["finetune.random_init=true"] if init == "random" else []
            ember("finetune", args.config, "--from", str(parent), "--set", f"run_dir={run_dir}", "--set", "train.resume=false",
                  "--set", "tracking.wandb=disabled", *sum((["--set", s] for s in [*sets, *extra, *args.overrides]), []))
            result[init] = final_eval(run_dir)
        rows.append((mode, result))
    print(f"\nstdlib-topic, held-out accuracy after the same fine-tuning budget ({args.config}); CPU: {cpu_model()}")
    print(f"{'mode':<6} {'pretrained':>10} {'random init':>11} {'gain (pts)':>10} {'ratio':>6} {'majority':>8}")
    for mode, r in rows:
        p, q = r["pretrained"]["accuracy"], r["random"]["accuracy"]
        ratio = p / q if q else float("inf")
        print(f"{mode:<6} {p:>10.3f} {q:>11.3f} {100 * (p - q):>+10.1f} {ratio:>6.2f} {r['pretrained']['majority_accuracy']:>8.3f}")
    print(f"({rows[0][1]['pretrained']['num_examples']} held-out examples; {time.time() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
