"""Feature statistics of image sets as a Ray Data stage: FID's Inception network, or the data set's small
classifier, over sample shards or a split of an ingest output.

Actors load Inception once (on a GPU when `gpus_per_actor` > 0) and turn batches of parquet image cells into
feature rows; the small classifier runs as Ray Data tasks on Ray's pooled workers, which keep it loaded from one
stage to the next. The driver folds the streamed rows into `fm.metrics.FeatureStats` (float64 sums of f and f f^T)
and keeps a bounded, deterministic subset (by a hash of each row's id, in id order) for KID and precision/recall, so its
memory does not grow with the number of images. Batches are stateless, so a batch that Ray retries is counted once.
Statistics of a data split are cached beside its shards, keyed by the shards' checksums, the split and the network.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import zlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from fm.metrics import FeatureStats
from pipelines.core import storage
from pipelines.core.cells import decode_rows
from pipelines.core.memory import feature_actor_bytes
from pipelines.core.runtime import (
    Progress,
    actor_pool,
    init_ray,
    nice_args,
    read_parquet,
    resource_args,
    spread,
    use_cpu_share,
)

STATS_DIR = "feature_stats"
SUBSET_BUCKETS = 1_000_000


@dataclass(frozen=True)
class FeatureNet:
    """Which features: "inception" (FID) or "classifier" (the data set's SmallCNN in `classifier_dir`)."""

    kind: str
    label: str  # how the Fréchet distance is called in tables: "FID" or "FD (<data> classifier)"
    classifier_dir: str | None = None

    @property
    def classifier_folder(self) -> str:
        """The classifier's folder (model.pt, info.json); only a "classifier" net has one."""
        if self.classifier_dir is None:
            raise ValueError(f"the {self.kind} features have no classifier folder")
        return self.classifier_dir

    @property
    def key(self) -> str:
        """A cache key that changes when the network changes."""
        if self.kind == "inception":
            from fm.inception import INCEPTION_NAME

            return "inception-" + hashlib.sha256(INCEPTION_NAME.encode()).hexdigest()[:8]
        weights = storage.read_bytes(storage.join(self.classifier_folder, "model.pt"))
        return "classifier-" + hashlib.sha256(weights).hexdigest()[:12]


@dataclass
class FeatureResult:
    """Streamed statistics of a set, its bounded feature subset [M, D] for KID / precision-recall, and counts."""

    stats: FeatureStats
    subset: torch.Tensor
    images_per_s: float | None = None  # wall rate from the first feature batch to the last (start-up excluded)
    cached: bool = False
    prefix_stats: FeatureStats | None = None  # of the rows with integer id < prefix (the first samples)
    subset_ids: np.ndarray | None = None  # the ids of the subset's rows, in order

    @property
    def n(self) -> int:
        return self.stats.n


def id_hash(ids) -> np.ndarray:
    """A stable pseudo-random number in [0, SUBSET_BUCKETS) per row id (int64 [B]), the same in any process."""
    return np.array([zlib.crc32(str(i).encode()) % SUBSET_BUCKETS for i in ids], dtype=np.int64)


def in_subset(ids, rate: float) -> np.ndarray:
    """A deterministic pseudo-random selection of rows by id (bool [B]): the same rows whatever the batching."""
    return id_hash(ids) < int(rate * SUBSET_BUCKETS)


def pick_subset(ids: np.ndarray, features: torch.Tensor, size: int) -> tuple[np.ndarray, torch.Tensor]:
    """The `size` rows of smallest id hash (ties by id), in id order: the same ids [<= size] and features
    [<= size, D] whatever order the rows arrived in, from however many actors."""
    ids = np.asarray(ids)
    keys = np.array([str(i) for i in ids])
    chosen = np.lexsort((keys, id_hash(ids)))[:size]
    chosen = chosen[np.argsort(ids[chosen], kind="stable")]
    return ids[chosen], features[torch.from_numpy(chosen)]


class FeatureActor:
    """Ray Data actor: loads the feature network once; 8-bit image cells -> feature rows."""

    def __init__(
        self, net: FeatureNet, shape: list[int], use_gpu: bool = False, keep: float = 1.0, cpus: float = 1.0, nice=0
    ):
        use_cpu_share(cpus, nice)
        self.net, self.shape, self.keep = net, list(shape), keep
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = load_network(net, self.device)

    def __call__(self, batch: dict) -> dict:
        return feature_rows(self.net, self.model, self.shape, self.keep, batch, self.device)


# classifier networks a pooled Ray worker has loaded, by their weights' digest (`FeatureNet.key`): a classifier
# rebuilt in the same folder is another entry. A few hundred KB each; the oldest go beyond a handful.
_TASK_NETWORKS: dict[str, torch.nn.Module] = {}
_TASK_NETWORKS_KEPT = 4


def classifier_features(
    batch: dict, net: FeatureNet, key: str, shape: list[int], keep: float, cpus: float, nice: int = 0
) -> dict:
    """Ray Data task: the classifier's feature rows of a batch, on the CPU. The network is loaded once per worker
    process and kept there (by `key`), so a later stage on the same warm worker starts at once; with `nice`, on
    workers of that priority only (`nice_args`)."""
    use_cpu_share(cpus, nice)
    model = _TASK_NETWORKS.get(key)
    if model is None:
        model = _TASK_NETWORKS[key] = load_network(net, torch.device("cpu"))
        while len(_TASK_NETWORKS) > _TASK_NETWORKS_KEPT:
            del _TASK_NETWORKS[next(iter(_TASK_NETWORKS))]
    return feature_rows(net, model, shape, keep, batch, torch.device("cpu"))


def feature_width(net: FeatureNet, model) -> int:
    """The network's feature width D, read off the network (no forward pass)."""
    if net.kind == "inception":
        from fm.inception import INCEPTION_DIM

        return INCEPTION_DIM
    return model.feature_dim


def feature_rows(net: FeatureNet, model, shape: list[int], keep: float, batch: dict, device: torch.device) -> dict:
    """A batch of parquet image cells {id, image} -> {id, feature [B, D]}; with `keep` < 1 only the rows a hash of
    their id keeps (the same rows whatever the batching or the run)."""
    if keep < 1.0:
        mask = in_subset(batch["id"], keep)
        batch = {"id": np.asarray(batch["id"])[mask], "image": np.asarray(batch["image"], dtype=object)[mask]}
    x = decode_rows(batch["image"], shape)
    # a batch the cap empties: no rows, of the feature width
    f = extract(net, model, x, device).numpy() if len(x) else np.zeros((0, feature_width(net, model)), np.float32)
    return {"id": np.asarray(batch["id"]), "feature": f}


def load_network(net: FeatureNet, device: torch.device):
    """The feature network itself: the TorchScript Inception, or the classifier from its cache directory."""
    if net.kind == "inception":
        from fm.inception import load_inception

        return load_inception(device=device)
    from fm.models.classifier import SmallCNN

    info = json.loads(storage.read_text(storage.join(net.classifier_folder, "info.json")))
    model = SmallCNN(**info["kwargs"])
    weights = io.BytesIO(storage.read_bytes(storage.join(net.classifier_folder, "model.pt")))
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval().to(device)


@torch.no_grad()
def extract(net: FeatureNet, model, x_uint8: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Features [B, D] (float32, CPU) of 8-bit images [B, C, H, W]."""
    if net.kind == "inception":
        from fm.inception import inception_features

        return inception_features(model, x_uint8).float()
    from fm.data import to_model_space

    return model.features(to_model_space(x_uint8).to(device)).float().cpu()


def feature_stage(
    paths: list[str],
    shape: list[int],
    net: FeatureNet,
    total: int,
    *,
    subset_size: int = 2000,
    batch_size: int = 64,
    actors: int = 0,
    cpus_per_actor: float = 0.5,
    gpus_per_actor: float = 0.0,
    nice: int = 0,
    resource: str = "",
    what: str = "features",
    prefix: int | None = None,
    limit: int = 0,
    pool: Literal["auto", "actors", "tasks"] = "auto",
) -> FeatureResult:
    """Stream `total` images of parquet shards (columns id, image) through the feature network into statistics;
    with `prefix`, also the statistics of the rows whose (integer) id is below it; with `limit` > 0, only about
    `limit` of them: a pseudo-random subset chosen by a hash of each id (the count is binomial around `limit`).

    `pool`: "actors" (`FeatureActor`, each loading the network once), or "tasks" (`classifier_features` on Ray's
    pooled workers, which keep the classifier loaded from one stage to the next: a stage skips the actors' process
    start, imports and network load, a few seconds of the small stages that score a sampling point; BENCHMARKS.md,
    "Classifier features on tasks"). "auto": tasks for the classifier on the CPU, actors otherwise (Inception is
    worth an actor's start; a GPU is an actor's). Tasks at a lowered priority (`nice`) run on workers of that
    priority only (`nice_args`), which the next scoring stage of a training run finds warm. `actors` is the number
    of actors, or of concurrent tasks."""
    from ray.data import ActorPoolStrategy

    on_tasks = net.kind == "classifier" and gpus_per_actor == 0
    if pool not in ("auto", "actors", "tasks") or (pool == "tasks" and not on_tasks):
        raise ValueError(
            f"feature pool {pool!r} is not allowed for the {net.kind} features with gpus_per_actor="
            f"{gpus_per_actor:g}; allowed: auto, actors, and tasks for the classifier on the CPU"
        )
    pool = "tasks" if pool == "tasks" or (pool == "auto" and on_tasks) else "actors"
    init_ray()
    # declared, so that Ray places actors by what they hold (and its memory detector has nothing to say)
    actors, memory = actor_pool(
        actors,
        cpus_per_actor,
        gpus_per_actor,
        feature_actor_bytes(net.kind, batch_size),
        work=-(-total // batch_size),
        section="eval",
        resource=resource,
    )
    keep = min(1.0, limit / max(total, 1)) if limit > 0 else 1.0
    # rates relative to the whole set: the KID subset of a capped set lies inside it, whatever the stream order
    rate = min(1.0, subset_size / max(total * keep, 1)) * keep
    ds = spread(read_parquet(*storage.ray_paths(paths)).select_columns(["id", "image"]), total, batch_size, actors)
    if pool == "tasks":
        ds = ds.map_batches(
            classifier_features,
            fn_kwargs={
                "net": net,
                "key": net.key,
                "shape": list(shape),
                "keep": keep,
                "cpus": cpus_per_actor,
                "nice": nice,
            },
            batch_size=batch_size,
            batch_format="numpy",
            concurrency=actors,
            num_cpus=cpus_per_actor,
            memory=memory,
            **resource_args(resource),
            **nice_args(nice),
        )
        workers = f"{actors} task{'s' if actors > 1 else ''}"
    else:
        ds = ds.map_batches(
            FeatureActor,
            fn_constructor_args=(net, shape, gpus_per_actor > 0, keep, cpus_per_actor, nice),
            batch_size=batch_size,
            batch_format="numpy",
            compute=ActorPoolStrategy(size=actors),
            num_cpus=cpus_per_actor,
            num_gpus=gpus_per_actor or None,
            memory=memory,
            **resource_args(resource),
        )
        workers = f"{actors} actor{'s' if actors > 1 else ''}"
    stats, subset, subset_ids, head, first = None, [], [], None, None
    progress = Progress(f"{what} ({workers})", round(total * keep), "images")
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        f = torch.from_numpy(np.array(batch["feature"], dtype=np.float32))  # a copy: the object store's is read-only
        stats = (stats or FeatureStats(f.shape[1])).update(f)
        keep_rows = in_subset(batch["id"], rate)
        subset.append(f[torch.from_numpy(keep_rows)])
        subset_ids.append(np.asarray(batch["id"])[keep_rows])
        first = first or (time.perf_counter(), len(f))  # the clock starts when the actors are up and working
        if prefix is not None:
            head = (head or FeatureStats(f.shape[1])).update(f[torch.from_numpy(np.asarray(batch["id"]) < prefix)])
        progress.update(len(f))
    if stats is None:
        raise ValueError(f"no images in {len(paths)} shard(s)")
    assert first is not None  # set with the first features, as `stats` is
    kept_ids, kept = pick_subset(np.concatenate(subset_ids), torch.cat(subset), subset_size)
    steady = time.perf_counter() - first[0]
    images_per_s = (stats.n - first[1]) / steady if stats.n > first[1] and steady > 0 else None
    return FeatureResult(stats, kept, images_per_s, prefix_stats=head, subset_ids=kept_ids)


def split_stats(manifest, split: str, net: FeatureNet, limit: int = 0, **stage_kwargs) -> FeatureResult:
    """Statistics of a data split (about `limit` of its images when 0 < limit < its size, chosen by id hash),
    cached in <shards>/feature_stats/ per (shard checksums, split, limit, network)."""
    count = manifest.count(split)
    limit = limit if 0 < limit < count else 0
    digest = hashlib.sha256(json.dumps([s["sha256"] for s in manifest.splits[split]["shards"]]).encode())
    capped = f"-max{limit}" if limit else ""
    path = manifest.path(STATS_DIR, f"{net.key}-{split}{capped}-{digest.hexdigest()[:12]}.npz")
    if storage.is_file(path):
        with np.load(io.BytesIO(storage.read_bytes(path))) as z:
            return FeatureResult(FeatureStats.from_arrays(z), torch.from_numpy(z["subset"]), cached=True)
    res = feature_stage(
        manifest.shard_paths(split),
        manifest.data.shape,
        net,
        count,
        limit=limit,
        what=f"{net.label} features of the {split} split" + (f" (~{limit} images)" if limit else ""),
        **stage_kwargs,
    )
    buf = io.BytesIO()
    np.savez(buf, subset=res.subset.numpy(), **res.stats.to_arrays())  # type: ignore[arg-type]  # (**arrays)
    storage.write_bytes(path, buf.getvalue())  # a half-written cache never carries the final name
    return res
