"""Ingest any image source into sharded parquet with a manifest, as a Ray Data job in bounded memory.

    listing (driver: checks, parts) -> Ray Data map_batches tasks, one part each: read, decode, convert the mode,
    resize, validate, split by id hash, stream parquet shards -> driver: gather counts, checksums, quarantine,
    conversions -> manifest.json

Rows are raw uint8 HWC bytes (float32 for 2-D points) with a label and a stable id (see `pipelines.core.cells`).
Sources and their parts: `pipelines.ingest.sources`. The output is a function of the source and the settings, never of
the parallelism: parts come from the listing, the train/test split from a hash of (seed, id), and every part
writes its own shards. Rows that cannot be used are quarantined with their id and reason in manifest.json; the job
fails when their fraction exceeds `max_bad_fraction`. Shards are written into a staging folder and moved into
place with the manifest only when the job succeeds.

`--out` may be an object-store URI (`s3://bucket/data/x`). Objects cannot be renamed, so there the shards are
written straight to a folder of their own (`shards-<ingest id>/`, never one an earlier manifest lists), the
manifest is put last in one request (readers see the old data set or the new one, whole), and only then are the
shards of the manifest it replaced deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from pipelines.core import storage
from pipelines.core.manifest import MANIFEST, Manifest, row_format, sha256, shard_schema
from pipelines.core.memory import gib
from pipelines.core.runtime import Progress, init_ray, stage
from pipelines.ingest.part_writer import ingest_batch
from pipelines.ingest.parts import IngestError, Listing
from pipelines.ingest.rows import GREY_MODES, MAX_PIXELS, TRANSFORMS, Settings, open_image
from pipelines.ingest.sources import list_source, read_part

__all__ = ["IngestResult", "ingest", "load_manifest", "shard_paths"]

MAX_ROWS_PER_SHARD = 20_000


# --- the driver ----------------------------------------------------------------------------------------------


@dataclass
class IngestResult:
    out: str | Path  # a local folder, or an object-store URI
    manifest: dict


def ingest(
    spec: str,
    out: str | Path,
    shards: int = 4,
    test_fraction: float = 0.1,
    seed: int = 0,
    channels: int | None = None,
    image_size: int | None = None,
    max_bad_fraction: float = 0.01,
    transform: str | None = None,
    parallelism: int | None = None,
    max_rows_per_shard: int = MAX_ROWS_PER_SHARD,
    unlabelled: bool = False,
    manifold: str | None = None,
    max_pixels: int = MAX_PIXELS,
) -> IngestResult:
    """Ingest a source into parquet shards and manifest.json on Ray Data (a local Ray unless one is running or
    RAY_ADDRESS is set).

    Args:
        spec: the source (`pipelines.ingest.sources`). out: output directory.
        shards: parts the source is cut into at least (each writes one shard per split); more when a part would
            exceed `max_rows_per_shard` rows.
        test_fraction: held-out fraction (by id hash) where the source has no split of its own. seed: split seed.
        channels: 1 or 3 (default: 1 for the grey array sources, else that of the first listed image).
        image_size: the resolution H = W (default: that of the first listed image).
        max_bad_fraction: quarantined fraction that fails the job.
        transform: None (images of another size are quarantined), "center-crop" or "resize" (Lanczos).
        parallelism: at most this many parts at once (default: as many as the cluster's CPUs allow).
        unlabelled: accept a source without labels (parquet without a 'label' column, npz without labels, tar
            without .cls members or class folders); the manifest says so and class-conditional training refuses it.
        manifold: the manifold point rows lie on ("sphere2", "torus2"; `manifold:NAME` sources declare their own):
            recorded in the manifest; rows off it are quarantined.
        max_pixels: an encoded image whose header says it decodes to more pixels is quarantined undecoded.
    """
    _check_arguments(
        shards, test_fraction, channels, image_size, transform, max_bad_fraction, parallelism, max_rows_per_shard
    )
    if max_pixels < 1:
        raise IngestError(f"--max-pixels must be >= 1; got {max_pixels}")
    out = storage.check_writable(str(out), "--out")
    listing = list_source(spec, shards, max_rows_per_shard)
    if not listing.labelled and not unlabelled:
        raise IngestError(
            f"source {spec!r} has no labels; pass --unlabelled to ingest it without classes "
            "(class-conditional training will refuse it)"
        )
    if listing.labelled and unlabelled:
        raise IngestError(f"source {spec!r} has labels; --unlabelled is only for sources without them")
    listing.manifold = _declared_manifold(listing, manifold)
    if (
        listing.pairs
        and listing.element_shape is not None
        and (
            transform
            or (image_size or listing.element_shape[0]) != listing.element_shape[0]
            or (channels or listing.element_shape[-1]) != listing.element_shape[-1]
        )
    ):
        raise IngestError(
            f"source {spec!r} holds pairs (x_0, x_1 = ODE(x_0)) at {list(listing.element_shape)}: "
            "--channels, --image-size and --transform would change x_1 and break each pair; leave "
            "them out"
        )
    channels, image_size = declared_format(listing, channels, image_size, max_pixels)
    # the declared format and split rule; where the tasks write (`staging`) is set below, per kind of --out
    declared = Settings(
        channels,
        image_size,
        transform,
        seed,
        test_fraction,
        listing.points,
        "",
        len(listing.parts),
        listing.manifold,
        max_pixels=max_pixels,
    )
    _check_task_memory(declared, listing, image_size)
    if storage.is_uri(out):
        return _ingest_to_object_store(listing, out, declared, max_bad_fraction, parallelism)
    out = Path(out)
    staging = out / f".ingest-staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    settings = replace(declared, staging=str(staging.resolve()))
    try:
        summaries = _run_parts(listing, settings, parallelism)
        manifest = _manifest(listing, settings, summaries, max_bad_fraction)
        _publish(out, staging, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return IngestResult(out, manifest)


def _ingest_to_object_store(
    listing: Listing, out: str, declared: Settings, max_bad_fraction: float, parallelism: int | None
) -> IngestResult:
    """The shards straight into `out/shards-<id>/`, then the manifest in one PUT, then the replaced shards go.
    A failed job leaves only its own unlisted folder behind (removed here when it can be)."""
    folder = f"shards-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    settings = replace(declared, staging=storage.join(out, folder), file_prefix=folder + "/")
    old = _listed_files(out)
    try:
        summaries = _run_parts(listing, settings, parallelism)
        manifest = _manifest(listing, settings, summaries, max_bad_fraction)
    except BaseException:
        storage.delete_dir(settings.staging)
        raise
    storage.write_text(storage.join(out, MANIFEST), json.dumps(manifest, indent=1), "--out")
    new = {s["file"] for split in manifest["splits"].values() for s in split["shards"]}
    for name in old - new:
        storage.delete(storage.join(out, name))
    return IngestResult(out, manifest)


def _listed_files(out: str) -> set[str]:
    """The shard files an existing manifest in `out` lists (none when there is none, or it cannot be read)."""
    path = storage.join(out, MANIFEST)
    if not storage.is_file(path):
        return set()
    try:
        return {s["file"] for split in json.loads(storage.read_text(path))["splits"].values() for s in split["shards"]}
    except (json.JSONDecodeError, KeyError, TypeError):
        return set()


def _declared_manifold(listing: Listing, manifold: str | None) -> str | None:
    """The manifold of the rows: the source's own, or --manifold for point sources (checked against the rows'
    dimension)."""
    if manifold is None:
        return listing.manifold
    from fm.manifolds import get_manifold

    try:
        m = get_manifold(manifold)
    except ValueError as err:
        raise IngestError(f"--manifold: {err}") from None
    if not listing.points:
        raise IngestError(
            f"--manifold {manifold}: source {listing.spec!r} holds images; only point rows lie on a manifold"
        )
    if listing.manifold not in (None, manifold):
        raise IngestError(f"--manifold {manifold}: source {listing.spec!r} lies on {listing.manifold}")
    if listing.element_shape is not None and tuple(listing.element_shape) != (m.ambient_dim,):
        raise IngestError(
            f"--manifold {manifold}: points on {m.label} have {m.ambient_dim} coordinates; "
            f"{listing.spec!r} has rows of shape {list(listing.element_shape)}"
        )
    return manifold


def _check_arguments(
    shards, test_fraction, channels, image_size, transform, max_bad_fraction, parallelism, max_rows_per_shard
) -> None:
    if shards < 1:
        raise IngestError(f"--shards must be >= 1; got {shards}")
    if not 0 <= test_fraction < 1:
        raise IngestError(f"--test-fraction must be in [0, 1); got {test_fraction}")
    if channels not in (None, 1, 3):
        raise IngestError(f"--channels must be 1 or 3; got {channels}")
    if image_size is not None and image_size < 1:
        raise IngestError(f"--resolution must be >= 1; got {image_size}")
    if transform not in (None, *TRANSFORMS):
        raise IngestError(f"--transform {transform!r} is not allowed; allowed: {', '.join(TRANSFORMS)}")
    if transform and image_size is None:
        raise IngestError(f"--transform {transform} needs --resolution N (the size to resize to)")
    if not 0 <= max_bad_fraction <= 1:
        raise IngestError(f"--max-bad-fraction must be in [0, 1]; got {max_bad_fraction}")
    if parallelism is not None and parallelism < 1:
        raise IngestError(f"--parallelism must be >= 1; got {parallelism}")
    if max_rows_per_shard < 1:
        raise IngestError(f"--max-rows-per-shard must be >= 1; got {max_rows_per_shard}")


def declared_format(
    listing: Listing, channels: int | None, size: int | None, max_pixels: int = MAX_PIXELS
) -> tuple[int | None, int | None]:
    """Channels and resolution: given, or fixed by the source, or by the first listed image that decodes (read
    on the driver, so the choice does not depend on which task runs first)."""
    if listing.points:
        return None, None
    if listing.element_shape is not None:  # array sources: the array says
        shape = listing.element_shape
        channels = channels or (1 if len(shape) == 2 or shape[2] <= 2 else 3)
        return channels, size or shape[0]
    if channels is not None and size is not None:
        return channels, size
    for i, record in enumerate(read_part(listing.parts[0])):
        if i >= 100:
            break
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                im = open_image(record.encoded, max_pixels) if record.error is None and record.encoded else None
        except ValueError:
            continue
        if im is not None:
            return channels or (1 if im.mode in GREY_MODES else 3), size or max(im.size)
    raise IngestError(
        f"{listing.spec}: none of the first 100 listed images could be decoded; pass --channels and "
        "--resolution, or check the source"
    )


def _check_task_memory(s: Settings, listing: Listing, resolution: int | None) -> None:
    """Refuse, before Ray starts, a row format one ingest task could not hold in this machine's memory (each task
    declares its estimate to Ray, so that the scheduler, not the out-of-memory killer, bounds how many run)."""
    import psutil

    need, total = s.task_memory(listing.encoded), psutil.virtual_memory().total
    if need > total:
        raise IngestError(
            f"--resolution {resolution}: one ingest task would hold about {gib(need)} (row groups of "
            f"{s.group_rows} row(s) of {resolution}x{resolution}x{s.channels} = {gib(s.row_bytes)} each, twice "
            f"while written"
            + (f", one decoded image of up to --max-pixels {s.max_pixels:,}" if listing.encoded else "")
            + f", and the worker), more than this machine's {gib(total)} of memory; "
            "lower --resolution"
        )


def _run_parts(listing: Listing, s: Settings, parallelism: int | None) -> list[dict]:
    import ray

    started = not ray.is_initialized()
    init_ray()
    try:
        return _stream_parts(listing, s, parallelism)
    finally:
        if started:  # leave Ray as it was found: a job that ingests first starts its own stages afresh
            ray.shutdown()


def _stream_parts(listing: Listing, s: Settings, parallelism: int | None) -> list[dict]:
    import ray.data

    need = s.task_memory(listing.encoded)
    offered = max((n["Resources"].get("memory", 0) for n in ray.nodes() if n["Alive"]), default=0)
    if need > offered:  # a task Ray could never place would wait forever
        raise IngestError(
            f"one ingest task declares {gib(need)} of memory, but the largest node of this Ray offers "
            f"{gib(offered)}; lower --max-pixels or --resolution, or add memory"
        )
    stage(
        f"ingest {listing.spec}: {listing.rows} rows listed in {len(listing.parts)} part(s)"
        + (f", at most {parallelism} at once" if parallelism else "")
    )
    items = [{"part": json.dumps(asdict(p))} for p in listing.parts]
    listed = ray.data.from_items(items, override_num_blocks=len(items))
    # one task per part: the cluster's CPUs (or `parallelism`) bound how many run at once, a part bounds memory
    # (Ray's stubs type a batch function of one argument: fn_kwargs gives ingest_batch its settings)
    ds = listed.map_batches(
        ingest_batch,  # type: ignore[arg-type]
        fn_kwargs={"settings": s},
        batch_size=1,
        batch_format="numpy",
        num_cpus=1,
        memory=need,
        compute=ray.data.TaskPoolStrategy(size=parallelism),
    )
    progress = Progress(f"ingest {listing.spec}", listing.rows, "rows")
    summaries = []
    for row in ds.iter_rows():
        summaries.append(json.loads(row["summary"]))
        progress.update(summaries[-1]["rows"])
    return sorted(summaries, key=lambda d: d["part"])


def _manifest(listing: Listing, s: Settings, summaries: list[dict], max_bad_fraction: float) -> dict:
    total = sum(d["rows"] for d in summaries)
    quarantine = [q for d in summaries for q in d["quarantine"]]
    bad = len(quarantine) / total if total else 1.0
    if bad > max_bad_fraction:
        first = "; ".join(f"{q['id']}: {q['reason']}" for q in quarantine[:5])
        raise IngestError(
            f"{len(quarantine)} of {total} rows ({bad:.1%}) could not be used, above "
            f"max_bad_fraction={max_bad_fraction:.1%}. First: {first}"
        )
    shapes = {tuple(d["shape"]) for d in summaries if d["shape"]}
    if len(shapes) > 1:  # only points can differ (images are all made the declared size)
        raise IngestError(f"{listing.spec}: rows of different shapes {sorted(shapes)}")
    shape = next(iter(shapes), None)
    shape_out = list(shape) if shape else ([2] if s.points else list(s.image_shape))
    conversions: Counter[str] = Counter()
    for d in summaries:
        conversions.update(d["conversions"])
    splits = {}
    for split in ("train", "test"):
        files = [d["shards"][split] for d in summaries if d["shards"].get(split)]
        if not files:  # an empty split still gets a (schema-only) shard: readers need not special-case it
            files = [_empty_shard(s, split, row_format("points" if s.points else "image", shape_out))]
        splits[split] = {"count": sum(f["rows"] for f in files), "shards": files}
    max_label = max(d["max_label"] for d in summaries)
    return {
        "format": 1,
        "source": listing.spec,
        "kind": "points" if s.points else "image",
        **row_format("points" if s.points else "image", shape_out),
        "labelled": listing.labelled,
        "num_classes": (listing.num_classes or len(listing.class_names) or max_label + 1) if listing.labelled else 0,
        "class_names": listing.class_names,
        **({"manifold": listing.manifold} if listing.manifold else {}),
        **({"times": listing.times} if listing.times else {}),
        **({"pairs": listing.pairs} if listing.pairs else {}),
        "seed": s.seed,
        "test_fraction": s.test_fraction,
        "split_rule": "the source's own"
        if any(r.args.get("split") for r in listing.parts)
        else "sha256(seed/id) < test_fraction",
        "transform": s.transform,
        "resized": sum(d["resized"] for d in summaries),
        "conversions": dict(sorted(conversions.items())),
        "max_bad_fraction": max_bad_fraction,
        "rows_read": total,
        "quarantined": len(quarantine),
        "quarantine": quarantine,
        "ignored": listing.ignored,  # entries that are not rows (files not named as images, folder links)
        "splits": splits,
    }


def _empty_shard(s: Settings, split: str, fmt: dict) -> dict:
    name = f"{split}-00000-of-00001.parquet"
    path = storage.join(s.staging, name)
    with storage.parquet_writer(path, shard_schema(fmt, split)) as writer:
        writer.write_table(shard_schema(fmt, split).empty_table())
    return {"file": s.file_prefix + name, "rows": 0, "sha256": sha256(path)}


def _publish(out: Path, staging: Path, manifest: dict) -> None:
    """Move the new shards into `out` and write the manifest last (atomically); shards of an earlier ingest into
    the same folder that the new manifest does not list are removed."""
    old = []
    if (out / MANIFEST).exists():
        try:
            old = [
                s["file"]
                for split in json.loads((out / MANIFEST).read_text())["splits"].values()
                for s in split["shards"]
            ]
        except (json.JSONDecodeError, KeyError, TypeError):
            old = []
    new = {s["file"] for split in manifest["splits"].values() for s in split["shards"]}
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            os.replace(staging / shard["file"], out / shard["file"])
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    for name in old:
        if name not in new and "/" not in name:
            (out / name).unlink(missing_ok=True)


def load_manifest(directory: str | Path, verify: bool = False) -> Manifest:
    """The typed manifest of an ingest output (see `pipelines.core.manifest`); with verify, checks every checksum."""
    return Manifest.load(directory, verify)


def shard_paths(directory: str | Path, split: str) -> list[str]:
    """Absolute paths of a split's shards, from the manifest."""
    return Manifest.load(directory).shard_paths(split)
