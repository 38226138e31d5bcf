"""Pretraining engine: model building, parallel backends, the training loop, checkpoints, metrics."""
