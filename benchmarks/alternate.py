"""The same comparison groups as `gqbench run`, but every method of a group prepared in ONE process
and timed alternately round by round (the check a reader runs to see whether our ratios hold).

    python benchmarks/alternate.py --preset ratios [--repeats 3] [--processes 4] [--out alt.parquet] [--against DIR]

Each group gets its own fresh workers (gqbench's one launch path, job kind "alternate"), `--processes` of
them one after another (default: the preset's), each timing `--repeats` rounds; intervals are then over
processes, as `gqbench run`'s (`results.ratios.ratio_ci`). A fresh one per group: a process that had run
other groups first has a grown heap, and direct backprop's large buffers then skip the
page faults they pay in a fresh process (g1d w=3000: 0.16 s instead of 0.27 s per backward), which
is not what a user's training script sees. Timing is gqbench's own `warm_up`/`time_call`; the table
is the one `gqbench run` prints. `--against RUN_DIR` (a `gqbench run` of the same preset) then prints
each speed-up from both, their difference and whether the two 95% intervals overlap, and exits 1 when
one differs by more than `--tolerance` (default 10%): issue 10's reproducibility check.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

import pandas as pd

from gqbench import load_preset
from gqbench.cli import _print_speedups
from gqbench.execute.runner import comparison_groups
from gqbench.measurement.launch import run_to_end
from gqbench.results.ratios import paired_speedups


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="ratios")
    p.add_argument("--repeats", type=int, help="rounds per process (default: the preset's)")
    p.add_argument("--processes", type=int, help="fresh processes per group (default: the preset's)")
    p.add_argument("--out", help="write the samples here (parquet)")
    p.add_argument("--against", type=pathlib.Path, help="a `gqbench run --preset ...` folder to check against")
    p.add_argument("--tolerance", type=float, default=0.10, help="largest relative difference that agrees")
    args = p.parse_args()
    if args.against and not (args.against / "results.parquet").exists():
        p.error(f"{args.against / 'results.parquet'} does not exist; run `gqbench run --preset {args.preset}"
                f" --out {args.against}` first")  # fmt: skip
    spec = load_preset(args.preset)
    repeats = args.repeats or spec.settings.repeats
    processes = args.processes or spec.settings.processes
    rows = []
    with tempfile.TemporaryDirectory(prefix="gqbench-alternate-") as logs:
        for i, group in enumerate(comparison_groups(list(spec.cases))):
            job = dict(kind="alternate", case=group[0].to_dict(), cases=[c.to_dict() for c in group],
                       warmup=spec.settings.warmup, repeats=repeats, rewarm=spec.settings.rewarm)  # fmt: skip
            for proc in range(processes):
                log = pathlib.Path(logs) / f"group{i}-{proc}.log"
                reply = run_to_end(job, group[0], log, timeout=spec.settings.timeout * len(group))
                failed = [r for r in reply["rows"] if r["status"] != "ok"]
                if failed:
                    sys.exit(f"group of {group[0].label} ({group[0].problem} w={group[0].width}): {failed[0]['error']}")
                rows += [dict(r, process=proc, round=r["round"] + proc * repeats) for r in reply["rows"]]
    df = pd.DataFrame(rows)
    if args.out:
        df.to_parquet(args.out)
    _print_speedups(df)
    if args.against:
        sys.exit(agreement(df, pd.read_parquet(args.against / "results.parquet"), args.tolerance))


def agreement(alternated: pd.DataFrame, run: pd.DataFrame, tolerance: float) -> int:
    """Print run vs alternated speed-ups side by side; 1 when any differs by more than `tolerance`."""
    key = ["problem", "width", "batch", "rtol", "gq", "baseline"]
    both = paired_speedups(run).merge(paired_speedups(alternated), on=key, suffixes=("_run", "_alt"))
    worst, within, overlap = 0.0, 0, 0
    print(f"\n{'problem':<11} {'width':>5} {'GQ':<22} {'baseline':<14} {'bwd run':>8} {'bwd alt':>8} {'diff':>6}"
          f" {'total run':>9} {'total alt':>9} {'diff':>6}  95% intervals")  # fmt: skip
    for _, r in both.iterrows():
        cells, apart = [], []
        for name in ("bwd", "total"):
            run_s, alt_s = r[f"speedup_{name}_run"], r[f"speedup_{name}_alt"]
            diff = run_s / alt_s - 1
            worst, within = max(worst, abs(diff)), within + (abs(diff) <= tolerance)
            cells.append(f"{run_s:>8.2f} {alt_s:>8.2f} {diff:>+6.0%}")
            # NaN bounds (too few rounds) compare False: counted as overlapping, no evidence either way
            disjoint = r[f"{name}_lo_run"] > r[f"{name}_hi_alt"] or r[f"{name}_lo_alt"] > r[f"{name}_hi_run"]
            overlap += not disjoint
            apart += [name] if disjoint else []
        note = f"apart: {', '.join(apart)}" if apart else "overlap"
        print(f"{r['problem']:<11} {r['width']:>5} {r['gq']:<22} {r['baseline']:<14} {cells[0]} {cells[1]:>26}  {note}")
    ok = not both.empty and worst <= tolerance
    print(f"{2 * len(both)} speed-ups: {within} within {tolerance:.0%} (largest difference {worst:.1%}: "
          f"{'agree' if ok else 'DISAGREE'}); the two protocols' 95% intervals overlap in {overlap}")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    main()
