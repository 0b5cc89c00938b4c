"""One stress case, one method: gradient error against a float64 reference, cost, warnings.

The three methods are GQ's default (`impls.odeint_adjoint_gq`, no options), torchdiffeq's `odeint_adjoint`
and direct backprop (`torchdiffeq.odeint`), all with the case's solver (dopri5 at its rtol/atol, or a fixed
grid). Cost is what the backward pays in evaluations of f: backward NFE, plus quadrature nodes for GQ
(`impls.gq_stats()`). Nothing here is timed: time is the runner's (`gqbench run`, `prepare`/`measure`).
`verdict` applies issue 23's bounds to a case's three rows. Trained weights and references are cached
on disk (`cache_dir`) keyed by the case's `problem_key`, so float32/float64 and every tolerance share them.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torchdiffeq

import impls

from ..define.stress_problems import FAMILIES, StressCase

METHODS = ("direct", "adjoint", "gq")
# GQStats fields recorded per GQ row; read with a default so the suite runs before and after they exist.
GQ_FIELDS = ("quad_error", "quad_unconverged", "backsolve_fallbacks", "quad_panels", "quad_refinements",
             "quad_calls", "certified", "quad_roundoff", "z_mismatch")  # fmt: skip
TRAIN_TOL = 1e-3
REF_TOL = 1e-12


def _atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def trained_state(case: StressCase, cache_dir: str | Path) -> dict | None:
    """The field's state_dict after `case.train_steps` Adam steps of direct backprop (float32, dopri5 at
    1e-3, the family's loss), cached; None for initial weights. Stops at the last finite step."""
    if case.train_steps == 0:
        return None
    path = Path(cache_dir) / "trained" / f"{case.problem_key}.pt"
    if path.exists():
        return torch.load(path)
    func, y0, t, loss = case.build("float32")
    opt = torch.optim.Adam(func.parameters(), lr=case.train_lr)
    good = {k: v.clone() for k, v in func.state_dict().items()}
    for _ in range(case.train_steps):
        opt.zero_grad()
        value = loss(torchdiffeq.odeint(func, y0, t, rtol=TRAIN_TOL, atol=TRAIN_TOL, method="dopri5"))
        value.backward()
        opt.step()
        if not all(torch.isfinite(p).all() for p in func.parameters()):
            break
        good = {k: v.clone() for k, v in func.state_dict().items()}
    _atomic_save(good, path)
    return good


def instance(case: StressCase, cache_dir: str | Path, dtype: str | None = None):
    """(func, y0, t, loss) in `dtype` (default the case's) with the case's weights."""
    func, y0, t, loss = case.build(dtype)
    state = trained_state(case, cache_dir)
    if state is not None:
        func.load_state_dict({k: v.to(next(func.parameters()).dtype) for k, v in state.items()})
    return func, y0, t, loss


def flat_gradients(func, y0, t, loss, solve, counter: list | None = None) -> tuple[torch.Tensor, dict]:
    """All parameter gradients, then y0's, flattened; and, when `solve` wrapped func in an `NFECounter`
    (appended to `counter`), the forward and backward NFE."""
    y0 = y0.detach().clone().requires_grad_(True)
    for q in func.parameters():
        q.grad = None
    value = loss(solve(func, y0, t))
    nfe_fwd = counter[-1].nfe if counter else None
    value.backward()
    info = {}
    if counter:
        info.update(nfe_fwd=nfe_fwd, nfe_bwd=counter[-1].nfe - nfe_fwd)
    grads = [torch.zeros_like(q) if q.grad is None else q.grad for q in func.parameters()] + [y0.grad]
    return torch.cat([g.reshape(-1) for g in grads]), info


def _reference_solve(case: StressCase):
    """float64 direct backprop through dopri8 at 1e-12, its steps ending on every observation time
    (`step_t`) and on the field's jumps in t (`jump_t`): torchdiffeq otherwise reads the solution off
    dopri8's interpolant, 1e-8 off the closed forms here where the steps land is 1e-14. Big states go in
    checkpointed pieces (autograd's graph of dopri8 at 1e-12 through workload L w=1000 is gigabytes)."""
    jump_t = case.jump_t
    pieces = 8 if case.family in ("workload_l", "conv") else 1

    def piece(func, y, t0, t1):
        opts = dict(step_t=torch.tensor([t1], dtype=torch.float64))
        inside = [j for j in jump_t if t0 < j < t1]
        if inside:
            opts["jump_t"] = torch.tensor(inside, dtype=torch.float64)
        span = torch.tensor([t0, t1], dtype=torch.float64)
        return torchdiffeq.odeint(func, y, span, rtol=REF_TOL, atol=REF_TOL, method="dopri8", options=opts)[-1]

    def solve(func, y0, t):
        ys, y = [y0], y0
        for t0, t1 in zip(t[:-1].tolist(), t[1:].tolist(), strict=True):
            edges = np.linspace(t0, t1, pieces + 1)
            edges[-1] = t1
            for a, b in zip(edges[:-1], edges[1:], strict=True):
                if pieces == 1:
                    y = piece(func, y, float(a), float(b))
                else:
                    y = torch.utils.checkpoint.checkpoint(piece, func, y, float(a), float(b), use_reentrant=False)
            ys.append(y)
        return torch.stack(ys)

    return solve


def reference(case: StressCase, cache_dir: str | Path) -> np.ndarray:
    """The float64 reference gradient (closed form where the family has one), cached by problem_key."""
    path = Path(cache_dir) / "references" / f"{case.problem_key}.pt"
    if path.exists():
        return torch.load(path).numpy()
    func, y0, t, loss = instance(case, cache_dir, "float64")
    exact = FAMILIES[case.family].exact
    solve = (lambda f, y, tt: exact(f, y, tt)) if exact is not None else _reference_solve(case)
    grads, _ = flat_gradients(func, y0, t, loss, solve)
    grads = grads.detach()
    if not torch.isfinite(grads).all():
        raise FloatingPointError(f"the reference gradient of {case.problem_key} is not finite")
    _atomic_save(grads, path)
    return grads.numpy()


def _solver(method: str, case: StressCase, counter: list, t: torch.Tensor, backward_state: str = "auto"):
    kw = case.solver_kwargs(t)

    def counted(func):
        wrapped = impls.NFECounter(func)
        counter.append(wrapped)
        return wrapped

    if method == "gq":
        gq = dict(kw, backward_state=backward_state)
        return lambda f, y, t: impls.odeint_adjoint_gq(f, y, t, **gq)
    if method == "adjoint":
        return lambda f, y, t: torchdiffeq.odeint_adjoint(counted(f), y, t, **kw)
    if method == "direct":
        return lambda f, y, t: torchdiffeq.odeint(counted(f), y, t, **kw)
    raise ValueError(f"method {method!r}: use one of {', '.join(METHODS)}")


def measure(case: StressCase, method: str, cache_dir: str | Path, gq_backward_state: str = "auto") -> dict:
    """One row: the case, the method, its gradient error, cost, warnings and GQ's stats (one call).
    `gq_backward_state`: GQ's `backward_state` for this row ("auto": its default), recorded in the row."""
    row = dict(case_row(case), method=method, status="ok", error="", gq_backward_state=gq_backward_state)
    ref = reference(case, cache_dir)
    func, y0, t, loss = instance(case, cache_dir)
    counters: list = []
    solve = _solver(method, case, counters, t, gq_backward_state)
    stats = impls.GQStats()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with impls.gq_stats(stats):
                grads, nfe = flat_gradients(func, y0, t, loss, solve, counters)
        except Exception as exc:  # noqa: BLE001 -- a failing method is a row
            row.update(status="error", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
            grads, nfe = None, {}
    row.update(nfe)
    row["warnings"] = " | ".join(f"{w.category.__name__}: {str(w.message)[:200]}" for w in caught)
    row["n_warnings"] = len(caught)
    gq_warnings = [
        w for w in caught if issubclass(w.category, RuntimeWarning) and "odeint_adjoint_gq" in str(w.message)
    ]
    row["gq_warned"] = bool(gq_warnings)
    row["gq_warned_estimate"] = any("estimat" in str(w.message) for w in gq_warnings)
    if method == "gq":
        row["nfe_fwd"], row["nfe_bwd"], row["quad_nodes"] = stats.nfe_forward, stats.nfe_backward, stats.quad_nodes
        for name in GQ_FIELDS:
            value = getattr(stats, name, None)
            row[name] = None if value is None else float(value)
    row["cost"] = row.get("nfe_bwd", math.nan) + (row.get("quad_nodes") or 0)
    if grads is not None:
        g = grads.detach().to(torch.float64).numpy()
        row["grad_rel_err"] = float(np.linalg.norm(g - ref) / np.linalg.norm(ref))
        if not np.isfinite(row["grad_rel_err"]):
            row["status"] = "nan"
    return row


def case_row(case: StressCase) -> dict:
    return dict(case_id=case.case_id, problem_key=case.problem_key, family=case.family, dtype=case.dtype,
                rtol=case.rtol, atol=case.atol, weights=case.weights, width=case.width, batch=case.batch,
                seed=case.seed, knobs=str(dict(case.knobs)), solver=case.solver,
                grid_steps=case.grid_steps)  # fmt: skip


def verdict(rows: list[dict]) -> dict:
    """Issue 23's bounds on one case's rows (one per method).

    error_ok: GQ's error <= 10 * max(rtol, the better of the adjoint's and direct backprop's errors), or
    GQ warned naming its estimate. cost_ok: GQ's backward NFE + nodes <= 3 x the adjoint's backward NFE,
    where the adjoint succeeded (finite, within 10 x max(rtol, direct's error)); else not applicable."""
    by = {r["method"]: r for r in rows}
    gq, adj, direct = by.get("gq", {}), by.get("adjoint", {}), by.get("direct", {})
    rtol = gq.get("rtol") or adj.get("rtol") or direct.get("rtol")

    def err(r):
        e = r.get("grad_rel_err")
        return e if r.get("status") == "ok" and e is not None and math.isfinite(e) else math.inf

    best = min(err(adj), err(direct))
    error_bound = 10 * max(rtol, best if math.isfinite(best) else 0.0)
    warned = bool(gq.get("gq_warned_estimate"))
    error_ok = (err(gq) <= error_bound) or warned
    adjoint_fine = err(adj) <= 10 * max(rtol, err(direct) if math.isfinite(err(direct)) else math.inf)
    cost_bound = 3 * adj["nfe_bwd"] if adjoint_fine and adj.get("nfe_bwd") is not None else math.nan
    cost = gq.get("cost", math.nan) if gq.get("status") in ("ok", "nan") else math.nan
    if math.isnan(cost_bound):
        cost_ok = True
    else:
        cost_ok = bool(cost <= cost_bound)  # NaN cost (GQ failed or timed out) is over the bound
    return dict(error_bound=error_bound, error_ok=bool(error_ok), cost_bound=cost_bound, cost_ok=cost_ok,
                warned=warned, passed=bool(error_ok and cost_ok))  # fmt: skip
