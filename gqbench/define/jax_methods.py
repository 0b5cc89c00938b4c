"""JAX methods: diffrax RecursiveCheckpointAdjoint, BacksolveAdjoint (plain and seminorm) and the
GQ adjoint (`impls.jax.GaussLegendreAdjoint`), measured on the torch methods' terms.

Equal terms: the torch problem instance is built as usual and its weights, y0, t and loss data are
copied into JAX; the same dtype (x64 on for float64), solver (dopri5 <-> diffrax.Dopri5, ...),
PID tolerances and thread count (XLA_FLAGS, set before jax is first imported). `build` compiles
the forward and the backward ahead of time and reports that as `compile_s`; `forward()` runs the
primal with its residuals (`jax.vjp` inside jit), `backward()` the VJP, each ending in
`block_until_ready` on the whole output pytree.

jax/diffrax are imported inside `build`/`unsupported` only, so torch cases never load them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import sys
import time
import warnings
from typing import ClassVar

from .methods import AbstractMethod, AbstractRun, register_method

_SOLVERS = {"dopri5": "Dopri5", "dopri8": "Dopri8", "bosh3": "Bosh3", "adaptive_heun": "Heun"}
_LOSS_PROBLEMS = ("workload_l", "linear", "g1d", "spheres", "sines", "oscillator", "forced_mlp")
MAX_STEPS = 4096  # diffrax's default; also sizes RecursiveCheckpointAdjoint's checkpoints


_CONFIGURED: int | None = None  # the threads _configure_jax set XLA up with before jax's import (preload, then build)


def _configure_jax(case) -> bool:
    """Thread count and GPU allocator behaviour must be set before jax is first imported.
    Returns False when jax was imported before, not by this function (then XLA keeps its own thread pool)."""
    global _CONFIGURED
    if "jax" in sys.modules:
        return _CONFIGURED == case.threads
    flags = f"--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads={case.threads}"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
    if case.device.startswith("cuda"):
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # measure what the case uses
    else:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU case must not grab a GPU
    _CONFIGURED = case.threads
    return True


@dataclasses.dataclass(frozen=True)
class _JaxMethod(AbstractMethod):
    backend: ClassVar[str] = "jax"

    def unsupported(self, case):
        if case.warm_start and not self.quadrature:
            return "warm_start is an option of the GQ adjoints (torch_gq, jax_gq)"
        if importlib.util.find_spec("jax") is None or importlib.util.find_spec("diffrax") is None:
            return "jax/diffrax are not installed; pip install 'gqbench[jax]'"
        if case.solver not in _SOLVERS:
            return f"solver {case.solver!r} has no diffrax counterpart here (have {', '.join(_SOLVERS)})"
        if ":" in case.problem:
            return f"{case.problem} is a user problem: the torch methods run it (a JAX twin is not supported yet)"
        if case.problem not in _LOSS_PROBLEMS:
            return f"problem {case.problem!r} has no JAX loss in gqbench.define.jax_methods"
        if case.device.startswith("cuda") and not any(
            importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin")
        ):
            return "device=cuda but no CUDA jaxlib plugin (jax[cuda12]) is installed"
        return None

    def adjoint(self, case):
        raise NotImplementedError

    def preload(self, case):
        if _configure_jax(case):
            import diffrax  # noqa: F401 -- jax under it
            import jax

            jax.config.update("jax_enable_x64", case.dtype == "float64")

    def build(self, *, case, problem):
        if not _configure_jax(case):
            warnings.warn("jax was imported before the case was built; XLA threads not aligned", stacklevel=2)
        import jax

        jax.config.update("jax_enable_x64", case.dtype == "float64")
        return _JaxRun(case, problem, self.adjoint(case), self.quadrature)


@dataclasses.dataclass(frozen=True)
class JaxCheckpoint(_JaxMethod):
    def adjoint(self, case):
        import diffrax

        return diffrax.RecursiveCheckpointAdjoint()


@dataclasses.dataclass(frozen=True)
class JaxBacksolve(_JaxMethod):
    seminorm: bool = False

    def adjoint(self, case):
        import diffrax

        if not self.seminorm:
            return diffrax.BacksolveAdjoint()
        ctrl = diffrax.PIDController(rtol=case.rtol, atol=case.atol, norm=diffrax.adjoint_rms_seminorm)
        return diffrax.BacksolveAdjoint(stepsize_controller=ctrl)


@dataclasses.dataclass(frozen=True)
class JaxGQ(_JaxMethod):
    quadrature: ClassVar[bool] = True

    def adjoint(self, case):
        from impls.jax import GaussLegendreAdjoint

        # As torch_gq: the case's `quadrature`; without one, a gtol or quad_order in the case picks the rule.
        gtol = None if case.gtol is None or math.isnan(case.gtol) else case.gtol
        rule = case.quadrature or ("fixed" if case.quad_order is not None else "gtol" if gtol is not None else None)
        # "auto" (the torch default) is GaussLegendreAdjoint's default here: backsolve.
        state = "backsolve" if case.backward_state in (None, "auto") else case.backward_state
        kw = dict(backward_state=state, quadrature=rule)
        if case.warm_start is not None:  # None: the adjoint's default (warm)
            kw["warm_start"] = bool(case.warm_start)
        if rule == "fixed":
            kw["quad_order"] = case.quad_order
        elif rule == "gtol":
            kw["gtol"] = gtol  # None: the paper's 0.1
        return GaussLegendreAdjoint(**kw)


class _JaxRun(AbstractRun):
    def __init__(self, case, problem, adjoint, quadrature: bool):
        import diffrax
        import jax
        import jax.numpy as jnp

        from impls._jax_gq import _nfe_forward

        device = jax.devices("gpu" if case.device.startswith("cuda") else "cpu")[0]
        dtype = jnp.float64 if case.dtype == "float64" else jnp.float32
        put = lambda x: jax.device_put(jnp.asarray(x.detach().cpu().numpy(), dtype=dtype), device)
        field, self._grad_order = _field_from_torch(problem.func, put)
        y0, t = put(problem.y0), put(problem.t)
        loss = _loss_from_torch(case.problem, problem, put)
        solver = getattr(diffrax, _SOLVERS[case.solver])()
        ctrl = diffrax.PIDController(rtol=case.rtol, atol=case.atol)
        self.quadrature = quadrature
        self.extra = {}

        def solve(diff, adjoint=adjoint):
            fld, y0_ = diff
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(fld),
                solver,
                t[0],
                t[-1],
                None,
                y0_,
                saveat=diffrax.SaveAt(ts=t),
                stepsize_controller=ctrl,
                adjoint=adjoint,
                max_steps=MAX_STEPS,
            )
            stats = {k: v for k, v in sol.stats.items() if k == "num_steps"}
            return loss(sol.ys), stats

        def fwd(diff):
            value, vjp_fn, stats = jax.vjp(solve, diff, has_aux=True)
            return value, vjp_fn, stats  # vjp_fn is a pytree of residuals: it can leave jit

        def bwd(vjp_fn, value):
            (g,) = vjp_fn(jnp.ones_like(value))
            return g

        self._diff = (field, y0)
        # Tracing + XLA compilation only; the one forward run in between (needed for the
        # residuals' pytree structure) is left out.
        a = time.perf_counter()
        self._fwd = jax.jit(fwd).lower(self._diff).compile()
        b = time.perf_counter()
        value, vjp_fn, _ = jax.block_until_ready(self._fwd(self._diff))
        c = time.perf_counter()
        self._bwd = jax.jit(bwd).lower(vjp_fn, value).compile()
        self.compile_s = (b - a) + (time.perf_counter() - c)
        self._nfe = lambda steps: int(_nfe_forward(solver, ctrl, None, steps))
        self._value = self._vjp = self._grads = None
        self._gq_backward_stats = {}
        if quadrature:
            # What GQ's backward pass did (nodes, error estimate, backward NFE) comes back only through a host
            # callback (`report=`), which costs ~1 ms a call on CPU: the timed backward has none; one untimed
            # gradient with the callback, same inputs (so the same steps and nodes), gives the numbers.
            reports = []
            reporting = dataclasses.replace(adjoint, report=reports.append)
            jax.block_until_ready(jax.jit(jax.grad(lambda d: solve(d, reporting)[0]))(self._diff))
            jax.effects_barrier()
            (rep,) = reports
            self._gq_backward_stats = {"quad_nodes": int(rep["gq_quad_nodes"].sum()),
                                       "quad_err_est": float(rep["gq_quad_error"])}  # fmt: skip
            if "gq_certified" in rep:  # what the rule could not certify (issue 23): recorded per row
                self._gq_backward_stats.update(
                    quad_unconverged=int(rep["gq_quad_unconverged"]),
                    backsolve_fallbacks=int(rep["gq_backsolve_fallbacks"]),
                    certified=bool(rep["gq_certified"]),
                )
            if "gq_nfe_backward" in rep:  # the backward solves' evaluations; quadrature nodes apart
                self._gq_backward_stats["nfe_backward"] = int(rep["gq_nfe_backward"])

    def forward(self):
        import jax

        self._grads = None
        self._value, self._vjp, stats = jax.block_until_ready(self._fwd(self._diff))
        self.nfe_forward = self._nfe(int(stats["num_steps"]))

    def backward(self):
        import jax

        self._grads = jax.block_until_ready(self._bwd(self._vjp, self._value))
        stats = dict(self._gq_backward_stats)
        # diffrax does not report its adjoints' backward steps; GQ's come from the untimed reporting call.
        self.nfe_backward = stats.pop("nfe_backward", float("nan"))
        self.extra = stats

    def loss_value(self):
        return float(self._value)

    def gradients(self):
        import numpy as np

        g_field, g_y0 = self._grads
        return [np.asarray(x, dtype=np.float64) for x in (*self._grad_order(g_field), g_y0)]


# ----------------------------------------------------------------------------- torch -> JAX copies


def _field_from_torch(func, put):
    """A JAX vector field with the torch module's weights, and a function listing a gradient of
    it in `func.parameters()` order."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    from torch import nn

    from .problems import MLP, SecondOrder, _CubicField, _ForcedField, _LinearField

    class JMLP(eqx.Module):
        weights: list
        biases: list
        time_input: bool = eqx.field(static=True)

        def __call__(self, t, y, args=None):
            h = jnp.concatenate([y, jnp.ones_like(y[..., :1]) * t], axis=-1) if self.time_input else y
            for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
                h = h @ w.T + b
                if i < len(self.weights) - 1:
                    h = jax.nn.softplus(h)
            return h

    class JSecondOrder(eqx.Module):
        mlp: JMLP
        dim: int = eqx.field(static=True)

        def __call__(self, t, y, args=None):
            return jnp.concatenate([y[..., self.dim :], self.mlp(t, y)], axis=-1)

    class JCubic(eqx.Module):
        A: jax.Array
        mlp: JMLP

        def __call__(self, t, y, args=None):
            return (y**3) @ self.A + self.mlp(t, y)

    class JForced(eqx.Module):
        mlp: JMLP
        frequency: float = eqx.field(static=True)

        def __call__(self, t, y, args=None):
            return self.mlp(t, jnp.concatenate([y, jnp.ones_like(y[..., :1]) * jnp.sin(self.frequency * t)], -1))

    class JLinear(eqx.Module):
        weight: jax.Array

        def __call__(self, t, y, args=None):
            return y @ self.weight.T

    def mlp(m: MLP) -> JMLP:
        lins = [x for x in m.net if isinstance(x, nn.Linear)]
        if any(not isinstance(x, (nn.Linear, nn.Softplus)) for x in m.net):
            raise ValueError("MLP layers other than Linear/Softplus have no JAX copy here")
        return JMLP([put(x.weight) for x in lins], [put(x.bias) for x in lins], m.time_input)

    def mlp_order(g: JMLP) -> list:
        return [x for pair in zip(g.weights, g.biases, strict=True) for x in pair]

    if isinstance(func, MLP):
        return mlp(func), mlp_order
    if isinstance(func, SecondOrder):
        return JSecondOrder(mlp(func.mlp), func.dim), lambda g: mlp_order(g.mlp)
    if isinstance(func, _CubicField):
        return JCubic(put(func.A), mlp(func.mlp)), lambda g: [g.A, *mlp_order(g.mlp)]
    if isinstance(func, _ForcedField):
        return JForced(mlp(func.mlp), func.frequency), lambda g: mlp_order(g.mlp)
    if isinstance(func, _LinearField):
        return JLinear(put(func.lin.weight)), lambda g: [g.weight]
    raise ValueError(f"no JAX copy of {type(func).__name__}; add one in gqbench.define.jax_methods")


def _loss_from_torch(name: str, inst, put):
    """The problem's loss in jnp, with the data tensors the torch loss closes over."""
    import jax.numpy as jnp

    cells = dict(zip(inst.loss.__code__.co_freevars, inst.loss.__closure__ or (), strict=True))
    data = [put(x) for x in cells["moved"].cell_contents] if "moved" in cells else []
    if name in ("oscillator", "forced_mlp"):
        return lambda ys: jnp.sum(ys**2) / ys.shape[1]
    if name in ("workload_l", "linear"):
        return lambda ys: jnp.sum(ys[-1] ** 2)
    if name in ("g1d", "spheres"):
        (target,) = data
        return lambda ys: jnp.mean((ys[-1, :, 0] - target) ** 2)
    if name == "sines":
        (obs,) = data
        dim = obs.shape[-1]
        return lambda ys: jnp.mean((ys[..., :dim] - obs) ** 2)
    raise ValueError(f"problem {name!r} has no JAX loss; add one in gqbench.define.jax_methods")


for _m in (
    JaxCheckpoint("jax_checkpoint", "diffrax RecursiveCheckpointAdjoint (backprop through the solver)"),
    JaxBacksolve("jax_backsolve", "diffrax BacksolveAdjoint (continuous adjoint)"),
    JaxBacksolve("jax_backsolve_seminorm", "BacksolveAdjoint with adjoint_rms_seminorm", seminorm=True),
    JaxGQ("jax_gq", "impls.jax.GaussLegendreAdjoint (Gauss-Legendre quadrature adjoint)"),
):
    register_method(_m)
