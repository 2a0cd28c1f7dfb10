"""Time embeddings shared by the models."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10_000.0, scale: float = 1000.0) -> Tensor:
    """Transformer-style features of t [B] in [0, 1], shape [B, dim].

    t is scaled by `scale` (1000) so that the lowest frequencies still separate nearby times in [0, 1]; a model
    whose time derivative enters its loss (an Action Matching action) wants a small scale, i.e. smooth features.
    """
    half = dim // 2
    dtype = t.dtype if t.is_floating_point() else torch.float32
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=dtype) / half)
    args = scale * t.to(dtype)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimeEmbedding(nn.Module):
    """Sinusoidal features followed by a two-layer MLP: t [B] -> [B, out_dim]."""

    def __init__(self, freq_dim: int, out_dim: int, scale: float = 1000.0):
        super().__init__()
        self.freq_dim, self.scale = freq_dim, scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(sinusoidal_embedding(t, self.freq_dim, scale=self.scale))


def check_time(x: Tensor, t: Tensor) -> Tensor:
    """Accept t as [B] or a scalar (broadcast to [B]); return it as [B] on x's device and dtype."""
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must have shape [B] = [{x.shape[0]}]; got {tuple(t.shape)}")
    return t.to(device=x.device, dtype=x.dtype)


def with_interval(cond: Tensor, embed: TimeEmbedding | None, x: Tensor, t: Tensor, r: Tensor | None) -> Tensor:
    """t's embedding `cond` [B, D] plus a two-time model's embedding of the interval r - t (r = None: r = t, the
    instantaneous velocity); a one-time model (embed None) returns `cond` itself and refuses an r."""
    if embed is None:
        if r is not None:
            raise ValueError("this model takes one time; build it with two_times=True to give it an interval end r")
        return cond
    return cond + embed(torch.zeros_like(t) if r is None else check_time(x, r) - t)


def labels_or_null(y: Tensor | None, batch: int, num_classes: int | None, device: torch.device) -> Tensor:
    """Class labels [B] as long; None means the null (unconditional) class, index num_classes."""
    if num_classes is None:
        raise ValueError("an unconditional model takes no class labels")
    if y is None:
        return torch.full((batch,), num_classes, dtype=torch.long, device=device)
    if y.numel() and (y.min() < 0 or y.max() > num_classes):
        raise ValueError(
            f"labels must be in [0, {num_classes}] ({num_classes} is the null class); "
            f"got values in [{y.min().item()}, {y.max().item()}]"
        )
    return y.long()
