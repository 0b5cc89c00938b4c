"""One backward solve across all observation times, for torchdiffeq's adaptive Runge-Kutta tableaus.

torchdiffeq's `odeint` per observation interval restarts the solver at every t_i: an initial-step
heuristic (one more evaluation), a few short steps growing back to a size already found, and its
own set-up, callbacks and dense-output bookkeeping -- on problems with many observation times that
overhead, not arithmetic, is what the backward pass costs. Here one loop walks t_N -> t_0: steps
end exactly on every t_i, the adjoint jumps there (a += dL/dy(t_i)), f is evaluated once at the
new state and the step size carries on. Every accepted step keeps torchdiffeq's own quartic dense
output (its `_interp_fit` on the tableau's `mid`), so the quadrature reads [z, a] anywhere.

The stepping follows torchdiffeq's `RKAdaptiveStepsizeODESolver` (same tableau, error ratio,
controller and options), so at the same tolerances the backward solve is as accurate as the one
`odeint` would take. A step whose state is not finite is rejected and retried smaller; when the
step size underflows, the state stays non-finite or `max_num_steps` runs out, `SweepFailed` says
why (the caller may then switch to the kept forward solution).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from torchdiffeq._impl.interp import _interp_fit  # pinned torchdiffeq==0.2.5
from torchdiffeq._impl.misc import _rms_norm, _select_initial_step
from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver

from ._dense import PiecewiseQuartic

# Adjoint options this loop honours; any other (perturb, ...) keeps torchdiffeq's own per-interval solves.
# step_t / jump_t: steps end there (and f is evaluated afresh past a jump_t), as in torchdiffeq.
OPTIONS = frozenset({"first_step", "safety", "ifactor", "dfactor", "max_num_steps", "min_step", "max_step",
                     "norm", "dtype", "step_t", "jump_t"})  # fmt: skip
# Non-finite trial steps in a row (each retried 5x shorter) before the solve is declared diverged.
_MAX_NONFINITE = 12
# Where to look for a jump of f in t (`locate_jumps`): steps accepted after this many rejections and
# this many times shorter than the longest step, runs of them merged when this few steps apart.
_JUMP_REJECTS = 3
_JUMP_RATIO = 1e-2
_JUMP_GAP = 3
# ... located to within this fraction of rtol x the time span (a node that close to it costs ~ that, relative).
_JUMP_TOL = 0.1


class SweepFailed(RuntimeError):
    """The backward solve could not continue (step-size underflow, non-finite state, max steps)."""


def supported(solver_cls: type, options: dict, rtol, atol) -> bool:
    return (
        issubclass(solver_cls, RKAdaptiveStepsizeODESolver)
        and set(options) <= OPTIONS
        and not torch.is_tensor(rtol)
        and not torch.is_tensor(atol)
    )


def user_times(options: dict, key: str, times: list[float]) -> list[float]:
    """The user's `step_t` or `jump_t` strictly inside the span of `times`, ascending, as floats."""
    lo, hi = min(times[0], times[-1]), max(times[0], times[-1])
    v = options.get(key)
    return sorted(x for x in ([] if v is None else torch.as_tensor(v).reshape(-1).tolist()) if lo < x < hi)


@dataclasses.dataclass
class Sweep:
    """The backward path: dense output over all steps, where each interval's steps are, the end state."""

    dense: PiecewiseQuartic
    end: torch.Tensor  # the state at t_0 (before dL/dy(t_0) is added)
    steps: int
    rejected: int
    # Times the integrand may jump at, ascending: the user's step_t/jump_t and the jumps the step control
    # ran into (`locate_jumps`). Panels end there, so no Gauss rule spans one.
    breaks: list[float] = dataclasses.field(default_factory=list)
    located: int = 0  # jumps located by bisection
    evals: int = 0  # evaluations of rhs, the bisection's included


def _suspects(hs: list[float], rejected: list[int]) -> list[tuple[int, int]]:
    """Runs of accepted steps where the controller collapsed: each step after >= `_JUMP_REJECTS`
    rejections and `_JUMP_RATIO` times shorter than the longest step, runs merged when close, each
    widened by a few steps on either side (the crossing step may follow the rejections)."""
    if not hs:
        return []
    small = _JUMP_RATIO * max(hs)
    ks = [k for k in range(len(hs)) if rejected[k] >= _JUMP_REJECTS and hs[k] <= small]
    runs: list[list[int]] = []
    for k in ks:
        if runs and k - runs[-1][1] <= _JUMP_GAP:
            runs[-1][1] = k
        else:
            runs.append([k, k])
    return [(max(lo - _JUMP_GAP, 0), min(hi + _JUMP_GAP, len(hs) - 1)) for lo, hi in runs]


def locate_jumps(
    rhs, dense, df, t0s, t1s, rejected, tol_t: float, fixed: set[float], ends=None, budget: int | None = None
) -> tuple[list[float], int]:
    """Times where the backward field jumps, each to within `tol_t`, and the evaluations spent finding them.

    A jump of f in t makes an adaptive solver reject its way down to steps of ~ tol / |jump| and creep
    across; the dense output stays smooth there, so probes read off it cannot see the jump, and a Gauss
    rule across it is off by ~ (distance of the nearest node to the jump) x |jump| -- more than the
    tolerance, since the step control (on [z, a], not on the parameter integrand) stopped short of it.
    So the field itself decides: in each run of collapsed steps the step across which f changed most
    holds the jump, and bisection on f(t, state(t)) -- which side's value f is nearer -- finds it.
    A panel edge there keeps every Gauss rule on one smooth side. `budget`: the most evaluations spent
    (default: as many as the solve took), so a noisy field's many rejections cannot run up the cost.
    """
    budget = max(64, len(t0s) * 6) if budget is None else budget
    found, evals = [], 0
    hs = [abs(b - a) for a, b in zip(t0s, t1s)]
    for lo, hi in _suspects(hs, rejected):
        if evals >= budget:
            break
        k = lo + int(torch.stack(df[lo : hi + 1]).argmax())
        if t1s[k] in fixed or t0s[k] in fixed:
            continue  # a step that ends on an observation time or a step_t: that edge is there already
        ta, tb = t0s[k], t1s[k]
        if ends is not None:
            fa, fb = ends(k)
        else:
            fa, fb = (rhs(torch.as_tensor(x, dtype=torch.float64), dense(torch.as_tensor(x, dtype=torch.float64)))
                      for x in (ta, tb))  # fmt: skip
            evals += 2
        while abs(tb - ta) > tol_t:
            m = (ta + tb) / 2
            if m in (ta, tb):
                break
            st = torch.as_tensor(m, dtype=torch.float64)
            fm = rhs(st, dense(st))
            evals += 1
            if torch.linalg.vector_norm(fm - fa) <= torch.linalg.vector_norm(fm - fb):
                ta, fa = m, fm
            else:
                tb, fb = m, fm
        found.append((ta + tb) / 2)
    return sorted(found), evals


def sweep(
    rhs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    state: torch.Tensor,
    times: list[float],
    jump: Callable[[int, torch.Tensor], torch.Tensor],
    *,
    solver_cls: type,
    rtol: float,
    atol: float,
    options: dict,
    first_step: float | None,
    max_evals: int | None = None,
    z_bound: float | None = None,
    a_bound: float | None = None,
) -> Sweep:
    """Solve d state/dt = rhs(t, state) from times[-1] down the list to times[0].

    At each times[i], 0 < i < len(times) - 1, the state becomes `jump(i, state)` before going on.
    `first_step`: the size of the first step (a warm start); None uses torchdiffeq's heuristic.
    `max_evals`: give up (SweepFailed) after this many evaluations of `rhs`.
    `z_bound`: give up when |state[0]| (backsolved z) exceeds it anywhere: z has left the forward's path.
    `a_bound`: ... or when |state[1]| (the adjoint) does (with `z_bound` only): a z a little off a stiff
    field's slow manifold sees its fast modes unstable backwards, and a explodes while z stays bounded.
    """
    tab = solver_cls.tableau
    dtype, device = state.dtype, state.device
    alpha = tab.alpha.tolist()
    beta = [b.to(dtype=dtype, device=device) for b in tab.beta]
    c_sol = tab.c_sol.to(dtype=dtype, device=device)
    c_err = tab.c_error.to(dtype=dtype, device=device)
    mid = solver_cls.mid.to(dtype=dtype, device=device)
    fsal = bool(tab.c_sol[-1] == 0 and (tab.c_sol[:-1] == tab.beta[-1]).all())
    order = solver_cls.order
    safety = float(options.get("safety", 0.9))
    ifactor = float(options.get("ifactor", 10.0))
    dfactor = float(options.get("dfactor", 0.2))
    max_steps = int(options.get("max_num_steps", 2**31 - 1))
    min_step = float(options.get("min_step", 0.0))
    max_step = float(options.get("max_step", math.inf))
    norm = options.get("norm", _rms_norm)
    default_norm = norm is _rms_norm
    user_steps, user_jumps = user_times(options, "step_t", times), user_times(options, "jump_t", times)

    # tau = sign * t increases along the solve; the solver works in tau as torchdiffeq's does.
    sign = 1.0 if times[0] > times[-1] else -1.0
    shape, n = state.shape, state.numel()

    evals = 0

    def f(tau: float, y: torch.Tensor) -> torch.Tensor:
        nonlocal evals
        evals += 1
        if max_evals is not None and evals > max_evals:
            raise SweepFailed(f"more than {max_evals} evaluations")
        t = torch.scalar_tensor(sign * tau, dtype=dtype, device=device)
        return rhs(t, y.view(shape)).reshape(-1) * sign

    y = state.reshape(-1).clone()
    tau = sign * times[-1]
    # The user's step_t / jump_t in tau (ascending along the solve), walked with a pointer.
    stops = sorted({sign * x for x in user_steps + user_jumps})
    jumps_tau = {sign * x for x in user_jumps}
    nxt = 0
    fy = f(tau, y)
    if first_step is None:
        tau_t = torch.tensor(tau, dtype=torch.float64, device=device)

        def f_t(t_, y_):
            return f(float(t_), y_)

        dt = float(_select_initial_step(f_t, tau_t, y, order - 1, rtol, atol, norm, f0=fy))
    else:
        dt = abs(float(first_step))
    k = torch.empty(len(alpha) + 1, n, dtype=dtype, device=device)
    t0s, t1s, hs, fit, rej_before = [], [], [], [], []
    steps = rejected = nonfinite = since_accept = 0
    for i in range(len(times) - 1, 0, -1):
        target = sign * times[i - 1]
        while tau < target:
            if steps + rejected >= max_steps:
                raise SweepFailed(f"max_num_steps exceeded ({max_steps})")
            h = min(max(dt, min_step), max_step)
            while nxt < len(stops) and stops[nxt] <= tau:
                nxt += 1
            stop = min(target, stops[nxt]) if nxt < len(stops) else target
            clipped = tau + h >= stop
            tau1 = stop if clipped else tau + h
            at_jump = clipped and tau1 in jumps_tau
            h = tau1 - tau
            if not (h > 0 and tau + h > tau) or (h < 1e-14 * max(1.0, abs(tau)) and not clipped):
                raise SweepFailed(f"underflow in dt {h:.3g} at t = {sign * tau:.6g}")
            k[0] = fy
            for s, (a_s, b_s) in enumerate(zip(alpha, beta)):
                t_s = tau1 if a_s == 1.0 else tau + a_s * h
                if at_jump and a_s == 1.0:
                    t_s = math.nextafter(tau1, -math.inf)  # f's value on this side of the jump
                y_s = torch.addmv(y, k[: s + 1].T, b_s, alpha=h)
                k[s + 1] = f(t_s, y_s)
            y1 = y_s if fsal else torch.addmv(y, k.T, c_sol, alpha=h)
            err = torch.mv(k.T, c_err) * h
            if default_norm:
                scale = torch.maximum(y.abs(), y1.abs()).mul_(rtol).add_(atol)
                ratio = torch.linalg.vector_norm(err / scale) / math.sqrt(n)
            else:
                scale = torch.maximum(y.abs(), y1.abs()) * rtol + atol
                ratio = norm((err / scale).view(shape))
            if z_bound is None:
                ratio = float(ratio)  # the step's one host read
            else:
                ratio, z_max, a_max = torch.stack([ratio, *y1.view(shape).reshape(2, -1).abs().max(1).values]).tolist()
                if z_max > z_bound:  # NaN compares False: left to the non-finite check below
                    raise SweepFailed(f"backsolved z reached {z_max:.3g} at t = {sign * tau1:.6g}, "
                                      f"beyond {z_bound:.3g} (10x the forward's largest |y|)")  # fmt: skip
                if a_bound is not None and a_max > a_bound:
                    raise SweepFailed(f"the adjoint reached {a_max:.3g} at t = {sign * tau1:.6g}, beyond {a_bound:.3g} "
                                      "(1e8x the largest |dL/dy|)")  # fmt: skip
            if not math.isfinite(ratio):
                nonfinite += 1
                rejected += 1
                since_accept += 1
                if nonfinite > _MAX_NONFINITE:
                    raise SweepFailed(f"non-finite values in the backward state at t = {sign * tau:.6g}")
                dt = h * dfactor
                continue
            nonfinite = 0
            accept = ratio <= 1 or h <= min_step
            if accept:
                f1 = k[-1].clone()
                # The dense output's ingredients; fitted for all steps at once after the loop.
                fit.append((y, y1, torch.addmv(y, k.T, mid, alpha=h), fy, f1))
                hs.append(h)
                t0s.append(sign * tau)
                t1s.append(sign * tau1)
                rej_before.append(since_accept)
                y, fy, tau = y1, f1, tau1
                if at_jump:
                    fy = f(math.nextafter(tau, math.inf), y)  # past the jump: f afresh, as torchdiffeq does
                steps += 1
                since_accept = 0
            else:
                rejected += 1
                since_accept += 1
            # torchdiffeq's controller (_optimal_step_size); a step shortened to land on t_i does
            # not shrink the next one.
            if ratio == 0:
                factor = ifactor
            else:
                factor = min(ifactor, max(safety / ratio ** (1.0 / order), 1.0 if ratio < 1 else dfactor))
            dt = max(h * factor, dt) if (accept and clipped) else h * factor
        if i > 1:
            y = jump(i - 1, y.view(shape)).reshape(-1)
            fy = f(tau, y)
    y0s, y1s, mids, f0s, f1s = (torch.stack(c) for c in zip(*fit))
    h = torch.tensor(hs, dtype=dtype, device=device).unsqueeze(1)
    coeffs = torch.stack(_interp_fit(y0s, y1s, mids, f0s, f1s, h), dim=1)  # (steps, 5, n)
    dense = PiecewiseQuartic(
        torch.tensor(t0s, dtype=torch.float64),
        torch.tensor(t1s, dtype=torch.float64),
        coeffs.view(len(hs), 5, *shape),
    )
    span = abs(times[-1] - times[0])
    found, spent = locate_jumps(
        lambda t, y_: rhs(t.to(dtype), y_.view(shape)).reshape(-1) * sign, dense,
        list(torch.linalg.vector_norm(f1s - f0s, dim=1)), t0s, t1s, rej_before,
        tol_t=max(_JUMP_TOL * rtol * span, 4 * math.ulp(max(abs(times[0]), abs(times[-1])))),
        fixed={*times, *user_steps, *user_jumps}, ends=lambda k: (f0s[k], f1s[k]), budget=max(64, evals),
    )  # fmt: skip
    breaks = sorted({*user_steps, *user_jumps, *found})
    return Sweep(dense=dense, end=y.view(shape), steps=steps, rejected=rejected, breaks=breaks, located=len(found),
                 evals=evals + spent)  # fmt: skip
