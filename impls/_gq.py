"""The Gauss-Legendre quadrature (GQ) adjoint for torchdiffeq (Norcliffe & Deisenroth, TMLR 2023).

Forward: an ordinary `torchdiffeq.odeint` under no_grad. Backward, per observation interval
[t_{i-1}, t_i] walked backwards: solve [z, a] (or only a, reading z from the kept forward solution)
with dz/dt = f and da/dt = -a^T df/dz -- a VJP with respect to z only, so autograd skips the
weight-gradient matmuls -- and get dL/dtheta = int a^T df/dtheta dt from an n-point Gauss-Legendre
rule, all n node VJPs in one batched (vmapped) call.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torchdiffeq
from torch.autograd.profiler import record_function
from torch.func import vmap
from torchdiffeq._impl.odeint import SOLVERS  # pinned torchdiffeq==0.2.5
from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver
from torchdiffeq._impl.solvers import FixedGridODESolver

from ._dense import StepRecorder
from ._quadrature import MAX_QUAD_ORDER, gauss_legendre, quad_order_from_gtol
from ._rhs import FlatRHS, StepSizes, flatten, unflatten
from ._stats import GQStats, current_stats

BACKWARD_STATES = ("backsolve", "interpolate")
# Nodes per batched quadrature call, bounded by the state size: activations grow with nodes x batch,
# so a big batch (where one node is already a large matmul and batching gains little) takes one or
# two nodes at a time and peak memory stays flat as the tolerance -- hence n -- grows, while a small
# state (memory-bound on the weights, where batching pays most) takes all nodes at once.
_QUAD_BATCH_ELEMENTS = 2048


@dataclasses.dataclass(frozen=True)
class _Config:
    rtol: Any
    atol: Any
    method: str
    options: dict
    adjoint_rtol: Any
    adjoint_atol: Any
    adjoint_method: str
    adjoint_options: dict
    gtol: float
    quad_order: int | None
    backward_state: str
    quad_batch: int | None
    warm_start: bool


@dataclasses.dataclass
class _Problem:
    """What the autograd.Function needs beyond tensors (one object instead of a long tuple)."""

    rhs: FlatRHS
    config: _Config
    params: tuple[torch.Tensor, ...]
    stats: GQStats | None
    steps: StepSizes | None = None
    vmap_ok: bool = True


def odeint_adjoint_gq(
    func: Callable,
    y0: torch.Tensor | tuple[torch.Tensor, ...],
    t: torch.Tensor,
    *,
    rtol=1e-7,
    atol=1e-9,
    method: str | None = None,
    options: dict | None = None,
    gtol: float = 0.1,
    quad_order: int | None = None,
    adjoint_rtol=None,
    adjoint_atol=None,
    adjoint_method: str | None = None,
    adjoint_options: dict | None = None,
    adjoint_params: Sequence[torch.Tensor] | None = None,
    backward_state: str = "backsolve",
    quad_batch: int | None = None,
    warm_start: bool = False,
):
    """Solve dy/dt = func(t, y) like `torchdiffeq.odeint`; gradients by the GQ adjoint.

    Arguments shared with `torchdiffeq.odeint_adjoint` mean what they mean there. Further:

    gtol: the paper's rule n = min(ceil(gtol * NFE_forward * |dt_i| / |T|), 64) quadrature
        nodes per observation interval (ignored when `quad_order` is given).
    quad_order: a fixed number of Gauss-Legendre nodes per interval.
    backward_state: "backsolve" solves z backwards beside a (the paper's method);
        "interpolate" keeps the forward solution and interpolates z, which stays stable on
        contractive dynamics where backsolving z diverges.
    quad_batch: most quadrature nodes per batched VJP (default: bounded by the state size).
    warm_start: start each backward solve (adaptive solvers, same method both ways) with the
        step size the forward solve took at that time, instead of torchdiffeq's initial-step
        heuristic and the short steps that follow it: about half the backward evaluations on
        smooth problems, with gradient errors still of the order of the tolerance (close to the
        default's at tight tolerances, up to ~25x larger at loose ones). Off by default, so that
        the backward solve picks its steps as torchdiffeq's adjoint does.

    Read NFE and quadrature orders with `impls.gq_stats()`.
    """
    cfg, params = _check_inputs(
        func, y0, t, rtol, atol, method, options, gtol, quad_order, adjoint_rtol, adjoint_atol,
        adjoint_method, adjoint_options, adjoint_params, backward_state, quad_batch, warm_start,
    )  # fmt: skip
    is_tuple = isinstance(y0, tuple)
    shapes = [y.shape for y in y0] if is_tuple else None
    flat_y0 = flatten(y0) if is_tuple else y0
    recorder = None
    if cfg.backward_state == "interpolate":
        recorder = StepRecorder(SOLVERS[cfg.method], reverse=bool(t[0] > t[1]))
    steps = None
    if cfg.warm_start and cfg.adjoint_method == cfg.method and "first_step" not in cfg.adjoint_options:
        if issubclass(SOLVERS[cfg.method], RKAdaptiveStepsizeODESolver):
            steps = StepSizes()
    rhs = FlatRHS(func, shapes, recorder=recorder, steps=steps)
    stats = current_stats()
    if stats is not None:
        stats.calls += 1
    prob = _Problem(rhs=rhs, config=cfg, params=params, stats=stats, steps=steps)
    sol = _GQAdjoint.apply(prob, flat_y0, t, *params)
    return unflatten(sol, shapes) if is_tuple else sol


class _GQAdjoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, prob: _Problem, y0: torch.Tensor, t: torch.Tensor, *params: torch.Tensor):
        cfg, rhs = prob.config, prob.rhs
        with torch.no_grad(), record_function("gq::forward_solve"):
            sol = torchdiffeq.odeint(rhs, y0, t, rtol=cfg.rtol, atol=cfg.atol, method=cfg.method,
                                     options=dict(cfg.options))  # fmt: skip
        nfe = rhs.nfe
        # One host read of t, here rather than in the backward loop.
        t_host = t.detach().cpu().tolist()
        span = t_host[-1] - t_host[0]
        if cfg.quad_order is not None:
            orders = [cfg.quad_order] * (len(t_host) - 1)
        else:
            orders = [quad_order_from_gtol(cfg.gtol, nfe, b - a, span) for a, b in zip(t_host, t_host[1:])]
        ctx.prob, ctx.orders, ctx.nfe_forward = prob, orders, nfe
        # Backward solve i starts at t_i with the step the forward took there (warm_start).
        ctx.first_steps = prob.steps.at(t_host) if prob.steps is not None else None
        prob.steps = None
        ctx.dense = None
        if rhs.recorder is not None:
            ctx.dense = rhs.recorder.finish(t[-1], sol[-1])
            rhs.recorder = None  # drop references to the stage evaluations
        if prob.stats is not None:
            prob.stats.nfe_forward += nfe
            prob.stats.knots += 0 if ctx.dense is None else ctx.dense.n_knots
        ctx.save_for_backward(t, sol)
        return sol

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_sol: torch.Tensor):
        prob, cfg, rhs = ctx.prob, ctx.prob.config, ctx.prob.rhs
        t, sol = ctx.saved_tensors
        params = prob.params
        need_t = ctx.needs_input_grad[2]
        nfe_start = rhs.nfe
        grads = [torch.zeros_like(p) for p in params]
        quad = _Quadrature(prob, grads, need_t)

        dense, ctx.dense = ctx.dense, None
        if dense is not None and dense.evals_needed:
            rhs.nfe += dense.evals_needed
            dense.fill(quad.rhs_batch)

        adj_kwargs = dict(rtol=cfg.adjoint_rtol, atol=cfg.adjoint_atol, method=cfg.adjoint_method)
        a = grad_sol[-1].clone()
        for i in range(len(t) - 1, 0, -1):
            t_hi, t_lo = t[i], t[i - 1]
            x, w = gauss_legendre(ctx.orders[i - 1], dtype=t.dtype, device=t.device)
            half = (t_hi - t_lo) / 2
            nodes = (t_lo + t_hi) / 2 + half * x
            # Solve from t_i to t_{i-1}, reading the state at the nodes on the way.
            span = torch.cat([t_hi.reshape(1), nodes.flip(0), t_lo.reshape(1)])
            opts = dict(cfg.adjoint_options)
            if ctx.first_steps is not None:
                opts["first_step"] = ctx.first_steps[i]
            with record_function("gq::backward_solve"):
                if dense is None:
                    za = torchdiffeq.odeint(_BacksolveRHS(rhs), torch.stack([sol[i], a]), span, options=opts,
                                            **adj_kwargs)  # fmt: skip
                    z_nodes, a_nodes, a = za[1:-1, 0].flip(0), za[1:-1, 1].flip(0), za[-1, 1]
                else:
                    a_path = torchdiffeq.odeint(_InterpRHS(rhs, dense), a, span, options=opts, **adj_kwargs)
                    z_nodes, a_nodes, a = dense(nodes), a_path[1:-1].flip(0), a_path[-1]
            weights = (w * half).to(a_nodes.dtype).reshape((-1,) + (1,) * (a_nodes.dim() - 1))
            quad.accumulate(nodes, z_nodes, a_nodes * weights)
            a = a + grad_sol[i - 1]

        t_grad = None
        if need_t:
            # Moving t_i (i >= 1) only moves where y is read; moving t_0 moves the whole path.
            f_obs = quad.rhs_batch(t[1:], sol[1:])
            rhs.nfe += len(t) - 1
            dl_dt = (f_obs * grad_sol[1:]).reshape(len(t) - 1, -1).sum(-1)
            t_grad = torch.cat([(quad.t_integral - dl_dt.sum()).reshape(1), dl_dt]).to(t.dtype)

        if prob.stats is not None:
            s = prob.stats
            s.nfe_backward += rhs.nfe - nfe_start
            s.quad_nodes += sum(ctx.orders)
            s.quad_calls += quad.calls
            s.quad_orders = list(ctx.orders)
            s.vmap_fallback = s.vmap_fallback or not prob.vmap_ok
        return (None, a, t_grad, *grads)


class _BacksolveRHS:
    """d/dt [z, a] = [f(t, z), -a^T df/dz(t, z)]: one f evaluation and a z-only VJP."""

    def __init__(self, rhs: FlatRHS):
        self.rhs = rhs

    def __call__(self, t, za):
        z, a = za[0], za[1]
        f, vjp = _f_and_vjp(self.rhs, t, z, a)
        return torch.stack([f, -vjp])


class _InterpRHS:
    """da/dt = -a^T df/dz(t, z(t)) with z(t) from the kept forward solution."""

    def __init__(self, rhs: FlatRHS, dense: Callable[[torch.Tensor], torch.Tensor]):
        self.rhs, self.dense = rhs, dense

    def __call__(self, t, a):
        return -_f_and_vjp(self.rhs, t, self.dense(t), a)[1]


def _f_and_vjp(rhs: FlatRHS, t, z, a):
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        f = rhs(t, z)
        vjp = torch.autograd.grad(f, z, a, allow_unused=True)[0] if f.requires_grad else None
    return f.detach(), torch.zeros_like(z) if vjp is None else vjp


class _Quadrature:
    """Accumulates sum_j w_j a_j^T df/dtheta(tau_j, z_j) (and df/dt) in batched calls."""

    def __init__(self, prob: _Problem, grads: list[torch.Tensor], need_t: bool):
        self.prob, self.grads, self.need_t = prob, grads, need_t
        self.t_integral = 0.0
        self.calls = 0

    def _chunk(self, n: int, state_numel: int) -> int:
        if self.prob.config.quad_batch is not None:
            return self.prob.config.quad_batch
        return max(1, min(n, _QUAD_BATCH_ELEMENTS // max(state_numel, 1)))

    def _batched(self, fn: Callable, *args):
        """vmap over the leading node dim; falls back to a Python loop if f cannot be vmapped."""
        if self.prob.vmap_ok:
            try:
                return vmap(fn)(*args)
            except Exception as exc:  # noqa: BLE001 -- any vmap failure: use the loop
                self.prob.vmap_ok = False
                warnings.warn(
                    f"odeint_adjoint_gq: func could not be vmapped ({type(exc).__name__}: {exc}); "
                    "evaluating quadrature nodes one at a time.",
                    RuntimeWarning,
                    stacklevel=4,
                )
        return torch.stack([fn(*(x[j] for x in args)) for j in range(len(args[0]))])

    def rhs_batch(self, ts: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """f at many (t, y) points, no grad, chunked like the quadrature."""
        chunk = self._chunk(len(ts), ys[0].numel())
        with torch.no_grad():
            return torch.cat([self._batched(self.prob.rhs.eval, ts[s : s + chunk], ys[s : s + chunk])
                              for s in range(0, len(ts), chunk)])  # fmt: skip

    def accumulate(self, nodes: torch.Tensor, z: torch.Tensor, wa: torch.Tensor) -> None:
        params = self.prob.params
        chunk = self._chunk(len(nodes), z[0].numel())
        for s in range(0, len(nodes), chunk):
            sl = slice(s, s + chunk)
            with torch.enable_grad(), record_function("gq::quadrature_vjp"):
                tn = nodes[sl].detach().requires_grad_(self.need_t)
                out = self._batched(self.prob.rhs.eval, tn, z[sl].detach())
                inputs = params + ((tn,) if self.need_t else ())
                if not inputs or not out.requires_grad:
                    continue
                g = torch.autograd.grad(out, inputs, wa[sl], allow_unused=True)
            self.calls += 1
            with record_function("gq::accumulate"):
                for acc, gi in zip(self.grads, g):
                    if gi is not None:
                        acc.add_(gi)
                if self.need_t and g[-1] is not None:
                    self.t_integral = self.t_integral + g[-1].sum()
            # Free this chunk's parameter-sized gradients before the next chunk makes its own: peak
            # memory is then accumulators + one chunk, the same for every n (every tolerance).
            del out, g


# ----------------------------------------------------------------------------- input checks


def _fail(exc: type[Exception], arg: str, value, why_and_fix: str):
    shown = " ".join(repr(value).split())
    if len(shown) > 60:
        shown = shown[:57] + "..."
    raise exc(f"odeint_adjoint_gq({arg}={shown}): {why_and_fix}")


def _check_tol(name: str, tol) -> None:
    vals = tol.detach().reshape(-1).tolist() if torch.is_tensor(tol) else [tol]
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            _fail(ValueError, name, tol, "tolerances must be finite and > 0, e.g. 1e-6.")


def _check_method(name: str, method: str) -> None:
    if method not in SOLVERS:
        _fail(ValueError, name, method, f"unknown solver; use one of {', '.join(sorted(SOLVERS))}.")


def _check_inputs(func, y0, t, rtol, atol, method, options, gtol, quad_order, adjoint_rtol, adjoint_atol,
                  adjoint_method, adjoint_options, adjoint_params, backward_state, quad_batch, warm_start):  # fmt: skip
    if not callable(func):
        _fail(TypeError, "func", func, "func must be callable as func(t, y).")
    states = y0 if isinstance(y0, tuple) else (y0,)
    if not states or not all(torch.is_tensor(y) and y.is_floating_point() for y in states):
        _fail(TypeError, "y0", y0, "y0 must be a floating-point Tensor or a tuple of them.")
    if not torch.is_tensor(t) or not t.is_floating_point():
        _fail(TypeError, "t", t, "t must be a 1-D floating-point Tensor of times.")
    if t.dim() != 1 or len(t) < 2:
        _fail(ValueError, "t", t, f"t must be 1-D with at least two times (got shape {tuple(t.shape)}).")
    if t.device != states[0].device:
        _fail(ValueError, "t", t, f"t is on {t.device} but y0 on {states[0].device}; move t to y0's device.")
    dt = t[1:] - t[:-1]
    if not (bool((dt > 0).all()) or bool((dt < 0).all())):
        _fail(ValueError, "t", t, "t must be strictly increasing or strictly decreasing; drop repeated times.")
    method = "dopri5" if method is None else method
    _check_method("method", method)
    adjoint_method = method if adjoint_method is None else adjoint_method
    _check_method("adjoint_method", adjoint_method)
    _check_tol("rtol", rtol)
    _check_tol("atol", atol)
    adjoint_rtol = rtol if adjoint_rtol is None else adjoint_rtol
    adjoint_atol = atol if adjoint_atol is None else adjoint_atol
    _check_tol("adjoint_rtol", adjoint_rtol)
    _check_tol("adjoint_atol", adjoint_atol)
    if isinstance(gtol, bool) or not isinstance(gtol, (int, float)) or not math.isfinite(gtol) or gtol <= 0:
        _fail(ValueError, "gtol", gtol, "gtol must be a finite number > 0 (the paper uses 0.1).")
    if quad_order is not None and (isinstance(quad_order, bool) or not isinstance(quad_order, int) or quad_order < 1):
        _fail(ValueError, "quad_order", quad_order,
              f"quad_order must be an int >= 1 (e.g. 2..{MAX_QUAD_ORDER}), or None to use gtol.")  # fmt: skip
    if quad_batch is not None and (isinstance(quad_batch, bool) or not isinstance(quad_batch, int) or quad_batch < 1):
        _fail(ValueError, "quad_batch", quad_batch, "quad_batch must be an int >= 1, or None for automatic.")
    if not isinstance(warm_start, bool):
        _fail(TypeError, "warm_start", warm_start, "warm_start must be True or False.")
    if backward_state not in BACKWARD_STATES:
        _fail(ValueError, "backward_state", backward_state, f"use one of {', '.join(map(repr, BACKWARD_STATES))}.")
    if options is not None and not isinstance(options, dict):
        _fail(TypeError, "options", options, "options must be a dict of solver options, or None.")
    if adjoint_options is not None and not isinstance(adjoint_options, dict):
        _fail(TypeError, "adjoint_options", adjoint_options, "adjoint_options must be a dict, or None.")
    options = {} if options is None else dict(options)
    if adjoint_options is None:
        # As torchdiffeq: reuse the forward options, but not a norm written for the forward state.
        adjoint_options = {k: v for k, v in options.items() if k != "norm"} if adjoint_method == method else {}
    adjoint_options = dict(adjoint_options)
    if issubclass(SOLVERS[adjoint_method], FixedGridODESolver):
        # The backward solve reads [z, a] at the quadrature nodes between grid points; torchdiffeq's
        # default linear interpolation there would cap the gradient at second order.
        adjoint_options.setdefault("interp", "cubic")
    if adjoint_params is None:
        if not callable(getattr(func, "parameters", None)):
            fix = "func has no .parameters(); pass adjoint_params=(tensors...) or () for y0/t gradients only."
            _fail(TypeError, "adjoint_params", None, fix)
        adjoint_params = tuple(func.parameters())
        if not adjoint_params:
            _fail(ValueError, "adjoint_params", None,
                  "func has no parameters; pass adjoint_params=() to differentiate w.r.t. y0/t only.")  # fmt: skip
    adjoint_params = tuple(adjoint_params)
    if not all(torch.is_tensor(p) for p in adjoint_params):
        _fail(TypeError, "adjoint_params", adjoint_params, "adjoint_params must be a sequence of Tensors.")
    # Only parameters that need a gradient enter the autograd graph (as in torchdiffeq).
    params = tuple(p for p in adjoint_params if p.requires_grad)
    cfg = _Config(
        rtol=rtol, atol=atol, method=method, options=options, adjoint_rtol=adjoint_rtol,
        adjoint_atol=adjoint_atol, adjoint_method=adjoint_method, adjoint_options=adjoint_options,
        gtol=float(gtol), quad_order=quad_order, backward_state=backward_state, quad_batch=quad_batch,
        warm_start=warm_start,
    )  # fmt: skip
    return cfg, params
