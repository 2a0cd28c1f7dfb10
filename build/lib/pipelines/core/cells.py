"""The parquet cell format of every stage.

A row's `image` cell holds raw bytes: uint8 pixels in HWC order for images, float32 values for points. Ingest writes
them, training and evaluation read them, and sampling writes its outputs the same way. The pixel scale (uint8 to
model space [-1, 1] and back) is `fm.data.to_model_space` / `fm.data.to_uint8`.
"""

from __future__ import annotations

import numpy as np
import torch


def row_bytes(shape: list[int] | tuple[int, ...], kind: str = "image") -> int:
    """Bytes of one cell: uint8 per pixel of an image, float32 per coordinate of a point."""
    return int(np.prod(shape)) * (1 if kind == "image" else 4)


def decode_rows(raw, shape: list[int], kind: str = "image") -> torch.Tensor:
    """Parquet `image` cells (raw bytes per row, or their bytes as uint8 [B, row bytes]) to a batch: uint8
    [B, C, H, W] for HWC images, float32 [B, D] for points."""
    as_array = isinstance(raw, np.ndarray) and raw.dtype == np.uint8
    buf = np.ascontiguousarray(raw) if as_array else np.frombuffer(b"".join(raw), np.uint8)
    arr = buf.reshape(-1).view(np.uint8 if kind == "image" else np.float32).reshape(-1, *shape).copy()
    return torch.from_numpy(arr).permute(0, 3, 1, 2) if kind == "image" else torch.from_numpy(arr)


def encode_rows(x: torch.Tensor, kind: str = "image") -> list[bytes]:
    """A batch to parquet `image` cells: uint8 [B, C, H, W] images as HWC bytes, or points [B, D] as float32."""
    if kind == "image":
        return [row.tobytes() for row in x.to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()]
    return [row.tobytes() for row in x.float().cpu().numpy()]
