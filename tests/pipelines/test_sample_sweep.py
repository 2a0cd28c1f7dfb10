"""`flowray sample-sweep`: the Pareto front and the best point per budget (by hand-checked points), the grid and
its refusals before Ray starts (on checkpoints that tests write), and, in `make heavy`, a tiny sweep over the
session's trained run (`trained_digits`): its checkpoint and one EMA length rebuilt post hoc, x euler and dopri5, on
both time grids, each point a nested MLflow run, resumed without redoing a point."""

import json
import re

import pytest
from mlflow.tracking import MlflowClient
from pipeline_helpers import make_checkpoint, without_ray_logs

from pipelines.batch.config import SampleConfig
from pipelines.core.errors import ConfigError
from pipelines.sample_sweep import PointResult, SampleSweepSpec, best_per_budget, expand, pareto_front


def _result(name: str, nfe: float, value: float) -> PointResult:
    return PointResult(name, "m", name, "euler", 1, "uniform", None, 1.0, nfe, "FD", value, None, None, 10, 1.0)


def test_the_front_keeps_the_points_nothing_cheaper_beats_and_each_budget_its_best():
    points = [(1, 9.0), (2, 7.0), (2, 8.0), (4, 7.5), (4, 5.0), (8, 5.0), (16, 4.0), (20.5, 4.5)]
    # (2, 8) is beaten by (2, 7) at the same cost; (4, 7.5) by (2, 7); (8, 5) ties (4, 5), which is cheaper;
    # (20.5, 4.5) is beaten by (16, 4)
    assert pareto_front(points) == [0, 1, 4, 6]
    results = [_result(f"p{i}", n, v) for i, (n, v) in enumerate(points)]
    best = best_per_budget(results, [16, 1, 3, 32])
    assert list(best) == [1, 3, 16, 32]  # in order of budget
    assert [b.name if b else None for b in best.values()] == ["p0", "p1", "p6", "p6"]
    assert best_per_budget(results[1:], [1]) == {1: None}  # nothing costs 1


def test_the_grid_is_every_model_by_every_sampler_and_one_step_is_made_once(tmp_path):
    ckpt = str(make_checkpoint(tmp_path / "a"))
    spec = SampleSweepSpec("s", "unused", solvers=["euler", "dopri5"], steps=[1, 4], grids=["uniform", "edm"])
    points = expand(spec, {"a": ckpt, "b": ckpt}, SampleConfig(num_samples=10))
    assert [p.name for p in points][:5] == [
        "a-euler1",
        "a-euler4",
        "a-euler4-edm",
        "a-dopri5-tol0.001",
        "a-dopri5-tol1e-05",
    ]
    assert len(points) == 10 and points[5].name == "b-euler1"
    assert [p.setting for p in points[:4]] == [
        "euler, 1 step",
        "euler, 4 steps",
        "euler, 4 steps, edm grid",
        "dopri5, tol 0.001",
    ]
    assert (points[3].sample.atol, points[3].sample.rtol, points[2].sample.time_grid) == (1e-3, 1e-3, "edm")


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"cfg_scales": [1.0, 2.0]},
            r"^--cfg-scales: 2 is not allowed for model a \(.*\): it is unconditional, and classifier-free guidance "
            r"needs a model trained with class labels; use 1$",
        ),
        ({"solvers": ["euler", "leapfrog"]}, r"^--solvers: 'leapfrog' is not allowed; allowed: dopri5, .*, jump, sde$"),
        (
            {"solvers": ["jump"]},
            r"^point a-jump1 \(method fm_ot\): sample.solver: 'jump' is not allowed; 'jump' is MeanFlow's sampler",
        ),
    ],
)
def test_a_point_its_model_cannot_take_is_refused_by_name(tmp_path, change, message):
    ckpt = str(make_checkpoint(tmp_path / "a"))
    spec = SampleSweepSpec("s", "unused", **{"solvers": ["euler"], "steps": [1], **change})
    with pytest.raises(ConfigError, match=message):
        expand(spec, {"a": ckpt}, SampleConfig(num_samples=10))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--name", "../up"], r"--name: '\.\./up' is not allowed"),
        (
            ["--set", "sample.solver=rk4"],
            r"^--set sample.solver: the sweep sets it for each point; use the sweep's own",
        ),
        (["--set", "train.steps=3"], r"^--set train.steps=3: a sweep takes sample.\* and eval.\* keys only$"),
        (["--grids", "uniform,cosine"], r"^--grids: 'cosine' is not allowed; allowed: uniform, edm$"),
        (["--steps", "2,2"], r"^--steps: 2,2 repeats a value; give each once$"),
        (["--checkpoint", "{ckpt}"], r"^--checkpoint: '.*' has no label; with several checkpoints give each one as"),
        (["--ema-run", "{tmp}"], r"^--ema-run and --sigma-rel go together"),
    ],
)
def test_bad_sweep_flags_are_refused_before_ray(tmp_path, argv, message, capsys):
    from jobs.sample_sweep import main

    ckpt = str(make_checkpoint(tmp_path / "a"))
    argv = [a.format(ckpt=ckpt, tmp=tmp_path) for a in argv]
    base = ["--name", "s", "--data", str(tmp_path), "--checkpoint", f"a={ckpt}", "--no-mlflow", "--out", str(tmp_path)]
    import ray

    started = ray.is_initialized()  # (the session's Ray, when an earlier test started it)
    with pytest.raises(SystemExit) as stop:
        main([*base, *argv])
    assert stop.value.code == 2
    err = without_ray_logs(capsys.readouterr().err).strip().removeprefix("sample sweep failed: ")
    assert re.search(message, err), err
    assert ray.is_initialized() == started  # refused before Ray was started or joined


@pytest.mark.slow
@pytest.mark.heavy  # reads the session's trained run (trained once per CI, in `make heavy`)
@pytest.mark.timeout(900)
def test_a_tiny_sweep_over_a_checkpoint_and_a_posthoc_ema_length_resumes_without_redoing_a_point(
    trained_digits, tmp_path
):
    from jobs.sample_sweep import main

    res, uri = trained_digits["train"], trained_digits["uri"]
    argv = [
        "--name",
        "tiny",
        "--data",
        str(trained_digits["digits"]),
        "--checkpoint",
        res["checkpoint"],
        "--ema-run",
        f"runs:/{res['run_id']}",
        "--sigma-rel",
        "0.05",
        "--solvers",
        "euler,dopri5",
        "--steps",
        "1,2",
        "--grids",
        "uniform,edm",
        "--tolerances",
        "1e-3",
        "--num-samples",
        "64",
        "--budgets",
        "1,2,64",
        "--out",
        str(tmp_path),
        "--tracking-uri",
        uri,
        "--set",
        "sample.block_size=32",
    ]
    out = main(argv)
    names = [p["name"] for p in out["points"]]
    assert names == [
        f"{m}-{s}" for m in ("model", "ema-0.05") for s in ("euler1", "euler2", "euler2-edm", "dopri5-tol0.001")
    ]
    by = {p["name"]: p for p in out["points"]}
    # NFE measured from the samples' rows: fixed steps exactly, dopri5 at least its 6 stages
    assert [by[f"model-{s}"]["nfe"] for s in ("euler1", "euler2", "euler2-edm")] == [1.0, 2.0, 2.0]
    assert by["model-dopri5-tol0.001"]["nfe"] >= 6
    for p in out["points"]:
        assert p["metric"] == "FD (digits classifier)" and p["num_samples"] == 64
        assert p["value"] > 0 and p["floor"] > 0 and p["matched"] > 0
    # the two grids place euler's second step differently: different samples, so different distances
    assert by["model-euler2"]["value"] != by["model-euler2-edm"]["value"]
    # the front and the budgets, recomputed from the points
    pts = out["points"]
    assert out["front"] == [pts[i]["name"] for i in pareto_front([(p["nfe"], p["value"]) for p in pts])]
    assert out["best"]["1"]["name"] in ("model-euler1", "ema-0.05-euler1")
    assert out["best"]["64"]["value"] == min(p["value"] for p in pts)

    # MLflow: the sweep's run nested under the training run, each point nested under the sweep's with its figures
    client = MlflowClient(uri)
    sweep = client.get_run(out["mlflow_run_id"])
    assert sweep.data.tags["mlflow.parentRunId"] == res["run_id"] and sweep.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(sweep.info.run_id)} >= {"front.png", "front.md", "points.csv"}
    assert sweep.data.metrics["best_at_nfe_2"] == out["best"]["2"]["value"]
    best2 = out["best"]["2"]
    assert sweep.data.tags["flowray.best_at_nfe_2"] == f"{best2['model']}: {best2['setting']}"
    children = client.search_runs(
        [sweep.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{sweep.info.run_id}'"
    )
    assert sorted(r.info.run_name for r in children) == sorted(names)
    for r in children:
        p = by[r.info.run_name]
        assert r.data.metrics["fd"] == pytest.approx(p["value"]) and r.data.metrics["nfe"] == p["nfe"]
        assert r.data.metrics["fd_floor"] == pytest.approx(p["floor"])
        assert r.data.metrics["fd_matched"] == pytest.approx(p["matched"])
        assert r.data.params["sample.time_grid"] == by[r.info.run_name]["time_grid"]

    # the same command again: every point is read back, no run is added, the result is the same; with
    # --tag-version, a registered version of the model gets the best setting per budget as tags
    import mlflow

    mlflow.set_tracking_uri(uri)
    version = mlflow.register_model(res["mlflow_model"], "sweep-tagged").version
    again = main([*argv, "--tag-version", f"models:/sweep-tagged/{version}"])
    assert again["points"] == out["points"] and again["mlflow_run_id"] == out["mlflow_run_id"]
    tags = client.get_model_version("sweep-tagged", str(version)).tags
    assert tags["flowray.best_at_nfe_2"] == f"{best2['model']}: {best2['setting']}"
    assert set(tags) >= {"flowray.best_at_nfe_1", "flowray.best_at_nfe_64"}
    assert len(
        client.search_runs([sweep.info.experiment_id], filter_string=f"tags.`flowray.sweep` = '{sweep.info.run_id}'")
    ) == len(names)
    # another grid under the same name is refused in words, before any work
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--steps", "1,4"])  # (argparse: the last --steps counts)
    assert stop.value.code == 2
    assert json.loads((tmp_path / "tiny" / "sweep.json").read_text())["points"][0]["name"] == "model-euler1"
