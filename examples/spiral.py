"""A user's own model for `gqbench`: a neural ODE fitted to a damped spiral (not one of the built-ins).

    gqbench advise examples/spiral.py:make --rtol 1e-4

The factory contract: make(*, width, batch, seed, dtype, device) -> (func, y0, t, loss[, target]). gqbench
calls it in each fresh worker process, with the dtype and device of the case (float64 on CPU for the
reference). The optional fifth element is what trained states fit (`gqbench advise ... --train-steps 200`):
here the loss itself, a fit to the observed spiral, is the training task. To measure at weights you trained
yourself: `torch.save(func.state_dict(), "model.pt")`, then `gqbench advise examples/spiral.py:make
--weights model.pt`.
"""

from __future__ import annotations

import torch
from torch import nn


class SpiralField(nn.Module):
    """dy/dt = A y + MLP(y): a learnable linear part (the spiral) plus a tanh MLP correction."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(2, 2, bias=False)
        self.mlp = nn.Sequential(
            nn.Linear(2, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 2)
        )

    def forward(self, t, y):
        return self.linear(y) + self.mlp(y)


def make(*, width: int = 32, batch: int = 16, seed: int, dtype: torch.dtype, device: torch.device):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # nn.Linear draws its initial weights from the global generator
    func = SpiralField(width)
    with torch.no_grad():  # start near the data's dynamics: a slowly decaying rotation
        func.linear.weight.copy_(torch.tensor([[-0.1, 2.0], [-2.0, -0.1]]) + 0.1 * torch.randn(2, 2, generator=gen))
    angle = 2 * torch.pi * torch.rand(batch, generator=gen)
    y0 = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    t = torch.linspace(0.0, 3.0, 7)
    # Observations: the exact damped spiral y(t) = e^{-0.1 t} R(-2t) y0 from each initial point.
    decay, turn = torch.exp(-0.1 * t), -2.0 * t
    rot = torch.stack([torch.stack([turn.cos(), -turn.sin()], -1), torch.stack([turn.sin(), turn.cos()], -1)], -2)
    data = decay[:, None, None] * torch.einsum("tij,bj->tbi", rot, y0)  # (len(t), batch, 2)
    func = func.to(dtype=dtype, device=device)
    data = data.to(dtype=dtype, device=device)

    def loss(ys):
        return (ys - data).pow(2).mean()

    return func, y0.to(dtype=dtype, device=device), t.to(dtype=dtype, device=device), loss, loss
