"""The Gauss-Legendre quadrature (GQ) adjoint for torchdiffeq (Norcliffe & Deisenroth, TMLR 2023).

Forward: an ordinary `torchdiffeq.odeint` under no_grad. Backward: one solve of [z, a] (or only a,
reading z from the kept forward solution) from t_N to t_0 across all observation times (`_sweep`),
with dz/dt = f and da/dt = -a^T df/dz -- a VJP with respect to z only, so autograd skips the
weight-gradient matmuls -- then dL/dtheta = int a^T df/dtheta dt from Gauss-Legendre rules on
panels chosen for the integrand (`_panels`), every interval's nodes in shared batched (vmapped)
VJP calls.
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

from . import _panels, _sweep
from ._dense import StepRecorder, Stitched
from ._panels import choose_panels
from ._quadrature import MAX_QUAD_ORDER, gauss_kronrod, gauss_legendre, quad_order_from_gtol
from ._rhs import FlatRHS, StepSizes, flatten, unflatten
from ._stats import GQStats, current_stats

BACKWARD_STATES = ("auto", "backsolve", "interpolate")
QUADRATURES = ("adaptive", "gtol", "fixed")
# Nodes per batched quadrature call, bounded by the state size: activations grow with nodes x batch,
# so a big batch (where one node is already a large matmul and batching gains little) takes one or
# two nodes at a time and peak memory stays flat as the tolerance -- hence n -- grows, while a small
# state (memory-bound on the weights, where batching pays most) takes all nodes at once.
_QUAD_BATCH_ELEMENTS = 2048
# Warm start of a solved alone (z read off the forward): its first step is this fraction of the forward's step
# that covered its start, or the interval split evenly, unless that step spans it (`_a_first_step`). The
# forward's step was sized (and often grown) for y's error; a's error is measured on its own scale, and a first
# step it rejects costs a whole step's evaluations (6 on dopri5). A backsolve's [z, a] is measured as y was:
# it starts at the forward's step. Measured on the stress suite: docs/gq-adjoint.md, "a's first step".
_FIRST_STEP_FRACTION = 0.75
# Adaptive quadrature: the first panels span this many backward solver steps (steps sized for
# [z, a] at the tolerance are shorter than a G2/K5 pair needs on smooth integrands; on rough ones
# the estimate bisects), and at most this many bisections follow before the estimate is accepted
# as it is (and counted as unconverged).
_STEPS_PER_PANEL = 4
_MAX_REFINEMENTS = 8
# Solvers without dense output we can follow (scipy_solver): uniform panels per interval to start.
_PANELS_WITHOUT_DENSE = 4
# Backsolve evaluations, in forward NFE, after which the backward pass switches to the kept forward.
_BACKSOLVE_BUDGET = 5
# ... or once |z| exceeds this multiple of the largest |y| the forward solution took, or z arrives at an
# observation time further than this many tolerances (RMS) from the forward's y there.
_Z_BOUND = 10.0
_Z_MISMATCH = 1e4
# ... with tolerances no tighter than this on fixed grids, in y's units: 1e4 x 1e-6 = 1% of y.
_GRID_Z_RTOL = 1e-6
# On a grid, the adaptive rule integrates to this fraction of the backsolved z's distance from the forward's y.
_GRID_QUAD_FRACTION = 0.1
# ... never coarser than this (the distance is measured after a fallback too: a failed backsolve's can be ~1).
_GRID_QUAD_MAX = 1e-2
# ... or once the backsolved adjoint exceeds this multiple of the largest |dL/dy| (Robertson kinetics at rtol
# 1e-3: z 1e3 tolerances off at t_4, a 1e14 and the gradient 4.5e15 off; a legitimately growing adjoint --
# an expanding field -- only costs the fallback's re-solve there).
_A_BOUND = 1e8
# The adaptive rule's nodes: at most this many per evaluation of the backward solve (or G8 per interval).
_NODES_PER_EVAL = 2
# With panels stopped at round-off the estimate is a lower bound, so one this close to quad_rtol is not a
# certificate either (forced_mlp in float32 at rtol 1e-6: estimate 8.6e-7, 11 panels at round-off, error
# 3.5e-5 against the adjoint's 2.8e-6; no certified row of the stress suite has such an estimate above it).
_ROUNDOFF_NEAR = 0.5


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
    quadrature: str
    gtol: float | None
    quad_order: int | None
    quad_rtol: float
    quad_atol: float
    backward_state: str
    quad_batch: int | None
    warm_start: bool
    quad_rtol_given: bool = True  # False: quad_rtol is the default (the adjoint rtol)


@dataclasses.dataclass
class _Problem:
    """What the autograd.Function needs beyond tensors (one object instead of a long tuple)."""

    rhs: FlatRHS
    config: _Config
    params: tuple[torch.Tensor, ...]
    stats: GQStats | None
    event_fn: Callable | None = None
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
    event_fn: Callable | None = None,
    gtol: float | None = None,
    quad_order: int | None = None,
    quadrature: str | None = None,
    quad_rtol: float | None = None,
    quad_atol: float | None = None,
    adjoint_rtol=None,
    adjoint_atol=None,
    adjoint_method: str | None = None,
    adjoint_options: dict | None = None,
    adjoint_params: Sequence[torch.Tensor] | None = None,
    backward_state: str = "auto",
    quad_batch: int | None = None,
    warm_start: bool = True,
):
    """Solve dy/dt = func(t, y) like `torchdiffeq.odeint`; gradients by the GQ adjoint.

    Arguments shared with `torchdiffeq.odeint_adjoint` mean what they mean there (`event_fn`
    included: then `(event_t, solution)` is returned). With torchdiffeq's adaptive Runge-Kutta
    solvers as `adjoint_method` (dopri5, the default, and the others), the backward pass is ONE
    solve from t_N to t_0: steps end on every observation time, the adjoint jumps there, z restarts
    from the forward's y(t_i), and the step size carries on. The parameter gradient
    dL/dtheta = int a^T df/dtheta dt is then computed for all intervals at once, in batched VJPs,
    by one of three rules (`quadrature`):

    "adaptive" (default): error-controlled. Each interval starts as one panel; free projections of
        the integrand (a * dz/dt and a * z, read off the backward solve's dense output, no
        evaluation of f) are integrated with G1..G8 against G16, and each panel takes the smallest
        Gauss-Legendre order whose probe error fits its share of 0.3 * quad_rtol * |probe
        integral|, or lies at the dtype's round-off; panels no order fits are split at a solver
        step, and a panel needing more than G3 is kept as two halves when they take fewer nodes.
        Nodes stay within 2x the backward solve's evaluations. Where f jumps in t (the backward
        solve's steps collapse there), the jump is located by bisection on f and panels end at it;
        jump times in options=dict(jump_t=...) or step_t are stepped onto and are panel edges.
        `quad_rtol` defaults to the adjoint rtol. (Other adjoint solvers -- fixed grids, scipy --
        solve interval by interval and check a G2/K5 pair on the parameter integrand itself,
        ||K5 - G2|| <= quad_atol * sqrt(P) + quad_rtol * ||dL/dtheta||; quad_atol, default the
        adjoint atol, counts there only.)
    "gtol": the paper's rule, n = min(ceil(gtol * NFE_forward * |dt_i| / |T|), 64)
        Gauss-Legendre nodes per observation interval (selected by passing `gtol`, 0.1 in the
        paper). No error control: far off on long or oscillating intervals.
    "fixed": `quad_order` Gauss-Legendre nodes per observation interval (selected by passing
        `quad_order`).

    backward_state: "backsolve" solves z backwards beside a (the paper's method);
        "interpolate" keeps the forward solution (torchdiffeq's own dense output: 5 states per
        accepted step) and interpolates z, which stays stable on contractive dynamics, attracting
        limit cycles and trained fields where backsolving z drifts. "auto" (default): "interpolate"
        when method and adjoint_method are both adaptive Runge-Kutta solvers, else "backsolve"
        (fixed grids, where the record is coarse, and scipy, which keeps none). A backsolved z can
        drift far without failing (a trained classifier-like field at rtol 1e-3: 11-15x direct
        backprop's gradient error, nothing measurable flagging it); a backsolve that does fail is
        caught, as follows. When a
        backsolve fails (step-size underflow, non-finite state, |z| far beyond the forward's range,
        or z arriving at an observation time far from the forward's y there), the forward is solved
        again keeping its dense output and the backward pass is redone with "interpolate"
        (`gq_stats().backsolve_fallbacks` counts them). With z interpolated, a is
        solved alone and adjoint_atol is taken in y's units: it is scaled by max|dL/dy| / max|y|
        for a's solve (a is often far smaller than y, e.g. a loss averaged over a batch).
    quad_batch: most quadrature nodes per batched VJP (default: bounded by the state size).
    warm_start: (default True) the backward solve's first step is the step the forward took at
        t_N (adaptive solvers, same method both ways; when a is solved alone, whose error is
        measured on its own scale, and that step does not span the interval: the longer of 3/4 of
        it and the interval split evenly), instead of torchdiffeq's initial-step heuristic and
        the short steps that follow it. False restores the heuristic.

    A gradient it cannot vouch for -- after a backsolve fallback, with panels unconverged at the node
    cap, or with the quadrature's estimate above quad_rtol (above half of it where panels stopped at the dtype's
    round-off, where the estimate is a lower bound) -- gives one RuntimeWarning per call with the
    numbers and the fix. Read NFE, quadrature nodes, the estimate and `certified` with `impls.gq_stats()`.
    """
    cfg, params = _check_inputs(
        func, y0, t, rtol, atol, method, options, event_fn, gtol, quad_order, quadrature, quad_rtol, quad_atol,
        adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options, adjoint_params, backward_state, quad_batch,
        warm_start,
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
    if event_fn is not None and is_tuple:
        user_event_fn = event_fn
        event_fn = lambda t_, y_: user_event_fn(t_, unflatten(y_, shapes))  # noqa: E731
    prob = _Problem(rhs=rhs, config=cfg, params=params, stats=stats, event_fn=event_fn, steps=steps)
    sol, event_t = _GQAdjoint.apply(prob, flat_y0, t, *params)
    sol = unflatten(sol, shapes) if is_tuple else sol
    return sol if event_fn is None else (event_t, sol)


class _GQAdjoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, prob: _Problem, y0: torch.Tensor, t: torch.Tensor, *params: torch.Tensor):
        cfg, rhs = prob.config, prob.rhs
        with torch.no_grad(), record_function("gq::forward_solve"):
            kw = dict(rtol=cfg.rtol, atol=cfg.atol, method=cfg.method, options=dict(cfg.options))
            if prob.event_fn is None:
                sol = torchdiffeq.odeint(rhs, y0, t, **kw)
                event_t, t_sol = t.new_zeros(()), t
            else:
                # As torchdiffeq: the solution at [t0, event time]; no gradient through the event
                # time itself (`torchdiffeq.odeint_event` reroutes that one).
                event_t, sol = torchdiffeq.odeint(rhs, y0, t, event_fn=prob.event_fn, **kw)
                event_t = event_t.to(t)
                t_sol = torch.stack([t[0], event_t.reshape(())])
        nfe = rhs.nfe
        # One host read of t, here rather than in the backward loop.
        t_host = t_sol.detach().cpu().tolist()
        span = t_host[-1] - t_host[0]
        if cfg.quadrature == "fixed":
            orders = [cfg.quad_order] * (len(t_host) - 1)
        elif cfg.quadrature == "gtol":
            orders = [quad_order_from_gtol(cfg.gtol, nfe, b - a, span) for a, b in zip(t_host, t_host[1:])]
        else:
            orders = None
        ctx.prob, ctx.orders, ctx.nfe_forward, ctx.n_t, ctx.t_host = prob, orders, nfe, len(t), t_host
        # Backward solve i starts at t_i with the step the forward took there (warm_start).
        ctx.first_steps = prob.steps.at(t_host) if prob.steps is not None else None
        prob.steps = None
        ctx.dense = None
        if rhs.recorder is not None:
            ctx.dense = rhs.recorder.finish(t_sol[-1], sol[-1])
            rhs.recorder = None  # drop references to the stage evaluations
        if prob.stats is not None:
            prob.stats.nfe_forward += nfe
            prob.stats.knots += 0 if ctx.dense is None else ctx.dense.n_knots
        ctx.mark_non_differentiable(event_t)
        ctx.save_for_backward(t_sol, sol)
        return sol, event_t

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_sol: torch.Tensor, _grad_event_t: torch.Tensor):
        if _recordable(ctx.prob.config.adjoint_method):
            return _backward_by_sweep(ctx, grad_sol)
        return _backward_per_interval(ctx, grad_sol)


def _recordable(method: str) -> bool:
    """A solver whose steps we can follow into a dense output (adaptive Runge-Kutta, fixed grids)."""
    return issubclass(SOLVERS[method], (RKAdaptiveStepsizeODESolver, FixedGridODESolver))


def _backward_per_interval(ctx, grad_sol: torch.Tensor):
    """Adjoint solvers without a dense output we can follow (scipy_solver): one torchdiffeq solve per
    interval, G2/K5 panels on each with the interval's own error test, nodes re-solved. Checked as the
    sweep is (`_ZCheck`, finite states); a failed backsolve switches to the kept forward when the forward
    solver can keep one, and is said in the warning when it cannot."""
    prob, cfg, rhs = ctx.prob, ctx.prob.config, ctx.prob.rhs
    t, sol = ctx.saved_tensors
    need_t = ctx.needs_input_grad[2]
    nfe_start = rhs.nfe
    dense, ctx.dense = ctx.dense, None
    fallback = None
    while True:
        try:
            quad, a, orders = _per_interval_pass(ctx, grad_sol, dense, need_t, strict=_recordable(cfg.method))
            break
        except _sweep.SweepFailed as exc:
            _no_fallback(cfg, exc, kept=dense is not None)
            dense, fallback = _forward_dense(prob, sol[0], t), str(exc)
    t_grad = _t_grad(ctx, quad, grad_sol) if need_t else None
    error = float(quad.err_sq.sqrt() / _norm(quad.grads)) if quad.err_sq is not None else None
    _report(prob, rhs.nfe - nfe_start, quad, orders[::-1], error, fallback, suspect=quad.suspect)
    return (None, a, t_grad, *quad.grads)


def _per_interval_pass(ctx, grad_sol: torch.Tensor, dense, need_t: bool, strict: bool):
    """One backward pass of `_backward_per_interval`: (quadrature, dL/dy0, nodes per interval). A backsolved
    z that leaves the forward's path raises `SweepFailed` when `strict` (a fallback exists), else is kept
    in `quad.suspect` for the warning."""
    prob, cfg, rhs = ctx.prob, ctx.prob.config, ctx.prob.rhs
    t, sol = ctx.saved_tensors
    params = prob.params
    grads = [torch.zeros_like(p) for p in params]
    quad = _Quadrature(prob, grads, need_t)
    if dense is not None and dense.evals_needed:
        rhs.nfe += dense.evals_needed
        dense.fill(quad.rhs_batch)
    check = _ZCheck(sol, cfg, prob.stats) if dense is None else None
    brhs = _BacksolveRHS(rhs) if dense is None else _InterpRHS(rhs, dense)
    atol = cfg.adjoint_atol if dense is None else cfg.adjoint_atol * _adjoint_scale(sol, grad_sol)
    a = grad_sol[-1].clone()
    orders = []
    for i in range(len(t) - 1, 0, -1):
        t_hi, t_lo = t[i], t[i - 1]
        opts = dict(cfg.adjoint_options)
        if ctx.first_steps is not None:
            opts["first_step"] = ctx.first_steps[i]
        state = torch.stack([sol[i], a]) if dense is None else a
        with record_function("gq::backward_solve"):
            path = _BackwardPath(brhs, state, t_hi, t_lo, cfg, opts, atol)
        end = path.end
        if not bool(torch.isfinite(end).all()):
            raise _sweep.SweepFailed(f"the backward state is not finite at t[{i - 1}]")
        if check is not None:
            try:
                check(i - 1, end[0])
            except _sweep.SweepFailed as exc:
                if strict:
                    raise
                quad.suspect = quad.suspect or str(exc)
        if ctx.orders is not None:
            x, w = gauss_legendre(ctx.orders[i - 1], dtype=t.dtype, device=t.device)
            orders.append(quad.integrate_rule(path, dense, t_lo, t_hi, x, w))
        elif params or need_t:
            orders.append(quad.integrate_adaptive(path, dense, t_lo, t_hi))
        else:
            orders.append(0)
        a = (end if dense is not None else end[1]) + grad_sol[i - 1]
    return quad, a, orders


def _no_fallback(cfg: _Config, exc: Exception, kept: bool) -> None:
    """Raise when a failed backward solve has nothing left to fall back on: it already read z off the kept
    forward solution, or the forward solver keeps none."""
    if kept:
        raise RuntimeError(
            f"odeint_adjoint_gq: the backward solve of the adjoint failed ({exc}); "
            "loosen adjoint_rtol/adjoint_atol or use another adjoint_method."
        ) from None
    if not _recordable(cfg.method):
        raise RuntimeError(
            f"odeint_adjoint_gq: solving z backwards failed ({exc}) and method={cfg.method!r} keeps no dense "
            "forward solution to fall back on; use an adaptive Runge-Kutta or fixed-grid method."
        ) from None


def _report(prob: _Problem, nfe_backward: int, quad: _Quadrature, orders: list[int], error: float | None,
            fallback: str | None = None, located: int = 0, suspect: str | None = None,
            quad_rtol: float | None = None) -> None:  # fmt: skip
    """One backward pass's counts into the caller's `gq_stats()`, if any, and its one warning if the
    gradient cannot be vouched for (a fallback, panels left unconverged, an estimate above quad_rtol)."""
    cfg = prob.config
    quad_rtol = cfg.quad_rtol if quad_rtol is None else quad_rtol
    reasons, fixes = [], []
    if fallback is not None:
        reasons.append(f"solving z backwards failed ({fallback}), so z was read off the re-solved forward")
        fixes.append("pass backward_state='interpolate' to skip the failed attempt")
    if suspect is not None:
        reasons.append(f"{suspect}, and method={prob.config.method!r} keeps no forward solution to fall back on")
        fixes.append("use an adaptive Runge-Kutta or fixed-grid method (the fallback reads z off its solution)")
    if quad.unconverged:
        reasons.append(f"{quad.unconverged} quadrature panel(s) unconverged after {quad.nodes} nodes "
                       f"(cap {_NODES_PER_EVAL}x the backward solve's {nfe_backward} evaluations)")  # fmt: skip
        fixes.append("if func jumps in t, pass its jump times as options=dict(jump_t=...)")
    finite = error is not None and math.isfinite(error)
    near = finite and bool(quad.roundoff) and error > _ROUNDOFF_NEAR * quad_rtol
    if finite and (error > quad_rtol or near):
        relation = "exceeds" if error > quad_rtol else "is within a factor 2 of"
        reasons.append(f"the quadrature's error estimate {error:.2g} {relation} quad_rtol={quad_rtol:.2g}")
        if quad.roundoff:
            # Panels accepted at the round-off floor were not resolved further: the error can be larger (a
            # trained MLP in float32 on rk4: estimate 3.9e-6, error 1.8e-5).
            reasons[-1] += f" and is a lower bound ({quad.roundoff} panel(s) stopped at round-off)"
            eps = torch.finfo(prob.params[0].dtype if prob.params else torch.float64).eps
            fixes.append(f"{quad.roundoff} panel(s) are at round-off: use float64, or rtol >= {100 * eps:.0e}")
        else:
            fixes.append("loosen rtol, or use quadrature='fixed' with a larger quad_order")
    if reasons and not any("estimate" in r for r in reasons) and error is not None and math.isfinite(error):
        reasons.append(f"the quadrature's own error estimate is {error:.2g} (quad_rtol={quad_rtol:.2g})")
    if reasons:
        msg = ("odeint_adjoint_gq: this gradient is not certified: " + "; ".join(reasons) + ". Fix: "
               + "; ".join(dict.fromkeys(fixes)) + ".")  # fmt: skip
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    s = prob.stats
    if s is None:
        return
    s.nfe_backward += nfe_backward
    s.quad_nodes += quad.nodes
    s.quad_calls += quad.calls
    s.quad_orders = orders
    s.quad_panels += quad.panels
    s.quad_refinements += quad.refinements
    s.quad_unconverged += quad.unconverged
    s.quad_roundoff += quad.roundoff
    s.jumps_located += located
    if error is not None:
        s.quad_error = error
    s.backsolve_fallbacks += fallback is not None
    s.uncertified += bool(reasons)
    if reasons:
        s.warning = msg
    s.vmap_fallback = s.vmap_fallback or not prob.vmap_ok


def _t_grad(ctx, quad: _Quadrature, grad_sol: torch.Tensor) -> torch.Tensor:
    """dL/dt: moving t_i (i >= 1) only moves where y is read; moving t_0 moves the whole path."""
    t, sol = ctx.saved_tensors
    f_obs = quad.rhs_batch(t[1:], sol[1:])
    ctx.prob.rhs.nfe += len(t) - 1
    dl_dt = (f_obs * grad_sol[1:]).reshape(len(t) - 1, -1).sum(-1)
    t_grad = torch.cat([(quad.t_integral - dl_dt.sum()).reshape(1), dl_dt]).to(t.dtype)
    if len(t_grad) != ctx.n_t:  # event mode: t was (t0, dummy); the event time is not t[1]
        t_grad = torch.cat([t_grad[:1], t_grad.new_zeros(ctx.n_t - 1)])
    return t_grad


def _backward_by_sweep(ctx, grad_sol: torch.Tensor):
    """One backward solve across all observation times (`_sweep`; for fixed grids and options it does not
    take, torchdiffeq's solves per interval, stitched: `_solve_per_interval`), then one batched quadrature
    over every interval's panels -- the adaptive rule's panels chosen from free probes (`_panels`)."""
    prob, cfg, rhs = ctx.prob, ctx.prob.config, ctx.prob.rhs
    t, sol = ctx.saved_tensors
    params, need_t, times = prob.params, ctx.needs_input_grad[2], ctx.t_host
    nfe_start = rhs.nfe
    quad = _Quadrature(prob, [], need_t)
    fwd, ctx.dense = ctx.dense, None
    fallback = check = None
    while True:
        first_steps = ctx.first_steps
        if fwd is not None and first_steps is not None:  # a solved alone; entry i starts the solve t_i -> t_{i-1}
            first_steps = first_steps[:1] + [_a_first_step(h, abs(hi - lo))
                                             for h, lo, hi in zip(first_steps[1:], times, times[1:])]  # fmt: skip
        first = first_steps[-1] if first_steps is not None else cfg.adjoint_options.get("first_step")
        if fwd is not None and fwd.evals_needed:
            rhs.nfe += fwd.evals_needed
            fwd.fill(quad.rhs_batch)
        if fwd is None:
            brhs, state = _BacksolveRHS(rhs), torch.stack([sol[-1], grad_sol[-1]])
            check = _ZCheck(sol, cfg, prob.stats)

            def jump(i, y, check=check):
                # z restarts from the forward's own y(t_i) at every observation: backsolving drift stops
                # there -- but a z that arrives far from y(t_i) has left the forward's path, and a with it.
                check(i, y[0])
                return torch.stack([sol[i], y[1] + grad_sol[i]])
        else:
            brhs, state = _InterpRHS(rhs, fwd), grad_sol[-1]
            jump = lambda i, y: y + grad_sol[i]  # noqa: E731
        one_sweep = _sweep.supported(SOLVERS[cfg.adjoint_method], cfg.adjoint_options, cfg.adjoint_rtol,
                                     cfg.adjoint_atol)  # fmt: skip
        opts = {k: v for k, v in cfg.adjoint_options.items() if k != "first_step" or not one_sweep}
        # A backsolve that needs many times the forward's evaluations is leaving the forward's path
        # (an attracting limit cycle run backwards): keeping the forward is cheaper than finishing. The
        # forward interpolates its outputs while the backsolve steps onto every t_i: one more step each.
        budget = None
        if fwd is None and one_sweep:
            per_step = len(SOLVERS[cfg.adjoint_method].tableau.alpha) + 1
            budget = _BACKSOLVE_BUDGET * (ctx.nfe_forward + per_step * (len(times) - 1)) + 100
        # Likewise a backsolved z far outside the range the forward solution ever took.
        z_bound = (
            None
            if fwd is not None
            else _Z_BOUND
            * (float(sol.abs().max()) + float(cfg.atol if not torch.is_tensor(cfg.atol) else cfg.atol.max()))
        )
        g_max = float(grad_sol.abs().max())
        a_bound = _A_BOUND * g_max if fwd is None and 0 < g_max < math.inf else None
        atol = float(cfg.adjoint_atol)
        if fwd is not None:
            atol *= _adjoint_scale(sol, grad_sol)
        try:
            with record_function("gq::backward_solve"):
                if one_sweep:
                    path = _sweep.sweep(brhs, state, times, jump, solver_cls=SOLVERS[cfg.adjoint_method],
                                        rtol=float(cfg.adjoint_rtol), atol=atol, options=opts,
                                        first_step=first, max_evals=budget, z_bound=z_bound,
                                        a_bound=a_bound)  # fmt: skip
                else:
                    path = _solve_per_interval(brhs, state, t, jump, cfg, opts, first_steps, atol,
                                               z_bound, a_bound)  # fmt: skip
            if fwd is None:
                check(0, path.end[0])
            break
        except _sweep.SweepFailed as exc:
            _no_fallback(cfg, exc, kept=fwd is not None)
            # Backsolving z is unstable here (an attracting limit cycle, contractive dynamics, stiff
            # kinetics): keep the forward solution instead -- solve the forward again recording it --
            # and solve a alone. Said in the call's one warning (`_report`).
            fwd, fallback = _forward_dense(prob, sol[0], t), str(exc)
    a = (path.end[1] if fwd is None else path.end) + grad_sol[0]

    quad_rtol = cfg.quad_rtol
    if check is not None and not cfg.quad_rtol_given and issubclass(SOLVERS[cfg.adjoint_method], FixedGridODESolver):
        # A grid has no tolerance (rtol is torchdiffeq's unused default): integrate to a tenth of how far the
        # backsolved path itself is from the forward's, not to 1e-7 -- euler's a and z are 1e-3 off at best.
        # After a fallback a is solved on the same grid, as far off: the failed backsolve's distance still
        # measures it (the euler oscillator: 24 % off at t_8, 9159 nodes to 1e-7 on a 580 %-off gradient),
        # capped so that the quadrature is never what limits a grid's gradient.
        quad_rtol = max(quad_rtol, min(_GRID_QUAD_FRACTION * check.rel, _GRID_QUAD_MAX))
    breaks = path.breaks
    if fwd is not None and getattr(fwd, "steps", None) is not None:
        breaks = sorted({*breaks, *_forward_jumps(fwd, rhs, cfg, times)})
    orders, panels = [0] * (len(times) - 1), None
    if params or need_t:
        if fwd is None:

            def states(s):
                zs = path.dense(s)
                return zs[:, 0], zs[:, 1]
        else:

            def states(s):
                return fwd(s), path.dense(s)

        if ctx.orders is not None:
            n, edges = torch.tensor(ctx.orders), torch.tensor(times, dtype=torch.float64)
            panels = _panels.Panels(edges[:-1], edges[1:], n, torch.arange(len(n)), 0, 0, float("nan"))
        else:
            with record_function("gq::choose_panels"):
                idx = _panels.probe_elements(sol[0].numel())
                dense, kept = path.dense, fwd
                if idx is not None:  # a large state: probe a fixed sample of its elements
                    dense = dense.select(idx, keep=1 if fwd is None else 0)
                    kept = None if fwd is None else fwd.select(idx)
                # Nodes stay within a multiple of the backward solve's own evaluations (each node costs about one).
                max_nodes = max(_NODES_PER_EVAL * (rhs.nfe - nfe_start), _panels.MAX_PANEL_ORDER * (len(times) - 1))
                # Split panels where either dense output has a seam: a's steps, and z's when z is the forward's.
                seams = path.dense.breakpoints().cpu()
                if fwd is not None:
                    seams = torch.unique(torch.cat([seams, fwd.breakpoints().cpu().to(seams)]))
                panels = choose_panels(_probe(dense, kept), times, seams, quad_rtol,
                                       device=sol.device, dtype=sol.dtype,
                                       probe_size=2 * (sol[0].numel() if idx is None else len(idx)),
                                       edges=breaks, max_nodes=max_nodes)  # fmt: skip
        nodes, weights, owner = panels.nodes_and_weights(sol.dtype, sol.device)
        orders = torch.bincount(owner, minlength=len(times) - 1).tolist()
        z, a_n = states(nodes)
        part, _, quad.t_integral = quad._sum(nodes.to(t.dtype), z, a_n, weights)
        quad.nodes, quad.panels = len(nodes), len(panels.order)
        quad.refinements, quad.unconverged, quad.roundoff = panels.refinements, panels.unconverged, panels.roundoff
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, part)]
    else:
        grads = []
    t_grad = _t_grad(ctx, quad, grad_sol) if need_t else None
    _report(prob, rhs.nfe - nfe_start, quad, orders, panels.error if panels is not None else float("nan"), fallback,
            located=len(breaks), quad_rtol=quad_rtol)  # fmt: skip
    return (None, a, t_grad, *grads)


def _solve_per_interval(brhs, state, t, jump, cfg: _Config, opts: dict, first_steps, atol: float,
                        z_bound: float | None, a_bound: float | None) -> _sweep.Sweep:  # fmt: skip
    """The backward path by torchdiffeq's own solve on each interval t_i -> t_{i-1} (fixed grids; options the
    sweep does not take), each recorded and all stitched into one dense output. Checked as the sweep is: a
    solve that stops, a state that is not finite or leaves the bounds raises `SweepFailed`, and `jump`
    (z against the forward's y) runs at every observation time."""
    parts, y = [], state
    for i in range(len(t) - 1, 0, -1):
        o = dict(opts)
        if first_steps is not None:
            o["first_step"] = first_steps[i]
        try:
            path = _BackwardPath(brhs, y, t[i], t[i - 1], cfg, o, atol)
        except (AssertionError, RuntimeError) as exc:  # torchdiffeq's "underflow in dt", max_num_steps
            raise _sweep.SweepFailed(f"the solve over [t[{i - 1}], t[{i}]] stopped: {exc}") from None
        end = path.end
        if isinstance(brhs, _BacksolveRHS):  # [z, a]
            z_max, a_max = torch.stack([end[0].abs().max(), end[1].abs().max()]).tolist()  # one host read
        else:
            z_max = a_max = float(end.abs().max())
        if not (math.isfinite(z_max) and math.isfinite(a_max)):
            raise _sweep.SweepFailed(f"the backward state is not finite at t[{i - 1}]")
        if z_bound is not None and z_max > z_bound:
            raise _sweep.SweepFailed(f"backsolved z reached {z_max:.3g} at t[{i - 1}], beyond {z_bound:.3g}")
        if a_bound is not None and a_max > a_bound:
            raise _sweep.SweepFailed(f"the adjoint reached {a_max:.3g} at t[{i - 1}], beyond {a_bound:.3g}")
        parts.append(path.dense)
        y = jump(i - 1, end) if i > 1 else end
    span = [float(t[0]), float(t[-1])]
    breaks = sorted({*_sweep.user_times(opts, "step_t", span), *_sweep.user_times(opts, "jump_t", span)})
    return _sweep.Sweep(dense=Stitched(parts), end=y, steps=0, rejected=0, breaks=breaks)


def _a_first_step(h: float, span: float) -> float:
    """The first step of a's solve over an interval of length `span`, from the forward's step h there: h when it
    spans the interval (one step, as on untrained fields), else the longer of `_FIRST_STEP_FRACTION` of it and
    the interval split evenly into as many steps as h needs (3/4 of h alone turned 2 steps into 3 where h fit
    twice: workload L after 40 steps, 13 -> 19 evaluations)."""
    if h >= span:
        return h
    return max(_FIRST_STEP_FRACTION * h, span / math.ceil(span / h))


def _adjoint_scale(sol: torch.Tensor, grad_sol: torch.Tensor) -> float:
    """max|dL/dy| / max|y|: converts an absolute tolerance in y's units into a's, for solving a alone.

    With z read off the forward solution nothing but a's own error sets the backward steps, and a is
    often far smaller than y (a loss averaged over a batch of 1500: |a| ~ 2e-3 against |y| ~ 1.5), so an
    atol meant for y let a's solve take steps that kept none of its digits (the oscillator at batch 1500:
    gradient error 1.8 at rtol 1e-4, 5e-3 at 1e-6, against backsolving's 2.4e-2 and 1.4e-4).
    """
    g, y = float(grad_sol.abs().max()), float(sol.abs().max())
    r = g / y if g > 0 and y > 0 else 1.0
    return r if math.isfinite(r) and r > 0 else 1.0  # never atol = 0: a's zero elements would divide 0 by 0


def _forward_jumps(fwd, rhs: FlatRHS, cfg: _Config, times: list[float]) -> list[float]:
    """Jumps of f in t that the kept forward solve ran into (z is read off it: its steps, not a's, saw them)."""
    t0s, t1s, rejected, df = fwd.steps
    t0s, t1s = torch.stack(t0s).tolist(), torch.stack(t1s).tolist()
    span = abs(times[-1] - times[0])
    dtype = fwd.coeffs.dtype

    def f(t, y):
        rhs.nfe += 1
        with torch.no_grad():
            return rhs.eval(t.to(dtype), y).reshape(-1)

    found, _ = _sweep.locate_jumps(f, fwd, df, t0s, t1s, rejected, tol_t=max(0.1 * _min_tol(cfg.rtol) * span,
                                   4 * math.ulp(max(abs(times[0]), abs(times[-1])))),
                                   fixed=set(times))  # fmt: skip
    return found


def _probe(dense, fwd) -> Callable[[torch.Tensor], torch.Tensor]:
    """Free projections of the integrand at times s: a * dz/dt and a * z, elementwise (see `_panels`)."""

    def probe(s):
        if fwd is None:
            za, dza = dense.value_and_derivative(s)
            z, a, slope = za[:, 0], za[:, 1], dza[:, 0]
        else:
            (z, slope), a = fwd.value_and_derivative(s), dense(s)
        m = len(s)
        return torch.cat([(a * slope).reshape(m, -1), (a * z).reshape(m, -1)], dim=1)

    return probe


def _forward_dense(prob: _Problem, y0: torch.Tensor, t: torch.Tensor):
    """The forward solve again, keeping its dense output (what backward_state='interpolate' keeps)."""
    cfg, rhs = prob.config, prob.rhs
    recorder = StepRecorder(SOLVERS[cfg.method], reverse=bool(t[0] > t[1]))
    watched = FlatRHS(rhs.func, rhs.shapes, recorder=recorder)
    with torch.no_grad():
        out = torchdiffeq.odeint(watched, y0, t, rtol=cfg.rtol, atol=cfg.atol, method=cfg.method,
                                 options=dict(cfg.options))  # fmt: skip
    rhs.nfe += watched.nfe
    return recorder.finish(t[-1], out[-1])


class _BackwardPath:
    """One interval's backward solve, t_i -> t_{i-1}, and its states at any time inside.

    Solvers whose steps we can follow (adaptive Runge-Kutta, fixed grids) keep their own dense
    output, so quadrature nodes -- however many, however refined -- cost interpolations, not
    solves. Others (scipy_solver) are re-solved with the nodes as output times.
    """

    def __init__(self, brhs, state, t_hi, t_lo, cfg: _Config, opts: dict, atol):
        self.brhs, self.state, self.t_hi, self.t_lo = brhs, state, t_hi, t_lo
        self.kw = dict(rtol=cfg.adjoint_rtol, atol=atol, method=cfg.adjoint_method, options=opts)
        solver = SOLVERS[cfg.adjoint_method]
        span = torch.stack([t_hi, t_lo])
        self.dense = None
        if issubclass(solver, (RKAdaptiveStepsizeODESolver, FixedGridODESolver)):
            recorder = StepRecorder(solver, reverse=bool(t_hi > t_lo))
            watched = FlatRHS(brhs, None, recorder=recorder)
            out = torchdiffeq.odeint(watched, state, span, **self.kw)
            self.dense = recorder.finish(t_lo, out[-1])
            if self.dense.evals_needed:
                self.dense.fill(lambda ts, ys: torch.stack([brhs(tj, yj) for tj, yj in zip(ts, ys)]))
        else:
            out = _complete(torchdiffeq.odeint(brhs, state, span, **self.kw), 2)
        self.end = out[-1]

    def edges(self) -> torch.Tensor:
        """Initial panel boundaries, ascending: the backward solver's steps inside the interval."""
        lo, hi = torch.minimum(self.t_lo, self.t_hi), torch.maximum(self.t_lo, self.t_hi)
        if self.dense is None:
            return torch.linspace(0, 1, _PANELS_WITHOUT_DENSE + 1, dtype=lo.dtype, device=lo.device) * (hi - lo) + lo
        inner = self.dense.breakpoints().to(lo)
        inner = inner[(inner > lo) & (inner < hi)]
        edges = torch.cat([lo.reshape(1), inner, hi.reshape(1)])
        # Drop slivers left where a step boundary nearly meets the interval's end.
        keep = torch.cat([torch.ones(1, dtype=torch.bool, device=lo.device),
                          edges.diff() > 1e-10 * (hi - lo)])  # fmt: skip
        return edges[keep].contiguous() if keep[-1] else torch.cat([edges[keep][:-1], hi.reshape(1)])

    def at(self, s: torch.Tensor) -> torch.Tensor:
        """The backward state at times s (any order)."""
        if self.dense is not None:
            return self.dense(s)
        order = torch.argsort(s, descending=bool(self.t_hi > self.t_lo))
        span = torch.cat([self.t_hi.reshape(1), s[order]])
        out = _complete(torchdiffeq.odeint(self.brhs, self.state, span, **self.kw), len(span))[1:]
        return out[torch.argsort(order)]


def _complete(out: torch.Tensor, n: int) -> torch.Tensor:
    """scipy's solvers return only the points reached when they stop early (torchdiffeq passes that on)."""
    if len(out) != n:
        raise _sweep.SweepFailed(f"the backward solve stopped after {len(out) - 1} of {n - 1} output times")
    return out


class _ZCheck:
    """The backsolved z against the forward's y(t_i), which is exact to the forward's tolerance: a mismatch
    far beyond both solves' tolerances means z (and so a) left the forward's path -- stiff kinetics at a
    tight tolerance drift there with z bounded and a finite, 3e17 off. SweepFailed then, so the backward
    pass redoes itself with the kept forward solution."""

    def __init__(self, sol: torch.Tensor, cfg: _Config, stats: GQStats | None):
        self.sol, self.stats = sol, stats
        self.rtol = max(_min_tol(cfg.rtol), _min_tol(cfg.adjoint_rtol))
        self.atol = max(_min_tol(cfg.atol), _min_tol(cfg.adjoint_atol))
        if issubclass(SOLVERS[cfg.adjoint_method], FixedGridODESolver):
            # A grid has no tolerance, and a low-order one (euler) backsolves z a fraction of a percent off
            # y with a gradient as good as the adjoint's: only z leaving the path (1% of y or of max|y|) counts.
            self.rtol = max(self.rtol, _GRID_Z_RTOL)
            self.atol = max(self.atol, _GRID_Z_RTOL * float(sol.abs().max()))
        self.rel = 0.0

    def __call__(self, i: int, z: torch.Tensor) -> None:
        y = self.sol[i]
        scale = torch.maximum(z.abs(), y.abs()).mul_(self.rtol).add_(self.atol)
        diff = z - y
        ratio, rel = torch.stack([torch.linalg.vector_norm(diff / scale) / math.sqrt(max(z.numel(), 1)),
                                  torch.linalg.vector_norm(diff) / torch.linalg.vector_norm(y)]).tolist()  # fmt: skip
        if math.isfinite(rel):  # ||z - y|| / ||y||: how far the backsolved path is from the forward's
            self.rel = max(self.rel, rel)
        if self.stats is not None:
            self.stats.z_mismatch = max(self.stats.z_mismatch, ratio) if math.isfinite(ratio) else ratio
        if not ratio <= _Z_MISMATCH:  # NaN included
            raise _sweep.SweepFailed(f"backsolved z at t[{i}] is {ratio:.3g} tolerances from the forward's y there "
                                     f"(more than {_Z_MISMATCH:g})")  # fmt: skip


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
    """Accumulates int a^T df/dtheta dt (and a^T df/dt) over each interval from batched node VJPs."""

    def __init__(self, prob: _Problem, grads: list[torch.Tensor], need_t: bool):
        self.prob, self.grads, self.need_t = prob, grads, need_t
        self.t_integral = 0.0
        self.calls = self.nodes = self.panels = self.refinements = self.unconverged = self.roundoff = 0
        # Squared norms of each interval's K5 - G2 estimate (adaptive rule only): summed as if
        # independent, so no parameter-sized accumulator is kept across intervals.
        self.err_sq: torch.Tensor | None = None
        # A backsolved z that left the forward's path with no fallback to take (scipy both ways): for the warning.
        self.suspect: str | None = None

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

    @staticmethod
    def _states(path: _BackwardPath, dense, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = path.at(nodes)
        return (s[:, 0], s[:, 1]) if dense is None else (dense(nodes), s)

    def integrate_rule(self, path: _BackwardPath, dense, t_lo, t_hi, x, w) -> int:
        """One Gauss-Legendre rule over the interval (the paper's rule, or a fixed order)."""
        half = (t_hi - t_lo) / 2
        nodes = (t_lo + t_hi) / 2 + half * x
        z, a = self._states(path, dense, nodes)
        part, _, t_part = self._sum(nodes, z, a, (w * half).to(a.dtype))
        self._add(self.grads, part)
        self.t_integral = self.t_integral + t_part
        self.nodes += len(nodes)
        self.panels += 1
        return len(nodes)

    def integrate_adaptive(self, path: _BackwardPath, dense, t_lo, t_hi) -> int:
        """G2/K5 on panels of the backward solver's steps; bisect all panels until the estimate passes."""
        cfg = self.prob.config
        x, wk, wg = gauss_kronrod(dtype=t_lo.dtype, device=t_lo.device)
        # Kronrod-only nodes first, Gauss nodes last: a chunk without Gauss nodes needs one cotangent.
        order = torch.argsort((wg != 0).to(torch.int8), stable=True)
        x, wk, we = x[order], wk[order], (wk - wg)[order]
        n_kronrod_only = int((wg == 0).sum())
        edges = path.edges()
        edges = edges[list(range(0, len(edges) - 1, _STEPS_PER_PANEL)) + [len(edges) - 1]]
        sign = -1.0 if t_hi < t_lo else 1.0  # decreasing time: the integral runs from t_lo down to t_hi
        used = 0
        for level in range(_MAX_REFINEMENTS + 1):
            lo, hi = edges[:-1], edges[1:]
            half = sign * ((hi - lo) / 2).unsqueeze(1)
            nodes = (((lo + hi) / 2).unsqueeze(1) + (hi - lo).unsqueeze(1) / 2 * x).T.reshape(-1)  # node-major
            z, a = self._states(path, dense, nodes)
            w_k, w_e = (half * wk).T.reshape(-1).to(a.dtype), (half * we).T.reshape(-1).to(a.dtype)
            # K5 sums everywhere; K5 - G2 with a second (batched) cotangent, except where G2 has no node.
            part, err, t_part = self._sum(nodes, z, a, w_k, w_e, single_until=n_kronrod_only * len(lo))
            used += len(nodes)
            self.panels += len(lo)
            if not self.grads or self._converged(part, err, cfg):
                break
            if level == _MAX_REFINEMENTS:
                self.unconverged += 1
                break
            self.refinements += 1
            edges = torch.cat([torch.stack([lo, (lo + hi) / 2], 1).reshape(-1), hi[-1:]])
        self._add(self.grads, part)
        sq = _norm(err) ** 2
        self.err_sq = sq if self.err_sq is None else self.err_sq + sq
        self.t_integral = self.t_integral + t_part
        self.nodes += used
        return used

    def _converged(self, part, err, cfg: _Config) -> bool:
        """||K5 - G2|| <= quad_atol * sqrt(n) + quad_rtol * ||dL/dtheta so far||, L2 over all parameters
        (norms, not per-element ratios: three passes over parameter-sized tensors, not ten)."""
        n = sum(g.numel() for g in self.grads)
        total = _norm([g + p if p is not None else g for g, p in zip(self.grads, part)])
        return bool(_norm(err) <= cfg.quad_atol * math.sqrt(n) + cfg.quad_rtol * total)  # one host read

    @staticmethod
    def _add(acc: list[torch.Tensor], more: list[torch.Tensor | None]) -> None:
        for x, y in zip(acc, more):
            if y is not None:
                x.add_(y)

    def _sum(self, nodes, z, a, w_k, w_e=None, single_until: int = 0):
        """-> (sum_j w_k[j] g_j, sum_j w_e[j] g_j or None, t-integral), g_j = a_j^T df/d(theta, t).

        Both sums come from ONE forward per node chunk: their cotangents are batched
        (`is_grads_batched`). Nodes before `single_until` have w_e == w_k (no Gauss weight):
        there one VJP serves both sums. Sums start as the first chunk's own gradients (no
        zero-filled parameter-sized buffers).
        """
        params = self.prob.params
        shape = (-1,) + (1,) * (a.dim() - 1)
        wa_k = a * w_k.reshape(shape)
        wa_e = None if w_e is None else a * w_e.reshape(shape)
        chunk = self._chunk(len(nodes), z[0].numel())
        if chunk >= len(nodes):
            single_until = 0  # one call for all nodes: a shared forward beats a cheaper backward here
        cuts = sorted({*range(0, len(nodes), chunk), *([single_until] if 0 < single_until < len(nodes) else [])})
        part = [None] * len(params)
        err = None if w_e is None else [None] * len(params)
        t_sum = 0.0
        for s, e in zip(cuts, [*cuts[1:], len(nodes)]):
            sl = slice(s, e)
            with torch.enable_grad(), record_function("gq::quadrature_vjp"):
                tn = nodes[sl].detach().requires_grad_(self.need_t)
                f = self._batched(self.prob.rhs.eval, tn, z[sl].detach())
                inputs = params + ((tn,) if self.need_t else ())
                if not inputs or not f.requires_grad:
                    continue
                if wa_e is None or e <= single_until:
                    g = torch.autograd.grad(f, inputs, wa_k[sl], allow_unused=True)
                    ge = g
                else:
                    g, ge = self._grad_pair(f, inputs, wa_k[sl], wa_e[sl])
            self.calls += 1
            with record_function("gq::accumulate"):
                for i in range(len(params)):
                    part[i] = _acc(part[i], g[i], fresh=True)
                    if err is not None:
                        err[i] = _acc(err[i], ge[i], fresh=ge is not g)
                if self.need_t and g[-1] is not None:
                    t_sum = t_sum + g[-1].sum()
            # Free this chunk's parameter-sized gradients before the next chunk makes its own: peak
            # memory is then accumulators + one chunk, the same for every n (every tolerance).
            del f, g, ge
        return part, err, t_sum

    def _grad_pair(self, f, inputs, v_k, v_e):
        if self.prob.vmap_ok:
            try:
                both = torch.autograd.grad(f, inputs, torch.stack([v_k, v_e]), allow_unused=True,
                                           is_grads_batched=True)  # fmt: skip
                return [None if b is None else b[0] for b in both], [None if b is None else b[1] for b in both]
            except RuntimeError:  # an op without a batching rule for its backward: two passes
                pass
        g = torch.autograd.grad(f, inputs, v_k, allow_unused=True, retain_graph=True)
        return g, torch.autograd.grad(f, inputs, v_e, allow_unused=True)


def _acc(acc: torch.Tensor | None, g: torch.Tensor | None, fresh: bool) -> torch.Tensor | None:
    """acc + g, in place once acc is ours; the first g is kept as it is when it is a fresh tensor."""
    if g is None:
        return acc
    if acc is None:
        return g if fresh else g.clone()
    return acc.add_(g)


def _norm(tensors) -> torch.Tensor:
    norms = [torch.linalg.vector_norm(x) for x in tensors if x is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


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


def _min_tol(tol) -> float:
    """A tensor tolerance (per state element) as one number: its tightest entry."""
    return float(tol.min()) if torch.is_tensor(tol) else float(tol)


def _check_method(name: str, method: str) -> None:
    if method not in SOLVERS:
        _fail(ValueError, name, method, f"unknown solver; use one of {', '.join(sorted(SOLVERS))}.")


def _check_inputs(func, y0, t, rtol, atol, method, options, event_fn, gtol, quad_order, quadrature, quad_rtol,
                  quad_atol, adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options, adjoint_params,
                  backward_state, quad_batch, warm_start):  # fmt: skip
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
    if event_fn is not None and not callable(event_fn):
        _fail(TypeError, "event_fn", event_fn, "event_fn must be callable as event_fn(t, y), or None.")
    if gtol is not None and (isinstance(gtol, bool) or not isinstance(gtol, (int, float)) or not math.isfinite(gtol)
                             or gtol <= 0):  # fmt: skip
        _fail(ValueError, "gtol", gtol, "gtol must be a finite number > 0 (the paper uses 0.1), or None.")
    if quad_order is not None and (isinstance(quad_order, bool) or not isinstance(quad_order, int) or quad_order < 1):
        _fail(ValueError, "quad_order", quad_order,
              f"quad_order must be an int >= 1 (e.g. 2..{MAX_QUAD_ORDER}), or None to use gtol.")  # fmt: skip
    if gtol is not None and quad_order is not None:
        _fail(ValueError, "gtol", gtol, "gtol (the paper's rule) and quad_order (a fixed rule) exclude each other; "
              "pass one of them.")  # fmt: skip
    implied = "fixed" if quad_order is not None else "gtol" if gtol is not None else None
    if quadrature is None:
        quadrature = implied or "adaptive"
    elif quadrature not in QUADRATURES:
        _fail(ValueError, "quadrature", quadrature, f"use one of {', '.join(map(repr, QUADRATURES))}.")
    elif implied is not None and quadrature != implied:
        _fail(ValueError, "quadrature", quadrature, f"{'gtol' if implied == 'gtol' else 'quad_order'} selects "
              f"quadrature={implied!r}; drop one of the two.")  # fmt: skip
    if quadrature == "gtol" and gtol is None:
        gtol = 0.1  # the paper's value
    if quadrature == "fixed" and quad_order is None:
        _fail(ValueError, "quadrature", quadrature, "the fixed rule needs quad_order=n (nodes per interval).")
    if quadrature != "adaptive" and (quad_rtol is not None or quad_atol is not None):
        _fail(ValueError, "quad_rtol", quad_rtol, f"quad_rtol/quad_atol control the adaptive rule only; "
              f"drop them or {'gtol' if quadrature == 'gtol' else 'quad_order'}.")  # fmt: skip
    if quad_batch is not None and (isinstance(quad_batch, bool) or not isinstance(quad_batch, int) or quad_batch < 1):
        _fail(ValueError, "quad_batch", quad_batch, "quad_batch must be an int >= 1, or None for automatic.")
    if not isinstance(warm_start, bool):
        _fail(TypeError, "warm_start", warm_start, "warm_start must be True or False.")
    if backward_state not in BACKWARD_STATES:
        _fail(ValueError, "backward_state", backward_state, f"use one of {', '.join(map(repr, BACKWARD_STATES))}.")
    if backward_state == "auto":
        adaptive = all(issubclass(SOLVERS[m], RKAdaptiveStepsizeODESolver) for m in (method, adjoint_method))
        backward_state = "interpolate" if adaptive else "backsolve"
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
        if not isinstance(func, torch.nn.Module):
            fix = "func is not an nn.Module; pass adjoint_params=(tensors...), or () for y0/t gradients only."
            _fail(TypeError, "adjoint_params", None, fix)
        adjoint_params = tuple(func.parameters())
    adjoint_params = tuple(adjoint_params)
    if not all(torch.is_tensor(p) for p in adjoint_params):
        _fail(TypeError, "adjoint_params", adjoint_params, "adjoint_params must be a sequence of Tensors.")
    # Only parameters that need a gradient enter the autograd graph (as in torchdiffeq).
    params = tuple(p for p in adjoint_params if p.requires_grad)
    quad_rtol_given = quad_rtol is not None
    quad_rtol = _min_tol(adjoint_rtol) if quad_rtol is None else quad_rtol
    quad_atol = _min_tol(adjoint_atol) if quad_atol is None else quad_atol
    _check_tol("quad_rtol", quad_rtol)
    _check_tol("quad_atol", quad_atol)
    cfg = _Config(
        rtol=rtol, atol=atol, method=method, options=options, adjoint_rtol=adjoint_rtol,
        adjoint_atol=adjoint_atol, adjoint_method=adjoint_method, adjoint_options=adjoint_options,
        quadrature=quadrature, gtol=None if gtol is None else float(gtol), quad_order=quad_order,
        quad_rtol=float(quad_rtol), quad_atol=float(quad_atol), backward_state=backward_state,
        quad_batch=quad_batch, warm_start=warm_start, quad_rtol_given=quad_rtol_given,
    )  # fmt: skip
    return cfg, params
