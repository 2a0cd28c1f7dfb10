"""How much the resize convention moves FID: real-vs-real FID on an ingested data set with TF1's legacy bilinear
resize (what `fm.inception` uses, as the FID paper's code does) and with PyTorch's half-pixel bilinear (what it used
before), on the same images and the same Inception-v3.

    python -m benchmarks.fid_resize --data data/fashion-mnist --images 500

Reports both FIDs between `--images` training and as many test images (an id-hashed subset of each, the same for
both resizes) and the largest and mean difference between the two resized inputs, in grey levels. Prints one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F


def _images(manifest, split: str, n: int) -> torch.Tensor:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.batch.features import in_subset
    from pipelines.core.cells import decode_rows

    table = pa.concat_tables([pq.read_table(p, columns=["id", "image"]) for p in manifest.shard_paths(split)])
    keep = in_subset(table["id"].to_pylist(), min(1.0, 1.2 * n / len(table)))
    cells = [c for c, k in zip(table["image"].to_pylist(), keep, strict=True) if k][:n]
    return decode_rows(cells, manifest.data.shape)


def _features(net, x: torch.Tensor, resize) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for chunk in x.split(50):
            y = chunk.float()
            y = y.expand(-1, 3, -1, -1) if y.shape[1] == 1 else y
            out.append(net(resize(y) / 128.0 - 1.0).double().reshape(len(chunk), -1))
    return torch.cat(out)


def main() -> None:
    from fm.inception import load_inception, tf_legacy_resize
    from fm.metrics import frechet_distance_from_features
    from pipelines.core.manifest import Manifest

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/fashion-mnist")
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    manifest = Manifest.load(a.data)
    train, test = _images(manifest, "train", a.images), _images(manifest, "test", a.images)
    resizes = {
        "tf1_legacy": lambda y: tf_legacy_resize(y, (299, 299)),
        "half_pixel": lambda y: F.interpolate(y, size=(299, 299), mode="bilinear", align_corners=False),
    }
    net, out = load_inception(), {"data": a.data, "train_images": len(train), "test_images": len(test)}
    start = time.perf_counter()
    for name, resize in resizes.items():
        out[f"fid_{name}"] = round(
            frechet_distance_from_features(_features(net, train, resize), _features(net, test, resize)), 3
        )
    sample = test[:32].float()
    diff = (resizes["tf1_legacy"](sample) - resizes["half_pixel"](sample)).abs()
    out.update(
        max_grey_diff=round(float(diff.max()), 1),
        mean_grey_diff=round(float(diff.mean()), 2),
        wall_s=round(time.perf_counter() - start, 1),
        threads=a.threads,
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
