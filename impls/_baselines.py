"""Thin adapters for the baselines gqbench measures GQ against (torchdiffeq, unmodified).

Each adapter has `odeint_adjoint_gq`'s calling convention, so the harness swaps solvers by name.
NFE is counted by wrapping `func` in `NFECounter`; user modules need no `nfe` attribute.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchdiffeq
from torch import nn


class NFECounter(nn.Module):
    """Counts calls of `func(t, y)`; parameters stay those of `func` (it is a submodule)."""

    def __init__(self, func: Callable):
        super().__init__()
        self.func = func
        self.nfe = 0

    def forward(self, t, y):
        self.nfe += 1
        return self.func(t, y)


def odeint_direct(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None):
    """Direct backprop: `torchdiffeq.odeint`, autograd through every solver step."""
    return torchdiffeq.odeint(func, y0, t, rtol=rtol, atol=atol, method=method, options=options)


def odeint_adjoint(func, y0, t, **kwargs):
    """The continuous adjoint: `torchdiffeq.odeint_adjoint` (mixed norm over [z, a, dL/dtheta]).

    Keywords are torchdiffeq's (rtol, atol, method, options, adjoint_rtol, adjoint_atol, ...).
    """
    return torchdiffeq.odeint_adjoint(func, y0, t, **kwargs)


def odeint_seminorm(func, y0, t, **kwargs):
    """The seminorm adjoint (Kidger et al. 2021): parameter adjoints left out of the step-size norm."""
    if "adjoint_options" in kwargs:
        raise TypeError("odeint_seminorm(adjoint_options=...): it sets norm='seminorm' itself; use odeint_adjoint.")
    return torchdiffeq.odeint_adjoint(func, y0, t, adjoint_options=dict(norm="seminorm"), **kwargs)


def odeint_paper_gq(func, y0, t, *, gtol=0.1, **kwargs):
    """The paper's own GQ adjoint (Norcliffe & Deisenroth's `torch_gq_adjoint`, MIT), unmodified, for
    measuring ours against it. It is not vendored: clone https://github.com/a-norcliffe/torch_gq_adjoint
    and put the checkout on PYTHONPATH. Its quadrature sizes itself from `func.nfe`, which it expects
    `func` to count; `NFECounter` does. Keywords are its `odeint_adjoint_gq`'s (rtol, atol, gtol, method, ...).
    """
    try:
        import torch_gq_adjoint
    except ImportError:
        raise ImportError(
            "odeint_paper_gq needs the paper's torch_gq_adjoint: git clone "
            "https://github.com/a-norcliffe/torch_gq_adjoint and add the checkout to PYTHONPATH"
        ) from None
    counted = func if isinstance(func, NFECounter) else NFECounter(func)
    return torch_gq_adjoint.odeint_adjoint_gq(counted, y0, t, gtol=gtol, **kwargs)


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels, so a clock read afterwards times the work (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _torchdiffeqpack(name: str):
    try:
        import TorchDiffEqPack
    except ImportError as exc:  # it also needs matplotlib, which it does not declare
        raise ImportError(
            f"{name} needs TorchDiffEqPack ({exc}); pip install TorchDiffEqPack==1.0.1 matplotlib (the [mali] extra)"
        ) from None
    return TorchDiffEqPack


def _pack_solve(solve, solver: str, func, y0, t, rtol, atol, options):
    """TorchDiffEqPack's adjoints return only the end state: solve interval by interval, each from the last."""
    if not torch.is_tensor(y0):
        raise TypeError(f"{solver}: y0 must be a Tensor (TorchDiffEqPack has no tuple states)")
    ys, y = [y0], y0
    for t0, t1 in zip(t[:-1].tolist(), t[1:].tolist(), strict=True):
        opts = dict(method=solver, t0=t0, t1=t1, h=None, rtol=rtol, atol=atol, print_neval=False,
                    neval_max=1_000_000, **(options or {}))  # fmt: skip
        y = solve(func, y, options=opts)
        ys.append(y)
    return torch.stack(ys)


def odeint_mali(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None):
    """MALI (Zhuang et al. 2021): the asynchronous leapfrog integrator, reversible, so the backward
    reconstructs the forward trajectory exactly (TorchDiffEqPack's `odesolve_adjoint_sym12`).
    `method` is ignored: MALI is its own solver ("sym12async"). No gradient with respect to `t`."""
    pack = _torchdiffeqpack("odeint_mali")
    return _pack_solve(pack.odesolve_adjoint_sym12, "sym12async", func, y0, t, rtol, atol, options)


def odeint_aca(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None):
    """ACA (Zhuang et al. 2020): the adaptive checkpoint adjoint (TorchDiffEqPack's `odesolve_adjoint`):
    the forward keeps the accepted steps' states and the backward replays them. No gradient w.r.t. `t`."""
    pack = _torchdiffeqpack("odeint_aca")
    return _pack_solve(pack.odesolve_adjoint, method or "dopri5", func, y0, t, rtol, atol, options)
