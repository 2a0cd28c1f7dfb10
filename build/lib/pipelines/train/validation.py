"""The validation loss: the training objective of the EMA model on a fixed held-out set, at every checkpoint.

The set is `train.val_rows` rows of `train.val_split` chosen once from a fixed seed (not `train.seed`), and the noise,
pairing and times of the loss come from one fixed generator: every run on the same data scores the same rows with
the same draws, so its value differs between runs and checkpoints only through the model. It is what a sweep's
early-stopping scheduler compares (`pipelines.sweep`), and a learning curve free of the minibatch noise of `loss`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fm.data import to_model_space
from fm.methods import FlowMethod
from fm.seeding import generator
from pipelines.core.cells import decode_rows
from pipelines.core.manifest import Manifest
from pipelines.core.samples import sample_noise
from pipelines.core.shards import ShardRows, group_rows

VALIDATION_SEED = 20_240_917  # the fixed seed of the rows and draws: the same for every run, whatever train.seed


@dataclass(frozen=True)
class ValidationSet:
    """x_1 [n, ...] in model space and its labels y [n] (None when the model takes none); for a pairs source, each
    row's x_0 [n, ...] (else None: the loss draws it)."""

    x_1: torch.Tensor
    y: torch.Tensor | None
    x_0: torch.Tensor | None = None


def validation_set(manifest: Manifest, split: str, rows: int, labels: str) -> ValidationSet | None:
    """`rows` rows of `split` (all of it when it has fewer), drawn once from `VALIDATION_SEED`; None when rows is 0.
    `labels`: "none" (an unconditional model), "classes" (a class-conditional one) or "data" (snapshot indices)."""
    if rows == 0:
        return None
    data = manifest.data
    files = tuple(manifest.shard_paths(split))
    count = manifest.count(split)
    picked = np.sort(np.random.default_rng(VALIDATION_SEED).permutation(count)[:rows])
    reader = ShardRows(files, group_rows(files), tuple(data.shape), data.kind)
    raw, y = reader.take(picked)
    x_1 = decode_rows(raw, list(data.shape), data.kind)
    if data.kind == "image":
        x_1 = to_model_space(x_1)
    x_0 = sample_noise(data.pairs["seed"], reader.ids(picked), data.model_shape) if data.pairs else None
    return ValidationSet(x_1, None if labels == "none" else torch.from_numpy(y), x_0)


@torch.no_grad()
def validation_loss(
    method: FlowMethod, model: torch.nn.Module, vset: ValidationSet, device: torch.device, batch_size: int = 256
) -> float:
    """The mean per-sample loss of `model` on the set, every draw from the one fixed generator (batch by batch in
    order, so the value does not depend on the device's memory)."""
    g = generator(VALIDATION_SEED)
    total, n = 0.0, vset.x_1.shape[0]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, n, batch_size):
            x_1 = vset.x_1[start : start + batch_size]
            y = None if vset.y is None else vset.y[start : start + batch_size]
            # the draws on the CPU generator, the model on the device: the same value on any device
            if vset.x_0 is None:
                x_0, x_1, y = method.pair(x_1, y, g)
            else:
                x_0, x_1, y = method.coupling(vset.x_0[start : start + batch_size], x_1, y, g)
            loss = method.loss_on_pairs(_Remote(model, device), x_0, x_1, y, g)
            total += float(loss.double().sum())
    finally:
        model.train(was_training)
    return total / n


class _Remote(torch.nn.Module):
    """The model on `device`, called with CPU tensors and answering on the CPU."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        super().__init__()
        self.model, self.device = model, device

    def forward(self, *args, **kwargs):
        move = lambda v: v.to(self.device) if isinstance(v, torch.Tensor) else v  # noqa: E731
        out = self.model(*map(move, args), **{k: move(v) for k, v in kwargs.items()})
        return out.cpu()
