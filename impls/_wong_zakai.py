"""Neural SDEs trained as ODEs (the Wong–Zakai route), then sampled as Stratonovich SDEs with torchsde.

On [t0, t1], c = t1 - t0, Brownian motion has the Karhunen–Loève expansion
W(t) = sum_n Z_n sqrt(2c) sin((n - 1/2) pi (t - t0) / c) / ((n - 1/2) pi),  Z_n ~ N(0, 1) i.i.d.
Its derivative truncated at N terms, xi(t) = sqrt(2/c) sum_{n<=N} Z_n cos((n - 1/2) pi (t - t0) / c), is a
smooth random function; by the Wong–Zakai theorem dx/dt = f(t, x) + g(t, x) * xi(t) converges to the
Stratonovich SDE dx = f dt + g o dW as N grows. That ODE trains with any ODE adjoint (here: the GQ adjoint),
and the same f and g then run in torchsde for sampling.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["StratonovichSDE", "WongZakaiNoise", "WongZakaiODE", "sample_sde", "stratonovich_sde", "wong_zakai_ode"]

SDE_METHODS = ("reversible_heun", "midpoint", "heun", "euler_heun", "milstein", "log_ode")


def _fail(call: str, arg: str, value, why_and_fix: str):
    raise ValueError(f"{call}({arg}={value!r}): {why_and_fix}")


class WongZakaiNoise:
    """xi(t) on [t0, t1] from N = `ncosines` cosine terms, one coefficient per term and state element.

    A pure function of t once the coefficients Z (shape (ncosines, *shape)) are drawn: `resample()`
    draws them (call it once per forward pass); `noise(t)` is one (N,) x (N, M) matmul -- no loop over
    terms, no host sync -- so it evaluates under `torch.func.vmap` over t, as the GQ adjoint's batched
    quadrature does.
    """

    def __init__(
        self,
        ncosines: int,
        t0: float,
        t1: float,
        shape: Sequence[int],
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ):
        call = "WongZakaiNoise"
        if isinstance(ncosines, bool) or not isinstance(ncosines, int) or ncosines < 1:
            _fail(call, "ncosines", ncosines, "ncosines must be an int >= 1 (the paper uses 10).")
        t0, t1 = float(t0), float(t1)
        if not (math.isfinite(t0) and math.isfinite(t1) and t1 > t0):
            _fail(call, "t1", t1, f"need finite t0 < t1 (got t0={t0}); pass the span of the observation times.")
        self.ncosines, self.t0, self.t1 = ncosines, t0, t1
        self.shape = torch.Size(shape)
        self.generator = generator
        c = t1 - t0
        n = torch.arange(1, ncosines + 1, dtype=dtype, device=device)
        self.freqs = (n - 0.5) * (math.pi / c)
        self.scale = math.sqrt(2.0 / c)
        self.coeffs = torch.empty((ncosines, *self.shape), dtype=dtype, device=device)
        self.resample()

    def resample(self, generator: torch.Generator | None = None) -> WongZakaiNoise:
        """Draw new coefficients Z ~ N(0, I): a new sample path of the noise for every state element."""
        self.coeffs = torch.randn(
            self.coeffs.shape, generator=generator or self.generator, dtype=self.coeffs.dtype,
            device=self.coeffs.device,
        )  # fmt: skip
        return self

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=self.freqs.dtype, device=self.freqs.device)
        basis = torch.cos(self.freqs * (t - self.t0)) * self.scale
        return (basis @ self.coeffs.reshape(self.ncosines, -1)).reshape(self.shape)

    def brownian(self, t: torch.Tensor) -> torch.Tensor:
        """The integral of xi from t0 to t in closed form: the truncated Karhunen–Loève Brownian path."""
        t = torch.as_tensor(t, dtype=self.freqs.dtype, device=self.freqs.device)
        basis = torch.sin(self.freqs * (t - self.t0)) * self.scale / self.freqs
        return (basis @ self.coeffs.reshape(self.ncosines, -1)).reshape(self.shape)


class WongZakaiODE(nn.Module):
    """dx/dt = drift(t, x) + diffusion(t, x) * noise(t): a torchdiffeq-style func whose parameters are
    the drift's and the diffusion's (the noise coefficients are data, not parameters)."""

    def __init__(self, drift: Callable, diffusion: Callable, noise: WongZakaiNoise):
        super().__init__()
        self.drift, self.diffusion, self.noise = drift, diffusion, noise

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.drift(t, x) + self.diffusion(t, x) * self.noise(t)


class StratonovichSDE(nn.Module):
    """The same drift and diffusion as a torchsde SDE (Stratonovich, diagonal noise).

    `nfe` counts drift evaluations (solvers evaluate drift and diffusion together).
    """

    sde_type = "stratonovich"
    noise_type = "diagonal"

    def __init__(self, drift: Callable, diffusion: Callable):
        super().__init__()
        self.drift, self.diffusion = drift, diffusion
        self.nfe = 0

    def f(self, t, y):
        self.nfe += 1
        return self.drift(t, y)

    def g(self, t, y):
        return self.diffusion(t, y)


def wong_zakai_ode(drift: Callable, diffusion: Callable, noise: WongZakaiNoise) -> WongZakaiODE:
    """(drift, diffusion) -> the ODE right-hand side for training, e.g. with `impls.odeint_adjoint_gq`."""
    return WongZakaiODE(drift, diffusion, noise)


def stratonovich_sde(drift: Callable, diffusion: Callable) -> StratonovichSDE:
    """(drift, diffusion) -> a torchsde SDE object (Stratonovich, diagonal) for sampling or SDE training."""
    return StratonovichSDE(drift, diffusion)


def sample_sde(
    sde: StratonovichSDE,
    y0: torch.Tensor,
    ts: torch.Tensor,
    *,
    dt: float = 0.01,
    method: str = "reversible_heun",
    adjoint: bool = False,
    adjoint_method: str | None = None,
    seed: int | None = None,
    **kwargs,
) -> torch.Tensor:
    """Solve `sde` with torchsde at a fixed step `dt` (paths of shape (len(ts), *y0.shape)).

    adjoint=False: `torchsde.sdeint` (backprop through the solver); adjoint=True: `torchsde.sdeint_adjoint`
    (adjoint_method defaults to "adjoint_reversible_heun" for reversible Heun). `seed` fixes the Brownian
    path (a `torchsde.BrownianInterval` with that entropy), so reruns reproduce it.
    """
    call = "sample_sde"
    if method not in SDE_METHODS:
        _fail(call, "method", method, f"unknown torchsde method; use one of {', '.join(SDE_METHODS)}.")
    ts_host = ts.detach().cpu().tolist() if torch.is_tensor(ts) else list(ts)
    span = abs(ts_host[-1] - ts_host[0]) if len(ts_host) > 1 else 0.0
    if (isinstance(dt, bool) or not isinstance(dt, (int, float)) or not math.isfinite(dt) or dt <= 0
            or (span > 0 and dt > span)):  # fmt: skip
        _fail(call, "dt", dt, f"dt must be a number in (0, {span:g}] (the time span), e.g. 0.01.")
    if y0.dim() != 2:
        _fail(call, "y0", tuple(y0.shape), "torchsde needs y0 of shape (batch, state); reshape it.")
    try:
        import torchsde
    except ImportError as exc:  # pragma: no cover - the sde extra is missing
        raise ImportError("sample_sde needs torchsde: pip install 'gqbench[sde]'") from exc
    bm = torchsde.BrownianInterval(
        t0=ts_host[0], t1=ts_host[-1], size=tuple(y0.shape), dtype=y0.dtype, device=y0.device,
        entropy=seed, levy_area_approximation="none",
    )  # fmt: skip
    if adjoint:
        if adjoint_method is None and method == "reversible_heun":
            adjoint_method = "adjoint_reversible_heun"
        return torchsde.sdeint_adjoint(sde, y0, ts, bm=bm, method=method, adjoint_method=adjoint_method, dt=dt,
                                       **kwargs)  # fmt: skip
    return torchsde.sdeint(sde, y0, ts, bm=bm, method=method, dt=dt, **kwargs)
