"""Riemannian Flow Matching and Action Matching through the pipeline's CLIs: ingest (the manifest records the
manifold or the observation times), Ray Train, the Ray Data sampling and evaluation stages, MLflow; and the
checks that refuse a method that does not suit the data before Ray starts."""

import json
import math

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from jobs import compare as compare_job
from jobs import evaluate as evaluate_job
from jobs import ingest as ingest_job
from jobs import sample as sample_job
from jobs import train as train_job
from pipelines.core.manifest import Manifest
from pipelines.core.samples import read_samples
from pipelines.ingest.parts import IngestError
from pipelines.ingest.run import ingest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SMALL = [
    "model.hidden=64",
    "train.batch_size=128",
    "train.log_every=50",
    "train.checkpoint_every=50",
    "optim.warmup_steps=10",
    "optim.lr=0.003",
    "ray.num_workers=2",
]


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _sets(*pairs: str) -> list[str]:
    return [arg for pair in pairs for arg in ("--set", pair)]


def _train(config, shards, tmp_path, uri, steps, *extra):
    sets = _sets(
        f"data.shards={shards}",
        f"train.storage_path={tmp_path / 'runs'}",
        f"mlflow.tracking_uri={uri}",
        f"train.steps={steps}",
        *SMALL,
        *extra,
    )
    return train_job.main(["--config", config, *sets])


@pytest.mark.heavy  # about 100 s: in `make heavy`, so that `make test` stays under 20 minutes on a slow machine
def test_rfm_on_the_sphere_through_the_clis(tmp_path, ray_local, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ingest_job.main(["--source", "manifold:vmf-mixture", "--out", str(tmp_path / "sphere"), "--shards", "2"])
    summary = _last_json(capsys)
    assert summary["manifold"] == "sphere2" and summary["shape"] == [3] and summary["quarantined"] == 0
    assert Manifest.load(tmp_path / "sphere").data.manifold == "sphere2"

    res = _train("configs/sphere.yaml", tmp_path / "sphere", tmp_path, uri, 300)
    assert res["metrics"]["step"] == 300
    meta = json.loads(open(f"{res['checkpoint']}/meta.json").read())
    assert meta["method"]["manifold"] == "sphere2" and meta["model"]["kwargs"]["manifold"] == "sphere2"

    out = tmp_path / "samples"
    sample_job.main(
        [
            "--checkpoint",
            res["checkpoint"],
            "--num-samples",
            "600",
            "--out",
            str(out),
            "--tracking-uri",
            uri,
            *_sets("sample.solver=rk4", "sample.steps=20"),
        ]
    )
    sampled = _last_json(capsys)
    assert sampled["mean_nfe"] == 80  # 20 RK4 steps, 4 evaluations each
    _, raw, _ = read_samples(out)
    x = np.frombuffer(b"".join(raw), np.float32).reshape(-1, 3)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)  # every sample on the sphere

    evaluate_job.main(
        [
            "--checkpoint",
            res["checkpoint"],
            "--data",
            str(tmp_path / "sphere"),
            "--samples",
            str(out),
            "--tracking-uri",
            uri,
            *_sets("eval.max_images=200"),
        ]
    )
    result = _last_json(capsys)
    nll = result["likelihood"]["mean"]
    # the uniform prior scores log(4 pi) = 2.53 nats; 300 steps already learn much of the mixture (entropy 0.83)
    assert result["likelihood"]["unit"] == "nats" and 0.5 < nll < math.log(4 * math.pi) - 0.5
    q = result["quality"]
    # the W2 between two samples of its size, and no ordering: a perfect model may land at or below its floor
    assert q["w2_kind"] == "geodesic" and 0 < q["w2_floor"] < 1.0 and q["w2"] < 1.0
    client = MlflowClient(uri)
    ev = client.get_run(result["mlflow_run_id"]).data.metrics
    assert ev["nll"] == pytest.approx(nll) and ev["w2"] == pytest.approx(q["w2"]) and "w2_floor" in ev
    run = client.get_run(result["sample_run_id"])
    assert "samples.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
    # runs on points are compared from MLflow with their own columns
    compare_job.main(["--experiment", "flowray-geometry", "--tracking-uri", uri, "--out", str(tmp_path / "cmp")])
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if line.startswith("| rfm |"))
    assert "| NLL (nats) | W2 | W2 floor |" in printed
    assert row.startswith("| rfm | geodesic (manifold) | independent | rk4 | 20 | 300 | 1 | – |")
    assert f"| {nll:.3f} | {q['w2']:.3f} | {q['w2_floor']:.3f} |" in row

    # an SDE or an off-manifold fixed-step solver is refused before any Ray work
    capsys.readouterr()
    with pytest.raises(SystemExit):
        sample_job.main(
            [
                "--checkpoint",
                res["checkpoint"],
                "--num-samples",
                "10",
                "--out",
                str(tmp_path / "x"),
                *_sets("sample.solver=heun3", "sample.steps=4"),
            ]
        )
    assert "a fixed-step solver on a manifold must be one of euler, midpoint, rk4" in capsys.readouterr().err


@pytest.mark.heavy  # about 100 s: in `make heavy`, so that `make test` stays under 20 minutes on a slow machine
def test_action_matching_on_snapshots_through_the_clis(tmp_path, ray_local, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    m = ingest("snapshots:translation", tmp_path / "snap", shards=2).manifest
    assert m["times"] == [0.0, 0.25, 0.5, 0.75, 1.0] and m["num_classes"] == 5
    res = _train("configs/snapshots.yaml", tmp_path / "snap", tmp_path, uri, 400)
    meta = json.loads(open(f"{res['checkpoint']}/meta.json").read())
    assert meta["method"]["times"] == m["times"] and meta["model"]["kwargs"]["out_dim"] == 1

    capsys.readouterr()
    with pytest.raises(SystemExit):
        sample_job.main(["--checkpoint", res["checkpoint"], "--num-samples", "10", "--out", str(tmp_path / "s")])
    assert "moves data from its first snapshot rather than sampling noise" in capsys.readouterr().err

    evaluate_job.main(
        [
            "--checkpoint",
            res["checkpoint"],
            "--data",
            str(tmp_path / "snap"),
            "--tracking-uri",
            uri,
            *_sets("eval.solver=rk4", "eval.steps=5"),
        ]
    )
    result = _last_json(capsys)
    tr = result["transport"]
    # the unmoved first snapshot is |c| = sqrt(5) = 2.24 from the last one in W2; the learned flow carries it to every
    # later time within 1.5 times the W2 between two samples of that time (its floor); time 0 is the start itself
    assert tr["w2"][0] == 0.0
    for k in range(1, 5):
        assert 0 < tr["w2_floor"][k] < 0.6 and tr["w2"][k] / tr["w2_floor"][k] < 1.5, (k, tr["w2"], tr["w2_floor"])
    metrics = MlflowClient(uri).get_run(result["mlflow_run_id"]).data.metrics
    assert metrics["w2_t4"] == pytest.approx(tr["w2"][-1]) and "w2_ratio_max" in metrics


def test_methods_and_data_must_suit_each_other(tmp_path, capsys, ray_local):
    ingest("manifold:dihedral", tmp_path / "torus", shards=1)
    ingest("toy2d:moons", tmp_path / "moons", shards=1)
    cases = [
        (
            "configs/torus.yaml",
            tmp_path / "torus",
            ["method.name=otcfm"],
            "method.name: data on the manifold 'torus2' need a Riemannian method (rfm); 'otcfm' is euclidean",
        ),
        (
            "configs/sphere.yaml",
            tmp_path / "moons",
            [],
            "method.name: method 'rfm' needs data on a manifold (allowed: rfm)",
        ),
        (
            "configs/snapshots.yaml",
            tmp_path / "torus",
            [],
            "method.name: data on the manifold 'torus2' need a Riemannian method",
        ),
    ]
    for config, shards, extra, message in cases:
        with pytest.raises(SystemExit) as exit_:
            train_job.main(["--config", config, *_sets(f"data.shards={shards}", *extra)])
        err = capsys.readouterr().err
        # check_data raises before run_training starts any training (the module's Ray serves the ingests above)
        assert exit_.value.code == 2 and message in err and "Traceback" not in err and "steps on" not in err, err


def test_ingest_checks_points_against_the_declared_manifold(tmp_path, ray_local):
    x = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[7] *= 2.0  # off the sphere
    x[9, 0] = np.nan
    np.savez(tmp_path / "p.npz", x=x, labels=np.zeros(50, np.int64))
    m = ingest(f"npz:{tmp_path / 'p.npz'}", tmp_path / "out", manifold="sphere2", max_bad_fraction=0.1).manifest
    assert m["manifold"] == "sphere2" and m["quarantined"] == 2 and m["rows_read"] == 50
    reasons = {q["id"]: q["reason"] for q in m["quarantine"]}
    assert "is not on S^2 (tolerance 0.001)" in reasons["p.npz:7"]
    assert "p.npz:9" in reasons
    with pytest.raises(
        IngestError,
        match=r"--manifold torus2: points on T\^2 have 2 coordinates; 'npz:.*' has rows "
        r"of shape \[3\]",
    ):
        ingest(f"npz:{tmp_path / 'p.npz'}", tmp_path / "o2", manifold="torus2")
    with pytest.raises(IngestError, match="--manifold sphere2: source 'digits' holds images"):
        ingest("digits", tmp_path / "o3", manifold="sphere2")
    with pytest.raises(IngestError, match="--manifold: unknown manifold 'ball3'"):
        ingest("digits", tmp_path / "o4", manifold="ball3")
    with pytest.raises(IngestError, match="unknown manifold set 'moons'; allowed: vmf-mixture, dihedral"):
        ingest("manifold:moons", tmp_path / "o5")
