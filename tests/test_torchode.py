"""torchode as a baseline: the adapters' gradients against direct backprop, and its rows through the real runner."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("torchode")

import torch  # noqa: E402
import torchdiffeq  # noqa: E402

import impls  # noqa: E402
from gqbench import Case, RunSettings, run_grid  # noqa: E402
from gqbench.define.problems import get_problem  # noqa: E402

TOL = 1e-10


def _rel(g, ref):
    num = sum(float((a - b).pow(2).sum()) for a, b in zip(g, ref))
    return math.sqrt(num / sum(float(b.pow(2).sum()) for b in ref))


def _grads(problem: str, solve):
    inst = get_problem(problem).build(width=8, batch=4, dtype="float64", seed=1)
    y0 = inst.y0.detach().requires_grad_(True)
    return torch.autograd.grad(inst.loss(solve(inst.func, y0, inst.t)), (*inst.params, y0))


def _direct(f, y0, t):
    return torchdiffeq.odeint(f, y0, t, rtol=TOL, atol=TOL, method="dopri5")


@pytest.mark.parametrize("adjoint", ["autodiff", "backsolve"])
@pytest.mark.parametrize("problem", ["workload_l", "sines"])  # one interval; ten observation times, 2-D state
def test_adapter_gradients_match_direct_backprop(problem, adjoint):
    solver = impls.TorchodeSolver(rtol=TOL, atol=TOL, adjoint=adjoint)
    assert _rel(_grads(problem, solver), _grads(problem, _direct)) < 1e-7
    stats = solver.after_backward()
    assert stats.nfe_forward > 0 and stats.nfe_forward_mean <= stats.nfe_forward
    assert (stats.nfe_backward > 0) == (adjoint == "backsolve")


@pytest.mark.slow
def test_compiled_adapter_gradients_match_direct_backprop():
    solver = impls.TorchodeSolver(rtol=TOL, atol=TOL, compile=True)
    assert _rel(_grads("workload_l", solver), _grads("workload_l", _direct)) < 1e-7
    assert solver.compile_s > 0


# t as a Python number: fine for torchdiffeq (one t for the batch), not for torchode's per-sample times.
_SCALAR_T = """
import torch
from torch import nn

class Field(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, t, y):
        return self.lin(y) * (1.0 + float(t))

def make(*, width, batch, seed, dtype, device):
    torch.manual_seed(seed)
    y0 = torch.randn(batch, 2, dtype=dtype, device=device)
    t = torch.tensor([0.0, 1.0], dtype=dtype, device=device)
    return Field().to(dtype=dtype, device=device), y0, t, lambda ys: ys[-1].pow(2).sum()
"""


def test_torchode_rows_through_the_runner(tmp_path):
    user = tmp_path / "scalar_t.py"
    user.write_text(_SCALAR_T)
    kw = dict(width=8, batch=4, rtol=1e-8, atol=1e-8, dtype="float64", threads=1)
    cases = [Case(m, "workload_l", **kw) for m in ("torchode_autodiff", "torchode_backsolve", "torch_direct")]
    cases.append(Case("torchode_autodiff", f"{user}:make", **kw))
    df = run_grid(cases, tmp_path / "out", settings=RunSettings(repeats=2, warmup=1, timeout=120), progress=False)
    rows = {(r.method, r.problem): r for r in df.itertuples()}
    for method in ("torchode_autodiff", "torchode_backsolve"):
        r = rows[(method, "workload_l")]
        assert r.status == "ok" and r.grad_rel_err < 1e-5, r
        assert r.nfe_fwd == r.nfe_fwd_max and 0 < r.nfe_fwd_mean <= r.nfe_fwd_max
        assert (r.nfe_bwd > 0) == (method == "torchode_backsolve") and np.isfinite(r.nfe_bwd_mean)
        assert np.isnan(r.compile_s)
    assert np.isnan(rows[("torch_direct", "workload_l")].nfe_fwd_mean)  # per-sample counts: torchode's only
    skipped = rows[("torchode_autodiff", f"{user}:make")]
    assert skipped.status == "skipped" and "per-sample times" in skipped.error, skipped.error
