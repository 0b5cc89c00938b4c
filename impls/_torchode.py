"""torchode (Lienen & Günnemann 2022) as a baseline, in torchdiffeq's calling shape.

torchode solves a batch of independent problems, each with its own step sizes: `y` is (batch, features)
and `t` is (batch,), one time per sample. A torchdiffeq-style `func(t, y)` (t a scalar, y (batch, ...))
is called here with y reshaped to the problem's state and t as (batch, 1, ...), so that `t` broadcasts
against each sample's state as a scalar would (`torch.ones_like(y[..., :1]) * t`, `sin(w * t)`).
The solution is returned as torchdiffeq returns it, (len(t), batch, ...), so the problem's loss applies.

NFE: every call of `func` evaluates the whole batch; a sample that has finished (or takes fewer steps)
is still evaluated until the last one is done. `TorchodeStats` gives both: the batched calls (= the
slowest sample's evaluations, `*_max`) and the evaluations each sample's own steps needed (`*_mean`).
"""

from __future__ import annotations

import dataclasses
import time

import torch
from torch import nn

ADJOINTS = ("autodiff", "backsolve")
# torchdiffeq's solver names -> torchode's step methods with the same tableau and error estimate.
STEP_METHODS = {"dopri5": "Dopri5"}


@dataclasses.dataclass
class TorchodeStats:
    """The last solve's evaluations of `func`: batched calls, and per sample (mean over the batch)."""

    nfe_forward: int = 0
    nfe_forward_mean: float = float("nan")
    nfe_backward: int = 0
    nfe_backward_mean: float = float("nan")


class _PerSample(nn.Module):
    """torchode's `f(t, y)` (t (batch,), y (batch, features)) around a torchdiffeq-style `func(t, y)`.

    Also right under `torch.func.vmap` (BacksolveAdjoint's per-sample VJPs): there t is 0-d and y
    (features,), and the reshapes give func a batch of one."""

    def __init__(self, func, shape: tuple[int, ...]):
        super().__init__()
        self.func = func
        self.shape = shape
        self.nfe = 0

    def forward(self, t, y):
        self.nfe += 1
        dy = self.func(t.reshape(-1, *(1,) * len(self.shape)), y.reshape(-1, *self.shape))
        return dy.reshape(y.shape)


class TorchodeSolver:
    """`solver(func, y0, t) -> ys` through torchode: `adjoint="autodiff"` (AutoDiffAdjoint, backprop through
    the solver's steps) or `"backsolve"` (BacksolveAdjoint: a continuous adjoint solved backwards per sample,
    parameter adjoints carried per sample, i.e. batch x parameters numbers in the state). The same
    integral step-size controller as torchdiffeq's (safety 0.9, factors 0.2 and 10) at `rtol`, `atol`, with an
    RMS norm per sample. `compile=True`: each step (its stages' `func` calls and arithmetic, one graph
    of fixed shapes) under `torch.compile`; the first call compiles (`compile_s`: that call's time). `y0` needs
    a batch dimension first (samples independent); tuple states are not supported. After each call `stats`
    describes it (backward counts after `after_backward()`)."""

    def __init__(self, *, rtol=1e-7, atol=1e-9, method="dopri5", adjoint="autodiff", compile=False, max_steps=None):
        if adjoint not in ADJOINTS:
            raise ValueError(f"adjoint={adjoint!r}; torchode's adjoints here are {ADJOINTS}")
        if (method or "dopri5") not in STEP_METHODS:
            raise ValueError(f"method={method!r} has no torchode counterpart here (have {', '.join(STEP_METHODS)})")
        self.rtol, self.atol = rtol, atol
        self.method = method or "dopri5"
        self.adjoint = adjoint
        self.compile = compile
        self.max_steps = max_steps
        self.stats = TorchodeStats()
        self.compile_s = float("nan")
        self._built = None  # (func, shape, field, solve): rebuilt when func or the state's shape changes
        self._sol = None

    def _build(self, func, shape):
        import torchode as to

        field = _PerSample(func, shape)
        term = to.ODETerm(field, with_stats=False)
        step = getattr(to, STEP_METHODS[self.method])
        if self.adjoint == "autodiff":
            adj = to.AutoDiffAdjoint(step(term=term), to.IntegralController(self.atol, self.rtol, term=term),
                                     max_steps=self.max_steps)  # fmt: skip
        else:
            adj = to.BacksolveAdjoint(term, step(), to.IntegralController(self.atol, self.rtol))
        solve = adj.solve
        if self.compile:  # the step (its stages' f calls and arithmetic): one graph of fixed shapes
            steppers = [adj.step_method] if self.adjoint == "autodiff" else [adj.forward_adjoint.step_method]
            for m in steppers:
                m.step = torch.compile(m.step)
        k = step.TABLEAU.n_stages - int(step.TABLEAU.fsal)  # evaluations per step after the first
        return func, shape, field, solve, k

    def __call__(self, func, y0, t):
        if not torch.is_tensor(y0):
            raise TypeError("torchode solves a (batch, features) tensor state; tuple states are not supported")
        if y0.dim() < 1:
            raise ValueError("torchode needs a batch dimension first: y0 is 0-d")
        if t.dim() != 1:
            raise ValueError(f"t must be 1-D observation times, got shape {tuple(t.shape)}")
        batch, shape = y0.shape[0], tuple(y0.shape[1:])
        if self._built is None or self._built[0] is not func or self._built[1] != shape:
            self._built = self._build(func, shape)
        _, _, field, solve, self._k = self._built
        import torchode as to

        problem = to.InitialValueProblem(y0.reshape(batch, -1), t_eval=t[None].expand(batch, -1))
        field.nfe = 0
        if self.compile and self.compile_s != self.compile_s:  # first call: compiles
            a = time.perf_counter()
            sol = solve(problem)
            self.compile_s = time.perf_counter() - a
        else:
            sol = solve(problem)
        if bool((sol.status != 0).any()):
            codes = sorted({to.Status(int(s)).name for s in sol.status.unique()} - {"SUCCESS"})
            raise RuntimeError(f"torchode stopped with status {', '.join(codes)} (max_steps={self.max_steps})")
        self._field, self._sol = field, sol
        steps = sol.stats["n_steps"].to(torch.float64)
        nfe = field.nfe
        self.stats = TorchodeStats(nfe, float(nfe - self._k * (steps.max() - steps).mean()))
        return sol.ys.transpose(0, 1).reshape(len(t), batch, *shape)

    def after_backward(self) -> TorchodeStats:
        """Backward counts of the last solve: 0 for autodiff (its backward calls no func); backsolve's
        backward solves per observation interval, each its own per-sample steps."""
        s = self.stats
        s.nfe_backward = self._field.nfe - s.nfe_forward
        if self.adjoint == "autodiff":
            s.nfe_backward_mean = 0.0
        else:  # BacksolveAdjoint appends one stats dict per interval it solved backwards
            steps = [sub["n_steps"].to(torch.float64) for sub in self._sol.stats.get("backsolve", [])]
            s.nfe_backward_mean = s.nfe_backward - sum(self._k * float((n.max() - n).mean()) for n in steps)
        return s


def odeint_torchode(func, y0, t, *, rtol=1e-7, atol=1e-9, method="dopri5", adjoint="autodiff", max_steps=None):
    """One torchode solve with torchdiffeq's signature (a fresh `TorchodeSolver`; keep one to reuse a
    compiled solve or read per-sample NFE)."""
    return TorchodeSolver(rtol=rtol, atol=atol, method=method, adjoint=adjoint, max_steps=max_steps)(func, y0, t)
