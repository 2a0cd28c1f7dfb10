import pytest
import torch

from fm.paths import (
    SCHEDULERS,
    AffinePath,
    CondOTScheduler,
    GeneralPath,
    NoisyLinearPath,
    VPScheduler,
    make_path,
)

ALL_PATHS = [
    ("ot", {"sigma_min": 1e-3}),
    ("vp", {}),
    ("ve", {}),
    ("cosine", {}),
    ("polynomial", {"n": 3.0}),
]


def _pair(shape=(6, 3, 4, 4), dtype=torch.float64):
    return torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)


@pytest.mark.parametrize("name,kw", ALL_PATHS)
def test_dx_t_matches_finite_difference(name, kw):
    path = make_path(name, **kw)
    x_0, x_1 = _pair()
    t = torch.rand(6, dtype=torch.float64) * 0.9 + 0.05
    h = 1e-6
    fd = (path.sample(x_0, x_1, t + h).x_t - path.sample(x_0, x_1, t - h).x_t) / (2 * h)
    torch.testing.assert_close(path.sample(x_0, x_1, t).dx_t, fd, rtol=1e-6, atol=1e-6)


def test_endpoints():
    x_0, x_1 = _pair()
    zeros, ones = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    sigma_min = 1e-3
    ot = make_path("ot", sigma_min=sigma_min)
    torch.testing.assert_close(ot.sample(x_0, x_1, zeros).x_t, x_0)
    torch.testing.assert_close(ot.sample(x_0, x_1, ones).x_t, x_1 + sigma_min * x_0)
    for name in ("cosine", "polynomial"):
        p = make_path(name)
        torch.testing.assert_close(p.sample(x_0, x_1, zeros).x_t, x_0)
        torch.testing.assert_close(p.sample(x_0, x_1, ones).x_t, x_1)
    vp = make_path("vp")
    # VP: alpha_0 = exp(-T(1)/2) = 0.0066 and sigma_1 = 0, so only the data end is exact.
    torch.testing.assert_close(vp.sample(x_0, x_1, ones).x_t, x_1)
    assert (vp.sample(x_0, x_1, zeros).x_t - x_0).abs().max() < 0.05
    s = vp.scheduler(zeros)
    torch.testing.assert_close(s.alpha_t**2 + s.sigma_t**2, torch.ones_like(zeros))
    ve = make_path("ve", sigma_min=0.01, sigma_max=50.0)
    torch.testing.assert_close(ve.sample(x_0, x_1, ones).x_t, x_1 + 0.01 * x_0)
    torch.testing.assert_close(ve.sample(x_0, x_1, zeros).x_t, x_1 + 50.0 * x_0)


@pytest.mark.parametrize("name,kw", ALL_PATHS)
def test_conversions_round_trip(name, kw):
    path = make_path(name, **kw)
    x_t, pred = _pair()
    t = torch.rand(6, dtype=torch.float64) * 0.8 + 0.1
    kinds = ("velocity", "x_1", "epsilon", "score")
    for a in kinds:
        for b in kinds:
            back = path.convert(path.convert(pred, a, b, x_t, t), b, a, x_t, t)
            torch.testing.assert_close(back, pred, rtol=1e-9, atol=1e-9)


def test_conversions_agree_with_the_conditional_path():
    # For a single pair (x_0, x_1), the conditional velocity converts to exactly x_1 and x_0.
    path = make_path("vp")
    x_0, x_1 = _pair()
    t = torch.rand(6, dtype=torch.float64) * 0.8 + 0.1
    s = path.sample(x_0, x_1, t)
    torch.testing.assert_close(path.convert(s.dx_t, "velocity", "x_1", s.x_t, t), x_1)
    torch.testing.assert_close(path.convert(s.dx_t, "velocity", "epsilon", s.x_t, t), x_0)
    sg = path.scheduler(t).sigma_t.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(path.convert(s.dx_t, "velocity", "score", s.x_t, t), -x_0 / sg)


def test_noisy_linear_paths():
    x_0, x_1 = _pair()
    t = torch.rand(6, dtype=torch.float64) * 0.9 + 0.05
    eps = torch.randn(x_0.shape, generator=torch.Generator().manual_seed(3), dtype=x_0.dtype)

    def g():  # the path's noise comes from the generator passed in: the same seed gives the same eps
        return torch.Generator().manual_seed(3)

    const = NoisyLinearPath(0.1).sample(x_0, x_1, t, g())
    te = t.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(const.x_t, te * x_1 + (1 - te) * x_0 + 0.1 * eps)
    torch.testing.assert_close(const.dx_t, x_1 - x_0)
    bridge = NoisyLinearPath(0.3, "brownian")
    h = 1e-6
    fd = (bridge.sample(x_0, x_1, t + h, g()).x_t - bridge.sample(x_0, x_1, t - h, g()).x_t) / (2 * h)
    torch.testing.assert_close(bridge.sample(x_0, x_1, t, g()).dx_t, fd, rtol=1e-6, atol=1e-6)
    zeros = torch.zeros(6, dtype=torch.float64)
    assert (bridge.sample(x_0, x_1, zeros, g()).x_t - x_0).abs().max() < 1e-2


def test_general_path_dx_t_by_forward_mode():
    # A non-Gaussian path: x_t = x_1 * t^2 + sin(pi t / 2)... with an analytic derivative.
    def transform(x_0, x_1, t):
        te = t.reshape(-1, *([1] * (x_1.dim() - 1)))
        return te**2 * x_1 + torch.cos(torch.pi * te / 2) * torch.tanh(x_0)

    x_0, x_1 = _pair()
    t = torch.rand(6, dtype=torch.float64)
    s = GeneralPath(transform).sample(x_0, x_1, t)
    te = t.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(s.dx_t, 2 * te * x_1 - torch.pi / 2 * torch.sin(torch.pi * te / 2) * torch.tanh(x_0))
    torch.testing.assert_close(s.x_t, transform(x_0, x_1, t))


def test_bad_input_errors():
    with pytest.raises(
        ValueError, match="unknown path 'otp'; allowed: ot, vp, ve, cosine, polynomial, straight, brownian"
    ):
        make_path("otp")
    path = AffinePath(CondOTScheduler())
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match=r"x_0 and x_1 must have the same shape; got \(4, 2\) and \(4, 3\)"):
        path.sample(x, torch.randn(4, 3), torch.rand(4))
    with pytest.raises(ValueError, match="t has 3 entries but the batch has 4 samples"):
        path.sample(x, x, torch.rand(3))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        path.sample(x, x, torch.tensor([0.0, 0.5, 1.5, 0.2]))
    with pytest.raises(ValueError, match=r"t must be a 1-D tensor of shape \[B\]"):
        path.sample(x, x, torch.rand(4, 1))
    with pytest.raises(ValueError, match="sigma_min must be in"):
        CondOTScheduler(1.0)
    with pytest.raises(ValueError, match="beta_min"):
        VPScheduler(2.0, 1.0)
    with pytest.raises(ValueError, match="unknown prediction kind 'noise'"):
        path.convert(x, "noise", "velocity", x, torch.rand(4))
    assert set(SCHEDULERS) == {"ot", "vp", "ve", "cosine", "polynomial"}
