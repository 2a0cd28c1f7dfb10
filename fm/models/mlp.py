"""MLP velocity / score model for low-dimensional data."""

from __future__ import annotations

from torch import Tensor, nn

from fm.models.embeddings import TimeEmbedding, check_time, labels_or_null


class MLP(nn.Module):
    """x [B, dim], t [B] (, y [B]) -> [B, dim]. Time (and class) embeddings are added to every hidden layer.

    Args:
        dim: data dimension. hidden: width. depth: hidden layers. time_dim: sinusoidal feature size.
        num_classes: if set, a class embedding with an extra null class (index num_classes) for CFG.
    """

    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 3, time_dim: int = 64,
                 num_classes: int | None = None):
        super().__init__()
        if dim < 1 or hidden < 1 or depth < 1:
            raise ValueError(f"MLP needs dim, hidden, depth >= 1; got {dim}, {hidden}, {depth}")
        self.dim, self.num_classes = dim, num_classes
        self.time_embed = TimeEmbedding(time_dim, hidden)
        self.class_embed = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        self.inp = nn.Linear(dim, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.out = nn.Linear(hidden, dim)
        self.act = nn.SiLU()

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        t = check_time(x, t)
        cond = self.time_embed(t)
        if self.class_embed is not None:
            cond = cond + self.class_embed(labels_or_null(y, x.shape[0], self.num_classes, x.device))
        h = self.inp(x)
        for layer in self.layers:
            h = layer(self.act(h + cond))
        return self.out(self.act(h))

