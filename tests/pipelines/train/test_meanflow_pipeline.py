"""MeanFlow through the pipeline, on the session's Ray and digits: two DDP workers train it (the target's JVP runs
outside DDP), quality while training samples it in one jump, the batch stage samples it in 1 and 2 jumps (one
network call each), and evaluation scores its samples without a likelihood, which it does not have."""

import pytest
from mlflow.tracking import MlflowClient
from pipeline_helpers import TINY


@pytest.mark.heavy  # one more tiny Ray Train run with sampling and evaluation (about a minute): `make heavy`
def test_meanflow_trains_on_two_workers_and_samples_in_jumps(scored_digits, tmp_path, ray_local, capsys):
    digits = scored_digits  # the session's digits with the classifier and the reference's statistics cached
    from jobs.evaluate import main as evaluate_main
    from jobs.sample import main as sample_main
    from jobs.train import main as train_main
    from pipelines.core.checkpoint import load_model

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = [
        *TINY,
        f"data.shards={digits}",
        f"train.storage_path={tmp_path / 'runs'}",
        f"mlflow.tracking_uri={uri}",
        "train.run_name=mean",
        "mlflow.experiment=tests",
        "method.name=meanflow",
        "train.steps=8",
        "train.sample_every=8",
        "train.eval_every=8",
        "train.eval_solver=jump",
        "train.eval_steps=1",
        "train.eval_samples=32",
        "train.eval_rows=16",
    ]
    trained = train_main(["--config", "configs/digits-cpu.yaml", *[a for s in sets for a in ("--set", s)]])
    assert trained["metrics"]["step"] == 8
    loaded = load_model(trained["checkpoint"])
    assert loaded.meta.model_kwargs["two_times"] and loaded.meta.method["meanflow_ratio"] == 0.25
    client = MlflowClient(uri)
    run = client.get_run(trained["run_id"])
    assert run.data.metrics["loss"] > 0 and "eval/fd" in run.data.metrics and "eval/bpd" not in run.data.metrics
    assert run.data.metrics["eval/sample_nfe"] == 1.0  # one jump, one network call per sample
    assert {a.path for a in client.list_artifacts(trained["run_id"], "samples")} == {"samples/step_000008.png"}
    # mlflow.log_model=false (the tiny configs'): the checkpoint is the run's `model` artifact, and no MLflow Model
    assert trained["mlflow_model"] is None and "model" in {a.path for a in client.list_artifacts(trained["run_id"])}
    logged = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
    assert list(logged) == []

    for steps in (1, 2):
        sampled = sample_main(
            [
                "--checkpoint",
                trained["checkpoint"],
                "--num-samples",
                "16",
                "--out",
                str(tmp_path / f"jump{steps}"),
                "--tracking-uri",
                uri,
                "--set",
                "sample.solver=jump",
                "--set",
                f"sample.steps={steps}",
            ]
        )
        assert sampled["num_samples"] == 16 and sampled["mean_nfe"] == steps
    evaluated = evaluate_main(
        [
            "--checkpoint",
            trained["checkpoint"],
            "--data",
            str(digits),
            "--samples",
            str(tmp_path / "jump1"),
            "--tracking-uri",
            uri,
        ]
    )
    assert evaluated["likelihood"] is None and evaluated["straightness"] is None
    assert evaluated["quality"]["num_samples"] == 16 and evaluated["quality"]["fd"] > 0
    (ev_run,) = client.search_runs([run.info.experiment_id], "tags.`flowray.kind` = 'evaluate'")
    assert "fd" in ev_run.data.metrics and "bpd" not in ev_run.data.metrics
    assert ev_run.data.tags["flowray.sample_solver"] == "jump"

    # an ODE solver is refused in words, before Ray work
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        sample_main(
            ["--checkpoint", trained["checkpoint"], "--num-samples", "4", "--out", str(tmp_path / "ode"), "--no-mlflow"]
        )
    assert stop.value.code == 2
    assert (
        "sample.solver: 'dopri5' is not allowed; meanflow models average velocities: it samples in 'jump's"
        in capsys.readouterr().err
    )
