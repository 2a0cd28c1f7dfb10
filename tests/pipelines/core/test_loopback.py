"""Security: the servers the project starts on this machine listen on loopback only (`mlflow ui` as the README starts
it: tests/pipelines/test_quality_while_training.py, over the session's trained run)."""

import psutil
import pytest
from pipeline_helpers import LOOPBACK, listening_addresses

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_the_embedded_local_ray_listens_on_loopback_only(ray_local):
    """The session's Ray, started by this process as every job starts it (`init_ray`): with tasks and Ray Data's
    actors running, every socket this process and its descendants listen on is on loopback."""
    import os

    import ray

    ray.get([ray.remote(lambda: os.getpid()).remote() for _ in range(4)])
    ray.data.range(64).map_batches(lambda b: b, concurrency=2).materialize()  # Ray Data's actors too
    pids = {os.getpid(), *(p.pid for p in psutil.Process().children(recursive=True))}
    sockets = listening_addresses(pids)
    names = {name for _, _, name in sockets}
    assert {"gcs_server", "raylet"} <= names and len(sockets) >= 8  # GCS, raylet, agents, workers, dashboard
    assert {s for s in sockets if s[0] not in LOOPBACK} == set()
