"""`gqbench advise PROBLEM --rtol 1e-4`: which gradient method to use for one model, at the user's tolerance(s).

A grid like any other (`parse_spec` -> `run_grid`: fresh workers, paired rounds, references, failure rows)
over torch_direct, torch_adjoint, torch_seminorm, torchode's two adjoints and torch_gq with its two rules
(adaptive, the paper's gtol = 0.1) and both backward states (backsolve, interpolate), then `advice_table` (the
fastest method within reach of the tolerance and its speed-ups with 95% intervals) and the HTML report beside.

Where the gradients are taken: by default at the model's initial weights (make's, from the seed), where a
neural ODE is smoothest and cheapest -- GQ's lead over direct backprop shrinks or turns as a model trains
(workload L w = 1000: 0.7x direct's backward at step 0, 1.4x at step 80). `weights=` (`--weights model.pt`,
a `torch.save(func.state_dict(), ...)`) measures at the user's own weights (strict load); `train_steps=N`
(`--train-steps N`) after N steps of `gqbench.measurement.trained`'s recipe (from those weights if given)
toward the factory's training target (make's optional 5th element; built-in problems have their own).
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
    train_steps: int = 0,
    weights: str = "",
) -> dict:
    """The grid spec `advise` runs (a dict as `parse_spec` takes; `gqbench run --grid` runs the same as TOML)."""
    axes = dict(method=list(METHODS), problem=[problem], rtol=[float(r) for r in rtol], quadrature=["adaptive", "gtol"],
                gtol=[0.1], backward_state=["auto", "backsolve"], solver=[solver], device=[device],
                dtype=[dtype], threads=[threads], seed=[seed])  # fmt: skip
    if atol is not None:
        axes["atol"] = [float(a) for a in atol]
    if train_steps:
        axes["train_steps"] = [train_steps]
    if weights:
        axes["weights"] = [weights]
    for key, value in (("width", width), ("batch", batch)):
        if value is not None:
            axes[key] = [value]
    return dict(name=f"advise {problem}", description=f"gqbench advise {problem}",
                run=dict(repeats=repeats, warmup=1, rewarm=1, timeout=timeout), axes=axes)  # fmt: skip


def default_out(problem: str, weights: str = "", train_steps: int = 0) -> Path:
    """reports/advise/<problem>[-<hash of the user's file>][-u<weights hash>][-t<steps>]: an edited model (or
    other weights) gets a fresh folder, an unchanged one resumes (a second `advise` answers at once)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", problem).strip("_")[-60:]
    if ":" in problem:
        from .define.user_problems import fingerprint

        slug = f"{slug}-{fingerprint(problem)}"
    slug += (f"-u{weights[:8]}" if weights else "") + (f"-t{train_steps}" if train_steps else "")
    return Path("reports") / "advise" / slug


def weights_note(problem: str, *, weights_file: str | Path | None, train_steps: int, seed: int) -> tuple[str, bool]:
    """Where the gradients were measured, in words, and whether only initial weights were had (-> a warning)."""
    from .measurement.trained import RECIPE

    start = f"your weights ({weights_file})" if weights_file else f"the initial weights (make's, seed {seed})"
    if train_steps:
        return (f"measured after {train_steps} training steps (direct backprop, Adam lr {RECIPE['lr']:g}) from "
                f"{start}", False)  # fmt: skip
    return f"measured at {start}", not weights_file


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
    weights: str | Path | None = None,
    train_steps: int = 0,
):
    """Run the comparison on `problem` (a built-in name, "pkg.module:make" or "path/to/file.py:make") and
    return `gqbench.results.advice.advice_table` of it: one row per method setting and tolerance, the
    recommended one first (`recommended`), with its speed-up over each other (`speedup`, `speedup_lo`,
    `speedup_hi`), gradient errors, peak memory and what failed and why. `table.attrs` has "out" (the
    results folder), "report" (its index.html, when `report`), "weights" (at which weights it was measured,
    in words) and "initial_only" (True: only the initial weights -- the answer may not hold once training
    moves them). `weights`: a state_dict file of `func` (strict load); `train_steps`: measure after that many
    steps of the training recipe (a user's make must return a target). Bad input raises `GridSpecError`
    (a weights file that does not load: `WeightsError`, one line)."""
    from .define.grid import GridSpecError, parse_spec
    from .execute.runner import run_grid
    from .results.advice import advice_table

    as_list = lambda x: None if x is None else [x] if isinstance(x, (int, float)) else list(x)  # noqa: E731
    if not isinstance(train_steps, int) or train_steps < 0:
        raise GridSpecError(f"--train-steps {train_steps}: must be an integer >= 0")
    kw = dict(
        rtol=as_list(rtol),
        atol=as_list(atol),
        width=width,
        batch=batch,
        dtype=dtype,
        solver=solver,
        device=device,
        threads=threads,
        seed=seed,
        repeats=repeats,
        timeout=timeout,
        train_steps=train_steps,
    )
    spec = advise_spec(problem, **kw)
    grid = parse_spec(spec, source="gqbench advise")
    if any(c.epochs is not None for c in grid.cases):
        raise GridSpecError(f"gqbench advise {problem}: a training problem; advise compares one gradient: give a "
                            "factory make(...) -> (func, y0, t, loss), or train with gqbench run --grid")  # fmt: skip
    if train_steps and ":" in problem:
        _needs_target(problem, grid.cases[0])
    sha = ""
    if weights is not None:
        import hashlib

        from .measurement.trained import import_weights, read_weights

        read_weights(weights)  # a missing or unreadable file: one line before anything else
        sha = hashlib.sha256(Path(weights).read_bytes()).hexdigest()[:16]
    out = Path(out) if out is not None else default_out(problem, sha, train_steps)
    if weights is not None:  # checked against the model (strict) and copied where the workers load it
        import_weights(weights, grid.cases[0], cache_dir=out / "references")
        spec = advise_spec(problem, **kw, weights=sha)
        grid = parse_spec(spec, source="gqbench advise")
    df = run_grid(grid.cases, out, settings=grid.settings, spec=spec, progress=progress)
    table = advice_table(df)
    table.attrs["out"] = str(out)
    note, initial_only = weights_note(problem, weights_file=weights, train_steps=train_steps, seed=seed)
    table.attrs["weights"], table.attrs["initial_only"] = note, initial_only
    if report:
        from .report.html import write_report

        table.attrs["report"] = str(write_report(out))
    return table


def _needs_target(problem: str, case) -> None:
    """A user's make must give a training target for --train-steps (fitting a made-up one says nothing)."""
    from .define.grid import GridSpecError
    from .define.problems import get_problem

    inst = get_problem(problem).build(width=case.width, batch=case.batch, dtype=case.dtype, device="cpu",
                                      seed=case.seed)  # fmt: skip
    if inst.target is None:
        raise GridSpecError(f"--train-steps: {problem} returns no training target; return (func, y0, t, loss, "
                            "target) from make (target shaped like y0, or a callable train_loss(ys)), or pass "
                            "--weights of your trained model instead")  # fmt: skip
