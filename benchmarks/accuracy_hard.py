"""Gradient error of the GQ adjoint's rules against torchdiffeq's adjoint on the hard problems, float64.

    python benchmarks/accuracy_hard.py [--problems oscillator:32:8,forced_mlp:32:8,vanderpol:1:4] [--tols 1e-3,1e-5]

Relative L2 error of all parameter and y0 gradients against direct backprop through dopri8 at 1e-12, for
torchdiffeq's adjoint, direct backprop, GQ's default and the paper's rule (gtol 0.1), with GQ's quadrature
nodes and whether its backsolve fell back to the kept forward solution. A failing method prints its error.
"""

from __future__ import annotations

import argparse
import warnings

import torch
import torchdiffeq

import impls
from gqbench.define.problems import get_problem


def grads(inst, solve, stats=None) -> torch.Tensor:
    y0 = inst.y0.clone().requires_grad_(True)
    for q in inst.func.parameters():
        q.grad = None
    with impls.gq_stats(stats or impls.GQStats()):
        inst.loss(solve(inst.func, y0, inst.t)).backward()
    return torch.cat([q.grad.reshape(-1) for q in inst.func.parameters()] + [y0.grad.reshape(-1)])


def methods(tol: float) -> dict:
    kw = dict(rtol=tol, atol=tol)
    return {
        "direct": lambda f, y, t: torchdiffeq.odeint(f, y, t, **kw),
        "adjoint": lambda f, y, t: torchdiffeq.odeint_adjoint(f, y, t, **kw),
        "gq": lambda f, y, t: impls.odeint_adjoint_gq(f, y, t, **kw),
        "gq[gtol=0.1]": lambda f, y, t: impls.odeint_adjoint_gq(f, y, t, gtol=0.1, **kw),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problems", default="oscillator:32:8,forced_mlp:32:8,workload_l:500:200,g1d:2000:2,vanderpol:1:4")
    p.add_argument("--tols", default="1e-3,1e-5,1e-7,1e-9")
    args = p.parse_args()
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    for spec in args.problems.split(","):
        name, width, batch = spec.split(":")
        inst = get_problem(name).build(width=int(width), batch=int(batch), dtype="float64")
        exact = lambda f, y, t: torchdiffeq.odeint(f, y, t, rtol=1e-12, atol=1e-12, method="dopri8")  # noqa: E731
        ref = grads(inst, exact)
        for tol in (float(x) for x in args.tols.split(",")):
            cells = []
            for label, solve in methods(tol).items():
                s = impls.GQStats()
                try:
                    err = float((grads(inst, solve, s) - ref).norm() / ref.norm())
                except Exception as exc:  # noqa: BLE001 -- a failing method is a result here
                    cells.append(f"{label} {type(exc).__name__}: {str(exc)[:30]}")
                    continue
                fell = ", fell back" if s.backsolve_fallbacks else ""
                cells.append(f"{label} {err:.1e}" + (f" ({s.quad_nodes} nodes{fell})" if "gq" in label else ""))
            print(f"{name} w={width} rtol={tol:.0e}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
