"""MLP velocity / score model for low-dimensional data."""

from __future__ import annotations

from torch import Tensor, nn

from fm.manifolds import get_manifold
from fm.models.embeddings import TimeEmbedding, check_time, labels_or_null, with_interval


class MLP(nn.Module):
    """x [B, dim], t [B] (, y [B], r [B]) -> [B, out_dim]. Time (and class) embeddings are added to every hidden layer.

    Args:
        dim: data dimension. hidden: width. depth: hidden layers. time_dim: sinusoidal feature size.
        num_classes: if set, a class embedding with an extra null class (index num_classes) for CFG.
        manifold: a `fm.manifolds.get_manifold` spec ("sphere2", "torus2"): the network reads the manifold's
            features of x (cos and sin of torus angles) and its output is projected to the tangent space at x, so
            it is a tangent field (Riemannian Flow Matching). dim must be the manifold's coordinate dimension.
        out_dim: output size, dim by default; 1 gives a scalar (an action s(x, t) for Action Matching).
        time_scale: the time features' scale (`fm.models.embeddings.sinusoidal_embedding`); an action, whose time
            derivative is part of its loss, needs smooth features (e.g. 1), and so does a MeanFlow model.
        two_times: a second time r [B] (MeanFlow's end of the interval, `fm.meanflow`): its embedding of r - t is
            added to t's; r = None means r = t. Off, the model is unchanged and refuses r.
    """

    def __init__(
        self,
        dim: int = 2,
        hidden: int = 256,
        depth: int = 3,
        time_dim: int = 64,
        num_classes: int | None = None,
        manifold: str | None = None,
        out_dim: int | None = None,
        time_scale: float = 1000.0,
        two_times: bool = False,
    ):
        super().__init__()
        if dim < 1 or hidden < 1 or depth < 1:
            raise ValueError(f"MLP needs dim, hidden, depth >= 1; got {dim}, {hidden}, {depth}")
        self.dim, self.num_classes = dim, num_classes
        self.manifold = get_manifold(manifold) if manifold else None
        if self.manifold is not None and (self.manifold.ambient_dim != dim or out_dim not in (None, dim)):
            raise ValueError(
                f"an MLP on {self.manifold.label} needs dim = out_dim = {self.manifold.ambient_dim}; "
                f"got dim={dim}, out_dim={out_dim}"
            )
        self.time_embed = TimeEmbedding(time_dim, hidden, time_scale)
        self.interval_embed = TimeEmbedding(time_dim, hidden, time_scale) if two_times else None
        self.class_embed = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        self.inp = nn.Linear(self.manifold.feature_dim if self.manifold else dim, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.out = nn.Linear(hidden, out_dim or dim)
        self.act = nn.SiLU()

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, r: Tensor | None = None) -> Tensor:
        t = check_time(x, t)
        cond = with_interval(self.time_embed(t), self.interval_embed, x, t, r)
        if self.class_embed is not None:
            cond = cond + self.class_embed(labels_or_null(y, x.shape[0], self.num_classes, x.device))
        h = self.inp(self.manifold.features(x) if self.manifold else x)
        for layer in self.layers:
            h = layer(self.act(h + cond))
        out = self.out(self.act(h))
        return self.manifold.proju(x, out) if self.manifold else out
