"""`gqbench advise PROBLEM --rtol 1e-4`: which gradient method to use for one model, at the user's tolerance(s).

A grid like any other (`parse_spec` -> `run_grid`: fresh workers, paired rounds, references, failure rows)
over torch_direct, torch_adjoint, torch_seminorm, torchode's two adjoints and torch_gq with its two rules
(adaptive, the paper's gtol = 0.1) and both backward states (backsolve, interpolate), then `advice_table` (the
fastest method within reach of the tolerance and its speed-ups with 95% intervals) and the HTML report beside.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

# torchode's: skipped rows without the [torchode] extra, or for a model it cannot solve (the row says why).
METHODS = ("torch_direct", "torch_adjoint", "torch_seminorm", "torch_gq", "torchode_autodiff", "torchode_backsolve")
REPEATS = 7  # paired rounds: enough for a bootstrap interval (>= 5 make them worth reading), a small model ~1 min


def advise_spec(
    problem: str,
    *,
    rtol: Sequence[float] = (1e-4,),
    atol: Sequence[float] | None = None,
    width: int | None = None,
    batch: int | None = None,
    dtype: str = "float32",
    solver: str = "dopri5",
    device: str = "cpu",
    threads: int = 2,
    seed: int = 0,
    repeats: int = REPEATS,
    timeout: float = 120.0,
) -> dict:
    """The grid spec `advise` runs (a dict as `parse_spec` takes; `gqbench run --grid` runs the same as TOML)."""
    axes = dict(method=list(METHODS), problem=[problem], rtol=[float(r) for r in rtol], quadrature=["adaptive", "gtol"],
                gtol=[0.1], backward_state=["backsolve", "interpolate"], solver=[solver], device=[device],
                dtype=[dtype], threads=[threads], seed=[seed])  # fmt: skip
    if atol is not None:
        axes["atol"] = [float(a) for a in atol]
    for key, value in (("width", width), ("batch", batch)):
        if value is not None:
            axes[key] = [value]
    return dict(name=f"advise {problem}", description=f"gqbench advise {problem}",
                run=dict(repeats=repeats, warmup=1, rewarm=1, timeout=timeout), axes=axes)  # fmt: skip


def default_out(problem: str) -> Path:
    """reports/advise/<problem>[-<hash of the user's file>]: an edited model gets a fresh folder, an unchanged
    one resumes (a second `advise` answers at once)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", problem).strip("_")[-60:]
    if ":" in problem:
        from .define.user_problems import fingerprint

        slug = f"{slug}-{fingerprint(problem)}"
    return Path("reports") / "advise" / slug


def advise(
    problem: str,
    *,
    rtol: float | Sequence[float] = 1e-4,
    atol: float | Sequence[float] | None = None,
    width: int | None = None,
    batch: int | None = None,
    dtype: str = "float32",
    solver: str = "dopri5",
    device: str = "cpu",
    threads: int = 2,
    seed: int = 0,
    repeats: int = REPEATS,
    timeout: float = 120.0,
    out: str | Path | None = None,
    report: bool = True,
    progress: bool = False,
):
    """Run the comparison on `problem` (a built-in name, "pkg.module:make" or "path/to/file.py:make") and
    return `gqbench.results.advice.advice_table` of it: one row per method setting and tolerance, the
    recommended one first (`recommended`), with its speed-up over each other (`speedup`, `speedup_lo`,
    `speedup_hi`), gradient errors, peak memory and what failed and why. `table.attrs` has "out" (the
    results folder) and "report" (its index.html, when `report`). Bad input raises `GridSpecError`."""
    from .define.grid import GridSpecError, parse_spec
    from .execute.runner import run_grid
    from .results.advice import advice_table

    as_list = lambda x: None if x is None else [x] if isinstance(x, (int, float)) else list(x)  # noqa: E731
    spec = advise_spec(problem, rtol=as_list(rtol), atol=as_list(atol), width=width, batch=batch, dtype=dtype,
                       solver=solver, device=device, threads=threads, seed=seed, repeats=repeats,
                       timeout=timeout)  # fmt: skip
    grid = parse_spec(spec, source="gqbench advise")
    if any(c.epochs is not None for c in grid.cases):
        raise GridSpecError(f"gqbench advise {problem}: a training problem; advise compares one gradient: give a "
                            "factory make(...) -> (func, y0, t, loss), or train with gqbench run --grid")  # fmt: skip
    out = Path(out) if out is not None else default_out(problem)
    df = run_grid(grid.cases, out, settings=grid.settings, spec=spec, progress=progress)
    table = advice_table(df)
    table.attrs["out"] = str(out)
    if report:
        from .report.html import write_report

        table.attrs["report"] = str(write_report(out))
    return table
