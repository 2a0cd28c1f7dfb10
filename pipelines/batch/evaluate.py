"""Evaluation: bits/dim on the test split as a Ray Data actor stage, the straightness of trajectories and the
transport of held-out points, and sample quality (`pipelines.batch.quality`); then one MLflow run that holds them."""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from fm.likelihood import LikelihoodSettings, bits_per_dim, mean_and_stderr
from fm.methods import METHODS
from fm.seeding import SeedStack, derive_seed
from fm.solvers import autocast_field
from pipelines.batch.config import EvalConfig, validate_eval_config
from pipelines.batch.quality import points_by_label, sample_quality
from pipelines.batch.results import (
    EvaluationError,
    EvaluationResult,
    SplitLikelihood,
    StraightnessResult,
    TransportResult,
)
from pipelines.core import storage
from pipelines.core.cells import decode_rows
from pipelines.core.checkpoint import load_meta, load_model
from pipelines.core.figures import write_csv
from pipelines.core.manifest import DataSpec, Manifest
from pipelines.core.memory import check_fits, model_item_bytes
from pipelines.core.run_logger import SafeLogger
from pipelines.core.runtime import (
    Progress,
    actor_device,
    actor_pool,
    init_ray,
    nice_args,
    read_parquet,
    resource_args,
    spread,
    stage,
    use_cpu_share,
)
from pipelines.core.samples import sample_shards
from pipelines.core.settings import autocast_dtype
from pipelines.core.shards import ShardRows, group_rows
from pipelines.core.tracking import dataset_input, start_child_run


class _ModelActor:
    """A Ray Data actor that loads the checkpoint's model once and keeps the evaluation settings and data spec."""

    def __init__(self, checkpoint: str, cfg: EvalConfig, data: DataSpec):
        self.cfg, self.data = cfg, data
        use_cpu_share(self.cfg.cpus_per_actor, self.cfg.nice)
        self.loaded = load_model(checkpoint)


LIKELIHOOD_STREAM = 1  # row r's dequantization noise and probes come from derive_seed(eval.seed, 1, r)
SUBSET_STREAM = 2  # the rows of a split that eval.max_images keeps: a permutation from derive_seed(eval.seed, 2)
STRAIGHTNESS_STREAM = 3  # trajectory i of the straightness starts from the noise of derive_seed(eval.seed, 3, i)


def likelihood_rows(count: int, max_images: int, seed: int) -> np.ndarray:
    """The split rows that the likelihood scores, in order: all of them, or `max_images` drawn uniformly from
    (seed) alone (a class-sorted split is still sampled evenly), sorted for sequential reads."""
    if not max_images or max_images >= count:
        return np.arange(count, dtype=np.int64)
    rng = np.random.default_rng(derive_seed(seed, SUBSET_STREAM))
    return np.sort(rng.permutation(count)[:max_images]).astype(np.int64)


class LikelihoodActor(_ModelActor):
    """Ray Data actor: loads the model once; per fixed block of `eval.batch_size` rows, bits/dim (images) or the
    negative log-density (points) of each row.

    A block's rows are fixed by its number (as sampling's blocks are), and each row's dequantization noise and
    probes come from its own seed: a row's value does not depend on the actor count, on how many blocks a call
    takes, or on the order blocks arrive. (An adaptive solver's steps are shared by a block, so the block size is
    part of the setting, like the solver tolerance.)"""

    def __init__(self, checkpoint: str, cfg: EvalConfig, data: DataSpec, files: tuple, groups: tuple, count: int):
        super().__init__(checkpoint, cfg, data)
        self.rows = likelihood_rows(count, self.cfg.max_images, self.cfg.seed)
        self.reader = ShardRows(files, groups, tuple(data.shape), data.kind)
        self.device = actor_device(cfg.gpus_per_actor)
        self.loaded.model.to(self.device)

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list[np.ndarray]] = {"row": [], "value": [], "nfe": []}
        for block in batch["id"].tolist():
            rows = self.rows[block * self.cfg.batch_size : (block + 1) * self.cfg.batch_size]
            value, nfe = self.score(rows)
            out["row"].append(rows)
            out["value"].append(value)
            out["nfe"].append(np.full(len(rows), nfe))
        return {k: np.concatenate(v) for k, v in out.items()}

    def score(self, rows: np.ndarray) -> tuple[np.ndarray, float]:
        c, method = self.cfg, self.loaded.method
        fn = autocast_field(
            method.velocity(self.loaded.model), autocast_dtype(c.precision, self.device.type), self.device.type
        )
        # the draws come from CPU generators (the same numbers on any device), then move to the rows' device
        seeds = SeedStack([derive_seed(c.seed, LIKELIHOOD_STREAM, int(r)) for r in rows])
        settings = LikelihoodSettings(
            c.divergence, c.probes, c.probe_kind, c.solver, c.atol, c.rtol, c.steps, t_1=method.t_max
        )
        raw, _ = self.reader.take(rows)
        if self.data.is_image:
            res = bits_per_dim(
                fn,
                decode_rows(raw, self.data.shape).float().to(self.device),
                draws=c.draws,
                generator=seeds,
                settings=settings,
            )
            return res.bpd.cpu().numpy(), res.nfe
        x = decode_rows(raw, self.data.shape, "points").to(self.device)
        lik = method.log_likelihood(fn, x, settings, seeds)  # in the method's space (on a manifold: Riemannian)
        return (-lik.log_p).cpu().numpy(), lik.nfe


class TransportActor(_ModelActor):
    """Ray Data actor for snapshot methods: carries rows of the first snapshot through every observed time."""

    def __call__(self, batch: dict) -> dict:
        from fm.action_matching import transport

        c, method, times = self.cfg, self.loaded.method, self.data.times
        assert times is not None  # transport_stage runs on snapshot data only
        x = decode_rows(batch["image"], self.data.shape, "points")
        path, nfe = transport(method.velocity(self.loaded.model), x, times, c.solver, c.steps, c.atol, c.rtol)
        out = {"id": batch["id"], "nfe": np.full(len(x), nfe)}
        for k, x_t in enumerate(path):
            out[f"x_{k}"] = x_t.detach().numpy()
        return out


def likelihood_values(
    checkpoint: str, manifest: Manifest, cfg: EvalConfig, memory: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Per-row values over a split as a map_batches actor stage over fixed blocks: (rows [n] in order, bits/dim or
    NLL [n], NFE [n], wall seconds)."""
    import ray.data
    from ray.data import ActorPoolStrategy

    init_ray()
    files = tuple(manifest.shard_paths(cfg.split))
    count = manifest.count(cfg.split)
    total = len(likelihood_rows(count, cfg.max_images, cfg.seed))
    blocks = -(-total // cfg.batch_size)
    actors, memory = actor_pool(
        cfg.actors,
        cfg.cpus_per_actor,
        cfg.gpus_per_actor,
        memory,
        work=-(-blocks // cfg.blocks_per_call),
        section="eval",
        resource=cfg.resource,
    )
    stage(
        f"bits/dim on the {cfg.split} split ({cfg.solver}, K={cfg.draws} draws, {cfg.divergence} divergence, "
        f"{cfg.precision}) on {actors} actor(s)"
    )
    actor_args = (checkpoint, cfg, manifest.data, files, group_rows(files), count)
    start = time.perf_counter()
    progress = Progress("bits/dim" if manifest.data.is_image else "NLL", total, "images")
    rows, values, nfes = [], [], []
    ds = ray.data.range(blocks, override_num_blocks=min(blocks, 4 * actors)).map_batches(
        LikelihoodActor,
        fn_constructor_args=actor_args,
        batch_size=cfg.blocks_per_call,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=actors),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.gpus_per_actor,
        memory=memory,
        **resource_args(cfg.resource),
    )
    for batch in ds.iter_batches(batch_size=None):
        rows.append(np.asarray(batch["row"], dtype=np.int64))
        values.append(np.asarray(batch["value"], dtype=np.float64))
        nfes.append(np.asarray(batch["nfe"], dtype=np.float64))
        progress.update(len(values[-1]))
    wall = time.perf_counter() - start
    row, value, nfe = np.concatenate(rows), np.concatenate(values), np.concatenate(nfes)
    order = np.argsort(row, kind="stable")
    return row[order], value[order], nfe[order], wall


def likelihood_stage(checkpoint: str, manifest: Manifest, cfg: EvalConfig, memory: int = 0) -> SplitLikelihood:
    """Bits/dim (or NLL in nats for points) over a split (`likelihood_values`); mean ± stderr, NFE."""
    rows, values, nfes, wall = likelihood_values(checkpoint, manifest, cfg, memory)
    mean, stderr = mean_and_stderr(torch.from_numpy(values))
    unit = "bits/dim" if manifest.data.is_image else "nats"
    return SplitLikelihood(
        metric="bpd" if unit == "bits/dim" else "nll",
        unit=unit,
        mean=mean,
        stderr=stderr,
        n=len(values),
        mean_nfe=float(nfes.mean()),
        draws=cfg.draws,
        divergence=cfg.divergence,
        probes=cfg.probes if cfg.divergence == "hutchinson" else None,
        images_per_s=len(values) / wall,
        wall_s=wall,
        precision=cfg.precision,
        rows=rows.tolist(),
        values=values.tolist(),
        nfes=nfes.tolist(),
    )


def write_per_row(lik: SplitLikelihood, directory: Path) -> Path:
    """`<metric>_per_row.csv` in `directory`: one line per scored row (its index in the split, its bits/dim or
    NLL, its solve's NFE), in row order, at full float64 precision."""
    rows = [{"row": r, lik.metric: v, "nfe": n} for r, v, n in zip(lik.rows, lik.values, lik.nfes, strict=True)]
    return write_csv(rows, directory / f"{lik.metric}_per_row.csv", ["row", lik.metric, "nfe"])


def trajectory_straightness(checkpoint: str, cfg: EvalConfig, shape: list[int]) -> StraightnessResult:
    """The straightness of `eval.straightness_samples` sampling trajectories of the checkpoint's model (class
    i % classes for trajectory i of a class-conditional model), where it runs (a Ray task: a GPU when
    eval.gpus_per_actor asks for one)."""
    from fm.straightness import straightness

    use_cpu_share(cfg.cpus_per_actor, cfg.nice)
    loaded = load_model(checkpoint)
    device = actor_device(cfg.gpus_per_actor)
    model, method = loaded.model.to(device), loaded.method
    n = cfg.straightness_samples
    x_0 = method.draw_x0(SeedStack([derive_seed(cfg.seed, STRAIGHTNESS_STREAM, i) for i in range(n)], device), shape)
    classes = getattr(model, "num_classes", None)
    y = torch.arange(n, device=device) % classes if classes else None
    start = time.perf_counter()
    got = straightness(method.velocity(model, y), x_0, cfg.straightness_steps, method.t_0, method.t_max)
    return StraightnessResult(
        samples=n, steps=cfg.straightness_steps, nfe=got.nfe, wall_s=time.perf_counter() - start, **got.summary()
    )


def straightness_stage(checkpoint: str, manifest: Manifest, cfg: EvalConfig) -> StraightnessResult:
    """`trajectory_straightness` as one Ray task with an actor's share of the cluster."""
    import ray

    init_ray()
    stage(f"straightness of {cfg.straightness_samples} trajectories ({cfg.straightness_steps} RK4 steps)")
    # with eval.nice, on workers of that priority only (`nice_args`): a plain task never inherits it
    placement = {"num_cpus": cfg.cpus_per_actor, "num_gpus": cfg.gpus_per_actor, **resource_args(cfg.resource)}
    task = ray.remote(**placement, **nice_args(cfg.nice))(trajectory_straightness)
    return ray.get(task.remote(checkpoint, cfg, list(manifest.data.model_shape)))


def transport_stage(checkpoint: str, manifest: Manifest, cfg: EvalConfig, memory: int = 0) -> TransportResult:
    """Snapshot methods: the split's first-snapshot rows carried to every observed time on an actor stage; per time,
    W2 to the split's rows of that time, beside the floor: W2 from as many training rows of that time."""
    from ray.data import ActorPoolStrategy

    from fm.metrics import wasserstein2

    times = manifest.data.times
    if times is None:
        raise EvaluationError(f"{manifest.directory} holds no snapshots (no observed times) to transport between")
    held = points_by_label(manifest, cfg.split)
    train = points_by_label(manifest, "train" if cfg.split != "train" else "test")
    start_rows = held.get(0)
    if start_rows is None or any(k not in held for k in range(len(times))):
        raise EvaluationError(
            f"the {cfg.split} split of {manifest.directory} lacks rows of some observed time; "
            f"it has snapshots {sorted(held)} of 0..{len(times) - 1}"
        )
    init_ray()
    actors, memory = actor_pool(
        cfg.actors,
        cfg.cpus_per_actor,
        0.0,
        memory,
        work=-(-len(start_rows) // cfg.batch_size),
        section="eval",
        resource=cfg.resource,
    )
    stage(
        f"transporting {len(start_rows)} rows of the first snapshot through times {times} ({cfg.solver}) on "
        f"{actors} actor(s)"
    )
    ds = read_parquet(*storage.ray_paths(manifest.shard_paths(cfg.split))).select_columns(["id", "image", "label"])
    ds = spread(ds.filter(expr="label == 0").select_columns(["id", "image"]), len(start_rows), cfg.batch_size, actors)
    t0 = time.perf_counter()
    batches = list(
        ds.map_batches(
            TransportActor,
            fn_constructor_args=(checkpoint, cfg, manifest.data),
            batch_size=cfg.batch_size,
            batch_format="numpy",
            compute=ActorPoolStrategy(size=actors),
            num_cpus=cfg.cpus_per_actor,
            memory=memory,
            **resource_args(cfg.resource),
        ).iter_batches(batch_size=None)
    )
    wall = time.perf_counter() - t0
    out = TransportResult(
        times=list(times),
        n_start=len(start_rows),
        wall_s=wall,
        mean_nfe=float(np.mean(np.concatenate([b["nfe"] for b in batches]))),
    )
    for k in range(len(times)):
        moved = torch.from_numpy(np.concatenate([np.stack(list(b[f"x_{k}"])) for b in batches]))
        n = min(len(held[k]), len(train.get(k, [])))
        out.w2.append(wasserstein2(moved, held[k]))
        out.w2_floor.append(wasserstein2(train[k][:n], held[k]) if n else float("nan"))
    return out


def run_evaluation(checkpoint: str, shards: str | Manifest, samples: str | None, cfg: EvalConfig) -> EvaluationResult:
    """Score a checkpoint on an ingest output (`shards`: its location, or its `Manifest` already read): bits/dim (or
    NLL, or transport W2 for snapshot methods) and, with a sampling output, sample quality. Every input is checked
    before Ray starts."""
    validate_eval_config(cfg)
    meta = load_meta(checkpoint)
    load_model(checkpoint)  # unreadable or refused weights fail here, before Ray starts
    # the likelihood's divergence needs gradients through the model: a training-like footprint per row
    memory = check_fits(
        "eval.batch_size",
        cfg.batch_size * cfg.blocks_per_call,
        model_item_bytes(meta.model_name, meta.model_kwargs, training=True),
        "one likelihood call",
        hint=" (batch_size x blocks_per_call rows; activations and their "
        "gradients estimated from the model's feature maps)",
    )
    manifest = shards if isinstance(shards, Manifest) else Manifest.load(shards)  # read once, passed on
    manifest.check_split(cfg.split, "eval.split")
    trained_on = meta.data_shape
    if trained_on is not None and trained_on != manifest.data.shape:
        raise EvaluationError(
            f"checkpoint was trained on shape {trained_on}, but {manifest.directory} holds {manifest.data.shape}"
        )
    if samples is not None:
        sample_shards(samples)  # foreign or empty sample directories fail before Ray starts (metadata only)
    result = EvaluationResult(
        method=meta.method_name,
        checkpoint_step=meta.step,
        train_run_id=meta.mlflow_run_id,
        split_dataset={**manifest.dataset(cfg.split), "context": "evaluation"},
    )
    if manifest.data.times:  # snapshot methods have no prior density: they move data from time to time
        if samples is not None:
            raise EvaluationError(
                "--samples: a snapshot method is scored by carrying the data's first snapshot "
                "through the observed times; it has no samples to score"
            )
        result.transport = transport_stage(checkpoint, manifest, cfg, memory)
        return result
    if not METHODS[meta.method_name].velocity_field:  # MeanFlow, distill: no field to integrate or take the
        stage(f"{meta.method_name} is sampled in jumps: no velocity field for likelihood or straightness, only samples")
        return result if samples is None else result.with_samples(sample_quality(manifest, samples, cfg), samples)
    result.likelihood = likelihood_stage(checkpoint, manifest, cfg, memory)
    if cfg.straightness_samples and not manifest.data.manifold:  # a chord is a straight line in R^D only
        result.straightness = straightness_stage(checkpoint, manifest, cfg)
    if samples is None:
        return result
    return result.with_samples(sample_quality(manifest, samples, cfg), samples)


def open_evaluation_run(uri: str, checkpoint: str) -> str:
    """The evaluation run, nested under the checkpoint's training run, opened before the stages run (so that their
    system metrics land in it); `log_evaluation_run` fills it."""
    meta = load_meta(checkpoint)
    return start_child_run(
        uri,
        meta.mlflow_run_id,
        "evaluate",
        "evaluate",
        description=f"evaluation of {meta.method_name} at step {meta.step}",
    )


def log_evaluation_run(result: EvaluationResult, cfg: EvalConfig, uri: str, run_id: str) -> str:
    """Fill the evaluation run (`open_evaluation_run`): the evaluation settings, every figure as a metric, and what
    they were measured on as tags. Returns its id, also kept in `result.mlflow_run_id`."""
    what = "transport W2" if result.transport else "likelihood" + (" and sample quality" if result.quality else "")
    result.mlflow_run_id = run_id
    log = SafeLogger(uri, run_id)
    log.tags({"mlflow.note.content": f"{what} of {result.method} at step {result.checkpoint_step}"})
    log.params({f"eval.{k}": v for k, v in asdict(cfg).items()})
    read = [result.split_dataset] if result.split_dataset else []
    read += result.quality.datasets if result.quality else []
    log.inputs([dataset_input(**d) for d in read])  # the data and samples it read: MLflow's lineage
    tags = {"flowray.method": result.method, "flowray.checkpoint_step": str(result.checkpoint_step)}
    tr = result.transport
    if tr is not None:  # snapshot methods: W2 and its floor at every observed time, and the worst ratio
        metrics = {"transport_nfe": tr.mean_nfe, "w2_ratio_max": tr.w2_ratio_max}
        for k, (w, f) in enumerate(zip(tr.w2, tr.w2_floor, strict=True)):
            metrics.update({f"w2_t{k}": w, f"w2_floor_t{k}": f})
        tags["flowray.times"] = ",".join(str(t) for t in tr.times)
        log.metrics({k: v for k, v in metrics.items() if not math.isnan(v)}, step=0)
        log.tags(tags)
        log.finish()
        return run_id
    lik = result.likelihood  # None for MeanFlow, which has no likelihood
    metrics = (
        {}
        if lik is None
        else {
            lik.metric: lik.mean,
            f"{lik.metric}_stderr": lik.stderr,
            "likelihood_nfe": lik.mean_nfe,
            "likelihood_images_per_s": lik.images_per_s,
        }
    )
    q = result.quality
    if q is not None:
        for key in (
            "fd",
            "fid",
            "fd_floor",
            "fd_matched",
            "kid",
            "kid_std",
            "precision",
            "recall",
            "w2",
            "w2_floor",
            "classifier_test_accuracy",
        ):
            metrics[key] = getattr(q, key)
        if q.fd_label is not None:
            labels = {
                "flowray.fd_label": q.fd_label,
                "flowray.fid": q.fid_note,
                "flowray.features": q.features,
                "flowray.reference_split": q.reference_split,
                "flowray.quality_counts": f"{q.num_samples} samples, {q.num_reference} reference"
                + (f", {q.num_floor} held-out ({q.floor_split}) for the floor" if q.fd_floor is not None else "")
                + f"; KID and precision/recall (k=3) on subsets of {q.pr_subset}",
            }
            tags.update({k: v for k, v in labels.items() if v is not None})
        s = result.sample_settings or {}  # with quality, the samples' settings were read with them
        tags.update({"flowray.sample_solver": s["solver"], "flowray.sample_steps": str(s["steps"])})
        if result.sample_run_id:
            tags["flowray.sample_run_id"] = result.sample_run_id
        if q.classifier_path:
            with storage.local_copy(q.classifier_path) as local:  # a download when it is cached in a bucket
                log.artifact(local, "classifier")
    st = result.straightness
    if st is not None:
        metrics.update(
            {
                "straightness": st.straightness,
                "straightness_relative": st.straightness_relative,
                "chord_deviation": st.chord_deviation,
            }
        )
        tags["flowray.straightness"] = f"{st.samples} trajectories, {st.steps} RK4 steps"
    if lik is not None and lik.probes is not None:
        tags["flowray.hutchinson_probes"] = str(lik.probes)
    if lik is not None:
        tags["flowray.dequantization_draws"] = str(lik.draws)
    if lik is not None and lik.rows:
        with tempfile.TemporaryDirectory() as tmp:  # SafeLogger copies the file before it returns
            log.artifact(write_per_row(lik, Path(tmp)), "likelihood")
    log.metrics({k: v for k, v in metrics.items() if v is not None and not math.isnan(v)}, step=0)
    log.tags(tags)
    log.finish()
    return run_id
