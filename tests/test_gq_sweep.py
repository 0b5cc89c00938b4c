"""The backward pass as one solve across observation times, and one batched quadrature over all
intervals: the same steps as torchdiffeq on one interval, the same gradient as interval-by-interval
solves, batched calls that do not change the sums, and the recovery when backsolving z fails."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torchdiffeq
from torchdiffeq._impl.odeint import SOLVERS

from impls import gq_stats, odeint_adjoint_gq
from impls._sweep import SweepFailed, sweep

DT = torch.float64


class Field(torch.nn.Module):
    """A small MLP of (t, y): smooth, oscillating enough that the steps vary along the path."""

    def __init__(self, dim: int = 3, width: int = 16, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.nn.Parameter(torch.randn(dim + 1, width, generator=g, dtype=DT) * 0.8)
        self.w2 = torch.nn.Parameter(torch.randn(width, dim, generator=g, dtype=DT) * 0.5)
        self.b = torch.nn.Parameter(torch.zeros(dim, dtype=DT))

    def forward(self, t, y):
        ty = torch.cat([y, torch.ones_like(y[..., :1]) * torch.sin(2 * t)], -1)
        return torch.tanh(ty @ self.w1) @ self.w2 + self.b


class Counting:
    def __init__(self, f):
        self.f, self.n = f, 0

    def __call__(self, t, y):
        self.n += 1
        with torch.no_grad():
            return self.f(t, y)


class Accepting(Counting):
    """Also records torchdiffeq's accepted steps (its solver callback)."""

    def __init__(self, f):
        super().__init__(f)
        self.starts = []

    def callback_accept_step(self, t0, y0, dt):
        self.starts.append((float(t0), y0.clone()))


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "dopri8", "adaptive_heun"])
@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_sweep_takes_torchdiffeq_steps_on_one_interval(method, direction):
    """Cold start, one interval: torchdiffeq's accepted steps (to rounding: 1e-7), except that the last one is
    shortened to end on the interval's end (torchdiffeq steps past it and interpolates back)."""
    f = Field()
    y0 = torch.randn(4, 3, dtype=DT, generator=torch.Generator().manual_seed(1))
    span = [0.0, 3.0 * direction]
    ours, theirs = Counting(f), Accepting(f)
    out = torchdiffeq.odeint(theirs, y0, torch.tensor(span, dtype=DT), rtol=1e-6, atol=1e-7, method=method)[-1]
    # `sweep` walks times[-1] -> times[0]
    path = sweep(ours, y0, span[::-1], lambda i, y: y, solver_cls=SOLVERS[method], rtol=1e-6, atol=1e-7,
                 options={}, first_step=None)  # fmt: skip
    # landing on the end may save torchdiffeq's last step
    assert len(theirs.starts) > 5 and path.steps in (len(theirs.starts), len(theirs.starts) - 1)
    k = path.steps - 1  # the steps before the (possibly shortened) last one
    starts = path.dense.t0.tolist()  # ascending in t
    starts = starts if direction > 0 else starts[::-1]
    assert [abs(s) for s in starts[:k]] == pytest.approx([abs(t0) for t0, _ in theirs.starts[:k]], rel=1e-8, abs=1e-12)
    for s, (_, y) in zip(starts[:k], theirs.starts[:k]):
        # to rounding, which differs between instruction sets (dopri8 backwards on AVX-512: 1.9e-8)
        torch.testing.assert_close(path.dense(torch.tensor([s], dtype=DT))[0], y, rtol=1e-7, atol=1e-9)
    exact = torchdiffeq.odeint(f, y0, torch.tensor(span, dtype=DT), rtol=1e-12, atol=1e-12, method="dopri8")[-1]
    # landing on the end is no less accurate than interpolating back to it
    assert (path.end - exact).norm() <= max(2 * (out - exact).norm(), 1e-7 * exact.norm())
    assert ours.n <= theirs.n + 1


def _grads(run, f, y0, t):
    f.zero_grad()
    y0 = y0.clone().requires_grad_(True)
    ys = run(f, y0, t)
    (ys**2).sum().backward()
    return torch.cat([p.grad.reshape(-1) for p in f.parameters()] + [y0.grad.reshape(-1)])


def _chained(f, y0, t, **kw):
    """Interval by interval: one GQ call (its own backward solve, started afresh) per interval."""
    ys, y = [y0], y0
    for i in range(1, len(t)):
        y = odeint_adjoint_gq(f, y, t[i - 1 : i + 1], **kw)[-1]
        ys.append(y)
    return torch.stack(ys)


@pytest.mark.parametrize("backward_state", ["backsolve", "interpolate"])
def test_carried_step_size_gives_the_gradient_of_interval_by_interval_solves(backward_state):
    f = Field()
    y0 = torch.randn(5, 3, dtype=DT, generator=torch.Generator().manual_seed(2))
    # Seeded: the observation times once came from the global generator, so from whatever ran before; with
    # these the one sweep saves 36-54 evaluations, far from a rounding-level change of the step sequence.
    draw = torch.rand(11, dtype=DT, generator=torch.Generator().manual_seed(9))
    t = torch.cat([torch.zeros(1, dtype=DT), torch.sort(draw * 6).values])
    # Interpolating z, a alone is solved with atol scaled by max|dL/dy| / max|y|, which differs between one
    # solve and the chained calls (each sees its own cotangents): a negligible atol keeps them comparable.
    kw = dict(rtol=1e-8, atol=1e-8 if backward_state == "backsolve" else 1e-14, backward_state=backward_state)
    with gq_stats() as one:
        g_one = _grads(lambda f_, y_, t_: odeint_adjoint_gq(f_, y_, t_, **kw), f, y0, t)
    with gq_stats() as many:
        g_many = _grads(lambda f_, y_, t_: _chained(f_, y_, t_, **kw), f, y0, t)
    ref = _grads(lambda f_, y_, t_: torchdiffeq.odeint(f_, y_, t_, rtol=1e-12, atol=1e-12, method="dopri8"), f, y0, t)
    assert float((g_one - g_many).norm() / g_many.norm()) < 1e-6
    assert float((g_one - ref).norm() / ref.norm()) < 1e-6
    # one solve: no restart per observation time (the warm start, then carried step sizes)
    assert one.nfe_backward < many.nfe_backward


def test_all_intervals_share_batched_quadrature_calls():
    f = Field()
    y0 = torch.randn(2, 3, dtype=DT, generator=torch.Generator().manual_seed(3))
    t = torch.linspace(0.0, 4.0, 21, dtype=DT)
    with gq_stats() as whole:
        g_whole = _grads(lambda f_, y_, t_: odeint_adjoint_gq(f_, y_, t_, rtol=1e-7, atol=1e-7), f, y0, t)
    assert len(whole.quad_orders) == 20 and all(n >= 1 for n in whole.quad_orders)
    assert whole.quad_calls == 1 and whole.quad_nodes == sum(whole.quad_orders)
    with gq_stats() as chunked:
        g_chunked = _grads(
            lambda f_, y_, t_: odeint_adjoint_gq(f_, y_, t_, rtol=1e-7, atol=1e-7, quad_batch=3), f, y0, t
        )
    assert chunked.quad_nodes == whole.quad_nodes and chunked.quad_calls == math.ceil(whole.quad_nodes / 3)
    torch.testing.assert_close(g_chunked, g_whole, rtol=1e-12, atol=1e-14)
    # the paper's rule goes through the same batched call
    with gq_stats() as paper:
        odeint_adjoint_gq(f, y0, t, rtol=1e-7, atol=1e-7, gtol=0.1).sum().backward()
    assert paper.quad_calls == 1 and len(paper.quad_orders) == 20


class VanDerPol(torch.nn.Module):
    def __init__(self, mu: float = 5.0):
        super().__init__()
        self.mu = torch.nn.Parameter(torch.tensor(mu, dtype=DT))

    def forward(self, t, y):
        x, v = y[..., 0], y[..., 1]
        return torch.stack([v, self.mu * (1 - x**2) * v - x], -1)


def test_backsolve_failure_falls_back_to_the_forward_solution():
    """Van der Pol, mu = 5: backsolving z leaves the attracting limit cycle and the step size underflows
    (torchdiffeq's adjoint stops there); GQ solves the forward again, keeps it and interpolates z."""
    f = VanDerPol()
    y0 = torch.tensor([[2.0, 0.0]], dtype=DT)
    t = torch.linspace(0.0, 12.0, 4, dtype=DT)
    with pytest.raises(AssertionError, match="underflow in dt"):
        _grads(lambda f_, y_, t_: torchdiffeq.odeint_adjoint(f_, y_, t_, rtol=1e-6, atol=1e-6), f, y0, t)
    with pytest.raises(SweepFailed):
        with torch.no_grad():
            yT = torchdiffeq.odeint(f, y0, t, rtol=1e-6, atol=1e-6)[-1]
        sweep(Counting(f), yT, t.tolist(), lambda i, y: y, solver_cls=SOLVERS["dopri5"], rtol=1e-6, atol=1e-6,
              options={}, first_step=None)  # fmt: skip
    ref = _grads(lambda f_, y_, t_: torchdiffeq.odeint(f_, y_, t_, rtol=1e-12, atol=1e-12, method="dopri8"), f, y0, t)
    with gq_stats() as stats, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g = _grads(lambda f_, y_, t_: odeint_adjoint_gq(f_, y_, t_, rtol=1e-8, atol=1e-8, backward_state="backsolve"),
                   f, y0, t)  # fmt: skip
    assert stats.backsolve_fallbacks == 1
    assert any("backward_state='interpolate'" in str(w.message) for w in caught)
    assert float((g - ref).norm() / ref.norm()) < 1e-5
    with gq_stats() as direct_interp, warnings.catch_warnings():
        warnings.simplefilter("error")  # asked for directly: no failed attempt, no warning
        g2 = _grads(lambda f_, y_, t_: odeint_adjoint_gq(f_, y_, t_, rtol=1e-8, atol=1e-8,
                                                        backward_state="interpolate"), f, y0, t)  # fmt: skip
    assert direct_interp.backsolve_fallbacks == 0
    torch.testing.assert_close(g2, g, rtol=1e-10, atol=1e-12)


def test_environment_records_the_gq_defaults_without_importing_torch():
    import subprocess
    import sys

    code = ("import sys; from gqbench.measurement.env import environment; e = environment(); "
            "assert 'torch' not in sys.modules; print(e['gq_defaults'])")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "'warm_start': True" in out and "'quadrature': 'adaptive'" in out


@pytest.mark.parametrize("backward_state", ["backsolve", "interpolate"])
def test_a_large_state_probed_at_a_sample_keeps_the_gradient_and_the_nodes(monkeypatch, backward_state):
    """States above PROBE_SAMPLE elements are probed at a fixed sample (the cost of the probes was the
    image model's backward); on a batch whose rows differ, the chosen nodes and the gradient stay those of
    probing every element, and both stay at direct backprop's gradient."""
    import impls._panels as panels

    f = Field(dim=3, width=16)
    g = torch.Generator().manual_seed(3)
    y0 = (torch.randn(1200, 3, dtype=DT, generator=g) * 1.5).requires_grad_(True)  # 3600 elements
    t = torch.tensor([0.0, 0.7, 2.0, 4.0], dtype=DT)
    params = list(f.parameters())

    def grads(solve):
        out = solve(f, y0, t)
        return torch.autograd.grad(out[1:].pow(2).mean(), [*params, y0])

    ref = grads(lambda *a: torchdiffeq.odeint(*a, rtol=1e-10, atol=1e-10))
    direct = grads(lambda *a: torchdiffeq.odeint(*a, rtol=1e-7, atol=1e-8))
    err_direct = max(float((x - r).norm() / r.norm()) for x, r in zip(direct, ref))  # ~7e-5
    runs = {}
    for sample in (panels.PROBE_SAMPLE, 10**9):
        monkeypatch.setattr(panels, "PROBE_SAMPLE", sample)
        with gq_stats() as st:
            got = grads(lambda *a: odeint_adjoint_gq(*a, rtol=1e-7, atol=1e-8, backward_state=backward_state))
        err = max(float((x - r).norm() / r.norm()) for x, r in zip(got, ref))
        runs[sample] = (err, st.quad_nodes)
    (err_s, nodes_s), (err_all, nodes_all) = runs.values()
    assert err_all < 5 * err_direct  # backsolve 2e-5, interpolate 2e-4 (its z read off the forward's steps)
    assert abs(nodes_s - nodes_all) <= 0.1 * nodes_all and err_s < 1.2 * err_all + 1e-9


def test_hermite_interpolant_slope_and_element_selection():
    from impls._dense import CubicHermite

    t = torch.linspace(0, 2, 7, dtype=DT)
    y = torch.stack([torch.sin(t), t**3], 1).reshape(7, 1, 2)
    f = torch.stack([torch.cos(t), 3 * t**2], 1).reshape(7, 1, 2)
    h = CubicHermite(t, y, list(f))
    s = torch.tensor([0.1, 0.77, 1.5, 1.99], dtype=DT)
    eps = 1e-6
    fd = (h(s + eps) - h(s - eps)) / (2 * eps)
    assert torch.allclose(h.derivative(s), fd, atol=1e-7)
    assert torch.allclose(h.derivative(s)[:, 0, 1], 3 * s**2, atol=1e-12)  # a cubic is reproduced exactly
    one = h.select(torch.tensor([1]))
    assert torch.allclose(one(s).reshape(-1), h(s)[:, 0, 1]) and torch.allclose(one.derivative(s).reshape(-1), 3 * s**2)


def test_interpolating_z_solves_a_to_the_accuracy_of_backsolving_when_a_is_small():
    """A loss averaged over a large batch makes dL/dy ~1e-3 of y: with an atol meant for y, a's own
    solve (z interpolated) kept no digits (gradient error 1.8 at rtol 1e-4 before a's atol was scaled)."""
    from gqbench.define.problems import get_problem

    inst = get_problem("oscillator").build(width=32, batch=1500, dtype="float64")

    def grads(solve):
        y0 = inst.y0.clone().requires_grad_(True)
        g = torch.autograd.grad(inst.loss(solve(inst.func, y0, inst.t)), [*inst.func.parameters(), y0])
        return torch.cat([x.reshape(-1) for x in g])

    ref = grads(lambda f, y, t: torchdiffeq.odeint(f, y, t, rtol=1e-11, atol=1e-11, method="dopri8"))
    err = {}
    for state in ("backsolve", "interpolate"):
        got = grads(lambda f, y, t, s=state: odeint_adjoint_gq(f, y, t, rtol=1e-4, atol=1e-4, backward_state=s))
        err[state] = float((got - ref).norm() / ref.norm())
    assert err["interpolate"] < 3 * err["backsolve"] < 0.1, err
