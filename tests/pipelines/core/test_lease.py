"""One job per run (`pipelines.core.lease`): a second taker is refused while the holder lives, a dead holder's
lease is taken over, on a local path and in a real S3-compatible bucket; and two real `flowray train` processes of
one run name, the second refused in words before Ray starts."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pipeline_helpers import TINY, free_port

from pipelines.core import lease
from pipelines.core.errors import JobFailed
from pipelines.core.lease import LEASE, LeaseHeld, acquire

ROOT = Path(__file__).resolve().parents[3]


def test_a_live_holder_keeps_its_lease_and_a_dead_one_does_not(tmp_path, monkeypatch):
    run = str(tmp_path / "runs" / "a")
    held = acquire(run, "training run 'a'", "train.run_name")
    with pytest.raises(
        LeaseHeld,
        match=rf"^train.run_name: training run 'a' is running already \(process "
        rf"{os.getpid()} on {socket.gethostname()}, started \d+ s ago; its lease is "
        rf".*{LEASE}\); two jobs cannot share one run",
    ):
        acquire(run, "training run 'a'", "train.run_name")
    held.release()
    assert not (tmp_path / "runs" / "a" / LEASE).exists()
    acquire(run, "x", "k").release()  # free again
    # a holder that died without releasing (SIGKILL): its process is gone, so the lease is free at once
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = {
        "token": "t",
        "what": "w",
        "host": socket.gethostname(),
        "pid": dead.pid,
        "started": time.time() - 5,
        "renewed": time.time(),
    }
    (tmp_path / "runs" / "a" / LEASE).write_text(json.dumps(stale))
    with acquire(run, "x", "k") as mine:
        assert json.loads((tmp_path / "runs" / "a" / LEASE).read_text())["token"] == mine.holder["token"]
    # a holder on another host: alive while it renews, free STALE_S seconds after its last renewal
    other = {**stale, "host": "another-host", "renewed": time.time()}
    (tmp_path / "runs" / "a" / LEASE).write_text(json.dumps(other))
    with pytest.raises(LeaseHeld, match="process .* on another-host"):
        acquire(run, "x", "k")
    (tmp_path / "runs" / "a" / LEASE).write_text(json.dumps({**other, "renewed": time.time() - lease.STALE_S - 1}))
    acquire(run, "x", "k").release()
    # the holder renews its lease while it runs
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.05)
    with acquire(run, "x", "k"):
        first = json.loads((tmp_path / "runs" / "a" / LEASE).read_text())["renewed"]
        time.sleep(0.3)
        assert json.loads((tmp_path / "runs" / "a" / LEASE).read_text())["renewed"] > first


def test_a_lease_in_an_object_store(s3_bucket, monkeypatch):
    import pyarrow.fs as pafs

    from pipelines.core import storage

    monkeypatch.setattr(lease, "SETTLE_S", 0.2)  # the settling wait of a real taker, kept short here
    run = f"{s3_bucket}/runs/a"
    with acquire(run, "training run 'a'", "train.run_name"):
        assert storage.exists(f"{run}/{LEASE}")
        with pytest.raises(LeaseHeld, match="training run 'a' is running already"):
            acquire(run, "training run 'a'", "train.run_name")
    fs, path = storage.resolve(f"{run}/{LEASE}")
    assert fs.get_file_info(path).type == pafs.FileType.NotFound  # released: nothing left in the bucket
    # a job that ends because its store stopped answering (a real one: a server that refuses connections) leaves
    # its lease alone: a read or delete would wait out every attempt's timeout before the job's line; the lease goes
    # stale on its own, as a killed job's does. Any other failure releases it.
    gone = pafs.S3FileSystem(
        endpoint_override=f"http://127.0.0.1:{free_port()}",
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
    )
    with pytest.raises(JobFailed), acquire(run, "training run 'a'", "train.run_name") as held:
        try:
            gone.get_file_info("runs-bucket/x")
        except OSError:
            raise JobFailed("the store stopped answering") from None
    assert held._stop.is_set() and fs.get_file_info(path).type == pafs.FileType.File  # not read, not deleted
    # the same process runs the job again once the store answers (a notebook): the lease it left is not its own now
    acquire(run, "training run 'a'", "train.run_name").release()
    with pytest.raises(ValueError), acquire(run, "training run 'a'", "train.run_name"):
        raise ValueError("a failure of the job itself")
    assert fs.get_file_info(path).type == pafs.FileType.NotFound
    # a taker that wrote after us while we settled holds it: we are refused, it is not
    mine = {
        "token": "late",
        "what": "a later job",
        "host": "another-host",
        "pid": 1,
        "started": time.time(),
        "renewed": time.time(),
    }
    monkeypatch.setattr(lease, "_settle", lambda: storage.write_text(f"{run}/{LEASE}", json.dumps(mine)))
    with pytest.raises(LeaseHeld, match="a later job is running already"):
        acquire(run, "training run 'a'", "train.run_name")


@pytest.mark.timeout(120)
def test_two_training_processes_of_one_run_name(tmp_path, digits):
    """The second `flowray train` of a run name is refused while the first lives (exit 2, one line, before Ray);
    once the first is killed (SIGKILL: no release), the lease is free."""
    sets = [
        *TINY,
        f"data.shards={digits}",
        f"train.storage_path={tmp_path / 'runs'}",
        "train.run_name=shared",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
        "train.steps=100000",
    ]
    cmd = [
        sys.executable,
        "-m",
        "jobs.train",
        "--config",
        "configs/digits-cpu.yaml",
        *[a for s in sets for a in ("--set", s)],
    ]
    first = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    path = tmp_path / "runs" / "shared" / LEASE
    try:
        deadline = time.monotonic() + 90
        while not path.exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first job never took its lease"
            time.sleep(0.1)
        second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=90)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the job, its local Ray and the Ray reaper: no release
        first.wait()
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-2000:]
    assert (
        second.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"training failed: train.run_name: training run 'shared' is running already (process {first.pid} on "
        )
    )
    assert json.loads(path.read_text())["pid"] == first.pid  # the killed job's lease is still there, and free:
    acquire(str(tmp_path / "runs" / "shared"), "x", "k").release()
