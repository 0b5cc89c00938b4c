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
