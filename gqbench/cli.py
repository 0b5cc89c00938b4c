"""`gqbench list | run | report | merge | compare | profile | advise` (also `python -m gqbench ...`)."""

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
    run.add_argument("--repeats", type=int, help="timed rounds per process of a case (overrides the spec)")
    run.add_argument(
        "--processes",
        type=int,
        help="fresh worker processes per case, each warmed up and timed "
        "(overrides the spec); intervals are taken over processes",
    )
    run.add_argument("--warmup", type=int, help="untimed warm-up calls per case (overrides the spec)")
    run.add_argument(
        "--rewarm", type=int, help="untimed calls per method before its timed call in each round (default 1)"
    )
    run.add_argument("--timeout", type=float, help="seconds per case, worker start-up included")
    run.add_argument("--threads", type=int, help="torch/BLAS threads for every case (overrides the spec)")
    run.add_argument("--reference-dir", type=Path, help="share float64 reference gradients (default: OUT/references)")
    run.add_argument("--report", action="store_true", help="write OUT/index.html afterwards")
    run.add_argument("--dry-run", action="store_true", help="print the cases and exit")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--shard", metavar="K/N", help="run only shard K of N (cost-balanced; comparison groups whole)")
    run.add_argument("--executor", choices=("local", "ray"), default="local", help="where cases run (default local)")
    run.add_argument("--address", help="--executor ray: the cluster (e.g. 10.0.0.1:6379; default: a local one)")
    run.add_argument("--per-node", type=int, default=1, help="--executor ray: comparison groups at once per node")
    rep = sub.add_parser("report", help="write DIR/index.html from DIR/results.parquet")
    rep.add_argument("dir", type=Path)
    rep.add_argument("--baseline", type=Path, help="another results folder: mark regressions/improvements against it")
    rep.add_argument("--threshold", type=float, default=0.1, help="relative change that counts (default 0.1 = 10%%)")
    rep.add_argument("--profiles", type=Path, help="`gqbench profile` output (default: found beside DIR or reports/)")
    rep.add_argument("--asv", type=Path, help="asv's published index.html (default: found beside DIR or reports/asv)")
    mrg = sub.add_parser("merge", help="shard folders of one grid -> one results folder (then `gqbench report OUT`)")
    mrg.add_argument("out", type=Path)
    mrg.add_argument("dirs", type=Path, nargs="+")
    mrg.add_argument("--report", action="store_true", help="write OUT/index.html afterwards")
    cmp = sub.add_parser("compare", help="per-case time ratios A/B with 95%% intervals; exit 1 on a regression")
    cmp.add_argument("a", type=Path, help="results folder under test (e.g. this commit, this machine)")
    cmp.add_argument("b", type=Path, help="results folder to compare against (the baseline)")
    cmp.add_argument("--threshold", type=float, default=0.1, help="slow-down that counts (default 0.1 = 10%%)")
    cmp.add_argument("--absolute", action="store_true",
                     help="judge raw times (two machines, or back-to-back runs on a quiet one); default: GQ "
                          "relative to the baselines timed beside it, which absorbs the machine's drift")  # fmt: skip
    _profile_parser(sub)
    adv = sub.add_parser(
        "advise",
        help="which gradient method for YOUR model: a short paired comparison and a recommendation",
        description="Runs torch_direct, torch_adjoint, torch_seminorm and torch_gq (adaptive and gtol rules, "
        "backsolve and interpolate) on PROBLEM at each --rtol, then prints the fastest method whose gradient is "
        "within reach of the tolerance, its speed-up over each other with a 95%% interval, peak memory and what "
        "failed; writes the results and the HTML report to --out.",
    )
    adv.add_argument("problem", help="'pkg.module:make', 'path/to/file.py:make' or a built-in problem's name")
    adv.add_argument("--rtol", type=float, action="append", help="tolerance (repeatable; default 1e-4)")
    adv.add_argument("--atol", type=float, action="append", help="absolute tolerance per --rtol (default: = rtol)")
    adv.add_argument("--width", type=int, help="passed to make(width=...) (default: make's own default)")
    adv.add_argument("--batch", type=int, help="passed to make(batch=...) (default: make's own default)")
    adv.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    adv.add_argument("--solver", default="dopri5", help="an adaptive torchdiffeq solver (default dopri5)")
    adv.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    adv.add_argument("--threads", type=int, default=2, help="torch/BLAS threads per case (default 2)")
    adv.add_argument("--repeats", type=int, default=7, help="paired timing rounds (default 7)")
    adv.add_argument("--timeout", type=float, default=120.0, help="seconds per case (default 120)")
    adv.add_argument("--weights", type=Path, metavar="MODEL.pt",
                     help="measure at your weights: a state_dict of func saved with torch.save(func.state_dict(), "
                          "path), loaded strictly (default: make's initial weights, where GQ looks best)")  # fmt: skip
    adv.add_argument("--train-steps", type=int, default=0, metavar="N",
                     help="measure after N steps of the training recipe (direct backprop, Adam lr 1e-3) toward "
                          "make's training target, its optional 5th element (from --weights if given)")  # fmt: skip
    adv.add_argument("--out", type=Path, help="results folder (default reports/advise/<problem>-<file hash>)")
    adv.add_argument("--no-report", action="store_true", help="do not write OUT/index.html")
    adv.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _profile_parser(sub) -> None:
    prof = sub.add_parser(
        "profile",
        help="run chosen cases under torch.profiler (jax.profiler for JAX methods): traces for TensorBoard",
        description="Cases: the cross product of the axis flags (like a grid spec's [axes]), or a preset/grid "
        "filtered by them and by --case-id. Traces land in OUT/<case_id>/ (tensorboard --logdir OUT).",
    )
    src = prof.add_mutually_exclusive_group()
    src.add_argument("--preset", help="take the cases from a shipped grid, filtered by the flags below")
    src.add_argument("--grid", type=Path, help="take the cases from a grid spec TOML, filtered by the flags below")
    prof.add_argument("--case-id", action="append", default=[], help="keep only these case ids (repeatable)")
    for flag, typ in (
        ("method", str),
        ("problem", str),
        ("width", int),
        ("batch", int),
        ("rtol", float),
        ("atol", float),
        ("quadrature", str),
        ("gtol", float),
        ("quad-order", int),
        ("backward-state", str),
        ("solver", str),
        ("device", str),
        ("dtype", str),
        ("seed", int),
        ("threads", int),
    ):
        prof.add_argument(f"--{flag}", type=typ, action="append", help="repeatable")
    prof.add_argument("--out", type=Path, default=Path("reports") / "profiles", help="default: reports/profiles")
    prof.add_argument("--steps", type=int, default=2, help="recorded forward+backward steps (default 2)")
    prof.add_argument("--warmup", type=int, default=1, help="steps run before recording (default 1)")
    prof.add_argument("--with-stack", action="store_true", help="record Python stacks (bigger traces)")
    prof.add_argument("--no-memory-snapshot", action="store_true", help="CUDA: skip the allocator snapshot")
    prof.add_argument("--timeout", type=float, default=900.0, help="seconds per case (default 900)")
    prof.add_argument("--in-process", action="store_true", help="no fresh process per case")
    prof.add_argument("--report", type=Path, metavar="DIR", help="then rewrite DIR/index.html with the profiles")
    prof.add_argument("--dry-run", action="store_true", help="print the cases and exit")


def main(argv: list[str] | None = None) -> int:
    from .define.grid import GridSpecError

    args = _parser().parse_args(argv)
    try:
        commands = {"list": _list, "run": _run, "report": _report, "compare": _compare, "merge": _merge,
                    "profile": _profile, "advise": _advise}  # fmt: skip
        return commands[args.command](args)
    except GridSpecError as exc:
        print(f"gqbench: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, KeyError) as exc:
        print(f"gqbench: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2


def _list(args) -> int:
    from .define.grid import list_presets, load_preset
    from .define.methods import METHODS
    from .define.problems import PROBLEMS

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
    print("  your own: 'path/to/model.py:make' or 'pkg.module:make', make(*, width, batch, seed, dtype, device) "
          "-> (func, y0, t, loss); try: gqbench advise examples/spiral.py:make --rtol 1e-4")  # fmt: skip
    from .define.training_problems import TRAINING_PROBLEMS

    print("training problems (cases with epochs):")
    for name, p in TRAINING_PROBLEMS.items():
        lr = f"lr {p.default_lr:g}" if p.default_lr is not None else ""
        print(f"  {name:16s} epochs {p.default_epochs:<4d} batch {p.default_batch:<4d} {lr:9s} {p.description}")
    return 0


def _run(args) -> int:
    from .define.grid import GridSpecError, load_preset, load_spec, parse_spec

    for flag in ("repeats", "processes", "timeout", "threads"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise GridSpecError(f"--{flag} {value}: must be > 0")
    for flag in ("warmup", "rewarm"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            raise GridSpecError(f"--{flag} {getattr(args, flag)}: must be >= 0")
    if args.per_node < 1:
        raise GridSpecError(f"--per-node {args.per_node}: must be >= 1")
    if args.shard is not None:
        from .execute.shard import Shard

        try:
            Shard.parse(args.shard)
        except ValueError as exc:
            raise GridSpecError(str(exc)) from None
    spec = load_preset(args.preset) if args.preset else load_spec(args.grid)
    if args.threads is not None:
        spec = parse_spec(
            spec.source, source=args.preset or str(args.grid), default_name=spec.name, threads=args.threads
        )
    settings = spec.settings.replace(
        repeats=args.repeats, processes=args.processes, warmup=args.warmup, rewarm=args.rewarm, timeout=args.timeout
    )
    out = args.out or Path("reports") / spec.name
    cases = spec.cases
    if args.shard is not None:
        from .execute.shard import Shard, assign

        cases = assign(list(cases), Shard.parse(args.shard))
    if args.dry_run:
        for case in cases:
            print(
                case.case_id,
                case.label,
                case.problem,
                f"w={case.width} b={case.batch} rtol={case.rtol:g} "
                f"atol={case.atol:g} {case.device} {case.dtype} threads={case.threads}",
            )
        print(f"{len(cases)} cases{f' (shard {args.shard})' if args.shard else ''}; {settings}")
        return 0
    from .execute.runner import run_grid

    df = run_grid(
        spec.cases, out, settings=settings, spec=spec.source, progress=not args.quiet, reference_dir=args.reference_dir,
        executor=args.executor, address=args.address, per_node=args.per_node, shard=args.shard,
    )  # fmt: skip
    per_case = df.drop_duplicates("case_id")["status"].value_counts().to_dict()
    print(f"{out / 'results.parquet'}: {len(df)} rows, cases by status: {per_case}")
    _print_speedups(df)
    if args.report:
        from .report.html import write_report

        print(write_report(out))
    return 0


def _print_speedups(df) -> None:
    """GQ over each baseline of its comparison group, with 95% intervals (paired by round; over processes
    when the cases ran in several) and what each interval is over."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from .define.case import MATCH
    from .results.ratios import paired_speedups

    if "epochs" in df:
        df = df[df["epochs"].isna()]  # training runs: their own section of the report (per-epoch ratios, claims)
    sp = paired_speedups(df)
    if sp.empty:
        return
    several = bool((sp["processes"] > 1).all())
    # A GQ gradient the code could not certify (it warned) is marked: its speed-up is not like for like.
    key = [c for c in MATCH if c in sp and c in df]
    bad = set()
    if "certified" in df:
        uncertified = df[df["certified"].astype("boolean").eq(False).fillna(False)]
        bad = set(uncertified[[*key, "label"]].itertuples(index=False, name=None))
    how = ("geometric mean of the processes' median ratios, 95% interval over processes (Student's t): what a rerun "
           "should land in" if several else "median of the rounds' ratios, 95% bootstrap interval over the rounds of "
           "ONE process (it does not cover a rerun: use --processes)")  # fmt: skip
    table = Table(title=f"GQ speed-up (baseline time / GQ time): {how}; * = interval includes 1; (uncertified) = GQ "
                        "warned that it could not vouch for that gradient",
                  title_justify="left")  # fmt: skip
    # Gradients at trained weights (`train_steps`, `weights`) get a column: otherwise their rows read as repeats.
    trained = bool(sp["train_steps"].fillna(0).astype(int).any() or sp["weights"].fillna("").astype(bool).any())
    cols = ("problem", "width", "rtol", *(("weights",) if trained else ()), "GQ", "baseline", "backward", "fwd + bwd",
            "interval over")  # fmt: skip
    for col in cols:
        table.add_column(col, justify="right" if col in ("width", "rtol", "backward", "fwd + bwd") else "left",
                         no_wrap=True)  # fmt: skip

    def cell(r, name):
        s, lo, hi = r[f"speedup_{name}"], r[f"{name}_lo"], r[f"{name}_hi"]
        star = "*" if r[f"{name}_includes_one"] else ""
        return f"{s:.2f}x [{lo:.2f}, {hi:.2f}]{star}" if lo == lo else f"{s:.2f}x (n<3)"

    for _, r in sp.iterrows():
        steps = int(r["train_steps"]) if r["train_steps"] == r["train_steps"] else 0
        at = ("file" if r["weights"] else f"step {steps}" if steps else "initial",) if trained else ()
        gq = r["gq"] + (" (uncertified)" if (*(r[c] for c in key), r["gq"]) in bad else "")
        cells = (r["problem"], str(r["width"]), f"{r['rtol']:g}", *at, gq, r["baseline"], cell(r, "bwd"),
                 cell(r, "total"), r["covers"])  # fmt: skip
        table.add_row(*map(escape, cells))  # labels like torch_gq[adaptive] are not rich markup
    Console(width=200).print(table)


def _advise(args) -> int:
    import time

    from .advise import advise
    from .define.grid import GridSpecError

    for flag in ("repeats", "threads", "timeout"):
        if getattr(args, flag) <= 0:
            raise GridSpecError(f"--{flag} {getattr(args, flag)}: must be > 0")
    started = time.perf_counter()
    table = advise(args.problem, rtol=args.rtol or [1e-4], atol=args.atol, width=args.width, batch=args.batch,
                   dtype=args.dtype, solver=args.solver, device=args.device, threads=args.threads,
                   repeats=args.repeats, timeout=args.timeout, out=args.out, report=not args.no_report,
                   progress=not args.quiet, weights=args.weights, train_steps=args.train_steps)  # fmt: skip
    print_advice(table, seconds=time.perf_counter() - started)
    return 0


def print_advice(table, seconds: float | None = None) -> None:
    """`gqbench advise`'s answer: per tolerance the recommendation, a table of every method setting and the
    failures with their errors."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from .results.advice import REACH

    console = Console(width=200, highlight=False)
    if table.attrs.get("weights"):
        console.print(f"Gradients {escape(table.attrs['weights'])}.")
        if table.attrs.get("initial_only"):
            warn = ("initial weights only -- a neural ODE's field is smoothest there; as it trains, NFE and GQ's "
                    "quadrature nodes grow and the ranking can change. Rerun with --weights model.pt (your trained "
                    "func.state_dict()) or --train-steps N.")  # fmt: skip
            console.print(f"[yellow]warning: {warn}[/yellow]")
    point = ["problem", "width", "batch", "rtol", "atol", "dtype"]
    table = table.sort_values(["rtol", "atol"], ascending=False, kind="stable")  # loose tolerances first
    for (problem, width, batch, rtol, atol, dtype), g in table.groupby(point, sort=False):
        head = f"{problem} (width {width}, batch {batch}, {dtype}) at rtol {rtol:g}" + (
            f", atol {atol:g}" if atol != rtol else ""
        )
        rec = g[g["recommended"]]
        if rec.empty:
            console.print(f"{escape(head)}: no method gave a gradient within reach; see the failures below")
        else:
            r = rec.iloc[0]
            console.print(
                f"{escape(head)}: use [bold]{escape(r['label'])}[/bold] -- {r['total_s'] * 1e3:.3g} ms per forward "
                f"+ backward, gradient error {r['grad_rel_err']:.2g}, peak memory {r['peak_mem_mib']:.3g} MiB"
            )
            close = g[g["within_reach"] & ~g["recommended"] & ~g["clearly_slower"].astype(bool)]["label"]
            if len(close):
                console.print(f"  not clearly slower (95% interval reaches 1x or below): {escape(', '.join(close))}; "
                              "more --repeats on a quieter machine may separate them")  # fmt: skip
        rounds = int(g["rounds"].max()) if g["rounds"].notna().any() else 0
        console.print(f"  speed-up: that method's time / the recommended one's (forward + backward; backward), median "
                      f"over {rounds} paired rounds [95% bootstrap interval]")  # fmt: skip
        console.print(f"  within reach: gradient error <= {REACH:g} x max(rtol, the best error any method reached)")
        table_ = Table()
        for col in ("method", "fwd+bwd ms", "speed-up [95%]", "bwd speed-up [95%]", "grad error", "within reach",
                    "peak MiB", "NFE fwd/bwd", "status"):  # fmt: skip
            table_.add_column(col, justify="left" if col in ("method", "status") else "right", no_wrap=True)
        for _, r in g.iterrows():
            ok = r["status"] == "ok"

            def ratio(v, lo, hi):
                if v != v:
                    return ""
                return f"{v:.2f}x [{lo:.2f}, {hi:.2f}]" if lo == lo else f"{v:.2f}x (n<3)"

            table_.add_row(
                escape(r["label"]) + (" *" if r["recommended"] else ""),
                f"{r['total_s'] * 1e3:.3g}" if ok else "-",
                "recommended" if r["recommended"] else ratio(r["speedup"], r["speedup_lo"], r["speedup_hi"]),
                "" if r["recommended"] else ratio(r["speedup_bwd"], r["speedup_bwd_lo"], r["speedup_bwd_hi"]),
                f"{r['grad_rel_err']:.2g}" if r["grad_rel_err"] == r["grad_rel_err"] else "-",
                ("uncertified" if r.get("certified") is False else "yes" if r["within_reach"] else "no") if ok else "-",
                f"{r['peak_mem_mib']:.3g}" if r["peak_mem_mib"] == r["peak_mem_mib"] else "-",
                f"{r['nfe_fwd']:.0f}/{r['nfe_bwd']:.0f}" if ok else "-",
                escape(str(r["status"])),
            )
        console.print(table_)
        for _, r in g[g["status"] != "ok"].iterrows():
            console.print(f"  failed: {escape(r['label'])} ({escape(str(r['status']))}): {escape(str(r['error']))}")
        for lab in g.loc[g["certified"].eq(False).fillna(False), "label"]:
            console.print(f"  uncertified: {escape(lab)} warned that its gradient is not certified (not recommended); "
                          "run it by hand to read the warning's numbers and fix")  # fmt: skip
    where = table.attrs.get("report") or table.attrs.get("out")
    took = f" in {seconds:.0f} s" if seconds is not None else ""
    if where:
        console.print(f"results and report: {escape(str(where))}{took}")


def _merge(args) -> int:
    from .execute.merge import merge

    df = merge(args.out, args.dirs)
    machines = df["machine"].dropna().unique()
    print(f"{args.out / 'results.parquet'}: {df['case_id'].nunique()} cases from {len(args.dirs)} folders, "
          f"{len(machines)} machine(s)")  # fmt: skip
    if args.report:
        from .report.html import write_report

        print(write_report(args.out))
    return 0


def _compare(args) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from .define.grid import GridSpecError
    from .results.ratios import compare_samples, machine_factor
    from .results.tables import load_results

    if not args.threshold > 0:
        raise GridSpecError(f"--threshold {args.threshold}: must be > 0, e.g. 0.1 for 10%")
    a, b = load_results(args.a), load_results(args.b)
    cmp = compare_samples(a, b, threshold=args.threshold, absolute=args.absolute)
    if cmp.empty:
        raise GridSpecError(f"gqbench compare: {args.a} and {args.b} share no finished case; compare runs of one grid")
    judged = "fwd + bwd" if args.absolute else "GQ: vs baselines; others: fwd + bwd"
    over = "over processes (Welch's t)" if min(_processes(a), _processes(b)) > 1 else "over rounds"
    table = Table(title=f"{args.a} / {args.b}: time ratios with 95% intervals {over} (regression: the {judged} "
                  f"interval above {1 + args.threshold:g})", title_justify="left")  # fmt: skip
    for col in ("case", "problem", "width", "rtol", "fwd + bwd", "backward", "vs baselines", "verdict"):
        table.add_column(col)

    def cell(point, lo, hi):
        return "" if point != point else f"{point:.3f} [{lo:.3f}, {hi:.3f}]"

    for _, r in cmp.iterrows():
        cells = (r["label"], r["problem"], str(r["width"]), f"{r['rtol']:g}",
                 cell(r["ratio_total"], r["total_lo"], r["total_hi"]), cell(r["ratio_bwd"], r["bwd_lo"], r["bwd_hi"]),
                 cell(r["rel_total"], r["rel_lo"], r["rel_hi"]), r["verdict"])  # fmt: skip
        table.add_row(*map(escape, cells))
    Console(width=180).print(table)
    factor = machine_factor(cmp)
    if factor == factor:
        print(f"baselines (code GQ does not change) ran {factor:.2f}x as long in {args.a}: the machine's drift"
              + ("" if args.absolute else "; GQ is judged relative to the baselines timed beside it"))  # fmt: skip
    n_reg, n_imp = (int((cmp["verdict"] == v).sum()) for v in ("regression", "improvement"))
    print(f"{len(cmp)} cases compared: {n_reg} regressions, {n_imp} improvements")
    return 1 if n_reg else 0


def _processes(df) -> int:
    """The fewest processes a case of these results ran in (1 for results from before processes)."""
    if "process" not in df or df["process"].isna().all():
        return 1
    return int(df.groupby("case_id")["process"].nunique().min())


def _report(args) -> int:
    from .define.grid import GridSpecError
    from .report.html import write_report

    if not args.threshold > 0:
        raise GridSpecError(f"--threshold {args.threshold}: must be > 0, e.g. 0.1 for 10%")
    print(
        write_report(args.dir, baseline=args.baseline, threshold=args.threshold, profiles=args.profiles, asv=args.asv)
    )
    return 0


def _profile(args) -> int:
    from .define.grid import AXES, GridSpecError, load_preset, load_spec, parse_spec
    from .measurement.profile import profile_cases

    axes = {k: v for k in AXES if (v := getattr(args, k, None)) is not None}
    if args.steps < 1 or args.warmup < 0:
        raise GridSpecError(f"--steps {args.steps} --warmup {args.warmup}: need steps >= 1 and warmup >= 0")
    if args.preset or args.grid:
        spec = load_preset(args.preset) if args.preset else load_spec(args.grid)
        cases = [c for c in spec.cases if _matches(c, axes)]
    elif axes:
        if "method" not in axes:
            raise GridSpecError("gqbench profile: give --method (e.g. --method torch_gq), or --preset/--grid")
        axes.setdefault("problem", ["workload_l"])
        cases = list(parse_spec({"axes": axes}, source="gqbench profile flags").cases)
    elif args.case_id:
        raise GridSpecError("gqbench profile --case-id: give --preset or --grid to look the ids up in")
    else:
        raise GridSpecError("gqbench profile: choose cases with --method/--problem/--width... or --preset/--grid")
    if args.case_id:
        cases = [c for c in cases if c.case_id in set(args.case_id)]
    if not cases:
        raise GridSpecError("gqbench profile: no case matches these flags; try --dry-run without some of them")
    if args.dry_run:
        for c in cases:
            print(c.case_id, c.label, c.problem, f"w={c.width} b={c.batch} rtol={c.rtol:g} atol={c.atol:g} {c.device}")
        print(f"{len(cases)} cases -> {args.out}")
        return 0
    results = profile_cases(
        cases,
        args.out,
        steps=args.steps,
        warmup=args.warmup,
        with_stack=args.with_stack,
        memory_snapshot=not args.no_memory_snapshot,
        timeout=args.timeout,
        isolate=not args.in_process,
    )
    print(
        f"{args.out}: open with `tensorboard --logdir {args.out}` (torch cases: PyTorch Profiler tab); "
        "JAX cases: plugins/profile/*/perfetto_trace.json.gz in ui.perfetto.dev"
    )
    if args.report:
        from .report.html import write_report

        print(write_report(args.report, profiles=args.out))
    return 0 if all(r.get("status") == "ok" for r in results) else 1


def _matches(case, axes: dict) -> bool:
    import math

    for key, wanted in axes.items():
        have = getattr(case, key)
        if isinstance(have, float) or any(isinstance(w, float) for w in wanted):
            if have is None or not any(math.isclose(float(have), float(w), rel_tol=1e-9) for w in wanted):
                return False
        elif have not in wanted:
            return False
    return True


if __name__ == "__main__":
    sys.exit(main())
