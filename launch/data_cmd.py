"""`ember data`: tokenizer training, dataset preparation, inspection and verification."""

from __future__ import annotations

import argparse
from pathlib import Path


def _load_prepare_config(args: argparse.Namespace):
    from ember.config import load_config
    from ember.data.config import PrepareConfig

    return load_config(args.config, PrepareConfig, args.overrides, kind="data")


def run_prepare(args: argparse.Namespace) -> int:
    from ember.data.prepare import prepare

    prepare(_load_prepare_config(args), overwrite=args.overwrite, show_progress=not args.quiet)
    return 0


def run_tokenizer_train(args: argparse.Namespace) -> int:
    import logging
    import shutil

    from ember.data.prepare import train_tokenizer
    from ember.errors import UserError

    cfg = _load_prepare_config(args)
    out = Path(args.out) if args.out else Path(cfg.output_dir).parent / f"{Path(cfg.output_dir).name}-tokenizer"
    if out.exists() and not args.overwrite:
        raise UserError("tokenizer directory already exists; pass --overwrite to replace it", str(out))
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        train_tokenizer(cfg, tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logging.getLogger("ember.data").info("tokenizer saved to %s (use it with --set tokenizer=%s)", out, out)
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from ember.data.inspect import inspect_dataset

    inspect_dataset(Path(args.dir), num_samples=args.samples, split=args.split, max_chars=args.max_chars, seed=args.seed)
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from ember.data.manifest import verify_dataset
    from ember.errors import UserError

    manifest, problems = verify_dataset(Path(args.dir))
    if problems:
        for line in problems:
            print(f"corrupt: {line}")
        first = problems[0].split(":", 1)[0]
        raise UserError(f"dataset verification failed: {len(problems)} problem(s), first: {problems[0]}", f"{args.dir}/{first}")
    num_files = sum(len(manifest.shards(s)) for s in ("train", "val"))
    print(f"ok: {num_files} shards ({manifest.num_tokens('train'):,} train + {manifest.num_tokens('val'):,} val tokens), "
          f"checksums and tokenizer fingerprint match ({args.dir})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from ember.launch.options import add_set_option

    p = sub.add_parser("data", help="tokenizer training, dataset preparation, inspection and verification",
                       description="Prepare token-shard datasets and check them.")
    data_sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    pp = data_sub.add_parser("prepare", help="tokenise a source into token shards with a manifest",
                             description="Read a source, tokenise it in parallel and write shards + manifest.json atomically.",
                             epilog="Config fields: `ember config fields --kind data`.")
    pp.add_argument("config", help="data-prepare YAML or preset name in configs/data/ (e.g. stdlib)")
    pp.add_argument("--overwrite", action="store_true", help="replace an existing dataset at output_dir")
    pp.add_argument("--quiet", action="store_true", help="no progress bar and no summary table")
    add_set_option(pp)
    pp.set_defaults(func=run_prepare)

    tp = data_sub.add_parser("tokenizer", help="tokenizer commands", description="Tokenizer commands.")
    tok_sub = tp.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND", required=True)
    tt = tok_sub.add_parser("train", help="train a byte-level BPE on a config's source and save an HF tokenizer directory",
                            description="Train a byte-level BPE (settings: tokenizer_train.*) on the config's source.")
    tt.add_argument("config", help="data-prepare YAML or preset name in configs/data/ (its source and tokenizer_train are used)")
    tt.add_argument("--out", help="tokenizer directory to write (default: <output_dir>-tokenizer next to output_dir)")
    tt.add_argument("--overwrite", action="store_true", help="replace an existing tokenizer directory")
    add_set_option(tt)
    tt.set_defaults(func=run_tokenizer_train)

    ip = data_sub.add_parser("inspect", help="print a dataset's summary, token-length histogram and decoded samples",
                             description="Summarise a prepared dataset.")
    ip.add_argument("dir", help="prepared dataset directory (holds manifest.json)")
    ip.add_argument("--samples", type=int, default=3, help="number of decoded documents to print")
    ip.add_argument("--split", default="train", choices=["train", "val"], help="split the samples and histogram come from")
    ip.add_argument("--max-chars", type=int, default=400, help="print at most this many characters of each sample")
    ip.add_argument("--seed", type=int, default=0, help="seed choosing the sample documents")
    ip.set_defaults(func=run_inspect)

    vp = data_sub.add_parser("verify", help="recompute every checksum; names corrupt or missing shards (exit 2)",
                             description="Check every shard, index and the tokenizer against manifest.json.")
    vp.add_argument("dir", help="prepared dataset directory (holds manifest.json)")
    vp.set_defaults(func=run_verify)
