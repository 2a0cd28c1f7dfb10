"""The data set's feature classifier, for a Fréchet distance where Inception's features mean little (small
images): trained once per (epochs, seed) on the training split and cached beside the shards."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import torch
from tqdm import tqdm

from fm.data import to_model_space
from pipelines.core import storage
from pipelines.core.cells import decode_rows
from pipelines.core.manifest import Manifest

CLASSIFIER_DIR = "classifier"


def _load_split(manifest: Manifest, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    table = pa.concat_tables([storage.read_table(p, ["image", "label"]) for p in manifest.shard_paths(split)])
    x = decode_rows(table["image"].to_pylist(), manifest.data.shape)
    return to_model_space(x), torch.tensor(table["label"].to_pylist())


def get_classifier(manifest: Manifest, epochs: int = 15, seed: int = 0):
    """The data set's feature classifier: loaded from <shards>/classifier/epochs<E>-seed<S>/, else trained once with
    those settings and cached there.

    Returns (model in eval mode, info dict with test accuracy and the cache path).
    """
    from fm.models.classifier import SmallCNN

    kwargs = {"in_channels": manifest.data.shape[2], "num_classes": max(manifest.data.num_classes, 2)}
    # one cache entry per training settings: another epoch count or seed trains (and keeps) its own classifier
    cache = manifest.path(CLASSIFIER_DIR, f"epochs{epochs}-seed{seed}")
    if storage.is_file(storage.join(cache, "info.json")):
        info = json.loads(storage.read_text(storage.join(cache, "info.json")))
        model = SmallCNN(**info["kwargs"])
        weights = io.BytesIO(storage.read_bytes(storage.join(cache, "model.pt")))
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return model.eval(), info
    torch.manual_seed(seed)
    x, y = _load_split(manifest, "train")
    x_test, y_test = _load_split(manifest, "test")
    model = SmallCNN(**kwargs)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc="feature classifier", unit=" epochs", leave=False, disable=None):
        model.train()
        for idx in torch.randperm(len(x), generator=g).split(128):
            # small random shifts make the features robust to what a generator gets slightly wrong
            xb = torch.roll(x[idx], shifts=tuple(torch.randint(-1, 2, (2,), generator=g).tolist()), dims=(2, 3))
            loss = torch.nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    weights = io.BytesIO()
    torch.save(model.state_dict(), weights)
    storage.write_bytes(storage.join(cache, "model.pt"), weights.getvalue())
    info = {
        "kwargs": kwargs,
        "test_accuracy": acc,
        "epochs": epochs,
        "seed": seed,
        "train_rows": len(x),
        "test_rows": len(x_test),
        "path": cache,
    }
    storage.write_text(storage.join(cache, "info.json"), json.dumps(info, indent=1))  # last: the entry is whole
    return model, info
