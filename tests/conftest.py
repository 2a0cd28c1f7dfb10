"""The session's shared, expensive parts: one local Ray, one ingest of the digits, one trained checkpoint with the
MLflow store that holds its run, one S3-compatible server. The suite is bound by start-up: each local Ray costs
about 10 s, each Ray Train fit 30 to 60 s before its first step (tests/README.md)."""

import os

import pytest
import torch

from fm.models import GaussianOTFlow

# MLflow samples system metrics every 10 s by default, longer than the suite's tiny runs: every second, in every
# process of the session (set before the session's Ray starts, whose workers inherit the environment)
os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # `make test` runs two pytest-xdist workers on two cores: each gets its share of the cores, for torch's threads
    # and for every process it starts (jobs run as processes; Ray sets its workers' own). Two threads each spin
    # against each other (a first try with two each: the Action Matching OU case 174 s against 20.6 s; tests/README)
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # before pytest-xdist's own choice
def pytest_xdist_make_scheduler(config, log):
    """`make test` runs on two pytest-xdist workers (`-n 2 --dist loadgroup`). Every test outside tests/fm is one
    unit of work, run on one worker in collection order: the session's one Ray, ingest and servers are shared as
    in a single process, and no second local Ray ever runs beside them (two on one machine confuse Ray Train's
    placement-group cleaner). The math tests (tests/fm: no Ray, job or server) fill the other core meanwhile.
    (pytest-xdist's `xdist_group` mark would say the same, but it renames node ids, which pytest 9.2 ignores.)"""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class OneRayScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return nodeid if nodeid.startswith("tests/fm/") else "ray-and-jobs"

    return OneRayScheduling(config, log)


@pytest.fixture
def gaussian_field():
    """The exact OT-path velocity for data N(1.5, 0.5^2 I): known sampling marginals and log-density."""
    return GaussianOTFlow(mu=1.5, std=0.5, sigma_min=0.0).double()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _start_ray() -> None:
    from pipelines.core.runtime import init_ray

    init_ray()


@pytest.fixture(scope="session")
def _session_ray():
    """Stops the session's Ray at the end of the session (if it is up then)."""
    yield
    import ray

    ray.shutdown()


@pytest.fixture(scope="session")
def ray_local(_session_ray):
    """The session's one local Ray, started as every job starts it (`init_ray`) on first use and stopped at the
    session's end; every integration test that does not need a cluster of its own shares it (jobs run in process
    join it). A test that needs its own Ray takes `own_ray`, which stops this one; the next test that asks for
    `ray_local` starts it again (and any stage run in process starts it itself, as jobs do)."""
    _start_ray()


@pytest.fixture(autouse=True)
def _ray_up_when_asked(request):
    # not for a test that takes `own_ray` through a fixture built on the session's Ray (`digits`): it would be
    # started only to be stopped (about 5 to 10 s)
    if "ray_local" in request.fixturenames and "own_ray" not in request.fixturenames:
        import ray

        if not ray.is_initialized():
            _start_ray()


@pytest.fixture
def own_ray(_session_ray):
    """For a test that starts a Ray of its own (a multi-node cluster, a job in a process of its own): the session's
    Ray is stopped first (and this process's connection to the test's cluster after it)."""
    import ray

    ray.shutdown()
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def _digits_once(tmp_path_factory, ray_local):
    """scikit-learn's digits ingested once for the session (2 train shards, the default split), on the session's
    Ray: copy it with `digits_copy`, never write into it."""
    from pipelines.ingest.run import ingest

    out = tmp_path_factory.mktemp("digits-once") / "digits"
    ingest("digits", out, shards=2)
    return out


@pytest.fixture(scope="session")
def _digits_scored_once(_digits_once, tmp_path_factory):
    """A copy of the session's digits with the default evaluation's caches beside the shards: the digits classifier
    (eval's default epochs and seed) and its statistics of the train split, the reference of every FD. A test that
    scores samples on a copy of it skips training the classifier and the reference's feature stage (about 8 s);
    what the caches hold, and that an evaluation writes them, is `batch/test_evaluate_pipeline.py`'s to check."""
    import shutil

    from pipelines.batch.config import EvalConfig
    from pipelines.batch.features import split_stats
    from pipelines.batch.quality import feature_net
    from pipelines.ingest.run import load_manifest

    out = shutil.copytree(_digits_once, tmp_path_factory.mktemp("digits-scored") / "digits")
    manifest = load_manifest(out)
    cfg = EvalConfig()
    split_stats(manifest, cfg.reference_split, feature_net(manifest, cfg)[0], limit=cfg.reference_max)
    return out


@pytest.fixture
def scored_digits(_digits_scored_once, tmp_path):
    """A private copy (`tmp_path/digits`) of the session's digits with the default evaluation's caches."""
    import shutil

    return shutil.copytree(_digits_scored_once, tmp_path / "digits")


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


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture
def s3_bucket(s3_server, monkeypatch, request):
    """A fresh bucket on the local server, with this process's AWS environment pointing at it: "s3://NAME"."""
    import re
    import uuid

    import pyarrow.fs as pafs

    for key, value in {**S3_ENV, "AWS_ENDPOINT_URL": s3_server}.items():
        monkeypatch.setenv(key, value)
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    pafs.S3FileSystem(endpoint_override=s3_server, allow_bucket_creation=True).create_dir(name)
    return f"s3://{name}"


TRAINED_RUN = "tiny"


@pytest.fixture(scope="session")
def trained_digits(_digits_scored_once, ray_local, tmp_path_factory):
    """One tiny training run for the session, as `flowray train` runs it, and the sqlite MLflow store (server.db,
    the name `start_mlflow_server` serves) that holds it: 8 steps of 16 x 2 workers on the digits, a checkpoint and
    a sample grid at steps 4 and 8 (every checkpoint kept), the loss every 2 steps, the validation loss on 40
    held-out rows, sample quality while training at steps 4 and 8; then `flowray sample` of the final checkpoint
    with the settings that scoring stands for (a run nested under the training run). The store is named relative to
    the current folder, as a user types it. Tests read it; only the training story continues the run (checkpoints
    after step 8, in a new MLflow run), which changes nothing the others read."""
    import shutil

    from pipeline_helpers import TINY

    from jobs.sample import main as sample_main
    from jobs.train import main as train_main
    from pipelines.chain import quality_configs
    from pipelines.train.config import load_config

    tmp = tmp_path_factory.mktemp("trained")
    digits = shutil.copytree(_digits_scored_once, tmp / "digits")
    sets = [
        *TINY,
        f"data.shards={digits}",
        f"train.storage_path={tmp / 'runs'}",
        "mlflow.tracking_uri=sqlite:///server.db",
        f"train.run_name={TRAINED_RUN}",
        "mlflow.experiment=tests",
        "train.steps=8",
        "train.log_every=2",
        "train.val_rows=40",
        "train.num_to_keep=100",
        "train.eval_every=4",
        "train.eval_samples=32",
        "train.eval_rows=16",
        "train.ema_snapshot_every=2",
        "mlflow.log_model=true",  # its MLflow Model: the training story and the sampling sweep's registry tags read it
    ]
    here = os.getcwd()
    os.chdir(tmp)
    try:
        result = train_main(
            ["--config", os.path.join(here, "configs/digits-cpu.yaml"), *[a for s in sets for a in ("--set", s)]]
        )
        scfg, ecfg = quality_configs(load_config(os.path.join(here, "configs/digits-cpu.yaml"), sets))
        sampled = sample_main(
            [
                "--checkpoint",
                result["checkpoint"],
                "--num-samples",
                str(scfg.num_samples),
                "--out",
                str(tmp / "samples"),
                "--tracking-uri",
                result["tracking_uri"],
                "--set",
                f"sample.solver={scfg.solver}",
                "--set",
                f"sample.block_size={scfg.block_size}",
            ]
        )
    finally:
        os.chdir(here)
    return {
        "tmp": tmp,
        "digits": digits,
        "uri": result["tracking_uri"],
        "train": result,
        "sample": sampled,
        "eval_config": ecfg,
        "sets": sets,
    }
