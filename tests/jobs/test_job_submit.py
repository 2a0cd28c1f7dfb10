"""`ray job submit` against a real head started with `ray start --head`; the job's last log line is JSON."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient
from pipeline_helpers import LOOPBACK, TINY, free_port, listening_addresses

pytestmark = [pytest.mark.slow, pytest.mark.heavy, pytest.mark.timeout(600)]  # `make heavy` (CI runs it)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def ray_head(tmp_path):
    bin_dir = Path(sys.executable).parent
    # as the README starts a local head: loopback only (Ray's node address is 127.0.0.1 with clusters off), and
    # the job runs the `python` of this PATH
    env = dict(
        os.environ,
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    )
    env.pop("RAY_ADDRESS", None)
    dash = free_port()
    ray = shutil.which("ray", path=env["PATH"])
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Unix socket paths must stay short
    gcs = free_port()
    # the agent's port too (the README's command leaves it at Ray's fixed default, 52365): the test session's own
    # local Ray holds that one, and a head whose job agent cannot bind it never accepts a job
    subprocess.run(
        [
            ray,
            "start",
            "--head",
            f"--port={gcs}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            f"--dashboard-agent-listen-port={free_port()}",
            "--num-cpus=4",
            f"--temp-dir={temp}",
            "--include-dashboard=true",
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=180,
    )
    yield ray, f"http://127.0.0.1:{dash}", env, temp
    # `ray stop` would stop every Ray on the machine (a user's own, another test run's): stop this head's
    # processes only, found by its temp dir on their command lines
    _kill_processes_mentioning(temp)
    _kill_processes_mentioning(f"--address=127.0.0.1:{gcs}\0")  # the client server `ray start` left behind
    shutil.rmtree(temp, ignore_errors=True)


def _pids_mentioning(text: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and int(pid) != os.getpid() and text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            continue
    return found


def _kill_processes_mentioning(text: str, grace: float = 3.0) -> None:
    # with their descendants: the head's dashboard and runtime-env agents and its client server do not name the temp
    # dir, and left running they hold the agent's port, so the next head's agent never comes up. Some of the head's
    # processes outlive a SIGTERM for good (the teardown waited out a 10 s grace every run): SIGKILL after 3 s
    tree = set(_pids_mentioning(text))
    for pid in list(tree):
        try:
            tree |= {c.pid for c in psutil.Process(pid).children(recursive=True)}
        except psutil.Error:
            pass

    def pids():
        alive = []
        for pid in tree:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.Error:
                continue
        return alive

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids():
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.time() + grace
        while pids() and time.time() < deadline:
            time.sleep(0.5)


def test_ray_job_submit_runs_training(ray_head, tmp_path, digits_copy):
    ray, address, env, temp = ray_head
    db = tmp_path / "mlflow.db"
    job_id = f"flowray-test-{uuid.uuid4().hex[:8]}"
    sets = [
        *TINY,
        f"data.shards={tmp_path / 'digits'}",
        f"train.storage_path={tmp_path / 'runs'}",
        "train.steps=4",
        "train.run_name=submitted",
        "mlflow.experiment=tests",
    ]
    cmd = [
        ray,
        "job",
        "submit",
        "--address",
        address,
        "--submission-id",
        job_id,
        "--working-dir",
        str(REPO),
        "--runtime-env-json",
        json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": f"sqlite:///{db}"}}),
        "--",
        "python",
        "-m",
        "jobs.train",
        "--config",
        "configs/digits-cpu.yaml",
    ]
    for s in sets:
        cmd += ["--set", s]
    for _ in range(12):  # a loaded head's job agent can come up after its dashboard: Ray says "try again later"
        sub = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540)
        if "No available agent to submit job" not in sub.stderr:
            break
        time.sleep(5)
    assert sub.returncode == 0, sub.stdout[-3000:] + sub.stderr[-3000:]
    logs = subprocess.run(
        [ray, "job", "logs", "--address", address, job_id], env=env, capture_output=True, text=True, timeout=60
    ).stdout
    last = [line for line in logs.strip().splitlines() if line.strip()][-1]
    result = json.loads(last)
    assert result["metrics"]["step"] == 4
    assert Path(result["checkpoint"]).is_dir()
    run = MlflowClient(f"sqlite:///{db}").get_run(result["run_id"])
    assert run.data.params["train.run_name"] == "submitted"
    # the head's servers (GCS, raylet, dashboard, agents, workers) listened on loopback only
    heads = _pids_mentioning(temp)
    pids = {*heads, *(c.pid for p in heads if psutil.pid_exists(p) for c in psutil.Process(p).children(True))}
    sockets = listening_addresses(pids)
    assert {"gcs_server", "raylet"} <= {name for _, _, name in sockets}
    assert {s for s in sockets if s[0] not in LOOPBACK} == set()
