"""The paper's neural-ODE training experiments, defined: g1d, spheres, sines (regular and irregular times),
images, and the toy gradient-accuracy problem.

Each is an `ODEExperiment`: data generated locally from a fixed data seed (the images are scikit-learn's
8x8 digits, shipped inside that package: no download), a model `encoder -> ODE -> decoder` built from the
case's seed, a loss and a validation metric. `gqbench.training.loop` trains it the same way for every method
(same initial weights, same batch order, Adam). Hyper-parameters are the paper's (its code's) defaults;
data sizes are ours where the paper's are not stated.

Import-light: torch is imported inside the methods, so expanding a grid never loads it.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import TYPE_CHECKING, Any

from .training_problems import AbstractTrainingProblem, register_training_problem

if TYPE_CHECKING:
    import torch
    from torch import nn

# The methods that train through a `solve(func, y0, t)` (gqbench.define.methods' `solver`).
ODE_METHODS = ("torch_direct", "torch_adjoint", "torch_seminorm", "torch_gq", "torch_mali", "torch_aca")
# ... the paper's own implementation, which a run has only from a checkout on PYTHONPATH (else skipped rows), and
# torchode's batch-parallel solver (per-sample steps; the [torchode] extra, else skipped rows).
TRAIN_METHODS = (*ODE_METHODS, "torch_paper_gq", "torchode_autodiff", "torchode_backsolve")
DATA_SEED = 20230501  # the data are fixed; a case's seed varies the initial weights and the batch order


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Inputs and targets for training and validation; `t` the observation times (first = start)."""

    x_train: Any
    y_train: Any
    x_val: Any
    y_val: Any
    t: Any

    def to(self, device, dtype) -> Dataset:

        def cast(x):
            return x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)

        return Dataset(*(cast(getattr(self, f.name)) for f in dataclasses.fields(self)))

    def __post_init__(self):
        assert len(self.x_train) == len(self.y_train) and len(self.x_val) == len(self.y_val)


def _module():
    """nn.Module subclasses are defined on first use, so importing this module does not import torch."""
    from torch import nn

    class ODEModel(nn.Module):
        """encoder(x) = z0 -> solve(field, z0, t) -> decoder(zs at every time) = prediction."""

        def __init__(self, encoder: nn.Module, field: nn.Module, decoder: nn.Module):
            super().__init__()
            self.encoder, self.field, self.decoder = encoder, field, decoder

        def forward(self, x, t, solve):
            return self.decoder(solve(self.field, self.encoder(x), t))

    class Autonomous(nn.Module):
        """An MLP field without t (Softplus between layers)."""

        def __init__(self, dim: int, width: int, depth: int = 2):
            super().__init__()
            sizes = [dim] + [width] * depth + [dim]
            layers: list[nn.Module] = []
            for a, b in zip(sizes, sizes[1:], strict=False):
                layers += [nn.Linear(a, b), nn.Softplus()]
            self.net = nn.Sequential(*layers[:-1])

        def forward(self, t, y):
            return self.net(y)

    class TimeMLP(Autonomous):
        """An MLP field of (y, t)."""

        def __init__(self, dim: int, width: int, depth: int = 2):
            super().__init__(dim, width, depth)
            self.net[0] = nn.Linear(dim + 1, width)

        def forward(self, t, y):
            return self.net(torch_cat_t(y, t))

    class SecondOrder(nn.Module):
        """d/dt [x, v] = [v, MLP(x, v)]."""

        def __init__(self, dim: int, width: int):
            super().__init__()
            self.dim = dim
            self.acc = Autonomous(2 * dim, width)
            self.acc.net[-1] = nn.Linear(width, dim)

        def forward(self, t, y):
            import torch

            return torch.cat([y[..., self.dim :], self.acc(t, y)], dim=-1)

    class Augment(nn.Module):
        """x -> [x, 0...0] (augmented neural ODE)."""

        def __init__(self, extra: int):
            super().__init__()
            self.extra = extra

        def forward(self, x):
            import torch

            return torch.cat([x, x.new_zeros(*x.shape[:-1], self.extra)], dim=-1)

    class Select(nn.Module):
        """zs (times, batch, dim) -> zs[time, :, dim]; `time` None keeps every time."""

        def __init__(self, time: int | None, dim: int):
            super().__init__()
            self.time, self.dim = time, dim

        def forward(self, zs):
            return (zs if self.time is None else zs[self.time])[..., self.dim]

    class ConvField(nn.Module):
        """3 conv layers (channels -> width -> width -> channels), 3x3, Softplus between: the image ODE."""

        def __init__(self, channels: int, width: int):
            super().__init__()
            self.net = nn.Sequential(
                nn.Conv2d(channels, width, 3, padding=1), nn.Softplus(),
                nn.Conv2d(width, width, 3, padding=1), nn.Softplus(),
                nn.Conv2d(width, channels, 3, padding=1),
            )  # fmt: skip

        def forward(self, t, y):
            return self.net(y)

    class Last(nn.Module):
        """zs -> a linear classifier on the final state."""

        def __init__(self, features: int, classes: int):
            super().__init__()
            self.fc = nn.Linear(features, classes)

        def forward(self, zs):
            return self.fc(zs[-1].flatten(1))

    def torch_cat_t(y, t):
        import torch

        # ones_like * t rather than expand: stays valid when t is a vmapped 0-d tensor.
        return torch.cat([y, torch.ones_like(y[..., :1]) * t], dim=-1)

    return dict(ODEModel=ODEModel, Autonomous=Autonomous, TimeMLP=TimeMLP, SecondOrder=SecondOrder, Augment=Augment,
                Select=Select, ConvField=ConvField, Last=Last)  # fmt: skip


_MODULES: dict | None = None


def modules() -> dict:
    global _MODULES
    if _MODULES is None:
        _MODULES = _module()
    return _MODULES


@dataclasses.dataclass(frozen=True)
class ODEExperiment(AbstractTrainingProblem):
    """A neural ODE trained on a data set. Subclasses give data, model, loss and metric (keyword-only)."""

    name: str
    description: str
    default_width: int
    default_batch: int
    default_epochs: int
    default_lr: float
    metric_name: str = "mse"  # the validation metric's column value in `epochs.parquet` (`metric`)
    higher_is_better: bool = False
    methods: tuple[str, ...] = TRAIN_METHODS
    noise_axis: bool = False

    @abc.abstractmethod
    def make_data(self, *, seed: int) -> Dataset:
        """The data set from `seed` in float32 on the CPU (the loop casts and moves it)."""

    @abc.abstractmethod
    def make_model(self, *, width: int) -> nn.Module:
        """A fresh model whose `forward(x, t, solve)` predicts; the caller seeds torch's generator."""

    @abc.abstractmethod
    def loss(self, *, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The training loss (a scalar, mean over the batch)."""

    @abc.abstractmethod
    def metric(self, *, pred: torch.Tensor, target: torch.Tensor) -> float:
        """The validation metric over a whole set (`metric_name`; `higher_is_better` says its direction)."""


def _mse(pred, target) -> torch.Tensor:
    return (pred - target).pow(2).mean()


@dataclasses.dataclass(frozen=True)
class G1D(ODEExperiment):
    """x in {-1, 1} -> -x at t = 1: a map an ODE cannot learn in 1-D (paths would cross); 3 zeros appended."""

    n_points: int = 32
    augment: int = 3

    def make_data(self, *, seed):
        import torch

        x = torch.tensor([-1.0, 1.0]).repeat(self.n_points // 2)[:, None]
        return Dataset(x, -x[:, 0], x.clone(), -x[:, 0], torch.tensor([0.0, 1.0]))

    def make_model(self, *, width):
        m = modules()
        dim = 1 + self.augment
        return m["ODEModel"](m["Augment"](self.augment), m["Autonomous"](dim, width), m["Select"](-1, 0))

    def loss(self, *, pred, target):
        return _mse(pred, target)

    def metric(self, *, pred, target):
        return float(_mse(pred, target))


@dataclasses.dataclass(frozen=True)
class Spheres(ODEExperiment):
    """Nested 2-D annuli: r < 0.5 -> -1, 1 < r < 1.5 -> +1, 3 zeros appended; MSE loss, accuracy metric."""

    n_train: int = 1000
    n_val: int = 200
    augment: int = 3

    def make_data(self, *, seed):
        import torch

        gen = torch.Generator().manual_seed(seed)

        def sample(n):
            inner = torch.rand(n, generator=gen) < 0.5
            r = torch.where(inner, 0.5 * torch.rand(n, generator=gen), 1.0 + 0.5 * torch.rand(n, generator=gen))
            phi = 2 * math.pi * torch.rand(n, generator=gen)
            return torch.stack([r * torch.cos(phi), r * torch.sin(phi)], 1), torch.where(inner, -1.0, 1.0)

        (x, y), (xv, yv) = sample(self.n_train), sample(self.n_val)
        return Dataset(x, y, xv, yv, torch.tensor([0.0, 1.0]))

    def make_model(self, *, width):
        m = modules()
        return m["ODEModel"](m["Augment"](self.augment), m["TimeMLP"](2 + self.augment, width), m["Select"](-1, 0))

    def loss(self, *, pred, target):
        return _mse(pred, target)

    def metric(self, *, pred, target):
        return float(((pred > 0) == (target > 0)).float().mean())


@dataclasses.dataclass(frozen=True)
class Sines(ODEExperiment):
    """x(t) = a sin(t + phi) on [0, 2 pi], learnt as a second-order ODE on [x, v] (MLP of (x, v)) from the
    true initial state; observed at `n_obs` times, regular or (`irregular`) sorted uniform with t0 = 0,
    the same times for every series. MSE loss and metric over all observations."""

    n_train: int = 15
    n_val: int = 5
    n_obs: int = 10
    irregular: bool = False

    def make_data(self, *, seed):
        import torch

        gen = torch.Generator().manual_seed(seed)
        span = 2 * math.pi
        if self.irregular:
            t = torch.cat([torch.zeros(1), torch.sort(span * torch.rand(self.n_obs - 1, generator=gen)).values])
        else:
            t = torch.linspace(0.0, span, self.n_obs)

        def sample(n):
            a = 0.5 + torch.rand(n, 1, generator=gen)
            phi = 2 * math.pi * torch.rand(n, 1, generator=gen)
            x0 = torch.cat([a * torch.sin(phi), a * torch.cos(phi)], 1)
            return x0, (a * torch.sin(t[None, :] + phi)).T  # (times, series)

        (x, y), (xv, yv) = sample(self.n_train), sample(self.n_val)
        # Targets are (series, times) so that batches index series; the decoder transposes.
        return Dataset(x, y.T.contiguous(), xv, yv.T.contiguous(), t)

    def make_model(self, *, width):
        import torch

        m = modules()
        field = m["SecondOrder"](1, width)
        with torch.no_grad():  # a small initial acceleration: a random field over 2 pi otherwise blows up
            field.acc.net[-1].weight.mul_(0.1)
            field.acc.net[-1].bias.mul_(0.1)
        return m["ODEModel"](torch.nn.Identity(), field, _Transpose(m["Select"](None, 0)))

    def loss(self, *, pred, target):
        return _mse(pred, target)

    def metric(self, *, pred, target):
        return float(_mse(pred, target))


def _Transpose(inner):
    import torch

    class Transposed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, zs):
            return self.inner(zs).T  # (times, batch) -> (batch, times)

    return Transposed()


@dataclasses.dataclass(frozen=True)
class Images(ODEExperiment):
    """A convolutional ODE on scikit-learn's 8x8 digits (1,797 images shipped inside the package, no
    download): a stride-2 conv encoder to 10 channels of 4x4, the ODE (3 conv layers, `width` channels),
    a linear classifier on the final state; cross-entropy loss, accuracy metric, 20 % held out."""

    channels: int = 10
    val_fraction: float = 0.2

    def make_data(self, *, seed):
        import torch

        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise ImportError("the images experiment needs scikit-learn; pip install the [train] extra") from None
        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        n_val = int(round(self.val_fraction * len(x)))
        val, train = perm[:n_val], perm[n_val:]
        return Dataset(x[train], y[train], x[val], y[val], torch.tensor([0.0, 1.0]))

    def make_model(self, *, width):
        from torch import nn

        m = modules()
        encoder = nn.Sequential(nn.Conv2d(1, self.channels, 3, stride=2, padding=1), nn.Softplus())
        return m["ODEModel"](encoder, m["ConvField"](self.channels, width), m["Last"](self.channels * 16, 10))

    def loss(self, *, pred, target):
        import torch

        return torch.nn.functional.cross_entropy(pred, target)

    def metric(self, *, pred, target):
        return float((pred.argmax(-1) == target).float().mean())


A, Z0 = 0.2, 10.0  # the toy problem: dz/dt = a z, z(0) = z0, loss z(T)^2


def exact(T: float) -> dict[str, float]:
    """(z(T), dL/da, dL/dz0, dL/dT) in closed form."""
    e = math.exp(2 * A * T)
    return dict(z=Z0 * math.exp(A * T), a=2 * T * Z0**2 * e, z0=2 * Z0 * e, T=2 * A * Z0**2 * e)


@dataclasses.dataclass(frozen=True)
class ToyGradient(AbstractTrainingProblem):
    """The paper's gradient-accuracy experiment (ACA and MALI papers): each method's gradient w.r.t. a, z0 and T
    against `exact` as T grows (`gqbench.training.toy_gradient` runs it)."""

    name: str = "toy_gradient"
    description: str = "dz/dt = a z, loss z(T)^2: gradient w.r.t. a, z0 and T against the closed form as T grows"
    methods: tuple[str, ...] = TRAIN_METHODS
    default_width: int = 1
    default_batch: int = 1
    default_epochs: int = 1
    default_lr: float | None = None
    horizons: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0)


def register_all() -> None:
    for p in (
        G1D("g1d", "paper's g1d: x in {-1, 1} -> -x, 3 augmented zeros, MLP without t; MSE", 32, 32, 150, 0.01),
        Spheres("spheres", "nested 2-D annuli (1000 train, 200 val), 3 augmented zeros, MLP(t, y); accuracy",
                32, 200, 100, 0.01, metric_name="accuracy", higher_is_better=True),
        Sines("sines", "second-order ODE on [x, v], 15 + 5 sine series at 10 regular times on [0, 2 pi]; MSE",
              32, 15, 250, 1e-3),
        Sines("sines_irregular", "sines at 10 irregular times (sorted uniform, t0 = 0, shared by the series)",
              32, 15, 250, 1e-3, irregular=True),
        Images("images", "conv ODE on scikit-learn's 8x8 digits (1,437 train, 360 val); accuracy",
               16, 32, 15, 1e-3, metric_name="accuracy", higher_is_better=True),
        ToyGradient(),
    ):  # fmt: skip
        register_training_problem(p)


register_all()  # here, not in training_problems: either module may be imported first
