"""impls' Wong–Zakai neural SDE: the noise's covariance, GQ gradients through the ODE, the torchsde transfer."""

from __future__ import annotations

import math

import pytest
import torch
import torchdiffeq
from torch import nn

import impls

torchsde = pytest.importorskip("torchsde", reason="the sde extra (torchsde) is not installed")


class MLPt(nn.Module):
    """(t, x) -> R^d, two softplus hidden layers (the paper's drift/diffusion net)."""

    def __init__(self, dim: int, width: int, dtype=torch.float64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim + 1, width, dtype=dtype), nn.Softplus(), nn.Linear(width, width, dtype=dtype),
            nn.Softplus(), nn.Linear(width, dim, dtype=dtype),
        )  # fmt: skip

    def forward(self, t, x):
        tt = torch.as_tensor(t, dtype=x.dtype).expand(*x.shape[:-1], 1)
        return self.net(torch.cat([x, tt], -1))


def _integrated_basis(noise: impls.WongZakaiNoise, ts: torch.Tensor) -> torch.Tensor:
    """int_{t0}^{t} xi for every coefficient at once (Z = identity), by solving dW/dt = xi(t) numerically."""
    noise.coeffs = torch.eye(noise.ncosines, dtype=torch.float64)
    w0 = torch.zeros(noise.ncosines, dtype=torch.float64)
    return torchdiffeq.odeint(lambda t, w: noise(t), w0, ts, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("t0, t1", [(0.0, 1.0), (0.0, 10.0)])
def test_integrated_noise_has_brownian_covariance(t0, t1):
    # W_N(t) = int xi = sum_n Z_n b_n(t), so Cov(W_N(s), W_N(t)) = b(s).b(t) exactly; it must approach
    # min(s, t) - t0 (Brownian motion's) as N grows, with the truncation error falling like 1/N.
    ts = torch.linspace(t0, t1, 11, dtype=torch.float64)
    target = torch.minimum(ts[:, None], ts[None, :]) - t0
    errors = []
    for n in (5, 25, 125):
        noise = impls.WongZakaiNoise(n, t0, t1, (n,), dtype=torch.float64)
        b = _integrated_basis(noise, ts)
        cov = b @ b.T
        errors.append(float((cov - target).abs().max()) / (t1 - t0))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 2e-3 and errors[0] > 5 * errors[2]
    # The variance at t1 is exact only in the limit; the closed form integral agrees with the numerical one.
    noise = impls.WongZakaiNoise(7, t0, t1, (3, 2), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w = torchdiffeq.odeint(lambda t, w: noise(t), torch.zeros(3, 2, dtype=torch.float64), ts, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w[-1], noise.brownian(ts[-1]), rtol=1e-8, atol=1e-8)


def test_noise_sampling_is_seeded_and_standard_normal():
    a = impls.WongZakaiNoise(10, 0.0, 2.0, (4000, 3), generator=torch.Generator().manual_seed(3))
    b = impls.WongZakaiNoise(10, 0.0, 2.0, (4000, 3), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a(torch.tensor(0.7)), b(torch.tensor(0.7)))
    before = a(torch.tensor(0.7)).clone()
    assert not torch.equal(a.resample()(torch.tensor(0.7)), before)
    # Var W_N(t1) over 12000 sample paths ~ (t1 - t0) (truncation: ~2c / (pi^2 N) = 4% low at N = 10).
    var = a.brownian(torch.tensor(2.0)).var().item()
    assert 1.8 < var < 2.05


def test_noise_vmaps_over_nodes():
    noise = impls.WongZakaiNoise(10, 0.0, 1.0, (5, 2), generator=torch.Generator().manual_seed(0))
    ts = torch.linspace(0, 1, 7)
    batched = torch.func.vmap(noise)(ts)
    torch.testing.assert_close(batched, torch.stack([noise(t) for t in ts]))


def _sde_pair(width=8, seed=0):
    torch.manual_seed(seed)
    return MLPt(1, width), MLPt(1, width)


def test_gq_gradients_through_wong_zakai_ode_match_direct_backprop():
    drift, diffusion = _sde_pair()
    noise = impls.WongZakaiNoise(10, 0.0, 2.0, (6, 1), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ode = impls.wong_zakai_ode(drift, diffusion, noise)
    y0 = torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(6, 1)
    t = torch.linspace(0, 2, 9, dtype=torch.float64)
    params = list(ode.parameters())
    assert len(params) == 12  # drift's and diffusion's, not the noise coefficients

    def grads(solve, **kw):
        y = solve(ode, y0, t, rtol=1e-10, atol=1e-10, **kw)
        loss = (y.mean(1) ** 2).sum() + y.std(1).sum()
        return torch.autograd.grad(loss, params)

    with impls.gq_stats() as stats:
        gq = grads(impls.odeint_adjoint_gq, quad_order=8)
    direct = grads(torchdiffeq.odeint)
    assert stats.quad_calls > 0 and not stats.vmap_fallback  # the batched quadrature evaluated the noise
    for g, d in zip(gq, direct):
        torch.testing.assert_close(g, d, rtol=1e-6, atol=1e-9)


def _ou_moments(x0: float, ts: torch.Tensor):
    """Mean and variance of dX = (0.2t - 0.1X) dt + (0.6 + 0.15t) dW: dm/dt = 0.2t - 0.1m, dv/dt = -0.2v + g^2."""

    def rhs(t, mv):
        return torch.stack([0.2 * t - 0.1 * mv[0], -0.2 * mv[1] + (0.6 + 0.15 * t) ** 2])

    mv = torchdiffeq.odeint(rhs, torch.tensor([x0, 0.0], dtype=torch.float64), ts, rtol=1e-10, atol=1e-10)
    return mv[:, 0], mv[:, 1]


def test_torchsde_transfer_samples_the_known_ou_marginals():
    # f and g set to the true coefficients: reversible Heun at dt = 0.01 must sample the closed-form marginals.
    drift = lambda t, x: 0.2 * t - 0.1 * x
    diffusion = lambda t, x: (0.6 + 0.15 * t) * torch.ones_like(x)
    sde = impls.stratonovich_sde(drift, diffusion)
    n = 4000
    y0 = torch.full((n, 1), 1.5, dtype=torch.float64)
    ts = torch.linspace(0, 10, 11, dtype=torch.float64)
    with torch.no_grad():
        ys = impls.sample_sde(sde, y0, ts, dt=0.01, seed=7)[..., 0]
    mean, var = _ou_moments(1.5, ts)
    # Monte-Carlo error: std(mean) = sqrt(var / n), std(var) = var sqrt(2 / n) (~2.2%); 4 sigma.
    assert ((ys.mean(1) - mean).abs() <= 4 * (var / n).sqrt() + 1e-12).all()
    assert ((ys[1:].var(1) / var[1:] - 1).abs() < 4 * math.sqrt(2 / n)).all()
    assert sde.nfe > 0
    again = impls.sample_sde(sde, y0, ts, dt=0.01, seed=7)[..., 0]
    torch.testing.assert_close(again, ys)  # seeded Brownian path


def test_torchsde_adjoint_runs_through_the_transfer():
    drift, diffusion = _sde_pair(width=4)
    sde = impls.stratonovich_sde(drift, diffusion)
    y0 = torch.zeros(3, 1, dtype=torch.float64)
    ts = torch.linspace(0, 1, 5, dtype=torch.float64)
    g_direct = torch.autograd.grad(impls.sample_sde(sde, y0, ts, dt=0.05, seed=1).sum(), list(sde.parameters()))
    ys = impls.sample_sde(sde, y0, ts, dt=0.05, seed=1, adjoint=True, adjoint_params=tuple(sde.parameters()))
    g_adj = torch.autograd.grad(ys.sum(), list(sde.parameters()))
    # Reversible Heun's adjoint reverses the forward steps algebraically: the gradients match backprop
    # closely (seen here: ~2e-5 relative, from the Brownian interval's reconstruction, not the solver).
    for a, b in zip(g_adj, g_direct):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, None])
def test_bad_ncosines_is_one_line(bad):
    with pytest.raises(ValueError, match=r"^WongZakaiNoise\(ncosines=.*\): ncosines must be an int >= 1") as e:
        impls.WongZakaiNoise(bad, 0.0, 1.0, (2, 1))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("bad", [0, -0.01, float("nan"), float("inf"), 20.0, "0.01"])
def test_bad_dt_is_one_line(bad):
    sde = impls.stratonovich_sde(lambda t, x: -x, lambda t, x: torch.ones_like(x))
    with pytest.raises(ValueError, match=r"^sample_sde\(dt=.*\): dt must be a number in \(0, 10\]") as e:
        impls.sample_sde(sde, torch.zeros(2, 1), torch.linspace(0, 10, 3), dt=bad)
    assert "\n" not in str(e.value)
