"""Shared settings for the Ray integration tests: a tiny UNet on the real digits data."""

import re
import socket
from pathlib import Path

import torch

from fm.ema import EMA
from fm.models import UNet
from pipelines.core.checkpoint import save_checkpoint
from pipelines.train.config import load_config

TINY = [
    "model.model_channels=8",
    "model.num_heads=1",
    "model.attention_resolutions=[]",
    "train.batch_size=16",
    "train.log_every=4",
    "train.checkpoint_every=4",
    "train.sample_every=4",
    "train.grid_size=4",
    "train.grid_steps=2",
    "optim.warmup_steps=2",
    # no MLflow Model at the end (its torch.export costs 1.5 to 4 s a run); the tests of the MLflow Model and the
    # registry (the session's trained run, the bf16 run over HTTP) set it back
    "mlflow.log_model=false",
]


ROOT = Path(__file__).resolve().parents[1]


def tiny_config(shards: Path, storage: Path, tracking_uri: str, run_name: str, *extra: str):
    return load_config(
        str(ROOT / "configs/digits-cpu.yaml"),
        [
            *TINY,
            f"data.shards={shards}",
            f"train.storage_path={storage}",
            f"mlflow.tracking_uri={tracking_uri}",
            f"train.run_name={run_name}",
            "mlflow.experiment=tests",
            *extra,
        ],
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


KWARGS = {
    "image_size": 8,
    "in_channels": 1,
    "model_channels": 8,
    "channel_mult": [1, 2],
    "num_res_blocks": 1,
    "attention_resolutions": [],
    "num_heads": 1,
    "num_classes": None,
    "dropout": 0.0,
}
MANIFEST = {"source": "digits", "kind": "image", "shape": [8, 8, 1], "num_classes": 10, "class_names": []}


def make_checkpoint(directory, run_id=None, method="fm_ot", **overrides):
    """A checkpoint of a tiny digits-shaped UNet with random (non-trivial) weights, as training writes one."""
    torch.manual_seed(0)
    kwargs = {**KWARGS, **overrides}
    model = UNet(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()})
    for p in model.parameters():  # a fresh UNet predicts 0 (zero-initialised output); make it non-trivial
        torch.nn.init.normal_(p, std=0.05)
    return save_checkpoint(
        directory,
        step=1,
        model=model,
        ema_state=EMA(model).state_dict(),
        optimizer=None,
        model_name="unet",
        model_kwargs=kwargs,
        method_kwargs={"name": method},
        config={},
        manifest=MANIFEST,
        mlflow_run_id=run_id,
    )


def listening_addresses(pids: set[int]) -> set[tuple[str, int, str]]:
    """(address, port, process name) of every TCP socket that a process in `pids` listens on."""
    import psutil

    found = set()
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
            try:
                name = psutil.Process(conn.pid).name()
            except psutil.Error:
                continue
            found.add((conn.laddr.ip, conn.laddr.port, name))
    return found


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def wait_until_healthy(url: str, proc, what: str, timeout: float = 90.0) -> None:
    """Poll `url`/health until it answers; past `timeout`, kill `proc` and fail the test."""
    import time
    import urllib.request

    import pytest

    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            return
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"{what} did not come up in {timeout:.0f} s")
            time.sleep(0.5)


def start_mlflow_server(port: int, store: Path):
    """A real `mlflow server` on 127.0.0.1:`port` over `store`/server.db (in a session of its own, so that
    `kill_tree` reaches its workers); returns the process once it answers.

    Without MLflow 3's job execution (its GenAI jobs, which no test runs): by default the server also starts a job
    runner and seven huey consumers, about 11 s of CPU to start and a seventh of a core while it waits, polling
    (measured 2026-12-07: 24.4 against 5.7 core-seconds over its first 36 s; tests/README.md)."""
    import os
    import subprocess
    import sys

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{store / 'server.db'}",
            "--artifacts-destination",
            str(store / "server-artifacts"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    wait_until_healthy(f"http://127.0.0.1:{port}", proc, "mlflow server")
    return proc


def kill_tree(proc) -> None:
    """SIGKILL a process and every descendant (a server and its workers), by PID."""
    import psutil

    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def _no_ray(*args, **kwargs):
    raise AssertionError("the code under test started or joined a Ray cluster before refusing its input")


def before_ray():
    """A context in which Ray looks not started and `ray.init` fails the test: what runs inside it must refuse its
    input before any Ray work, whether or not the test session's Ray is up."""
    import pytest
    import ray

    patch = pytest.MonkeyPatch()
    patch.setattr(ray, "is_initialized", lambda: False)
    patch.setattr(ray, "init", _no_ray)

    class _Context:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            patch.undo()

    return _Context()


# a line of Ray's own C++ log ("[2026-12-06 22:22:26,449 E 16797 16797] (gcs_server) ..."), which the session's Ray
# forwards to this process's stderr whenever it likes, e.g. about an actor of an earlier test that it is stopping
_RAY_LOG_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\] .*$\n?", re.M)


def without_ray_logs(err: str) -> str:
    """A captured stderr without the lines that the session's Ray wrote into it (`_RAY_LOG_LINE`)."""
    return _RAY_LOG_LINE.sub("", err)


def tensors_by_path(state, prefix="") -> dict:
    """Every tensor of a (nested) state dict by its path."""

    if isinstance(state, torch.Tensor):
        return {prefix: state}
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, list | tuple) else []
    return {k: v for key, value in items for k, v in tensors_by_path(value, f"{prefix}/{key}").items()}
