"""The forward solution kept for the backward pass (backward_state="interpolate").

Knots are the solver's own step points, recorded through torchdiffeq callbacks. Between knots
z(t) is the cubic Hermite interpolant of (z, f(t, z)) at both ends; f at the knots is computed
at the start of the backward pass in batched calls. The state is small in GQ's regime, so keeping
every step is cheap, and reading z from it instead of backsolving z removes the divergence of
backsolving contractive dynamics.
"""

from __future__ import annotations

import torch


class HermiteSolution:
    def __init__(self, t: torch.Tensor, y: torch.Tensor, f: torch.Tensor):
        # Ascending time makes searchsorted valid whatever the direction of integration.
        if t.numel() > 1 and t[0] > t[-1]:
            t, y, f = t.flip(0), y.flip(0), f.flip(0)
        self.t, self.y, self.f = t, y, f

    def __len__(self) -> int:
        return len(self.t)

    def __call__(self, s: torch.Tensor) -> torch.Tensor:
        """z(s) for a 0-d s, or a stack of states for a 1-d s."""
        scalar = s.dim() == 0
        s = s.reshape(-1).to(self.t.dtype)
        k = (torch.searchsorted(self.t, s, right=True) - 1).clamp(0, len(self.t) - 2)
        t0, t1 = self.t[k], self.t[k + 1]
        h = t1 - t0
        u = (s - t0) / h
        u2, u3 = u * u, u * u * u
        shape = (-1,) + (1,) * (self.y.dim() - 1)
        c = [(2 * u3 - 3 * u2 + 1), (u3 - 2 * u2 + u) * h, (-2 * u3 + 3 * u2), (u3 - u2) * h]
        c = [ci.to(self.y.dtype).reshape(shape) for ci in c]
        z = c[0] * self.y[k] + c[1] * self.f[k] + c[2] * self.y[k + 1] + c[3] * self.f[k + 1]
        return z[0] if scalar else z
