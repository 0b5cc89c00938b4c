"""What gqbench measures: the GQ adjoint (PyTorch; JAX in `impls.jax`), baseline adapters, and Wong–Zakai
neural SDEs (trained as ODEs through the GQ adjoint, sampled with torchsde)."""

from ._baselines import (
    NFECounter,
    odeint_aca,
    odeint_adjoint,
    odeint_direct,
    odeint_mali,
    odeint_paper_gq,
    odeint_seminorm,
    synchronize,
)
from ._gq import BACKWARD_STATES, QUADRATURES, odeint_adjoint_gq
from ._quadrature import MAX_QUAD_ORDER, gauss_kronrod, gauss_legendre, quad_order_from_gtol
from ._stats import GQStats, gq_stats
from ._torchode import TorchodeSolver, TorchodeStats, odeint_torchode
from ._wong_zakai import (
    StratonovichSDE,
    WongZakaiNoise,
    WongZakaiODE,
    sample_sde,
    stratonovich_sde,
    wong_zakai_ode,
)

__all__ = [
    "BACKWARD_STATES",
    "GQStats",
    "MAX_QUAD_ORDER",
    "NFECounter",
    "QUADRATURES",
    "StratonovichSDE",
    "TorchodeSolver",
    "TorchodeStats",
    "WongZakaiNoise",
    "WongZakaiODE",
    "gauss_kronrod",
    "gauss_legendre",
    "gq_stats",
    "odeint_aca",
    "odeint_adjoint",
    "odeint_adjoint_gq",
    "odeint_direct",
    "odeint_mali",
    "odeint_paper_gq",
    "odeint_seminorm",
    "odeint_torchode",
    "quad_order_from_gtol",
    "sample_sde",
    "stratonovich_sde",
    "synchronize",
    "wong_zakai_ode",
]
