"""Shared settings for the Ray integration tests: a tiny UNet on the real digits data."""

import socket
from pathlib import Path

from pipelines.config import load_config

TINY = [
    "model.model_channels=8", "model.num_heads=1", "model.attention_resolutions=[]", "train.batch_size=16",
    "train.log_every=4", "train.checkpoint_every=4", "train.sample_every=4", "train.grid_size=4",
    "train.grid_steps=2", "optim.warmup_steps=2", "data.cache=true", "data.repeat=4",
]


def tiny_config(shards: Path, storage: Path, tracking_uri: str, run_name: str, *extra: str):
    return load_config("configs/digits-cpu.yaml", [
        *TINY, f"data.shards={shards}", f"train.storage_path={storage}", f"mlflow.tracking_uri={tracking_uri}",
        f"train.run_name={run_name}", "mlflow.experiment=tests", *extra])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
