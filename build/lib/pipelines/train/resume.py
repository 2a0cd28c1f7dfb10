"""What a training run may change when it resumes, checked against its last checkpoint before Ray starts.

A run name (`train.run_name` under `train.storage_path`) names one model in training. Resuming continues that
model, so what built it and what it is trained on must be what its checkpoints were trained with: the model, the
method, the data's kind, shape and classes, the split, and the stream's identity (`train.seed`,
`train.batch_size`). Everything else may change on resume: the step target, the learning-rate schedule, clipping
and EMA decay, logging, sampling, checkpoint and EMA snapshot cadence (not whether the post-hoc EMA profiles are
kept, nor their lengths), precision, and every `ray.*` and `mlflow.*` key (the
worker count among them: the stream continues from the rows the checkpoint had consumed, `stream.resume_position`),
and `data.shuffle_window` (which orders the passes after the one under way).
"""

from __future__ import annotations

from typing import Any

from fm.seeding import SEEDING_VERSION
from pipelines.core.checkpoint import CheckpointMeta
from pipelines.core.errors import ConfigError
from pipelines.core.manifest import DataSpec
from pipelines.train.config import Config, model_kwargs

FIXED_KEYS = ("data.split", "train.seed", "train.batch_size")
DATA_FIELDS = ("kind", "shape", "num_classes", "class_names", "manifold", "times")
_ABSENT = object()


def fixed_keys(cfg: Config, data: DataSpec) -> list[str]:
    """The config keys a resume must keep: every method key, the model keys that build this architecture, and
    `FIXED_KEYS` (a UNet run may change `model.hidden`, which only an MLP uses)."""
    built = set(model_kwargs(cfg, data)) | {"name", "class_conditional", "label_dropout"}
    model = [f"model.{k}" for k in cfg.to_dict()["model"] if k in built]
    return model + [f"method.{k}" for k in cfg.to_dict()["method"]] + list(FIXED_KEYS)


def differences(cfg: Config, data: DataSpec, meta: CheckpointMeta) -> list[str]:
    """What differs between this config and data and the checkpoint's (`meta.json`): one line per key, both values.
    Keys an older checkpoint does not record are not compared."""
    now, saved = cfg.to_dict(), meta.config
    out = []
    for key in fixed_keys(cfg, data):
        section, name = key.split(".", 1)
        old = saved.get(section, {}).get(name, _ABSENT)
        if old is not _ABSENT and _plain(old) != _plain(now[section][name]):
            out.append(f"{key} was {old!r}, now {now[section][name]!r}")
    saved_data, data_now = meta.manifest or {}, data.to_dict()
    for name in DATA_FIELDS:
        old, new = saved_data.get(name), data_now.get(name)
        if name in saved_data and _plain(old) != _plain(new):
            out.append(f"the data's {name} was {old!r}, now {new!r}")
    if _profiles(saved) != _profiles(now):
        out.append(
            f"its post-hoc EMA profiles (optim.ema_sigma_rels with train.ema_snapshot_every > 0) were "
            f"{_profiles(saved)}, now {_profiles(now)}: they average the run from its first step, so a run "
            "keeps them or not, and the same ones, throughout"
        )
    seeding = meta.seeding
    if seeding != SEEDING_VERSION:
        out.append(
            f"its noise, pairing and dropout streams were seeded by version {seeding} (the low 32 bits of "
            f"each seed), this version seeds by version {SEEDING_VERSION} (all 63 bits), and one run does not "
            "mix the two"
        )
    return out


def _profiles(config: dict) -> list[float] | None:
    """The post-hoc EMA profiles a run keeps (None: none; checkpoints before them kept none)."""
    if not config.get("train", {}).get("ema_snapshot_every"):
        return None
    return [float(v) for v in config["optim"]["ema_sigma_rels"]]


def check_resumable(cfg: Config, data: DataSpec, meta: CheckpointMeta, run_dir: str) -> None:
    """Refuse to resume a run whose checkpoint was trained with another model, method, data or stream."""
    diffs = differences(cfg, data, meta)
    if diffs:
        raise ConfigError(
            f"train.run_name={cfg.train.run_name!r} already has a checkpoint at step {meta.step} in "
            f"{run_dir}, trained with another config, and cannot resume with this one: {'; '.join(diffs)}. "
            f"Set train.run_name to a new name to start a new run, or remove {run_dir} to train this name again "
            "from step 0 (what may change on resume: README, 'Resuming a run')"
        )


def _plain(value: Any) -> Any:
    """JSON's view of a value (tuples as lists), as meta.json holds it."""
    return list(map(_plain, value)) if isinstance(value, (list, tuple)) else value
