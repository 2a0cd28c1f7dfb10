import pytest
import torch

from fm.models import GaussianOTFlow


@pytest.fixture
def gaussian_field():
    """The exact OT-path velocity for data N(1.5, 0.5^2 I): known sampling marginals and log-density."""
    return GaussianOTFlow(mu=1.5, std=0.5, sigma_min=0.0).double()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for a test module, started as every job starts it (`init_ray`), stopped after the module."""
    import ray

    from pipelines.core.runtime import init_ray

    init_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def _digits_once(tmp_path_factory):
    """scikit-learn's digits ingested once for the session (2 train shards, the default split; each ingest starts
    and stops a local Ray of its own, about 10 s): copy it with `digits_copy`, never write into it."""
    from pipelines.ingest.run import ingest

    out = tmp_path_factory.mktemp("digits-once") / "digits"
    ingest("digits", out, shards=2)
    return out


@pytest.fixture(scope="module")
def digits(_digits_once, tmp_path_factory):
    """A copy of the session's ingested digits for one test module (its tests share it and may not break it)."""
    import shutil

    return shutil.copytree(_digits_once, tmp_path_factory.mktemp("data") / "digits")


@pytest.fixture
def digits_copy(_digits_once, tmp_path):
    """A private copy of the session's ingested digits (`tmp_path/digits`): the test may change or break it."""
    import shutil

    return shutil.copytree(_digits_once, tmp_path / "digits")


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto) on 127.0.0.1, for the session: its endpoint URL."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture
def s3_bucket(s3_server, monkeypatch, request):
    """A fresh bucket on the local server, with this process's AWS environment pointing at it: "s3://NAME"."""
    import re
    import uuid

    import pyarrow.fs as pafs

    for key, value in {**S3_ENV, "AWS_ENDPOINT_URL": s3_server}.items():
        monkeypatch.setenv(key, value)
    name = (re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8])
    pafs.S3FileSystem(endpoint_override=s3_server, allow_bucket_creation=True).create_dir(name)
    return f"s3://{name}"
