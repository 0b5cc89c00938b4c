"""Between- vs within-process spread of the speed-ups (and of each method's backward time) for a grid,
at one or more warm-up lengths: what the default processes x rounds and warm-up are chosen from.

    python benchmarks/process_spread.py [--preset ratios] [--processes 6] [--repeats 4] [--warmups 1 8]
                                        [--out DIR] [--budget-calls 48]
    python benchmarks/process_spread.py --trace [--trace-processes 4] [--trace-calls 12] [--out DIR]

For each warm-up W it runs `gqbench run --preset P --processes N --repeats R --warmup W --out DIR/wW`
(resumable: a finished folder is only read) and prints, per backward speed-up and per method, the
standard deviation of log time (in %) between processes (the variance component of the process means,
one-way random effects, moment estimate) and within a process (rounds), the page faults per backward,
and what each (processes, rounds) with the same number of timed calls would give: the standard error
of the log speed-up, sqrt(between^2 / P + within^2 / (P R)), and the 95% interval's half-width
t(P-1) * SE that `gqbench.results.ratios` would report.

`--trace`: the page-fault-heavy cases of the preset (torchdiffeq's adjoint; direct backprop on g1d) each
alone in fresh processes, many calls in a row: whether the processes' times and page faults draw
together after a longer warm-up (the calls right after one warm-up call against the last three).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys

import numpy as np
import pandas as pd
from scipy import stats

from gqbench.define.case import QUAD_METHODS
from gqbench.results.ratios import per_round_speedups


def components(values: pd.Series, process: pd.Series) -> tuple[float, float, int, int]:
    """(between SD, within SD, processes, rounds per process) of `values` grouped by `process`."""
    groups = [g.to_numpy() for _, g in values.groupby(process)]
    groups = [g for g in groups if len(g) >= 2]
    if len(groups) < 2:
        return float("nan"), float("nan"), len(groups), 0
    m = int(np.median([len(g) for g in groups]))
    within = float(np.mean([np.var(g, ddof=1) for g in groups]))
    means = np.array([g.mean() for g in groups])
    between = max(0.0, float(np.var(means, ddof=1)) - within / m)
    return float(np.sqrt(between)), float(np.sqrt(within)), len(groups), m


def pct(sd: float) -> str:
    return f"{100 * (np.exp(sd) - 1):5.1f}%" if sd == sd else "    -"


def report(df: pd.DataFrame, warmup: int, budget_calls: int, rewarm: int) -> None:
    ok = df[df["status"] == "ok"]
    rounds = ok.groupby(["case_id", "process"]).size().median()
    print(f"\n== warm-up {warmup}: {ok['process'].nunique()} processes x {rounds:.0f} rounds")
    print(f"{'speed-up (backward)':<58} {'between':>8} {'within':>8}  per-process medians")
    sp = per_round_speedups(ok, gq_methods=QUAD_METHODS)
    for key, g in sp.groupby(["problem", "width", "gq", "baseline"], sort=True):
        b, w, n, m = components(np.log(g["bwd"]), g["process"])
        med = g.groupby("process")["bwd"].median()
        name = f"{key[0]} w={key[1]} {key[2]} / {key[3]}"
        print(f"{name:<58} {pct(b):>8} {pct(w):>8}  {' '.join(f'{x:.2f}' for x in med)}")
    print(f"\n{'method (backward time)':<46} {'between':>8} {'within':>8}  {'median s':>8}  "
          "page faults per backward, median by process")  # fmt: skip
    for key, g in ok.groupby(["problem", "width", "label"], sort=True):
        b, w, n, m = components(np.log(g["bwd_s"]), g["process"])
        faults = g.groupby("process")["bwd_page_faults"].median() / 1e3
        print(f"{key[0] + ' w=' + str(key[1]) + ' ' + key[2]:<46} {pct(b):>8} {pct(w):>8}  {g['bwd_s'].median():8.3f}  "
              + " ".join(f"{f:.0f}k" for f in faults))  # fmt: skip
    # The same number of timed calls per method, split into processes x rounds (each process also
    # pays a start-up, set-up and warm-up): the interval each split would give, for the widest speed-up.
    worst = max((components(np.log(g["bwd"]), g["process"])[:2] for _, g in sp.groupby(["problem", "width", "gq",
                 "baseline"])), key=lambda bw: bw[0] ** 2 + bw[1] ** 2 / 4)  # fmt: skip
    b, w = worst
    print(f"\nwidest speed-up (between {pct(b)}, within {pct(w)}): 95% half-width for {budget_calls} calls per method")
    for p in (2, 3, 4, 6, 8, 12):
        r = max(1, round(budget_calls / p / (1 + rewarm)) - 1)  # a warm-up call per process
        se = np.sqrt(b**2 / p + w**2 / (p * r))
        print(f"  {p:2d} processes x {r:2d} rounds: +-{100 * (np.exp(stats.t.ppf(0.975, p - 1) * se) - 1):5.1f}%")


def trace(cases, processes: int, calls: int, short: int, out: pathlib.Path) -> None:
    """Each case alone in `processes` fresh workers (one method per process, as a training loop runs),
    `calls` timed calls in a row through gqbench's `time_call`: does a longer warm-up narrow how far
    the processes' backward times and page faults lie apart? Compares the calls right after a warm-up
    of `short` calls with the last three."""
    import tempfile

    from gqbench.measurement.launch import run_to_end

    rows = []
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as logs:
        for case in cases:
            for proc in range(processes):
                job = dict(kind="alternate", case=case.to_dict(), cases=[case.to_dict()], warmup=0, repeats=calls)
                reply = run_to_end(job, case, pathlib.Path(logs) / "trace.log", timeout=1800)
                rows += [dict(r, process=proc, call=r["round"] + 1) for r in reply["rows"]]
    df = pd.DataFrame(rows)
    df.to_parquet(out / "trace.parquet")
    print_trace(df, short)


def print_trace(df: pd.DataFrame, short: int) -> None:
    """The trace per case and process, then the spread between and within processes (page faults are not
    moved by other jobs on the machine; times are)."""
    last = df["call"].max()
    print(f"\n== one method per fresh process, {df['call'].max()} calls in a row: backward time (s) and page faults "
          f"per call; spread between processes after {short} warm-up call(s) (calls {short + 1}-{short + 3}) and "
          f"after {last - 3} (calls {last - 2}-{last})")  # fmt: skip
    for label, g in df.groupby(["problem", "width", "label"], sort=True):
        print(f"\n{label[0]} w={label[1]} {label[2]}")
        for proc, gp in g.groupby("process"):
            cells = " ".join(f"{t:.2f}/{f / 1e3:.0f}k" for t, f in zip(gp["bwd_s"], gp["bwd_page_faults"], strict=True))
            print(f"  process {proc}: {cells}")
        for name, calls in (("short", range(short + 1, short + 4)), ("long", range(last - 2, last + 1))):
            part = g[g["call"].isin(list(calls))]
            b, w, *_ = components(np.log(part["bwd_s"]), part["process"])
            fb, fw, *_ = components(np.log(part["bwd_page_faults"].clip(lower=1)), part["process"])
            faults = part.groupby("process")["bwd_page_faults"].median() / 1e3
            print(f"  warm-up {name:5s}: time between {pct(b)}, within {pct(w)}; page faults between {pct(fb)}, "
                  f"within {pct(fw)}, by process " + " ".join(f"{f:.0f}k" for f in faults))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="ratios")
    p.add_argument("--processes", type=int, default=6)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--warmups", type=int, nargs="+", default=[1, 8])
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("reports") / "process-spread")
    p.add_argument("--budget-calls", type=int, default=48, help="calls per method for the processes x rounds table")
    p.add_argument("--trace", action="store_true", help="instead: the preset's adjoint cases and g1d's direct backprop "
                   "alone, --trace-calls calls in each of --trace-processes fresh processes")  # fmt: skip
    p.add_argument("--trace-processes", type=int, default=4)
    p.add_argument("--trace-calls", type=int, default=12)
    args = p.parse_args()
    if args.trace:
        from gqbench import load_preset

        heavy = [c for c in load_preset(args.preset).cases
                 if c.method == "torch_adjoint" or (c.method == "torch_direct" and c.problem == "g1d")]  # fmt: skip
        if (args.out / "trace.parquet").exists():
            print_trace(pd.read_parquet(args.out / "trace.parquet"), 1)
        else:
            trace(heavy, args.trace_processes, args.trace_calls, 1, args.out)
        return
    rewarm = 1
    for w in args.warmups:
        out = args.out / f"w{w}"
        if (
            not (out / "results.parquet").exists()
            or pd.read_parquet(out / "results.parquet")["process"].nunique() < args.processes
        ):
            cmd = [sys.executable, "-m", "gqbench", "run", "--preset", args.preset, "--processes", str(args.processes),
                   "--repeats", str(args.repeats), "--warmup", str(w), "--out", str(out), "--quiet"]  # fmt: skip
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, env=dict(os.environ), stdout=subprocess.DEVNULL)
        report(pd.read_parquet(out / "results.parquet"), w, args.budget_calls, rewarm)


if __name__ == "__main__":
    main()
