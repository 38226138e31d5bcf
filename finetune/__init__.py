"""Fine-tuning and transfer on downstream tasks, reusing the pretraining engine."""
