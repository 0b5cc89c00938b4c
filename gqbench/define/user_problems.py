"""A user's own problem, named `"pkg.module:make"` or `"path/to/file.py:make"` wherever a built-in
problem's name is accepted (grid specs, `gqbench run/profile/advise`, `gqbench.Case`). The contract:

    def make(*, width: int, batch: int, seed: int, dtype: torch.dtype, device: torch.device):
        return func, y0, t, loss  # func(t, y): an nn.Module; y0: (batch, ...); t: 1-D; loss(ys) -> scalar

`ys` is the solution at every time in `t` (what `odeint` returns). Gradients are taken with respect to
every parameter of `func` and to y0. Defaults of `width`/`batch` in the signature are the grid's defaults.

Optionally, a training target as a fifth element, `return func, y0, t, loss, target`: either a tensor shaped
like y0 (trained states fit y(t_end) to it in mean squared error) or a callable `train_loss(ys) -> scalar`.
Trained states (`train_steps`, `gqbench advise --train-steps N`) minimise it; without one they fit the
synthetic target of `gqbench.measurement.trained`. Four-element factories stay valid.
A name may instead point at a training problem, an instance of
`gqbench.define.training_problems.AbstractTrainingProblem` (e.g. of an `ODEExperiment` subclass: data,
model, loss, metric): its cases train (`epochs`).

Names resolve against the problem root, `$GQBENCH_PROBLEM_ROOT` or else the working directory: a file
path relative to it, a module importable from it (as `python -m` would). The runner puts its root into
its workers' environment and the Ray executor into its tasks', so a name means the same file in every
process; on a cluster without a shared file system every node needs the file at the same path (as it
needs gqbench at the same commit). Reference gradients are cached under a hash of the file that defines
the factory, so editing the model computes a new reference.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
from pathlib import Path

from .grid import GridSpecError
from .problems import DTYPES, AbstractProblem, ProblemInstance

ROOT_ENV = "GQBENCH_PROBLEM_ROOT"
KEYWORDS = ("width", "batch", "seed", "dtype", "device")
CONTRACT = "make(*, width, batch, seed, dtype, device) -> (func, y0, t, loss[, target])"


class UserProblemError(GridSpecError):
    """A user problem that cannot run; the message is one line saying why and what to fix (the CLI: exit 2)."""


def is_user_problem(name) -> bool:
    return isinstance(name, str) and ":" in name


def problem_root() -> Path:
    return Path(os.environ.get(ROOT_ENV) or os.getcwd())


def _split(name: str) -> tuple[str, str, bool]:
    """-> (module or path, attribute, is a file path)."""
    source, _, attr = name.rpartition(":")
    if not source or not attr.isidentifier():
        raise UserProblemError(
            f"problem {name!r} is not 'pkg.module:make' or 'path/to/file.py:make'; write the factory's name after ':'"
        )
    is_file = source.endswith(".py") or "/" in source or os.sep in source
    if not is_file and not all(part.isidentifier() for part in source.split(".")):
        raise UserProblemError(f"problem {name!r}: {source!r} is neither a module name nor a .py file path")
    return source, attr, is_file


def source_file(name: str) -> Path:
    """The file that defines the factory of `name`."""
    source, _, is_file = _split(name)
    if is_file:
        path = Path(source).expanduser()
        path = path if path.is_absolute() else problem_root() / path
        if not path.is_file():
            raise UserProblemError(
                f"problem {name!r}: {path} does not exist; give the path relative to the working directory "
                f"({problem_root()}) or an absolute one"
            )
        return path.resolve()
    with _root_on_path():
        try:
            spec = importlib.util.find_spec(source)
        except (ImportError, ValueError) as exc:
            spec, why = None, f"{type(exc).__name__}: {exc}"
        else:
            why = "no such module"
    if spec is None or not spec.origin or not Path(spec.origin).is_file():
        raise UserProblemError(
            f"problem {name!r}: cannot import {source!r} from {problem_root()} ({why}); run from the folder that "
            "holds the package, pip install it, or add its folder to PYTHONPATH"
        )
    return Path(spec.origin).resolve()


def fingerprint(name: str) -> str:
    """12 hex digits of sha256(name, the defining file's bytes): changes when the user edits the file."""
    digest = hashlib.sha256(name.encode() + b"\0" + source_file(name).read_bytes())
    return digest.hexdigest()[:12]


def cache_name(name: str) -> str:
    """A file-name-safe stem for caches keyed on this problem and its file's contents."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")[-60:]
    return f"user-{slug}-{fingerprint(name)}"


class _root_on_path:
    """The problem root at the front of sys.path while importing, as `python -m` puts the working directory."""

    def __enter__(self):
        self.root = str(problem_root())
        self.added = self.root not in sys.path
        if self.added:
            sys.path.insert(0, self.root)

    def __exit__(self, *exc):
        if self.added and self.root in sys.path:
            sys.path.remove(self.root)


@functools.cache
def _load(name: str, root: str, stamp: tuple):
    """The object `name` names (imported once per root and file version)."""
    source, attr, is_file = _split(name)
    path = source_file(name)
    try:
        if is_file:
            mod_name = f"gqbench_user_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}_{path.stem}"
            spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module  # dataclasses and pickling look the module up by name
            spec.loader.exec_module(module)
        else:
            with _root_on_path():
                module = importlib.import_module(source)
    except Exception as exc:  # noqa: BLE001 -- any import failure is the user's to fix: one line
        what = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        raise UserProblemError(f"problem {name!r}: importing {path} raised {what}; fix the module") from None
    if not hasattr(module, attr):
        raise UserProblemError(f"problem {name!r}: {path} defines no {attr!r}; define {CONTRACT}")
    return getattr(module, attr)


def load_object(name: str):
    """What `name` names, imported once per process (again after its file changes)."""
    path = source_file(name)
    stat = path.stat()
    return _load(name, str(problem_root()), (str(path), stat.st_mtime_ns, stat.st_size))


def load_factory(name: str):
    """The gradient problem's factory `name` names, its signature checked against the contract."""
    factory = load_object(name)
    if training_problem(name) is not None:
        raise UserProblemError(f"problem {name!r} is a training problem; give it epochs (e.g. epochs = [10])")
    if not callable(factory):
        raise UserProblemError(f"problem {name!r}: it is a {type(factory).__name__}, not a function; define "
                               f"{CONTRACT}")  # fmt: skip
    _check_signature(name, factory)
    return factory


def training_problem(name: str):
    """The user's training problem `name` names (an instance of `AbstractTrainingProblem`, e.g.
    of an `ODEExperiment` subclass: data, model, loss, metric), or None when it names something else."""
    from .training_problems import AbstractTrainingProblem

    obj = load_object(name)
    return obj if isinstance(obj, AbstractTrainingProblem) else None


def _check_signature(name: str, factory) -> None:
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return  # a builtin or C callable: its call will tell
    params = sig.parameters.values()
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    takes = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    missing = [k for k in KEYWORDS if k not in takes and not var_kw]
    extra = [p.name for p in params if p.name not in KEYWORDS and p.default is p.empty
             and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]  # fmt: skip
    if missing or extra:
        why = f"does not take {', '.join(missing)}" if missing else f"requires {', '.join(extra)}"
        raise UserProblemError(f"problem {name!r}: {factory.__name__}{sig} {why}; the contract is {CONTRACT}")


def signature_defaults(name: str) -> dict:
    """{"width": ..., "batch": ...} from the factory's own defaults, where it has them."""
    factory = load_factory(name)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin or C callable
        return {}
    return {
        k: params[k].default for k in ("width", "batch") if k in params and params[k].default is not params[k].empty
    }


@dataclasses.dataclass(frozen=True)
class UserProblem(AbstractProblem):
    """A user's factory in the problem registry's shape; `get_problem("pkg.module:make")` returns one."""

    state_dim: int = 0  # unknown until built
    default_batch: int | None = None
    default_width: int | None = None

    @classmethod
    def named(cls, name: str) -> UserProblem:
        d = signature_defaults(name)
        return cls(name, f"user problem ({source_file(name)})", default_batch=d.get("batch"),
                   default_width=d.get("width"))  # fmt: skip

    def build(self, *, width, batch=None, dtype="float32", device="cpu", seed=0) -> ProblemInstance:
        import torch

        batch = self.default_batch if batch is None else batch
        if batch is None:
            raise UserProblemError(f"problem {self.name!r}: no batch given and make() has no default; give batch")
        kw = dict(width=width, batch=batch, seed=seed, dtype=DTYPES[dtype], device=torch.device(device))
        call = f"{self.name}({', '.join(f'{k}={v}' for k, v in kw.items())})"
        factory = load_factory(self.name)
        try:
            with torch.random.fork_rng(devices=[]):  # the user's seeding stays inside the call
                torch.manual_seed(seed)
                out = factory(**kw)
        except Exception as exc:  # noqa: BLE001 -- the user's code: one line naming the call
            raise UserProblemError(f"{call} raised {type(exc).__name__}: {' '.join(str(exc).split())[:300]}; "
                                   "fix make so that this call works") from None  # fmt: skip
        if not isinstance(out, (tuple, list)) or len(out) not in (4, 5):
            got = f"a {type(out).__name__}" + (f" of {len(out)}" if isinstance(out, (tuple, list)) else "")
            raise UserProblemError(f"{call} returned {got}; return the 4-tuple (func, y0, t, loss) or the 5-tuple "
                                   "(func, y0, t, loss, target)")  # fmt: skip
        func, y0, t, loss, *target = out
        return ProblemInstance(func=func, y0=y0, t=t, loss=loss, target=target[0] if target else None)

    def _make(self, *, width, batch, gen):  # build() calls the user's factory instead
        raise NotImplementedError


def check(name: str, *, width: int, batch: int | None, dtype: str, device: str, seed: int = 0) -> None:
    """Build the problem and test the contract: shapes, dtypes, a scalar loss that depends on ys, parameters
    that require grad. Raises `UserProblemError` (one line naming the fix); the runner calls it in a fresh
    worker before any case starts."""
    import torch
    from torch import nn

    problem = UserProblem.named(name)
    inst = problem.build(width=width, batch=batch, dtype=dtype, device=device, seed=seed)
    batch = problem.default_batch if batch is None else batch
    where = f"{name} (width={width}, batch={batch}, dtype={dtype})"

    def fail(why_and_fix: str):
        raise UserProblemError(f"{where}: {why_and_fix}")

    func, y0, t, loss = inst.func, inst.y0, inst.t, inst.loss
    want = DTYPES[dtype]
    if not isinstance(func, nn.Module):
        fail(f"func is a {type(func).__name__}, not an nn.Module; wrap the vector field in an nn.Module "
             "so its parameters can be found")  # fmt: skip
    params = dict(func.named_parameters())
    if not params:
        fail("func has no parameters; a gradient method needs parameters to differentiate (nn.Parameter)")
    frozen = [n for n, p in params.items() if not p.requires_grad]
    if frozen:
        fail(f"parameters {', '.join(frozen[:5])} do not require grad; set requires_grad=True, or keep "
             "constants as buffers (register_buffer)")  # fmt: skip
    wrong = [n for n, p in params.items() if p.dtype != want]
    if wrong:
        fail(f"parameter {wrong[0]} is {p_dtype(params[wrong[0]])} for dtype={dtype}; build func with "
             "dtype=dtype (or call func.to(dtype=dtype, device=device))")  # fmt: skip
    for label, x in (("y0", y0), ("t", t)):
        if not isinstance(x, torch.Tensor):
            fail(f"{label} is a {type(x).__name__}; return a torch.Tensor")
        if x.dtype != want:
            fail(f"{label} is {p_dtype(x)} for dtype={dtype}; create it with dtype=dtype")
    if y0.ndim < 1 or y0.shape[0] != batch:
        fail(f"y0 has shape {tuple(y0.shape)} for batch={batch}; make it (batch, ...)")
    target = inst.target
    if target is not None and not callable(target):
        if not isinstance(target, torch.Tensor) or target.shape != y0.shape:
            got = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
            fail(f"target is {got} for y0 of shape {tuple(y0.shape)}; return a tensor shaped like y0 (y(t_end) "
                 "is fitted to it) or a callable train_loss(ys) -> scalar")  # fmt: skip
    if t.ndim != 1 or len(t) < 2:
        fail(f"t has shape {tuple(t.shape)}; give a 1-D tensor of at least 2 observation times")
    steps = t[1:] - t[:-1]
    if not (bool((steps > 0).all()) or bool((steps < 0).all())):
        fail("t is not strictly increasing or decreasing; sort the observation times and drop repeats")
    try:
        with torch.no_grad():
            dy = func(t[0], y0)
    except Exception as exc:  # noqa: BLE001 -- the user's code: one line
        fail(f"func(t[0], y0) raised {type(exc).__name__}: {' '.join(str(exc).split())[:200]}; "
             "func must take (t, y) as torchdiffeq calls it")  # fmt: skip
    if not isinstance(dy, torch.Tensor) or dy.shape != y0.shape:
        got = tuple(dy.shape) if isinstance(dy, torch.Tensor) else type(dy).__name__
        fail(f"func(t, y0) returned {got} for y0 of shape {tuple(y0.shape)}; return dy/dt shaped like y")
    ys = y0.detach().expand(len(t), *y0.shape).clone().requires_grad_(True)
    try:
        value = loss(ys)
    except Exception as exc:  # noqa: BLE001
        fail(f"loss(ys) raised {type(exc).__name__}: {' '.join(str(exc).split())[:200]} for ys of shape "
             f"{tuple(ys.shape)} (len(t), *y0.shape); loss takes what odeint returns")  # fmt: skip
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        fail(f"loss(ys) returned {got}, not a scalar tensor; reduce it (e.g. .sum() or .mean())")
    if not value.requires_grad:
        fail("loss(ys) does not depend on ys (no gradient path); compute it from ys with torch operations")


def p_dtype(x) -> str:
    return str(x.dtype).replace("torch.", "")
