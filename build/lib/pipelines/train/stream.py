"""The training stream: each Ray Train worker's steps as a Ray Data pipeline, paired before they reach the worker.

    range(steps left) ─pair_steps (Ray Data tasks on CPU workers)─▶ a row per step: x_0, x_1 [b, ...], y [b], the
    step's generator ─▶ the worker: `iter_batches(batch_size=1)`, buffered by `fm.training.read_ahead`

A task reads its steps' rows from the parquet shards (`read_steps`), then decodes, flips, drops labels, draws the
noise and solves the coupling (`PairSteps`). The minibatch OT plan (or any coupling) is solved on CPU workers while
the trainers compute, so it is off the step's critical path. The stream spans the whole run (no Ray Data epochs,
so no stall at an epoch boundary), read as consecutive datasets of a few pairing tasks each, the next one started
while the current one is read (`_records`: a dataset's executor turns in the worker while it has work left).

Which rows a step reads: the run is one endless sequence of rows, pass after pass over the split, each pass in a
fresh order drawn from (train.seed, pass) (`pass_order`): the split's row groups shuffled, then the rows within
windows of about `data.shuffle_window` rows of consecutive (shuffled) groups shuffled, as streaming loaders do
(WebDataset's shard shuffle and buffer, MosaicML streaming's shuffle blocks), so reads stay whole row groups.
Step s takes positions [c + (s - s0) B, c + (s - s0 + 1) B) of the sequence (B = batch_size x workers), rank r its
part [.. + r b, .. + (r + 1) b), where c is the cursor (rows consumed) that the run's checkpoint of step s0 recorded
(0 and 0 for a new run): every row is read once per pass, and the rows a pass cannot fill a last batch with start the
next step, which runs on into the next pass. A resume with another worker count continues the same pass order from
the same row; a resume with another `data.shuffle_window` keeps the old window until the pass under way ends, and
the new one orders the passes after it (`StreamSpec.windows`). Everything random about a step comes from seeds
derived from (train.seed, rank, step) (flips, label dropout, noise, coupling), so a step is the same on any number
of CPU workers, after a restart, and as `fm.training.pair_step` makes it in process. With `method.ot_scope=global`
a rank's stream reads the step's whole global batch and solves the one plan over it
(`fm.training.pair_global_step`), keeping its own part: every rank's stream does this work, off the trainers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import torch

from fm.data import to_model_space
from fm.methods import coupling_name, make_method
from fm.seeding import derive_seed, generator
from fm.training import Pairs, given_pair_step, pair_global_step, pair_step
from pipelines.core.cells import decode_rows, row_bytes
from pipelines.core.checkpoint import CheckpointMeta
from pipelines.core.runtime import configure_ray_data
from pipelines.core.samples import sample_noise
from pipelines.core.shards import ShardRows, group_rows
from pipelines.train.config import method_kwargs

LABEL_STREAM = 1  # the label-dropout draws of a step come from derive_seed(seed, rank, step, LABEL_STREAM)
FLIP_STREAM = 2  # its random horizontal flips from derive_seed(seed, rank, step, FLIP_STREAM)
DROPOUT_STREAM = 3  # the model's dropout masks from derive_seed(seed, rank, step, DROPOUT_STREAM)
ORDER_STREAM = 4  # pass p's row order from derive_seed(seed, ORDER_STREAM, p, window)
BYTES_PER_TASK = 32 << 20  # a pairing task covers about this many bytes of rows in and pairs out (whole steps)
CACHE_WINDOWS = 2  # a pairing process keeps the row groups of about this many shuffle windows (LRU)


@dataclass(frozen=True)
class StreamSpec:
    """What every worker's stream needs, resolved by the driver from the config and the manifest."""

    files: tuple[str, ...]  # the split's shards, in order
    group_rows: tuple[tuple[int, ...], ...]  # the rows of each row group of each shard
    shape: tuple[int, ...]  # a row: [H, W, C] image or [D] point
    kind: str  # "image" or "points"
    batch_size: int  # per worker
    world: int
    steps: int  # train.steps: the stream ends before this step
    seed: int
    hflip: bool
    method_kwargs: dict
    num_classes: int | None  # a class-conditional model's classes (labels dropped with label_dropout), else None
    label_dropout: float
    keep_labels: bool  # labels are data (snapshot indices), passed through untouched
    cpus: float  # per pairing task
    tasks: int  # most pairing tasks at once per worker's stream
    prefetch_batches: int
    shuffle_window: int = 65_536  # rows shuffled together within a pass (whole row groups; data.shuffle_window)
    pairs_seed: int | None = None  # a pairs source's sampling seed: row id i's x_0 is regenerated from it (reflow)
    chunk_tasks: int = 8  # the worker reads consecutive datasets of this many pairing tasks (0: one; `_records`)
    origin_step: int = 0  # the step the run resumed at, and the rows consumed before it (the checkpoint's cursor)
    origin_position: int = 0
    # the run's window schedule: (first pass, window) in pass order (empty: `shuffle_window` orders every pass)
    windows: tuple[tuple[int, int], ...] = ()

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    @cached_property
    def group_start(self) -> np.ndarray:
        """[groups + 1] the split row index at which each row group starts (files in order), then the total."""
        return np.cumsum([0, *(n for rows in self.group_rows for n in rows)])

    @property
    def num_rows(self) -> int:
        return int(self.group_start[-1])

    @property
    def global_plan(self) -> bool:
        """One plan over every rank's batch: an exact-OT method with `ot_scope: global` (others ignore the scope)."""
        kwargs = self.method_kwargs
        return self.world > 1 and coupling_name(kwargs["name"], kwargs.get("ot_scope", "local")) == "global_ot"

    def parts(self, rank: int) -> list[int]:
        """The ranks whose rows rank `rank`'s stream reads: its own, or every rank's for the global plan."""
        return list(range(self.world)) if self.global_plan else [rank]

    def cursor(self, step: int) -> int:
        """Rows of the endless sequence consumed before `step` (what a checkpoint of `step` records)."""
        return self.origin_position + (step - self.origin_step) * self.global_batch

    def positions(self, step: int, part: int) -> np.ndarray:
        """Positions [b] in the run's endless row sequence that rank `part` trains on at `step`."""
        start = self.cursor(step) + part * self.batch_size
        return np.arange(start, start + self.batch_size, dtype=np.int64)

    def window(self, p: int) -> int:
        """The shuffle window that orders pass p: that of the last entry of `windows` starting at or before p."""
        return next((w for first, w in reversed(self.windows) if first <= p), self.shuffle_window)

    @property
    def row_bytes(self) -> int:
        return row_bytes(self.shape, self.kind)


def stream_spec(cfg, manifest, model_kwargs: dict, tasks: int, resume: CheckpointMeta | None = None) -> StreamSpec:
    """The `StreamSpec` of a training config (`pipelines.train.config.Config`) over its split of `manifest`, with at
    most `tasks` pairing tasks at once per worker's stream; `resume`: the meta.json of the checkpoint the run
    continues from, whose stream position it continues (`resume_position`)."""
    split, data = cfg.data.split, manifest.data
    files = tuple(manifest.shard_paths(split))
    spec = StreamSpec(
        files,
        group_rows(files),
        tuple(data.shape),
        data.kind,
        cfg.train.batch_size,
        cfg.ray.num_workers,
        cfg.train.steps,
        cfg.train.seed,
        cfg.data.hflip,
        method_kwargs(cfg, data),
        model_kwargs.get("num_classes"),
        cfg.model.label_dropout,
        bool(data.times),
        cfg.ray.preprocess_cpus,
        tasks,
        cfg.ray.prefetch_batches,
        cfg.data.shuffle_window,
        data.pairs["seed"] if data.pairs else None,
        cfg.ray.stream_chunk_tasks,
    )
    return spec if resume is None else resume_position(spec, resume)


def resume_position(spec: StreamSpec, meta: CheckpointMeta) -> StreamSpec:
    """`spec` continuing from a checkpoint (its meta.json): from the rows it had consumed and with its window
    schedule, whatever its worker count was. A window that differs from the schedule's last orders the passes from
    the next whole one on: the pass under way keeps the order it started with. A checkpoint written before the
    cursor was recorded consumed step x batch_size x its workers rows, all ordered by its config's window."""
    step, stream, saved = meta.step, meta.stream, meta.config
    if stream is not None:
        cursor, windows = int(stream["cursor"]), [(int(w[0]), int(w[1])) for w in stream["windows"]]
    else:
        workers = saved.get("ray", {}).get("num_workers", spec.world)
        cursor = step * saved.get("train", {}).get("batch_size", spec.batch_size) * workers
        windows = [(0, int(saved.get("data", {}).get("shuffle_window", spec.shuffle_window)))]
    if windows[-1][1] != spec.shuffle_window:
        windows.append((-(-cursor // spec.num_rows), spec.shuffle_window))
    return replace(spec, origin_step=step, origin_position=cursor, windows=tuple(windows))


def stream_record(spec: StreamSpec, step: int) -> dict:
    """What a checkpoint of `step` records of the stream (meta.json's `stream`): rows consumed, window schedule."""
    return {"cursor": spec.cursor(step), "windows": [list(w) for w in spec.windows] or [[0, spec.shuffle_window]]}


# --- order -----------------------------------------------------------------------------------------------------


def pass_order(spec: StreamSpec, p: int) -> np.ndarray:
    """Pass p's order of the split's rows [N]: a permutation from (seed, p) alone, shuffled the way a streaming loader
    can read it: the row groups in a random order, cut into windows of consecutive groups holding at least
    `spec.window(p)` rows, the rows of each window in a random order."""
    start, n, size = spec.group_start[:-1], np.diff(spec.group_start), spec.window(p)
    groups = np.random.default_rng(derive_seed(spec.seed, ORDER_STREAM, p, -1)).permutation(len(n))
    out: list[np.ndarray] = []
    window: list[np.ndarray] = []
    rows = 0
    for k, g in enumerate(groups):
        window.append(np.arange(start[g], start[g] + n[g]))
        rows += int(n[g])
        if rows >= size or k == len(groups) - 1:
            rng = np.random.default_rng(derive_seed(spec.seed, ORDER_STREAM, p, len(out)))
            out.append(rng.permutation(np.concatenate(window)))
            window, rows = [], 0
    return np.concatenate(out)


class _Order:
    """Split rows at positions of the run's endless sequence (pass = position // N), each pass's order drawn once."""

    def __init__(self, spec: StreamSpec):
        self.spec = spec
        self.orders: dict[int, np.ndarray] = {}  # pass -> its row order

    def rows(self, positions: np.ndarray) -> np.ndarray:
        n = self.spec.num_rows
        passes, offsets = np.divmod(positions, n)
        out = np.empty(len(positions), dtype=np.int64)
        for p in np.unique(passes):
            if p not in self.orders:
                self.orders = {k: v for k, v in self.orders.items() if k >= p - 1}  # a task moves forward
                self.orders[p] = pass_order(self.spec, int(p))
            sel = passes == p
            out[sel] = self.orders[p][offsets[sel]]
        return out


# --- read ---------------------------------------------------------------------------------------------------------


def read_steps(batch: dict[str, np.ndarray], spec: StreamSpec, rank: int, first_step: int) -> dict[str, np.ndarray]:
    """Ray Data map stage: step ids (0 = `first_step`) -> one row per step: step, the split rows it reads
    row int64 [rows], raw uint8 [rows, row_bytes] and label int64 [rows] (rank `rank`'s part, or every part for the
    global plan, in rank order); for a pairs source also the rows' sample ids, sample_id int64 [rows]."""
    order, steps = _Order(spec), first_step + batch["id"].astype(np.int64)
    # the groups of about CACHE_WINDOWS shuffle windows stay in the process: a window's steps draw on them
    widest = max([spec.shuffle_window, *(w for _, w in spec.windows)])
    reader = ShardRows(spec.files, spec.group_rows, spec.shape, spec.kind, CACHE_WINDOWS * widest)
    rows = [order.rows(np.concatenate([spec.positions(int(s), part) for part in spec.parts(rank)])) for s in steps]
    raw, labels = zip(*(reader.take(r) for r in rows), strict=True)
    out = {"step": steps, "row": np.stack(rows), "raw": np.stack(raw), "label": np.stack(labels)}
    if spec.pairs_seed is not None:
        out["sample_id"] = np.stack([reader.ids(r) for r in rows])
    return out


# --- pair ------------------------------------------------------------------------------------------------------


def drop_labels(y: torch.Tensor, num_classes: int, p: float, g: torch.Generator) -> torch.Tensor:
    """Labels [b] with each replaced by the null class `num_classes` with probability p (classifier-free
    guidance training)."""
    return torch.where(torch.rand(y.shape, generator=g) < p, torch.full_like(y, num_classes), y)


class PairSteps:
    """A step's raw rows -> model-space x_1, the step's flips and labels, then its noise and
    coupling (`pair_step`, or `pair_global_step` over every rank's part), all from the step's seeds. Out: one row
    per step with x_0, x_1 [b, ...], y [b] (when the model takes labels), the generator's state after the pairing
    (the loss continues from it) and the solve time."""

    def __init__(self, spec: StreamSpec, rank: int):
        self.spec, self.rank, self.method = spec, rank, make_method(**spec.method_kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {"step": [], "x_0": [], "x_1": [], "y": [], "state": [], "solve_s": []}
        ids = batch["sample_id"] if "sample_id" in batch else [None] * len(batch["step"])
        for step, raw, labels, sample_ids in zip(batch["step"], batch["raw"], batch["label"], ids, strict=True):
            pairs = self.pair(int(step), raw, labels, sample_ids)
            out["step"].append(int(step))
            out["x_0"].append(pairs.x_0.numpy())
            out["x_1"].append(pairs.x_1.numpy())
            out["y"].append(None if pairs.y is None else pairs.y.numpy())
            out["state"].append(pairs.generator.get_state().numpy())
            out["solve_s"].append(pairs.solve_seconds)
        if out["y"][0] is None:
            del out["y"]
        return {k: _column(v) for k, v in out.items()}

    def pair(self, step: int, raw: np.ndarray, labels: np.ndarray, sample_ids: np.ndarray | None = None) -> Pairs:
        """The pairs rank `rank` trains on at `step`, from the rows the step reads ([parts x b, row_bytes]); with a
        pairs source, each row's x_0 regenerated from its sample id."""
        spec, b = self.spec, self.spec.batch_size
        parts = spec.parts(self.rank)
        x_1, y = [], []
        for k, part in enumerate(parts):
            x, lab = (
                self.x_1(step, part, raw[k * b : (k + 1) * b]),
                torch.from_numpy(labels[k * b : (k + 1) * b].copy()),
            )
            x_1.append(x)
            if spec.keep_labels:
                y.append(lab)
            elif spec.num_classes is not None:
                y.append(
                    drop_labels(
                        lab, spec.num_classes, spec.label_dropout, generator(spec.seed, part, step, LABEL_STREAM)
                    )
                )
        gens = [generator(spec.seed, part, step) for part in parts]
        if spec.pairs_seed is not None:
            x_0 = sample_noise(spec.pairs_seed, sample_ids, x_1[0].shape[1:])
            return given_pair_step(self.method, x_0, x_1[0], y[0] if y else None, gens[0])
        if spec.global_plan:
            return pair_global_step(self.method, x_1, y or None, gens)[parts.index(self.rank)]
        return pair_step(self.method, x_1[0], y[0] if y else None, gens[0])

    def x_1(self, step: int, part: int, raw: np.ndarray) -> torch.Tensor:
        """Rank `part`'s data at `step` in model space: images in [-1, 1] [b, C, H, W] (flipped from the step's
        seed), points [b, D]."""
        spec = self.spec
        if spec.kind == "points":
            return decode_rows(raw, list(spec.shape), "points")
        x = to_model_space(decode_rows(raw, list(spec.shape)))
        if spec.hflip:
            flip = torch.rand(x.shape[0], generator=generator(spec.seed, part, step, FLIP_STREAM)) < 0.5
            x[flip] = x[flip].flip(-1)
        return x


def _column(values: list) -> np.ndarray:
    """One column of per-step values: stacked, or an object array of arrays where their shapes differ (snapshot
    pairs: how many rows of consecutive times a step pairs depends on its rows); Ray Data stores the latter as a
    variable-shaped tensor column."""
    if len({np.shape(v) for v in values}) == 1:
        return np.stack(values)
    ragged = np.empty(len(values), dtype=object)
    ragged[:] = values
    return ragged


# --- the stream --------------------------------------------------------------------------------------------------


def pair_steps(batch: dict[str, np.ndarray], spec: StreamSpec, rank: int, first_step: int) -> dict[str, np.ndarray]:
    """Ray Data map stage (tasks on CPU workers): step ids -> `read_steps` -> `PairSteps`, one row per step."""
    torch.set_num_threads(1)  # a task holds a fraction of a CPU; more threads only contend with the trainers
    return PairSteps(spec, rank)(read_steps(batch, spec, rank, first_step))


def steps_per_task(spec: StreamSpec, rank: int) -> int:
    """How many steps one pairing task of rank `rank`'s stream pairs: about `BYTES_PER_TASK` of rows in and pairs
    out, at most 64."""
    rows = len(spec.parts(rank)) * spec.batch_size
    pairs_out = 2 * spec.batch_size * int(np.prod(spec.shape)) * 4  # float32 x_0 and x_1
    return max(1, min(64, BYTES_PER_TASK // (rows * spec.row_bytes + pairs_out)))


def build_stream(spec: StreamSpec, rank: int, first_step: int, end: int):
    """Rank `rank`'s Ray Data dataset of paired steps `first_step` ... `end` - 1, in order.

    Tasks rather than an actor pool: the method is cheap to build, and restartable actors started from a Train
    worker print Ray's warning about their constructor arguments into the job's log. A failed task is retried by
    Ray Data; a worker that loses its stream fails, and Ray Train resumes from the last checkpoint (the stream
    starts again at that step)."""
    import ray.data
    from ray.data import TaskPoolStrategy

    configure_ray_data("train_stream")  # steps arrive in order
    # Ray sizes the blocks of step ids; a task pairs `steps_per_task` of them (Ray's stubs type a batch function of
    # one argument: fn_kwargs gives pair_steps the others)
    return ray.data.range(end - first_step).map_batches(
        pair_steps,  # type: ignore[arg-type]
        fn_kwargs={"spec": spec, "rank": rank, "first_step": first_step},
        batch_size=steps_per_task(spec, rank),
        batch_format="numpy",
        num_cpus=spec.cpus,
        compute=TaskPoolStrategy(size=spec.tasks),
    )


def iter_pairs(spec: StreamSpec, rank: int, first_step: int, device: torch.device):
    """(step, `Pairs` on `device`) for steps `first_step`, ..., in order, from rank `rank`'s stream."""
    for rec in _records(spec, rank, first_step):
        g = torch.Generator()
        g.set_state(torch.tensor(rec["state"][0]))  # copies: Ray Data's arrays are read-only
        y = torch.tensor(rec["y"][0], device=device) if "y" in rec else None
        yield (
            int(rec["step"][0]),
            Pairs(
                torch.tensor(rec["x_0"][0], device=device),
                torch.tensor(rec["x_1"][0], device=device),
                y,
                g,
                float(rec["solve_s"][0]),
            ),
        )


def _records(spec: StreamSpec, rank: int, first_step: int):
    """Rank `rank`'s paired steps from `first_step` on (one-row numpy batches), read from consecutive datasets of
    `spec.chunk_tasks` pairing tasks each (0: one dataset); the next one starts when half of the current one is read.

    Why not one dataset for the whole run: a dataset's streaming executor runs in the process that iterates it (the
    Train worker), and while it has work left its scheduling loop turns continually (a backpressured stream's
    ready outputs end every wait at once) and takes the GIL from the training step: on 2 cores the two workers of
    the `fashion-mnist-cpu` preset trained at 74 images/s against 161 with chunks (`benchmarks.stream_chunks`). A
    chunk's executor stops once its few tasks are done, so it runs for a fraction of the time it takes to read."""
    from concurrent.futures import ThreadPoolExecutor

    chunk = spec.chunk_tasks * steps_per_task(spec, rank) or spec.steps - first_step

    def start(a: int):
        ds = build_stream(spec, rank, a, min(a + chunk, spec.steps))
        it = iter(ds.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=spec.prefetch_batches))
        return it, next(it, None)  # the first record: the chunk's execution has started

    if first_step >= spec.steps:  # a finished run started again: nothing left to read
        return
    pool = ThreadPoolExecutor(1, thread_name_prefix="flowray-stream-next")
    try:
        pending = pool.submit(start, first_step)
        for a in range(first_step, spec.steps, chunk):
            it, rec = pending.result()
            read = 0
            while rec is not None:
                yield rec
                read += 1
                if read == max(1, chunk // 2) and a + chunk < spec.steps:
                    pending = pool.submit(start, a + chunk)
                rec = next(it, None)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
