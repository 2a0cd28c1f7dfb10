"""Models sharing the signature forward(x [B, ...], t [B], y [B] | None) -> [B, ...]."""

from __future__ import annotations

from torch import nn

from fm.models.analytic import GaussianOTFlow
from fm.models.mlp import MLP
from fm.models.unet import UNet

MODELS: dict[str, type[nn.Module]] = {"mlp": MLP, "unet": UNet, "gaussian_ot": GaussianOTFlow}

__all__ = ["MLP", "UNet", "GaussianOTFlow", "MODELS", "build_model"]


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a model by name ("mlp", "unet", "gaussian_ot") from keyword arguments (e.g. a checkpoint's)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODELS)}")
    for key in ("channel_mult", "attention_resolutions"):
        if key in kwargs and isinstance(kwargs[key], list):
            kwargs[key] = tuple(kwargs[key])  # JSON and YAML give lists
    try:
        return MODELS[name](**kwargs)
    except TypeError as err:
        raise ValueError(f"bad arguments for model {name!r}: {err}") from None
