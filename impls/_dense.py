"""The forward solution kept for the backward pass (backward_state="interpolate").

Reading z(t) from the forward solution instead of backsolving it removes the divergence of
backsolving contractive dynamics; the state is small in GQ's regime, so keeping it is cheap.

Adaptive Runge-Kutta solvers: every accepted step keeps torchdiffeq's own dense output (the quartic
through y0, y_mid, y1, f0, f1 that `odeint` uses for its outputs), rebuilt from the stage
evaluations seen by our func wrapper and the solver's tableau, so z(t) in the backward pass is
exactly what the forward solver would have reported. Fixed-grid solvers: cubic Hermite between grid
points, with f at a grid point taken from the solver's own first evaluation there when it makes one.
"""

from __future__ import annotations

import torch
from torchdiffeq._impl.interp import _interp_fit  # pinned torchdiffeq==0.2.5
from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver


class StepRecorder:
    """Hooked into the func wrapper and torchdiffeq's step callbacks during the forward solve."""

    def __init__(self, solver_cls: type, reverse: bool):
        self.rk = issubclass(solver_cls, RKAdaptiveStepsizeODESolver)
        self.sign = -1.0 if reverse else 1.0
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []  # (y, f) since the last step boundary
        if self.rk:
            self.n_stages = len(solver_cls.tableau.alpha)
            self._mid, self._c_sol = solver_cls.mid, solver_cls.tableau.c_sol
            self.f_start: torch.Tensor | None = None
            self.accepted = 0
            self.t0s: list[torch.Tensor] = []
            self.t1s: list[torch.Tensor] = []
            self.coeffs: list[torch.Tensor] = []
            # Per accepted step: rejections before it and |f(t1) - f(t0)| (where to look for jumps in t).
            self.rejected: list[int] = []
            self.df: list[torch.Tensor] = []
            self._since_accept = 0
        else:
            self.knot_t: list[torch.Tensor] = []
            self.knot_y: list[torch.Tensor] = []
            self.knot_f: list[torch.Tensor | None] = []

    @property
    def callbacks(self) -> dict:
        if self.rk:
            return {"callback_step": self._rk_step, "callback_accept_step": self._rk_accept,
                    "callback_reject_step": self._rk_reject}  # fmt: skip
        return {"callback_step": self._grid_step}

    def on_eval(self, y: torch.Tensor, f: torch.Tensor) -> None:
        if self.rk:
            self.calls.append((y, f))
        elif self.knot_f and self.knot_f[-1] is None and y is self.knot_y[-1]:
            self.knot_f[-1] = f  # the solver's own f(t0, y0) at this grid point

    # --- adaptive RK: one quartic per accepted step
    def _rk_step(self, t0, y0, dt):
        if self.calls:
            # Evaluations between steps: the initial f0 (the first call ever) or a re-evaluation of
            # f after a jump_t, which torchdiffeq then uses as the next step's first stage.
            self.f_start = self.calls[0][1] if self.accepted == 0 else self.calls[-1][1]
        self.calls = []

    def _rk_reject(self, t0, y0, dt):
        self.calls = []
        self._since_accept += 1

    def _rk_accept(self, t0, y0, dt):
        if len(self.calls) != self.n_stages or self.f_start is None:
            raise RuntimeError(
                "odeint_adjoint_gq(backward_state='interpolate'): could not follow the solver's stages "
                f"({len(self.calls)} evaluations for a {self.n_stages}-stage step); use backward_state='backsolve'."
            )
        k = torch.stack([self.f_start] + [f for _, f in self.calls], dim=-1)
        dt_u = (self.sign * dt).to(y0.dtype)  # callbacks see the solver's (positive) internal step
        if self._mid.device != y0.device or self._mid.dtype != y0.dtype:  # once, not a copy per step
            self._mid = self._mid.to(dtype=y0.dtype, device=y0.device)
            self._c_sol = self._c_sol.to(dtype=y0.dtype, device=y0.device)
        mid, c_sol = self._mid, self._c_sol
        y_mid = y0 + (k * (dt_u * mid)).sum(-1)
        y1 = y0 + (k * (dt_u * c_sol)).sum(-1)
        self.coeffs.append(torch.stack(_interp_fit(y0, y1, y_mid, k[..., 0], k[..., -1], dt_u)))
        t0 = torch.as_tensor(t0, dtype=torch.float64)
        self.t0s.append(t0)
        self.t1s.append(t0 + self.sign * dt.to(torch.float64))
        self.rejected.append(self._since_accept)
        self.df.append(torch.linalg.vector_norm(k[..., -1] - k[..., 0]))
        self._since_accept = 0
        self.f_start = k[..., -1]
        self.calls = []
        self.accepted += 1

    # --- fixed grid: knots at the grid points
    def _grid_step(self, t0, y0, dt):
        self.knot_t.append(torch.as_tensor(t0, dtype=torch.float64))
        self.knot_y.append(y0)
        self.knot_f.append(None)

    def finish(self, t_end: torch.Tensor, y_end: torch.Tensor):
        """The dense forward solution, on the device and in the dtype of the state."""
        if self.rk:
            out = PiecewiseQuartic(torch.stack(self.t0s), torch.stack(self.t1s), torch.stack(self.coeffs))
            out.steps = (self.t0s, self.t1s, self.rejected, self.df)
            return out
        t = torch.stack([k.to(y_end.device) for k in self.knot_t] + [t_end.to(torch.float64)])
        y = torch.stack(self.knot_y + [y_end])
        return CubicHermite(t, y, self.knot_f + [None])


def _as_ascending(t: torch.Tensor, *rest: torch.Tensor):
    if len(t) > 1 and t[0] > t[-1]:
        return (t.flip(0), *(r.flip(0) for r in rest))
    return (t, *rest)


class PiecewiseQuartic:
    """torchdiffeq's dense output, one quartic in x = (s - t0) / (t1 - t0) per accepted step."""

    evals_needed = 0
    # The recorded solve's steps: (t0s, t1s, rejections before each, |f(t1) - f(t0)| each), if recorded.
    steps: tuple | None = None

    def __init__(self, t0: torch.Tensor, t1: torch.Tensor, coeffs: torch.Tensor):
        self.n_knots = len(t0) + 1
        lo = torch.minimum(t0, t1)
        lo, t0, t1, coeffs = _as_ascending(lo, t0, t1, coeffs)
        dev = coeffs.device
        self.lo, self.t0, self.t1, self.coeffs = lo.to(dev), t0.to(dev), t1.to(dev), coeffs

    def breakpoints(self) -> torch.Tensor:
        """Where the accepted steps start (ascending, float64): the pieces' boundaries."""
        return self.lo

    def select(self, idx: torch.Tensor, keep: int = 0) -> PiecewiseQuartic:
        """The same pieces for some elements of the state only: its first `keep` dimensions kept, the
        rest flattened and indexed by `idx` (e.g. the panel probes of a large state)."""
        c = self.coeffs
        c = c.reshape(*c.shape[: 2 + keep], -1).index_select(2 + keep, idx.to(c.device))
        out = object.__new__(PiecewiseQuartic)
        out.n_knots, out.lo, out.t0, out.t1, out.coeffs = self.n_knots, self.lo, self.t0, self.t1, c
        return out

    def __call__(self, s: torch.Tensor) -> torch.Tensor:
        scalar = s.dim() == 0
        s = s.reshape(-1).to(self.lo.dtype)
        k = (torch.searchsorted(self.lo, s, right=True) - 1).clamp(0, len(self.lo) - 1)
        t0, t1 = self.t0.index_select(0, k), self.t1.index_select(0, k)
        x = ((s - t0) / (t1 - t0)).to(self.coeffs.dtype)
        # index_select, not c[k]: advanced indexing costs ~8 ms a call on 2 CPU threads in torch 2.13.
        c = self.coeffs.index_select(0, k)  # (m, 5, *state)
        x = x.reshape((-1,) + (1,) * (c.dim() - 2))
        z = c[:, 4]
        for j in (3, 2, 1, 0):  # Horner
            z = z * x + c[:, j]
        return z[0] if scalar else z

    def value_and_derivative(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The dense output and its slope d/ds at times s (1-D), from one gather of the pieces (no f)."""
        s = s.reshape(-1).to(self.lo.dtype)
        k = (torch.searchsorted(self.lo, s, right=True) - 1).clamp(0, len(self.lo) - 1)
        t0, t1 = self.t0.index_select(0, k), self.t1.index_select(0, k)
        x = ((s - t0) / (t1 - t0)).to(self.coeffs.dtype)
        c = self.coeffs.index_select(0, k)
        shape = (-1,) + (1,) * (c.dim() - 2)
        x = x.reshape(shape)
        z, dz = c[:, 4], 4 * c[:, 4]
        for j in (3, 2, 1):
            z = z * x + c[:, j]
            dz = dz * x + j * c[:, j]
        z = z * x + c[:, 0]
        return z, dz / (t1 - t0).to(self.coeffs.dtype).reshape(shape)


class CubicHermite:
    """Cubic Hermite interpolation of (y, f) between fixed-grid points."""

    def __init__(self, t: torch.Tensor, y: torch.Tensor, f: list[torch.Tensor | None]):
        self.n_knots = len(t)
        missing = [i for i, fi in enumerate(f) if fi is None]
        f = torch.stack([torch.zeros_like(y[0]) if fi is None else fi for fi in f])
        order = torch.arange(len(t))
        t, y, f, order = _as_ascending(t, y, f, order)
        self.t, self.y, self.f = t.to(y.device), y, f
        self.missing = order.argsort()[missing]  # positions (after sorting) still lacking f

    @property
    def evals_needed(self) -> int:
        return len(self.missing)

    def breakpoints(self) -> torch.Tensor:
        return self.t

    def select(self, idx: torch.Tensor, keep: int = 0) -> CubicHermite:
        """As `PiecewiseQuartic.select` (after `fill`)."""
        out = object.__new__(CubicHermite)
        out.n_knots, out.t, out.missing = self.n_knots, self.t, self.missing
        out.y, out.f = (v.reshape(*v.shape[: 1 + keep], -1).index_select(1 + keep, idx.to(v.device))
                        for v in (self.y, self.f))  # fmt: skip
        return out

    def fill(self, rhs_batch) -> None:
        """Compute f where the solver did not evaluate it (e.g. the final point), in one batch."""
        if len(self.missing):
            idx = self.missing.to(self.y.device)
            f = rhs_batch(self.t.index_select(0, idx).to(self.y.dtype), self.y.index_select(0, idx))
            self.f.index_copy_(0, idx, f)
            self.missing = self.missing[:0]

    def __call__(self, s: torch.Tensor) -> torch.Tensor:
        scalar = s.dim() == 0
        s = s.reshape(-1).to(self.t.dtype)
        k = (torch.searchsorted(self.t, s, right=True) - 1).clamp(0, len(self.t) - 2)
        t0, t1 = self.t.index_select(0, k), self.t.index_select(0, k + 1)
        h = t1 - t0
        u = (s - t0) / h
        u2, u3 = u * u, u * u * u
        shape = (-1,) + (1,) * (self.y.dim() - 1)
        c = [(2 * u3 - 3 * u2 + 1), (u3 - 2 * u2 + u) * h, (-2 * u3 + 3 * u2), (u3 - u2) * h]
        c = [ci.to(self.y.dtype).reshape(shape) for ci in c]
        y0, y1 = self.y.index_select(0, k), self.y.index_select(0, k + 1)
        f0, f1 = self.f.index_select(0, k), self.f.index_select(0, k + 1)
        z = c[0] * y0 + c[1] * f0 + c[2] * y1 + c[3] * f1
        return z[0] if scalar else z

    def value_and_derivative(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self(s), self.derivative(s)

    def derivative(self, s: torch.Tensor) -> torch.Tensor:
        """d/ds of the interpolant at times s (1-D): the Hermite cubic's slope."""
        s = s.reshape(-1).to(self.t.dtype)
        k = (torch.searchsorted(self.t, s, right=True) - 1).clamp(0, len(self.t) - 2)
        t0, t1 = self.t.index_select(0, k), self.t.index_select(0, k + 1)
        h = t1 - t0
        u = (s - t0) / h
        u2 = u * u
        shape = (-1,) + (1,) * (self.y.dim() - 1)
        c = [(6 * u2 - 6 * u) / h, 3 * u2 - 4 * u + 1, (6 * u - 6 * u2) / h, 3 * u2 - 2 * u]
        c = [ci.to(self.y.dtype).reshape(shape) for ci in c]
        y0, y1 = self.y.index_select(0, k), self.y.index_select(0, k + 1)
        f0, f1 = self.f.index_select(0, k), self.f.index_select(0, k + 1)
        return c[0] * y0 + c[1] * f0 + c[2] * y1 + c[3] * f1


class Stitched:
    """Dense outputs of consecutive intervals read as one (the per-interval backward solves): a time is read
    off the part whose span holds it. Parts may come in any order and be of either kind above."""

    evals_needed = 0

    def __init__(self, parts: list):
        lows = [float(p.breakpoints()[0]) for p in parts]
        order = sorted(range(len(parts)), key=lows.__getitem__)
        self.parts = [parts[k] for k in order]
        self.starts = torch.tensor([lows[k] for k in order[1:]], dtype=torch.float64)

    def breakpoints(self) -> torch.Tensor:
        return torch.cat([p.breakpoints().cpu().to(torch.float64) for p in self.parts])

    def select(self, idx: torch.Tensor, keep: int = 0) -> Stitched:
        out = object.__new__(Stitched)
        out.parts, out.starts = [p.select(idx, keep) for p in self.parts], self.starts
        return out

    def _read(self, s: torch.Tensor, read) -> tuple[torch.Tensor, ...]:
        s = s.reshape(-1)
        if len(self.parts) == 1:
            return read(self.parts[0], s)
        k = torch.searchsorted(self.starts, s.detach().cpu().to(torch.float64), right=True)
        outs = None
        for j in k.unique().tolist():
            where = (k == j).nonzero().reshape(-1).to(s.device)
            vals = read(self.parts[j], s.index_select(0, where))
            if outs is None:
                outs = tuple(v.new_empty((len(s), *v.shape[1:])) for v in vals)
            for o, v in zip(outs, vals):
                o.index_copy_(0, where, v)
        return outs

    def __call__(self, s: torch.Tensor) -> torch.Tensor:
        out = self._read(s, lambda p, x: (p(x),))[0]
        return out[0] if s.dim() == 0 else out

    def value_and_derivative(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._read(s, lambda p, x: p.value_and_derivative(x))
