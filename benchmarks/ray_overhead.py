"""What running a grid through Ray costs per case, against the local runner (issue 13's figure).

    python benchmarks/ray_overhead.py [--preset smoke] [--rounds 2]

Reference gradients are computed once first (untimed) and shared, so both executors do the same
work; then the grid runs locally and through a local Ray cluster, alternately, `--rounds` times
each, into fresh folders. Prints wall seconds per case for each executor, the difference, Ray's
start-up (once per run, reported apart), and checks that case ids and statuses are identical.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from gqbench import load_preset, run_grid


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="smoke")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    import ray

    spec = load_preset(args.preset)
    with tempfile.TemporaryDirectory(prefix="gqbench-ray-overhead-") as tmp:
        tmp = Path(tmp)
        refs = tmp / "references"
        run_grid(spec.cases, tmp / "prime", settings=spec.settings, progress=False, reference_dir=refs)
        t0 = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, _temp_dir=str(tmp / "ray"))
        startup = time.perf_counter() - t0
        address = ray.get_runtime_context().gcs_address
        walls = {"local": [], "ray": []}
        tables = {}
        try:
            for r in range(args.rounds):
                for executor in ("local", "ray") if r % 2 == 0 else ("ray", "local"):
                    t0 = time.perf_counter()
                    df = run_grid(spec.cases, tmp / f"{executor}{r}", settings=spec.settings, progress=False,
                                  reference_dir=refs, executor=executor, address=address)  # fmt: skip
                    walls[executor].append((time.perf_counter() - t0) / len(spec.cases))
                    tables[executor] = df.groupby("case_id")["status"].first().to_dict()
        finally:
            ray.shutdown()
    n = len(spec.cases)
    local, remote = statistics.median(walls["local"]), statistics.median(walls["ray"])
    print(f"{args.preset}: {n} cases, {args.rounds} runs each, alternated")
    print(f"local runner: {local:.2f} s per case (runs: {', '.join(f'{w:.2f}' for w in walls['local'])})")
    print(f"ray:          {remote:.2f} s per case (runs: {', '.join(f'{w:.2f}' for w in walls['ray'])})")
    print(f"overhead:     {remote - local:+.2f} s per case ({remote / local - 1:+.0%})")
    print(f"Ray start-up: {startup:.1f} s, once per run")
    same = tables["local"] == tables["ray"]
    print(f"case ids and statuses identical: {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
