"""Counters a caller (the benchmark harness) reads without touching the user's module."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

_CURRENT: contextvars.ContextVar[GQStats | None] = contextvars.ContextVar("gq_stats", default=None)


@dataclasses.dataclass
class GQStats:
    """Filled by every `odeint_adjoint_gq` call made inside `gq_stats()`.

    The object is bound when the forward runs, so the backward (possibly on autograd's device
    thread) still reports into it after the `with` block has closed.
    """

    calls: int = 0
    nfe_forward: int = 0
    nfe_backward: int = 0  # right-hand-side evaluations of the backward [z, a] (or a) solve
    quad_nodes: int = 0  # Gauss-Legendre nodes evaluated (each: one f evaluation + VJP)
    quad_calls: int = 0  # batched node evaluations actually issued
    quad_orders: list[int] = dataclasses.field(default_factory=list)  # nodes per interval, last backward
    quad_panels: int = 0  # panels integrated (adaptive: one per backward step, more where refined)
    quad_refinements: int = 0  # times an interval's panels were bisected because the estimate failed
    quad_unconverged: int = 0  # intervals whose estimate still failed after the last refinement
    # The adaptive rule's own error estimate of dL/dtheta, relative (L2), last backward; NaN otherwise.
    quad_error: float = float("nan")
    knots: int = 0  # forward checkpoints kept for backward_state="interpolate"
    vmap_fallback: bool = False
    # backward passes that switched to the kept forward solution because backsolving z failed
    backsolve_fallbacks: int = 0
    quad_roundoff: int = 0  # panels accepted at the dtype's round-off (bisecting them no longer helped)
    jumps_located: int = 0  # times f jumps in t (found by bisection, or the user's step_t/jump_t): panel edges
    # backward passes whose gradient could not be certified (each warned once, `warning` is the last message)
    uncertified: int = 0
    warning: str = ""
    # Largest RMS distance, in tolerances, of the backsolved z from the forward's y at an observation time.
    z_mismatch: float = 0.0

    @property
    def certified(self) -> bool:
        """True when no backward pass since the last reset warned that its gradient is not certified."""
        return self.uncertified == 0

    def reset(self) -> None:
        for f in dataclasses.fields(self):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            setattr(self, f.name, default)


@contextlib.contextmanager
def gq_stats(stats: GQStats | None = None):
    """`with gq_stats() as s: y = odeint_adjoint_gq(...)`; after `backward()`, read `s.nfe_backward`."""
    stats = GQStats() if stats is None else stats
    token = _CURRENT.set(stats)
    try:
        yield stats
    finally:
        _CURRENT.reset(token)


def current_stats() -> GQStats | None:
    return _CURRENT.get()
