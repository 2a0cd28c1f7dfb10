"""Image grids for MLflow artifacts."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def decode_rows(raw, shape: list[int], kind: str = "image") -> torch.Tensor:
    """Parquet `image` cells (raw bytes per row) to a batch: uint8 [B, C, H, W] for HWC images, float32 [B, D]
    for points."""
    if kind == "image":
        arr = np.frombuffer(b"".join(raw), np.uint8).reshape(-1, *shape)
        return torch.from_numpy(arr.copy()).permute(0, 3, 1, 2)
    return torch.from_numpy(np.frombuffer(b"".join(raw), np.float32).reshape(-1, *shape).copy())


def save_grid(images: torch.Tensor, path: str | Path, scale: int = 4) -> Path:
    """Save uint8 images [N, C, H, W] as one PNG grid (nearest-neighbour upscaled by `scale`)."""
    from PIL import Image

    n, c, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + 1) + 1, cols * (w + 1) + 1, c), dtype=np.uint8)
    arr = images.permute(0, 2, 3, 1).cpu().numpy()
    for i in range(n):
        r, q = divmod(i, cols)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w] = arr[i]
    grid = grid.repeat(scale, 0).repeat(scale, 1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[:, :, 0] if c == 1 else grid).save(path)
    return path
