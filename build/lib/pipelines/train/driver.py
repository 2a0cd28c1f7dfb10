"""The training driver: validate config and data, open (or continue) the MLflow run, resolve the stream, build the
TorchTrainer, fit, log the final model. Everything a user can get wrong is refused here before Ray starts; the
workers' loop is `pipelines.train.worker`."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pipelines.core import lease, storage
from pipelines.core.checkpoint import CheckpointMeta, check_files, load_meta, load_model, load_state
from pipelines.core.errors import JobFailed, JobStopped
from pipelines.core.manifest import Manifest
from pipelines.core.registry import log_final_model
from pipelines.core.run_logger import SafeLogger
from pipelines.core.runtime import (
    RESOURCE_SLIVER,
    check_address,
    check_resources,
    init_ray,
    interruptible,
    is_verbose,
    stage,
    train_logging_config,
)
from pipelines.core.tracking import check_tracking_uri, create_run, dataset_input, find_run, tracking_uri, ui_hint
from pipelines.train.against_data import check_data
from pipelines.train.config import Config, model_kwargs
from pipelines.train.metrics import WINDOWS, CheckpointedMetrics, replay_windows
from pipelines.train.resume import check_resumable
from pipelines.train.stream import stream_spec
from pipelines.train.validation import validation_set
from pipelines.train.worker import TrainJob, train_loop_per_worker


@dataclass(frozen=True)
class TrainResult:
    """What `run_training` returns (and `flowray train` prints as its JSON line, `to_dict`)."""

    run_id: str  # the MLflow run
    experiment: str
    tracking_uri: str
    resumed: bool  # continued an interrupted or finished run
    checkpoint: str | None  # the last registered checkpoint: a folder, or an object-store prefix
    run_dir: str  # the run's folder under train.storage_path (Ray Train's record, checkpoints, EMA snapshots)
    metrics: dict[str, float | str]  # the last checkpoint's report
    wall_s: float  # the fit's wall time (0 for a run that had already finished)
    mlflow_model: str | None = None  # runs:/.../mlflow_model
    registered_model: str | None = None  # models:/NAME/VERSION
    sample_grid: str | None = None  # runs:/RUN_ID/samples for image data
    already_finished: bool = False  # at its step target before this call: nothing was trained

    @property
    def final_checkpoint(self) -> str:
        """The checkpoint to sample from; a run that registered none cannot be sampled (JobFailed)."""
        if self.checkpoint is None:
            raise JobFailed(
                f"training run {self.run_id} registered no checkpoint (train.checkpoint_every past "
                "train.steps?), so there is no model to sample"
            )
        return self.checkpoint

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if not self.already_finished:
            del out["already_finished"]
        return out


def run_training(
    cfg: Config,
    manifest: Manifest | None = None,
    tags: dict[str, str] | None = None,
    callbacks: Sequence = (),
    drain_s: float = 0.0,
) -> TrainResult:
    """Train per the config; returns the run, its last checkpoint and final metrics (`TrainResult`). `manifest`: the
    data's manifest as `check_data(cfg)` returned it, when the caller has checked it already. `tags`: more tags of a
    new MLflow run (`mlflow.parentRunId` nests it under a sweep's run); `callbacks`: more Ray Train `UserCallback`s
    on the controller (a sweep's report to Ray Tune, sample quality while training); `drain_s`: how long each
    checkpoint's metrics may take to reach MLflow before those callbacks run (one that may end the run needs it)."""
    if manifest is None:
        manifest = check_data(cfg)  # every config and data error surfaces before Ray starts
    uri = tracking_uri(cfg.mlflow.tracking_uri)
    check_tracking_uri(uri)
    check_address(cfg.ray.address)  # before an MLflow run is opened: an address where nothing answers leaves none
    r = cfg.ray
    # the workers, and beside them at least one of the stream's pairing tasks (without it no step is ever read)
    check_resources(
        _resources(cfg),
        r.num_workers,
        "Train worker",
        f"ray.num_workers={r.num_workers}, ray.cpus_per_worker={r.cpus_per_worker:g}, ray.use_gpu={r.use_gpu}"
        + (f", ray.worker_resource={r.worker_resource}" if r.worker_resource else ""),
        r.address,
        r.local_cpus,
        beside={"CPU": r.preprocess_cpus},
    )
    if cfg.train.eval_every and cfg.train.eval_resource:  # the scorer's nodes: a label no node has waits for ever
        check_resources(
            {cfg.train.eval_resource: RESOURCE_SLIVER},
            1,
            "scorer",
            f"train.eval_resource={cfg.train.eval_resource}",
            r.address,
            r.local_cpus,
        )
    # a local folder or an object-store URI, which Ray Train writes to through the same pyarrow file system
    root = storage.check_writable(cfg.train.storage_path, "train.storage_path")
    run_dir = storage.join(root, cfg.train.run_name)
    exists = storage.exists(run_dir, "train.storage_path")
    # one job per run: a second job of this run name is refused while this one lives
    with lease.acquire(run_dir, f"training run {cfg.train.run_name!r}", "train.run_name"):
        return _train(cfg, manifest, tags, callbacks, drain_s, uri, root, run_dir, exists)


def _train(
    cfg: Config,
    manifest: Manifest,
    tags: dict[str, str] | None,
    callbacks: Sequence,
    drain_s: float,
    uri: str,
    root: str,
    run_dir: str,
    exists: bool,
) -> TrainResult:
    """`run_training` under the run's lease: resume or start, train, log the final model."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    previous = _registered_checkpoints(run_dir) if exists else None
    meta = _resume_meta(previous)
    if meta is not None:  # before MLflow or Ray is touched: a refused attempt changes nothing
        check_resumable(cfg, manifest.data, meta, run_dir)
    tags = {
        **(tags or {}),
        "flowray.kind": "train",
        "flowray.method": cfg.method.name,
        "flowray.data": manifest.data.source,
        "flowray.storage": run_dir,
        "mlflow.note.content": f"{cfg.method.name} on {manifest.data.name}/{cfg.data.split}, {cfg.train.steps} "
        f"steps of {cfg.train.batch_size} x {cfg.ray.num_workers} workers",
    }
    run_id, resumed, done, replay_after = _open_run(cfg, uri, tags, meta, exists)
    if done is not None and meta is not None:  # (a finished run is only `done` with a checkpoint at its target)
        stage(
            f"run {cfg.train.run_name} already finished at step {meta.step} (MLflow run {done.info.run_id}); "
            "nothing to train. Raise train.steps to continue it, or set train.run_name for a new run"
        )
        return _finished_result(cfg, uri, root, run_dir, previous, done, manifest.data.is_image)
    if meta is not None:
        how = f"MLflow run {run_id}" if resumed else f"new MLflow run {run_id}"
        stage(f"continuing run {cfg.train.run_name} from step {meta.step} ({how})")
    lineage = SafeLogger(uri, run_id)  # the split this run reads, as the run's MLflow dataset input
    lineage.inputs([dataset_input(**manifest.dataset(cfg.data.split), context="train")])
    lineage.close()
    init_ray(cfg.ray.address, cfg.ray.local_cpus)
    if resumed and previous is not None:
        replay_windows(uri, run_id, previous, after_step=replay_after)
    kwargs = model_kwargs(cfg, manifest.data)
    labels = "data" if manifest.data.times else "classes" if kwargs.get("num_classes") else "none"
    job = TrainJob(
        cfg,
        kwargs,
        manifest.data,
        uri,
        run_id,
        storage.join(run_dir, f".fault_injected_step_{cfg.train.fail_at_step}"),
        stream_spec(cfg, manifest, kwargs, _pair_tasks(cfg), resume=meta),
        is_verbose(),
        validation_set(manifest, cfg.train.val_split, cfg.train.val_rows, labels),
        load_state(cfg.train.init_from, "ema")["module"] if cfg.train.init_from else None,
        run_dir,
    )
    # (the type ignores below: the stubs are Ray Train v1's RunConfig and Callback; RAY_TRAIN_V2_ENABLED runs v2's)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu, resources_per_worker=_resources(cfg)
        ),
        run_config=RunConfig(
            name=cfg.train.run_name,
            **storage.ray_storage(root, "train.storage_path"),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.num_to_keep),
            callbacks=[
                CheckpointedMetrics(
                    uri,
                    run_id,
                    cfg.train.steps,  # type: ignore[list-item]
                    cfg.mlflow.flush_timeout_s,
                    drain_s,
                ),
                *callbacks,
            ],
            logging_config=train_logging_config(),
        ),  # type: ignore[call-arg]
    )
    stage(
        f"training {cfg.method.name} for {cfg.train.steps} steps on {cfg.ray.num_workers} worker(s) "
        f"({'resuming' if resumed else 'new'} MLflow run {run_id}, experiment {cfg.mlflow.experiment})"
    )
    start = time.perf_counter()
    try:
        result = interruptible(trainer.fit)
    except Exception as err:
        SafeLogger(uri, run_id).finish("FAILED")
        outage = storage.outage_in(err) if storage.is_uri(root) else None
        if outage is None:
            raise
        # the store went away mid-run: one line, what is kept and how to go on (a checkpoint whose upload failed
        # was never reported, so Ray Train never registered it). The store is not asked which checkpoint that is:
        # a paused one answers nothing, and each read would wait out every attempt's timeout (minutes by default)
        kept = (
            f"its last registered checkpoint is kept there, and cannot be read while the store does not answer "
            f"(MLflow run {run_id} is FAILED)"
        )
        raise JobFailed(
            f"train.storage_path: the object store at {root} stopped answering during training "
            f"({storage.describe(outage)}); {kept}; rerun the same command once it answers to resume "
            "from there"
        ) from None
    except JobStopped as stop:  # SIGINT / SIGTERM: the run is KILLED, and a rerun resumes it
        SafeLogger(uri, run_id).finish("KILLED")
        stop.kept = _kept(run_dir, run_id)
        raise
    ckpt = storage.location_of(root, result.checkpoint.path) if result.checkpoint else None
    model = {}
    if result.checkpoint:
        with result.checkpoint.as_directory() as local:  # a download when the checkpoint is in an object store
            model = log_final_model(
                uri,
                run_id,
                local,
                cfg.mlflow.register_as,
                manifest.dataset(cfg.data.split),
                mlflow_model=cfg.mlflow.log_model,
            )
    logger = SafeLogger(uri, run_id)
    logger.tags({f"flowray.{k}": v for k, v in model.items() if v})  # what a rerun of a finished run returns
    logger.finish("FINISHED")
    stage(f"training finished in {time.perf_counter() - start:.0f} s; checkpoint {ckpt}")
    stage(ui_hint(uri, run_id))
    return TrainResult(
        run_id=run_id,
        experiment=cfg.mlflow.experiment,
        tracking_uri=uri,
        resumed=resumed,
        checkpoint=ckpt,
        run_dir=str(run_dir),
        metrics=_plain(result.metrics or {}),
        wall_s=round(time.perf_counter() - start, 1),
        mlflow_model=model.get("mlflow_model"),
        registered_model=model.get("registered_model"),
        sample_grid=f"runs:/{run_id}/samples" if manifest.data.is_image else None,
    )


def _kept(run_dir: str, run_id: str) -> str:
    """What a stopped training run keeps: its last registered checkpoint (read from Ray's record)."""
    previous = _registered_checkpoints(run_dir)
    if previous is None or previous.checkpoint is None:
        return f"no checkpoint was registered yet (MLflow run {run_id} is KILLED)"
    with previous.checkpoint.as_directory() as local:
        step = load_meta(local).step
    return f"the last checkpoint is step {step} in {run_dir} (MLflow run {run_id} is KILLED)"


def _registered_checkpoints(run_dir: str):
    """Ray Train's record of the checkpoints a run has registered (a `ray.train.Result`), read once before a resumed
    run starts; None when the run never registered one."""
    if not storage.exists(storage.join(run_dir, "checkpoint_manager_snapshot.json"), "train.storage_path"):
        return None
    from ray.train import Result

    if not storage.is_uri(run_dir):
        return Result.from_path(run_dir)
    fs, path = storage.resolve(run_dir, "train.storage_path")
    return Result.from_path(path, storage_filesystem=fs)


def _resume_meta(previous) -> CheckpointMeta | None:
    """The meta.json of the checkpoint a resumed run will start from (Ray's latest registered one), checked whole
    before Ray starts; None when there is none."""
    if previous is None or previous.checkpoint is None:
        return None
    with previous.checkpoint.as_directory() as local:  # in place when local; a download from an object store
        meta = load_meta(local)
        check_files(local)
        for ema in (False, True):  # a meta.json that does not describe its weights fails here, not in the workers
            load_model(local, use_ema=ema)
    return meta


def _open_run(cfg: Config, uri: str, tags: dict, meta: CheckpointMeta | None, exists: bool):
    """The MLflow run this attempt logs to: (run_id, resumed, done, replay_after).

    An interrupted run (RUNNING, FAILED, KILLED) with Ray state to resume from is continued in place, so that its
    history has one value per step. A FINISHED run is never changed: at its step target already, `done` is that
    run and nothing is trained; past it, the continuation gets a new run tagged `flowray.continues` (and the step
    it continues from: the windows up to it are the finished run's, `replay_after`, never copied into the new one)."""
    from mlflow.tracking import MlflowClient

    name, experiment = cfg.train.run_name, cfg.mlflow.experiment
    found = find_run(uri, experiment, name, tags["flowray.storage"]) if exists else None
    if found is None:
        return create_run(uri, experiment, name, tags), False, None, 0
    if found.info.status != "FINISHED":
        MlflowClient(uri).update_run(found.info.run_id, status="RUNNING")
        return found.info.run_id, True, None, int(found.data.tags.get("flowray.continues_from_step", 0))
    if meta is not None and meta.step >= cfg.train.steps:
        return found.info.run_id, True, found, 0
    step = meta.step if meta is not None else 0
    tags = {**tags, "flowray.continues": found.info.run_id, "flowray.continues_from_step": str(step)}
    return create_run(uri, experiment, name, tags), False, None, step


def _finished_result(cfg: Config, uri: str, root: str, run_dir: str, previous, run, is_image: bool) -> TrainResult:
    """`run_training`'s result for a run that had already finished, read from Ray's record and the MLflow run."""
    return TrainResult(
        run_id=run.info.run_id,
        experiment=cfg.mlflow.experiment,
        tracking_uri=uri,
        resumed=True,
        checkpoint=storage.location_of(root, previous.checkpoint.path),
        run_dir=str(run_dir),
        metrics=_plain({k: v for k, v in (previous.metrics or {}).items() if k != WINDOWS}),
        wall_s=0.0,
        mlflow_model=run.data.tags.get("flowray.mlflow_model"),
        registered_model=run.data.tags.get("flowray.registered_model"),
        already_finished=True,
        sample_grid=f"runs:/{run.info.run_id}/samples" if is_image else None,
    )


def _pair_tasks(cfg: Config) -> int:
    """Most pairing tasks at once per worker's stream: `ray.preprocess_actors`, or by default the cluster's CPUs
    left beside the train workers (less one), shared among the workers' streams."""
    import ray

    if cfg.ray.preprocess_actors:
        return cfg.ray.preprocess_actors
    spare = ray.cluster_resources().get("CPU", 1) - cfg.ray.num_workers * cfg.ray.cpus_per_worker - 1
    return max(1, int(spare / cfg.ray.num_workers))  # a task runs one thread: about a CPU while it pairs


def _resources(cfg: Config) -> dict[str, float]:
    """What each Train worker asks of its node: its CPUs, its GPUs, and a sliver of its node label if any."""
    res = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        res["GPU"] = cfg.ray.gpus_per_worker
    if cfg.ray.worker_resource:
        res[cfg.ray.worker_resource] = RESOURCE_SLIVER
    return res


def _plain(d: dict) -> dict:
    return {
        k: (float(v) if isinstance(v, (int, float, np.floating)) else v)
        for k, v in d.items()
        if isinstance(v, (int, float, str, np.floating))
    }
