"""Compile time of `jax_gq` (impls.jax.GaussLegendreAdjoint) against `jax_backsolve` (diffrax
BacksolveAdjoint): gqbench's own `prepare` -> the run's `compile_s` (forward + backward, traced and
compiled ahead of time) and the set-up seconds, each case in a fresh process (issue 23, item 6;
target: jax_gq <= 1.3x jax_backsolve).

    python benchmarks/jax_compile.py [workload_l,oscillator] [float32] [ROUNDS]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

_ONE = r"""
import json, sys, time
from gqbench.define.case import Case
from gqbench.measurement.measure import prepare
method, problem, dtype = sys.argv[1:4]
tol = dict(rtol=1e-3, atol=1e-3) if problem == "workload_l" else dict(rtol=1e-6, atol=1e-6)
start = time.perf_counter()
run = prepare(Case(method, problem, 100, 200 if problem == "workload_l" else 8, dtype=dtype, **tol))
print(json.dumps(dict(compile_s=run.compile_s, setup_s=time.perf_counter() - start)))
"""


def main() -> None:
    problems = (sys.argv[1] if len(sys.argv) > 1 else "workload_l,oscillator").split(",")
    dtype = sys.argv[2] if len(sys.argv) > 2 else "float32"
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    for problem in problems:
        got = {m: [] for m in ("jax_backsolve", "jax_gq")}
        for _ in range(rounds):  # alternated, each in a fresh process
            for method in got:
                out = subprocess.run([sys.executable, "-c", _ONE, method, problem, dtype], capture_output=True,
                                     text=True, check=True)  # fmt: skip
                got[method].append(json.loads(out.stdout.strip().splitlines()[-1]))
        med = {m: {k: statistics.median(r[k] for r in rs) for k in ("compile_s", "setup_s")} for m, rs in got.items()}
        ratio = med["jax_gq"]["compile_s"] / med["jax_backsolve"]["compile_s"]
        # Each round's own ratio (the two methods' processes ran back to back): the spread behind the median.
        per_round = sorted(g["compile_s"] / b["compile_s"] for g, b in zip(got["jax_gq"], got["jax_backsolve"]))
        print(f"{problem} w=100 {dtype}: compile_s backsolve {med['jax_backsolve']['compile_s']:.1f} "
              f"gq {med['jax_gq']['compile_s']:.1f} (x{ratio:.2f}; rounds x{per_round[0]:.2f}-x{per_round[-1]:.2f}, "
              f"median x{statistics.median(per_round):.2f}); setup_s backsolve "
              f"{med['jax_backsolve']['setup_s']:.1f} gq {med['jax_gq']['setup_s']:.1f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
