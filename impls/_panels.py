"""Where to put the quadrature nodes: panels and Gauss-Legendre orders chosen from free probes.

The parameter integrand g(t) = a(t)^T df/dtheta(t, z(t)) costs a forward and a backward pass of
the network per node, so an error estimate made of more such nodes (a Gauss-Kronrod pair) costs
more than the integral it checks: on smooth problems the old G2/K5 rule spent 5 nodes and two
cotangents where the paper's 2 Gauss nodes were already accurate to 1e-6. But projections of g
are free: for a field whose last layer is linear, a^T f is g projected onto that layer's weights
(scaling f scales them), and a*z, elementwise, follows the inputs of the first. Both are read off
the backward solve's dense output (f as dz/dt, its slope), with no evaluation of f.

So each observation interval starts as one panel; the probes are integrated there with G1..G8 and
G16 (the reference), and the panel takes the smallest order whose probe error fits its share of the
budget, `_SAFETY * |panel| / |T| * quad_rtol * |probe integral|` (relative: the probes' absolute
scale says nothing about the gradient's units, so quad_atol has no say here);
panels that no order up to 8 satisfies are bisected. The parameter integral is then taken once, at
the chosen nodes only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import torch

from ._quadrature import gauss_legendre

MAX_PANEL_ORDER = 8
_REFERENCE_ORDER = 16
# The probes stand in for the integrand; a fraction of the tolerance keeps the chosen orders on the
# safe side of what the probes say. 0.3, checked against the parameter gradient on the hard problems
# (oscillator, forced_mlp, sines, workload_l, g1d at rtol 1e-3..1e-9, float64): the same errors as 0.1
# within 2x (sines at 1e-7: 2.1e-7 against 1.0e-7; the adjoint 6.3e-7), where 1.0 lost up to 4x against
# the adjoint (forced_mlp at 1e-5: 2.8e-4 against 6.8e-5); on workload L trained 80 steps 0.1 took G8
# (or 2 x G3) where 0.3 takes G4, at the same gradient error (1.25e-2; direct backprop 1.95e-2).
_SAFETY = 0.3
_MAX_BISECTIONS = 12
# Round-off of a probe sum: this many ulps of the integral of |probe| (QUADPACK uses 50 eps).
_ROUNDOFF = 50.0
# A bisection whose halves' errors add up to at least this fraction of their parent's made no progress.
_STALL = 0.9
# ... and whose error is within this factor of its round-off level (elsewhere a stall is an integrand not
# yet resolved, e.g. an oscillation longer than the panel: bisection goes on).
_NEAR_ROUNDOFF = 100.0
# Panels that pass only above this order are also tried as two halves (`choose_panels`).
_SPLIT_ABOVE = 3
# Probe values evaluated at once (panels x nodes x probe size): bounds the memory of the selection.
_PROBE_ELEMENTS = 1 << 22
# States larger than this are probed at a fixed random sample of this many elements: the probes then
# cost O(nodes x sample), not O(nodes x batch x dim), which for a large batch through a small network
# (the paper's image model: 1437 x 160 elements, 2 quadrature nodes) cost more than the quadrature itself.
# The budget is relative, so a sample of many elements estimates the same ratio.
PROBE_SAMPLE = 2048


@dataclasses.dataclass
class Panels:
    """Accepted panels: [start, end] (in the direction of t), Gauss order, owning interval."""

    start: torch.Tensor  # float64
    end: torch.Tensor
    order: torch.Tensor  # int64
    interval: torch.Tensor  # int64
    refinements: int
    unconverged: int
    error: float  # the probes' own error estimate, relative (L2)
    roundoff: int = 0  # panels accepted at round-off: on the dtype's floor, or where bisecting no longer helped

    def nodes_and_weights(self, dtype, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All panels' nodes (float64), weights (dtype) and owning interval, grouped by order."""
        nodes, weights, owner = [], [], []
        for n in torch.unique(self.order).tolist():
            sel = self.order == n
            a, b, i = self.start[sel], self.end[sel], self.interval[sel]
            x, w = gauss_legendre(n, dtype=torch.float64)
            half = ((b - a) / 2).unsqueeze(1)
            nodes.append((((a + b) / 2).unsqueeze(1) + half * x).reshape(-1))
            weights.append((half * w).reshape(-1))
            owner.append(i.repeat_interleave(n))
        return (torch.cat(nodes).to(device), torch.cat(weights).to(device=device, dtype=dtype),
                torch.cat(owner))  # fmt: skip


def probe_elements(n: int) -> torch.Tensor | None:
    """Which of a state's n elements the probes watch: None (all) up to `PROBE_SAMPLE`, else a fixed
    sample (seeded, so the same every call; random, so it never aliases with the state's layout)."""
    return None if n <= PROBE_SAMPLE else _sample(n)


@functools.lru_cache(maxsize=8)
def _sample(n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:PROBE_SAMPLE].sort().values


@functools.lru_cache(maxsize=16)
def _rules(dtype, device):
    """Nodes of G1..G8 and G16 on [-1, 1], concatenated, and each rule's weights over all of them
    (cached: read-only tables, built once per dtype and device)."""
    orders = [*range(1, MAX_PANEL_ORDER + 1), _REFERENCE_ORDER]
    xs, ws = zip(*(gauss_legendre(n, dtype=torch.float64) for n in orders))
    x = torch.cat(xs)
    w = torch.zeros(len(orders), len(x), dtype=torch.float64)
    at = 0
    for r, wr in enumerate(ws):
        w[r, at : at + len(wr)] = wr
        at += len(wr)
    return x.to(device), w.to(device=device, dtype=dtype)


def choose_panels(
    probe: Callable[[torch.Tensor], torch.Tensor],
    times: list[float],
    breaks: torch.Tensor,
    rtol: float,
    *,
    device,
    dtype,
    probe_size: int | None = None,
    edges: list[float] = (),
    max_nodes: int | None = None,
) -> Panels:
    """Panels and orders for every interval [times[i-1], times[i]], from `probe(nodes) -> (m, size)`.

    `breaks`: the backward solver's step boundaries (float64). A panel is split at the boundary
    nearest its middle while it holds one: the dense output is one polynomial per step, so panels
    of whole steps see no kinks, and Gauss rules converge fast on them. `probe_size`: the width of
    a probe row, when known (sizes the batches of probe calls without a trial call). `edges`: times
    the integrand may jump at (the user's jump_t, steps the solver collapsed): panels start split there.
    `max_nodes`: the most nodes the panels may take; past it, panels still failing take their best
    order and count as unconverged.

    The arithmetic bounds what is asked: a panel passes once its probe error is below its share of
    the budget OR below `_ROUNDOFF` * eps(dtype) * ||int |probe| || over it (what the dtype can
    resolve of the sum; QUADPACK's qags makes the same test), and a panel whose error stopped falling
    after a bisection is noise, not detail: it is accepted as it is and counted in `roundoff`.
    """
    x, w = _rules(dtype, device)
    eps = torch.finfo(dtype).eps
    t = torch.tensor(times, dtype=torch.float64)
    span = abs(times[-1] - times[0])
    start, end, interval = _split_at(t[:-1], t[1:], torch.arange(len(times) - 1), edges)
    done: list[tuple[torch.Tensor, ...]] = []
    err_sq = torch.zeros((), dtype=torch.float64)
    total = budget_abs = None
    parent_err = torch.full((len(start),), math.inf, dtype=torch.float64)
    refinements = unconverged = roundoff = used = 0
    for level in range(_MAX_BISECTIONS + 1):
        integrals, absint = _integrate(probe, start, end, x, w, probe_size)  # (panels, rules, size), (panels,)
        if total is None:
            ref = integrals[:, -1].sum(0)
            total = float(torch.linalg.vector_norm(ref))
            # Relative only: the probes' absolute scale says nothing about the gradient's units.
            budget_abs = _SAFETY * rtol * total
        errs = torch.linalg.vector_norm(integrals[:, :-1] - integrals[:, -1:], dim=-1).to(torch.float64).cpu()
        floor = _ROUNDOFF * eps * absint.to(torch.float64).cpu()
        wanted = budget_abs * (end - start).abs() / span
        ok = errs <= torch.maximum(wanted, floor).unsqueeze(1)
        passed = ok.any(1)
        roundoff += int((passed & ~(errs <= wanted.unsqueeze(1)).any(1)).sum())  # passed on the floor only
        best = errs.min(1)
        # Bisection no longer helps: both halves together are no better than their parent was.
        pair = best.values.reshape(-1, 2).sum(1).repeat_interleave(2) if level else None
        stalled = (
            ~passed & (pair >= _STALL * parent_err) & (best.values <= _NEAR_ROUNDOFF * floor)
            if level
            else torch.zeros_like(passed)
        )
        pending = int((~passed & ~stalled).sum())
        # The cap: splitting must leave room for both halves of every open panel at G2 at least.
        over = max_nodes is not None and used + 2 * 2 * pending > max_nodes
        last = level == _MAX_BISECTIONS or over
        if last:
            unconverged += pending
        roundoff += int(stalled.sum())
        take = passed | stalled | (torch.ones_like(passed) if last else torch.zeros_like(passed))
        first = torch.where(passed, ok.to(torch.int8).argmax(1), best.indices)
        # A panel that needs a high order may be cheaper as two halves at low orders (a trained field
        # bends inside an interval: one G8 where two G2s would do). The probes are free: look one level
        # ahead there, and keep whichever takes fewer nodes.
        ahead = passed & (first + 1 > _SPLIT_ABOVE) if not last else torch.zeros_like(passed)
        if ahead.any():
            a, b = start[ahead], end[ahead]
            m = _split(a, b, breaks)
            cs, ce = torch.stack([a, m], 1).reshape(-1), torch.stack([m, b], 1).reshape(-1)
            c_int, c_abs = _integrate(probe, cs, ce, x, w, probe_size)
            c_errs = torch.linalg.vector_norm(c_int[:, :-1] - c_int[:, -1:], dim=-1).to(torch.float64).cpu()
            c_floor = _ROUNDOFF * eps * c_abs.to(torch.float64).cpu()
            c_share = torch.maximum(budget_abs * (ce - cs).abs() / span, c_floor)
            c_ok = c_errs <= c_share.unsqueeze(1)
            c_first = c_ok.to(torch.int8).argmax(1)
            both = c_ok.any(1).reshape(-1, 2).all(1)
            cheaper = both & ((c_first + 1).reshape(-1, 2).sum(1) < first[ahead] + 1)
            if cheaper.any():
                sel = cheaper.repeat_interleave(2)
                done.append((cs[sel], ce[sel], c_first[sel] + 1, interval[ahead].repeat_interleave(2)[sel]))
                used += int((c_first[sel] + 1).sum())
                err_sq = err_sq + c_errs[sel].gather(1, c_first[sel].unsqueeze(1)).pow(2).sum()
                idx = ahead.nonzero().reshape(-1)[cheaper]
                take[idx] = False
                passed[idx] = False
                refinements += 1
                # these panels are done (as their halves): keep them out of the split below
                ahead_done = torch.zeros_like(passed)
                ahead_done[idx] = True
            else:
                ahead_done = torch.zeros_like(passed)
        else:
            ahead_done = torch.zeros_like(passed)
        if take.any():
            order = first[take] + 1
            done.append((start[take], end[take], order, interval[take]))
            used += int(order.sum())
            err_sq = err_sq + errs[take].gather(1, first[take].unsqueeze(1)).pow(2).sum()
        take = take | ahead_done
        if take.all():
            break
        refinements += 1
        keep = ~take
        a, b, i = start[keep], end[keep], interval[keep]
        m = _split(a, b, breaks)
        start, end = torch.stack([a, m], 1).reshape(-1), torch.stack([m, b], 1).reshape(-1)
        interval = i.repeat_interleave(2)
        parent_err = best.values[keep].repeat_interleave(2)
    cols = [torch.cat(c) for c in zip(*done)]
    return Panels(*cols, refinements=refinements, unconverged=unconverged,
                  error=float(err_sq.sqrt()) / total if total else 0.0, roundoff=roundoff)  # fmt: skip


def _split_at(start: torch.Tensor, end: torch.Tensor, interval: torch.Tensor, edges) -> tuple[torch.Tensor, ...]:
    """Intervals cut at every edge strictly inside them (either direction of time)."""
    if not len(edges):
        return start, end, interval
    e = torch.tensor(sorted(edges), dtype=torch.float64)
    s_out, e_out, i_out = [], [], []
    for a, b, i in zip(start.tolist(), end.tolist(), interval.tolist()):
        lo, hi = min(a, b), max(a, b)
        inner = e[(e > lo) & (e < hi)].tolist()
        pts = [a, *(inner if b > a else inner[::-1]), b]
        s_out += pts[:-1]
        e_out += pts[1:]
        i_out += [i] * (len(pts) - 1)
    return (torch.tensor(s_out, dtype=torch.float64), torch.tensor(e_out, dtype=torch.float64),
            torch.tensor(i_out, dtype=torch.int64))  # fmt: skip


def _integrate(probe, start, end, x, w, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rule's integral of the probes over every panel, (panels, rules, size), and the norm of the
    reference rule's integral of |probe| over each panel, (panels,): the scale of its round-off."""
    mid, half = (start + end) / 2, (end - start) / 2
    xc = x.cpu()

    def rules(sl):
        nodes = (mid[sl].unsqueeze(1) + half[sl].unsqueeze(1) * xc).reshape(-1).to(x.device)
        vals = probe(nodes)
        vals = vals.reshape(-1, len(x), vals.shape[-1])
        h = half[sl].to(device=vals.device, dtype=vals.dtype).reshape(-1, 1, 1)
        absint = torch.einsum("k,pks->ps", w[-1], vals.abs()) * h[:, 0]
        return torch.einsum("rk,pks->prs", w, vals) * h, torch.linalg.vector_norm(absint, dim=-1)

    out = [] if size is not None else [rules(slice(0, 1))]  # else the first panel sizes the chunks
    if size is None:
        size = out[0][0].shape[-1]
    chunk = max(1, _PROBE_ELEMENTS // max(size * len(x), 1))
    for p in range(len(out), len(start), chunk):
        out.append(rules(slice(p, p + chunk)))
    return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])


def _split(a: torch.Tensor, b: torch.Tensor, breaks: torch.Tensor) -> torch.Tensor:
    """Per panel [a, b] (either direction): the step boundary inside nearest its middle, else the middle."""
    mid = (a + b) / 2
    if len(breaks) == 0:
        return mid
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    margin = 1e-9 * (hi - lo)
    right = torch.searchsorted(breaks, mid)
    best, dist = mid.clone(), torch.full_like(mid, math.inf)
    for j in (right - 1, right):
        c = breaks[j.clamp(0, len(breaks) - 1)]
        d = (c - mid).abs()
        take = (c > lo + margin) & (c < hi - margin) & (d < dist)
        best, dist = torch.where(take, c, best), torch.where(take, d, dist)
    return best
