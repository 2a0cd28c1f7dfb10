"""A tiny version of the reproduce job end to end: score matching (whose rows cover every sampler kind: dopri5, a
fixed-step ODE solver and the reverse SDE), a few steps, one seed; every column filled."""

import json

import pytest
from pipeline_helpers import TINY

pytestmark = [pytest.mark.slow, pytest.mark.heavy, pytest.mark.timeout(900)]  # `make heavy` (CI runs it)


def test_tiny_reproduce_fills_every_column(tmp_path, monkeypatch, scored_digits, ray_local):
    from jobs.reproduce import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    sets = []
    for s in TINY + ["ray.num_workers=1", "train.checkpoint_every=4"]:
        sets += ["--set", s]
    result = main(
        [
            "--preset",
            "digits",
            "--seeds",
            "0",
            "--methods",
            "score_vp",
            "--steps",
            "4",
            "--num-samples",
            "20",
            "--euler-steps",
            "2",
            "--experiment",
            "tiny",
            "--out",
            str(tmp_path / "out"),
            "--data",
            str(tmp_path / "digits"),
            "--eval-max-images",
            "24",
            *sets,
        ]
    )
    rows = result["rows"]
    # score_vp: dopri5, euler 2 and its reverse SDE (one Euler step count: each row is a sampling and an evaluation
    # stage of its own, about 40 s here)
    assert sorted((r["method"], r["solver"], str(r["sample_steps"])) for r in rows) == [
        ("score_vp", "dopri5", "adaptive"),
        ("score_vp", "euler", "2"),
        ("score_vp", "sde", "100"),
    ]
    for r in rows:
        for col in ("bpd", "fd", "sample_nfe", "likelihood_nfe", "train_steps", "path", "coupling"):
            assert r[col] not in (None, ""), (r, col)
    md = (tmp_path / "out" / "tiny" / "table.md").read_text()
    assert md.count("\n| score_vp") == 3 and "–" not in md
    saved = json.loads((tmp_path / "out" / "tiny" / "result.json").read_text())
    assert saved["train_steps"] == 4 and saved["seeds"] == [0]
