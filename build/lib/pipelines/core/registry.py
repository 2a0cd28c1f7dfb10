"""The model registry's side: the final checkpoint and its MLflow Model logged to the training run, registered
versions described and tagged with their scores, and `runs:/` / `models:/` URIs resolved to a checkpoint."""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

from pipelines.core import storage
from pipelines.core.checkpoint import META, CheckpointError, load_model
from pipelines.core.run_logger import SafeLogger


def log_final_model(
    uri: str,
    run_id: str,
    checkpoint: str,
    register_as: str | None = None,
    data: dict | None = None,
    mlflow_model: bool = True,
) -> dict:
    """Log the final checkpoint to the training run, and (with `mlflow_model`) the EMA network as an MLflow Model.

    The run gets the checkpoint directory as artifact `model` (without the optimizer state), which `runs:/RUN_ID`
    resolves to. The MLflow Model (`mlflow.pytorch`, `name="mlflow_model"`) is the network exported with
    torch.export (MLflow's pt2 format, no pickled code), with a tensor signature (x_t, t[, y]) -> prediction, and
    the checkpoint files as its extra files, so `models:/NAME/VERSION` rebuilds it with `weights_only=True`. With
    `register_as`, the model is registered under that name. Tracking errors warn and return what was done.
    """

    out: dict = {"mlflow_model": None, "registered_model": None}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "model"
        ckpt.mkdir()
        for name in (META, "model.pt", "ema.pt"):
            shutil.copy2(Path(checkpoint) / name, ckpt / name)
        logger = SafeLogger(uri, run_id)
        logger.artifact(ckpt, "model")
        logger.close()
        if not mlflow_model:
            return out
        try:
            info = _log_mlflow_model(uri, run_id, load_model(ckpt), ckpt, register_as)
        except Exception as err:  # the checkpoint artifact above is what the pipeline needs; this is a convenience
            warnings.warn(
                f"MLflow Model not logged: {type(err).__name__}: {str(err)[:300]}", RuntimeWarning, stacklevel=2
            )
            return out
    out["mlflow_model"] = info.model_uri
    if register_as:
        out["registered_model"] = f"models:/{register_as}/{info.registered_model_version}"
        try:
            describe_model_version(uri, register_as, str(info.registered_model_version), checkpoint, data)
        except Exception as err:  # the version exists; its description is a convenience
            warnings.warn(
                f"model version not described: {type(err).__name__}: {str(err)[:300]}", RuntimeWarning, stacklevel=2
            )
    return out


def describe_model_version(uri: str, name: str, version: str, checkpoint: str, data: dict | None = None) -> None:
    """What a registry browser should see of a version without opening its run: a one-paragraph description (method,
    path, coupling, model and size, training steps, data set and digest) and the same as `flowray.*` tags."""
    from mlflow.tracking import MlflowClient

    from fm.methods import describe

    loaded = load_model(checkpoint)
    meta, method = loaded.meta, loaded.meta.method
    path, coupling = describe(method["name"], method.get("ot_scope", "local"))
    size = sum(p.numel() for p in loaded.model.parameters())
    tags = {
        "flowray.method": method["name"],
        "flowray.path": path,
        "flowray.coupling": coupling,
        "flowray.model": meta.model_name,
        "flowray.parameters": str(size),
        "flowray.train_steps": str(meta.step),
    }
    text = (
        f"{method['name']}: {path} path, {coupling} coupling; a {meta.model_name} of {size:,} parameters "
        f"trained {meta.step} steps"
    )
    if data:
        tags.update({"flowray.data": data["name"], "flowray.data_digest": data["digest"]})
        text += f" on {data['name']} ({data['profile']['num_rows']} rows, digest {data['digest']})"
    client = MlflowClient(uri)
    client.update_model_version(name, version, description=text + ".")
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def tag_model_version(uri: str, spec: str, values: dict[str, object]) -> str | None:
    """Set `flowray.*` tags (the latest evaluation's figures) on the registry version a `models:/NAME/VERSION` or
    `models:/NAME@ALIAS` spec names; returns "NAME/VERSION", or None for any other checkpoint spec."""
    from mlflow.tracking import MlflowClient

    if not spec.startswith("models:/"):
        return None
    client = MlflowClient(uri)
    name, version = parse_model_uri(spec)
    if version.startswith("@"):
        version = client.get_model_version_by_alias(name, version[1:]).version
    for key, value in values.items():
        if value is not None:
            client.set_model_version_tag(name, str(version), f"flowray.{key}", str(value))
    return f"{name}/{version}"


def _log_mlflow_model(uri: str, run_id: str, loaded, ckpt: Path, register_as: str | None):
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    model = loaded.model.float().eval()
    kw = loaded.meta.model_kwargs
    shape = [kw["in_channels"], kw["image_size"], kw["image_size"]] if "image_size" in kw else [kw["dim"]]
    f32 = np.dtype(np.float32)
    inputs: list[ColSpec | TensorSpec] = [TensorSpec(f32, (-1, *shape), "x_t"), TensorSpec(f32, (-1,), "t")]
    example = [np.zeros((2, *shape), np.float32), np.full(2, 0.5, np.float32)]
    if kw.get("num_classes"):
        inputs.append(TensorSpec(np.dtype(np.int64), (-1,), "y"))
        example.append(np.zeros(2, np.int64))
    outputs: list[ColSpec | TensorSpec] = [TensorSpec(f32, (-1, *shape), loaded.method.prediction)]
    signature = ModelSignature(Schema(inputs), Schema(outputs))
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        return mlflow.pytorch.log_model(
            model,
            name="mlflow_model",
            signature=signature,
            input_example=tuple(example),
            extra_files=[str(p) for p in sorted(ckpt.iterdir())],
            registered_model_name=register_as,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )


def parse_model_uri(spec: str) -> tuple[str, str]:
    """`models:/NAME/VERSION` or `models:/NAME@ALIAS` -> (NAME, "VERSION" or "@ALIAS"), each part checked as one
    name (`storage.check_name`): they name the registry cache's folders, so neither may reach outside it."""
    rest = spec[len("models:/") :]
    name, at, alias = rest.partition("@")
    if not at:
        name, slash, version = rest.rpartition("/")
        if not slash:
            raise CheckpointError(
                f"--checkpoint: {spec!r} is not a registered model URI; expected "
                "models:/NAME/VERSION or models:/NAME@ALIAS"
            )
    storage.check_name(name, "--checkpoint (registered model name)", also=":")
    if at:
        storage.check_name(alias, "--checkpoint (alias)", also=":@")
        return name, f"@{alias}"
    return name, storage.check_name(version, "--checkpoint (version)", also=":@")


def resolve_checkpoint(spec: str, uri: str, cache: str | Path = "outputs/checkpoints") -> str:
    """A checkpoint directory from a path, `runs:/RUN_ID` (the training run's logged checkpoint), or a registered
    model `models:/NAME/VERSION` or `models:/NAME@ALIAS` (its extra files hold the checkpoint). Downloads go to
    `cache`; a registered model's folder there is replaced on every call (an alias may have moved), and only after
    its path is proven to lie inside the cache's own `models` folder."""
    if spec.startswith("models:/"):
        from mlflow.artifacts import download_artifacts

        name, which = parse_model_uri(spec)
        models = (Path(cache) / "models").resolve()
        dst = (models / name / which).resolve()
        if dst.parent.parent != models:  # two components under the cache's models folder, or nothing is deleted
            raise CheckpointError(f"--checkpoint: {spec!r} would be cached outside {models}")
        shutil.rmtree(dst, ignore_errors=True)  # an alias may have moved since the last download
        dst.mkdir(parents=True)
        try:
            local = download_artifacts(artifact_uri=spec, dst_path=str(dst), tracking_uri=uri)
        except Exception as err:
            raise CheckpointError(
                f"cannot fetch registered model {spec} from {uri}: {str(err).splitlines()[0][:300]}"
            ) from None
        ckpt = Path(local) / "extra_files"
        if not (ckpt / META).exists():
            raise CheckpointError(f"{spec} is not a flowray model: it holds no extra_files/{META}")
        return str(ckpt)
    if not spec.startswith("runs:/"):
        return spec
    from mlflow.tracking import MlflowClient

    run_id = storage.check_name(spec[len("runs:/") :].strip("/").split("/")[0], "--checkpoint (run id)")
    dst = Path(cache) / run_id
    if not (dst / "model" / META).exists():
        dst.mkdir(parents=True, exist_ok=True)
        try:
            MlflowClient(uri).download_artifacts(run_id, "model", str(dst))
        except Exception as err:
            raise CheckpointError(
                f"cannot fetch the model of MLflow run {run_id} from {uri}: {str(err).splitlines()[0][:300]}"
            ) from None
    return str(dst / "model")
