"""Checkpoint directories: state dicts (model, EMA, optimizer) plus meta.json (step, model and method arguments,
resolved config), so that a model is rebuilt from the checkpoint alone. Loaded with weights_only=True.

A checkpoint is read where it lies: a local folder, or an object-store prefix (`s3://bucket/runs/x/checkpoint_...`,
as Ray Train writes them to an object-store `train.storage_path`), through `pipelines.core.storage`; every actor that
loads one reads it itself, so no node needs a copy on its disk."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from torch import nn

from fm.methods import FlowMethod, make_method
from fm.models import build_model
from fm.seeding import SEEDING_VERSION
from pipelines.core import storage
from pipelines.core.errors import ConfigError

META = "meta.json"
# meta.json's optional keys, each a CheckpointMeta field of the same name (written when not None)
PROVENANCE = ("mlflow_run_id", "manifest", "nonfinite_total", "stream", "posthoc_ema")


class CheckpointError(ConfigError):
    """A missing, incomplete or mismatched checkpoint."""


def save_checkpoint(
    directory: str | Path,
    *,
    step: int,
    model: nn.Module,
    ema_state: dict,
    optimizer: torch.optim.Optimizer | None,
    model_name: str,
    model_kwargs: dict,
    method_kwargs: dict,
    config: dict,
    scaler: torch.amp.GradScaler | None = None,
    **provenance: Any,
) -> Path:
    """Write a checkpoint directory. `model` must be the unwrapped module (no DDP prefixes); `scaler` (fp16
    training) is kept so that a resumed run continues with the loss scale it had; `provenance`: CheckpointMeta's
    mlflow_run_id, manifest, nonfinite_total and stream."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), d / "model.pt")
    torch.save(ema_state, d / "ema.pt")
    if optimizer is not None:
        torch.save(optimizer.state_dict(), d / "optimizer.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), d / "scaler.pt")
    meta = checkpoint_meta(step, model_name, model_kwargs, method_kwargs, config, **provenance)
    (d / META).write_text(json.dumps(meta.to_dict(), indent=1))
    return d


@dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint's meta.json holds: enough to rebuild its model and method alone, and where it came from.

    The file's layout is `to_dict()`; `load_meta` is the one reader. Keys this version does not know (those of a
    newer writer) are kept in `extra` and written back unchanged."""

    step: int
    model_name: str
    model_kwargs: dict[str, Any]
    method: dict[str, Any]  # make_method's arguments, "name" included
    config: dict[str, Any] = field(default_factory=dict)  # the resolved Config.to_dict() it was trained with
    seeding: int = 1  # checkpoints written before the seeding version was recorded used version 1
    mlflow_run_id: str | None = None  # the training run's
    manifest: dict[str, Any] | None = None  # the DataSpec it was trained on
    nonfinite_total: int = 0  # steps skipped for a non-finite loss or gradient, up to this one
    stream: dict[str, Any] | None = None  # the training stream's position (pipelines.train.stream.stream_record)
    posthoc_ema: dict[str, Any] | None = None  # a model rebuilt by `flowray ema`: its sigma_rel, snapshots, fit
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def method_name(self) -> str:
        return str(self.method["name"])

    @property
    def data_shape(self) -> list[int] | None:
        """The (H, W, C) or (D,) shape of the data it was trained on (None for a checkpoint without its manifest)."""
        return (self.manifest or {}).get("shape")

    def to_dict(self) -> dict[str, Any]:
        out = {
            "step": self.step,
            "model": {"name": self.model_name, "kwargs": self.model_kwargs},
            "method": self.method,
            "config": self.config,
            "seeding": self.seeding,
        }
        for key in PROVENANCE:
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, meta: Any, where: str) -> CheckpointMeta:
        """Checked: a mapping with an integer step, model {name, kwargs} and method {name}; `where` names the file
        in errors."""
        if not isinstance(meta, dict):
            raise CheckpointError(f"{where}: expected a JSON object; got {type(meta).__name__}")
        for key, kind in (("step", int), ("model", dict), ("method", dict)):
            if not isinstance(meta.get(key), kind):
                raise CheckpointError(
                    f"{where}: key {key!r} must be {'an integer' if kind is int else 'a mapping'}; "
                    f"got {meta.get(key)!r}"
                )
        if not isinstance(meta["model"].get("name"), str) or not isinstance(meta["model"].get("kwargs"), dict):
            raise CheckpointError(f"{where}: 'model' needs a 'name' and a 'kwargs' mapping")
        if not isinstance(meta["method"].get("name"), str):
            raise CheckpointError(f"{where}: 'method' needs a 'name'")
        known = {"step", "model", "method", "config", "seeding", *PROVENANCE}
        return cls(
            step=meta["step"],
            model_name=meta["model"]["name"],
            model_kwargs=meta["model"]["kwargs"],
            method=meta["method"],
            config=meta.get("config") or {},
            seeding=meta.get("seeding", 1),
            **{k: meta[k] for k in PROVENANCE if k in meta},  # absent: the field's default
            extra={k: v for k, v in meta.items() if k not in known},
        )


def checkpoint_meta(
    step: int, model_name: str, model_kwargs: dict, method_kwargs: dict, config: dict, **provenance: Any
) -> CheckpointMeta:
    """A new checkpoint's meta, written by this version's seeding; `provenance`: mlflow_run_id, manifest,
    nonfinite_total, stream (CheckpointMeta's fields)."""
    return CheckpointMeta(
        step=step,
        model_name=model_name,
        model_kwargs=model_kwargs,
        method=method_kwargs,
        config=config,
        seeding=SEEDING_VERSION,
        **provenance,
    )


def load_meta(directory: str | Path) -> CheckpointMeta:
    """A checkpoint's meta.json, checked: a directory, valid JSON, with step, model and method."""
    d = str(directory)
    if storage.is_file(d):
        raise CheckpointError(f"{d} is a file; a checkpoint is a directory holding {META}, model.pt and ema.pt")
    if not storage.exists(d):
        raise CheckpointError(f"checkpoint directory {d} does not exist")
    path = storage.join(d, META)
    if not storage.is_file(path):
        raise CheckpointError(f"{d} is not a checkpoint: {META} is missing")
    try:
        meta = json.loads(storage.read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    return CheckpointMeta.from_dict(meta, path)


def check_files(directory: str | Path) -> None:
    """Every weights file of a checkpoint opens as a torch archive. Only the zip directory at the file's end is
    read (ranged reads of an object), so this is cheap: a truncated or overwritten file is named here, before Ray
    starts, and the full load (`load_state`, weights_only=True) comes later."""
    import zipfile

    for name in ("model.pt", "ema.pt", "optimizer.pt", "scaler.pt"):
        path = storage.join(str(directory), name)
        if not storage.is_file(path):
            continue
        fs, inner = storage.resolve(path)
        try:
            with fs.open_input_file(inner) as f:
                zipfile.ZipFile(f).close()
        except (zipfile.BadZipFile, OSError, pa.ArrowException):  # pyarrow: a seek before the start of a short file
            raise CheckpointError(f"{path}: not a readable torch file (truncated or corrupt)") from None


def load_state(directory: str | Path, name: str) -> dict:
    """A state dict from <directory>/<name>.pt with weights_only=True; refused or unreadable files are said in
    words (CheckpointError naming the file)."""
    import pickle

    path = storage.join(str(directory), f"{name}.pt")
    if not storage.is_file(path):
        raise CheckpointError(f"checkpoint {directory} has no {name}.pt")
    try:
        source = io.BytesIO(storage.read_bytes(path)) if storage.is_uri(path) else path
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused: it holds Python objects other than tensors and plain containers, "
            f"which are not loaded (torch.load with weights_only=True): "
            f"{str(err).splitlines()[-1][:200]}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path}: not a readable torch file (truncated or corrupt): {str(err).splitlines()[0][:200]}"
        ) from None


@dataclass
class LoadedModel:
    model: nn.Module
    method: FlowMethod
    meta: CheckpointMeta

    @property
    def step(self) -> int:
        return self.meta.step


def load_model(directory: str | Path, use_ema: bool = True, expect: dict | None = None) -> LoadedModel:
    """Rebuild the model (EMA weights by default) and its method from a checkpoint directory alone.

    Args:
        expect: optional model kwargs the caller requires (e.g. image size); a mismatch raises CheckpointError.
    """
    meta = load_meta(directory)
    check_files(directory)
    name, kwargs = meta.model_name, dict(meta.model_kwargs)
    for key, value in (expect or {}).items():
        if kwargs.get(key) != value:
            raise CheckpointError(
                f"checkpoint {directory} was trained with model.{key}={kwargs.get(key)!r}, "
                f"but {value!r} is required here"
            )
    model = build_model(name, **kwargs)
    state = load_state(directory, "ema")["module"] if use_ema else load_state(directory, "model")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(
            f"checkpoint {directory}: weights do not fit model {name} {kwargs}: {str(err).splitlines()[0]}"
        ) from None
    return LoadedModel(model.eval(), make_method(**meta.method), meta)
