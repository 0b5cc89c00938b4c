"""JAX side of impls: the Gauss-Legendre quadrature adjoint for diffrax.

Imported on its own (`from impls.jax import GaussLegendreAdjoint`) so that `import impls`
never pays for importing JAX.
"""

from ._jax_gq import BACKWARD_STATES, MAX_QUAD_ORDER, GaussLegendreAdjoint, JaxGQStats

__all__ = ["BACKWARD_STATES", "GaussLegendreAdjoint", "JaxGQStats", "MAX_QUAD_ORDER"]
