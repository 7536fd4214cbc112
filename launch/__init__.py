"""Launchers: sweeps of fedkd.main runs (``python -m launch.sweep``), Cloud TPU VMs, SLURM."""
