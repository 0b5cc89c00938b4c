"""Gauss-Legendre nodes and weights, and the paper's rule for choosing how many."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

MAX_QUAD_ORDER = 64


@functools.cache
def _leggauss(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.legendre.leggauss(n)


@functools.lru_cache(maxsize=256)
def gauss_legendre(n: int, dtype: torch.dtype = torch.float64, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes in [-1, 1] and weights of the n-point rule, cached per (n, dtype, device).

    Exact for polynomials of degree 2n-1.
    """
    if n < 1:
        raise ValueError(f"gauss_legendre(n={n}): n must be >= 1.")
    x, w = _leggauss(n)
    return (torch.as_tensor(x, dtype=dtype, device=device), torch.as_tensor(w, dtype=dtype, device=device))


def quad_order_from_gtol(gtol: float, nfe_forward: int, dt: float, span: float) -> int:
    """n = min(ceil(gtol * NFE * |dt| / |T|), 64), at least 1 (Norcliffe & Deisenroth 2023)."""
    n = math.ceil(gtol * nfe_forward * abs(dt) / abs(span))
    return max(1, min(n, MAX_QUAD_ORDER))


@functools.cache
def _kronrod5() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # The 5-point Kronrod extension of the 2-point Gauss rule: nodes 0, +-1/sqrt(3) (Gauss),
    # +-sqrt(6/7); weights from the moment equations, so the rule is exact to degree 7.
    x = np.array([-math.sqrt(6 / 7), -1 / math.sqrt(3), 0.0, 1 / math.sqrt(3), math.sqrt(6 / 7)])
    moments = np.array([2 / (k + 1) if k % 2 == 0 else 0.0 for k in range(5)])
    w_kronrod = np.linalg.solve(np.vander(x, 5, increasing=True).T, moments)
    w_gauss = np.array([0.0, 1.0, 0.0, 1.0, 0.0])
    return x, w_kronrod, w_gauss


@functools.lru_cache(maxsize=64)
def gauss_kronrod(dtype: torch.dtype = torch.float64, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The nested Gauss-Kronrod pair G2/K5 on [-1, 1]: (nodes, Kronrod weights, Gauss weights).

    K5 is exact for degree 7 and G2 (nonzero weights on two of the nodes) for degree 3, so
    K5 - G2 estimates G2's error -- like an embedded Runge-Kutta pair, the estimate is of the
    lower-order rule while the higher-order result is kept. Cached per (dtype, device).
    """
    return tuple(torch.as_tensor(a, dtype=dtype, device=device) for a in _kronrod5())
