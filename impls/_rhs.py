"""The user's vector field seen as a function of one flat tensor state, with NFE counting.

torchdiffeq does its own tuple flattening, but the adjoint needs the flat form too (the
backward system and the batched quadrature work on one tensor), so we flatten once, here.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence

import torch

_CALLBACKS = ("callback_step", "callback_accept_step", "callback_reject_step")


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([x.reshape(-1) for x in tensors])


def unflatten(flat: torch.Tensor, shapes: Sequence[torch.Size]) -> tuple[torch.Tensor, ...]:
    """Inverse of `flatten` along the last dim; leading dims (e.g. time) are kept."""
    lead = flat.shape[:-1]
    out, start = [], 0
    for shape in shapes:
        size = math.prod(shape)
        out.append(flat[..., start : start + size].reshape(*lead, *shape))
        start += size
    return tuple(out)


class FlatRHS:
    """f(t, y) on a flat state: counts evaluations and forwards the user's solver callbacks.

    A `recorder` (see `_dense.StepRecorder`) may watch evaluations and steps of the forward solve.
    Callbacks are set as instance attributes, and only those needed, because torchdiffeq warns
    about callbacks a solver does not support.
    """

    def __init__(self, func: Callable, shapes: Sequence[torch.Size] | None, *, recorder=None, steps=None):
        self.func = func
        self.shapes = shapes
        self.nfe = 0
        self.recorder = recorder
        user = {name: getattr(func, name) for name in _CALLBACKS if callable(getattr(func, name, None))}
        ours: dict[str, list] = {}
        for watcher in (recorder, steps):
            for name, cb in (watcher.callbacks if watcher is not None else {}).items():
                ours.setdefault(name, []).append(cb)
        for name in set(user) | set(ours):
            setattr(self, name, self._make_callback(user.get(name), ours.get(name, [])))

    def eval(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Uncounted evaluation (safe under vmap; callers count batched calls themselves)."""
        if self.shapes is None:
            return self.func(t, y)
        return flatten(self.func(t, unflatten(y, self.shapes)))

    def __call__(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        f = self.eval(t, y)
        if self.recorder is not None:
            self.recorder.on_eval(y, f)
        return f

    def _make_callback(self, user_cb, our_cbs):
        def cb(t0, y0, dt):
            for our_cb in our_cbs:
                our_cb(t0, y0, dt)
            if user_cb is not None:
                user_cb(t0, y0 if self.shapes is None else unflatten(y0, self.shapes), dt)

        return cb


class StepSizes:
    """Accepted (t0, dt) of an adaptive forward solve, to warm-start the backward solves.

    Started from scratch, each backward solve spends an evaluation on torchdiffeq's initial-step
    heuristic and then several short steps growing towards a size the forward already found.
    """

    def __init__(self):
        self.t0: list[torch.Tensor] = []
        self.dt: list[torch.Tensor] = []

    @property
    def callbacks(self) -> dict:
        return {"callback_accept_step": self._accept}

    def _accept(self, t0, y0, dt):
        self.t0.append(torch.as_tensor(t0))
        self.dt.append(torch.as_tensor(dt))

    def at(self, times: list[float]) -> list[float] | None:
        """Per time, the size of the accepted forward step that covers it (one host read)."""
        if not self.t0:
            return None
        t0 = torch.stack([x.to(torch.float64).cpu() for x in self.t0]).tolist()
        dt = torch.stack([x.to(torch.float64).cpu() for x in self.dt]).tolist()
        sign = 1.0 if times[-1] > times[0] else -1.0  # callbacks see un-negated times
        starts = [sign * x for x in t0]
        return [dt[max(bisect.bisect_right(starts, sign * t) - 1, 0)] for t in times]
