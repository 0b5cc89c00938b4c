"""The paper's own GQ adjoint as a measured baseline (`torch_paper_gq`): never vendored, so the method
skips with the line that installs it, and -- where a checkout is on PYTHONPATH -- its adapter gives the
gradient of direct backprop and counts the evaluations the paper's rule sizes itself from."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torchdiffeq

import impls
from gqbench.define.case import Case
from gqbench.define.methods import get_method

DT = torch.float64
HAVE_PAPER = importlib.util.find_spec("torch_gq_adjoint") is not None


class Field(torch.nn.Module):
    def __init__(self, dim: int = 3, width: int = 16):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.w1 = torch.nn.Parameter(torch.randn(dim, width, generator=g, dtype=DT) * 0.8)
        self.w2 = torch.nn.Parameter(torch.randn(width, dim, generator=g, dtype=DT) * 0.5)

    def forward(self, t, y):
        return torch.tanh(y @ self.w1) @ self.w2 * torch.cos(t)


def test_without_a_checkout_the_method_is_a_skipped_row_that_says_how_to_get_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "torch_gq_adjoint" else real(n, *a))
    why = get_method("torch_paper_gq").unsupported(Case("torch_paper_gq", "workload_l", 8, 2))
    assert "git clone https://github.com/a-norcliffe/torch_gq_adjoint" in why and "PYTHONPATH" in why


@pytest.mark.skipif(HAVE_PAPER, reason="the paper's torch_gq_adjoint is importable here")
def test_the_adapter_says_how_to_install_it():
    with pytest.raises(ImportError, match="git clone https://github.com/a-norcliffe/torch_gq_adjoint"):
        impls.odeint_paper_gq(Field(), torch.ones(2, 3, dtype=DT), torch.linspace(0, 1, 3, dtype=DT))


@pytest.mark.skipif(not HAVE_PAPER, reason="the paper's torch_gq_adjoint is not on PYTHONPATH")
def test_paper_gq_gives_direct_backprops_gradient_and_counts_evaluations():
    func = Field()
    y0 = torch.linspace(-1, 1, 6, dtype=DT).reshape(2, 3).requires_grad_(True)
    t = torch.linspace(0, 3, 5, dtype=DT)

    def grads(solve, f):
        for p in (*func.parameters(), y0):
            p.grad = None
        solve(f, y0, t, rtol=1e-9, atol=1e-10).pow(2).sum().backward()
        return [p.grad.clone() for p in (*func.parameters(), y0)]

    ref = grads(torchdiffeq.odeint, func)
    counted = impls.NFECounter(func)
    got = grads(impls.odeint_paper_gq, counted)
    err = max(float((g - r).norm() / r.norm()) for g, r in zip(got, ref))
    assert err < 1e-6
    assert counted.nfe > 0  # its quadrature order is sized from this count
