import gzip
import io
import json
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.ingest import IngestError, ingest, load_manifest, shard_paths
from pipelines.manifest import ManifestError


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


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
    res = ingest(f"folder:{image_folder}", out, shards=2, test_fraction=0.25, seed=1, channels=3,
                 image_size=8, max_bad_fraction=0.5)
    m = res.manifest
    reasons = {q["id"]: q["reason"] for q in m["quarantine"]}
    assert set(reasons) == {"cat/corrupt.png", "dog/big.png"}
    assert reasons["cat/corrupt.png"].startswith("undecodable image bytes")
    assert reasons["dog/big.png"] == "wrong size 16x16, expected 8x8"
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
    again = ingest(f"folder:{image_folder}", tmp_path / "again", shards=2, test_fraction=0.25, seed=1,
                   channels=3, image_size=8, max_bad_fraction=0.5)
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
    assert m["quarantine"] == [{"id": "train-00000.parquet:3",
                                "reason": f"image bytes are null and path '{tmp_path / 'missing.png'}' is missing"}]
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
    # idx: re-split by test_fraction
    m = ingest(f"idx:{tmp_path}", tmp_path / "idx", test_fraction=0.5).manifest
    assert m["splits"]["train"]["count"] == 20 and m["splits"]["test"]["count"] == 20


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
    assert json.loads((tmp_path / "toy" / "manifest.json").read_text())["splits"]["test"]["count"] == 2000


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
