"""Grid specs (TOML) -> frozen `Case`s.

A spec has optional `name`/`description`, a `[run]` table (repeats, processes, warmup, timeout,
reference_timeout), an `[axes]` table of defaults and any number of `[[grid]]` tables. Each grid
is `axes` updated by its own keys, expanded as a cross product; the spec is the union of its
grids (duplicates dropped), so a preset can cross everything at small widths and only a few
points at large ones. Without `[[grid]]`, `[axes]` alone is the grid.

Rules:
- `rtol`/`atol`: `tolerances = "paired"` (default) zips them (equal lengths; `atol` defaults to
  `rtol`), `"crossed"` crosses them.
- Quadrature axes (`quadrature`, `gtol`, `quad_order`, `backward_state`, `warm_start`) apply only to
  methods declaring `quadrature=True` (torch_gq, jax_gq); other methods get them as None, once.
  `quadrature` lists the rules: "adaptive" (error-controlled, the default), "gtol" (the paper's rule:
  one case per gtol value), "fixed" (one case per quad_order value). Without a `quadrature` axis, a
  spec that names `gtol` or `quad_order` runs those rules beside "adaptive".
- `batch` omitted: each problem's default batch; `width` omitted: each problem's default width.
- `problem` also takes a user's factory, "pkg.module:make" or "path/to/file.py:make"
  (`gqbench.define.user_problems`): it is imported here, so a bad path stops the spec; its signature's
  defaults of width and batch are the defaults.
- Training problems (`gqbench.define.training_problems`, e.g. sde_ou, images): every case trains for
  `epochs` (default: the problem's) with Adam at `lr` (default: the problem's, on problems that take it from the case);
  `ncosines` (Wong–Zakai noise terms) applies to torch_gq on SDE problems only. All three are None on
  gradient problems. A name that is both (g1d, spheres, sines) trains only when the spec gives `epochs`.
- `train_steps` (gradient problems; default [0], the initial weights): each value N > 0 times every method's
  gradient at the weights after N steps of one fixed training recipe (`gqbench.measurement.trained`:
  direct backprop, Adam, the problem's task or a synthetic target), trained once per (problem, width,
  batch, seed, steps, dtype) and cached beside the references; the reference gradient is taken there too.
- `weights` (set by `gqbench advise --weights FILE`): a user's state_dict, by the hash of its file, that
  cases start from instead of the seed's initial weights (then `train_steps` train on from them).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import tomllib
from importlib import resources
from pathlib import Path

from .case import CASE_FIELDS, Case

AXES = CASE_FIELDS  # every field of a Case is a grid axis
AXIS_OPTIONS = ("tolerances",)
RUN_KEYS = ("repeats", "processes", "warmup", "rewarm", "timeout", "reference_timeout")
INTEGER_RUN_KEYS = ("repeats", "processes", "warmup", "rewarm")
TOP_KEYS = ("name", "description", "run", "axes", "grid")
DEFAULT_AXES = dict(
    rtol=[1e-6],
    quadrature=["adaptive"],
    gtol=[0.1],
    backward_state=["auto"],  # odeint_adjoint_gq's default
    warm_start=[True],  # odeint_adjoint_gq's default
    solver=["dopri5"],
    device=["cpu"],
    dtype=["float32"],
    seed=[0],
    threads=[2],
    train_steps=[0],
)
SOLVERS = ("dopri5", "dopri8", "bosh3", "adaptive_heun", "fehlberg2")  # adaptive: tolerances mean something
BACKWARD_STATES = ("auto", "backsolve", "interpolate")  # "auto": the implementation's default
QUADRATURES = ("adaptive", "gtol", "fixed")
DEFAULT_NCOSINES = 10  # the paper's Wong–Zakai noise terms
DTYPES = ("float32", "float64")


class GridSpecError(ValueError):
    """A malformed spec; the message is one line naming the key and the fix."""


@dataclasses.dataclass(frozen=True)
class RunSettings:
    repeats: int = 3  # timed rounds per process
    # Fresh worker processes per case, one after another (each with its own warm-up and rounds): a
    # process's heap history shifts its times by up to ~20% on CPU, so an interval that is to hold on
    # a rerun (a new process) must see several. Intervals are then taken over processes.
    processes: int = 1
    warmup: int = 1
    # Untimed calls a method makes in each round just before its timed one, so no timed call is the first
    # after another process ran (a training loop runs one method). That first call was 10% slower for
    # torchdiffeq's adjoint in one test and not in another (benchmarks/interference.py); one call rules it out.
    rewarm: int = 1
    timeout: float = 120.0  # seconds per case (worker start-up included)
    reference_timeout: float = 600.0  # seconds for one float64 reference gradient

    def replace(self, **changes) -> RunSettings:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclasses.dataclass(frozen=True)
class GridSpec:
    name: str
    description: str
    settings: RunSettings
    cases: tuple[Case, ...]
    source: dict  # the parsed TOML, stored with the results


def list_presets() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("gqbench.define.presets").iterdir() if p.name.endswith(".toml"))


def load_preset(name: str) -> GridSpec:
    if name not in list_presets():
        raise GridSpecError(f"unknown preset {name!r}; choose one of: {', '.join(list_presets())}")
    text = resources.files("gqbench.define.presets").joinpath(f"{name}.toml").read_text()
    return parse_spec(_parse_toml(text, f"preset {name}"), source=f"preset {name}", default_name=name)


def load_spec(path: str | Path) -> GridSpec:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise GridSpecError(f"{path}: cannot read the grid spec ({exc.strerror}); check the path") from None
    return parse_spec(_parse_toml(text, str(path)), source=str(path), default_name=path.stem)


def _parse_toml(text: str, where: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise GridSpecError(f"{where}: not valid TOML ({exc}); fix the syntax there") from None


def parse_spec(
    data: dict, *, source: str = "<spec>", default_name: str = "grid", threads: int | None = None
) -> GridSpec:
    """Validate and expand a parsed spec. `threads` overrides the spec's threads axis."""
    for key in data:
        if key not in TOP_KEYS:
            _fail(source, key, f"is not a spec key; use {', '.join(TOP_KEYS)}")
    run = _table(data, "run", source)
    for key in run:
        if key not in RUN_KEYS:
            _fail(source, f"run.{key}", f"is not a run setting; use {', '.join(RUN_KEYS)}")
    settings = RunSettings(
        **{
            k: _positive(source, f"run.{k}", v, integer=k in INTEGER_RUN_KEYS, zero_ok=k in ("warmup", "rewarm"))
            for k, v in run.items()
        }
    )
    axes = _table(data, "axes", source)
    grids = data.get("grid", [{}])
    if not isinstance(grids, list) or not all(isinstance(g, dict) for g in grids):
        _fail(source, "grid", "must be an array of tables: write [[grid]] above each block")
    if not grids:
        grids = [{}]
    cases: dict[str, Case] = {}
    for i, grid in enumerate(grids):
        where = f"{source} [[grid]] #{i + 1}" if "grid" in data else f"{source} [axes]"
        merged = dict(axes, **grid)
        if threads is not None:
            merged["threads"] = [threads]
        for case in _expand(merged, where):
            cases.setdefault(case.case_id, case)
    if not cases:
        _fail(source, "method", "the grid expands to no cases; give every axis at least one value")
    # Training runs of one seed and width run back to back, method after method, so that drift on a shared
    # machine spreads over every method instead of going into their ratio.
    order = sorted(cases.values(), key=lambda c: (0, 0, 0) if c.epochs is None else (1, c.seed, c.width))
    name = data.get("name", default_name)
    return GridSpec(
        name=str(name),
        description=str(data.get("description", "")),
        settings=settings,
        cases=tuple(order),
        source=data,
    )


def _expand(axes: dict, where: str) -> list[Case]:
    from .methods import METHODS, TrainingOnly
    from .problems import PROBLEMS
    from .training_problems import TRAINING_PROBLEMS
    from .user_problems import UserProblem, UserProblemError, is_user_problem, training_problem

    for key in axes:
        if key not in AXES + AXIS_OPTIONS:
            hint = " (did you mean 'rtol'/'atol'?)" if key in ("tol", "tols", "tolerance") else ""
            _fail(where, key, f"is not an axis{hint}; use {', '.join(AXES + AXIS_OPTIONS)}")
    ax = {k: _as_list(where, k, v) for k, v in axes.items() if k in AXES}
    for key, default in DEFAULT_AXES.items():
        ax.setdefault(key, default)
    for key in ("method", "problem"):
        if key not in ax:
            _fail(where, key, f"is missing; add e.g. {key} = [{_example(key)}]")
    _choices(where, "method", ax["method"], list(METHODS))
    # A user's "pkg.module:make" / "file.py:make" (or a training problem instance): imported here, so a bad one
    # stops the spec.
    user, user_training = {}, {}
    for name in ax["problem"]:
        if is_user_problem(name):
            try:
                if (trainer := training_problem(name)) is not None:
                    user_training[name] = trainer
                else:
                    user[name] = UserProblem.named(name)
            except UserProblemError as exc:
                raise GridSpecError(f"{where}: {exc}") from None
    known = list(dict.fromkeys([*PROBLEMS, *TRAINING_PROBLEMS]))
    _choices(where, "problem", [p for p in ax["problem"] if not is_user_problem(p)], known + ["'pkg.module:make'"])
    _choices(where, "backward_state", ax["backward_state"], BACKWARD_STATES)
    _choices(where, "quadrature", ax["quadrature"], QUADRATURES)
    for v in ax["warm_start"]:
        if not isinstance(v, bool):
            _fail(where, "warm_start", f"value {v!r} is not a boolean; use true or false")
    _choices(where, "solver", ax["solver"], SOLVERS)
    _choices(where, "dtype", ax["dtype"], DTYPES)
    for d in ax["device"]:
        if not isinstance(d, str) or not (d == "cpu" or d == "cuda" or d.startswith("cuda:")):
            _fail(where, "device", f'value {d!r} is not a device; use "cpu", "cuda" or "cuda:N"')
    for key in ("width", "batch", "seed", "threads", "quad_order", "epochs", "ncosines", "train_steps"):
        for v in ax.get(key, []):
            _positive(where, key, v, integer=True, zero_ok=key in ("seed", "train_steps"))
    for v in ax.get("weights", []):
        if not isinstance(v, str) or (v and not re.fullmatch(r"[0-9a-f]{16}", v)):
            _fail(where, "weights", f"value {v!r} is not a weights hash; `gqbench advise --weights FILE` sets it "
                  "(16 hex digits of the file's sha256, the file copied to the references folder)")  # fmt: skip
    for v in ax.get("quad_order", []):
        if v > 64:
            _fail(where, "quad_order", f"value {v} is above 64; use 1..64 nodes per interval")
    for key in ("rtol", "atol", "gtol", "lr"):
        for v in ax.get(key, []):
            _positive(where, key, v)
    tols = _tolerances(where, ax, axes.get("tolerances", "paired"))
    rules = (
        ax["quadrature"]
        if "quadrature" in axes
        else (["adaptive"] + (["gtol"] if "gtol" in axes else []) + (["fixed"] if "quad_order" in axes else []))
    )
    if "fixed" in rules and "quad_order" not in ax:
        _fail(where, "quadrature", 'lists "fixed" but no quad_order axis gives its orders; add quad_order = [2, 8]')
    quad = [("adaptive", None, None)] if "adaptive" in rules else []
    quad += [("gtol", g, None) for g in ax["gtol"] if "gtol" in rules]
    quad += [("fixed", None, n) for n in ax.get("quad_order", []) if "fixed" in rules]
    cases = []
    for method, problem_name in itertools.product(ax["method"], ax["problem"]):
        training = TRAINING_PROBLEMS.get(problem_name) or user_training.get(problem_name)
        if problem_name in PROBLEMS and "epochs" not in ax:
            training = None  # g1d, spheres, sines: one gradient unless the spec asks for training
        if "lr" in ax and (training is None or training.default_lr is None):
            _fail(
                where,
                "lr",
                f"does not apply to {problem_name!r}; give lr only to training problems that take it"
                f" ({', '.join(p for p, t in TRAINING_PROBLEMS.items() if t.default_lr is not None)})",
            )
        problem = training or user.get(problem_name) or PROBLEMS[problem_name]
        if training is not None and training.unsupported(method):
            _fail(where, "method", f"{method!r}: {training.unsupported(method)}; give it its own [[grid]]")
        if training is None and isinstance(METHODS[method], TrainingOnly):
            trainers = ", ".join(n for n, t in TRAINING_PROBLEMS.items() if not t.unsupported(method))
            _fail(where, "method", f"{method!r} trains only ({trainers}); give it its own [[grid]] with those problems")
        epochs = [None] if training is None else ax.get("epochs", [training.default_epochs])
        steps = ax["train_steps"] if training is None else [0]
        starts = ax.get("weights", [""]) if training is None else [""]
        if training is not None and any(ax["train_steps"]):
            _fail(where, "train_steps", f"does not apply to training problem {problem_name!r} (it trains by epochs);"
                  " give train_steps only to gradient problems, in their own [[grid]]")  # fmt: skip
        wong_zakai = training is not None and training.noise_axis and method == "torch_gq"
        noise = ax.get("ncosines", [DEFAULT_NCOSINES]) if wong_zakai else [None]
        lrs = ax.get("lr", [training.default_lr]) if training is not None else [None]
        widths = ax.get("width", [problem.default_width])
        batches = ax.get("batch", [problem.default_batch])
        for key, values in (("width", widths), ("batch", batches)):
            if None in values:  # a user's factory without a default for it
                _fail(where, key, f"is missing for {problem_name!r}, whose make() has no default {key}; add "
                      f"{key} = [...] or give make a default ({key}: int = ...)")  # fmt: skip
        is_quad = METHODS[method].quadrature
        quad_points = (
            [
                (q, g, n, b, ws if METHODS[method].warm_starts else None)
                for (q, g, n), b, ws in itertools.product(quad, ax["backward_state"], ax["warm_start"])
            ]
            if is_quad
            else [(None, None, None, None, None)]
        )
        points = itertools.product(widths, batches, tols, quad_points, ax["solver"], ax["device"], ax["dtype"],
                                   ax["seed"], ax["threads"], epochs, noise, lrs, steps, starts)  # fmt: skip
        for w, b, (rtol, atol), (q, g, n, bs, ws), solver, device, dtype, seed, threads, ep, nc, lr, ts, u in points:
            cases.append(
                Case(
                    method=method,
                    problem=problem_name,
                    width=w,
                    batch=b,
                    rtol=float(rtol),
                    atol=float(atol),
                    quadrature=q,
                    gtol=None if g is None else float(g),
                    quad_order=n,
                    backward_state=bs,
                    warm_start=ws,
                    solver=solver,
                    device=device,
                    dtype=dtype,
                    seed=seed,
                    threads=threads,
                    epochs=ep,
                    ncosines=nc,
                    lr=None if lr is None else float(lr),
                    train_steps=ts,
                    weights=u,
                )
            )
    return cases


def _tolerances(where: str, ax: dict, mode) -> list[tuple[float, float]]:
    rtol, atol = ax["rtol"], ax.get("atol", ax["rtol"])
    if mode == "crossed":
        return list(itertools.product(rtol, atol))
    if mode != "paired":
        _fail(where, "tolerances", f'is {mode!r}; use "paired" (zip rtol with atol) or "crossed"')
    if len(rtol) != len(atol):
        _fail(
            where,
            "atol",
            f"has {len(atol)} values but rtol has {len(rtol)}; give equal lengths to pair them,"
            ' or set tolerances = "crossed"',
        )
    return list(zip(rtol, atol, strict=True))


def _example(key: str) -> str:
    return {"method": '"torch_gq"', "problem": '"workload_l"'}.get(key, "...")


def _fail(where: str, key: str, why_and_fix: str):
    raise GridSpecError(f"{where}: {key} {why_and_fix}")


def _table(data: dict, key: str, source: str) -> dict:
    value = data.get(key, {})
    if not isinstance(value, dict):
        _fail(source, key, f"must be a table: write [{key}] on its own line and key = value lines below it")
    return value


def _as_list(where: str, key: str, value) -> list:
    values = value if isinstance(value, list) else [value]
    if not values:
        _fail(where, key, f"is an empty list; give at least one value or remove {key}")
    return values


def _choices(where: str, key: str, values: list, known) -> None:
    for v in values:
        if v not in known:
            _fail(where, key, f"value {v!r} is unknown; use one of {', '.join(map(str, known))}")


def _positive(where: str, key: str, v, *, integer: bool = False, zero_ok: bool = False):
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type or not math.isfinite(v) or v < 0 or (v == 0 and not zero_ok):
        kind = "an integer" if integer else "a number"
        bound = ">= 0" if zero_ok else "> 0"
        example = {"lr": "[1e-3]"}.get(
            key, ("3" if integer else "60") if "." in key else ("[1]" if integer else "[1e-6]")
        )
        _fail(where, key, f"value {v!r} must be {kind} {bound}, e.g. {key.split('.')[-1]} = {example}")
    return v
