"""Security: the servers the project starts on this machine listen on loopback only."""

import subprocess
import sys

import psutil
import pytest
from pipeline_helpers import LOOPBACK, free_port, kill_tree, listening_addresses, wait_until_healthy

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


def test_mlflow_ui_as_the_readme_starts_it_listens_on_loopback_only(tmp_path):
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri",
                           f"sqlite:///{tmp_path / 'mlflow.db'}", "--port", str(port)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", ui, "mlflow ui")
        pids = {ui.pid, *(p.pid for p in psutil.Process(ui.pid).children(recursive=True))}
        sockets = listening_addresses(pids)
        assert any(port == p for _, p, _ in sockets)
        assert {s for s in sockets if s[0] not in LOOPBACK} == set()
    finally:
        kill_tree(ui)
        ui.wait()
