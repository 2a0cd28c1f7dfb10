"""Encoded image files: a folder of class subfolders, parquet files of encoded images, tar archives
(WebDataset-style shards); links, unreadable entries and non-images are counted, never followed or dropped
silently."""

from __future__ import annotations

import errno
import glob
import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.ingest.parts import IngestError, Listing, ListRequest, Part, Record, part_count, stable_hash

FOLDER_LINK = "symbolic link to a folder (not followed: it could loop)"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def list_folder(req: ListRequest) -> Listing:
    directory = Path(req.argument)
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
                ignored.append(
                    {"id": rel, "reason": problem or f"not an image file by its name ({p.suffix or 'no extension'})"}
                )
            else:  # an unusable entry is listed with its reason, so that it is quarantined and counted as a row
                items.append([rel, label] + ([problem] if problem else []))
    # a hashed order mixes the classes within and across shards (the training stream reads shards in order)
    items.sort(key=lambda it: stable_hash(str(it[0])))  # by its path
    n = part_count(len(items), req.min_parts, req.max_rows)
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


def read_files(root: str, items: list) -> Iterator[Record]:
    for rel, label, *problem in items:
        if problem:
            yield Record(rel, int(label), error=problem[0])
            continue
        try:
            yield Record(rel, int(label), encoded=(Path(root) / rel).read_bytes())
        except OSError as err:
            yield Record(rel, int(label), error=f"unreadable file ({err.strerror or err})")


def list_parquet(req: ListRequest) -> Listing:
    files = sorted(glob.glob(req.argument))
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
            raise IngestError(
                f"{file}: expected an 'img' (or 'image') column of struct{{bytes, path}}; columns are {names}"
            )
        if "label" in names and not pa.types.is_integer(pf.schema_arrow.field("label").type):
            raise IngestError(
                f"{file}: column 'label' holds {pf.schema_arrow.field('label').type}; labels must be "
                "integer class indices (map class names to 0..K-1 first)"
            )
        labelled.add("label" in names)
        first = 0
        for g in range(pf.num_row_groups):
            rows = pf.metadata.row_group(g).num_rows
            groups.append((file, g, first, rows))
            first += rows
    total = sum(g[3] for g in groups)
    budget = max(1, -(-total // part_count(total, req.min_parts, req.max_rows)))
    parts: list[Part] = []
    current: list[list] = []
    size = 0
    for group in groups:  # consecutive row groups, up to `budget` rows per part
        if current and size + group[3] > budget:
            parts.append(Part(0, "parquet", {"groups": current}, size))
            current, size = [], 0
        current.append(list(group))
        size += group[3]
    parts.append(Part(0, "parquet", {"groups": current}, size))
    if len(labelled) > 1:
        raise IngestError(
            f"{req.arg}: some files have a 'label' column and some do not; "
            f"without: {[f for f in files if 'label' not in pq.read_schema(f).names][:3]}"
        )
    return Listing(req.spec, req.kind, parts, encoded=True, labelled=labelled == {True})


def read_parquet(groups: list) -> Iterator[Record]:
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


def list_tar(req: ListRequest) -> Listing:
    """One part per archive (WebDataset shards are written to be read whole). Labels come from a `.cls` member
    beside each image when the archives have them, else from the image's folder inside the archive."""
    files = sorted(glob.glob(req.argument))
    if not files:
        raise IngestError(f"no tar archives match {req.arg!r}")
    parts: list[Part] = []
    folders: set[str] = set()
    has_cls = False
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
        raise IngestError(
            f"{req.arg}: some images sit in a class folder and some at the archive root; give every "
            "image a folder or a .cls member"
        )
    for p in parts:
        p.args.update(classes=classes, use_cls=has_cls)
    return Listing(req.spec, req.kind, parts, classes, encoded=True, labelled=has_cls or bool(classes))


def read_tar(file: str, classes: list[str], use_cls: bool) -> Iterator[Record]:
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
