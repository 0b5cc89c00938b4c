"""The paper's SDE experiment: an Ornstein–Uhlenbeck process with time-dependent coefficients, learnt as a
neural SDE trained three ways -- as a Wong–Zakai ODE through the GQ adjoint (`torch_gq`), and with torchsde's
reversible Heun by backprop (`sde_direct`) or by its adjoint (`sde_adjoint`) -- on one loss.

Facts from the paper and its public code: dX = (0.2 t - 0.1 X) dt + (0.6 + 0.15 t) o dW on [0, 10], 101
observation times, 200 (train) / 20 (validation) initial values ~ U[-3, 3] with 45 paths each; drift and
diffusion are MLPs on (t, x) with two softplus hidden layers; the loss is KL(predicted || observed) between
per-time Gaussian fits over the paths, the validation metric the paths' log-likelihood under the model's
Gaussian marginals (sampled with torchsde, reversible Heun, dt 0.01); Adam lr 1e-3, 40 initial values per
batch, 100 epochs; dopri5 at rtol = atol = 1e-3 for the ODE; ncosines 10.

Here the data are generated from a seed with torchsde at a fine step (no files). t = 0 is left out of the
loss and the metric: every path starts at its x0 there, both fits are points, and the term is 0/0.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import impls

METHODS = ("torch_gq", "sde_direct", "sde_adjoint")
T0, T1, N_TIMES = 0.0, 10.0, 101
X0_RANGE = (-3.0, 3.0)
STD_FLOOR = 1e-9  # added to fitted stds, as the paper does, so point masses stay finite


def ou_drift(t, x):
    return 0.2 * t - 0.1 * x


def ou_diffusion(t, x):
    return (0.6 + 0.15 * t) * torch.ones_like(x)


@dataclasses.dataclass(frozen=True)
class OUSettings:
    """One training run's settings beyond the model width. Defaults: the paper's."""

    ncosines: int = 10
    rtol: float = 1e-3
    atol: float = 1e-3
    solver: str = "dopri5"
    gq_options: tuple[tuple[str, Any], ...] = ()  # passed to impls.odeint_adjoint_gq as keywords
    sde_dt: float = 0.01  # torchsde step: SDE training and every evaluation
    batch: int = 40  # initial values per optimiser step
    n_train: int = 200
    n_val: int = 20
    n_paths: int = 45
    data_dt: float = 1e-3  # the step that generates the data
    lr: float = 1e-3

    def __post_init__(self):
        if isinstance(self.ncosines, bool) or not isinstance(self.ncosines, int) or self.ncosines < 1:
            raise ValueError(f"ncosines={self.ncosines!r}: ncosines must be an int >= 1 (the paper uses 10).")
        for name in ("sde_dt", "data_dt"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 < v <= T1 - T0:
                raise ValueError(f"{name}={v!r}: {name} must be in (0, {T1 - T0:g}], e.g. 0.01.")


@dataclasses.dataclass(frozen=True)
class OUData:
    """x0: (n,); ys: (n, paths, times) observed paths; ts: (times,)."""

    x0: torch.Tensor
    ys: torch.Tensor
    ts: torch.Tensor


def observation_times(dtype=torch.float32) -> torch.Tensor:
    return torch.linspace(T0, T1, N_TIMES, dtype=dtype)


def make_ou_data(n_initial: int, n_paths: int, seed: int, *, dt: float = 1e-3, dtype=torch.float32) -> OUData:
    """Paths of the true OU SDE from a seed: x0 ~ U[-3, 3], reversible Heun at step `dt` in float64."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = X0_RANGE
    x0 = lo + (hi - lo) * torch.rand(n_initial, generator=gen, dtype=torch.float64)
    ts = observation_times(torch.float64)
    y0 = x0.repeat_interleave(n_paths).unsqueeze(-1)
    sde = impls.stratonovich_sde(ou_drift, ou_diffusion)
    with torch.no_grad():
        ys = impls.sample_sde(sde, y0, ts, dt=dt, seed=int(torch.randint(2**31, (1,), generator=gen)))
    ys = ys[..., 0].T.reshape(n_initial, n_paths, len(ts))
    return OUData(x0.to(dtype), ys.to(dtype), ts.to(dtype))


class MLPt(nn.Module):
    """(t, x) -> R^dim: two softplus hidden layers of `width`. t is a scalar (also under vmap)."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim + 1, width), nn.Softplus(), nn.Linear(width, width), nn.Softplus(), nn.Linear(width, dim)
        )

    def forward(self, t, x):
        tt = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(*x.shape[:-1], 1)
        return self.net(torch.cat([x, tt], -1))


class SDEModel(nn.Module):
    """Drift and diffusion nets of one neural SDE (1-D state)."""

    def __init__(self, width: int):
        super().__init__()
        self.drift = MLPt(1, width)
        self.diffusion = MLPt(1, width)


def build_model(width: int, seed: int) -> SDEModel:
    """The same initial weights for every method of a seed."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return SDEModel(width)


# ----------------------------------------------------------------------------- loss and metric


def gaussian_fit(paths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std over the sample paths (dim 1) of (n, paths, times) -> (n, times) each."""
    return paths.mean(1), paths.std(1) + STD_FLOOR


def kl_loss(pred: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """KL(N(pred fit) || N(data fit)), averaged over initial values and times t > t0."""
    mp, sp = gaussian_fit(pred[..., 1:])
    md, sd = gaussian_fit(data[..., 1:])
    kl = torch.log(sd / sp) + (sp**2 + (mp - md) ** 2) / (2 * sd**2) - 0.5
    return kl.mean()


def log_likelihood(pred: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """Mean log-density of the observed paths under the predicted Gaussian marginals (times t > t0)."""
    mp, sp = gaussian_fit(pred[..., 1:])
    z = (data[..., 1:] - mp[:, None]) / sp[:, None]
    return (-0.5 * z**2 - torch.log(sp[:, None]) - 0.5 * math.log(2 * math.pi)).mean()


# ----------------------------------------------------------------------------- one forward pass per method


@dataclasses.dataclass
class Trainer:
    """One method's forward passes and optimiser steps on one model (no timing policy beyond the epoch's phases).

    `noise_seed` seeds the Wong–Zakai coefficients (torch_gq) and the Brownian paths (sde_*), one draw per
    forward pass, so a rerun of a seed repeats every draw.
    """

    method: str
    model: SDEModel
    settings: OUSettings
    noise_seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: the OU experiment runs {', '.join(METHODS)}.")
        self.optimiser = torch.optim.Adam(self.model.parameters(), lr=self.settings.lr)
        self.sde = impls.stratonovich_sde(self.model.drift, self.model.diffusion)
        self._gen = torch.Generator().manual_seed(self.noise_seed)
        self._noise: impls.WongZakaiNoise | None = None

    def _next_seed(self) -> int:
        return int(torch.randint(2**62, (1,), generator=self._gen))

    def predict(self, x0: torch.Tensor, ts: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Paths (n, paths, times) from x0 (n,) by this method's solver, and the forward NFE."""
        s = self.settings
        y0 = x0.repeat_interleave(s.n_paths).unsqueeze(-1)
        if self.method == "torch_gq":
            noise = self._noise
            if noise is None or noise.shape != y0.shape:
                noise = self._noise = impls.WongZakaiNoise(s.ncosines, float(ts[0]), float(ts[-1]), y0.shape,
                                                           dtype=y0.dtype, generator=self._gen)  # fmt: skip
            else:
                noise.resample()
            ode = impls.wong_zakai_ode(self.model.drift, self.model.diffusion, noise)
            with impls.gq_stats() as self._stats:
                ys = impls.odeint_adjoint_gq(ode, y0, ts, rtol=s.rtol, atol=s.atol, method=s.solver,
                                             **dict(s.gq_options))  # fmt: skip
            nfe = self._stats.nfe_forward
        else:
            self.sde.nfe = 0
            kw = {}
            if self.method == "sde_adjoint":
                kw = dict(adjoint=True, adjoint_params=tuple(self.model.parameters()))
            ys = impls.sample_sde(self.sde, y0, ts, dt=s.sde_dt, seed=self._next_seed(), **kw)
            nfe = self.sde.nfe
        return ys[..., 0].T.reshape(len(x0), s.n_paths, len(ts)), nfe

    def step(self, x0: torch.Tensor, ys: torch.Tensor, ts: torch.Tensor) -> dict:
        """One optimiser step on a batch: phases timed apart, NFE forward/backward, loss."""
        self.optimiser.zero_grad(set_to_none=True)
        start = time.perf_counter()
        pred, nfe_fwd = self.predict(x0, ts)
        loss = kl_loss(pred, ys)
        fwd = time.perf_counter()
        if self.method != "torch_gq":
            self.sde.nfe = 0
        loss.backward()
        bwd = time.perf_counter()
        nfe_bwd = self._stats.nfe_backward if self.method == "torch_gq" else self.sde.nfe
        self.optimiser.step()
        end = time.perf_counter()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{self.method}: training loss is {float(loss)}")
        return dict(fwd_s=fwd - start, bwd_s=bwd - fwd, step_s=end - bwd, nfe_fwd=nfe_fwd, nfe_bwd=nfe_bwd,
                    loss=float(loss.detach()))  # fmt: skip

    def epoch(self, data: OUData, perm: torch.Tensor) -> dict:
        """One pass over `data` in the order `perm` (shared by every method of a seed); sums and means."""
        rows = [self.step(data.x0[idx], data.ys[idx], data.ts) for idx in perm.split(self.settings.batch)]
        out = {k: sum(r[k] for r in rows) for k in ("fwd_s", "bwd_s", "step_s", "nfe_fwd", "nfe_bwd")}
        out["loss"] = sum(r["loss"] * len(idx) for r, idx in zip(rows, perm.split(self.settings.batch))) / len(perm)
        return out


def sample_model(model: SDEModel, x0: torch.Tensor, ts: torch.Tensor, n_paths: int, *, dt: float, seed: int):
    """The trained drift and diffusion as a Stratonovich SDE in torchsde: paths (n, paths, times), no grad."""
    sde = impls.stratonovich_sde(model.drift, model.diffusion)
    y0 = x0.repeat_interleave(n_paths).unsqueeze(-1)
    with torch.no_grad():
        ys = impls.sample_sde(sde, y0, ts, dt=dt, seed=seed)
    return ys[..., 0].T.reshape(len(x0), n_paths, len(ts))


def validate(model: SDEModel, data: OUData, settings: OUSettings, seed: int) -> dict:
    """Validation log-likelihood and KL of the model sampled as an SDE (the same for every method)."""
    pred = sample_model(model, data.x0, data.ts, settings.n_paths, dt=settings.sde_dt, seed=seed)
    return dict(val_loglik=float(log_likelihood(pred, data.ys)), val_kl=float(kl_loss(pred, data.ys)))


# ----------------------------------------------------------------------------- one training run

TRAIN_DATA_SEED, VAL_DATA_SEED = 982846947, 535617672  # the data are fixed; run seeds vary weights and order
BAND_PATHS = 200


def load_data(settings: OUSettings, cache_dir=None) -> tuple[OUData, OUData]:
    """(train, validation) data; cached as .pt files in `cache_dir` (written atomically) when given."""
    s = settings
    out = []
    for n, seed in ((s.n_train, TRAIN_DATA_SEED), (s.n_val, VAL_DATA_SEED)):
        path = None
        if cache_dir is not None:
            path = Path(cache_dir) / f"ou-n{n}-p{s.n_paths}-s{seed}-dt{s.data_dt:g}.pt"
            if path.exists():
                out.append(OUData(**torch.load(path)))
                continue
        data = make_ou_data(n, s.n_paths, seed, dt=s.data_dt)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            torch.save(dataclasses.asdict(data), tmp)
            os.replace(tmp, path)
        out.append(data)
    return out[0], out[1]


def train_run(method: str, width: int, settings: OUSettings, seed: int, epochs: int, *, data=None, on_epoch=None):
    """Train one model; returns (epoch rows, band rows). Epoch 0 is the untrained model (validation only).

    Every method of a seed sees the same initial weights, the same batch order and the same validation
    Brownian paths. `data`: (train, val) from `load_data` (default: generated here).
    """
    s = settings
    train, val = load_data(s) if data is None else data
    model = build_model(width, seed)
    trainer = Trainer(method, model, s, noise_seed=seed)
    order = torch.Generator().manual_seed(seed)
    rows, wall = [], 0.0
    for epoch in range(epochs + 1):
        row = dict(epoch=epoch, fwd_s=0.0, bwd_s=0.0, step_s=0.0, nfe_fwd=0, nfe_bwd=0, loss=float("nan"))
        if epoch > 0:
            perm = torch.randperm(s.n_train, generator=order)
            row.update(trainer.epoch(train, perm))
        row["epoch_s"] = row["fwd_s"] + row["bwd_s"] + row["step_s"]
        wall += row["epoch_s"]
        row["wall_s"] = wall
        row.update(validate(model, val, s, seed=VAL_DATA_SEED + epoch))
        rows.append(row)
        if on_epoch is not None:
            on_epoch(row)
    return rows, bands(model, val, s)


def settings_for(case, problem) -> OUSettings:
    """A case (and its training problem's options) -> OUSettings; GQ's options pass through as keywords."""
    gq = {}
    if case.method == "torch_gq":
        gq = dict(backward_state=case.backward_state or "auto")
        if case.warm_start is not None:
            gq["warm_start"] = bool(case.warm_start)
        if case.quad_order is not None:
            gq["quad_order"] = case.quad_order
        elif case.gtol is not None:
            gq["gtol"] = case.gtol
    kw = dict(problem.options)
    if case.ncosines is not None:
        kw["ncosines"] = case.ncosines
    return OUSettings(rtol=case.rtol, atol=case.atol, solver=case.solver, gq_options=tuple(sorted(gq.items())),
                      batch=case.batch, **kw)  # fmt: skip


def run_case(case, problem, cache_dir=None) -> tuple[list[dict], dict[str, list[dict]]]:
    """The worker's entry: train, then one results row (medians over trained epochs) and the tables
    `epochs` and `sde_bands`, every row carrying the case fields."""
    from ..measurement.measure import PeakMemory, Skip

    if case.device != "cpu" and not torch.cuda.is_available():
        raise Skip(f"device={case.device} but torch.cuda.is_available() is False on this machine")
    if case.device != "cpu" or case.dtype != "float32":
        raise Skip(f"{problem.name} runs on cpu in float32 only (got {case.device}, {case.dtype})")
    torch.set_num_threads(case.threads)
    settings = settings_for(case, problem)
    t0 = time.perf_counter()
    data = load_data(settings, cache_dir)
    setup_s = time.perf_counter() - t0
    with PeakMemory(case.device) as mem:
        epochs, band_rows = train_run(case.method, case.width, settings, case.seed, case.epochs, data=data)
    key = dict(case.to_dict(), case_id=case.case_id)
    trained = [r for r in epochs if r["epoch"] > 0]
    timed = trained[1:] if len(trained) >= 3 else trained  # the first epoch holds the warm-up

    def med(k):
        return float(statistics.median(r[k] for r in timed))

    last = epochs[-1]
    row = dict(key, repeat=0, fwd_s=med("fwd_s"), bwd_s=med("bwd_s"), step_s=med("step_s"), epoch_s=med("epoch_s"),
               nfe_fwd=med("nfe_fwd"), nfe_bwd=med("nfe_bwd"), peak_mem_bytes=float(mem.bytes),
               grad_rel_err=float("nan"), loss=last["loss"], val_loglik=last["val_loglik"], val_kl=last["val_kl"],
               train_s=last["wall_s"], compile_s=float("nan"), setup_s=setup_s, warmup=0, status="ok",
               error="")  # fmt: skip
    if not all(math.isfinite(r["val_loglik"]) for r in epochs):
        row.update(status="nan", error="non-finite validation log-likelihood")
    tables = dict(epochs=[dict(key, **r) for r in epochs], sde_bands=[dict(key, **r) for r in band_rows])
    return [row], tables


def bands(model: SDEModel, val: OUData, settings: OUSettings, n_curves: int = 3) -> list[dict]:
    """Mean and std over t of the model (sampled as an SDE) and of the data, for a few validation x0."""
    idx = val.x0.argsort()[torch.linspace(0, len(val.x0) - 1, n_curves).round().long()]
    pred = sample_model(model, val.x0[idx], val.ts, BAND_PATHS, dt=settings.sde_dt, seed=1)
    rows = []
    for kind, paths in (("model", pred), ("data", val.ys[idx])):
        mean, std = paths.mean(1), paths.std(1)
        for i, x0 in enumerate(val.x0[idx].tolist()):
            rows += [dict(kind=kind, x0=x0, t=t, mean=m, std=sd)
                     for t, m, sd in zip(val.ts.tolist(), mean[i].tolist(), std[i].tolist())]  # fmt: skip
    return rows
