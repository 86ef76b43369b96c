"""Launching: where a process sits in a job (torchrun, SLURM or a single process)."""
