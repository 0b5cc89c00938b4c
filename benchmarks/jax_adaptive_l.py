"""Workload L (MLP(t, y) of width w, batch 200, state 5, t in [0, 1]), dopri5 rtol = atol = 1e-3, float32:
impls.jax.GaussLegendreAdjoint variants' backward time, alternated round by round in one process; gradient
error against float64 RecursiveCheckpointAdjoint + Dopri8 at 1e-12 on the same weights (issue 17, item 7).

    PYTHONPATH=. python benchmarks/jax_adaptive_l.py [WIDTH] [ROUNDS] [gtol,adaptive,kronrod,gtol_cold,...]
"""

import os
import statistics
import sys
import time


def main() -> None:
    os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=2"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import diffrax
    import jax
    import jax.numpy as jnp
    import numpy as np

    jax.config.update("jax_enable_x64", True)
    from gqbench.define.jax_methods import _field_from_torch
    from gqbench.define.problems import get_problem
    from impls.jax import GaussLegendreAdjoint

    width = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    variants = sys.argv[3].split(",") if len(sys.argv) > 3 else ["gtol", "gtol_cold", "adaptive", "adaptive_cold"]
    inst = get_problem("workload_l").build(width=width, dtype="float32")

    def make(dtype):
        put = lambda x: jnp.asarray(x.detach().cpu().numpy(), dtype=dtype)
        field, order = _field_from_torch(inst.func, put)
        return (field, put(inst.y0)), put(inst.t), order

    def solver_fn(adjoint, t, solver, tol):
        def solve(diff):
            fld, y0 = diff
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(fld),
                solver,
                t[0],
                t[-1],
                None,
                y0,
                saveat=diffrax.SaveAt(ts=t),
                stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol),
                adjoint=adjoint,
                max_steps=4096,
            )
            return jnp.sum(sol.ys[-1] ** 2)

        return solve

    diff64, t64, order = make(jnp.float64)
    ref = jax.jit(jax.grad(solver_fn(diffrax.RecursiveCheckpointAdjoint(), t64, diffrax.Dopri8(), 1e-12)))(diff64)
    flat = lambda g: np.concatenate([np.asarray(x, np.float64).ravel() for x in (*order(g[0]), g[1])])
    ref = flat(ref)
    diff, t, _ = make(jnp.float32)

    ADJ = {
        "gtol": dict(gtol=0.1),
        "gtol_cold": dict(gtol=0.1, warm_start=False),
        "adaptive": dict(),
        "adaptive_cold": dict(warm_start=False),
        "kronrod": dict(quadrature="kronrod"),
        "kronrod_cold": dict(quadrature="kronrod", warm_start=False),
    }
    runs = {}
    for name in variants:
        kw = ADJ[name]
        adj = GaussLegendreAdjoint(**kw)
        solve = solver_fn(adj, t, diffrax.Dopri5(), 1e-3)
        fwd = jax.jit(lambda d, solve=solve: jax.vjp(solve, d))
        value, vjp = fwd(diff)
        bwd = jax.jit(lambda vjp, v: vjp(jnp.ones_like(v))[0])
        g = jax.block_until_ready(bwd(vjp, value))
        reps = []
        jax.block_until_ready(
            jax.jit(jax.grad(solver_fn(GaussLegendreAdjoint(report=reps.append, **kw), t, diffrax.Dopri5(), 1e-3)))(
                diff
            )
        )
        jax.effects_barrier()
        r = reps[-1]
        err = np.linalg.norm(flat(g) - ref) / np.linalg.norm(ref)
        runs[name] = dict(
            fwd=fwd,
            bwd=bwd,
            times=[],
            ftimes=[],
            err=err,
            nodes=int(np.sum(r["gq_quad_nodes"])),
            nfe=int(r.get("gq_nfe_backward", -1)),
            lvl=np.asarray(r["gq_panel_levels"]).tolist(),
        )
    for _ in range(rounds):
        for R in runs.values():
            a = time.perf_counter()
            value, vjp = jax.block_until_ready(R["fwd"](diff))
            b = time.perf_counter()
            jax.block_until_ready(R["bwd"](vjp, value))
            c = time.perf_counter()
            R["ftimes"].append(b - a)
            R["times"].append(c - b)
    base = statistics.median(runs[variants[0]]["times"])
    print(f"workload L w={width} float32 dopri5 1e-3, {rounds} rounds alternated; loadavg {os.getloadavg()[0]:.2f}")
    for name, R in runs.items():
        m = statistics.median(R["times"])
        print(
            f"{name:16s} bwd {1e3 * m:8.2f} ms (x{m / base:.2f} of {variants[0]})"
            f"  fwd {1e3 * statistics.median(R['ftimes']):7.2f} ms"
            f"  err {R['err']:.2e}  nfe_bwd {R['nfe']}  nodes {R['nodes']} levels {R['lvl']}"
        )


if __name__ == "__main__":
    main()
