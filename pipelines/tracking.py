"""MLflow helpers: experiments with an absolute artifact location, runs found again by name, and a logger that
warns instead of crashing when the tracking server goes away mid-run."""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger(__name__)


def artifact_root(uri: str) -> str | None:
    """Absolute artifact location for file-backed stores; None (server default) for HTTP tracking.

    With sqlite, MLflow would put artifacts in ./mlruns relative to each process's working directory, and Ray
    workers run in Ray's session folder, so the driver fixes an absolute location next to the database.
    """
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        db = Path(uri[len("sqlite:///"):])
        return (db.parent / "mlartifacts").resolve().as_uri()
    if parsed.scheme in ("", "file"):
        return (Path(parsed.path or uri).resolve() / "artifacts").as_uri()
    return None


def check_tracking_uri(uri: str, key: str = "mlflow.tracking_uri", timeout: float = 5.0) -> None:
    """Fail fast, before any Ray work, when an HTTP tracking server does not answer (instead of MLflow's minutes of
    retries); raise ConfigError naming the key and the URI."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    import urllib.request

    from pipelines.config import ConfigError

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout)
    except Exception as err:  # URLError, timeouts, HTTP errors: the server is not usable
        reason = getattr(err, "reason", err)
        raise ConfigError(f"{key}: the MLflow server at {uri} does not answer ({reason}); start it, or point "
                          "the key (or $MLFLOW_TRACKING_URI) elsewhere") from None


def get_or_create_experiment(client, name: str, uri: str) -> str:
    """Experiment id by name, creating it with an absolute artifact location when missing."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = artifact_root(uri)
    return client.create_experiment(name, artifact_location=f"{root}/{name}" if root else None)


def find_or_create_run(uri: str, experiment: str, run_name: str, tags: dict[str, str] | None = None,
                       resume: bool = True, parent_run_id: str | None = None) -> tuple[str, bool]:
    """The id of the run tagged with run_name in the experiment (resume=True), or of a new one.

    Returns (run_id, resumed).
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp_id = get_or_create_experiment(client, experiment, uri)
    if resume:
        found = client.search_runs([exp_id], filter_string=f"tags.`flowray.run_name` = '{run_name}' and "
                                   f"tags.`flowray.storage` = '{(tags or {}).get('flowray.storage', '')}'",
                                   max_results=1, order_by=["attributes.start_time DESC"])
        if found:
            client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id, True
    all_tags = {"flowray.run_name": run_name, "mlflow.runName": run_name, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, tags=all_tags, run_name=run_name)
    return run.info.run_id, False


class SafeLogger:
    """Logs to one MLflow run through MlflowClient; any tracking error becomes a warning, never a crash.

    Metrics that fail to log are counted (`failures`); a long job keeps training through a tracking outage.
    """

    def __init__(self, uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.client, self.run_id, self.failures = MlflowClient(uri), run_id, 0

    def _safe(self, what: str, fn, *args, **kwargs) -> bool:
        try:
            fn(*args, **kwargs)
            return True
        except Exception as err:  # tracking must never kill training
            self.failures += 1
            if self.failures <= 3 or self.failures % 100 == 0:
                warnings.warn(f"MLflow {what} failed ({self.failures} failures so far), training continues: "
                              f"{type(err).__name__}: {str(err)[:200]}", RuntimeWarning, stacklevel=2)
            return False

    def metrics(self, values: dict[str, float], step: int) -> bool:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step) for k, v in values.items()]
        return self._safe("log metrics", self.client.log_batch, self.run_id, metrics=batch)

    def params(self, values: dict) -> bool:
        from mlflow.entities import Param

        batch = [Param(k, str(v)[:6000]) for k, v in values.items()]
        ok = True
        for i in range(0, len(batch), 100):
            ok &= self._safe("log params", self.client.log_batch, self.run_id, params=batch[i : i + 100])
        return ok

    def tags(self, values: dict[str, str]) -> bool:
        from mlflow.entities import RunTag

        return self._safe("set tags", self.client.log_batch, self.run_id,
                          tags=[RunTag(k, str(v)) for k, v in values.items()])

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> bool:
        p = Path(path)
        fn = self.client.log_artifacts if p.is_dir() else self.client.log_artifact
        return self._safe(f"log artifact {p.name}", fn, self.run_id, str(p), artifact_path)

    def finish(self, status: str = "FINISHED") -> bool:
        return self._safe("end run", self.client.set_terminated, self.run_id, status)


def log_final_model(uri: str, run_id: str, checkpoint: str, register_as: str | None = None) -> dict:
    """Log the final checkpoint to the training run, and the EMA network as an MLflow Model.

    The run gets the checkpoint directory as artifact `model` (without the optimizer state), which `runs:/RUN_ID`
    resolves to. The MLflow Model (`mlflow.pytorch`, `name="mlflow_model"`) is the network exported with
    torch.export (MLflow's pt2 format, no pickled code), with a tensor signature (x_t, t[, y]) -> prediction, and
    the checkpoint files as its extra files, so `models:/NAME/VERSION` rebuilds it with `weights_only=True`. With
    `register_as`, the model is registered under that name. Tracking errors warn and return what was done.
    """
    import shutil
    import tempfile

    from pipelines.checkpoint import META, load_model

    out: dict = {"mlflow_model": None, "registered_model": None}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "model"
        ckpt.mkdir()
        for name in (META, "model.pt", "ema.pt"):
            shutil.copy2(Path(checkpoint) / name, ckpt / name)
        SafeLogger(uri, run_id).artifact(ckpt, "model")
        try:
            info = _log_mlflow_model(uri, run_id, load_model(ckpt), ckpt, register_as)
        except Exception as err:  # the checkpoint artifact above is what the pipeline needs; this is a convenience
            warnings.warn(f"MLflow Model not logged: {type(err).__name__}: {str(err)[:300]}", RuntimeWarning,
                          stacklevel=2)
            return out
    out["mlflow_model"] = info.model_uri
    if register_as:
        out["registered_model"] = f"models:/{register_as}/{info.registered_model_version}"
    return out


def _log_mlflow_model(uri: str, run_id: str, loaded, ckpt: Path, register_as: str | None):
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    model = loaded.model.float().eval()
    kw = loaded.meta["model"]["kwargs"]
    shape = [kw["in_channels"], kw["image_size"], kw["image_size"]] if "image_size" in kw else [kw["dim"]]
    f32 = np.dtype(np.float32)
    inputs = [TensorSpec(f32, (-1, *shape), "x_t"), TensorSpec(f32, (-1,), "t")]
    example = [np.zeros((2, *shape), np.float32), np.full(2, 0.5, np.float32)]
    if kw.get("num_classes"):
        inputs.append(TensorSpec(np.dtype(np.int64), (-1,), "y"))
        example.append(np.zeros(2, np.int64))
    signature = ModelSignature(Schema(inputs), Schema([TensorSpec(f32, (-1, *shape), loaded.method.prediction)]))
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        return mlflow.pytorch.log_model(
            model, name="mlflow_model", signature=signature, input_example=tuple(example),
            extra_files=[str(p) for p in sorted(ckpt.iterdir())], registered_model_name=register_as,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])


def resolve_checkpoint(spec: str, uri: str, cache: str | Path = "outputs/checkpoints") -> str:
    """A checkpoint directory from a path, `runs:/RUN_ID` (the training run's logged checkpoint), or a registered
    model `models:/NAME/VERSION` or `models:/NAME@ALIAS` (its extra files hold the checkpoint)."""
    from pipelines.checkpoint import META, CheckpointError

    if spec.startswith("models:/"):
        import re
        import shutil

        from mlflow.artifacts import download_artifacts

        dst = Path(cache) / "models" / re.sub(r"[^A-Za-z0-9_.@-]+", "_", spec[len("models:/"):])
        shutil.rmtree(dst, ignore_errors=True)  # an alias may have moved since the last download
        dst.mkdir(parents=True)
        try:
            local = download_artifacts(artifact_uri=spec, dst_path=str(dst), tracking_uri=uri)
        except Exception as err:
            raise CheckpointError(f"cannot fetch registered model {spec} from {uri}: "
                                  f"{str(err).splitlines()[0][:300]}") from None
        ckpt = Path(local) / "extra_files"
        if not (ckpt / META).exists():
            raise CheckpointError(f"{spec} is not a flowray model: it holds no extra_files/{META}")
        return str(ckpt)
    if not spec.startswith("runs:/"):
        return spec
    from mlflow.tracking import MlflowClient

    run_id = spec[len("runs:/"):].strip("/").split("/")[0]
    dst = Path(cache) / run_id
    if not (dst / "model" / META).exists():
        dst.mkdir(parents=True, exist_ok=True)
        try:
            MlflowClient(uri).download_artifacts(run_id, "model", str(dst))
        except Exception as err:
            raise CheckpointError(f"cannot fetch the model of MLflow run {run_id} from {uri}: "
                                  f"{str(err).splitlines()[0][:300]}") from None
    return str(dst / "model")


def start_child_run(uri: str, train_run_id: str | None, kind: str, run_name: str,
                    experiment: str | None = None) -> str:
    """A run nested under the training run (same experiment) and tagged with its id; or a run in `experiment`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    tags = {"flowray.kind": kind, "mlflow.runName": run_name}
    exp_id = None
    if train_run_id:
        try:
            exp_id = client.get_run(train_run_id).info.experiment_id
            tags.update({"flowray.train_run_id": train_run_id, "mlflow.parentRunId": train_run_id})
        except Exception:
            warnings.warn(f"training run {train_run_id} is not in {uri}; logging without lineage",
                          RuntimeWarning, stacklevel=2)
    if exp_id is None:
        exp_id = get_or_create_experiment(client, experiment or "flowray", uri)
    return client.create_run(exp_id, tags=tags, run_name=run_name).info.run_id
