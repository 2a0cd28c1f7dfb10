"""Faults with real processes killed by PID (`make faults`): a training worker, a sampler actor, the driver, the
MLflow server, and a worker node of a three-node cluster on this machine. RELIABILITY.md lists what each shows."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient
from pipeline_helpers import free_port, kill_tree, make_checkpoint, start_mlflow_server, tensors_by_path, tiny_config

from pipelines.batch.config import SampleConfig
from pipelines.batch.sample import run_sampling
from pipelines.core.checkpoint import load_meta
from pipelines.core.reaper import alive
from pipelines.train.driver import run_training

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(600)]


def _ray_processes(title: str) -> list[psutil.Process]:
    """Ray worker processes whose title (Ray rewrites argv) names the actor class, e.g. RayTrainWorker."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith("ray::") and title in cmd:
            found.append(p)
    return found


def _when(ready, title: str, act, timeout: float = 300.0) -> dict:
    """In a thread: once ready() holds and a process titled `title` runs, `act(process)`; the dict it returns is
    the result (with the thread under "thread")."""
    out: dict = {}

    def run():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            procs = _ray_processes(title) if ready() else []
            if procs:
                out.update(act(procs[0]))
                return
            time.sleep(0.05)

    out["thread"] = threading.Thread(target=run, daemon=True)
    out["thread"].start()
    return out


def _kill_when(ready, title: str) -> dict:
    """Once ready() holds, SIGKILL one process titled `title`."""

    def kill(proc):
        os.kill(proc.pid, signal.SIGKILL)
        return {"pid": proc.pid}

    return _when(ready, title, kill)


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("checkpoint_*")) if run_dir.exists() else []


def _history(client, run_id, key):
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def _assert_one_value_per_step_from_the_checkpoints(client, run_id, run_dir: Path, steps: list[int]):
    """MLflow holds each logged step once, with the values that the registered checkpoints' reports carried."""
    from ray.train import Result

    from pipelines.train.metrics import WINDOWS

    loss = _history(client, run_id, "loss")
    assert [s for s, _ in loss] == steps
    saved = {}
    for _, metrics in Result.from_path(str(run_dir)).best_checkpoints:
        saved.update({s: m for s, m, _ in metrics[WINDOWS]})
    assert saved, "the checkpoints' reports hold the logging windows they cover"
    by_step = dict(loss)
    for step, values in saved.items():
        assert by_step[step] == pytest.approx(values["loss"], rel=1e-12, nan_ok=True)


def test_a_failing_worker_and_a_worker_killed_by_pid_resume_to_the_uninterrupted_weights(digits, tmp_path, ray_local):
    """One run, two failures: a worker raises at step 6 (`train.fail_at_step`, rank 1), and after the restart a Train
    worker is killed by PID (SIGKILL) once three checkpoints are registered. Ray Train restarts the worker group from
    the last checkpoint each time. The run ends with an uninterrupted run's model, EMA and optimizer state bit for bit
    (the same rows, flips, noise, pairs over the global batch and dropout masks at every step), and MLflow holds one
    value per step: the value of the timeline that produced the checkpoints. (One story instead of two runs that each
    failed once: the suite's time budget, tests/README.md.)"""
    from pipelines.core.checkpoint import load_state

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "runs" / "faulty"
    marker = run_dir / ".fault_injected_step_6"
    # OT-CFM with the coupling solved over the global batch of both workers, dropout on; metrics every step and a
    # checkpoint every 5: at the kill, up to 4 windows wait that the restart redoes
    common = (
        "train.steps=30",
        "train.log_every=1",
        "train.checkpoint_every=5",
        "train.num_to_keep=100",
        "train.sample_every=0",
        "method.name=otcfm",
        "method.ot_scope=global",
        "model.dropout=0.3",
    )
    kill = _kill_when(lambda: marker.exists() and len(_checkpoints(run_dir)) >= 3, "RayTrainWorker")
    failing = ("train.fail_at_step=6", "train.fail_rank=1", "ray.max_failures=2")
    res = run_training(tiny_config(digits, tmp_path / "runs", uri, "faulty", *common, *failing))
    kill["thread"].join(1)
    assert marker.exists(), "the worker of rank 1 failed at step 6"
    assert "pid" in kill, "a worker was killed by PID after the restart"
    assert res.metrics["step"] == 30 and load_meta(res.checkpoint).step == 30
    client = MlflowClient(uri)
    _assert_one_value_per_step_from_the_checkpoints(client, res.run_id, run_dir, list(range(1, 31)))
    assert client.get_run(res.run_id).info.status == "FINISHED"
    assert all(v > 0 for _, v in _history(client, res.run_id, "ot_solve_s"))
    assert client.get_run(res.run_id).data.params["method.ot_scope"] == "global"

    straight = run_training(tiny_config(digits, tmp_path / "runs", uri, "straight", *common))
    for name in ("model", "ema", "optimizer"):
        a, b = load_state(res.checkpoint, name), load_state(straight.checkpoint, name)
        flat_a, flat_b = tensors_by_path(a), tensors_by_path(b)
        assert flat_a.keys() == flat_b.keys() and all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a), name


def _sample_table(out: Path):
    table = pq.read_table(sorted(out.glob("block-*.parquet"))).sort_by("id")
    return table["id"].to_numpy(), table["image"].to_pylist()


def test_a_sampler_actor_killed_by_pid_gives_the_same_samples(tmp_path, ray_local):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    # 12 blocks of 8 samples x 100 Euler steps, about 0.35 s a block here: once two are written, ten (seconds) are
    # left for the kill, which lands within 0.1 s of them (a run twice as long only made the test slower)
    base = dict(num_samples=96, solver="euler", steps=100, block_size=8, seed=5, actors=1)
    ref = run_sampling(str(ckpt), tmp_path / "ref", SampleConfig(**base))
    out = tmp_path / "killed"
    kill = _kill_when(lambda: len(list(out.glob("block-*.parquet"))) >= 2, "Sampler")
    res = run_sampling(str(ckpt), out, SampleConfig(**base))
    kill["thread"].join(1)
    assert "pid" in kill, "a Sampler actor was killed mid-run"
    assert ref.blocks_sampled == res.blocks_sampled + res.blocks_reused == 12
    ids, images = _sample_table(out)
    ref_ids, ref_images = _sample_table(tmp_path / "ref")
    assert ids.tolist() == list(range(96)) and ids.tolist() == ref_ids.tolist()
    assert images == ref_images  # bitwise


def _train_command(digits: Path, storage: Path, uri: str, name: str, *extra: str) -> list[str]:
    from pipeline_helpers import TINY

    sets = [
        *TINY,
        f"data.shards={digits}",
        f"train.storage_path={storage}",
        f"train.run_name={name}",
        "mlflow.experiment=tests",
        "train.sample_every=0",
        f"mlflow.tracking_uri={uri}",
        *extra,
    ]
    return [
        sys.executable,
        "-m",
        "jobs.train",
        "--config",
        "configs/digits-cpu.yaml",
        *[a for s in sets for a in ("--set", s)],
    ]


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the job ended (status {proc.returncode}) before {what}: {log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def _stop_by_signal(cmd: list[str], signum: int, ready, log: Path, what: str) -> tuple[int, str, float]:
    """Start a job, send it `signum` once `ready()`; returns its exit status, its stderr, and how many seconds it
    took to end. Every Ray process it started must be gone within 10 s of that."""
    with open(log, "w") as err:
        job = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        try:
            _wait_for(ready, 300, what, job, log)
            ray_procs = [
                p
                for p in psutil.Process(job.pid).children(recursive=True)
                if "pipelines.core.reaper" not in " ".join(p.cmdline())
            ]
            assert any("raylet" in p.name() for p in ray_procs)
            signalled = time.monotonic()
            job.send_signal(signum)
            status = job.wait(timeout=60)
            seconds = time.monotonic() - signalled
            _wait_for(lambda: not any(alive(p) for p in ray_procs), 10, "Ray's processes to stop")
        finally:
            job.kill()
    return status, log.read_text(), seconds


# A job run in a process of its own starts its own local Ray: `own_ray` stops the session's meanwhile, since with two
# local Rays on a machine Ray Train's placement-group cleaner cannot tell which is its own and prints a traceback
# (harmless, Ray's; RELIABILITY.md) into the stderr these tests read


def test_sigterm_sigkill_and_an_mlflow_outage_in_one_run_lose_nothing(digits, tmp_path, own_ray):
    """One run, logged to a real MLflow server over HTTP, stopped twice and then cut off from its tracking server.
    SIGTERM (what `ray job stop`, a scheduler or Kubernetes sends) to the driver: one line saying what is kept, exit
    143 within seconds, the MLflow run KILLED, no Ray process left, no native stack dump; the rerun says on its first
    line that it continues the run. SIGKILL to that rerun's driver (no handler runs): the watchdog stops every Ray
    process within seconds and says so. The last rerun loses its MLflow server after its first checkpoint for 6 s:
    training goes on, the points queued meanwhile reach the server when it is back, with their time, and the run
    finishes the same MLflow run with one value per logged step, none lost. (One story instead of two runs with a
    driver, a Ray and a server each: the suite's time budget, tests/README.md.)"""

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    servers = [start_mlflow_server(port, tmp_path)]  # the server, and the same store served again after the outage
    try:
        _stopped_twice_then_an_outage(digits, tmp_path, uri, port, servers)
    finally:
        for server in servers:
            kill_tree(server)


def _stopped_twice_then_an_outage(digits: Path, tmp_path: Path, uri: str, port: int, servers: list):
    import re

    run_dir = tmp_path / "runs" / "stopped"
    extra = ("train.checkpoint_every=5", "train.log_every=5", "train.num_to_keep=100")
    cmd = _train_command(digits, tmp_path / "runs", uri, "stopped", "train.steps=2000", *extra)
    registered = run_dir / "checkpoint_manager_snapshot.json"  # Ray Train's record of registered checkpoints
    status, err, seconds = _stop_by_signal(
        cmd, signal.SIGTERM, registered.exists, tmp_path / "train.log", "the first registered checkpoint"
    )
    assert status == 143 and seconds < 20, err[-3000:]
    last = err.strip().splitlines()[-1]
    match = re.fullmatch(
        rf"training stopped by SIGTERM; the last checkpoint is step (\d+) in {run_dir} \(MLflow "
        r"run (\w+) is KILLED\); rerun the same command to resume",
        last,
    )
    assert match, err[-3000:]
    assert "SIGTERM received" not in err and "Traceback" not in err
    step, run_id = int(match.group(1)), match.group(2)
    assert MlflowClient(uri).get_run(run_id).info.status == "KILLED"

    # the rerun continues the run; its driver is killed by PID once it has checkpointed past the stop
    log = tmp_path / "driver.log"
    with open(log, "w") as errors:
        driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errors)
        try:
            _wait_for(
                lambda: _registered_step(run_dir) > step, 300, "a checkpoint registered after the stop", driver, log
            )
            ray_procs = [
                p
                for p in psutil.Process(driver.pid).children(recursive=True)
                if "pipelines.core.reaper" not in " ".join(p.cmdline())
            ]
            assert any("raylet" in p.name() for p in ray_procs)
            killed_at = time.monotonic()
            driver.send_signal(signal.SIGKILL)
            driver.wait()
            _wait_for(lambda: not any(alive(p) for p in ray_procs), 10, "Ray's processes to stop")
            gone_after = time.monotonic() - killed_at
        finally:
            driver.kill()
    assert gone_after < 10
    assert log.read_text().splitlines()[0].endswith(f"continuing run stopped from step {step} (MLflow run {run_id})")
    # the watchdog says what it stopped, on the driver's stderr
    _wait_for(lambda: "died without shutting down its local Ray; stopped" in log.read_text(), 10, "the reaper")

    # the last rerun: the MLflow server is killed after its first checkpoint and comes back 6 s later
    killed_step = _registered_step(run_dir)  # what a rerun resumes from: Ray's last registered checkpoint
    assert killed_step > step
    final = killed_step + 60
    cmd = _train_command(digits, tmp_path / "runs", uri, "stopped", f"train.steps={final}", *extra)
    log = tmp_path / "rerun.log"
    with open(log, "w") as errors:
        driver = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors, text=True)
        try:
            _wait_for(lambda: _registered_step(run_dir) > killed_step, 300, "the rerun's first checkpoint", driver, log)
            kill_tree(servers[-1])
            down_at, checkpoints_at_kill = time.time(), len(_checkpoints(run_dir))
            time.sleep(6)  # the outage: checkpoints go on (a tiny step takes milliseconds; 5 steps apart)
            checkpoints_in_outage = len(_checkpoints(run_dir)) - checkpoints_at_kill
            servers.append(start_mlflow_server(port, tmp_path))  # the same store, back on the same port
            up_at = time.time()
            stdout, _ = driver.communicate(timeout=400)
        finally:
            driver.kill()
    # the server that came back answers the checks (the caller stops it)
    assert driver.returncode == 0, log.read_text()[-3000:]
    assert (
        log.read_text()
        .splitlines()[0]
        .endswith(f"continuing run stopped from step {killed_step} (MLflow run {run_id})")
    )
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["run_id"] == run_id and result["resumed"] and result["metrics"]["step"] == final
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["tracking_lost_points"] == 0
    loss = client.get_metric_history(run_id, "loss")
    assert [m.step for m in loss] == list(range(5, final + 1, 5))  # every point of the three drivers, once
    assert checkpoints_in_outage >= 1  # training went on while the server was down
    # points queued during the outage carry their time, and reached the server after it came back
    assert any(down_at * 1000 < m.timestamp < up_at * 1000 for m in loss)


def _registered_step(run_dir: Path) -> int:
    """The step of the last checkpoint Ray Train registered for a run (a folder written after it is not one); 0
    while there is none, or while Ray is rewriting its record."""
    from ray.train import Result

    try:
        return load_meta(Result.from_path(str(run_dir)).checkpoint.path).step
    except Exception:
        return 0


def test_sigint_stops_a_sampling_job_cleanly_and_the_rerun_samples_only_the_rest(tmp_path, own_ray):
    """Ctrl-C (SIGINT) to the driver of a sampling job: exit 130 within seconds, one line naming the finished
    blocks, no Ray process left; the rerun of the same command reuses every finished block."""
    import re

    ckpt = make_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "samples"
    cmd = [
        sys.executable,
        "-m",
        "jobs.sample",
        "--checkpoint",
        str(ckpt),
        "--num-samples",
        "96",
        "--out",
        str(out),
        "--no-mlflow",
        # 12 blocks of 8 samples x 200 Euler steps (about 0.7 s a block here): SIGINT lands after the second
        *[a for s in ("solver=euler", "steps=200", "block_size=8", "actors=1") for a in ("--set", s)],
    ]
    status, err, seconds = _stop_by_signal(
        cmd,
        signal.SIGINT,
        lambda: len(list(out.glob("block-*.parquet"))) >= 2,
        tmp_path / "sample.log",
        "two finished blocks",
    )
    assert status == 130 and seconds < 20, err[-3000:]
    last = err.strip().splitlines()[-1]
    match = re.fullmatch(
        rf"sampling stopped by SIGINT; (\d+) of 12 sample blocks are written in {out}; rerun the "
        "same command to resume",
        last,
    )
    assert match and "Traceback" not in err, err[-3000:]
    written = int(match.group(1))
    assert 2 <= written < 12 and len(list(out.glob("block-*.parquet"))) == written
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    result = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert result["blocks_reused"] == written and result["blocks_sampled"] == 12 - written


def test_reaper_unit_stops_an_orphaned_tree(tmp_path):
    """The watchdog alone: a 'driver' that dies leaves a child and a grandchild, which are stopped."""
    script = (
        "import subprocess, sys, time; "
        "subprocess.Popen([sys.executable, '-c', 'import subprocess, sys, time; "
        'subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]); time.sleep(600)\']); '
        "time.sleep(600)"
    )
    driver = subprocess.Popen([sys.executable, "-c", script])
    _wait_for(lambda: len(psutil.Process(driver.pid).children(recursive=True)) == 2, 30, "the children")
    tree = psutil.Process(driver.pid).children(recursive=True)
    child = [p for p in tree if p.ppid() == driver.pid]
    reaper = subprocess.Popen(
        [sys.executable, "-m", "pipelines.core.reaper", str(driver.pid), str(child[0].pid)],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    time.sleep(1)
    assert all(alive(p) for p in tree)  # nothing is touched while the driver lives
    driver.kill()
    driver.wait()
    _, err = reaper.communicate(timeout=15)
    assert not any(alive(p) for p in tree)
    assert f"driver {driver.pid} died without shutting down its local Ray; stopped 2 processes" in err


def test_reaper_exits_quietly_after_a_normal_shutdown():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2)"])
    reaper = subprocess.Popen(
        [sys.executable, "-m", "pipelines.core.reaper", str(os.getpid()), str(child.pid)],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    child.wait()
    _, err = reaper.communicate(timeout=15)
    assert reaper.returncode == 0 and err == ""


# --- several nodes on one machine --------------------------------------------------------------------------------


@pytest.fixture
def three_nodes(own_ray):
    """A head that runs no work (0 CPUs, as in cluster.yaml) and two worker nodes of 2 CPUs each (a cluster of its own:
    the session's local Ray is stopped meanwhile)."""
    import ray
    from ray.cluster_utils import Cluster

    # the GCS declares a node dead after 3 failed health checks 1 s apart, not 5 checks 3 s apart (Ray's default): a
    # killed node's raylet refuses the checks at once, so the restart waited about 15 s of idle cores for nothing
    checks = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": checks})
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


def _node_of(pid: int, nodes) -> object:
    """The cluster node whose raylet started the worker process `pid`."""
    raylets = {node.all_processes["raylet"][0].process.pid: node for node in nodes}
    for parent in psutil.Process(pid).parents():
        if parent.pid in raylets:
            return raylets[parent.pid]
    raise AssertionError(f"process {pid} belongs to no worker node")


def _remove_node_when(cluster, nodes, ready, title: str) -> dict:
    """Once ready() holds, kill (SIGKILL, no grace) the worker node running a process titled `title`: its raylet,
    object store and every worker on it."""

    def remove(proc):
        node = _node_of(proc.pid, nodes)
        raylet = node.all_processes["raylet"][0].process.pid
        cluster.remove_node(node, allow_graceful=False)
        return {"raylet": raylet}

    return _when(ready, title, remove)


def test_a_worker_node_killed_mid_training_resumes_on_the_nodes_that_remain(digits, tmp_path, three_nodes):
    import ray

    cluster, workers = three_nodes
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "shared" / "node-loss"  # checkpoints on storage every node sees
    kill = _remove_node_when(cluster, workers, lambda: len(_checkpoints(run_dir)) >= 2, "RayTrainWorker")
    cfg = tiny_config(
        digits,
        tmp_path / "shared",
        uri,
        "node-loss",
        "train.steps=40",
        "train.log_every=5",
        "train.checkpoint_every=5",
        "train.num_to_keep=100",
        "train.sample_every=0",
        "ray.num_workers=1",
        "ray.max_failures=2",
        f"ray.address={cluster.address}",
    )
    res = run_training(cfg)
    kill["thread"].join(1)
    assert "raylet" in kill, "a worker node was killed mid-run"
    assert sum(n["Alive"] for n in ray.nodes()) == 2  # the head and the node that remained
    assert res.metrics["step"] == 40 and load_meta(res.checkpoint).step == 40
    client = MlflowClient(uri)
    _assert_one_value_per_step_from_the_checkpoints(client, res.run_id, run_dir, list(range(5, 41, 5)))


def test_a_worker_node_killed_mid_sampling_gives_the_same_samples(tmp_path, three_nodes):
    cluster, workers = three_nodes
    ckpt = make_checkpoint(tmp_path / "ckpt")
    # 24 blocks of 8 samples x 100 Euler steps, 12 for each node's actor (about 0.35 s a block here): once two are
    # written, seconds are left for the node's removal
    base = dict(num_samples=192, solver="euler", steps=100, block_size=8, seed=5, actors=2)
    ref = run_sampling(str(ckpt), tmp_path / "ref", SampleConfig(**base))
    out = tmp_path / "killed"
    kill = _remove_node_when(cluster, workers, lambda: len(list(out.glob("block-*.parquet"))) >= 2, "Sampler")
    res = run_sampling(str(ckpt), out, SampleConfig(**base))
    kill["thread"].join(1)
    assert "raylet" in kill, "a worker node was killed mid-run"
    assert ref.blocks_sampled == res.blocks_sampled + res.blocks_reused == 24
    ids, images = _sample_table(out)
    ref_ids, ref_images = _sample_table(tmp_path / "ref")
    assert ids.tolist() == list(range(192)) and ids.tolist() == ref_ids.tolist()
    assert images == ref_images  # bitwise


def test_the_object_store_lost_mid_training_ends_the_job_in_one_line_and_the_rerun_resumes(digits, tmp_path, own_ray):
    """A real S3-compatible server (moto, a process of its own) holds the run's checkpoints. Paused (SIGSTOP) after the
    run's third checkpoint, past the clients' request timeout (2 s here, FLOWRAY_S3_REQUEST_TIMEOUT_S): the job ends
    with exit status 1 and one last line saying what failed, where, what is kept and how to go on (it ended in Ray
    Train's ControllerError traceback), its MLflow run FAILED. Resumed (SIGCONT), the same command continues the run
    from its last registered checkpoint, whole in the bucket. Then killed by PID mid-run: the same line."""
    import re

    import pyarrow.fs as pafs
    from conftest import S3_ENV

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {**os.environ, **S3_ENV, "AWS_ENDPOINT_URL": endpoint, "FLOWRAY_S3_REQUEST_TIMEOUT_S": "2"}
    env.pop("MLFLOW_TRACKING_URI", None)
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    line = (
        r"training failed: train.storage_path: the object store at s3://runs-bucket/runs stopped answering "
        r"during training \(.*\); its last registered checkpoint is kept there, and cannot be read while the store "
        r"does not answer \(MLflow run (\w+) is FAILED\); rerun the same command once it answers to resume from there"
    )

    def train_until_lost(steps: int, lose) -> tuple[int, str]:
        """Run the job; once the bucket holds three more checkpoints, `lose` the server; the job's status, stderr."""
        fs = pafs.S3FileSystem(
            endpoint_override=endpoint, access_key="testing", secret_key="testing", region="us-east-1"
        )
        before = set(_s3_checkpoints(fs))  # names: the run keeps a bounded number, so their count stops growing
        cmd = _train_command(
            digits,
            "s3://runs-bucket/runs",
            uri,
            "lost",
            f"train.steps={steps}",
            "train.checkpoint_every=4",
            "ray.num_workers=1",
        )
        log = tmp_path / f"train-{steps}.log"
        with open(log, "w") as err:
            job = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
            try:
                _wait_for(
                    lambda: len(set(_s3_checkpoints(fs)) - before) >= 3,
                    300,
                    "three checkpoints in the bucket",
                    job,
                    log,
                )
                lose()
                status = job.wait(timeout=300)
            finally:
                job.kill()
        return status, log.read_text()

    try:
        fs = pafs.S3FileSystem(
            endpoint_override=endpoint,
            access_key="testing",
            secret_key="testing",
            region="us-east-1",
            allow_bucket_creation=True,
        )
        _wait_for(lambda: _answers(fs), 60, "the S3 server", server)
        fs.create_dir("runs-bucket")
        status, text = train_until_lost(400, lambda: server.send_signal(signal.SIGSTOP))
        server.send_signal(signal.SIGCONT)
        match = re.fullmatch(line, text.strip().splitlines()[-1])
        assert status == 1 and match, text[-3000:]
        assert MlflowClient(uri).get_run(match.group(1)).info.status == "FAILED"
        # the store answers again: the run continues from its last registered checkpoint (whole in the bucket: a
        # checkpoint whose upload or registration the outage cut is not one), as Ray's record in the bucket says
        from ray.train import Result

        registered = Result.from_path("runs-bucket/runs/lost", storage_filesystem=fs).checkpoint.path
        with fs.open_input_stream(f"{registered}/meta.json") as f:
            kept = json.loads(f.read())["step"]
        cmd = _train_command(
            digits,
            "s3://runs-bucket/runs",
            uri,
            "lost",
            "train.steps=16",
            "train.checkpoint_every=4",
            "ray.num_workers=1",
        )
        rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        first = re.search(r"continuing run lost from step (\d+) \(MLflow run (\w+)\)", rerun.stderr.splitlines()[0])
        assert first and int(first.group(1)) == kept >= 4 and first.group(2) == match.group(1), rerun.stderr[-3000:]
        result = json.loads(rerun.stdout.strip().splitlines()[-1])
        assert result["resumed"] and result["metrics"]["step"] == 16
        # killed by PID mid-run: the same one line
        status, text = train_until_lost(400, server.kill)
        assert status == 1 and re.fullmatch(line, text.strip().splitlines()[-1]), text[-3000:]
    finally:
        server.send_signal(signal.SIGCONT)
        server.kill()


def _s3_checkpoints(fs) -> list:
    import pyarrow.fs as pafs

    try:
        return [
            i.base_name
            for i in fs.get_file_info(pafs.FileSelector("runs-bucket/runs/lost", allow_not_found=True))
            if i.base_name.startswith("checkpoint_")
        ]
    except OSError:
        return []


def _answers(fs) -> bool:
    """Whether an S3 file system's server answers (it lists its buckets)."""
    import pyarrow.fs as pafs

    try:
        fs.get_file_info(pafs.FileSelector("", recursive=False))
        return True
    except OSError:
        return False
