"""Issue 19's acceptance check: do a run's 95% intervals hold on a rerun of the same command?

    python benchmarks/rerun.py [--preset ratios] [--pairs 2] [--out reports/rerun] [--runs DIR DIR ...]

Runs `gqbench run --preset P` 2 x `--pairs` times back to back (`--out`/run1, run2, ...; references
shared; a finished folder is only read, so a killed check resumes), or takes `--runs` folders as they
are. For each pair (run1, run2), (run3, run4), ...: every backward speed-up's point, 95% interval and
processes x rounds in both runs; whether each run's point lies inside the other's interval; whether
the two intervals are disjoint; then `gqbench compare` of the second run against the first. A pair
passes when at least `--min-inside` (default 7) of its speed-ups have the second run's point inside the
first's interval and as many the first's inside the second's, no two intervals are disjoint, and
compare exits 0. Exit status 0 when every pair passes.
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import time

import pandas as pd

from gqbench.results.ratios import paired_speedups

KEY = ["problem", "width", "batch", "rtol", "gq", "baseline"]


def speedups(run_dir: pathlib.Path) -> pd.DataFrame:
    sp = paired_speedups(pd.read_parquet(run_dir / "results.parquet"))
    return sp[[*KEY, "speedup_bwd", "bwd_lo", "bwd_hi", "processes", "rounds"]]


def check_pair(a: pathlib.Path, b: pathlib.Path, min_inside: int) -> bool:
    both = speedups(a).merge(speedups(b), on=KEY, suffixes=("_a", "_b"))
    print(f"\n{a.name} vs {b.name}: backward speed-ups (baseline time / GQ time), 95% intervals")
    print(f"{'speed-up':<52} {a.name + ': point [interval] PxR':>36} {b.name + ': point [interval] PxR':>36}"
          "  b in a  a in b  disjoint")  # fmt: skip
    a_in_b = b_in_a = disjoint = 0
    for _, r in both.iterrows():
        cells = []
        for s in ("a", "b"):
            rounds = r[f"rounds_{s}"] // max(1, r[f"processes_{s}"])
            cells.append(f"{r[f'speedup_bwd_{s}']:.2f} [{r[f'bwd_lo_{s}']:.2f}, {r[f'bwd_hi_{s}']:.2f}] "
                         f"{r[f'processes_{s}']}x{rounds}")  # fmt: skip
        bin_a = bool(r["bwd_lo_a"] <= r["speedup_bwd_b"] <= r["bwd_hi_a"])
        ain_b = bool(r["bwd_lo_b"] <= r["speedup_bwd_a"] <= r["bwd_hi_b"])
        apart = bool(r["bwd_lo_a"] > r["bwd_hi_b"] or r["bwd_lo_b"] > r["bwd_hi_a"])
        b_in_a, a_in_b, disjoint = b_in_a + bin_a, a_in_b + ain_b, disjoint + apart
        name = f"{r['problem']} w={r['width']} {r['gq']} / {r['baseline']}"
        print(f"{name:<52} {cells[0]:>36} {cells[1]:>36}  {'yes' if bin_a else 'NO':>6}  {'yes' if ain_b else 'NO':>6}"
              f"  {'YES' if apart else 'no':>8}")  # fmt: skip
    n = len(both)
    cmp = subprocess.run([sys.executable, "-m", "gqbench", "compare", str(b), str(a)], capture_output=True, text=True)
    ok = n > 0 and min(a_in_b, b_in_a) >= min(min_inside, n) and disjoint == 0 and cmp.returncode == 0
    print(f"{n} speed-ups: {b.name}'s point inside {a.name}'s interval {b_in_a}/{n}, {a.name}'s inside "
          f"{b.name}'s {a_in_b}/{n}; disjoint pairs {disjoint}; `gqbench compare {b} {a}` exit {cmp.returncode}"
          f" -> {'PASS' if ok else 'FAIL'}")  # fmt: skip
    return ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="ratios")
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("reports") / "rerun")
    p.add_argument("--runs", type=pathlib.Path, nargs="+", help="existing run folders, taken in pairs")
    p.add_argument("--min-inside", type=int, default=7)
    args = p.parse_args()
    runs = args.runs or [args.out / f"run{i + 1}" for i in range(2 * args.pairs)]
    if len(runs) % 2:
        p.error(f"--runs: {len(runs)} folders; give them in pairs")
    for run in runs:
        if args.runs is not None:
            if not (run / "results.parquet").exists():
                p.error(f"{run / 'results.parquet'} does not exist")
        else:  # a finished run is skipped by the runner itself (it resumes)
            cmd = [sys.executable, "-m", "gqbench", "run", "--preset", args.preset, "--out", str(run), "--quiet",
                   "--reference-dir", str(args.out / "references")]  # fmt: skip
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            print(f"{' '.join(cmd[1:])}: {time.perf_counter() - t0:.0f} s", flush=True)
    results = [check_pair(a, b, args.min_inside) for a, b in zip(runs[::2], runs[1::2], strict=True)]
    print(f"\n{sum(results)} of {len(results)} pairs pass")
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
