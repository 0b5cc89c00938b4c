"""`gqbench list | run | report` (also `python -m gqbench ...`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gqbench", description="Benchmark the GQ adjoint against its baselines.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="presets, methods and problems")
    run = sub.add_parser("run", help="run a grid: one fresh process per case; re-running resumes")
    src = run.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="a shipped grid (see `gqbench list`)")
    src.add_argument("--grid", type=Path, help="a grid spec TOML file")
    run.add_argument("--out", type=Path, help="results folder (default: reports/<preset or spec name>)")
    run.add_argument("--repeats", type=int, help="timed repeats per case (overrides the spec)")
    run.add_argument("--warmup", type=int, help="untimed warm-up calls per case (overrides the spec)")
    run.add_argument("--timeout", type=float, help="seconds per case, worker start-up included")
    run.add_argument("--threads", type=int, help="torch/BLAS threads for every case (overrides the spec)")
    run.add_argument("--reference-dir", type=Path, help="share float64 reference gradients (default: OUT/references)")
    run.add_argument("--report", action="store_true", help="write OUT/index.html afterwards")
    run.add_argument("--dry-run", action="store_true", help="print the cases and exit")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    rep = sub.add_parser("report", help="write DIR/index.html from DIR/results.parquet")
    rep.add_argument("dir", type=Path)
    return p


def main(argv: list[str] | None = None) -> int:
    from ._grid import GridSpecError

    args = _parser().parse_args(argv)
    try:
        return {"list": _list, "run": _run, "report": _report}[args.command](args)
    except GridSpecError as exc:
        print(f"gqbench: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, KeyError) as exc:
        print(f"gqbench: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2


def _list(args) -> int:
    from ._grid import list_presets, load_preset
    from ._methods import METHODS
    from ._problems import PROBLEMS

    print("presets:")
    for name in list_presets():
        spec = load_preset(name)
        print(f"  {name:16s} {len(spec.cases):4d} cases  {spec.description}")
    print("methods:")
    for name, m in METHODS.items():
        print(f"  {name:16s} [{m.backend}{', quadrature' if m.quadrature else ''}] {m.description}")
    print("problems:")
    for name, p in PROBLEMS.items():
        print(f"  {name:16s} batch {p.default_batch:<4d} {p.description}")
    return 0


def _run(args) -> int:
    from ._grid import GridSpecError, load_preset, load_spec, parse_spec

    for flag in ("repeats", "timeout", "threads"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise GridSpecError(f"--{flag} {value}: must be > 0")
    if args.warmup is not None and args.warmup < 0:
        raise GridSpecError(f"--warmup {args.warmup}: must be >= 0")
    spec = load_preset(args.preset) if args.preset else load_spec(args.grid)
    if args.threads is not None:
        spec = parse_spec(
            spec.source, source=args.preset or str(args.grid), default_name=spec.name, threads=args.threads
        )
    settings = spec.settings.replace(repeats=args.repeats, warmup=args.warmup, timeout=args.timeout)
    out = args.out or Path("reports") / spec.name
    if args.dry_run:
        for case in spec.cases:
            print(
                case.case_id,
                case.label,
                case.problem,
                f"w={case.width} b={case.batch} rtol={case.rtol:g} "
                f"atol={case.atol:g} {case.device} {case.dtype} threads={case.threads}",
            )
        print(f"{len(spec.cases)} cases; {settings}")
        return 0
    from ._runner import run_grid

    df = run_grid(
        spec.cases, out, settings=settings, spec=spec.source, progress=not args.quiet, reference_dir=args.reference_dir
    )
    per_case = df.drop_duplicates("case_id")["status"].value_counts().to_dict()
    print(f"{out / 'results.parquet'}: {len(df)} rows, cases by status: {per_case}")
    if args.report:
        from ._report import write_report

        print(write_report(out))
    return 0


def _report(args) -> int:
    from ._report import write_report

    print(write_report(args.dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
