"""Large-scale sampling: Ray Data over fixed blocks of sample ids, an actor pool of Samplers, parquet shards.

Determinism: sample i starts from noise drawn with its own seed (seed, i), and ids are solved in fixed blocks of
`block_size` (an adaptive solver's step sizes depend on the whole block), so the output is bit-identical whatever
the number of actors or the Ray batch size (blocks per call). Changing `block_size` changes the solve; it is
recorded in `_sampling.json` with the other settings.

Resumability: each block is written to its own shard `block-XXXXXXXX.parquet` through a temporary name and an
atomic rename. A rerun keeps the shards that read back complete and redoes the rest (including truncated or
corrupt files), so the result always holds exactly N unique ids.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from fm.data import to_uint8
from fm.seeding import SEEDING_VERSION, SeedStack, derive_seed
from fm.solvers import ADAPTIVE_METHODS, SampleResult, autocast_field, sde_sample
from pipelines.batch.config import SCHEDULING, SampleConfig, validate_sample_config
from pipelines.core import storage
from pipelines.core.cells import decode_rows, encode_rows
from pipelines.core.checkpoint import load_meta, load_model
from pipelines.core.errors import JobStopped
from pipelines.core.figures import save_grid, save_points_figure
from pipelines.core.manifest import DataSpec
from pipelines.core.memory import check_fits, model_item_bytes
from pipelines.core.run_logger import SafeLogger
from pipelines.core.runtime import (
    Progress,
    actor_device,
    actor_pool,
    init_ray,
    interruptible,
    resource_args,
    stage,
    use_cpu_share,
)
from pipelines.core.samples import (
    RUN_FILE,
    SAMPLE_SCHEMA,
    SETTINGS,
    SHARD_PREFIX,
    SHARD_SUFFIX,
    SamplingError,
    SamplingResult,
    block_ids,
    sample_seeds,
    sample_shards,
    sampling_settings,
    shard_name,
)
from pipelines.core.settings import autocast_dtype
from pipelines.core.tracking import start_child_run

SDE_NOISE_STREAM = 1  # sample i's SDE noise comes from derive_seed(seed, i, 1), its starting noise from (seed, i)


class Sampler:
    """Ray Data actor: loads the model once, then samples whole blocks and writes one shard per block."""

    def __init__(self, checkpoint: str, out: str, cfg: SampleConfig, shape: list[int], layout: str):
        self.cfg, self.out, self.layout = cfg, out, layout
        use_cpu_share(self.cfg.cpus_per_actor, self.cfg.nice)
        self.loaded = load_model(checkpoint)
        self.model, self.method = self.loaded.model, self.loaded.method
        self.shape = tuple(shape)  # model input shape without batch: [C, H, W] or [D]
        self.device = actor_device(self.cfg.gpus_per_actor)
        self.model.to(self.device)
        self.num_classes = self.model.num_classes if hasattr(self.model, "num_classes") else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows: dict[str, list] = {"block": [], "rows": [], "nfe": [], "seconds": []}
        for block in batch["block"].tolist():
            start = time.perf_counter()
            nfe = self.sample_block(int(block))
            rows["block"].append(block)
            rows["rows"].append(len(block_ids(block, self.cfg.block_size, self.cfg.num_samples)))
            rows["nfe"].append(nfe)
            rows["seconds"].append(time.perf_counter() - start)
        return {k: np.asarray(v) for k, v in rows.items()}

    def labels(self, ids: np.ndarray) -> torch.Tensor | None:
        if not self.num_classes:
            return None
        if self.cfg.label >= 0:
            return torch.full((len(ids),), self.cfg.label, dtype=torch.long)
        return torch.from_numpy(ids % self.num_classes)

    def sample_block(self, block: int) -> int:
        """Sample one block of ids and write its shard; returns the block's NFE."""
        self._maybe_inject_fault(block)
        ids = block_ids(block, self.cfg.block_size, self.cfg.num_samples)
        seeds = sample_seeds(self.cfg.seed, ids)  # sample i's starting noise, recorded in its row
        y = self.labels(ids)
        res = self.solve(ids, self.method.draw_x0(SeedStack(seeds, self.device), self.shape), y)
        self.write(block, ids, seeds, y, res.x_1.cpu(), res.nfe)
        return res.nfe

    def solve(self, ids: np.ndarray, x_0: torch.Tensor, y: torch.Tensor | None) -> SampleResult:
        """x_0 [B, *shape] to samples: the SDE with per-sample noise, or the method's ODE in its own space."""
        c = self.cfg
        fn = autocast_field(
            self.method.velocity(self.model, None if y is None else y.to(self.device), c.cfg_scale),
            autocast_dtype(c.precision, self.device.type),
            self.device.type,
        )
        with torch.no_grad():
            if c.solver != "sde":
                return self.method.sample(fn, x_0, c.solver, c.steps, c.atol, c.rtol, c.time_grid)
            # per-sample noise streams, so a sample's path does not depend on its block's other samples
            noise = SeedStack([derive_seed(c.seed, int(i), SDE_NOISE_STREAM) for i in ids], self.device)
            return sde_sample(
                fn,
                self.method.gaussian_path,
                self.method.sde_diffusion(c.sde_g),
                x_0,
                c.steps,
                t_1=min(self.method.t_max, 1 - 1e-3),
                noise=lambda k: noise.randn(self.shape),
            )

    def write(
        self, block: int, ids: np.ndarray, seeds: list[int], y: torch.Tensor | None, x: torch.Tensor, nfe: int
    ) -> None:
        """The block's shard, one object (or a temporary file renamed), in the sample-shard contract."""
        images = to_uint8(x) if self.layout == "HWC" else None
        payload = encode_rows(images, "image") if images is not None else encode_rows(x, "points")
        table = pa.table(
            {
                "id": ids,
                "seed": seeds,
                "label": y.numpy() if y is not None else np.full(len(ids), -1),
                "nfe": np.full(len(ids), nfe),
                "image": payload,
            },
            schema=SAMPLE_SCHEMA,
        )
        storage.write_parquet(table, storage.join(self.out, shard_name(block)))
        if self.cfg.write_png and images is not None:
            _write_pngs(images, ids, storage.join(self.out, "png"))

    def _maybe_inject_fault(self, block: int) -> None:
        """Test hook: raise once when sampling reaches `sample.fail_at_block` (a marker makes it once per output)."""
        if block != self.cfg.fail_at_block:
            return
        marker = storage.join(self.out, f".fault_injected_block_{block}")
        if not storage.exists(marker):
            storage.write_text(marker, "injected\n")
            raise RuntimeError(f"injected sampling failure at block {block}")


def _write_pngs(images: torch.Tensor, ids: np.ndarray, directory: str) -> None:
    from PIL import Image

    for img, i in zip(images, ids, strict=True):
        arr = img.permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(buf, format="PNG")
        storage.write_bytes(storage.join(directory, f"{int(i):08d}.png"), buf.getvalue())


def complete_blocks(out: str, cfg: SampleConfig) -> set[int]:
    """Blocks whose shard reads back with the right schema and exactly its ids; others are removed (a block is
    done only when its final file or object exists and verifies)."""
    done = set()
    n_blocks = -(-cfg.num_samples // cfg.block_size)
    for path in storage.list_files(out, SHARD_PREFIX, SHARD_SUFFIX):
        block = int(storage.name(path).split("-")[1].split(".")[0])
        try:
            table = storage.read_table(path)
            ok = (
                block < n_blocks
                and table.schema.equals(SAMPLE_SCHEMA)
                and table["id"].to_pylist() == block_ids(block, cfg.block_size, cfg.num_samples).tolist()
            )
        except Exception:  # truncated or not parquet at all
            ok = False
        if ok:
            done.add(block)
        else:
            storage.delete(path)
    for tmp in storage.list_files(out, "." + SHARD_PREFIX, ".tmp"):  # a local write that a killed actor left
        storage.delete(tmp)
    return done


def prepare_output(out: str, cfg: SampleConfig, checkpoint: str) -> str:
    """Create the output folder (or check the prefix writable), or check that an existing one was made with the
    same settings; returns the output location (absolute when local). An output may grow: a larger `num_samples`
    keeps every whole block of the old count (only the old last block, if partial, is redone), and the result is the
    same as a fresh run at the larger count."""
    settings = {
        "checkpoint": str(checkpoint),
        **{
            k: v
            for k, v in asdict(cfg).items()
            # scheduling only: the samples do not depend on it
            if k not in (*SCHEDULING, "fail_at_block", "write_png")
        },
        "seeding": SEEDING_VERSION,
    }
    out = storage.check_writable(str(out), "--out")
    path = storage.join(out, SETTINGS)
    if storage.is_file(path):
        old = json.loads(storage.read_text(path))
        if old.get("seeding", 1) != SEEDING_VERSION:  # outputs before the version was recorded are version 1
            raise SamplingError(
                f"{out} holds samples whose noise was seeded by version {old.get('seeding', 1)} (the "
                f"low 32 bits of each seed); this version seeds by version {SEEDING_VERSION} (all 63 "
                "bits) and does not add its samples to them; use a new --out"
            )
        old.setdefault("time_grid", "uniform")  # outputs from before the key existed were all on the uniform grid
        diff = {k: (old.get(k), v) for k, v in settings.items() if k != "num_samples" and old.get(k) != v}
        if diff:
            raise SamplingError(f"{out} holds samples made with other settings {diff}; use a new --out")
        had = old.get("num_samples", 0)
        if cfg.num_samples < had:
            raise SamplingError(
                f"{out} holds {had} samples; --num-samples {cfg.num_samples} would shrink it: ask for "
                f"{had} or more (a larger count samples only the new blocks), or use a new --out"
            )
        if cfg.num_samples > had:
            storage.write_text(path, json.dumps(settings, indent=1))  # grown: the blocks past the old end are new
    else:
        storage.write_text(path, json.dumps(settings, indent=1))
    return out


def run_sampling(checkpoint: str, out: str | Path, cfg: SampleConfig) -> SamplingResult:
    """Sample cfg.num_samples images with an actor pool; returns counts, NFE and throughput."""
    import ray
    from ray.data import ActorPoolStrategy

    meta = load_meta(checkpoint)  # fails clearly before Ray starts, as do unreadable or refused weights below
    validate_sample_config(cfg, meta.method_name, meta.method)
    if not load_model(checkpoint).method.draws_noise:
        raise SamplingError(
            f"{checkpoint} holds a {meta.method_name} model, which moves data from its first "
            "snapshot rather than sampling noise; `python -m jobs.evaluate --checkpoint ... --data "
            "SHARDS` carries the held-out first snapshot through every observed time"
        )
    data = DataSpec.from_dict(meta.manifest, f"{checkpoint}/meta.json: manifest")
    memory = check_fits(
        "sample.block_size",
        cfg.block_size * cfg.blocks_per_call,
        model_item_bytes(meta.model_name, meta.model_kwargs, training=False),
        "one Sampler call",
        hint=" (block_size x blocks_per_call items per call; activations and "
        "solver state estimated from the model's feature maps)",
    )
    layout, model_shape = ("HWC" if data.is_image else "D"), data.model_shape
    out = prepare_output(str(out), cfg, checkpoint)
    done = complete_blocks(out, cfg)
    n_blocks = -(-cfg.num_samples // cfg.block_size)
    todo = [b for b in range(n_blocks) if b not in done]
    start = time.perf_counter()
    stats = []
    if todo:
        init_ray()
        actors, memory = actor_pool(
            cfg.actors,
            cfg.cpus_per_actor,
            cfg.gpus_per_actor,
            memory,
            work=-(-len(todo) // cfg.blocks_per_call),
            section="sample",
            resource=cfg.resource,
        )
        stage(
            f"sampling {cfg.num_samples} samples ({len(todo)} blocks of {cfg.block_size}, {len(done)} reused) "
            f"with {cfg.solver} on {actors} actor(s) into {out}"
        )
        ds: ray.data.Dataset = ray.data.from_items(
            [{"block": b} for b in todo], override_num_blocks=min(len(todo), 200)
        )
        ds = ds.map_batches(
            Sampler,
            fn_constructor_args=(str(checkpoint), out, cfg, model_shape, layout),
            batch_size=cfg.blocks_per_call,
            batch_format="numpy",
            compute=ActorPoolStrategy(size=actors),
            num_cpus=cfg.cpus_per_actor,
            num_gpus=cfg.gpus_per_actor or None,
            memory=memory,
            **resource_args(cfg.resource),
        )
        progress = Progress("sampling", len(todo), "blocks")

        def collect() -> None:
            for row in ds.iter_rows():  # rows stream back as blocks finish: progress, no driver-side buffering
                stats.append(row)
                progress.update()

        try:
            interruptible(collect)
        except JobStopped as stop:  # every block is written whole or not at all: a rerun samples only the rest
            stop.kept = f"{len(complete_blocks(out, cfg))} of {n_blocks} sample blocks are written in {out}"
            raise
    wall = time.perf_counter() - start
    nfe = [int(r["nfe"]) for r in stats]
    busy = sum(float(r["seconds"]) for r in stats)
    made = sum(int(r["rows"]) for r in stats)
    return SamplingResult(
        out=out,
        num_samples=cfg.num_samples,
        blocks=n_blocks,
        blocks_reused=len(done),
        blocks_sampled=len(todo),
        wall_s=wall,
        mean_nfe=float(np.mean(nfe)) if nfe else None,
        max_nfe=max(nfe) if nfe else None,
        samples_per_s=made / wall if made else None,
        samples_per_actor_s=made / busy if busy else None,
        train_run_id=meta.mlflow_run_id,
    )


def open_sampling_run(uri: str, checkpoint: str, cfg: dict) -> str:
    """The sampling run, nested under the checkpoint's training run, opened before the samples are drawn (so that
    the stage's system metrics land in it); `log_sampling_run` fills it."""
    steps = "adaptive" if cfg["solver"] in ADAPTIVE_METHODS else f"{cfg['steps']} steps"
    return start_child_run(
        uri,
        load_meta(checkpoint).mlflow_run_id,
        "sample",
        f"sample-{cfg['solver']}",
        description=f"{cfg['num_samples']} samples, {cfg['solver']} ({steps})",
    )


def log_sampling_run(result: SamplingResult, cfg: dict, uri: str, run_id: str) -> str:
    """Fill the sampling run (`open_sampling_run`): settings, NFE, throughput, a grid, the output location. Returns
    its id, also kept in `result.mlflow_run_id` and in the output's `_mlflow.json`."""
    import tempfile

    log = SafeLogger(uri, run_id)
    log.params({f"sample.{k}": v for k, v in cfg.items()})
    metrics = {
        "mean_nfe": result.mean_nfe,
        "max_nfe": result.max_nfe,
        "samples_per_s": result.samples_per_s,
        "samples_per_actor_s": result.samples_per_actor_s,
        "wall_s": result.wall_s,
    }
    log.metrics({k: v for k, v in metrics.items() if v is not None}, step=0)
    log.tags({"flowray.samples_dir": result.out})
    with tempfile.TemporaryDirectory() as tmp:
        log.artifact(_preview(result.out, Path(tmp)))
    log.finish()
    storage.write_text(storage.join(result.out, RUN_FILE), json.dumps({"run_id": run_id, "tracking_uri": uri}))
    result.mlflow_run_id = run_id
    return run_id


def _preview(out: str, tmp: Path) -> Path:
    """samples.png: a grid of the first 64 images, or a scatter of the first 5,000 points (on S^2 in an equal-area
    projection); read from the first shards only (block files are in id order)."""
    settings = sampling_settings(out)
    data = DataSpec.from_dict(load_meta(settings["checkpoint"]).manifest, "checkpoint manifest")
    want = 64 if data.is_image else 5000
    paths, _, _ = sample_shards(out)
    cells: list[bytes] = []
    for p in paths:
        cells += storage.read_table(p, ["image"])["image"].to_pylist()
        if len(cells) >= want:
            break
    raw = np.asarray(cells[:want], dtype=object)
    if data.is_image:
        return save_grid(decode_rows(raw, data.shape), tmp / "samples.png")
    x = decode_rows(raw, data.shape, "points").numpy()
    return save_points_figure([(f"{len(x)} samples, {settings['solver']}", x)], tmp / "samples.png", data.manifold)
