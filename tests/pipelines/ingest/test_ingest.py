import gzip
import io
import json
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.core.manifest import ManifestError
from pipelines.ingest.parts import IngestError, stable_hash
from pipelines.ingest.run import ingest, load_manifest, shard_paths

# one local Ray for the module: ingest leaves a running Ray up (and stops one it started itself)
pytestmark = pytest.mark.usefixtures("ray_local")


def _encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _png(arr: np.ndarray) -> bytes:
    return _encode(Image.fromarray(arr), "PNG")


def _read_rows(out, split):
    table = pa.concat_tables([pq.read_table(p) for p in shard_paths(out, split)])
    return table.to_pydict()


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            (root / cls / f"{i}.png").write_bytes(_png(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)))
    (root / "cat" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (root / "dog" / "rgba.png").write_bytes(_png(rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)))
    (root / "dog" / "gray.png").write_bytes(_png(rng.integers(0, 256, (8, 8), dtype=np.uint8)))
    (root / "dog" / "big.png").write_bytes(_png(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)))
    return root


def test_folder_quarantines_with_reasons_and_converts_channels(image_folder, tmp_path):
    out = tmp_path / "out"
    res = ingest(
        f"folder:{image_folder}",
        out,
        shards=2,
        test_fraction=0.25,
        seed=1,
        channels=3,
        image_size=8,
        max_bad_fraction=0.5,
    )
    m = res.manifest
    reasons = {q["id"]: q["reason"] for q in m["quarantine"]}
    assert set(reasons) == {"cat/corrupt.png", "dog/big.png"}
    assert reasons["cat/corrupt.png"].startswith("undecodable image bytes")
    assert reasons["dog/big.png"] == "wrong size 16x16, expected 8x8 (--transform center-crop or resize makes it fit)"
    assert m["rows_read"] == 16 and m["quarantined"] == 2
    assert sum(s["count"] for s in m["splits"].values()) + m["quarantined"] == m["rows_read"]
    assert m["shape"] == [8, 8, 3] and m["class_names"] == ["cat", "dog"]
    rows = {}
    for split in ("train", "test"):
        r = _read_rows(out, split)
        rows.update(zip(r["id"], r["image"], strict=True))
    assert len(rows) == 14 and all(len(b) == 8 * 8 * 3 for b in rows.values())
    # RGBA loses alpha, gray is replicated to 3 channels
    rgba = np.asarray(Image.open(image_folder / "dog" / "rgba.png"))[:, :, :3]
    assert np.frombuffer(rows["dog/rgba.png"], np.uint8).reshape(8, 8, 3).tolist() == rgba.tolist()
    gray = np.frombuffer(rows["dog/gray.png"], np.uint8).reshape(8, 8, 3)
    assert (gray[:, :, 0] == gray[:, :, 1]).all() and (gray[:, :, 1] == gray[:, :, 2]).all()
    # manifest checksums verify; the split is deterministic for a seed
    load_manifest(out, verify=True)
    again = ingest(
        f"folder:{image_folder}",
        tmp_path / "again",
        shards=2,
        test_fraction=0.25,
        seed=1,
        channels=3,
        image_size=8,
        max_bad_fraction=0.5,
    )
    assert _read_rows(tmp_path / "again", "test")["id"] == _read_rows(out, "test")["id"]
    assert again.manifest["splits"]["train"]["count"] == m["splits"]["train"]["count"]


def test_threshold_fails_with_a_clear_message(image_folder, tmp_path):
    with pytest.raises(IngestError, match=r"2 of 16 rows \(12.5%\) could not be used, above max_bad_fraction=1.0%"):
        ingest(f"folder:{image_folder}", tmp_path / "o", channels=3, image_size=8)


def test_hf_parquet_bytes_and_paths(tmp_path):
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (4, 4, 3), dtype=np.uint8) for _ in range(5)]
    (tmp_path / "side.png").write_bytes(_png(imgs[4]))
    structs = [{"bytes": _png(a), "path": f"img{i}.png"} for i, a in enumerate(imgs[:4])]
    structs[3] = {"bytes": None, "path": "missing.png"}
    structs.append({"bytes": None, "path": "side.png"})
    table = pa.table({"img": structs, "label": [0, 1, 2, 3, 4]})
    pq.write_table(table, tmp_path / "train-00000.parquet")
    out = tmp_path / "out"
    m = ingest(f"parquet:{tmp_path}/*.parquet", out, shards=1, test_fraction=0.0, max_bad_fraction=0.5).manifest
    assert m["quarantine"] == [
        {
            "id": "train-00000.parquet:3",
            "reason": f"image bytes are null and path '{tmp_path / 'missing.png'}' is missing",
        }
    ]
    rows = _read_rows(out, "train")
    assert rows["label"] == [0, 1, 2, 4]
    assert np.frombuffer(rows["image"][3], np.uint8).reshape(4, 4, 3).tolist() == imgs[4].tolist()


def _write_idx(path, arr: np.ndarray):
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_idx_and_fashion_mnist_layout(tmp_path):
    rng = np.random.default_rng(0)
    train, test = rng.integers(0, 256, (30, 6, 6)), rng.integers(0, 256, (10, 6, 6))
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", train)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(30) % 10)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", test)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(10) % 10)
    # fashion-mnist keeps the source's own train/test split
    m = ingest(f"fashion-mnist:{tmp_path}", tmp_path / "fm", shards=3).manifest
    assert {s: v["count"] for s, v in m["splits"].items()} == {"train": 30, "test": 10}
    assert m["class_names"][0] == "T-shirt/top" and m["shape"] == [6, 6, 1]
    rows = _read_rows(tmp_path / "fm", "test")
    assert sorted(rows["id"]) == sorted(f"t10k-{i}" for i in range(10))
    first = rows["id"].index("t10k-0")
    assert np.frombuffer(rows["image"][first], np.uint8).reshape(6, 6).tolist() == test[0].tolist()
    # idx: re-split by test_fraction, by a hash of (seed, id)
    m = ingest(f"idx:{tmp_path}", tmp_path / "idx", test_fraction=0.5).manifest
    ids = [f"{p}-{i}" for p, n in (("train", 30), ("t10k", 10)) for i in range(n)]
    assert sorted(_read_rows(tmp_path / "idx", "test")["id"]) == sorted(i for i in ids if stable_hash(f"0/{i}") < 0.5)
    assert m["splits"]["train"]["count"] + m["splits"]["test"]["count"] == 40


def test_digits_npz_and_toy2d(tmp_path):
    m = ingest("digits", tmp_path / "digits", shards=4, test_fraction=0.1).manifest
    assert m["rows_read"] == 1797 and m["quarantined"] == 0
    assert m["splits"]["train"]["count"] + m["splits"]["test"]["count"] == 1797
    assert m["shape"] == [8, 8, 1] and m["num_classes"] == 10
    assert sum(s["rows"] for s in m["splits"]["train"]["shards"]) == m["splits"]["train"]["count"]
    images = np.random.default_rng(0).integers(0, 256, (12, 4, 4, 3), dtype=np.uint8)
    images[5] = 0
    np.savez(tmp_path / "d.npz", images=images, labels=np.arange(12))
    m = ingest(f"npz:{tmp_path / 'd.npz'}", tmp_path / "npz", test_fraction=0.0).manifest
    assert m["shape"] == [4, 4, 3] and m["splits"]["train"]["count"] == 12
    m = ingest("toy2d:moons", tmp_path / "toy", test_fraction=0.1).manifest
    assert m["kind"] == "points" and m["shape"] == [2] and m["dtype"] == "float32"
    held_out = sum(stable_hash(f"0/moons-{i}") < 0.1 for i in range(20_000))
    assert json.loads((tmp_path / "toy" / "manifest.json").read_text())["splits"]["test"]["count"] == held_out
    assert 1800 < held_out < 2200


def test_bad_sources(tmp_path):
    with pytest.raises(IngestError, match="unknown source 'cifar'; allowed: digits"):
        ingest("cifar", tmp_path)
    with pytest.raises(IngestError, match="no parquet files match"):
        ingest(f"parquet:{tmp_path}/*.parquet", tmp_path / "o")
    with pytest.raises(IngestError, match="image folder .* does not exist"):
        ingest(f"folder:{tmp_path}/nope", tmp_path / "o")
    with pytest.raises(IngestError, match="unknown toy2d set 'donut'"):
        ingest("toy2d:donut", tmp_path / "o")
    with pytest.raises(ManifestError, match="manifest.json not found"):
        load_manifest(tmp_path / "nothing")


# --- any image folder, archive or array file (Ray Data ingest) ------------------------------------------------


@pytest.fixture
def mixed_folder(tmp_path):
    """Photos as they come: mixed sizes and modes, a corrupt file and an empty one."""
    rng = np.random.default_rng(0)
    root = tmp_path / "photos"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
    rgb = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)  # landscape, 50 wide and 30 high
    files = {
        "a/rgb.jpg": _encode(Image.fromarray(rgb), "JPEG"),
        "a/rgba.png": _encode(Image.fromarray(rng.integers(0, 256, (12, 12, 4), dtype=np.uint8), "RGBA"), "PNG"),
        "a/palette.gif": _encode(
            Image.fromarray(rng.integers(0, 256, (20, 16, 3), dtype=np.uint8)).convert("P"), "GIF"
        ),
        "a/grey.png": _encode(Image.fromarray(rng.integers(0, 256, (9, 9), dtype=np.uint8), "L"), "PNG"),
        "b/deep.png": _encode(Image.fromarray(np.full((8, 8), 51400, np.uint16)), "PNG"),  # 16-bit: 51400/257 = 200
        "b/cmyk.jpg": _encode(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG"),  # red ink
        "b/exact.png": _encode(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)), "PNG"),
        "b/corrupt.jpg": b"\xff\xd8\xff\xe0 not a jpeg at all",
        "b/empty.png": b"",
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root, rgb


def test_a_folder_of_mixed_photos_is_resized_converted_and_counted(mixed_folder, tmp_path):
    root, _ = mixed_folder
    m = ingest(
        f"folder:{root}",
        tmp_path / "out",
        image_size=8,
        channels=3,
        transform="center-crop",
        max_bad_fraction=0.5,
        test_fraction=0.0,
    ).manifest
    reasons = {q["id"]: q["reason"] for q in m["quarantine"]}
    assert set(reasons) == {"b/corrupt.jpg", "b/empty.png"}
    assert reasons["b/empty.png"] == "empty file (0 bytes)"
    assert reasons["b/corrupt.jpg"].startswith("undecodable image bytes")
    assert (m["rows_read"], m["quarantined"], m["splits"]["train"]["count"]) == (9, 2, 7)
    assert m["shape"] == [8, 8, 3] and m["transform"] == "center-crop"
    assert m["conversions"] == {"CMYK->RGB": 1, "I;16->RGB": 1, "L->RGB": 1, "P->RGB": 1, "RGBA->RGB": 1}
    assert m["resized"] == 5  # all but the 8x8 ones (exact.png, deep.png)
    rows = _read_rows(tmp_path / "out", "train")
    img = {i: np.frombuffer(b, np.uint8).reshape(8, 8, 3) for i, b in zip(rows["id"], rows["image"], strict=True)}
    assert (img["b/deep.png"] == 200).all()  # scaled from 16 bits, not clipped to 255
    red = img["b/cmyk.jpg"].reshape(-1, 3).mean(0)
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    # center-crop: the shorter side (30) scaled to 8 with Lanczos, then the centre square of the 13x8 result
    decoded = Image.open(root / "a/rgb.jpg").convert("RGB")
    assert decoded.size == (50, 30)
    expect = decoded.resize((13, 8), Image.Resampling.LANCZOS).crop((2, 0, 10, 8))
    assert img["a/rgb.jpg"].tolist() == np.asarray(expect).tolist()
    # resize stretches instead; grey output replicates nothing and converts RGB by luma
    m = ingest(
        f"folder:{root}",
        tmp_path / "grey",
        image_size=4,
        channels=1,
        transform="resize",
        max_bad_fraction=0.5,
        test_fraction=0.0,
    ).manifest
    assert m["shape"] == [4, 4, 1] and m["resized"] == 7
    assert m["conversions"]["RGB->L"] == 2 and m["conversions"]["I;16->L"] == 1


def test_without_a_transform_photos_of_another_size_are_quarantined_with_a_hint(mixed_folder, tmp_path):
    root, _ = mixed_folder
    with pytest.raises(
        IngestError,
        match=r"could not be used, above max_bad_fraction=1.0%\. First: .*wrong size "
        r"30x50, expected 8x8 \(--transform center-crop or resize makes it fit\)",
    ):
        ingest(f"folder:{root}", tmp_path / "out", image_size=8)
    # a failed job leaves neither shards nor a manifest nor its staging folder behind
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def _npz_batch(path, data, labels):
    np.savez(path, data=data, labels=labels, mean=np.zeros(data.shape[1], np.float32))


def test_downsampled_imagenet_layout(tmp_path):
    rng = np.random.default_rng(0)
    side, n = 4, 10
    chw = [rng.integers(0, 256, (n, 3, side, side), dtype=np.uint8) for _ in range(3)]
    root = tmp_path / "imagenet32"
    root.mkdir()
    _npz_batch(root / "train_data_batch_1.npz", chw[0].reshape(n, -1), np.arange(1, n + 1))
    labels = np.arange(1, n + 1)
    labels[4] = 0  # outside 1..1000: quarantined
    _npz_batch(root / "train_data_batch_2.npz", chw[1].reshape(n, -1), labels)
    _npz_batch(root / "val_data.npz", chw[2].reshape(n, -1), np.full(n, 1000))
    m = ingest(f"imagenet:{root}", tmp_path / "out", shards=2, max_bad_fraction=0.1).manifest
    assert m["shape"] == [4, 4, 3] and m["num_classes"] == 1000
    assert {s: v["count"] for s, v in m["splits"].items()} == {"train": 19, "test": 10}
    assert m["quarantine"] == [{"id": "train_data_batch_2:4", "reason": "label 0 outside 1..1000"}]
    train = _read_rows(tmp_path / "out", "train")
    row = train["id"].index("train_data_batch_1:3")
    assert train["label"][row] == 3  # stored 0-based
    assert (
        np.frombuffer(train["image"][row], np.uint8).reshape(4, 4, 3).tolist() == chw[0][3].transpose(1, 2, 0).tolist()
    )  # CHW -> HWC
    assert set(_read_rows(tmp_path / "out", "test")["label"]) == {999}
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "val_data").write_bytes(b"\x80\x04\x95 pickled")
    with pytest.raises(IngestError, match="not an .npz archive .* use the numpy \\(npz\\) release"):
        ingest(f"imagenet:{tmp_path / 'pickled'}", tmp_path / "o")


def _tar(path, members: dict[str, bytes]):
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_tar_archives_with_cls_members_and_with_class_folders(tmp_path):
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (6, 6, 3), dtype=np.uint8) for _ in range(6)]
    _tar(
        tmp_path / "shard-000.tar",
        {
            "0001.png": _png(imgs[0]),
            "0001.cls": b"3",
            "0002.png": _png(imgs[1]),
            "0002.cls": b"7",
            "0003.png": b"garbage",
            "0003.cls": b"1",
        },
    )
    _tar(
        tmp_path / "shard-001.tar", {"0004.png": _png(imgs[2]), "0004.cls": b"0", "0005.png": _png(imgs[3])}
    )  # no .cls: quarantined
    m = ingest(f"tar:{tmp_path}/shard-*.tar", tmp_path / "wds", max_bad_fraction=0.5, test_fraction=0.0).manifest
    assert {q["id"] for q in m["quarantine"]} == {"shard-000.tar:0003.png", "shard-001.tar:0005.png"}
    rows = _read_rows(tmp_path / "wds", "train")
    assert dict(zip(rows["id"], rows["label"], strict=True)) == {
        "shard-000.tar:0001.png": 3,
        "shard-000.tar:0002.png": 7,
        "shard-001.tar:0004.png": 0,
    }
    _tar(tmp_path / "folders.tar", {"cat/x.png": _png(imgs[4]), "dog/y.png": _png(imgs[5])})
    m = ingest(f"tar:{tmp_path}/folders.tar", tmp_path / "f", test_fraction=0.0).manifest
    assert m["class_names"] == ["cat", "dog"]
    assert dict(zip(*(_read_rows(tmp_path / "f", "train")[k] for k in ("id", "label")), strict=True)) == {
        "folders.tar:cat/x.png": 0,
        "folders.tar:dog/y.png": 1,
    }


def test_shards_and_split_do_not_depend_on_the_parallelism(image_folder, tmp_path):
    kw = {"shards": 3, "test_fraction": 0.3, "seed": 5, "channels": 3, "image_size": 8, "max_bad_fraction": 0.5}
    one = ingest(f"folder:{image_folder}", tmp_path / "p1", parallelism=1, **kw).manifest
    two = ingest(f"folder:{image_folder}", tmp_path / "p2", parallelism=2, **kw).manifest
    assert one["splits"] == two["splits"]  # same files, rows and sha256 checksums
    assert one["quarantine"] == two["quarantine"]
    assert len(one["splits"]["train"]["shards"]) == 3
    # the content digest MLflow gets as the data's identity: the same rows in another folder, another per split
    m1, m2 = load_manifest(tmp_path / "p1"), load_manifest(tmp_path / "p2")
    assert m1.digest("train") == m2.digest("train") != m1.digest("test") and len(m1.digest("train")) == 16
    assert m1.dataset("train")["name"] == m1.dataset("train")["profile"]["source"].split(":")[0] + "/train"
    test_ids = _read_rows(tmp_path / "p1", "test")["id"]
    assert test_ids and all(stable_hash(f"5/{i}") < 0.3 for i in test_ids)
    # re-ingesting into the same folder with fewer parts replaces the old shards
    ingest(f"folder:{image_folder}", tmp_path / "p1", **{**kw, "shards": 1})
    assert sorted(p.name for p in (tmp_path / "p1").glob("*.parquet")) == [
        "test-00000-of-00001.parquet",
        "train-00000-of-00001.parquet",
    ]
    load_manifest(tmp_path / "p1", verify=True)


def test_a_source_without_labels_needs_unlabelled_and_refuses_class_conditioning(tmp_path):
    from pipelines.core.errors import ConfigError
    from pipelines.train.against_data import check_data
    from pipelines.train.config import load_config

    rng = np.random.default_rng(0)
    imgs = [{"bytes": _png(rng.integers(0, 256, (8, 8, 1), dtype=np.uint8)[:, :, 0]), "path": None} for _ in range(300)]
    pq.write_table(pa.table({"img": imgs}), tmp_path / "u.parquet")
    with pytest.raises(IngestError, match="source 'parquet:.*u.parquet' has no labels; pass --unlabelled"):
        ingest(f"parquet:{tmp_path}/u.parquet", tmp_path / "o")
    m = ingest(f"parquet:{tmp_path}/u.parquet", tmp_path / "o", unlabelled=True).manifest
    assert (m["labelled"], m["num_classes"], m["shape"]) == (False, 0, [8, 8, 1])
    with pytest.raises(IngestError, match="has labels; --unlabelled is only for sources without them"):
        ingest("digits", tmp_path / "d", unlabelled=True)
    sets = [f"data.shards={tmp_path / 'o'}", "model.channel_mult=[1,2]", "train.batch_size=8"]
    check_data(load_config("configs/digits-cpu.yaml", sets))  # unconditional training is fine
    with pytest.raises(ConfigError, match="model.class_conditional: True is not allowed; .* was ingested unlabelled"):
        check_data(load_config("configs/digits-cpu.yaml", [*sets, "model.class_conditional=true"]))


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height grey pixels, with almost no pixel data: what a decompression
    bomb looks like to a reader before it decodes."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_every_folder_entry_is_accounted_for(tmp_path):
    """Broken and looping links, a fifo, an image above the pixel limit, a folder link and files that are not
    images: each is quarantined (a row that cannot be used) or ignored (not a row), by path and reason."""
    import os

    from pipelines.ingest.rows import open_image as _open

    rng = np.random.default_rng(0)
    root = tmp_path / "photos"
    (root / "cat" / "sub").mkdir(parents=True)
    (root / "dog").mkdir()
    for i in range(4):
        (root / "cat" / f"{i}.png").write_bytes(_png(rng.integers(0, 256, (8, 8), dtype=np.uint8)))
        (root / "dog" / f"{i}.png").write_bytes(_png(rng.integers(0, 256, (8, 8), dtype=np.uint8)))
    (root / "cat" / "sub" / "nested.png").write_bytes(_png(rng.integers(0, 256, (8, 8), dtype=np.uint8)))
    (root / "cat" / "huge.png").write_bytes(_png_header(30_000, 30_000))
    (root / "dog" / "large.png").write_bytes(_png(rng.integers(0, 256, (40, 40), dtype=np.uint8)))
    os.symlink(root / "nowhere.png", root / "cat" / "broken.png")
    os.symlink(root / "dog" / "loop.png", root / "dog" / "loop.png")
    os.mkfifo(root / "dog" / "pipe.png")
    os.symlink(root / "cat", root / "dog" / "more")
    (root / "dog" / "README.txt").write_text("not an image")
    res = ingest(
        f"folder:{root}", tmp_path / "out", shards=1, channels=1, image_size=8, max_bad_fraction=0.5, max_pixels=1000
    )
    m = res.manifest
    assert {q["id"]: q["reason"] for q in m["quarantine"]} == {
        "cat/broken.png": f"broken symbolic link (to {root / 'nowhere.png'})",
        "dog/loop.png": "symbolic link loop",
        "dog/pipe.png": "not a regular file (a fifo)",
        "cat/huge.png": "decodes to 30000x30000 = 900,000,000 pixels, above the limit of 1,000 (--max-pixels; a "
        "decompression bomb, or a photo larger than the limit allows)",
        "dog/large.png": "decodes to 40x40 = 1,600 pixels, above the limit of 1,000 (--max-pixels; a decompression "
        "bomb, or a photo larger than the limit allows)",
    }
    assert {q["id"]: q["reason"] for q in m["ignored"]} == {
        "dog/README.txt": "not an image file by its name (.txt)",
        "dog/more": "symbolic link to a folder (not followed: it could loop)",
    }
    assert m["rows_read"] == 14 and sum(s["count"] for s in m["splits"].values()) == 9  # nested.png is read
    # PIL's own limit is the default: the header is refused before a pixel is decoded
    with pytest.raises(ValueError, match="above the limit of 89,478,485"):
        _open(_png_header(30_000, 30_000))


def test_a_resolution_no_task_can_hold_is_refused_before_ray(image_folder, tmp_path):
    with pytest.raises(
        IngestError,
        match=r"--resolution 100000: one ingest task would hold about 5\d.\d GiB \(row "
        r"groups of 1 row\(s\) of 100000x100000x3 = 27.9 GiB each, twice while "
        r"written, one decoded image of up to --max-pixels 89,478,485, and the "
        r"worker\), more than this machine's .* of memory; lower --resolution",
    ):
        ingest(f"folder:{image_folder}", tmp_path / "o", channels=3, image_size=100_000, transform="resize")


def test_a_file_removed_after_listing_is_quarantined_and_bad_limits_are_refused(image_folder, tmp_path):
    """A source that changes while it is ingested: a listed image removed before its task reads it is a
    quarantined row with the reason, not a failed task."""
    from pipelines.ingest.part_writer import ingest_part
    from pipelines.ingest.rows import Settings
    from pipelines.ingest.sources import list_source

    listing = list_source(f"folder:{image_folder}", 1)
    (image_folder / "cat" / "0.png").unlink()
    settings = Settings(3, 8, None, 0, 0.1, False, str(tmp_path / "staging"), 1)
    (tmp_path / "staging").mkdir()
    summary = ingest_part(listing.parts[0], settings)
    assert {"id": "cat/0.png", "reason": "unreadable file (No such file or directory)"} in summary["quarantine"]
    with pytest.raises(IngestError, match=r"--max-pixels must be >= 1; got 0"):
        ingest(f"folder:{image_folder}", tmp_path / "o", max_pixels=0)
