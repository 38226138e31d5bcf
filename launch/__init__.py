"""Command line and process launchers (torchrun, SLURM, Kubernetes)."""
