"""The storage layer against a real S3-compatible server on 127.0.0.1 (moto) and the local disk: round trips, the
manifest and its shards read from a bucket exactly as from a folder, and bad locations named before any Ray work."""

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipelines.core import storage
from pipelines.core.manifest import MANIFEST, Manifest, ManifestError, row_format, sha256, shard_schema
from pipelines.core.shards import ShardRows, group_rows

SHAPE = [4, 4, 1]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_round_trip_and_whole_writes(where, tmp_path, request):
    root = str(tmp_path / "root") if where == "local" else request.getfixturevalue("s3_bucket") + "/root"
    path = storage.join(root, "a", "b.bin")
    assert not storage.exists(path) and not storage.is_file(path)
    storage.write_bytes(path, b"\x00\x01payload")
    assert storage.read_bytes(path) == b"\x00\x01payload" and storage.is_file(path)
    assert storage.exists(storage.join(root, "a"))  # a folder, or a prefix holding an object
    storage.write_text(path, "second")  # a rewrite replaces the whole file
    assert storage.read_text(path) == "second"
    if where == "local":
        assert sorted(p.name for p in (tmp_path / "root" / "a").iterdir()) == ["b.bin"]  # no temporary left
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root, "missing"))


def test_locations_join_and_come_back_from_ray_paths():
    assert storage.join("s3://bkt/pre/", "x", "/y.parquet") == "s3://bkt/pre/x/y.parquet"
    assert storage.join("data/d", "x") == "data/d/x"
    assert storage.location_of("s3://bkt/runs", "bkt/runs/r/checkpoint_000001") == "s3://bkt/runs/r/checkpoint_000001"
    assert storage.location_of("/abs/runs", "/abs/runs/r") == "/abs/runs/r"
    fs, path = storage.resolve("gs://bkt/pre/x")
    assert isinstance(fs, pafs.GcsFileSystem) and path == "bkt/pre/x"
    paths, fs = storage.ray_paths(["s3://bkt/a.parquet", "s3://bkt/b.parquet"])
    assert paths == ["bkt/a.parquet", "bkt/b.parquet"] and isinstance(fs, pafs.S3FileSystem)
    assert storage.ray_paths(["/x/a.parquet"]) == (["/x/a.parquet"], None)


@pytest.mark.parametrize(
    "location, message",
    [
        (
            "ftp://host/x",
            "train.storage_path: 'ftp://host/x' has the scheme ftp://, which is not supported; use a local "
            "path or one of s3://, gs://",
        ),
        ("s3:///x", "train.storage_path: 's3:///x' names no bucket (s3://BUCKET/PREFIX)"),
    ],
)
def test_a_location_this_layer_cannot_use_is_named(location, message):
    with pytest.raises(storage.StorageError) as err:
        storage.check_writable(location, "train.storage_path")
    assert str(err.value) == message


@pytest.mark.parametrize("value", ["abc", "0", "-1", "1e9"])
def test_a_request_timeout_that_cannot_work_is_named(value, monkeypatch):
    monkeypatch.setenv("FLOWRAY_S3_REQUEST_TIMEOUT_S", value)
    with pytest.raises(storage.ConfigError) as err:
        storage.check_writable("s3://bucket/runs", "train.storage_path")
    assert str(err.value) == f"FLOWRAY_S3_REQUEST_TIMEOUT_S={value!r}: expected seconds in (0, 3600]"


def test_a_missing_bucket_and_a_silent_server_fail_fast_and_named(s3_bucket, monkeypatch):
    with pytest.raises(storage.StorageError) as err:
        storage.check_writable("s3://no-such-bucket-here/runs", "train.storage_path")
    assert str(err.value) == (
        "train.storage_path: s3://no-such-bucket-here/runs is not writable: the bucket does not exist"
    )
    assert storage.check_writable(s3_bucket + "/runs", "train.storage_path") == s3_bucket + "/runs"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # the discard port: nothing answers
    start = time.perf_counter()
    with pytest.raises(storage.StorageError) as err:
        storage.check_writable(s3_bucket + "/runs", "train.storage_path")
    assert time.perf_counter() - start < 10
    assert str(err.value) == (
        f"train.storage_path: {s3_bucket}/runs is not writable: the server does not answer "
        "(check AWS_ENDPOINT_URL and the network)"
    )


def _write_data(directory):
    """A tiny ingest output as ingest writes it: two shards of a train split (row groups of 8), a manifest."""
    directory.mkdir()
    rng = np.random.default_rng(0)
    fmt = row_format("image", SHAPE)
    shards, row = [], 0
    for k, n in enumerate([20, 13]):
        raw = rng.integers(0, 256, (n, 16), dtype=np.uint8)
        table = pa.table(
            {
                "id": [str(row + i) for i in range(n)],
                "label": list(range(row, row + n)),
                "image": [r.tobytes() for r in raw],
            },
            schema=shard_schema(fmt, "train"),
        )
        pq.write_table(table, directory / f"train-{k}.parquet", row_group_size=8)
        shards.append({"file": f"train-{k}.parquet", "rows": n, "sha256": sha256(directory / f"train-{k}.parquet")})
        row += n
    manifest = {
        "source": "digits",
        "kind": "image",
        "shape": SHAPE,
        "num_classes": 0,
        "class_names": [],
        **fmt,
        "splits": {"train": {"count": row, "shards": shards}},
    }
    (directory / MANIFEST).write_text(json.dumps(manifest))
    return directory


def _upload(local, uri):
    fs, path = storage.resolve(uri)
    pafs.copy_files(str(local), path, destination_filesystem=fs)


def test_a_manifest_and_its_shards_read_from_a_bucket_as_from_a_folder(tmp_path, s3_bucket):
    local = _write_data(tmp_path / "d")
    _upload(local, s3_bucket + "/data/d")
    here, there = Manifest.load(local), Manifest.load(s3_bucket + "/data/d", verify=True)
    assert there.directory == s3_bucket + "/data/d" and there.count("train") == 33
    assert there.shard_paths("train") == [s3_bucket + "/data/d/train-0.parquet", s3_bucket + "/data/d/train-1.parquet"]
    files = tuple(there.shard_paths("train"))
    assert group_rows(files) == group_rows(tuple(here.shard_paths("train"))) == ((8, 8, 4), (8, 5))
    rows = np.array([32, 0, 9, 20, 19, 21, 7])
    got = ShardRows(files, group_rows(files), tuple(SHAPE), "image").take(rows)
    want = ShardRows(tuple(here.shard_paths("train")), group_rows(files), tuple(SHAPE), "image").take(rows)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], rows)  # labels are the row numbers


def test_a_bucket_manifest_that_disagrees_with_its_shards_is_named(tmp_path, s3_bucket):
    local = _write_data(tmp_path / "d")
    manifest = json.loads((local / MANIFEST).read_text())
    manifest["splits"]["train"]["shards"][1]["rows"] = 14
    (local / MANIFEST).write_text(json.dumps(manifest))
    _upload(local, s3_bucket + "/d")
    with pytest.raises(ManifestError) as err:
        Manifest.load(s3_bucket + "/d")
    assert str(err.value) == f"{s3_bucket}/d/train-1.parquet: 13 rows, but manifest.json says 14"
    with pytest.raises(
        ManifestError,
        match=rf"^{s3_bucket}/nothing/manifest.json not found: run `python -m "
        "jobs.ingest",
    ):
        Manifest.load(s3_bucket + "/nothing")


@pytest.fixture(scope="module")
def s3_with_auth():
    """A second S3-compatible server that checks signatures (moto with IAM authentication from the first request),
    in its own process: the endpoint URL."""
    import os
    import subprocess
    import sys

    from pipeline_helpers import free_port

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            import urllib.request

            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    yield f"http://127.0.0.1:{port}"
    server.terminate()
    server.wait(timeout=10)


@pytest.mark.parametrize(
    "credentials, message",
    [
        (
            {"AWS_ACCESS_KEY_ID": "unknown", "AWS_SECRET_ACCESS_KEY": "unknown"},
            "the access key is not known to the server (AWS_ACCESS_KEY_ID)",
        ),
        (
            {},
            "; no AWS credentials were found (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
            "~/.aws/credentials, a web identity token), so the request went unsigned unless the node has a role",
        ),
    ],
)
def test_refused_or_missing_credentials_are_named_in_seconds(s3_with_auth, monkeypatch, tmp_path, credentials, message):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    env = {
        "AWS_ENDPOINT_URL": s3_with_auth,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        **credentials,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    start = time.perf_counter()
    with pytest.raises(storage.StorageError) as err:
        storage.check_writable("s3://runs-bucket/x", "train.storage_path")
    assert time.perf_counter() - start < 10
    assert str(err.value).startswith("train.storage_path: s3://runs-bucket/x is not writable: ")
    assert message in str(err.value)
