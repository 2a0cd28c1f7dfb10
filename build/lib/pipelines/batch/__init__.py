"""Batch stages over a checkpoint: sampling into sample shards, and evaluation (likelihood, feature statistics)."""
