"""The same comparison groups as `gqbench run`, but every method of a group prepared in ONE process
and timed alternately round by round (the check a reader runs to see whether our ratios hold).

    python benchmarks/alternate.py --preset ratios [--repeats 7] [--out alt.parquet]

Uses gqbench's own `warm_up`/`time_call` and `paired_speedups` (no second timing implementation);
prints the speed-up table with 95% intervals that `gqbench run` prints.
"""

from __future__ import annotations

import argparse

import pandas as pd

from gqbench import load_preset
from gqbench._measure import time_call, warm_up
from gqbench._runner import comparison_groups
from gqbench.cli import _print_speedups


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="ratios")
    p.add_argument("--repeats", type=int)
    p.add_argument("--out", help="write the samples here (parquet)")
    args = p.parse_args()
    spec = load_preset(args.preset)
    repeats = args.repeats or spec.settings.repeats
    rows = []
    for group in comparison_groups(list(spec.cases)):
        runs = {case: warm_up(case, spec.settings.warmup)[0] for case in group}
        for r in range(repeats):
            k = r % len(group)
            for case in group[k:] + group[:k]:
                rows.append(dict(case.to_dict(), case_id=case.case_id, label=case.label, round=r, repeat=r,
                                 status="ok", **time_call(runs[case])))  # fmt: skip
        del runs
    df = pd.DataFrame(rows)
    if args.out:
        df.to_parquet(args.out)
    _print_speedups(df)


if __name__ == "__main__":
    main()
