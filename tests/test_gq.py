"""The GQ adjoint against direct backprop (float64, tight tolerances), on everything torchdiffeq's
adjoint accepts. Tolerances are set a few times above the observed error so that a wrong sign, a
one-node rule fails them (see test_tolerances_can_fail)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchdiffeq

from impls import GQStats, gauss_legendre, gq_stats, odeint_adjoint_gq, quad_order_from_gtol

DT = torch.float64
CUDA = pytest.param("cuda", marks=[pytest.mark.cuda,
                    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")])  # fmt: skip


class MLP(torch.nn.Module):
    """f(t, y) = MLP([y, t]) with softplus: the paper's vector field, small."""

    def __init__(self, dim=3, width=16, time=True, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.time = time
        self.l1 = torch.nn.Linear(dim + time, width, dtype=DT)
        self.l2 = torch.nn.Linear(width, dim, dtype=DT)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g, dtype=DT) / math.sqrt(p.shape[-1])

    def forward(self, t, y):
        if self.time:
            y = torch.cat([y, t.expand(*y.shape[:-1], 1).to(y.dtype)], -1)
        return self.l2(torch.nn.functional.softplus(self.l1(y)))


class TupleMLP(torch.nn.Module):
    """A tuple state (x, v): second-order dynamics x' = v, v' = MLP(x, v, t)."""

    def __init__(self):
        super().__init__()
        self.net = MLP(dim=4, width=16)

    def forward(self, t, state):
        x, v = state
        acc = self.net(t, torch.cat([x, v], -1))[..., :2]
        return v, acc - 0.1 * x


def _grads(make_sol, y0, t, params, weights=None):
    """Gradients of a loss touching every observation (and t) w.r.t. y0, t and params."""
    sol = make_sol()
    sols = sol if isinstance(sol, tuple) else (sol,)
    ramp = lambda s: torch.linspace(1, 2, len(t), dtype=s.dtype).reshape(-1, *([1] * (s.dim() - 2)))
    loss = sum((s**2).sum() + (s.sum(-1) * ramp(s)).sum() for s in sols)
    y0s = y0 if isinstance(y0, tuple) else (y0,)
    inputs = [*y0s, *params] + ([t] if t.requires_grad else [])
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def _rel_errs(got, ref):
    return [float((g - r).norm() / r.norm().clamp_min(1e-300)) for g, r in zip(got, ref)]


def _problem(state="tensor", direction="forward", times=3, seed=0, device="cpu"):
    torch.manual_seed(seed)
    if state == "tensor":
        func = MLP(seed=seed).to(device)
        y0 = torch.randn(4, 3, dtype=DT, device=device, requires_grad=True)
    else:
        func = TupleMLP().to(device)
        y0 = tuple(torch.randn(4, 2, dtype=DT, device=device, requires_grad=True) for _ in range(2))
    t = torch.sort(torch.rand(times - 2, dtype=DT)).values * 0.8 + 0.1
    t = torch.cat([torch.zeros(1, dtype=DT), t, torch.ones(1, dtype=DT)]).to(device)
    if direction == "backward":
        t = t.flip(0)
    return func, y0, t.requires_grad_(True)


def _reference(func, y0, t):
    """Direct backprop through dopri5 at 1e-12 (dopri5's interpolant is 4th order; dopri8's is not)."""
    return _grads(lambda: torchdiffeq.odeint(func, y0, t, rtol=1e-12, atol=1e-12, method="dopri5"),
                  y0, t, list(func.parameters()))  # fmt: skip


# --------------------------------------------------------------------------- correctness

ADAPTIVE = {"dopri5": 1e-10, "dopri8": 1e-10, "bosh3": 1e-9, "adaptive_heun": 1e-7, "fehlberg2": 1e-7}


@pytest.mark.parametrize("backward_state", ["backsolve", "interpolate"])
@pytest.mark.parametrize("state", ["tensor", "tuple"])
@pytest.mark.parametrize("method", list(ADAPTIVE))
def test_adaptive_solvers_match_direct_backprop(method, state, backward_state):
    tol = ADAPTIVE[method]
    func, y0, t = _problem(state, times=4)
    params = list(func.parameters())
    ref = _reference(func, y0, t)
    got = _grads(lambda: odeint_adjoint_gq(func, y0, t, rtol=tol, atol=tol, method=method, quad_order=6,
                                           backward_state=backward_state), y0, t, params)  # fmt: skip
    # Continuous-adjoint and quadrature errors both scale with the solver tolerance.
    assert max(_rel_errs(got, ref)) < 2e4 * tol


@pytest.mark.parametrize("backward_state", ["backsolve", "interpolate"])
@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("state", ["tensor", "tuple"])
def test_direction_state_and_many_irregular_times(direction, state, backward_state):
    func, y0, t = _problem(state, direction, times=9, seed=1)
    ref = _reference(func, y0, t)
    got = _grads(lambda: odeint_adjoint_gq(func, y0, t, rtol=1e-10, atol=1e-10, quad_order=5,
                                           backward_state=backward_state), y0, t, list(func.parameters()))  # fmt: skip
    errs = _rel_errs(got, ref)
    assert max(errs) < 1e-6, errs


# (method, options, observation times, tolerance): fixed grids have a discretisation error that
# direct backprop differentiates exactly and the continuous adjoint does not; tolerances follow order.
FIXED = [
    ("euler", {"step_size": 1e-3}, 3, 2e-2),
    ("midpoint", {"step_size": 5e-3}, 3, 1e-4),
    ("heun3", {"step_size": 1e-2}, 3, 1e-5),
    ("rk4", {"step_size": 1e-2}, 3, 1e-5),  # bound by the forward's linear output interpolation
    ("rk4", None, 41, 1e-5),  # no step_size: the grid is t itself
    ("midpoint", None, 101, 1e-3),
    ("explicit_adams", {"step_size": 5e-3}, 3, 1e-4),
    ("implicit_adams", {"step_size": 1e-2}, 3, 1e-4),
]


@pytest.mark.parametrize("backward_state", ["backsolve", "interpolate"])
@pytest.mark.parametrize(("method", "options", "times", "tol"), FIXED)
def test_fixed_grid_solvers(method, options, times, tol, backward_state):
    func, y0, t = _problem("tensor", times=times, seed=2)
    if times > 10:
        t = torch.linspace(0, 1, times, dtype=DT, requires_grad=True)
    ref = _reference(func, y0, t)
    got = _grads(lambda: odeint_adjoint_gq(func, y0, t, method=method, options=options, quad_order=4,
                                           backward_state=backward_state), y0, t, list(func.parameters()))  # fmt: skip
    errs = _rel_errs(got, ref)
    assert max(errs) < tol, errs


def test_quadrature_error_falls_with_order():
    func, y0, t = _problem("tensor", times=2, seed=3)
    t = t.detach()
    ref = _reference(func, y0, t)
    errs = []
    for n in (1, 2, 3, 5, 8):
        got = _grads(lambda n=n: odeint_adjoint_gq(func, y0, t, rtol=1e-12, atol=1e-12, quad_order=n),
                     y0, t, list(func.parameters()))  # fmt: skip
        errs.append(max(_rel_errs(got[1:], ref[1:])))  # parameter gradients carry the quadrature error
    assert errs[0] > 1e-5, errs  # one node is visibly wrong (the paper's ~1e-3)
    assert errs[0] > 10 * errs[1] > 100 * errs[3] > 1000 * errs[4], errs
    assert errs[4] < 1e-9, errs


def test_tolerances_can_fail():
    """The bounds above are tight enough to catch the original code's one-node rule."""
    func, y0, t = _problem("tensor", times=4, seed=0)
    ref = _reference(func, y0, t)
    one_node = _grads(lambda: odeint_adjoint_gq(func, y0, t, rtol=1e-10, atol=1e-10, quad_order=1),
                      y0, t, list(func.parameters()))  # fmt: skip
    assert max(_rel_errs(one_node, ref)) > 2e4 * 1e-10  # the adaptive-solver bound
    assert max(_rel_errs(one_node, ref)) > 1e-6  # the direction/state bound


def test_unused_parameters_get_zero_gradient():
    func = MLP()
    func.unused = torch.nn.Parameter(torch.ones(3, dtype=DT))
    y0 = torch.randn(2, 3, dtype=DT)
    t = torch.tensor([0.0, 1.0], dtype=DT)
    odeint_adjoint_gq(func, y0, t, rtol=1e-6, atol=1e-6)[-1].sum().backward()
    assert func.unused.grad is not None and torch.equal(func.unused.grad, torch.zeros(3, dtype=DT))
    assert func.l1.weight.grad.abs().sum() > 0


def test_plain_callable_with_adjoint_params():
    w = torch.randn(3, 3, dtype=DT, requires_grad=True)
    frozen = torch.randn(3, dtype=DT)  # no grad: returned as no gradient, not an error

    def f(t, y):
        return torch.tanh(y @ w) * torch.cos(t) + frozen

    y0 = torch.randn(5, 3, dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 2.0], dtype=DT)
    loss = lambda sol: (sol**2).sum()
    ref = torch.autograd.grad(loss(torchdiffeq.odeint(f, y0, t, rtol=1e-12, atol=1e-12)), (y0, w))
    got = torch.autograd.grad(loss(odeint_adjoint_gq(f, y0, t, rtol=1e-10, atol=1e-10, quad_order=10,
                                                     adjoint_params=(w, frozen))), (y0, w))  # fmt: skip
    assert max(_rel_errs(got, ref)) < 1e-7


def test_gradcheck_tiny_problem():
    g = torch.Generator().manual_seed(0)
    b1, w2 = torch.randn(4, dtype=DT, generator=g), torch.randn(2, 4, dtype=DT, generator=g) / 2
    t = torch.tensor([0.0, 0.4, 1.0], dtype=DT)

    def fn(y0, w1):
        def f(tt, y):
            return torch.nn.functional.softplus(torch.cat([y, tt.expand(*y.shape[:-1], 1)], -1) @ w1.T + b1) @ w2.T

        # rk4 on a fixed grid is a smooth map of the inputs, so finite differences are clean.
        return odeint_adjoint_gq(f, y0, t, method="rk4", options={"step_size": 0.01}, quad_order=8,
                                 adjoint_params=(w1,))  # fmt: skip

    y0 = torch.randn(1, 2, dtype=DT, generator=g, requires_grad=True)
    w1 = (torch.randn(4, 3, dtype=DT, generator=g) / 2).requires_grad_(True)
    # atol covers the continuous-vs-discrete gradient gap of rk4 at h = 0.01 (~1e-8).
    assert torch.autograd.gradcheck(fn, (y0, w1), atol=1e-6, rtol=1e-5)


def test_float32_close_to_float64_reference():
    func, y0, t = _problem("tensor", times=3, seed=4)
    ref = _reference(func, y0, t.detach())
    func32 = MLP(seed=4).float()
    y32 = y0.detach().float().requires_grad_(True)
    t32 = t.detach().float()
    got = _grads(lambda: odeint_adjoint_gq(func32, y32, t32, rtol=1e-6, atol=1e-6), y32, t32, list(func32.parameters()))
    assert all(g.dtype == torch.float32 for g in got)
    assert max(_rel_errs([g.double() for g in got], ref[:1] + ref[1:])) < 1e-3


# --------------------------------------------------------------------------- contractive dynamics


class Relax(torch.nn.Module):
    """dz/dt = -k (z - c sin t): contractive, so backsolving z backwards blows up as exp(k T)."""

    def __init__(self, k, c=1.0):
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(k, dtype=DT))
        self.c = torch.nn.Parameter(torch.tensor(c, dtype=DT))

    def forward(self, t, z):
        return -self.k * (z - self.c * torch.sin(t))


def test_interpolate_survives_contractive_dynamics_where_backsolve_cannot():
    func = Relax(k=100.0)
    y0 = torch.tensor([2.0, -1.0], dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 5.0], dtype=DT)  # k * T = 500
    params = list(func.parameters())

    def grads(sol):
        return torch.autograd.grad((sol[-1] ** 2).sum(), [y0, *params])

    ref = grads(torchdiffeq.odeint(func, y0, t, rtol=1e-10, atol=1e-10))
    got = grads(odeint_adjoint_gq(func, y0, t, rtol=1e-6, atol=1e-8, backward_state="interpolate"))
    assert all(torch.isfinite(g).all() for g in got)
    assert max(_rel_errs(got[1:], ref[1:])) < 1e-3
    assert float((got[0] - ref[0]).abs().max()) < 1e-6  # dL/dy0 ~ exp(-500): only an absolute check means anything
    # Backsolving z amplifies the forward error by exp(kT): torchdiffeq's adjoint ends up non-finite or
    # (float64, here) with dL/dk tens of times further off than the tolerance.
    bad = grads(torchdiffeq.odeint_adjoint(func, y0, t, rtol=1e-6, atol=1e-8))
    assert not all(torch.isfinite(g).all() for g in bad) or _rel_errs(bad[1:], ref[1:])[0] > 1e-2
    # GQ's backsolve sees z leave the forward's range, says so and keeps the forward solution instead.
    with gq_stats() as stats, pytest.warns(RuntimeWarning, match="backward_state='interpolate'"):
        recovered = grads(odeint_adjoint_gq(func, y0, t, rtol=1e-6, atol=1e-8, backward_state="backsolve"))
    assert stats.backsolve_fallbacks == 1
    for a, b in zip(recovered, got):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- quadrature and stats


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 64])
def test_gauss_legendre_exact_to_degree_2n_minus_1(n):
    x, w = gauss_legendre(n)
    rng = np.random.default_rng(n)
    coef = rng.standard_normal(2 * n)  # degree 2n-1
    poly = np.polynomial.Polynomial(coef)
    exact = poly.integ()(1.0) - poly.integ()(-1.0)
    assert abs(float((w * torch.as_tensor(poly(x.numpy()))).sum()) - exact) < 1e-12 * max(1.0, abs(exact)) * n
    if n <= 7:  # ...and not beyond: the squared node polynomial (degree 2n) integrates to 0 under the rule.
        node_poly = np.polynomial.Polynomial.fromroots(x.numpy()) ** 2
        assert float((w * torch.as_tensor(node_poly(x.numpy()))).sum()) < 1e-12
        assert node_poly.integ()(1.0) - node_poly.integ()(-1.0) > 1e-6


def test_nodes_cached_per_dtype_device():
    assert gauss_legendre(5, torch.float32) is gauss_legendre(5, torch.float32)
    assert gauss_legendre(5, torch.float32)[0].dtype == torch.float32
    assert gauss_legendre(5, torch.float64) is not gauss_legendre(5, torch.float32)


def test_quad_order_rule():
    assert quad_order_from_gtol(0.1, 100, 0.5, 1.0) == 5
    assert quad_order_from_gtol(0.1, 3, 0.01, 1.0) == 1  # never below one node
    assert quad_order_from_gtol(1.0, 10_000, 1.0, 1.0) == 64  # capped


class CountingMLP(MLP):
    def forward(self, t, y):
        self.calls = getattr(self, "calls", 0) + 1
        return super().forward(t, y)


def test_stats_report_nfe_and_orders_without_module_attributes():
    func = MLP()
    y0 = torch.randn(3, 3, dtype=DT)
    t = torch.tensor([0.0, 0.25, 1.0], dtype=DT)
    counter = CountingMLP()
    counter.load_state_dict(func.state_dict())
    with torch.no_grad():
        torchdiffeq.odeint(counter, y0, t, rtol=1e-6, atol=1e-6)
    with gq_stats() as stats:
        sol = odeint_adjoint_gq(func, y0, t, rtol=1e-6, atol=1e-6, gtol=0.3)
    assert isinstance(stats, GQStats) and not hasattr(func, "nfe")
    assert stats.nfe_forward == counter.calls
    sol.sum().backward()  # outside the with block: stats were bound at forward time
    nfe = stats.nfe_forward
    assert stats.quad_orders == [quad_order_from_gtol(0.3, nfe, 0.25, 1.0), quad_order_from_gtol(0.3, nfe, 0.75, 1.0)]
    assert stats.quad_nodes == sum(stats.quad_orders)
    assert stats.quad_calls == 1  # one batched call for all intervals (small state: one chunk)
    assert stats.nfe_backward > 0


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_warm_start_saves_backward_evaluations_not_accuracy(direction):
    func, y0, t = _problem("tensor", direction, times=5, seed=6)
    ref = _reference(func, y0, t)
    errs, nfe = {}, {}
    for warm in (True, False):

        def solve(warm=warm):
            return odeint_adjoint_gq(func, y0, t, rtol=1e-8, atol=1e-8, quad_order=6, warm_start=warm)

        with gq_stats() as stats:
            got = _grads(solve, y0, t, list(func.parameters()))
        errs[warm], nfe[warm] = max(_rel_errs(got, ref)), stats.nfe_backward
    assert nfe[True] < nfe[False], nfe
    assert errs[True] < 1e-5 and errs[False] < 1e-5, errs


def test_vmap_fallback_for_unbatchable_func():
    func = MLP()

    def f(t, y):  # .item() cannot run under vmap
        return func(t, y) * (1.0 + 0.0 * float(t.item()))

    y0 = torch.randn(2, 3, dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=DT)
    params = list(func.parameters())
    ref = torch.autograd.grad(torchdiffeq.odeint(func, y0, t, rtol=1e-12, atol=1e-12).pow(2).sum(), [y0, *params])
    with pytest.warns(RuntimeWarning, match="one at a time"), gq_stats() as stats:
        sol = odeint_adjoint_gq(f, y0, t, rtol=1e-10, atol=1e-10, quad_order=5, adjoint_params=params)
        got = torch.autograd.grad(sol.pow(2).sum(), [y0, *params])
    assert stats.vmap_fallback
    assert max(_rel_errs(got, ref)) < 1e-7


# --------------------------------------------------------------------------- bad input


def _call(**kw):
    func = MLP()
    args = dict(func=func, y0=torch.zeros(2, 3, dtype=DT), t=torch.tensor([0.0, 1.0], dtype=DT))
    args.update(kw)
    return odeint_adjoint_gq(args.pop("func"), args.pop("y0"), args.pop("t"), **args)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(method="rk45"), ValueError, r"method='rk45'.*unknown solver.*dopri5"),
        (dict(adjoint_method="nope"), ValueError, r"adjoint_method='nope'.*unknown solver"),
        (dict(gtol=0.0), ValueError, r"gtol=0.0.*> 0"),
        (dict(gtol=-1), ValueError, r"gtol=-1"),
        (dict(gtol=float("nan")), ValueError, r"gtol=nan"),
        (dict(quad_order=0), ValueError, r"quad_order=0.*>= 1"),
        (dict(quad_order=2.5), ValueError, r"quad_order=2.5"),
        (dict(rtol=0.0), ValueError, r"rtol=0.0.*tolerances"),
        (dict(atol=-1e-6), ValueError, r"atol=-1e-06"),
        (dict(t=torch.zeros(2, 2, dtype=DT)), ValueError, r"t=.*1-D"),
        (dict(t=torch.tensor([0.0], dtype=DT)), ValueError, r"at least two"),
        (dict(t=torch.tensor([0.0, 1.0, 1.0], dtype=DT)), ValueError, r"strictly increasing or strictly decreasing"),
        (dict(t=torch.tensor([0.0, 1.0, 0.5], dtype=DT)), ValueError, r"strictly"),
        (dict(t=[0.0, 1.0]), TypeError, r"t must be"),
        (dict(y0=torch.zeros(2, 3, dtype=torch.long)), TypeError, r"y0 must be a floating-point"),
        (dict(func=lambda t, y: y), TypeError, r"adjoint_params=None.*not an nn.Module.*adjoint_params="),
        (dict(gtol=0.1, quad_order=4), ValueError, r"gtol=0.1.*exclude each other"),
        (dict(quadrature="gauss"), ValueError, r"quadrature='gauss'.*'adaptive', 'gtol', 'fixed'"),
        (dict(quadrature="fixed"), ValueError, r"quadrature='fixed'.*quad_order=n"),
        (dict(quadrature="adaptive", gtol=0.1), ValueError, r"quadrature='adaptive'.*gtol selects"),
        (dict(gtol=0.1, quad_rtol=1e-6), ValueError, r"quad_rtol=1e-06.*adaptive rule only"),
        (dict(quad_atol=0.0), ValueError, r"quad_atol=0.0.*tolerances"),
        (dict(event_fn=3), TypeError, r"event_fn=3.*callable"),
        (dict(backward_state="forward"), ValueError, r"backward_state='forward'.*'backsolve', 'interpolate'"),
        (dict(quad_batch=0), ValueError, r"quad_batch=0"),
        (dict(warm_start="yes"), TypeError, r"warm_start='yes'.*True or False"),
        (dict(options=[1]), TypeError, r"options=\[1\]"),
    ],
)
def test_bad_input_names_argument_and_fix(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        _call(**kwargs)


def test_identity_with_no_params_is_fine_when_asked_explicitly():
    y0 = torch.ones(2, dtype=DT, requires_grad=True)
    sol = odeint_adjoint_gq(lambda t, y: -y, y0, torch.tensor([0.0, 1.0], dtype=DT), adjoint_params=())
    sol[-1].sum().backward()
    assert torch.allclose(y0.grad, torch.full((2,), math.exp(-1.0), dtype=DT), rtol=1e-6)


# --------------------------------------------------------------------------- CUDA


@pytest.mark.parametrize("backward_state", ["backsolve", "interpolate"])
@pytest.mark.parametrize("device", [CUDA])
def test_cuda_matches_cpu(device, backward_state):
    func, y0, t = _problem("tensor", times=4, seed=5)
    ref = _reference(func, y0, t)
    fc = MLP(seed=5).to(device)
    y0c = y0.detach().to(device).requires_grad_(True)
    tc = t.detach().to(device).requires_grad_(True)
    got = _grads(lambda: odeint_adjoint_gq(fc, y0c, tc, rtol=1e-10, atol=1e-10, quad_order=6,
                                           backward_state=backward_state), y0c, tc, list(fc.parameters()))  # fmt: skip
    assert all(g.device.type == "cuda" for g in got)
    assert max(_rel_errs([g.cpu() for g in got], ref)) < 1e-6


@pytest.mark.parametrize(
    ("kw", "kept"),
    [
        (dict(), True),  # dopri5 both ways: z read off the kept forward
        (dict(method="bosh3", adjoint_method="dopri8"), True),
        (dict(method="rk4", options=dict(step_size=0.05)), False),  # fixed grids backsolve
        (dict(adjoint_method="scipy_solver", adjoint_options=dict(solver="RK45")), False),
    ],
)
def test_auto_backward_state_keeps_the_forward_for_adaptive_solvers_only(kw, kept):
    """backward_state="auto" (the default) is "interpolate" when the forward and adjoint solvers are both
    adaptive Runge-Kutta, "backsolve" otherwise; either way the gradient is the one asked for explicitly."""
    func, y0, t = _problem()
    params = list(func.parameters())
    tol = dict(rtol=1e-8, atol=1e-9, **kw)
    with gq_stats() as s:
        got = _grads(lambda: odeint_adjoint_gq(func, y0, t, **tol), y0, t, params)
    assert (s.knots > 0) == kept, s
    same = _grads(lambda: odeint_adjoint_gq(func, y0, t, backward_state="interpolate" if kept else "backsolve", **tol),
                  y0, t, params)  # fmt: skip
    for a, b in zip(got, same):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_solved_alone_starts_with_the_forwards_step_or_three_quarters_of_it():
    """Warm start with z read off the forward: a's first step is the forward's step at t_N where that step spans
    the interval (one backward step: 7 dopri5 evaluations, as backsolving takes), else the longer of 3/4 of it and
    the interval split evenly (a's error has its own scale: the full step was rejected on trained wide fields, 6
    evaluations lost)."""
    func, y0, t = _problem("tensor", times=2, seed=1)
    t = t.detach()  # no t-gradient: its evaluations would count too
    stats = {}
    for state in ("auto", "backsolve"):
        with gq_stats() as s:
            _grads(lambda state=state: odeint_adjoint_gq(func, y0, t, rtol=1e-3, atol=1e-3, backward_state=state),
                   y0, t, list(func.parameters()))  # fmt: skip
        stats[state] = s
    assert stats["auto"].knots > 0 and stats["auto"].nfe_backward == stats["backsolve"].nfe_backward == 7, stats
    from impls._gq import _a_first_step

    assert _a_first_step(1.3, 1.0) == 1.3 and _a_first_step(0.46, 1.0) == 0.75 * 0.46
    assert _a_first_step(0.55, 1.0) == 0.5  # h fits twice: two even steps, not 3/4 of h and two more
