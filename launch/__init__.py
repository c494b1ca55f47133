"""Launchers: local sweeps, SLURM, TPU pods."""
