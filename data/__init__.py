"""Data pipeline: sources, tokenizer, packed token shards, mixtures and the distributed loader. Knows nothing about models."""
