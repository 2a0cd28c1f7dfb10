"""Array files: IDX (MNIST, Fashion-MNIST, from Debian's folder by default) and numpy archives (npz, and the
downsampled ImageNet's batches), read a row range at a time in bounded memory."""

from __future__ import annotations

import gzip
import os
import re
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt

from pipelines.ingest.parts import IngestError, Listing, ListRequest, Part, Record, part_count, row_ranges

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
READ_ROWS = 1024  # rows an array reader holds at once


IDX_DTYPES: dict[int, npt.DTypeLike] = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


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
            raise IngestError(
                f"{path}: IDX header says {dims} ({expected} bytes) but the file holds {length} bytes "
                "(truncated or damaged)"
            )
    elif path.stat().st_size != expected:
        raise IngestError(
            f"{path}: IDX header says {dims} ({expected} bytes) but the file holds "
            f"{path.stat().st_size} bytes (truncated or damaged)"
        )
    return dtype, dims, offset


def _find_idx(directory: Path, prefix: str) -> tuple[Path, Path] | None:
    for images in sorted(directory.glob(f"{prefix}-images-idx3-ubyte*")):
        labels = directory / images.name.replace("images-idx3", "labels-idx1")
        if labels.exists():
            return images, labels
    return None


def list_idx(req: ListRequest) -> Listing:
    directory = Path(req.arg or FASHION_MNIST_DIR)
    if not directory.is_dir():
        raise IngestError(f"IDX directory {directory} does not exist")
    found = [(prefix, split, _find_idx(directory, prefix)) for prefix, split in (("train", "train"), ("t10k", "test"))]
    pairs = [(prefix, split, pair) for prefix, split, pair in found if pair is not None]
    if not pairs:
        raise IngestError(
            f"no IDX pair (train-images-idx3-ubyte[.gz] + train-labels-idx1-ubyte[.gz], or t10k-*) in {directory}"
        )
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
        for a, b in row_ranges(n, round(part_count(total, req.min_parts, req.max_rows) * n / total) or 1):
            split_of = split if req.kind == "fashion-mnist" else None
            parts.append(
                Part(
                    0,
                    "idx",
                    {
                        "images": str(images),
                        "labels": str(labels),
                        "prefix": prefix,
                        "split": split_of,
                        "start": a,
                        "stop": b,
                    },
                    b - a,
                )
            )
    names = FASHION_MNIST_CLASSES if req.kind == "fashion-mnist" else []
    return Listing(req.spec, req.kind, parts, names, element_shape=tuple(dims[pairs[0][2][0]][1:]))


def _idx_rows(path: Path, start: int, stop: int) -> np.ndarray:
    dtype, dims, offset = _idx_header(path)
    row = int(np.prod(dims[1:], dtype=np.int64)) * dtype.itemsize
    with _open(path) as f:
        f.seek(offset + start * row)  # a gzip stream inflates up to here: bounded memory, not bounded time
        data = f.read((stop - start) * row)
    return np.frombuffer(data, dtype=dtype).reshape(-1, *dims[1:])


def read_idx(images: str, labels: str, prefix: str, split: str | None, start: int, stop: int) -> Iterator[Record]:
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


def list_npz(req: ListRequest) -> Listing:
    file = Path(req.argument)
    if not file.exists():
        raise IngestError(f"npz file {file} does not exist")
    members = _npz_members(file)
    xk = next((k for k in ("images", "points", "x", "X", "arr_0") if k in members), None)
    if xk is None:
        raise IngestError(
            f"{file}: no image array; expected a key 'images', 'points' or 'x' (keys are {list(members)})"
        )
    shape, _ = members[xk]
    if len(shape) not in (2, 3, 4) or (len(shape) == 2 and xk == "images"):
        raise IngestError(
            f"{file}: array {xk!r} has shape {list(shape)}; images must be [N, H, W] or "
            "[N, H, W, C] (flat rows cannot be reshaped without knowing H and W); point rows [N, D] "
            "go under the key 'points' or 'x'"
        )
    yk = next((k for k in ("labels", "y", "Y") if k in members), None)
    if yk and members[yk][0][:1] != shape[:1]:
        raise IngestError(f"{file}: {shape[0]} images but {members[yk][0][0] if members[yk][0] else 0} labels")
    parts = [
        Part(0, "npz", {"file": str(file), "images": xk, "labels": yk, "start": a, "stop": b}, b - a)
        for a, b in row_ranges(shape[0], part_count(shape[0], req.min_parts, req.max_rows))
    ]
    return Listing(
        req.spec, req.kind, parts, element_shape=tuple(shape[1:]), labelled=yk is not None, points=len(shape) == 2
    )


def read_npz(file: str, images: str, labels: str | None, start: int, stop: int) -> Iterator[Record]:
    name = Path(file).name
    for a in range(start, stop, READ_ROWS):
        b = min(stop, a + READ_ROWS)
        x = _npy_rows(file, images, a, b)
        y = _npy_rows(file, labels, a, b) if labels else np.zeros(b - a, np.int64)
        for i in range(b - a):
            yield Record(f"{name}:{a + i}", int(y[i]), array=x[i])


IMAGENET_FILES = re.compile(r"^(train_data_batch_(\d+)|val_data)(\.npz)?$")


def list_imagenet(req: ListRequest) -> Listing:
    """The downsampled ImageNet release (Chrabaszcz et al. 2017): train_data_batch_1..10 and val_data, each an
    .npz with `data` [N, 3*H*W] uint8 (CHW order) and `labels` in 1..1000."""
    directory = Path(req.argument)
    if not directory.is_dir():
        raise IngestError(f"ImageNet directory {directory} does not exist")
    files = sorted(
        (m for m in (IMAGENET_FILES.match(p.name) for p in directory.iterdir()) if m),
        key=lambda m: (m.group(1) == "val_data", int(m.group(2) or 0)),
    )
    if not files:
        raise IngestError(f"{directory}: no downsampled-ImageNet files (train_data_batch_<k>[.npz], val_data[.npz])")
    infos, width = [], None
    for m in files:
        path = directory / m.group(0)
        with open(path, "rb") as f:
            if f.read(2) != b"PK":
                raise IngestError(
                    f"{path}: not an .npz archive (the pickled release cannot be read safely); use the "
                    "numpy (npz) release of downsampled ImageNet, keys 'data' and 'labels'"
                )
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
        for a, b in row_ranges(n, round(part_count(total, req.min_parts, req.max_rows) * n / total) or 1):
            parts.append(
                Part(0, "imagenet", {"file": str(path), "split": split, "side": width, "start": a, "stop": b}, b - a)
            )
    assert width is not None  # at least one file was read
    return Listing(req.spec, req.kind, parts, num_classes=1000, element_shape=(width, width, 3))


def read_imagenet(file: str, split: str, side: int, start: int, stop: int) -> Iterator[Record]:
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
