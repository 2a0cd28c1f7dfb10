"""Ray Train integration: a real local Ray, real MLflow stores (sqlite and an `mlflow server` over HTTP)."""

import time
from pathlib import Path

import pytest
import torch
from conftest import TRAINED_RUN
from mlflow.tracking import MlflowClient
from pipeline_helpers import ROOT, free_port, kill_tree, start_mlflow_server, tiny_config

from pipelines.core.checkpoint import CheckpointError, load_meta, load_model
from pipelines.core.errors import ConfigError
from pipelines.ingest.run import load_manifest
from pipelines.train.config import load_config
from pipelines.train.driver import run_training
from pipelines.train.validation import validation_loss, validation_set

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def _history(client, run_id, key):
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def _snapshot(client, run_id) -> dict:
    """Everything MLflow holds of a run: info (status, times), params, tags, every metric's history, and every
    artifact with its size."""
    run = client.get_run(run_id)

    def artifacts(path=None):
        out = []
        for a in client.list_artifacts(run_id, path):
            out += artifacts(a.path) if a.is_dir else [(a.path, a.file_size)]
        return out

    return {
        "run": run.to_dictionary(),
        "artifacts": sorted(artifacts()),
        "history": {k: _history(client, run_id, k) for k in sorted(run.data.metrics)},
    }


def _continue(trained: dict, *extra: str):
    """The session's trained run's config (its store by absolute URI) with `extra` overrides: another attempt at the
    same run name."""
    sets = [
        s if not s.startswith("mlflow.tracking_uri=") else f"mlflow.tracking_uri={trained['uri']}"
        for s in trained["sets"]
    ]
    return load_config(str(ROOT / "configs/digits-cpu.yaml"), [*sets, *extra])


@pytest.mark.heavy  # reads the session's trained run, as the quality and UI checks of `make heavy` do
@pytest.mark.timeout(900)
def test_two_workers_checkpoints_mlflow_and_resume(trained_digits, tmp_path):
    # the session's run: `flowray train` with a store named relative to the current folder, as a user types it (the
    # workers, which Ray Train runs in another folder, logged into the same one)
    res, digits = trained_digits["train"], trained_digits["digits"]
    assert res["metrics"]["step"] == 8 and not res["resumed"]
    assert res["tracking_uri"] == f"sqlite:///{trained_digits['tmp'].resolve() / 'server.db'}"
    loaded = load_model(res["checkpoint"])
    assert loaded.step == 8 and loaded.meta.model_kwargs["model_channels"] == 8
    client = MlflowClient(res["tracking_uri"])
    run = client.get_run(res["run_id"])
    # the validation loss at each checkpoint is the EMA model's loss on the fixed held-out rows, recomputed here
    # from the checkpoint alone (float32 kernels of another thread count: a relative 1e-4)
    assert [s for s, _ in _history(client, res["run_id"], "val_loss")] == [4, 8]
    held_out = validation_set(load_manifest(digits), "test", 40, "none")
    assert res["metrics"]["val_loss"] == pytest.approx(
        validation_loss(loaded.method, loaded.model, held_out, torch.device("cpu")), rel=1e-4
    )
    assert _history(client, res["run_id"], "val_loss")[-1][1] == pytest.approx(res["metrics"]["val_loss"])
    assert run.data.params["method.name"] == "fm_ot" and run.data.params["ray.num_workers"] == "2"
    loss = sorted(client.get_metric_history(res["run_id"], "loss"), key=lambda m: m.step)
    assert [m.step for m in loss] == [2, 4, 6, 8]
    # each window stamped when it closed, not when its checkpoint reached MLflow (two windows per checkpoint)
    stamps = [m.timestamp for m in loss]
    assert stamps == sorted(set(stamps)), stamps
    for key in ("grad_norm", "lr", "images_per_s", "data_wait_fraction", "ot_solve_s"):
        assert key in run.data.metrics
    assert run.info.status == "FINISHED"
    # what MLflow's UI shows: the model-training view, a description, the source, the user and the commit
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert run.data.tags["mlflow.note.content"].startswith("fm_ot on digits/train, 8 steps of ")
    assert run.data.tags["mlflow.source.name"] and run.data.tags["mlflow.user"]
    assert len(run.data.tags.get("mlflow.source.git.commit", "x" * 40)) == 40
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    (read,) = run.inputs.dataset_inputs  # the split it trained on, by content digest: MLflow's lineage
    assert (read.dataset.name, read.dataset.digest) == ("digits/train", load_manifest(digits).digest("train"))
    assert [(tag.key, tag.value) for tag in read.tags] == [("mlflow.data.context", "train")]
    artifacts = {a.path for a in client.list_artifacts(res["run_id"], "samples")}
    assert artifacts == {"samples/step_000004.png", "samples/step_000008.png"}
    model_files = {a.path for a in client.list_artifacts(res["run_id"], "model")}
    assert {"model/meta.json", "model/ema.pt", "model/model.pt"} <= model_files
    local = client.download_artifacts(res["run_id"], "model", str(tmp_path / "dl"))
    assert load_model(local).step == 8  # the logged final model rebuilds from the artifact alone
    assert load_meta(res["checkpoint"]).stream["cursor"] == 8 * 16 * 2  # rows consumed: 8 steps of 16 x 2

    finished = _snapshot(client, res["run_id"])
    name, run_dir = TRAINED_RUN, res["run_dir"]

    # another model width under the same run name is refused before Ray or MLflow is touched
    with pytest.raises(
        ConfigError,
        match=rf"train.run_name='{name}' already has a checkpoint at step 8 .*"
        r"cannot resume with this one: model.model_channels was 8, now 16\. "
        r"Set train.run_name to a new name",
    ):
        run_training(_continue(trained_digits, "train.steps=12", "model.model_channels=16"))
    # the same config again: the run is done; nothing is trained and the result is the finished run's
    again = run_training(_continue(trained_digits))
    assert again.already_finished and again.run_id == res["run_id"]
    assert again.checkpoint == res["checkpoint"] and again.metrics["step"] == 8
    assert again.mlflow_model == res["mlflow_model"]

    # continuing past the finished run's steps is a new MLflow run; this attempt fails (no retries)
    with pytest.raises(Exception, match="injected failure"):
        run_training(_continue(trained_digits, "train.steps=12", "train.fail_at_step=10", "ray.max_failures=0"))
    failed = client.search_runs([run.info.experiment_id], f"tags.`flowray.continues` = '{res['run_id']}'")
    assert len(failed) == 1 and failed[0].info.status == "FAILED"
    # the rerun, on one worker instead of two, resumes the interrupted continuation (same MLflow run) from the
    # finished run's checkpoint, from the row the two workers had reached
    more = run_training(_continue(trained_digits, "train.steps=12", "ray.num_workers=1"))
    assert more.resumed
    assert more.run_id == failed[0].info.run_id and more.run_id != res["run_id"]
    assert more.metrics["step"] == 12 and load_meta(more.checkpoint).step == 12
    assert load_meta(more.checkpoint).stream["cursor"] == 8 * 16 * 2 + 4 * 16
    assert [s for s, _ in _history(client, more.run_id, "loss")] == [10, 12]
    # a refused, an already-finished, a failed and a continued attempt later, the finished run is as it was
    assert _snapshot(client, res["run_id"]) == finished

    # a damaged checkpoint to resume from is named before any training starts
    (Path(more.checkpoint) / "model.pt").write_bytes(b"PK\x03\x04 overwritten")
    with pytest.raises(CheckpointError, match=r"model.pt: not a readable torch file \(truncated or corrupt\)"):
        run_training(_continue(trained_digits, "train.steps=16"))
    assert Path(run_dir).is_dir()


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    proc = start_mlflow_server(port, tmp_path)
    yield f"http://127.0.0.1:{port}"
    kill_tree(proc)


@pytest.mark.heavy  # about 90 s with its server: in `make heavy`, so that `make test` stays within its budget
def test_bf16_training_logged_to_a_real_mlflow_server_and_sampled_by_registered_name(
    digits, tmp_path, ray_local, mlflow_server
):
    """One run: train.precision=bf16 (CPU autocast) with NHWC batches, logged over HTTP to a real `mlflow server`,
    registered, and sampled by its registered name and alias."""
    import mlflow

    from jobs.sample import main as sample_main
    from pipelines.core.checkpoint import CheckpointError
    from pipelines.core.registry import resolve_checkpoint

    res = run_training(
        tiny_config(
            digits,
            tmp_path / "runs",
            mlflow_server,
            "over-http",
            "train.steps=4",
            "ray.num_workers=1",
            "mlflow.log_model=true",
            "mlflow.register_as=tiny-digits",
            "train.precision=bf16",
            "train.channels_last=true",
        )
    )
    # bf16: finite losses, and a checkpoint in fp32 that rebuilds the model (the memory format is not part of it)
    assert res.metrics["step"] == 4 and res.metrics["nonfinite_total"] == 0
    ckpt = load_model(res.checkpoint)
    assert ckpt.meta.config["train"]["precision"] == "bf16"
    assert all(p.dtype == torch.float32 for p in ckpt.model.parameters())
    client = MlflowClient(mlflow_server)
    run = client.get_run(res.run_id)
    assert run.data.params["train.precision"] == "bf16"
    assert run.data.params["train.steps"] == "4" and "loss" in run.data.metrics
    assert {a.path for a in client.list_artifacts(res.run_id, "samples")} == {"samples/step_000004.png"}
    # the final model is an MLflow Model in the registry, and the batch stages take it by name
    assert res.registered_model == "models:/tiny-digits/1"
    client.set_registered_model_alias("tiny-digits", "champion", "1")
    for i, spec in enumerate(("models:/tiny-digits/1", "models:/tiny-digits@champion")):
        out = sample_main(
            [
                "--checkpoint",
                spec,
                "--num-samples",
                "4",
                "--out",
                str(tmp_path / f"s{i}"),
                "--tracking-uri",
                mlflow_server,
                "--set",
                "sample.solver=euler",
                "--set",
                "sample.steps=2",
            ]
        )
        assert out["blocks_sampled"] == 1 and out["train_run_id"] == res.run_id
        assert client.get_run(out["mlflow_run_id"]).data.tags["flowray.train_run_id"] == res.run_id
    # the exported network (pt2, no pickled code) computes what the checkpoint's EMA network computes
    loaded = load_model(resolve_checkpoint("models:/tiny-digits/1", mlflow_server, cache=tmp_path / "cache"))
    mlflow.set_tracking_uri(mlflow_server)
    exported = mlflow.pytorch.load_model("models:/tiny-digits/1")
    x, t = torch.randn(3, 1, 8, 8), torch.rand(3)
    with torch.no_grad():
        torch.testing.assert_close(exported(x, t), loaded.model(x, t))
    signature = mlflow.models.get_model_info("models:/tiny-digits/1").signature
    assert [s.name for s in signature.inputs.inputs] == ["x_t", "t"]
    assert signature.outputs.inputs[0].shape == (-1, 1, 8, 8)
    with pytest.raises(CheckpointError, match="cannot fetch registered model models:/nope/1"):
        resolve_checkpoint("models:/nope/1", mlflow_server, cache=tmp_path / "cache")


def test_logging_windows_reach_mlflow_stamped_when_they_closed(tmp_path):
    """The controller's callback logs each window at its step with the time the worker closed it; a window from a
    checkpoint written before windows were stamped is logged now; a resume's replay keeps the stamps."""
    from types import SimpleNamespace

    from pipelines.core.tracking import create_run
    from pipelines.train.metrics import WINDOWS, CheckpointedMetrics, replay_windows

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = create_run(uri, "stamps", "stamps")
    callback = CheckpointedMetrics(uri, run_id, steps=8, flush_timeout_s=30)
    callback.after_report(
        None,
        [{"step": 4, WINDOWS: [(2, {"loss": 1.0}, 1_000_000), [4, {"loss": 0.5}, 2_000_000]]}],
        checkpoint=object(),
    )
    before = int(time.time() * 1000)
    callback.after_report(None, [{"step": 8, WINDOWS: [(8, {"loss": 0.25})]}], checkpoint=object())
    loss = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in loss] == [(2, 1.0), (4, 0.5), (8, 0.25)]
    assert [m.timestamp for m in loss[:2]] == [1_000_000, 2_000_000] and loss[2].timestamp >= before

    resumed = create_run(uri, "stamps", "stamps-resumed")
    previous = SimpleNamespace(
        best_checkpoints=[
            (None, {WINDOWS: [[2, {"loss": 1.0}, 1_000_000]]}),
            (None, {WINDOWS: [[4, {"loss": 0.5}, 2_000_000]]}),
        ]
    )
    assert replay_windows(uri, resumed, previous, after_step=2) == 1
    assert [(m.step, m.timestamp) for m in client.get_metric_history(resumed, "loss")] == [(4, 2_000_000)]


def test_tracking_outage_queues_without_blocking_and_counts_what_is_lost(monkeypatch):
    from pipelines.core.run_logger import SafeLogger

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    logger = SafeLogger(f"http://127.0.0.1:{free_port()}", "0" * 32, max_queue=3)  # nothing listens there
    start = time.perf_counter()
    with pytest.warns(RuntimeWarning, match="logging queue full"):
        for step in range(5):
            assert logger.metrics({"loss": 1.0, "lr": 0.1}, step=step) is True
    assert time.perf_counter() - start < 0.5  # queued, not sent: the caller is not held back
    with pytest.warns(RuntimeWarning, match=r"10 metric value\(s\) were not logged to run 0{32}"):
        assert logger.close(timeout=1.5) is False
    assert logger.lost_points == 10 and logger.retries >= 1 and logger.failures == 0
    assert logger.metrics({"loss": 1.0}, step=6) is False and logger.lost_points == 11  # closed: counted
