"""Post-hoc EMA of a training run (EDM2): the snapshots a run kept (`train.ema_snapshot_every`, in its folder's
`ema_snapshots/`) rebuilt into checkpoints of other EMA lengths, which every batch job takes as `--checkpoint`.

The math is `fm.ema` (`posthoc_coefficients`, `combine_states`); this module finds the snapshots where the run
lies (a local folder or an object store), checks them, reads each once for all the lengths asked for, and writes
each result as a checkpoint folder (meta.json last, so a folder without it is not a checkpoint).
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, replace

import torch

from fm.ema import SIGMA_REL_MAX, combine_states, posthoc_coefficients, profile_fit_error, sigma_rel_to_gamma
from pipelines.core import storage
from pipelines.core.checkpoint import META, CheckpointError, CheckpointMeta
from pipelines.core.errors import ConfigError
from pipelines.train.worker import EMA_SNAPSHOTS

_SNAPSHOT = re.compile(r"step_(\d{8})\.pt")


@dataclass(frozen=True)
class Snapshot:
    step: int
    location: str


@dataclass(frozen=True)
class Rebuilt:
    """One reconstructed EMA length: where its checkpoint is and how well the snapshots' profiles fit it."""

    sigma_rel: float
    gamma: float
    step: int
    checkpoint: str
    snapshots: int
    fit_error: float  # ||sum x_i p_i - p|| / ||p|| (fm.ema.profile_fit_error)

    def to_dict(self) -> dict:
        return {
            "sigma_rel": self.sigma_rel,
            "gamma": self.gamma,
            "step": self.step,
            "checkpoint": self.checkpoint,
            "snapshots": self.snapshots,
            "fit_error": self.fit_error,
        }


def snapshots(run_dir: str) -> list[Snapshot]:
    """The run's snapshots in step order; ConfigError when it has none, naming where they were looked for."""
    folder = storage.join(run_dir, EMA_SNAPSHOTS)
    if not storage.exists(run_dir, "--run"):
        raise ConfigError(
            f"--run: {run_dir} does not exist (a training run's folder: train.storage_path/train.run_name)"
        )
    found = []
    for location in storage.list_files(folder, key="--run") if storage.exists(folder, "--run") else []:
        match = _SNAPSHOT.fullmatch(storage.name(location))
        if match:
            found.append(Snapshot(int(match.group(1)), location))
    if not found:
        raise ConfigError(
            f"--run: no post-hoc EMA snapshots in {folder}; train the run with "
            "train.ema_snapshot_every > 0 (and optim.ema_sigma_rels) to keep them"
        )
    return sorted(found, key=lambda s: s.step)


def _load(snapshot: Snapshot) -> dict:
    try:
        return torch.load(
            io.BytesIO(storage.read_bytes(snapshot.location, "--run")), map_location="cpu", weights_only=True
        )
    except Exception as err:  # pickle refusals and truncated files alike: name the file
        raise CheckpointError(
            f"{snapshot.location}: not a readable post-hoc EMA snapshot ({str(err).splitlines()[0][:200]})"
        ) from None


def rebuild(run_dir: str, sigma_rels: list[float], step: int | None = None, out: str | None = None) -> list[Rebuilt]:
    """Checkpoints of the run's EMA at each sigma_rel, as it stood at `step` (default: its last snapshot), from
    every snapshot up to that step. Written to `out` (default: the run's `posthoc_ema/` folder), one folder per
    length: `sigma_rel_0.0500-step_00000400`."""
    for s in sigma_rels:
        if not 0 < s < SIGMA_REL_MAX:
            raise ConfigError(f"--sigma-rel: {s} is not allowed; each must be in (0, {SIGMA_REL_MAX:.4f})")
    found = snapshots(run_dir)
    step = found[-1].step if step is None else step
    used = [s for s in found if s.step <= step]
    if step < 1 or not used:
        raise ConfigError(
            f"--step: {step} is before the run's first snapshot (step {found[0].step}); snapshots "
            f"span steps {found[0].step} to {found[-1].step}"
        )
    out = out or storage.join(run_dir, "posthoc_ema")
    storage.check_writable(out, "--out")
    first = _load(used[-1])  # the profiles and the model's description, from the last snapshot used
    profiles = [float(v) for v in first["sigma_rels"]]
    ts = torch.tensor([s.step for s in used for _ in profiles], dtype=torch.float64)
    gammas = torch.tensor([sigma_rel_to_gamma(v) for _ in used for v in profiles], dtype=torch.float64)
    targets = [sigma_rel_to_gamma(s) for s in sigma_rels]
    x = torch.stack([posthoc_coefficients(ts, gammas, step, g) for g in targets], dim=1)  # [S * P, T]

    def states():
        for snap in used:
            data = first if snap is used[-1] else _load(snap)
            if [float(v) for v in data["sigma_rels"]] != profiles or int(data["step"]) != snap.step:
                raise CheckpointError(
                    f"{snap.location}: holds profiles {data['sigma_rels']} at step {data['step']}, "
                    f"where the run's others hold {profiles}: snapshots of two runs are mixed"
                )
            yield from data["modules"]

    weights = combine_states(states(), x)  # x [S, T]: T state dicts
    assert isinstance(weights, list)
    meta = CheckpointMeta.from_dict(json.loads(first["meta"]), f"{used[-1].location}: meta")
    results = []
    for k, (sigma_rel, gamma) in enumerate(zip(sigma_rels, targets, strict=True)):
        fit = profile_fit_error(ts, gammas, x[:, k], step, gamma)
        folder = storage.join(out, f"sigma_rel_{sigma_rel:.4f}-step_{step:08d}")
        _write(
            folder,
            weights[k],
            replace(
                meta,
                step=step,
                posthoc_ema={
                    "sigma_rel": sigma_rel,
                    "gamma": gamma,
                    "profiles": profiles,
                    "snapshot_steps": [s.step for s in used],
                    "fit_error": fit,
                    "run_dir": run_dir,
                },
            ),
        )
        results.append(Rebuilt(sigma_rel, gamma, step, folder, len(used), fit))
    return results


def _write(folder: str, weights: dict, meta: CheckpointMeta) -> None:
    """A checkpoint folder the batch jobs load: the weights as its EMA (and its model), meta.json last."""
    for name, state in (("ema", {"module": weights, "num_updates": meta.step, "decay": 0.0}), ("model", weights)):
        buf = io.BytesIO()
        torch.save(state, buf)
        storage.write_bytes(storage.join(folder, f"{name}.pt"), buf.getvalue(), "--out")
    storage.write_text(storage.join(folder, META), json.dumps(meta.to_dict(), indent=1), "--out")


def run_folder(spec: str, uri: str) -> str:
    """The run's folder from `--run`: a folder or object-store prefix as given, or `runs:/RUN_ID` of a training run
    (its `flowray.storage` tag, where its checkpoints and snapshots lie)."""
    if not spec.startswith("runs:/"):
        return storage.check_location(spec, "--run")
    from mlflow.tracking import MlflowClient

    run_id = storage.check_name(spec[len("runs:/") :].strip("/"), "--run (run id)")
    try:
        run = MlflowClient(uri).get_run(run_id)
    except Exception as err:
        raise ConfigError(f"--run: no MLflow run {run_id} at {uri} ({str(err).splitlines()[0][:200]})") from None
    folder = run.data.tags.get("flowray.storage")
    if not folder:
        raise ConfigError(f"--run: MLflow run {run_id} is not a flowray training run (it has no flowray.storage tag)")
    return folder
