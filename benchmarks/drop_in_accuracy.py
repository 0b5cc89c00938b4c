"""Swap torchdiffeq.odeint_adjoint for impls.odeint_adjoint_gq as a user would and compare gradient
errors (float64, dopri5, loss sum(y^2) over all observation times, error relative to direct backprop
through dopri8 at 1e-12) on issue 9's problems: the cubic oscillator (10 times on [0, 25]) and a tanh MLP
2 -> 32 -> 2 with sin(8t) forcing (3 times on [0, 6]).

    python benchmarks/drop_in_accuracy.py
"""

from __future__ import annotations

import torch
import torchdiffeq

from impls import gq_stats, odeint_adjoint_gq

torch.set_default_dtype(torch.float64)


class Cubic(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.A = torch.nn.Parameter(torch.tensor([[-0.1, 1.5], [-1.5, -0.1]]))

    def forward(self, t, y):
        return (y**3) @ self.A


class Forced(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = torch.nn.Linear(2, 32), torch.nn.Linear(32, 2)

    def forward(self, t, y):
        return self.l2(torch.tanh(self.l1(y))) + torch.sin(8 * t) * torch.tensor([1.0, -0.5])


def problem(name):
    torch.manual_seed(0)
    if name == "cubic":
        return Cubic(), torch.tensor([1.5, 0.0]), torch.linspace(0, 25, 10)
    return Forced(), torch.tensor([0.5, -0.3]), torch.linspace(0, 6, 3)


def gradient(solve, name, **kw):
    f, y0, t = problem(name)
    y0.requires_grad_(True)
    (solve(f, y0, t, **kw) ** 2).sum().backward()
    return torch.cat([y0.grad.reshape(-1)] + [p.grad.reshape(-1) for p in f.parameters()])


def main() -> None:
    print("| problem | rtol = atol | adjoint | seminorm | GQ, paper's rule (gtol=0.1) | GQ default (adaptive) | "
          "GQ's own estimate | nodes (paper / adaptive) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name in ("cubic", "forced"):
        ref = gradient(torchdiffeq.odeint, name, method="dopri8", rtol=1e-12, atol=1e-12)

        def err(g, ref=ref):
            return float((g - ref).norm() / ref.norm())

        for tol in (1e-3, 1e-6, 1e-9):
            kw = dict(rtol=tol, atol=tol)
            adj = err(gradient(torchdiffeq.odeint_adjoint, name, **kw))
            semi = err(gradient(torchdiffeq.odeint_adjoint, name, adjoint_options=dict(norm="seminorm"), **kw))
            with gq_stats() as paper_stats:
                paper = err(gradient(odeint_adjoint_gq, name, gtol=0.1, **kw))
            with gq_stats() as s:
                gq = err(gradient(odeint_adjoint_gq, name, **kw))
            print(f"| {name} | {tol:g} | {adj:.1e} | {semi:.1e} | {paper:.1e} | {gq:.1e} | {s.quad_error:.1e} | "
                  f"{paper_stats.quad_nodes} / {s.quad_nodes} |")  # fmt: skip


if __name__ == "__main__":
    main()
