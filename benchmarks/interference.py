"""How much do the workers of one comparison group disturb each other? The figures for the
runner's re-warm call (docs/measuring.md, "Paired rounds").

    python benchmarks/interference.py [--method torch_adjoint] [--problem workload_l] [--width 2000] [--rounds 7]

Starts the group's workers as the runner does (gqbench's `Worker`, one fresh process per case, warmed
up), then times METHOD's backward three ways, alternating within each of `--rounds` rounds:
  idle     right after an untimed call of its own, the other workers idle (blocked in a pipe read);
  switch   each call right after the other workers' calls (the runner with `rewarm = 0`);
  rewarm   as `switch`, but each timed call right after an untimed one of its own (`rewarm = 1`).
Prints each call's backward seconds and minor page faults, and the medians.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from gqbench import Case
from gqbench.measurement.launch import Worker


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="torch_adjoint")
    p.add_argument("--problem", default="workload_l")
    p.add_argument("--width", type=int, default=2000)
    p.add_argument("--batch", type=int, default=200)
    p.add_argument("--rtol", type=float, default=1e-3)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    kw = dict(rtol=args.rtol, atol=args.rtol, threads=2)
    target = Case(args.method, args.problem, args.width, args.batch, **kw)
    others = [
        Case(m, args.problem, args.width, args.batch, **kw, quadrature="adaptive" if m == "torch_gq" else None)
        for m in ("torch_direct", "torch_gq")
        if m != args.method
    ]
    with tempfile.TemporaryDirectory(prefix="gqbench-interference-") as tmp:
        workers = {}
        try:
            for i, case in enumerate([target, *others]):
                job = dict(kind="case", case=case.to_dict(), warmup=1, rewarm=0, reference=False, reference_dir=tmp)
                workers[case] = Worker(job, case, Path(tmp) / f"{i}.log", budget=3600)
                workers[case].request()  # set up and warmed up

            def timed(rewarm: int = 0) -> dict:
                for _ in range(rewarm):
                    workers[target].request("time")  # untimed for this purpose: its sample is dropped
                return workers[target].request("time")["sample"]

            def others_run() -> None:
                for case in others:
                    workers[case].request("time")

            # The three ways alternate within each round (order rotating), so the machine's drift hits
            # them alike; "idle" follows one of its own calls, as the others do not.
            ways = ["idle", "switch", "rewarm"]
            results = {w: [] for w in ways}
            for r in range(args.rounds):
                for way in ways[r % 3 :] + ways[: r % 3]:
                    if way == "idle":
                        timed()  # its previous call was its own, the other workers untouched since
                        results[way].append(timed())
                    else:
                        others_run()
                        results[way].append(timed(rewarm=1 if way == "rewarm" else 0))
        finally:
            for worker in workers.values():
                worker.close()
    print(f"{target.label} backward, {args.problem} w={args.width}, other workers: {[c.label for c in others]}")
    for name, samples in results.items():
        secs = [s["bwd_s"] for s in samples]
        faults = [s["bwd_page_faults"] for s in samples]
        print(f"{name:>7}: median {statistics.median(secs):.3f} s  [{' '.join(f'{x:.2f}' for x in secs)}]"
              f"  page faults (k) [{' '.join(f'{f / 1e3:.0f}' for f in faults)}]")  # fmt: skip


if __name__ == "__main__":
    main()
