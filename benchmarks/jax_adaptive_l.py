"""Workload L (MLP(t, y) of width w, batch 200, t in [0, 1]), dopri5 rtol = atol = 1e-3, float32:
`jax_gq` (impls.jax.GaussLegendreAdjoint) variants' backward time, alternated round by round in ONE process
through gqbench's own `measure.alternate`; gradient error against the suite's float64 reference (issue 17,
item 7). The cold and kronrod variants are cases the grid does not expand to (jax_gq has no warm_start axis;
"kronrod" is the JAX adjoint's fallback rule), built here as `Case`s directly.

    python benchmarks/jax_adaptive_l.py [WIDTH] [ROUNDS] [gtol,adaptive,kronrod,gtol_cold,...]
"""

from __future__ import annotations

import os
import statistics
import sys
import warnings

VARIANTS = {
    "gtol": dict(quadrature="gtol", gtol=0.1),
    "gtol_cold": dict(quadrature="gtol", gtol=0.1, warm_start=False),
    "adaptive": dict(quadrature="adaptive"),
    "adaptive_cold": dict(quadrature="adaptive", warm_start=False),
    "kronrod": dict(quadrature="kronrod"),
    "kronrod_cold": dict(quadrature="kronrod", warm_start=False),
}


def main() -> None:
    # The first case built sets JAX's threads (all cases share threads=2); the later builds' warning that
    # jax was already imported is expected here.
    warnings.filterwarnings("ignore", message="jax was imported before the case was built")
    from gqbench.define.case import Case
    from gqbench.measurement.measure import alternate, grad_rel_err, prepare, reference_gradients

    width = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    names = sys.argv[3].split(",") if len(sys.argv) > 3 else ["gtol", "gtol_cold", "adaptive", "adaptive_cold"]
    cases = {n: Case("jax_gq", "workload_l", width, 200, rtol=1e-3, atol=1e-3, **VARIANTS[n]) for n in names}
    errs = {}
    for name, case in cases.items():  # one untimed gradient each, for its error against the reference
        run = prepare(case)
        run.forward()
        run.backward()
        errs[name] = (grad_rel_err(run.gradients(), reference_gradients(case)), run.extra, run.nfe_backward)
    rows = alternate(list(cases.values()), warmup=1, repeats=rounds)
    bwd = {n: [r["bwd_s"] for r in rows if r["case_id"] == c.case_id] for n, c in cases.items()}
    fwd = {n: [r["fwd_s"] for r in rows if r["case_id"] == c.case_id] for n, c in cases.items()}
    base = statistics.median(bwd[names[0]])
    print(f"workload L w={width} float32 dopri5 1e-3, {rounds} rounds alternated; loadavg {os.getloadavg()[0]:.2f}")
    for name in names:
        m = statistics.median(bwd[name])
        err, extra, nfe = errs[name]
        print(f"{name:16s} bwd {1e3 * m:8.2f} ms (x{m / base:.2f} of {names[0]})  fwd "
              f"{1e3 * statistics.median(fwd[name]):7.2f} ms  err {err:.2e}  nfe_bwd {nfe}  "
              f"nodes {extra.get('quad_nodes')}")  # fmt: skip


if __name__ == "__main__":
    main()
