"""ADM-style UNet (Dhariwal & Nichol 2021), sized by configuration, for images [B, C, H, W]."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fm.models.embeddings import TimeEmbedding, check_time, labels_or_null, with_interval


def _zero(layer: nn.Conv1d | nn.Conv2d) -> None:
    """Weights and bias to 0: the layer outputs 0 until trained (a block starts as the identity)."""
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def _norm(channels: int) -> nn.GroupNorm:
    # 32 groups as in ADM when the width allows it; otherwise the largest divisor that does.
    groups = math.gcd(32, channels)
    return nn.GroupNorm(groups, channels)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the embedding applied as scale and shift of the second norm."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)
        self.norm2, self.drop = _norm(c_out), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        _zero(self.conv2)  # each block starts as the identity
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention channels {channels} not divisible by num_heads {num_heads}")
        self.norm, self.heads = _norm(channels), num_heads
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = nn.Conv1d(channels, channels, 1)
        _zero(self.proj)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, c, h * w))
        q, k, v = qkv.reshape(b, 3, self.heads, c // self.heads, h * w).permute(1, 0, 2, 4, 3)
        out = F.scaled_dot_product_attention(q, k, v)  # [b, heads, hw, c/heads]
        out = out.permute(0, 1, 3, 2).reshape(b, c, h * w)
        return x + self.proj(out).reshape(b, c, h, w)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Stage(nn.ModuleList):
    """A sequence of blocks that each take (x, emb)."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        for block in self:
            x = block(x, emb)
        return x


class UNet(nn.Module):
    """x [B, C, H, W], t [B] (, y [B]) -> [B, C, H, W].

    Args:
        image_size: H = W; must be divisible by 2^(len(channel_mult) - 1).
        in_channels: C.
        model_channels: base width; level i has model_channels * channel_mult[i] channels.
        num_res_blocks: residual blocks per level.
        attention_resolutions: resolutions (e.g. 16 or 8) at which self-attention follows each block.
        dropout: dropout in residual blocks.
        num_heads: attention heads.
        num_classes: if set, class conditioning with a null class (index num_classes) for classifier-free
            guidance; y = None selects the null class.
        two_times: a second time r [B] (MeanFlow's end of the interval, `fm.meanflow`), embedded as r - t beside t;
            r = None means r = t. Off, the model is unchanged and refuses r.
        time_scale: the time features' scale (`fm.models.embeddings.sinusoidal_embedding`); a MeanFlow model, whose
            time derivative its target takes, trains better with smooth features (e.g. 1; `fm.meanflow`).
    """

    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 3,
        model_channels: int = 128,
        channel_mult: tuple[int, ...] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: tuple[int, ...] = (16,),
        dropout: float = 0.1,
        num_heads: int = 4,
        num_classes: int | None = None,
        two_times: bool = False,
        time_scale: float = 1000.0,
    ):
        super().__init__()
        levels = len(channel_mult)
        if levels < 1 or image_size % (2 ** (levels - 1)):
            raise ValueError(
                f"image_size {image_size} must be divisible by 2^(len(channel_mult)-1) = {2 ** (levels - 1)}"
            )
        if model_channels < 1 or num_res_blocks < 1:
            raise ValueError(f"need model_channels, num_res_blocks >= 1; got {model_channels}, {num_res_blocks}")
        self.image_size, self.in_channels, self.num_classes = image_size, in_channels, num_classes
        emb_dim = 4 * model_channels
        self.time_embed = TimeEmbedding(model_channels, emb_dim, time_scale)
        self.interval_embed = TimeEmbedding(model_channels, emb_dim, time_scale) if two_times else None
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.inp = nn.Conv2d(in_channels, model_channels, 3, padding=1)

        def stage(c_in: int, c_out: int, res: int) -> list[nn.Module]:
            blocks: list[nn.Module] = [ResBlock(c_in, c_out, emb_dim, dropout)]
            if res in attention_resolutions:
                blocks.append(AttentionBlock(c_out, num_heads))
            return blocks

        self.down = nn.ModuleList()
        skips, ch, res = [model_channels], model_channels, image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(_Stage(stage(ch, model_channels * mult, res)))
                ch = model_channels * mult
                skips.append(ch)
            if level < levels - 1:
                self.down.append(_Stage([Downsample(ch)]))
                skips.append(ch)
                res //= 2
        self.mid = _Stage(
            [ResBlock(ch, ch, emb_dim, dropout), AttentionBlock(ch, num_heads), ResBlock(ch, ch, emb_dim, dropout)]
        )
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                blocks = stage(ch + skips.pop(), model_channels * mult, res)
                ch = model_channels * mult
                if level > 0 and i == num_res_blocks:
                    blocks.append(Upsample(ch))
                    res *= 2
                self.up.append(_Stage(blocks))
        last = nn.Conv2d(ch, in_channels, 3, padding=1)
        _zero(last)
        self.out = nn.Sequential(_norm(ch), nn.SiLU(), last)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, r: Tensor | None = None) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[-1] != self.image_size:
            raise ValueError(
                f"UNet expects [B, {self.in_channels}, {self.image_size}, {self.image_size}]; got {tuple(x.shape)}"
            )
        t = check_time(x, t)
        emb = with_interval(self.time_embed(t), self.interval_embed, x, t, r).to(x.dtype)
        if self.class_embed is not None:
            emb = emb + self.class_embed(labels_or_null(y, x.shape[0], self.num_classes, x.device)).to(x.dtype)
        h = self.inp(x)
        hs = [h]
        for stage in self.down:
            h = stage(h, emb)
            hs.append(h)
        h = self.mid(h, emb)
        for stage in self.up:
            h = stage(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)
