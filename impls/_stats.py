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
    quad_orders: list[int] = dataclasses.field(default_factory=list)  # n per interval, last backward
    knots: int = 0  # forward checkpoints kept for backward_state="interpolate"
    vmap_fallback: bool = False

    def reset(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, f.default_factory() if callable(f.default_factory) else f.default)


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
