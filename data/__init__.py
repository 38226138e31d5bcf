"""Data pipeline: sources, tokenizer, packed token shards, mixtures and the distributed loader. Knows nothing about models.

Public API (see the modules for details):
- `config.PrepareConfig`: what `ember data prepare` reads (source, output_dir, tokenizer, filters, ...).
- `prepare.prepare(cfg)` / `prepare.ensure_prepared(entry)`: build a dataset directory (atomically).
- `manifest.read_manifest(dir)`: vocab_size, eos_id, pad_id, dtype, tokenizer_dir, num_tokens(split).
- `tokenizer.load_tokenizer(path)`: an HF fast tokenizer.
- `loader.build_loader(dirs, weights, ...)`: the deterministic, resumable, rank-sliced batch iterator.
"""
