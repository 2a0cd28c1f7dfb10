"""Ingest sources: parse a SPEC, check on the driver what can be checked there, and list the work as parts.

SPEC: digits | fashion-mnist[:DIR] | idx:DIR | folder:DIR | parquet:GLOB | npz:FILE | toy2d:NAME | imagenet:DIR |
tar:GLOB | manifold:NAME | snapshots:NAME | samples:DIR (a sampling output as reflow's (x_0, x_1) pairs).

A `Part` is a small JSON-able description of some rows (a row range of an array file, a list of image files, some
parquet row groups, one tar archive) that a Ray task reads alone with `read_part`, in bounded memory. The listing
is a function of the source alone, never of the parallelism, so the same source gives the same parts, rows and
ids on 1 or 100 CPUs.
"""

from __future__ import annotations

import errno
import glob
import gzip
import hashlib
import os
import re
import stat
import struct
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fm.methods import METHODS
from fm.seeding import SEEDING_VERSION, derive_seed
from pipelines.core import storage
from pipelines.core.checkpoint import load_meta
from pipelines.core.errors import ConfigError
from pipelines.core.samples import sample_shards, sampling_settings

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
FOLDER_LINK = "symbolic link to a folder (not followed: it could loop)"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
READ_ROWS = 1024  # rows an array reader holds at once
TOY_ROWS = 20_000
SNAPSHOT_ROWS = 4_000  # per observed time


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
    split: str | None = None  # a split fixed by the source (fashion-mnist's and ImageNet's train/test files)


@dataclass(frozen=True)
class Part:
    """Rows one task reads: `source` names the entry of `SOURCES` whose reader reads it, `args` are the reader's
    JSON-able arguments."""

    index: int
    source: str
    args: dict
    rows: int  # rows listed (images, before validation)


@dataclass
class Listing:
    """A source's parts and what the driver learnt about it without reading the rows."""

    spec: str
    kind: str
    parts: list[Part]
    class_names: list[str] = field(default_factory=list)
    num_classes: int | None = None  # when known without the rows (ImageNet: 1000)
    element_shape: tuple[int, ...] | None = None  # of array sources: [H, W] or [H, W, C] or [D] for points
    encoded: bool = False  # rows are encoded image files, decoded by PIL
    points: bool = False
    labelled: bool = True  # False: the source has no labels (every row gets label 0)
    manifold: str | None = None  # points on this manifold (`fm.manifolds.get_manifold`); rows off it are quarantined
    times: list[float] | None = None  # snapshots: observation times, a row's label its snapshot index
    pairs: dict | None = None  # a sampling output: what made the pairs (`DataSpec.pairs`)
    ignored: list[dict] = field(default_factory=list)  # entries that are not rows: {"id", "reason"} (folders)

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts)


@dataclass(frozen=True)
class ListRequest:
    """What a lister is asked: the SPEC, its kind and argument, and how to cut it into parts."""

    spec: str
    kind: str
    arg: str | None
    min_parts: int  # at least this many parts where the source has the rows
    max_rows: int  # at most this many rows per part


@dataclass(frozen=True)
class Source:
    """One kind of source: how the driver lists it (checks what it can and cuts the rows into parts) and how a Ray
    task reads one part, in bounded memory and a fixed order."""

    list: Callable[[ListRequest], Listing]
    read: Callable[..., Iterator[Record]]
    argument: str | None  # what follows "KIND:" (DIR, GLOB, FILE, NAME); None: no argument
    optional: bool = False  # the argument may be left out (fashion-mnist: Debian's folder)

    def usage(self, kind: str) -> str:
        if self.argument is None:
            return kind
        return f"{kind}[:{self.argument}]" if self.optional else f"{kind}:{self.argument}"


def parse_source(spec: str) -> tuple[str, str | None]:
    """SPEC -> (kind, argument); raises IngestError naming what is allowed."""
    kind, _, arg = spec.partition(":")
    if kind not in SOURCES:
        raise IngestError(f"unknown source {spec!r}; allowed: {', '.join(s.usage(k) for k, s in SOURCES.items())}")
    source = SOURCES[kind]
    if source.argument is not None and not source.optional and not arg:
        raise IngestError(f"source {kind!r} needs an argument: {source.usage(kind)}")
    return kind, arg or None


def stable_hash(text: str) -> float:
    """A uniform number in [0, 1) from a string, the same on every machine and Python process."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def _ranges(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges covering n rows in `parts` near-equal pieces (none empty)."""
    parts = max(1, min(parts, n))
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _count(total: int, min_parts: int, max_rows: int) -> int:
    return max(min_parts, -(-total // max_rows))


def list_source(spec: str, min_parts: int = 4, max_rows_per_part: int = 20_000) -> Listing:
    """Check a source from the driver and split it into parts of at most `max_rows_per_part` rows (and at least
    `min_parts` parts where it has the rows). Raises IngestError for a source that cannot be read at all."""
    kind, arg = parse_source(spec)
    listing = SOURCES[kind].list(ListRequest(spec, kind, arg, min_parts, max_rows_per_part))
    if listing.rows == 0:
        raise IngestError(f"source {spec!r} holds no rows")
    # number the parts in listing order: file names and manifest order follow it
    listing.parts = [Part(i, p.source, p.args, p.rows) for i, p in enumerate(listing.parts)]
    return listing


def read_part(part: Part) -> Iterator[Record]:
    """The records of one part, in a fixed order (runs in a Ray task)."""
    return SOURCES[part.source].read(**part.args)


# --- scikit-learn digits and 2-D toy sets --------------------------------------------------------------------


def _list_digits(req: ListRequest) -> Listing:
    n = 1797
    parts = [Part(0, "digits", {"start": a, "stop": b}, b - a)
             for a, b in _ranges(n, _count(n, req.min_parts, req.max_rows))]
    return Listing(req.spec, req.kind, parts, [str(i) for i in range(10)], element_shape=(8, 8))


def _read_digits(start: int, stop: int) -> Iterator[Record]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # values are 0..16: map to the 8-bit range
    for i in range(start, stop):
        yield Record(f"digits-{i}", int(d.target[i]), array=images[i])


def _list_toy(req: ListRequest) -> Listing:
    from fm.data import TOY_SETS

    if req.arg not in TOY_SETS:
        raise IngestError(f"unknown toy2d set {req.arg!r}; allowed: {', '.join(TOY_SETS)}")
    parts = [Part(0, "toy2d", {"name": req.arg, "start": a, "stop": b}, b - a)
             for a, b in _ranges(TOY_ROWS, _count(TOY_ROWS, req.min_parts, req.max_rows))]
    return Listing(req.spec, req.kind, parts, element_shape=(2,), points=True)


def _read_toy(name: str, start: int, stop: int) -> Iterator[Record]:
    import torch

    from fm.data import sample_toy

    points = sample_toy(name, TOY_ROWS, torch.Generator().manual_seed(0)).numpy()  # 20k points: cheap to redraw
    for i in range(start, stop):
        yield Record(f"{name}-{i}", 0, array=points[i])


def _list_manifold(req: ListRequest) -> Listing:
    from fm.manifold_data import MANIFOLD_SETS, manifold_of

    if req.arg not in MANIFOLD_SETS:
        raise IngestError(f"unknown manifold set {req.arg!r}; allowed: {', '.join(MANIFOLD_SETS)}")
    parts = [Part(0, "manifold", {"name": req.arg, "start": a, "stop": b}, b - a)
             for a, b in _ranges(TOY_ROWS, _count(TOY_ROWS, req.min_parts, req.max_rows))]
    return Listing(req.spec, req.kind, parts, element_shape=(manifold_of(req.arg).ambient_dim,), points=True,
                   manifold=MANIFOLD_SETS[req.arg])


def _read_manifold(name: str, start: int, stop: int) -> Iterator[Record]:
    import torch

    from fm.manifold_data import sample_manifold_set

    points = sample_manifold_set(name, TOY_ROWS, torch.Generator().manual_seed(0)).numpy()
    for i in range(start, stop):
        yield Record(f"{name}-{i}", 0, array=points[i])


def _list_snapshots(req: ListRequest) -> Listing:
    from fm.dynamics import DYNAMICS, OBSERVED_TIMES

    if req.arg not in DYNAMICS:
        raise IngestError(f"unknown dynamics {req.arg!r}; allowed: {', '.join(DYNAMICS)}")
    n = SNAPSHOT_ROWS * len(OBSERVED_TIMES)
    parts = [Part(0, "snapshots", {"name": req.arg, "start": a, "stop": b}, b - a)
             for a, b in _ranges(n, _count(n, req.min_parts, req.max_rows))]
    return Listing(req.spec, req.kind, parts, [f"t={t}" for t in OBSERVED_TIMES],
                   element_shape=(DYNAMICS[req.arg].dim,), points=True, times=list(OBSERVED_TIMES))


def _read_snapshots(name: str, start: int, stop: int) -> Iterator[Record]:
    import torch

    from fm.dynamics import snapshots

    x, _ = snapshots(name, SNAPSHOT_ROWS, generator=torch.Generator().manual_seed(0))
    times = len(x) // SNAPSHOT_ROWS
    # rows interleave the observed times (t_0, t_1, ..., t_K, t_0, ...): the training stream reads rows in order, and
    # every batch needs rows of consecutive times to pair
    for i in range(start, stop):
        k, j = i % times, i // times
        yield Record(f"{name}-t{k}-{j}", k, array=x[k * SNAPSHOT_ROWS + j].numpy())


# --- IDX (MNIST, Fashion-MNIST) ------------------------------------------------------------------------------

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _idx_header(path: Path) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, dims, data offset) of an IDX file, checked against the file's (uncompressed) length."""
    with _open(path) as f:
        head = f.read(4)
        if len(head) < 4 or head[0] != 0 or head[1] != 0:
            raise IngestError(f"{path}: not an IDX file (bad magic number)")
        if head[2] not in IDX_DTYPES:
            raise IngestError(f"{path}: unknown IDX element type 0x{head[2]:02x}")
        dims = struct.unpack(">" + "I" * head[3], f.read(4 * head[3]))
    dtype = np.dtype(IDX_DTYPES[head[2]])
    offset = 4 + 4 * len(dims)
    expected = offset + int(np.prod(dims)) * dtype.itemsize
    if path.suffix == ".gz":  # a gzip member ends with its uncompressed length mod 2^32: no need to inflate it
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            length = struct.unpack("<I", f.read(4))[0]
        if length != expected % 2**32:
            raise IngestError(f"{path}: IDX header says {dims} ({expected} bytes) but the file holds {length} bytes "
                              "(truncated or damaged)")
    elif path.stat().st_size != expected:
        raise IngestError(f"{path}: IDX header says {dims} ({expected} bytes) but the file holds "
                          f"{path.stat().st_size} bytes (truncated or damaged)")
    return dtype, dims, offset


def _find_idx(directory: Path, prefix: str) -> tuple[Path, Path] | None:
    for images in sorted(directory.glob(f"{prefix}-images-idx3-ubyte*")):
        labels = directory / images.name.replace("images-idx3", "labels-idx1")
        if labels.exists():
            return images, labels
    return None


def _list_idx(req: ListRequest) -> Listing:
    directory = Path(req.arg or FASHION_MNIST_DIR)
    if not directory.is_dir():
        raise IngestError(f"IDX directory {directory} does not exist")
    pairs = [(prefix, split, _find_idx(directory, prefix)) for prefix, split in (("train", "train"), ("t10k", "test"))]
    pairs = [(prefix, split, pair) for prefix, split, pair in pairs if pair]
    if not pairs:
        raise IngestError(f"no IDX pair (train-images-idx3-ubyte[.gz] + train-labels-idx1-ubyte[.gz], or t10k-*) "
                          f"in {directory}")
    dims = {}
    for _, _, (images, labels) in pairs:
        dims[images] = _idx_header(images)[1]
        n_labels = _idx_header(labels)[1][0]
        if dims[images][0] != n_labels:
            raise IngestError(f"{images} holds {dims[images][0]} images but {labels} {n_labels} labels")
    total = sum(d[0] for d in dims.values())
    parts = []
    for prefix, split, (images, labels) in pairs:
        n = dims[images][0]
        for a, b in _ranges(n, round(_count(total, req.min_parts, req.max_rows) * n / total) or 1):
            split_of = split if req.kind == "fashion-mnist" else None
            parts.append(Part(0, "idx", {"images": str(images), "labels": str(labels), "prefix": prefix,
                                         "split": split_of, "start": a, "stop": b}, b - a))
    names = FASHION_MNIST_CLASSES if req.kind == "fashion-mnist" else []
    return Listing(req.spec, req.kind, parts, names, element_shape=tuple(dims[pairs[0][2][0]][1:]))


def _idx_rows(path: Path, start: int, stop: int) -> np.ndarray:
    dtype, dims, offset = _idx_header(path)
    row = int(np.prod(dims[1:], dtype=np.int64)) * dtype.itemsize
    with _open(path) as f:
        f.seek(offset + start * row)  # a gzip stream inflates up to here: bounded memory, not bounded time
        data = f.read((stop - start) * row)
    return np.frombuffer(data, dtype=dtype).reshape(-1, *dims[1:])


def _read_idx(images: str, labels: str, prefix: str, split: str | None, start: int, stop: int) -> Iterator[Record]:
    x, y = _idx_rows(Path(images), start, stop), _idx_rows(Path(labels), start, stop)
    for i in range(stop - start):
        yield Record(f"{prefix}-{start + i}", int(y[i]), array=x[i], split=split)


# --- numpy arrays (npz, downsampled ImageNet) ----------------------------------------------------------------


def _npz_members(file: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every array in an .npz, from the headers alone."""
    try:
        with zipfile.ZipFile(file) as z:
            out = {}
            for name in z.namelist():
                if name.endswith(".npy"):
                    with z.open(name) as f:
                        shape, _, dtype = _npy_header(f)
                    out[name[:-4]] = (tuple(shape), np.dtype(dtype))
            return out
    except zipfile.BadZipFile:
        raise IngestError(f"{file}: not a numpy .npz archive (a zip of .npy arrays)") from None


def _npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of an .npy stream, leaving it at the first data byte."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def _npy_rows(file: str, key: str, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of array `key` of an .npz without loading the rest (the member is read as a stream)."""
    with zipfile.ZipFile(file) as z, z.open(f"{key}.npy") as f:
        shape, fortran, dtype = _npy_header(f)
        if fortran:
            raise IngestError(f"{file}: array {key!r} is stored in Fortran order; save it C-contiguous")
        dtype = np.dtype(dtype)
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        f.seek(f.tell() + start * row)
        data = f.read((stop - start) * row)
    return np.frombuffer(data, dtype=dtype).reshape(-1, *shape[1:])


def _list_npz(req: ListRequest) -> Listing:
    file = Path(req.arg)
    if not file.exists():
        raise IngestError(f"npz file {file} does not exist")
    members = _npz_members(file)
    xk = next((k for k in ("images", "points", "x", "X", "arr_0") if k in members), None)
    if xk is None:
        raise IngestError(f"{file}: no image array; expected a key 'images', 'points' or 'x' (keys are "
                          f"{list(members)})")
    shape, _ = members[xk]
    if len(shape) not in (2, 3, 4) or (len(shape) == 2 and xk == "images"):
        raise IngestError(f"{file}: array {xk!r} has shape {list(shape)}; images must be [N, H, W] or "
                          "[N, H, W, C] (flat rows cannot be reshaped without knowing H and W); point rows [N, D] "
                          "go under the key 'points' or 'x'")
    yk = next((k for k in ("labels", "y", "Y") if k in members), None)
    if yk and members[yk][0][:1] != shape[:1]:
        raise IngestError(f"{file}: {shape[0]} images but {members[yk][0][0] if members[yk][0] else 0} labels")
    parts = [Part(0, "npz", {"file": str(file), "images": xk, "labels": yk, "start": a, "stop": b}, b - a)
             for a, b in _ranges(shape[0], _count(shape[0], req.min_parts, req.max_rows))]
    return Listing(req.spec, req.kind, parts, element_shape=tuple(shape[1:]), labelled=yk is not None,
                   points=len(shape) == 2)


def _read_npz(file: str, images: str, labels: str | None, start: int, stop: int) -> Iterator[Record]:
    name = Path(file).name
    for a in range(start, stop, READ_ROWS):
        b = min(stop, a + READ_ROWS)
        x = _npy_rows(file, images, a, b)
        y = _npy_rows(file, labels, a, b) if labels else np.zeros(b - a, np.int64)
        for i in range(b - a):
            yield Record(f"{name}:{a + i}", int(y[i]), array=x[i])


IMAGENET_FILES = re.compile(r"^(train_data_batch_(\d+)|val_data)(\.npz)?$")


def _list_imagenet(req: ListRequest) -> Listing:
    """The downsampled ImageNet release (Chrabaszcz et al. 2017): train_data_batch_1..10 and val_data, each an
    .npz with `data` [N, 3*H*W] uint8 (CHW order) and `labels` in 1..1000."""
    directory = Path(req.arg)
    if not directory.is_dir():
        raise IngestError(f"ImageNet directory {directory} does not exist")
    files = sorted((m for m in (IMAGENET_FILES.match(p.name) for p in directory.iterdir()) if m),
                   key=lambda m: (m.group(1) == "val_data", int(m.group(2) or 0)))
    if not files:
        raise IngestError(f"{directory}: no downsampled-ImageNet files (train_data_batch_<k>[.npz], "
                          "val_data[.npz])")
    infos, width = [], None
    for m in files:
        path = directory / m.group(0)
        with open(path, "rb") as f:
            if f.read(2) != b"PK":
                raise IngestError(f"{path}: not an .npz archive (the pickled release cannot be read safely); use the "
                                  "numpy (npz) release of downsampled ImageNet, keys 'data' and 'labels'")
        members = _npz_members(path)
        if "data" not in members or "labels" not in members:
            raise IngestError(f"{path}: expected arrays 'data' and 'labels'; keys are {list(members)}")
        (shape, dtype), (lshape, _) = members["data"], members["labels"]
        side = int(round((shape[1] / 3) ** 0.5)) if len(shape) == 2 else 0
        if len(shape) != 2 or 3 * side * side != shape[1] or dtype != np.uint8:
            raise IngestError(f"{path}: 'data' is {dtype} {list(shape)}; expected uint8 [N, 3*H*W] with H = W")
        if width is not None and side != width:
            raise IngestError(f"{path}: images are {side}x{side} but earlier files hold {width}x{width}")
        if lshape[:1] != shape[:1]:
            raise IngestError(f"{path}: {shape[0]} images but {lshape[0] if lshape else 0} labels")
        width = side
        infos.append((path, "test" if m.group(1) == "val_data" else "train", shape[0]))
    total = sum(n for _, _, n in infos)
    parts = []
    for path, split, n in infos:
        for a, b in _ranges(n, round(_count(total, req.min_parts, req.max_rows) * n / total) or 1):
            parts.append(Part(0, "imagenet", {"file": str(path), "split": split, "side": width, "start": a,
                                              "stop": b}, b - a))
    return Listing(req.spec, req.kind, parts, num_classes=1000, element_shape=(width, width, 3))


def _read_imagenet(file: str, split: str, side: int, start: int, stop: int) -> Iterator[Record]:
    stem = Path(file).name.removesuffix(".npz")
    for a in range(start, stop, READ_ROWS):
        b = min(stop, a + READ_ROWS)
        x = _npy_rows(file, "data", a, b).reshape(-1, 3, side, side).transpose(0, 2, 3, 1)  # CHW -> HWC
        y = _npy_rows(file, "labels", a, b)
        for i in range(b - a):
            rid, label = f"{stem}:{a + i}", int(y[i])
            if not 1 <= label <= 1000:
                yield Record(rid, -1, error=f"label {label} outside 1..1000", split=split)
            else:  # stored 0-based
                yield Record(rid, label - 1, array=np.ascontiguousarray(x[i]), split=split)


# --- encoded image files: folders, parquet, tar archives -----------------------------------------------------


def _list_folder(req: ListRequest) -> Listing:
    directory = Path(req.arg)
    if not directory.is_dir():
        raise IngestError(f"image folder {directory} does not exist")
    classes = sorted(p.name for p in directory.iterdir() if p.is_dir())
    if not classes:
        raise IngestError(f"image folder {directory} has no class subfolders (expected DIR/<class>/<image>)")
    items, ignored = [], []
    for label, name in enumerate(classes):
        for p in sorted((directory / name).rglob("*")):
            rel = str(p.relative_to(directory))
            problem = _entry_problem(p)
            if problem == "directory":
                continue
            if p.suffix.lower() not in IMAGE_EXTENSIONS or problem == FOLDER_LINK:
                # not an image by its name (a README, .DS_Store), or a folder link: reported, never read
                ignored.append({"id": rel, "reason": problem or "not an image file by its name "
                                                                 f"({p.suffix or 'no extension'})"})
            else:  # an unusable entry is listed with its reason, so that it is quarantined and counted as a row
                items.append([rel, label] + ([problem] if problem else []))
    # a hashed order mixes the classes within and across shards (the training stream reads shards in order)
    items.sort(key=lambda it: stable_hash(it[0]))
    n = _count(len(items), req.min_parts, req.max_rows)
    parts = [Part(0, "folder", {"root": str(directory), "items": items[k::n]}, len(items[k::n])) for k in range(n)]
    return Listing(req.spec, req.kind, [p for p in parts if p.rows], classes, encoded=True, ignored=ignored)


def _entry_problem(path: Path) -> str | None:
    """Why a folder entry cannot be read as an image file: None for a regular file, "directory" for a folder to
    descend into (`rglob` does); else the reason (a broken or looping link, a link to a folder, which is not
    followed, a fifo, socket or device, which would block or make no sense to read)."""
    try:
        mode = path.stat().st_mode  # follows links
    except OSError as err:
        if path.is_symlink():
            if err.errno == errno.ELOOP:
                return "symbolic link loop"
            return f"broken symbolic link (to {os.readlink(path)})"
        return f"unreadable entry ({err.strerror or err})"
    if stat.S_ISDIR(mode):
        return FOLDER_LINK if path.is_symlink() else "directory"
    if not stat.S_ISREG(mode):
        what = "fifo" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "device or special file"
        return f"not a regular file (a {what})"
    if not os.access(path, os.R_OK):
        return "unreadable file (permission denied)"
    return None


def _read_files(root: str, items: list) -> Iterator[Record]:
    for rel, label, *problem in items:
        if problem:
            yield Record(rel, int(label), error=problem[0])
            continue
        try:
            yield Record(rel, int(label), encoded=(Path(root) / rel).read_bytes())
        except OSError as err:
            yield Record(rel, int(label), error=f"unreadable file ({err.strerror or err})")


def _list_parquet(req: ListRequest) -> Listing:
    files = sorted(glob.glob(req.arg))
    if not files:
        raise IngestError(f"no parquet files match {req.arg!r}")
    groups, labelled = [], set()  # groups: (file, row group, first row of the group in its file, rows)
    for file in files:
        try:
            pf = pq.ParquetFile(file)
        except (pa.ArrowInvalid, OSError) as err:
            raise IngestError(f"{file}: not a readable parquet file ({err})") from None
        names = pf.schema_arrow.names
        if "img" not in names and "image" not in names:
            raise IngestError(f"{file}: expected an 'img' (or 'image') column of struct{{bytes, path}}; "
                              f"columns are {names}")
        if "label" in names and not pa.types.is_integer(pf.schema_arrow.field("label").type):
            raise IngestError(f"{file}: column 'label' holds {pf.schema_arrow.field('label').type}; labels must be "
                              "integer class indices (map class names to 0..K-1 first)")
        labelled.add("label" in names)
        first = 0
        for g in range(pf.num_row_groups):
            rows = pf.metadata.row_group(g).num_rows
            groups.append((file, g, first, rows))
            first += rows
    total = sum(g[3] for g in groups)
    budget = max(1, -(-total // _count(total, req.min_parts, req.max_rows)))
    parts, current, size = [], [], 0
    for g in groups:  # consecutive row groups, up to `budget` rows per part
        if current and size + g[3] > budget:
            parts.append(Part(0, "parquet", {"groups": current}, size))
            current, size = [], 0
        current.append(list(g))
        size += g[3]
    parts.append(Part(0, "parquet", {"groups": current}, size))
    if len(labelled) > 1:
        raise IngestError(f"{req.arg}: some files have a 'label' column and some do not; "
                          f"without: {[f for f in files if 'label' not in pq.read_schema(f).names][:3]}")
    return Listing(req.spec, req.kind, parts, encoded=True, labelled=labelled == {True})


def _read_parquet(groups: list) -> Iterator[Record]:
    for file, group, first, _ in groups:
        pf = pq.ParquetFile(file)
        col = "img" if "img" in pf.schema_arrow.names else "image"
        table = pf.read_row_group(group, columns=[c for c in (col, "label") if c in pf.schema_arrow.names])
        d = table.to_pydict()
        labels = d.get("label", [0] * table.num_rows)
        base = Path(file).parent
        for i, (img, label) in enumerate(zip(d[col], labels, strict=True)):
            rid = f"{Path(file).name}:{first + i}"
            if not isinstance(img, dict):
                yield Record(rid, -1, error=f"column {col!r} is not a struct of {{bytes, path}}")
            elif label is None:
                yield Record(rid, -1, error="label is null")
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


def _tar_key(name: str) -> tuple[str, str]:
    """WebDataset's convention: the key is the path up to the first dot of the file name; the rest its field."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (dot + ext).lower()


def _list_tar(req: ListRequest) -> Listing:
    """One part per archive (WebDataset shards are written to be read whole). Labels come from a `.cls` member
    beside each image when the archives have them, else from the image's folder inside the archive."""
    files = sorted(glob.glob(req.arg))
    if not files:
        raise IngestError(f"no tar archives match {req.arg!r}")
    parts, folders, has_cls = [], set(), False
    for file in files:
        try:
            with tarfile.open(file, "r:*") as tar:
                names = [m.name for m in tar if m.isfile()]
        except (tarfile.TarError, OSError) as err:
            raise IngestError(f"{file}: not a readable tar archive ({err})") from None
        images = [n for n in names if _tar_key(n)[1].endswith(IMAGE_EXTENSIONS)]
        has_cls = has_cls or any(_tar_key(n)[1] == ".cls" for n in names)
        folders.update(n.rpartition("/")[0].rpartition("/")[2] for n in images)
        parts.append(Part(0, "tar", {"file": file}, len(images)))
    classes = [] if has_cls else sorted(f for f in folders if f)
    if not has_cls and "" in folders and classes:
        raise IngestError(f"{req.arg}: some images sit in a class folder and some at the archive root; give every "
                          "image a folder or a .cls member")
    for p in parts:
        p.args.update(classes=classes, use_cls=has_cls)
    return Listing(req.spec, req.kind, parts, classes, encoded=True, labelled=has_cls or bool(classes))


def _read_tar(file: str, classes: list[str], use_cls: bool) -> Iterator[Record]:
    name = Path(file).name
    index = {c: i for i, c in enumerate(classes)}
    pending: dict[str, dict[str, bytes]] = {}  # members of keys not yet complete: WebDataset keeps them adjacent

    def emit(key: str, fields: dict[str, bytes]) -> Iterator[Record]:
        rid = f"{name}:{key}"
        image = next(((ext, b) for ext, b in fields.items() if ext.endswith(IMAGE_EXTENSIONS)), None)
        if image is None:
            return
        rid += image[0]
        if use_cls:
            text = fields.get(".cls", b"").decode(errors="replace").strip()
            if not text.lstrip("-").isdigit():
                yield Record(rid, -1, error=f"no integer class in a .cls member (found {text[:20]!r})")
                return
            yield Record(rid, int(text), encoded=image[1])
        else:
            folder = key.rpartition("/")[0].rpartition("/")[2]
            yield Record(rid, index.get(folder, 0), encoded=image[1])

    with tarfile.open(file, "r:*") as tar:
        last = None
        for member in tar:
            if not member.isfile():
                continue
            key, ext = _tar_key(member.name)
            if last is not None and key != last:
                yield from emit(last, pending.pop(last))
            fh = tar.extractfile(member)
            pending.setdefault(key, {})[ext] = fh.read() if fh else b""
            last = key
        if last is not None:
            yield from emit(last, pending.pop(last))


# every source kind, in the order `--help` and errors list them
# --- a sampling output as (x_0, x_1) pairs (Rectified Flow's reflow) -----------------------------------------

# the settings of `_sampling.json` that fix what a sample is, given its noise: all must be recorded
PAIR_SETTINGS = ("checkpoint", "solver", "steps", "atol", "rtol", "cfg_scale", "label", "seed", "num_samples")


def _list_samples(req: ListRequest) -> Listing:
    """A sampling output (`flowray sample --out DIR`): row i is sample i, x_1 its image, its label the class it was
    sampled for; its x_0 is not stored but regenerated from derive_seed(seed, i), as the sampler drew it. Refused:
    an output without its settings, an incomplete one, a stochastic (SDE) sampler, a generating checkpoint that
    cannot be read or whose method does not start from standard normal noise."""
    files, total, _ = sample_shards(req.arg)
    settings = sampling_settings(req.arg)
    missing = [k for k in PAIR_SETTINGS if k not in settings]
    if missing:
        raise IngestError(f"{req.spec}: its _sampling.json lacks {', '.join(missing)}: the pairs cannot be "
                          "regenerated; sample again with this version's `flowray sample`")
    if settings.get("seeding", 1) != SEEDING_VERSION:
        raise IngestError(f"{req.spec}: its noise was seeded by version {settings.get('seeding', 1)} (the low 32 bits "
                          f"of each seed), and this version (seeding {SEEDING_VERSION}) would regenerate other x_0 for "
                          "its samples: the pairs would be wrong; sample again with this version's `flowray sample`")
    if settings["solver"] == "sde":
        raise IngestError(f"{req.spec}: sampled with the SDE solver, whose samples are not a function of their noise; "
                          "reflow needs an ODE's pairs (sample with dopri5, or a fixed-step ODE solver)")
    if total != settings["num_samples"]:
        raise IngestError(f"{req.spec}: holds {total} of its {settings['num_samples']} samples; finish it first "
                          f"(run `flowray sample` again with the same --out)")
    try:
        meta = load_meta(settings["checkpoint"])
    except ConfigError as err:
        raise IngestError(f"{req.spec}: its generating checkpoint cannot be read ({err})") from None
    method, data = meta.method, meta.manifest or {}
    if METHODS.get(method["name"]) is None or METHODS[method["name"]].kind != "euclidean":
        raise IngestError(f"{req.spec}: sampled from a {method['name']!r} model, which does not start from standard "
                          "normal noise; pairs need a Euclidean method")
    shape, kind = list(data["shape"]), data["kind"]
    parts = [Part(0, "samples", {"file": f, "shape": shape, "kind": kind, "seed": int(settings["seed"])},
                  storage.parquet_metadata(f).num_rows) for f in files]
    pairs = {**{k: settings[k] for k in PAIR_SETTINGS}, "samples": req.arg, "method": method["name"],
             "model": {"name": meta.model_name, "kwargs": meta.model_kwargs}, "step": meta.step,
             "seeding": SEEDING_VERSION}
    # a class-conditional model's samples carry the class they were drawn for; an unconditional model's carry none
    labelled = bool(meta.model_kwargs.get("num_classes"))
    return Listing(req.spec, req.kind, parts, list(data.get("class_names") or []) if labelled else [],
                   num_classes=data.get("num_classes") if labelled else None, element_shape=tuple(shape),
                   points=kind == "points", labelled=labelled, pairs=pairs)


def _read_samples(file: str, shape: list[int], kind: str, seed: int) -> Iterator[Record]:
    """One sample shard's rows; a row whose recorded seed is not derive_seed(seed, id) is refused (not this output's
    noise, so its pair could not be regenerated)."""
    table = storage.read_table(file, ["id", "seed", "label", "image"])
    dtype = np.float32 if kind == "points" else np.uint8
    for i, s, label, cell in zip(*(table[c].to_pylist() for c in ("id", "seed", "label", "image")), strict=True):
        want = derive_seed(seed, i)
        if s != want:
            yield Record(str(i), max(label, 0), error=f"sample {i} records seed {s}, but this output's noise for "
                                                      f"it is derive_seed({seed}, {i}) = {want}")
            continue
        yield Record(str(i), max(label, 0), array=np.frombuffer(cell, dtype=dtype).reshape(shape))


SOURCES: dict[str, Source] = {
    "digits": Source(_list_digits, _read_digits, None),
    "fashion-mnist": Source(_list_idx, _read_idx, "DIR", optional=True),
    "idx": Source(_list_idx, _read_idx, "DIR"),
    "folder": Source(_list_folder, _read_files, "DIR"),
    "parquet": Source(_list_parquet, _read_parquet, "GLOB"),
    "npz": Source(_list_npz, _read_npz, "FILE"),
    "toy2d": Source(_list_toy, _read_toy, "NAME"),
    "imagenet": Source(_list_imagenet, _read_imagenet, "DIR"),
    "tar": Source(_list_tar, _read_tar, "GLOB"),
    "manifold": Source(_list_manifold, _read_manifold, "NAME"),
    "snapshots": Source(_list_snapshots, _read_snapshots, "NAME"),
    "samples": Source(_list_samples, _read_samples, "DIR"),
}
