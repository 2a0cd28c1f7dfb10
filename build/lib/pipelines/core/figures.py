"""Figures and tables for MLflow artifacts: image grids, point scatters, any matplotlib figure written to a PNG,
and rows written to a CSV."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch


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


def save_points_figure(panels: list[tuple[str, np.ndarray]], path: str | Path, manifold: str | None = None) -> Path:
    """Scatter plots of point sets [N, D] side by side, one (title, points) per panel, as a PNG.

    On S^2 the panels use Lambert's cylindrical equal-area projection (longitude against z = sin(latitude)), so the
    density of dots is the density on the sphere; on T^2 the angles (phi, psi) on [-pi, pi)^2; otherwise the
    first two coordinates.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False)
    for ax, (title, x) in zip(axes[0], panels, strict=True):
        if manifold == "sphere2":
            ax.scatter(np.arctan2(x[:, 1], x[:, 0]), x[:, 2], s=1, alpha=0.4)
            ax.set(xlim=(-math.pi, math.pi), ylim=(-1, 1), xlabel="longitude (rad)", ylabel="z = sin(latitude)")
        elif manifold == "torus2":
            ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.4)
            ax.set(xlim=(-math.pi, math.pi), ylim=(-math.pi, math.pi), xlabel="phi (rad)", ylabel="psi (rad)")
        else:
            ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.4)
        ax.set_title(title)
    return save_figure(fig, path)


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def write_csv(rows: list[dict], path: str | Path, columns: list[str] | None = None) -> Path:
    """`rows` as a CSV with a header (the first row's keys; `columns` when there are no rows), floats at repr."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(rows[0]) if rows else list(columns or [])
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return path
