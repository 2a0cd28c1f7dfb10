"""Riemannian Flow Matching's geometry with analytic answers: exp/log, geodesics, the manifold sampler, the
Riemannian change of variables on fields whose transported density is known in closed form, and the toy sets'
densities."""

import math

import pytest
import torch

from fm.likelihood import LikelihoodSettings
from fm.manifold_data import manifold_of, manifold_set_log_prob, sample_manifold_set
from fm.manifolds import FlatTorus, Sphere, get_manifold, wrap
from fm.methods import make_method
from fm.models import MLP
from fm.riemannian import geodesic_wasserstein2, manifold_log_likelihood, manifold_ode_sample
from fm.seeding import SeedStack

G = torch.Generator


def _points(manifold, n, seed):
    return manifold.random_uniform(n, G().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("manifold", [Sphere(2), Sphere(3), FlatTorus(2)], ids=lambda m: m.label)
def test_exp_log_round_trip_and_geodesic(manifold):
    x, y = _points(manifold, 64, 0), _points(manifold, 64, 1)
    torch.testing.assert_close(manifold.projx(manifold.expmap(x, manifold.logmap(x, y))), y, atol=1e-6, rtol=0)
    torch.testing.assert_close(manifold.logmap(x, y).norm(dim=1), manifold.dist(x, y), atol=1e-9, rtol=0)
    t = torch.rand(64, generator=G().manual_seed(2), dtype=torch.float64)
    x_t, dx_t = manifold.geodesic(x, y, t)
    torch.testing.assert_close(manifold.projx(x_t), x_t, atol=1e-9, rtol=0)  # on the manifold
    # a constant-speed minimising geodesic: d(x_0, x_t) = t d(x_0, x_1), speed |dx_t| = d(x_0, x_1)
    torch.testing.assert_close(manifold.dist(x, x_t), t * manifold.dist(x, y), atol=1e-6, rtol=0)
    torch.testing.assert_close(dx_t.norm(dim=1), manifold.dist(x, y), atol=1e-9, rtol=0)
    # dx_t is the time derivative (central differences), and it is tangent at x_t
    h = 1e-6
    ahead, behind = manifold.geodesic(x, y, t + h)[0], manifold.geodesic(x, y, t - h)[0]
    torch.testing.assert_close(manifold.logmap(behind, ahead) / (2 * h), dx_t, atol=1e-5, rtol=0)
    torch.testing.assert_close(manifold.proju(x_t, dx_t), dx_t, atol=1e-9, rtol=0)
    torch.testing.assert_close(manifold.geodesic(x, y, torch.ones(64, dtype=torch.float64))[0], y, atol=1e-6, rtol=0)


def test_manifold_specs_and_volumes():
    assert get_manifold("sphere2").log_volume() == pytest.approx(math.log(4 * math.pi))
    assert get_manifold("sphere1").log_volume() == pytest.approx(math.log(2 * math.pi))
    assert get_manifold("torus2").log_volume() == pytest.approx(2 * math.log(2 * math.pi))
    with pytest.raises(ValueError, match="unknown manifold 'klein2'; allowed: sphereD, torusD"):
        get_manifold("klein2")
    with pytest.raises(ValueError, match=r"row 1 = \[2.0, 0.0, 0.0\] is not on S\^2"):
        Sphere(2).check_points(torch.tensor([[1.0, 0, 0], [2.0, 0, 0]]))
    with pytest.raises(ValueError, match=r"need shape \[N, 2\]"):
        FlatTorus(2).check_points(torch.zeros(3, 3))


def _rotation(omega):
    """The rotation field about the z axis, omega e_z x x: tangent and divergence-free on S^2."""
    return lambda x, t: omega * torch.stack([-x[:, 1], x[:, 0], torch.zeros_like(x[:, 0])], 1)


def test_exp_map_rk4_stays_on_the_sphere_and_follows_a_rotation():
    sphere = Sphere(2)
    x_0 = _points(sphere, 100, 3)
    res = manifold_ode_sample(_rotation(1.3), sphere, x_0, "rk4", steps=40)
    assert res.nfe == 160  # 4 evaluations a step
    torch.testing.assert_close(res.x_1.norm(dim=1), torch.ones(100, dtype=torch.float64), atol=1e-12, rtol=0)
    c, s = math.cos(1.3), math.sin(1.3)
    rotated = x_0 @ torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=torch.float64).T
    torch.testing.assert_close(res.x_1, rotated, atol=1e-6, rtol=0)
    euler = manifold_ode_sample(_rotation(1.3), sphere, x_0, "euler", steps=40)
    assert euler.nfe == 40 and (euler.x_1 - rotated).abs().max() > 1e-3  # first order: visibly worse
    with pytest.raises(ValueError, match="steps off the manifold"):
        manifold_ode_sample(_rotation(1.0), sphere, x_0, "heun3", steps=4)


def test_likelihood_of_the_gradient_flow_on_the_sphere():
    """dx/dt = P(x) e_z moves the uniform density along z: z_t = tanh(atanh z_0 + t), so p_1 at x_1 is
    (1 / 4 pi) (1 - z_0^2) / (1 - z_1^2); the divergence of the field is -2 z."""
    sphere = Sphere(2)
    e_z = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    fn = lambda x, t: sphere.proju(x, e_z.expand_as(x))  # noqa: E731
    x_1 = _points(sphere, 50, 4)
    x_1 = x_1[x_1[:, 2].abs() < 0.95]
    z_1 = x_1[:, 2]
    z_0 = torch.tanh(torch.atanh(z_1) - 1)
    expected = -math.log(4 * math.pi) + torch.log((1 - z_0**2) / (1 - z_1**2))
    res = manifold_log_likelihood(fn, sphere, x_1, LikelihoodSettings(atol=1e-9, rtol=1e-9))
    torch.testing.assert_close(res.log_p, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(res.x_0[:, 2], z_0, atol=1e-6, rtol=0)
    # Hutchinson's estimate of the ambient trace is unbiased for the Riemannian divergence too: 64 probes a point
    hutch = manifold_log_likelihood(
        fn, sphere, x_1, LikelihoodSettings("hutchinson", num_probes=64, atol=1e-7, rtol=1e-7), G().manual_seed(0)
    )
    assert (hutch.log_p - expected).mean().abs().item() < 0.05
    assert (hutch.log_p - expected).abs().max().item() < 0.5
    # a rotation keeps the uniform density uniform
    res = manifold_log_likelihood(_rotation(2.0), sphere, x_1, LikelihoodSettings(atol=1e-9, rtol=1e-9))
    torch.testing.assert_close(res.log_p, torch.full_like(z_1, -math.log(4 * math.pi)), atol=1e-7, rtol=0)


def test_likelihood_on_the_torus():
    """dtheta/dt = sin(theta) per angle: tan(theta_t / 2) = tan(theta_0 / 2) e^t, so the uniform density becomes
    prod (1 / 2 pi) dtheta_0 / dtheta_1 with dtheta_0 / dtheta_1 = sin(theta_0) / sin(theta_1)."""
    torus = FlatTorus(2)
    x_1 = _points(torus, 60, 5)
    x_1 = x_1[(x_1.abs() > 0.1).all(1) & (x_1.abs() < math.pi - 0.1).all(1)]
    x_0 = 2 * torch.atan(torch.tan(x_1 / 2) * math.exp(-1.0))
    expected = -2 * math.log(2 * math.pi) + torch.log(torch.sin(x_0) / torch.sin(x_1)).sum(1)
    res = manifold_log_likelihood(lambda x, t: torch.sin(x), torus, x_1, LikelihoodSettings(atol=1e-9, rtol=1e-9))
    torch.testing.assert_close(res.log_p, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(res.x_0, x_0, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["vmf-mixture", "dihedral"])
def test_manifold_sets_are_normalised_and_match_their_samples(name):
    manifold = manifold_of(name)
    if name == "dihedral":  # a 600 x 600 grid on [-pi, pi)^2
        g = torch.linspace(-math.pi, math.pi, 601, dtype=torch.float64)[:-1] + math.pi / 600
        grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
        mass = manifold_set_log_prob(name, grid).exp().sum().item() * (2 * math.pi / 600) ** 2
        assert mass == pytest.approx(1.0, abs=1e-6)
    else:  # importance sampling from the uniform sphere: standard error about 1e-3
        u = manifold.random_uniform(1_000_000, G().manual_seed(0), dtype=torch.float64)
        mass = manifold_set_log_prob(name, u).exp().mean().item() * 4 * math.pi
        assert mass == pytest.approx(1.0, abs=5e-3)
    x = sample_manifold_set(name, 50_000, G().manual_seed(1))
    manifold.check_points(x)
    # samples and density agree: E_samples[log p] against E_p[log p] by importance weights from the uniform
    u = manifold.random_uniform(400_000, G().manual_seed(2), dtype=torch.float64)
    lp = manifold_set_log_prob(name, u)
    expected = (lp.exp() * lp).mean().item() * math.exp(manifold.log_volume())
    assert manifold_set_log_prob(name, x).mean().item() == pytest.approx(expected, abs=0.03)


def test_tangent_mlp_and_the_rfm_method():
    torch.manual_seed(0)
    sphere_net = MLP(3, 32, 2, manifold="sphere2")
    x = Sphere(2).random_uniform(16, G().manual_seed(0))
    v = sphere_net(x, torch.rand(16))
    torch.testing.assert_close((v * x).sum(1), torch.zeros(16), atol=1e-6, rtol=0)  # tangent
    torus_net = MLP(2, 32, 2, manifold="torus2")
    a = FlatTorus(2).random_uniform(16, G().manual_seed(1))
    t = torch.rand(16)
    torch.testing.assert_close(torus_net(a, t), torus_net(a + 2 * math.pi, t), atol=1e-5, rtol=0)  # periodic
    with pytest.raises(ValueError, match=r"an MLP on S\^2 needs dim = out_dim = 3"):
        MLP(2, 32, 2, manifold="sphere2")
    method = make_method("rfm", manifold="torus2")
    x_0 = method.draw_x0(SeedStack([5, 6]), [2])
    torch.testing.assert_close(x_0[1:], method.draw_x0(SeedStack([6]), [2]))  # row k from seed k alone
    assert x_0.abs().max() <= math.pi
    loss = method.loss(torus_net, sample_manifold_set("dihedral", 32, G().manual_seed(2)), None, G().manual_seed(3))
    assert loss.shape == (32,) and torch.isfinite(loss).all()
    with pytest.raises(ValueError, match="'rfm' needs data on a manifold"):
        make_method("rfm")
    with pytest.raises(ValueError, match="data on the manifold 'sphere2' need a Riemannian method"):
        make_method("otcfm", manifold="sphere2")


def test_geodesic_w2_uses_the_short_way_round():
    torus = FlatTorus(1)
    x = torch.tensor([[math.pi - 0.05]])
    y = torch.tensor([[-math.pi + 0.05]])
    assert geodesic_wasserstein2(torus, x, y) == pytest.approx(0.1, abs=1e-6)  # not 2 pi - 0.1
    assert wrap(torch.tensor([math.pi])).item() == pytest.approx(-math.pi)


@pytest.mark.parametrize("manifold", [Sphere(2), FlatTorus(2)], ids=lambda m: m.label)
def test_rfm_loss_is_zero_for_the_geodesic_velocity_and_positive_otherwise(manifold):
    from fm.riemannian import rfm_loss

    x_0, x_1 = _points(manifold, 64, 0), _points(manifold, 64, 1)
    t = torch.rand(64, generator=G().manual_seed(2), dtype=torch.float64) * 0.9

    class TowardX1(torch.nn.Module):
        """The conditional field of the pairs: at x_t, the geodesic velocity log_{x_t}(x_1) / (1 - t)."""

        def __init__(self, scale=1.0):
            super().__init__()
            self.scale = scale

        def forward(self, x_t, t, y=None):
            return self.scale * manifold.logmap(x_t, x_1) / (1 - t)[:, None]

    torch.testing.assert_close(
        rfm_loss(TowardX1(), manifold, x_0, x_1, t=t), torch.zeros(64, dtype=torch.float64), rtol=0, atol=1e-10
    )
    # half the speed: the loss is the squared error (|dx_t| / 2)^2 averaged over coordinates, |dx_t| = d(x_0, x_1)
    want = (manifold.dist(x_0, x_1) / 2) ** 2 / x_0.shape[1]
    torch.testing.assert_close(rfm_loss(TowardX1(0.5), manifold, x_0, x_1, t=t), want, rtol=1e-8, atol=1e-10)


def test_a_method_samples_and_scores_in_its_own_space():
    # the batch stages ask the method, never its kind: on the sphere its steps stay on the sphere and its
    # likelihood is the Riemannian one; a Euclidean method's is torchdiffeq's; snapshot methods draw no noise
    from fm.likelihood import log_likelihood
    from fm.solvers import ode_sample

    def rotate(x, t):  # a tangent field of S^2: rotation about the z axis, divergence 0
        return torch.stack([-x[:, 1], x[:, 0], torch.zeros_like(x[:, 0])], dim=1)

    sphere = make_method("rfm", manifold="sphere2")
    x_0 = sphere.draw_x0(SeedStack([1, 2, 3, 4]), [3]).double()
    moved = sphere.sample(rotate, x_0, "rk4", steps=20)
    torch.testing.assert_close(moved.x_1.norm(dim=1), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(moved.x_1, manifold_ode_sample(rotate, get_manifold("sphere2"), x_0, "rk4", 20).x_1)
    settings = LikelihoodSettings("exact", solver="rk4", steps=20)
    log_p = sphere.log_likelihood(rotate, x_0, settings).log_p  # measure-preserving: the uniform density 1/(4 pi)
    torch.testing.assert_close(log_p, torch.full((4,), -math.log(4 * math.pi), dtype=torch.float64))

    flat = make_method("fm_ot")
    x = torch.randn(5, 2, dtype=torch.float64)
    field = lambda x, t: -x  # noqa: E731
    torch.testing.assert_close(
        flat.sample(field, x, "euler", steps=10).x_1, ode_sample(field, x, "euler", steps=10, t_1=flat.t_max).x_1
    )
    torch.testing.assert_close(flat.log_likelihood(field, x, settings).log_p, log_likelihood(field, x, settings).log_p)
    assert sphere.draws_noise and flat.draws_noise
    assert not make_method("am", times=[0.0, 0.5, 1.0]).draws_noise
