"""Method registry: a name -> an `AbstractMethod` whose `build` returns a ready-to-time `AbstractRun`.

Modules stay import-light: torch (or jax) is imported inside `build`, so listing or expanding a
grid never loads a backend, and a torch case never loads jax.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from .case import Case
    from .problems import ProblemInstance

PLUGINS_ENV = "GQBENCH_PLUGINS"  # comma-separated modules imported for their register_method calls
# gqbench's own method modules beyond this one, imported on first look-up (e.g. the JAX methods);
# each must import its backend inside build(), not at module level.
BUILTIN_MODULES: tuple[str, ...] = ("gqbench.define.jax_methods",)


class Unsupported(Exception):
    """The case cannot run here (also `gqbench.Skip`): `build` raises it when the method cannot solve the
    built problem (a tuple state, say); the case becomes a `skipped` row."""


class AbstractRun(abc.ABC):
    """One built case. `forward()` and `backward()` each return only after the device is idle.

    After `backward()`: `nfe_forward`/`nfe_backward` describe the last call, `gradients()` gives
    d loss / d(params..., y0) as float64 numpy arrays in `ProblemInstance.params` order, then y0.
    """

    nfe_forward: int = 0
    nfe_backward: int = 0
    compile_s: float = float("nan")  # JAX: tracing + compilation, measured apart from the timed calls
    extra: dict[str, Any]  # further per-repeat columns, e.g. {"quad_nodes": 12}

    @abc.abstractmethod
    def forward(self) -> None: ...

    @abc.abstractmethod
    def backward(self) -> None: ...

    @abc.abstractmethod
    def loss_value(self) -> float: ...

    @abc.abstractmethod
    def gradients(self) -> list: ...


@dataclasses.dataclass(frozen=True)
class AbstractMethod(abc.ABC):
    """`quadrature=True`: the grid's gtol/quad_order/backward_state axes apply to this method."""

    name: str
    description: str
    backend: ClassVar[str] = "torch"
    quadrature: ClassVar[bool] = False
    warm_starts: ClassVar[bool] = False  # the warm_start axis applies (torch_gq only)
    needs_reference: ClassVar[bool] = True  # False: no gradient error column (test stubs)

    def unsupported(self, case: Case) -> str | None:
        """Why this method cannot run `case` here (-> a `skipped` row), or None. Must stay cheap."""
        if case.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                return "device=cuda but torch.cuda.is_available() is False on this machine"
        return None

    def preload(self, case: Case) -> None:
        """Import what `build` will need. The runner's workers call it while a process set starts up together
        (imports side by side, nothing timed yet), so each worker's one-at-a-time set-up is short."""
        import torch

        import impls  # noqa: F401 -- the torch methods' adapters (torchdiffeq, scipy under it)

        x = torch.ones(1, requires_grad=True)  # torch's first autograd.grad with grad_outputs imports sympy (~0.3 s)
        torch.autograd.grad(x * x, x, torch.ones(1))

    @abc.abstractmethod
    def build(self, *, case: Case, problem: ProblemInstance) -> AbstractRun:
        """Set up (move data, wrap func, compile) so that the next forward()/backward() is timed work."""


class _TorchRun(AbstractRun):
    """Shared by the torch methods: `solve(func, y0, t)` differs, the rest is the same."""

    def __init__(self, problem: ProblemInstance, solve, device: str, count: bool):
        import impls

        self._impls = impls
        self.problem = problem
        self.solve = solve
        self.device = device
        # Baselines: count f calls by wrapping; GQ reports its own counts through gq_stats.
        self.func = impls.NFECounter(problem.func) if count else problem.func
        self.y0 = problem.y0.detach().clone().requires_grad_(True)
        self.params = problem.params
        self.extra = {}
        self._loss = None
        self._stats = None

    def forward(self):
        for p in (*self.params, self.y0):
            p.grad = None
        if isinstance(self.func, self._impls.NFECounter):
            self.func.nfe = 0
            ys = self.solve(self.func, self.y0, self.problem.t)
            self.nfe_forward = self.func.nfe
        else:
            with self._impls.gq_stats() as self._stats:
                ys = self.solve(self.func, self.y0, self.problem.t)
            self.nfe_forward = self._stats.nfe_forward
        self._loss = self.problem.loss(ys)
        self._impls.synchronize(self.device)

    def backward(self):
        self._loss.backward()
        self._impls.synchronize(self.device)
        if self._stats is None:
            self.nfe_backward = self.func.nfe - self.nfe_forward
        else:
            self.nfe_backward = self._stats.nfe_backward
            st = self._stats
            self.extra = {"quad_nodes": st.quad_nodes, "quad_err_est": st.quad_error,
                          "quad_unconverged": st.quad_unconverged, "backsolve_fallbacks": st.backsolve_fallbacks,
                          "certified": st.certified}  # fmt: skip

    def loss_value(self):
        return float(self._loss.detach())

    def gradients(self):
        import torch

        out = []
        for p in (*self.params, self.y0):
            g = torch.zeros_like(p) if p.grad is None else p.grad
            out.append(g.detach().to("cpu", torch.float64).numpy())
        return out


def _tols(case: Case) -> dict:
    return dict(rtol=case.rtol, atol=case.atol, method=case.solver)


@dataclasses.dataclass(frozen=True)
class TorchBaseline(AbstractMethod):
    """A torchdiffeq baseline: `solve` names the adapter in `impls` (odeint_direct, odeint_adjoint, ...)."""

    solve: str = "odeint_direct"
    needs: str | None = None  # a module the adapter imports (TorchDiffEqPack): skipped rows without it
    install: str = "pip install the [mali] extra"  # how to get `needs`, for the skipped row's reason

    def unsupported(self, case):
        import importlib.util

        if self.needs and importlib.util.find_spec(self.needs) is None:
            return f"{self.name} needs {self.needs}; {self.install}"
        return super().unsupported(case)

    def solver(self, case: Case):
        """`solve(func, y0, t)` with the case's solver settings (also what training runs call)."""
        import impls

        solve = getattr(impls, self.solve)
        return lambda f, y0, t: solve(f, y0, t, **_tols(case))

    def build(self, *, case, problem):
        return _TorchRun(problem, self.solver(case), case.device, True)


@dataclasses.dataclass(frozen=True)
class TorchGQ(AbstractMethod):
    quadrature: ClassVar[bool] = True
    warm_starts: ClassVar[bool] = True

    def solver(self, case: Case):
        """`solve(func, y0, t)`: GQ with the case's quadrature settings (also what training runs call)."""
        import impls

        kw = dict(_tols(case), backward_state=case.backward_state or "auto")
        if case.warm_start is not None:  # None: the implementation's default (on)
            kw["warm_start"] = bool(case.warm_start)
        if case.quadrature == "fixed" or (case.quadrature is None and case.quad_order is not None):
            kw["quad_order"] = case.quad_order
        elif case.quadrature == "gtol" or (case.quadrature is None and case.gtol is not None):
            kw["gtol"] = case.gtol
        return lambda f, y0, t: impls.odeint_adjoint_gq(f, y0, t, **kw)

    def build(self, *, case, problem):
        return _TorchRun(problem, self.solver(case), case.device, False)


class _TorchodeRun(_TorchRun):
    """A torchode solve (`impls.TorchodeSolver`): NFE from the solver, per sample as well as batched."""

    def __init__(self, problem: ProblemInstance, solver, device: str):
        super().__init__(problem, solver, device, False)
        self.extra = {"nfe_fwd_max": float("nan"), "nfe_fwd_mean": float("nan"), "nfe_bwd_mean": float("nan")}

    def forward(self):
        for p in (*self.params, self.y0):
            p.grad = None
        ys = self.solve(self.func, self.y0, self.problem.t)
        self.nfe_forward = self.solve.stats.nfe_forward
        self._loss = self.problem.loss(ys)
        self._impls.synchronize(self.device)

    def backward(self):
        self._loss.backward()
        self._impls.synchronize(self.device)
        s = self.solve.after_backward()
        self.nfe_backward = s.nfe_backward
        # nfe_fwd (= nfe_fwd_max) counts batched calls, i.e. the slowest sample's; *_mean what each sample's steps took
        self.extra = {"nfe_fwd_max": s.nfe_forward, "nfe_fwd_mean": s.nfe_forward_mean,
                      "nfe_bwd_mean": s.nfe_backward_mean}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Torchode(AbstractMethod):
    """torchode's batch-parallel solver (`impls.TorchodeSolver`): per-sample step sizes, AutoDiffAdjoint or
    BacksolveAdjoint, optionally under torch.compile (compile time -> `compile_s`, apart from the timed calls)."""

    adjoint: str = "autodiff"
    compile: bool = False
    # BacksolveAdjoint carries each sample's parameter adjoint in its state (batch x parameters numbers; its peak
    # measured ~29x that in bytes of float32 at workload L w=200 batch 200, vmapped per-sample VJPs included): above
    # this share of the machine's memory the case is skipped, not swapped or killed.
    memory_share: ClassVar[float] = 0.5

    def unsupported(self, case):
        import importlib.util

        from impls._torchode import STEP_METHODS

        if importlib.util.find_spec("torchode") is None:
            return f"{self.name} needs torchode; pip install the [torchode] extra"
        if case.solver not in STEP_METHODS:
            return f"solver {case.solver!r} has no torchode counterpart here (have {', '.join(STEP_METHODS)})"
        return super().unsupported(case)

    def preload(self, case):
        super().preload(case)
        import torchode  # noqa: F401

    def solver(self, case: Case):
        """`solve(func, y0, t)` (an `impls.TorchodeSolver`, reused across calls: a compiled solve stays compiled)."""
        import impls

        return impls.TorchodeSolver(**_tols(case), adjoint=self.adjoint, compile=self.compile)

    def build(self, *, case, problem):
        import time

        reason = _torchode_unfit(problem, self)
        if reason:
            raise Unsupported(f"{self.name}: {reason}")
        run = _TorchodeRun(problem, self.solver(case), case.device)
        if self.compile:  # compile now (first call), and report it apart: its time beyond a compiled call's
            a = time.perf_counter()
            run.forward()
            run.backward()
            b = time.perf_counter()
            run.forward()
            run.backward()
            run.compile_s = max(0.0, 2 * b - a - time.perf_counter())
        return run


def _torchode_unfit(problem: ProblemInstance, method: Torchode) -> str | None:
    """Why torchode cannot solve this problem (one line), or None: a tensor state with a batch dimension first,
    a func that takes one time per sample and treats samples independently, and (backsolve) per-sample
    parameter adjoints that fit in memory."""
    import torch

    y0, t = problem.y0, problem.t
    if not torch.is_tensor(y0):
        return "the state is not one tensor (tuple states); torchode solves a (batch, features) tensor"
    if y0.dim() < 1:
        return "y0 is 0-d: torchode needs a batch dimension first"
    batch, shape = y0.shape[0], tuple(y0.shape[1:])
    with torch.no_grad():
        try:
            one = problem.func(t[0], y0)
            each = problem.func(t[0].expand(batch).reshape(batch, *(1,) * len(shape)), y0)
            alone = problem.func(t[0], y0[:1])
        except Exception as exc:  # noqa: BLE001 -- the user's func: any failure, in one line
            msg = " ".join(str(exc).split())[:200]
            return f"func(t, y) with per-sample times t of shape (batch, 1, ...) raised {type(exc).__name__}: {msg}"
    if one.shape != each.shape or not torch.allclose(one, each):
        return "func(t, y) does not take per-sample times t of shape (batch, 1, ...), as torchode steps each sample"
    if not torch.allclose(one[:1], alone):
        return "func(t, y) couples the samples of a batch; torchode steps (and backsolves) each sample on its own"
    if method.adjoint == "backsolve":
        import os

        n = sum(p.numel() for p in problem.params) + 2 * y0[0].numel() + 1
        need = 30 * batch * n * y0.element_size()
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if need > method.memory_share * have:
            return (f"BacksolveAdjoint's per-sample parameter adjoints need ~{need / 2**30:.1f} GiB "
                    f"(batch {batch} x {n} numbers x 30), over {method.memory_share:.0%} of this machine's "
                    f"{have / 2**30:.0f} GiB")  # fmt: skip
    return None


@dataclasses.dataclass(frozen=True)
class TrainingOnly(AbstractMethod):
    """A method that only trains (`gqbench.training`): torchsde's solvers on the SDE problems."""

    needs_reference: ClassVar[bool] = False

    def unsupported(self, case):
        if case.epochs is None:
            return f"{self.name} runs training cases only (a training problem such as sde_ou, with epochs)"
        return super().unsupported(case)

    def build(self, *, case, problem):
        raise NotImplementedError(f"{self.name} has no single-gradient measurement; it runs training cases only")


class _Registry(Mapping):
    """name -> method; plugin modules (env GQBENCH_PLUGINS) are imported on first look-up."""

    def __init__(self):
        self._methods: dict[str, AbstractMethod] = {}
        self._plugins_loaded = False

    def _load_plugins(self):
        if not self._plugins_loaded:
            self._plugins_loaded = True
            env = [m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",")]
            for mod in (*BUILTIN_MODULES, *filter(None, env)):
                importlib.import_module(mod)

    def add(self, method: AbstractMethod, replace: bool = False):
        if method.name in self._methods and not replace:
            raise ValueError(f"method {method.name!r} is already registered; pass replace=True to override it")
        self._methods[method.name] = method

    def __getitem__(self, name: str) -> AbstractMethod:
        self._load_plugins()
        try:
            return self._methods[name]
        except KeyError:
            raise KeyError(f"unknown method {name!r}; known methods: {', '.join(self)}") from None

    def __iter__(self) -> Iterator[str]:
        self._load_plugins()
        return iter(self._methods)

    def __len__(self) -> int:
        self._load_plugins()
        return len(self._methods)


METHODS = _Registry()


def register_method(method: AbstractMethod, *, replace: bool = False) -> AbstractMethod:
    """Add `method` under `method.name`. A worker process finds it if its module is imported by
    gqbench itself or listed in the GQBENCH_PLUGINS environment variable."""
    METHODS.add(method, replace=replace)
    return method


def get_method(name: str) -> AbstractMethod:
    return METHODS[name]


for _m in (
    TorchBaseline("torch_direct", "torchdiffeq.odeint + autograd through the solver steps", "odeint_direct"),
    TorchBaseline("torch_adjoint", "torchdiffeq.odeint_adjoint (continuous adjoint)", "odeint_adjoint"),
    TorchBaseline("torch_seminorm", "odeint_adjoint with adjoint_options=dict(norm='seminorm')", "odeint_seminorm"),
    TorchGQ("torch_gq", "impls.odeint_adjoint_gq (Gauss-Legendre quadrature adjoint)"),
    TorchBaseline("torch_mali", "MALI, reversible leapfrog (TorchDiffEqPack)", "odeint_mali", "TorchDiffEqPack"),
    TorchBaseline("torch_aca", "ACA, adaptive checkpoint adjoint (TorchDiffEqPack)", "odeint_aca", "TorchDiffEqPack"),
    TorchBaseline(
        "torch_paper_gq",
        "the paper's own GQ adjoint (a-norcliffe/torch_gq_adjoint, gtol 0.1), unmodified",
        "odeint_paper_gq",
        "torch_gq_adjoint",
        "git clone https://github.com/a-norcliffe/torch_gq_adjoint and add the checkout to PYTHONPATH",
    ),
    Torchode("torchode_autodiff", "torchode AutoDiffAdjoint (backprop through its per-sample solver steps)"),
    Torchode("torchode_backsolve", "torchode BacksolveAdjoint (continuous adjoint, per-sample)", "backsolve"),
    Torchode(
        "torchode_autodiff_compiled",
        "torchode AutoDiffAdjoint, its step under torch.compile (compile time in compile_s)",
        compile=True,
    ),
    TrainingOnly("sde_direct", "torchsde.sdeint, reversible Heun, backprop through the steps (SDE training)"),
    TrainingOnly("sde_adjoint", "torchsde.sdeint_adjoint, adjoint reversible Heun (SDE training)"),
):
    register_method(_m)
