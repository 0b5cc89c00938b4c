"""Problems: seeded vector fields, initial states, observation times and losses, built locally.

Every field is built from `nn.Linear` + `nn.Softplus` (an `MLP`'s layers sit in `mlp.net`), in
float32 from the seed and then cast, so a float64 reference and a JAX copy see the same weights.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "float64": torch.float64}


class MLP(nn.Module):
    """in -> width -> ... -> out with Softplus; with `time_input`, t is appended to the state."""

    def __init__(self, dim_in: int, dim_out: int, width: int, depth: int, time_input: bool):
        super().__init__()
        self.time_input = time_input
        sizes = [dim_in + time_input] + [width] * depth + [dim_out]
        layers: list[nn.Module] = []
        for a, b in zip(sizes, sizes[1:], strict=False):
            layers += [nn.Linear(a, b), nn.Softplus()]
        self.net = nn.Sequential(*layers[:-1])

    def forward(self, t, y):
        if self.time_input:
            # ones_like * t rather than expand: stays valid when t is a vmapped 0-d tensor.
            y = torch.cat([y, torch.ones_like(y[..., :1]) * t], dim=-1)
        return self.net(y)


class SecondOrder(nn.Module):
    """d/dt [x, v] = [v, MLP(t, x, v)] on a concatenated state."""

    def __init__(self, dim: int, width: int, depth: int):
        super().__init__()
        self.dim = dim
        self.mlp = MLP(2 * dim, dim, width, depth, time_input=True)

    def forward(self, t, y):
        return torch.cat([y[..., self.dim :], self.mlp(t, y)], dim=-1)


@dataclasses.dataclass
class ProblemInstance:
    """What a method needs: `func(t, y)`, `y0` (batch, dim), times `t`, and `loss(ys)` -> scalar.

    `ys` is the solution at every time in `t`, shape (len(t), batch, dim), as torchdiffeq returns it.
    Gradients are taken with respect to `params` (the parameters of `func`, in order) and `y0`.
    `target`: what trained states fit (`gqbench.measurement.trained`), when a user's make gives one.
    """

    func: nn.Module
    y0: torch.Tensor
    t: torch.Tensor
    loss: Callable[[torch.Tensor], torch.Tensor]
    target: Any = None

    @property
    def params(self) -> tuple[torch.Tensor, ...]:
        return tuple(self.func.parameters())


@dataclasses.dataclass(frozen=True)
class AbstractProblem(abc.ABC):
    name: str
    description: str
    state_dim: int
    default_batch: int
    default_width: int = 64
    # The loss is a training task (trained states minimise it); else they fit a synthetic target.
    loss_is_task: ClassVar[bool] = False

    def build(
        self,
        *,
        width: int,
        batch: int | None = None,
        dtype: str = "float32",
        device: str = "cpu",
        seed: int = 0,
    ) -> ProblemInstance:
        """The instance for (width, batch, seed), cast to dtype and moved to device."""
        batch = self.default_batch if batch is None else batch
        gen = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # nn.Linear's init draws from the global generator
            func, y0, t, loss = self._make(width=width, batch=batch, gen=gen)
        dt = DTYPES[dtype]
        return ProblemInstance(
            func=func.to(device=device, dtype=dt),
            y0=y0.to(device=device, dtype=dt),
            t=t.to(device=device, dtype=dt),
            loss=loss(device, dt),
        )

    @abc.abstractmethod
    def _make(self, *, width: int, batch: int, gen: torch.Generator):
        """-> (func, y0, t, loss_factory(device, dtype) -> loss(ys)) in float32 on CPU."""

    def exact_gradients(self, inst: ProblemInstance) -> list[torch.Tensor] | None:
        """Closed-form d loss / d(params, y0), where the problem has one; else None."""
        return None


def _fixed(loss: Callable, *tensors: torch.Tensor):
    """A loss factory that moves its data tensors to the instance's device/dtype once."""

    def factory(device, dtype):
        moved = [x.to(device=device, dtype=dtype) for x in tensors]
        return lambda ys: loss(ys, *moved)

    return factory


@dataclasses.dataclass(frozen=True)
class WorkloadL(AbstractProblem):
    depth: int = 2

    def _make(self, *, width, batch, gen):
        func = MLP(self.state_dim, self.state_dim, width, self.depth, time_input=True)
        y0 = torch.randn(batch, self.state_dim, generator=gen)
        return func, y0, torch.tensor([0.0, 1.0]), _fixed(lambda ys: ys[-1].pow(2).sum())


@dataclasses.dataclass(frozen=True)
class G1D(AbstractProblem):
    """The paper's g1d: x in {-1, 1} -> -x, augmented by zeros; an ODE cannot do it without them."""

    loss_is_task: ClassVar[bool] = True

    depth: int = 2

    def _make(self, *, width, batch, gen):
        func = MLP(self.state_dim, self.state_dim, width, self.depth, time_input=False)
        x = torch.tensor([-1.0, 1.0]).repeat((batch + 1) // 2)[:batch]
        y0 = torch.cat([x[:, None], torch.zeros(batch, self.state_dim - 1)], dim=1)
        loss = lambda ys, target: (ys[-1, :, 0] - target).pow(2).mean()
        return func, y0, torch.tensor([0.0, 1.0]), _fixed(loss, -x)


@dataclasses.dataclass(frozen=True)
class NestedSpheres(AbstractProblem):
    """2-D nested annuli: inner disc (r < 0.5) -> -1, ring (1 < r < 1.5) -> +1; 3 zeros appended."""

    loss_is_task: ClassVar[bool] = True

    depth: int = 2

    def _make(self, *, width, batch, gen):
        func = MLP(self.state_dim, self.state_dim, width, self.depth, time_input=True)
        inner = torch.arange(batch) % 2 == 0
        r = torch.where(inner, 0.5 * torch.rand(batch, generator=gen), 1.0 + 0.5 * torch.rand(batch, generator=gen))
        phi = 2 * math.pi * torch.rand(batch, generator=gen)
        xy = torch.stack([r * torch.cos(phi), r * torch.sin(phi)], dim=1)
        y0 = torch.cat([xy, torch.zeros(batch, self.state_dim - 2)], dim=1)
        label = torch.where(inner, -1.0, 1.0)
        loss = lambda ys, label: (ys[-1, :, 0] - label).pow(2).mean()
        return func, y0, torch.tensor([0.0, 1.0]), _fixed(loss, label)


@dataclasses.dataclass(frozen=True)
class Sines(AbstractProblem):
    """Second-order ODE on [x, v] fitted to x(t) = a sin(t + phi) at 10 times in [0, 2 pi]."""

    loss_is_task: ClassVar[bool] = True

    depth: int = 2
    n_obs: int = 10

    def _make(self, *, width, batch, gen):
        dim = self.state_dim // 2
        func = SecondOrder(dim, width, self.depth)
        # Small last layer: a random acceleration field integrated over 2 pi otherwise blows up.
        with torch.no_grad():
            func.mlp.net[-1].weight.mul_(0.1)
            func.mlp.net[-1].bias.mul_(0.1)
        a = 0.5 + torch.rand(batch, 1, generator=gen)
        phi = 2 * math.pi * torch.rand(batch, 1, generator=gen)
        t = torch.linspace(0.0, 2 * math.pi, self.n_obs)
        y0 = torch.cat([a * torch.sin(phi), a * torch.cos(phi)], dim=1)
        data = (a * torch.sin(t[:, None, None] + phi)).expand(-1, -1, dim)  # (n_obs, batch, dim)
        loss = lambda ys, data: (ys[..., :dim] - data).pow(2).mean()
        return func, y0, t, _fixed(loss, data)


@dataclasses.dataclass(frozen=True)
class Linear(AbstractProblem):
    """dy/dt = A y with A = `func.weight` (width x width; width is the state size): y(1) = e^A y0."""

    def _make(self, *, width, batch, gen):
        func = _LinearField(width)
        with torch.no_grad():
            a = -0.5 * torch.eye(width) + 0.5 * torch.randn(width, width, generator=gen) / math.sqrt(width)
            func.lin.weight.copy_(a)
        y0 = torch.randn(batch, width, generator=gen)
        return func, y0, torch.tensor([0.0, 1.0]), _fixed(lambda ys: ys[-1].pow(2).sum())

    def exact_gradients(self, inst):
        a = inst.func.lin.weight.detach().requires_grad_(True)
        y0 = inst.y0.detach().requires_grad_(True)
        span = inst.t[-1] - inst.t[0]
        y1 = y0 @ torch.linalg.matrix_exp(a * span).T
        return list(torch.autograd.grad(inst.loss(y1[None]), (a, y0)))


@dataclasses.dataclass(frozen=True)
class CubicOscillator(AbstractProblem):
    """A long-horizon oscillator: dy/dt = (y^3) A + MLP(y), A = [[-0.1, 1.5], [-1.5, -0.1]] learnable,
    the MLP a small perturbation; 10 observation times on [0, 25], loss sum of y^2 at all of them.

    torchdiffeq's cubic test problem, where the paper's one-rule-per-interval quadrature is far off:
    the integrand oscillates many times inside each long interval.
    """

    depth: int = 2
    span: float = 25.0
    n_obs: int = 10

    def _make(self, *, width, batch, gen):
        func = _CubicField(self.state_dim, width, self.depth)
        phi = 2 * math.pi * torch.rand(batch, generator=gen)
        r = 1.0 + 0.5 * torch.rand(batch, generator=gen)
        y0 = torch.stack([r * torch.cos(phi), r * torch.sin(phi)], dim=1)
        t = torch.linspace(0.0, self.span, self.n_obs)
        return func, y0, t, _fixed(lambda ys: ys.pow(2).sum() / ys.shape[1])


class _CubicField(nn.Module):
    def __init__(self, dim: int, width: int, depth: int):
        super().__init__()
        self.A = nn.Parameter(torch.tensor([[-0.1, 1.5], [-1.5, -0.1]]))
        self.mlp = MLP(dim, dim, width, depth, time_input=False)
        with torch.no_grad():  # a perturbation of the oscillator, not a replacement
            self.mlp.net[-1].weight.mul_(0.01)
            self.mlp.net[-1].bias.zero_()

    def forward(self, t, y):
        return (y**3) @ self.A + self.mlp(t, y)


@dataclasses.dataclass(frozen=True)
class ForcedMLP(AbstractProblem):
    """An MLP field driven by sin(8t) through its input, observed at only 3 times on [0, 6]: long
    intervals over which a^T df/dtheta oscillates (~15 periods), few observations to anchor it."""

    depth: int = 2
    span: float = 6.0
    n_obs: int = 3
    frequency: float = 8.0

    def _make(self, *, width, batch, gen):
        func = _ForcedField(self.state_dim, width, self.depth, self.frequency)
        y0 = torch.randn(batch, self.state_dim, generator=gen) * 0.5
        t = torch.linspace(0.0, self.span, self.n_obs)
        return func, y0, t, _fixed(lambda ys: ys.pow(2).sum() / ys.shape[1])


class _ForcedField(nn.Module):
    def __init__(self, dim: int, width: int, depth: int, frequency: float):
        super().__init__()
        self.frequency = frequency
        self.mlp = MLP(dim + 1, dim, width, depth, time_input=False)

    def forward(self, t, y):
        # ones_like * sin(t): stays valid when t is a vmapped 0-d tensor.
        return self.mlp(t, torch.cat([y, torch.ones_like(y[..., :1]) * torch.sin(self.frequency * t)], dim=-1))


@dataclasses.dataclass(frozen=True)
class VanDerPol(AbstractProblem):
    """Van der Pol, dx/dt = v, dv/dt = mu (1 - x^2) v - x, mu = 5 the parameter (width unused), observed at
    4 times on [0, 12], loss sum of y^2 at all of them. Its limit cycle attracts, so solving the state
    backwards from the end leaves it and blows up: torchdiffeq's adjoint and seminorm adjoint, and GQ
    backsolving z, stop with "underflow in dt"; GQ with backward_state="interpolate" and direct backprop do
    not (`gqbench advise vanderpol --rtol 1e-6 --dtype float64`: 2.9e-5 and 1.7e-5 off the reference)."""

    mu: float = 5.0
    span: float = 12.0
    n_obs: int = 4

    def _make(self, *, width, batch, gen):
        func = _VanDerPolField(self.mu)
        x0 = 1.0 + torch.rand(batch, 1, generator=gen)
        y0 = torch.cat([x0, torch.zeros(batch, 1)], dim=1)
        t = torch.linspace(0.0, self.span, self.n_obs)
        return func, y0, t, _fixed(lambda ys: ys.pow(2).sum() / ys.shape[1])


class _VanDerPolField(nn.Module):
    def __init__(self, mu: float):
        super().__init__()
        self.mu = nn.Parameter(torch.tensor(mu))

    def forward(self, t, y):
        x, v = y[..., :1], y[..., 1:]
        return torch.cat([v, self.mu * (1 - x**2) * v - x], dim=-1)


class _LinearField(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.lin = nn.Linear(width, width, bias=False)

    def forward(self, t, y):
        return self.lin(y)


PROBLEMS: dict[str, AbstractProblem] = {
    p.name: p
    for p in (
        WorkloadL("workload_l", "workload L: MLP(t, y), state 5, t in [0, 1], loss sum y(1)^2", 5, 200),
        G1D("g1d", "paper's g1d: x in {-1, 1} -> -x, 3 augmented zeros, MLP without t", 4, 2),
        NestedSpheres("spheres", "nested 2-D annuli, 3 augmented dims, MLP(t, y)", 5, 200),
        Sines("sines", "second-order ODE on [x, v], t in [0, 2 pi], 10 observation times", 2, 100),
        Linear("linear", "dy/dt = A y (closed form; width = state size) for validation", 0, 10, 8),
        CubicOscillator("oscillator", "hard: (y^3) A + small MLP, 10 times on [0, 25] (long, oscillating)", 2, 16),
        ForcedMLP("forced_mlp", "hard: MLP(y, sin 8t), 3 times on [0, 6] (long intervals, oscillating)", 2, 16),
        VanDerPol(
            "vanderpol",
            "hard for adjoints: Van der Pol mu = 5 (the parameter; width unused), 4 times on [0, 12]",
            2,
            4,
            1,
        ),
    )
}


def get_problem(name: str) -> AbstractProblem:
    """A built-in problem by name, or a user's factory named "pkg.module:make" / "path/to/file.py:make"
    (`gqbench.define.user_problems`)."""
    from .user_problems import UserProblem, is_user_problem

    if is_user_problem(name):
        return UserProblem.named(name)
    try:
        return PROBLEMS[name]
    except KeyError:
        raise KeyError(
            f"unknown problem {name!r}; known problems: {', '.join(PROBLEMS)}, or your own as 'pkg.module:make' "
            "or 'path/to/file.py:make'"
        ) from None
