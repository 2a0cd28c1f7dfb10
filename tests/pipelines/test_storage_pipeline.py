"""The chain with every path in a bucket of a real S3-compatible server on 127.0.0.1 (moto), on a three-node Ray
cluster (`ray.cluster_utils.Cluster`: a head that runs no work and two worker nodes) whose nodes share nothing but
the S3 endpoint: `jobs.ingest` writes the shards to `s3://`, `jobs.train` (one worker on each node) reads them and
Ray Train writes its checkpoints there, a second run resumes from them, `jobs.sample` (one actor on each node) and
`jobs.evaluate` read the checkpoint where it lies, and nothing is written to the local disk but the MLflow store
the jobs were given."""

import json
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from pipelines.core import storage
from pipelines.core.checkpoint import load_model
from pipelines.core.manifest import Manifest
from pipelines.core.samples import shard_name

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "model.model_channels=8",
    "model.num_heads=1",
    "model.attention_resolutions=[]",
    "train.batch_size=16",
    "train.log_every=4",
    "train.checkpoint_every=4",
    "train.sample_every=0",
    "optim.warmup_steps=2",
]

pytestmark = [pytest.mark.slow, pytest.mark.heavy, pytest.mark.timeout(900)]


def _job(module: str, args: list[str]) -> dict:
    """A job's `main` in this process, the cluster's driver (connected by `three_nodes`, in the working directory
    and with the S3 environment it set, as a job submitted to the cluster runs): its JSON result. In process rather
    than as a process each: the same code, without seven interpreter starts."""
    import importlib

    return json.loads(json.dumps(importlib.import_module(module).main(args), default=str))


@pytest.fixture
def three_nodes(own_ray, s3_bucket, tmp_path, monkeypatch):
    """A head with no CPUs (as in cluster.yaml) and two worker nodes of 3 CPUs (a cluster of its own: the session's
    local Ray is stopped meanwhile), started in an empty folder that is every node's working directory (a node
    writing a relative path would show there), with the S3 endpoint and credentials in their environment
    (`s3_bucket` sets them first): (the cluster, its worker nodes' ids)."""
    import ray
    from ray.cluster_utils import Cluster

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    # what `init_ray` sets for a local Ray, for the Train controller on these nodes: no preemption watcher, and a
    # finished worker group seen within 0.5 s (this cluster's nodes cannot be preempted)
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the jobs are given their store
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=3) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster, {node.node_id for node in workers}
    ray.shutdown()
    cluster.shutdown()


def _nodes_of(class_name: str) -> set[str]:
    """The nodes on which the cluster ran actors whose class name contains `class_name` (finished ones included)."""
    from ray.util.state import list_actors

    return {a.node_id for a in list_actors(detail=True, limit=10_000) if class_name in a.class_name}


# `_digits_once`: the session's local ingest (set up before `three_nodes` stops the session's Ray), which the bucket's
# must equal shard for shard
def test_the_chain_on_three_nodes_through_a_bucket(tmp_path, s3_server, s3_bucket, _digits_once, three_nodes):
    cluster, worker_nodes = three_nodes
    work = tmp_path / "work"  # every job's and every node's working directory: it must stay empty
    # ingest straight into the bucket, twice: the second manifest replaces the first's shards, which then go
    data = f"{s3_bucket}/data/digits"
    first_ingest = _job("jobs.ingest", ["--source", "digits", "--out", data, "--shards", "3"])
    old = {s["file"] for split in Manifest.load(data).splits.values() for s in split["shards"]}
    _job("jobs.ingest", ["--source", "digits", "--out", data, "--shards", "2"])
    there, here = Manifest.load(data, verify=True), Manifest.load(_digits_once)  # both of 2 shards
    assert first_ingest["counts"] == {s: v["count"] for s, v in there.splits.items()}
    assert [s["sha256"] for s in there.splits["train"]["shards"]] == [
        s["sha256"] for s in here.splits["train"]["shards"]
    ]
    assert all(f.startswith("shards-") and "/" in f for f in old)  # each ingest its own folder
    assert not any(storage.exists(storage.join(data, f)) for f in old)  # the replaced shards are gone

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # 2 of a node's 3 CPUs per worker: the two workers cannot share a node, and each node keeps a CPU for the
    # stream's reading and pairing tasks
    sets = [
        f"data.shards={data}",
        f"train.storage_path={s3_bucket}/runs",
        "ray.cpus_per_worker=2",
        f"mlflow.tracking_uri={uri}",
        "train.run_name=s3-run",
        "train.ema_snapshot_every=4",
        *TINY,
    ]
    args = ["--config", str(ROOT / "configs/digits-cpu.yaml"), *[x for s in sets for x in ("--set", s)]]
    first = _job("jobs.train", [*args, "--set", "train.steps=8"])
    assert first["checkpoint"].startswith(f"{s3_bucket}/runs/s3-run/checkpoint_") and not first["resumed"]
    assert first["run_dir"] == f"{s3_bucket}/runs/s3-run"
    assert storage.is_file(storage.join(first["checkpoint"], "meta.json"))
    assert _nodes_of("RayTrainWorker") == worker_nodes  # one Train worker on each worker node

    # past a finished run's steps: Ray resumes from the checkpoint in the bucket, into a new MLflow run (a finished
    # run is never changed) that holds only the steps after it
    more = _job("jobs.train", [*args, "--set", "train.steps=12"])
    assert more["run_id"] != first["run_id"] and more["metrics"]["step"] == 12
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    assert client.get_run(more["run_id"]).data.tags["flowray.continues"] == first["run_id"]
    assert [m.step for m in client.get_metric_history(more["run_id"], "loss")] == [12]  # not trained from step 0
    local = tmp_path / "ckpt"
    local.mkdir()
    fs, path = storage.resolve(more["checkpoint"])
    pafs.copy_files(path, str(local), source_filesystem=fs)
    assert load_model(local).step == 12
    assert load_model(more["checkpoint"]).step == 12  # read where it lies, as every sampling actor reads it
    # post-hoc EMA: rank 0 (on a worker node) kept its snapshots in the bucket, across the continuation; the
    # rebuilt length is written beside them and reads where it lies
    rebuilt = _job("jobs.ema", ["--run", more["run_dir"], "--sigma-rel", "0.07", "--tracking-uri", uri])["rebuilt"]
    assert rebuilt[0]["snapshots"] == 3 and rebuilt[0]["checkpoint"].startswith(f"{more['run_dir']}/posthoc_ema/")
    assert load_model(rebuilt[0]["checkpoint"]).meta.posthoc_ema["snapshot_steps"] == [4, 8, 12]

    # sampling and evaluation from the checkpoint in the bucket; evaluation reads the data there and keeps its
    # caches (the feature classifier, the reference statistics) beside the shards in the bucket
    track = ["--tracking-uri", uri]
    samples = f"{s3_bucket}/samples"
    sample_args = [
        "--checkpoint",
        more["checkpoint"],
        "--num-samples",
        "32",
        "--out",
        samples,
        *track,
        *[
            x
            for s in (
                "sample.solver=euler",
                "sample.steps=2",
                "sample.block_size=8",
                "sample.actors=2",
                "sample.cpus_per_actor=2",
            )
            for x in ("--set", s)
        ],
    ]
    sampled = _job("jobs.sample", sample_args)
    assert sampled["num_samples"] == 32 and sampled["blocks_sampled"] == 4
    blocks = [storage.join(samples, shard_name(b)) for b in range(4)]
    assert all(storage.is_file(b) for b in blocks)
    assert _nodes_of("Sampler") == worker_nodes  # an actor on each node, each reading the checkpoint in the bucket
    whole = storage.read_bytes(blocks[1])
    storage.delete(blocks[2])  # a block an interrupted run never wrote
    storage.write_bytes(blocks[1], whole[: len(whole) // 2])  # and one that does not verify
    again = _job("jobs.sample", sample_args)
    assert (again["blocks_reused"], again["blocks_sampled"]) == (2, 2)
    assert storage.read_bytes(blocks[1]) == whole  # the same samples: every sample's noise comes from its id
    evaluated = _job(
        "jobs.evaluate",
        [
            "--checkpoint",
            more["checkpoint"],
            "--data",
            data,
            "--samples",
            samples,
            *track,
            *[
                x
                for s in ("eval.max_images=20", "eval.solver=euler", "eval.steps=4", "eval.classifier_epochs=1")
                for x in ("--set", s)
            ],
        ],
    )
    assert evaluated["likelihood"]["n"] == 20 and evaluated["quality"]["num_samples"] == 32
    assert storage.is_file(f"{data}/classifier/epochs1-seed0/info.json")
    fs, path = storage.resolve(f"{data}/feature_stats")
    cached = [i.base_name for i in fs.get_file_info(pafs.FileSelector(path))]  # the reference and the floor's
    assert len(cached) == 2 and all(n.endswith(".npz") for n in cached) and any("-train-" in n for n in cached)
    assert _nodes_of("LikelihoodActor") <= worker_nodes
    # data, checkpoints, Ray Train's run state and caches all went to the bucket, from every node
    assert list(work.iterdir()) == []
