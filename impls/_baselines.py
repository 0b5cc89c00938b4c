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


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels, so a clock read afterwards times the work (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
