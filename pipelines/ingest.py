"""Ingest an image source into sharded parquet: raw uint8 HWC bytes per row, a label and a stable id.

Sources (SPEC): digits | fashion-mnist[:DIR] | idx:DIR | folder:DIR | parquet:GLOB | npz:FILE | toy2d:NAME.
Rows that cannot be used are quarantined with their reason and listed in manifest.json; the job fails when
their fraction exceeds `max_bad_fraction`. Nothing is dropped silently.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipelines.config import ConfigError, check_writable_dir
from pipelines.manifest import MANIFEST, Manifest, sha256

SCHEMA = pa.schema([("id", pa.string()), ("label", pa.int64()), ("image", pa.binary())])
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
SOURCE_KINDS = ("digits", "fashion-mnist", "idx", "folder", "parquet", "npz", "toy2d")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


class IngestError(ConfigError):
    """Bad source or too many unusable rows."""


@dataclass
class Record:
    """One source row before validation: a decoded array, or raw encoded bytes, or an error already found."""

    id: str
    label: int
    array: np.ndarray | None = None
    encoded: bytes | None = None
    error: str | None = None
    split: str | None = None  # a split fixed by the source (fashion-mnist's train/test files)


@dataclass
class Source:
    kind: str
    arg: str | None
    class_names: list[str] = field(default_factory=list)


def parse_source(spec: str) -> Source:
    """Parse SPEC into (kind, argument); raise IngestError naming what is allowed."""
    kind, _, arg = spec.partition(":")
    if kind not in SOURCE_KINDS:
        raise IngestError(f"unknown source {spec!r}; allowed: digits, fashion-mnist[:DIR], idx:DIR, folder:DIR, "
                          "parquet:GLOB, npz:FILE, toy2d:NAME")
    if kind in ("idx", "folder", "parquet", "npz", "toy2d") and not arg:
        raise IngestError(f"source {kind!r} needs an argument: {kind}:{'NAME' if kind == 'toy2d' else 'PATH'}")
    return Source(kind, arg or None)


# --- readers -------------------------------------------------------------------------------------------------


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise IngestError(f"{path}: not an IDX file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise IngestError(f"{path}: unknown IDX element type 0x{data[2]:02x}")
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=dtypes[data[2]], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise IngestError(f"{path}: IDX header says {dims} ({int(np.prod(dims))} values) but holds {arr.size}")
    return arr.reshape(dims)


def _find_idx(directory: Path, prefix: str) -> tuple[Path, Path] | None:
    for images in sorted(directory.glob(f"{prefix}-images-idx3-ubyte*")):
        labels = directory / images.name.replace("images-idx3", "labels-idx1")
        if labels.exists():
            return images, labels
    return None


def _idx_records(directory: Path, fixed_splits: bool) -> Iterator[Record]:
    if not directory.is_dir():
        raise IngestError(f"IDX directory {directory} does not exist")
    found = False
    for prefix, split in (("train", "train"), ("t10k", "test")):
        pair = _find_idx(directory, prefix)
        if pair is None:
            continue
        found = True
        images, labels = _read_idx(pair[0]), _read_idx(pair[1])
        if images.shape[0] != labels.shape[0]:
            raise IngestError(f"{pair[0]} holds {images.shape[0]} images but {pair[1]} {labels.shape[0]} labels")
        for i in range(images.shape[0]):
            yield Record(f"{prefix}-{i}", int(labels[i]), array=images[i], split=split if fixed_splits else None)
    if not found:
        raise IngestError(f"no IDX pair (train-images-idx3-ubyte[.gz] + train-labels-idx1-ubyte[.gz], or t10k-*) "
                          f"in {directory}")


def _folder_records(directory: Path) -> tuple[Iterator[Record], list[str]]:
    if not directory.is_dir():
        raise IngestError(f"image folder {directory} does not exist")
    classes = sorted(p.name for p in directory.iterdir() if p.is_dir())
    if not classes:
        raise IngestError(f"image folder {directory} has no class subfolders (expected DIR/<class>/<image>)")

    def gen() -> Iterator[Record]:
        for label, name in enumerate(classes):
            for path in sorted((directory / name).rglob("*")):
                if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
                    yield Record(str(path.relative_to(directory)), label, encoded=path.read_bytes())

    return gen(), classes


def _parquet_records(pattern: str) -> Iterator[Record]:
    files = sorted(glob.glob(pattern))
    if not files:
        raise IngestError(f"no parquet files match {pattern!r}")
    for file in files:
        pf = pq.ParquetFile(file)
        names = pf.schema_arrow.names
        if "img" not in names and "image" not in names:
            raise IngestError(f"{file}: expected an 'img' (or 'image') column of struct{{bytes, path}}; "
                              f"columns are {names}")
        col = "img" if "img" in names else "image"
        if "label" in names and not pa.types.is_integer(pf.schema_arrow.field("label").type):
            raise IngestError(f"{file}: column 'label' holds {pf.schema_arrow.field('label').type}; labels must be "
                              "integer class indices (map class names to 0..K-1 first)")
        base = Path(file).parent
        row = 0
        for batch in pf.iter_batches(batch_size=1024):
            d = batch.to_pydict()
            labels = d.get("label", [0] * batch.num_rows)
            for img, label in zip(d[col], labels, strict=True):
                rid = f"{Path(file).name}:{row}"
                row += 1
                if not isinstance(img, dict):
                    yield Record(rid, -1, error=f"column {col!r} is not a struct of {{bytes, path}}")
                elif img.get("bytes") is not None:
                    yield Record(rid, int(label), encoded=img["bytes"])
                elif img.get("path"):
                    path = Path(img["path"]) if os.path.isabs(img["path"]) else base / img["path"]
                    if path.exists():
                        yield Record(rid, int(label), encoded=path.read_bytes())
                    else:
                        yield Record(rid, int(label), error=f"image bytes are null and path {str(path)!r} is missing")
                else:
                    yield Record(rid, int(label), error="image has neither bytes nor path")


def _npz_records(file: Path) -> Iterator[Record]:
    if not file.exists():
        raise IngestError(f"npz file {file} does not exist")
    with np.load(file) as z:
        keys = list(z.keys())
        xk = next((k for k in ("images", "x", "X", "arr_0") if k in keys), None)
        if xk is None:
            raise IngestError(f"{file}: no image array; expected a key 'images' or 'x' (keys are {keys})")
        images = z[xk]
        if images.ndim not in (3, 4):
            raise IngestError(f"{file}: array {xk!r} has shape {list(images.shape)}; images must be [N, H, W] or "
                              "[N, H, W, C] (flat rows cannot be reshaped without knowing H and W)")
        yk = next((k for k in ("labels", "y", "Y") if k in keys), None)
        labels = z[yk] if yk else np.zeros(len(images), dtype=np.int64)
    if len(labels) != len(images):
        raise IngestError(f"{file}: {len(images)} images but {len(labels)} labels")
    for i in range(len(images)):
        yield Record(f"{file.name}:{i}", int(labels[i]), array=images[i])


def _digits_records() -> Iterator[Record]:
    from sklearn.datasets import load_digits

    d = load_digits()
    # values are 0..16; map to the full 8-bit range
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    for i in range(len(images)):
        yield Record(f"digits-{i}", int(d.target[i]), array=images[i])


def read_source(src: Source) -> tuple[Iterator[Record], list[str]]:
    """Records of a source and its class names."""
    if src.kind == "digits":
        return _digits_records(), [str(i) for i in range(10)]
    if src.kind == "fashion-mnist":
        return _idx_records(Path(src.arg or FASHION_MNIST_DIR), fixed_splits=True), FASHION_MNIST_CLASSES
    if src.kind == "idx":
        return _idx_records(Path(src.arg), fixed_splits=False), []
    if src.kind == "folder":
        return _folder_records(Path(src.arg))
    if src.kind == "parquet":
        return _parquet_records(src.arg), []
    if src.kind == "npz":
        return _npz_records(Path(src.arg)), []
    from fm.data import TOY_SETS, sample_toy

    if src.arg not in TOY_SETS:
        raise IngestError(f"unknown toy2d set {src.arg!r}; allowed: {', '.join(TOY_SETS)}")
    import torch

    points = sample_toy(src.arg, 20_000, torch.Generator().manual_seed(0)).numpy()
    return (Record(f"{src.arg}-{i}", 0, array=points[i]) for i in range(len(points))), []


# --- validation ----------------------------------------------------------------------------------------------


def to_channels(array: np.ndarray, channels: int) -> np.ndarray:
    """Convert an HW / HWC uint8 array to HW x channels: gray is replicated, RGBA loses alpha, RGB -> gray by
    ITU-R 601 luma (PIL's rule). Raises ValueError for other channel counts."""
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise ValueError(f"expected an HW or HWC image, got shape {array.shape}")
    have = array.shape[2]
    if have == channels:
        return array
    if have == 4:
        array, have = array[:, :, :3], 3
        if channels == 3:
            return array
    if have == 1 and channels == 3:
        return np.repeat(array, 3, axis=2)
    if have == 3 and channels == 1:
        luma = array[:, :, 0] * 0.299 + array[:, :, 1] * 0.587 + array[:, :, 2] * 0.114
        return np.round(luma).astype(np.uint8)[:, :, None]
    raise ValueError(f"{have} channels cannot be converted to {channels}")


def decode(record: Record) -> np.ndarray:
    """The record's image as a uint8 array (HW or HWC); raises ValueError when it cannot be decoded."""
    if record.array is not None:
        return record.array
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(record.encoded)) as im:
            im.load()
            mode = im.mode
            if mode in ("P", "PA"):
                im = im.convert("RGBA" if "transparency" in im.info or mode == "PA" else "RGB")
            elif mode in ("I;16", "I", "F", "1", "LA"):
                im = im.convert("L" if mode != "LA" else "RGBA")
            return np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"undecodable image bytes ({type(err).__name__}: {err})") from None


@dataclass
class IngestResult:
    out: Path
    manifest: dict


def ingest(spec: str, out: str | Path, shards: int = 4, test_fraction: float = 0.1, seed: int = 0,
           channels: int | None = None, image_size: int | None = None, max_bad_fraction: float = 0.01,
           ) -> IngestResult:
    """Read a source, validate every row, split deterministically and write parquet shards and manifest.json.

    Args:
        spec: the source (see module doc). out: output directory. shards: shards per split (train; test gets
            at least 1). test_fraction: held-out fraction when the source has no split of its own. seed: split
            seed. channels: declared channels (1 or 3; default: the source's). image_size: declared H = W
            (default: that of the first decodable image). max_bad_fraction: quarantined fraction that fails.
    """
    if shards < 1:
        raise IngestError(f"--shards must be >= 1; got {shards}")
    if not 0 <= test_fraction < 1:
        raise IngestError(f"--test-fraction must be in [0, 1); got {test_fraction}")
    if channels not in (None, 1, 3):
        raise IngestError(f"--channels must be 1 or 3; got {channels}")
    src = parse_source(spec)
    check_writable_dir(out, "--out")
    records, class_names = read_source(src)
    is_points = src.kind == "toy2d"
    if channels is None and src.kind in ("digits", "fashion-mnist", "idx", "toy2d"):
        channels = 1
    kept: list[tuple[str, int, bytes, str | None]] = []
    quarantine: list[dict] = []
    shape: tuple[int, ...] | None = None
    total = 0
    for rec in tqdm(records, desc=f"ingest {spec}", unit=" rows", mininterval=5, leave=False, disable=None):
        total += 1
        try:
            if rec.error:
                raise ValueError(rec.error)
            if is_points:
                arr = np.asarray(rec.array, dtype=np.float32)
            else:
                arr = decode(rec)
                if arr.dtype != np.uint8:
                    raise ValueError(f"pixel dtype {arr.dtype} is not uint8")
                if channels is None:  # first decodable image of an RGB-ish source fixes the declared channels
                    channels = 1 if arr.ndim == 2 or arr.shape[2] == 1 else 3
                hw = arr.shape[:2]
                size = image_size or (shape[0] if shape else None)
                if size is not None and hw != (size, size):
                    raise ValueError(f"wrong size {hw[0]}x{hw[1]}, expected {size}x{size}")
                if hw[0] != hw[1]:
                    raise ValueError(f"image is not square: {hw[0]}x{hw[1]}")
                try:
                    arr = np.ascontiguousarray(to_channels(arr, channels))
                except ValueError as err:
                    raise ValueError(f"wrong channel count: {err}") from None
            if shape is None:
                shape = tuple(arr.shape)
            kept.append((rec.id, rec.label, arr.tobytes(), rec.split))
        except ValueError as err:
            quarantine.append({"id": rec.id, "reason": str(err)})
    if total == 0:
        raise IngestError(f"source {spec!r} holds no rows")
    bad = len(quarantine) / total
    if bad > max_bad_fraction:
        first = "; ".join(f"{q['id']}: {q['reason']}" for q in quarantine[:5])
        raise IngestError(f"{len(quarantine)} of {total} rows ({bad:.1%}) could not be used, above "
                          f"max_bad_fraction={max_bad_fraction:.1%}. First: {first}")
    splits = _split(kept, test_fraction, seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format": 1,
        "source": spec,
        "kind": "points" if is_points else "image",
        "shape": list(shape),
        "layout": "D" if is_points else "HWC",
        "dtype": "float32" if is_points else "uint8",
        "num_classes": len(class_names) or (max(r[1] for r in kept) + 1 if kept else 0),
        "class_names": class_names,
        "seed": seed,
        "test_fraction": test_fraction,
        "rows_read": total,
        "quarantined": len(quarantine),
        "quarantine": quarantine,
        "splits": {},
    }
    for split, rows in splits.items():
        n_shards = shards if split == "train" else max(1, min(shards, len(rows) // 1000 or 1))
        manifest["splits"][split] = {"count": len(rows), "shards": _write_shards(rows, out, split, n_shards)}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return IngestResult(out, manifest)


def _split(rows: list[tuple], test_fraction: float, seed: int) -> dict[str, list[tuple]]:
    """The source's own split where it has one, else a seeded permutation (stable for a given source order)."""
    if rows and all(r[3] is not None for r in rows):
        return {s: [r for r in rows if r[3] == s] for s in ("train", "test")}
    perm = np.random.default_rng(seed).permutation(len(rows))
    n_test = int(round(test_fraction * len(rows)))
    test = sorted(perm[:n_test].tolist())
    train = sorted(perm[n_test:].tolist())
    return {"train": [rows[i] for i in train], "test": [rows[i] for i in test]}


def _write_shards(rows: list[tuple], out: Path, split: str, n: int) -> list[dict]:
    shards = []
    for k in range(n):
        part = rows[k::n]
        name = f"{split}-{k:05d}-of-{n:05d}.parquet"
        table = pa.table({"id": [r[0] for r in part], "label": [r[1] for r in part], "image": [r[2] for r in part]},
                         schema=SCHEMA)
        tmp = out / f".{name}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, out / name)  # atomic: a half-written shard never carries the final name
        shards.append({"file": name, "rows": len(part), "sha256": sha256(out / name)})
    return shards


def load_manifest(directory: str | Path, verify: bool = False) -> Manifest:
    """The typed manifest of an ingest output (see `pipelines.manifest`); with verify, checks every checksum."""
    return Manifest.load(directory, verify)


def shard_paths(directory: str | Path, split: str) -> list[str]:
    """Absolute paths of a split's shards, from the manifest."""
    return Manifest.load(directory).shard_paths(split)
