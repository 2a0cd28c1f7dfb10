"""A small CNN classifier whose penultimate features serve sample-quality metrics on small image sets.

A Fréchet distance in these features is "FD (<dataset> classifier)", not FID: Inception-v3 is not involved.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class SmallCNN(nn.Module):
    """x [B, C, H, W] in [-1, 1] -> logits [B, num_classes]; `features(x)` -> [B, feature_dim]."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.GroupNorm(8, width),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.GroupNorm(8, width),
            nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.GroupNorm(8, 2 * width),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.fc = nn.Linear(8 * width, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    @property
    def feature_dim(self) -> int:
        """D, the width of `features(x)`."""
        return self.fc.out_features

    def features(self, x: Tensor) -> Tensor:
        return F.silu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
