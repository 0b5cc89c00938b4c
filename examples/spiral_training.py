"""A user's own training problem for `gqbench`: fit a neural ODE to damped spirals, epoch by epoch.

    # grid.toml
    [axes]
    method = ["torch_direct", "torch_gq"]
    problem = ["examples/spiral_training.py:experiment"]
    epochs = [5]

    gqbench run --grid grid.toml --out reports/spiral-training --report

`experiment` is an instance of an `ODEExperiment` subclass (gqbench's training contract): data, a model whose
forward(x, t, solve) predicts, a loss and a validation metric. gqbench trains it with each method from the same
initial weights and batches, timing forward, backward and optimiser step per epoch.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from gqbench.define.experiments import Dataset, ODEExperiment


class SpiralField(nn.Module):
    """dy/dt = A y + MLP(y)."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(2, 2, bias=False)
        self.mlp = nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, 2))

    def forward(self, t, y):
        return self.linear(y) + self.mlp(y)


class SpiralModel(nn.Module):
    """y(t) from y0 = x; predictions (batch, len(t), 2). The training loop solves through `self.field` (an
    nn.Module: the vector field whose NFE it counts)."""

    def __init__(self, width: int):
        super().__init__()
        self.field = SpiralField(width)

    def forward(self, x, t, solve):
        return solve(self.field, x, t).transpose(0, 1)


@dataclasses.dataclass(frozen=True)
class SpiralFit(ODEExperiment):
    n_train: int = 32
    n_val: int = 8

    def make_data(self, *, seed):
        gen = torch.Generator().manual_seed(seed)
        t = torch.linspace(0.0, 3.0, 7)
        decay, turn = torch.exp(-0.1 * t), -2.0 * t
        rot = torch.stack([torch.stack([turn.cos(), -turn.sin()], -1), torch.stack([turn.sin(), turn.cos()], -1)], -2)

        def sample(n):
            angle = 2 * torch.pi * torch.rand(n, generator=gen)
            y0 = torch.stack([angle.cos(), angle.sin()], 1)
            return y0, decay[None, :, None] * torch.einsum("tij,bj->bti", rot, y0)  # (n, len(t), 2)

        (x, y), (xv, yv) = sample(self.n_train), sample(self.n_val)
        return Dataset(x, y, xv, yv, t)

    def make_model(self, *, width):
        return SpiralModel(width)

    def loss(self, *, pred, target):
        return (pred - target).pow(2).mean()

    def metric(self, *, pred, target):
        return float((pred - target).pow(2).mean())


experiment = SpiralFit("spiral_fit", "a neural ODE fitted to damped spirals (user example)", default_width=16,
                       default_batch=16, default_epochs=5, default_lr=1e-2)  # fmt: skip
