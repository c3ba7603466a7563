"""Cluster helpers: bring a single-node Slurm up on this machine for tests, CI and demos."""
