"""diffrax's own adjoint test scenario, timed: `jax_gq` (impls.jax.GaussLegendreAdjoint) and its other
rules against diffrax's BacksolveAdjoint, each adjoint in a fresh process (issue 23, item 6: the scenario took
~13 min with GQ where it took ~3 before the probe rule; target: GQ <= 1.3x BacksolveAdjoint).

The scenario is the one diffrax tests its adjoints on (written here from its description, not copied):
a linear 2-d field whose module holds an int and a float, args = (float, int), Tsit5 with a PID
controller at rtol = atol = 1e-8 on [0.3, 9.5], float64 with JAX's strict dtype promotion, loss =
sum of the saved ys; every SaveAt(t0, t1, ts) of t0, t1 in {True, False} and ts in {None, [0.3],
[2.0], [9.5], [1.0, 7.0], [0.3, 7.0, 9.5]} (23 of 24: not all three empty); for each, four jitted
gradients: grad, grad with allow_int (args and the module's leaves traced), vmap of grad and grad
of vmap. DirectAdjoint's gradients are computed once, in a process of their own, and every other
adjoint's are checked against them (rtol 1e-5, atol 1e-5). Per adjoint: the seconds of trace (`lower`),
XLA compile (`compile`) and first run, summed over the 92 gradients; on a 2-d field compilation is
nearly all of it.

    python benchmarks/jax_diffrax_scenario.py [ROUNDS] [backsolve,gq,kronrod,gtol]

Adjoints: backsolve (diffrax.BacksolveAdjoint), gq (GaussLegendreAdjoint(), the default rule), kronrod
(quadrature="kronrod"), gtol (gtol=0.1, the paper's rule, no error control).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

_ONE = r"""
import json, sys, time
import jax
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
import diffrax, equinox as eqx, jax.numpy as jnp, jax.tree_util as jtu, numpy as np
from impls.jax import GaussLegendreAdjoint


class Field(eqx.Module):
    nondiff_arg: int
    diff_arg: float

    def __call__(self, t, y, args):
        scale, mix = args
        return jnp.stack([scale * y[0] + mix * y[1], self.nondiff_arg * y[0] + self.diff_arg * y[1]])


def loss(y0__args__term, saveat, adjoint):
    y0, args, term = y0__args__term
    sol = diffrax.diffeqsolve(term, diffrax.Tsit5(), 0.3, 9.5, None, y0, args, saveat=saveat, adjoint=adjoint,
                              stepsize_controller=diffrax.PIDController(rtol=1e-8, atol=1e-8))
    return jnp.sum(sol.ys)


whole = (jnp.array([0.9, 5.4]), (0.1, -1), diffrax.ODETerm(Field(nondiff_arg=1, diff_arg=-0.1)))
inexact, static = eqx.partition(whole, eqx.is_inexact_array)
twice = jtu.tree_map(lambda x: jnp.stack([x, x]), inexact)


def on_inexact(inexact, saveat, adjoint):
    return loss(eqx.combine(inexact, static), saveat, adjoint)


def grad_of_vmap(twice, saveat, adjoint):
    return jax.grad(lambda tw: jnp.sum(jax.vmap(on_inexact, in_axes=(0, None, None))(tw, saveat, adjoint)))(twice)


flavours = dict(
    grad=(eqx.filter_jit(jax.grad(on_inexact)), inexact),
    grad_int=(eqx.filter_jit(jax.grad(loss, allow_int=True)), whole),
    vmap_grad=(eqx.filter_jit(jax.vmap(jax.grad(on_inexact), in_axes=(0, None, None))), twice),
    grad_vmap=(eqx.filter_jit(grad_of_vmap), twice),
)
ADJOINTS = dict(
    direct=diffrax.DirectAdjoint,
    backsolve=diffrax.BacksolveAdjoint,
    gq=lambda: GaussLegendreAdjoint(warn=False),
    kronrod=lambda: GaussLegendreAdjoint(quadrature="kronrod", warn=False),
    gtol=lambda: GaussLegendreAdjoint(gtol=0.1, warn=False),
)
method, refs = sys.argv[1], sys.argv[2]
adjoint = ADJOINTS[method]()
want = {} if method == "direct" else dict(np.load(refs))
mine, worst, count = {}, 0.0, 0
seconds = {part: {k: 0.0 for k in flavours} for part in ("trace", "xla", "run")}
saveats = [diffrax.SaveAt(t0=t0, t1=t1, ts=ts) for t0 in (True, False) for t1 in (True, False)
           for ts in (None, [0.3], [2.0], [9.5], [1.0, 7.0], [0.3, 7.0, 9.5]) if t0 or t1 or ts]
for i, saveat in enumerate(saveats):
    for name, (fn, arg) in flavours.items():
        a = time.perf_counter()
        lowered = fn.lower(arg, saveat, adjoint)
        b = time.perf_counter()
        compiled = lowered.compile()
        c = time.perf_counter()
        got = jax.block_until_ready(compiled(arg, saveat, adjoint))
        d = time.perf_counter()
        for part, s in zip(seconds, (b - a, c - b, d - c)):
            seconds[part][name] += s
        leaves = [np.asarray(g) for g in jtu.tree_leaves(got) if jnp.issubdtype(g.dtype, jnp.inexact)]
        for j, g in enumerate(leaves):
            key = f"{i}/{name}/{j}"
            mine[key] = g
            if method == "direct":
                continue
            w = want[key]
            if not np.allclose(g, w, rtol=1e-5, atol=1e-5):
                raise SystemExit(f"{method} {saveat} {name}: {g} against DirectAdjoint's {w}")
            worst = max(worst, float(np.max(np.abs(g - w) / (1e-5 + 1e-5 * np.abs(w)))))
        count += 1
if method == "direct":
    np.savez(refs, **mine)
total = {part: sum(v.values()) for part, v in seconds.items()}
print(json.dumps(dict(seconds={k: sum(seconds[p][k] for p in seconds) for k in flavours}, trace_s=total["trace"],
                      xla_s=total["xla"], run_s=total["run"], total_s=sum(total.values()), gradients=count,
                      worst=worst)))
"""


def _one(method: str, refs: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _ONE, method, refs], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{method}: {out.stderr.strip().splitlines()[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    methods = (sys.argv[2] if len(sys.argv) > 2 else "backsolve,gq").split(",")
    if "backsolve" not in methods:
        methods.insert(0, "backsolve")
    got = {m: [] for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        refs = os.path.join(tmp, "direct.npz")
        direct = _one("direct", refs)  # the reference gradients, once
        print("direct", direct, flush=True)
        for r in range(rounds):  # alternated, each in a fresh process, the order rotating
            for method in methods[r % len(methods) :] + methods[: r % len(methods)]:
                got[method].append(_one(method, refs))
                print(method, got[method][-1], flush=True)
    med = lambda m, k: statistics.median(x[k] for x in got[m])
    base = med("backsolve", "total_s")
    print(
        f"diffrax adjoint scenario ({direct['gradients']} jitted gradients, each checked against DirectAdjoint's; "
        f"{rounds} round(s); medians, seconds):"
    )
    print("| adjoint | trace | XLA compile | first run | total | / BacksolveAdjoint (rounds) |")
    print("|---|---|---|---|---|---|")
    for m in methods:
        per_round = sorted(g["total_s"] / b["total_s"] for g, b in zip(got[m], got["backsolve"]))
        print(
            f"| {m} | {med(m, 'trace_s'):.1f} | {med(m, 'xla_s'):.1f} | {med(m, 'run_s'):.1f} | "
            f"{med(m, 'total_s'):.1f} | {med(m, 'total_s') / base:.2f} ({per_round[0]:.2f}-{per_round[-1]:.2f}) |"
        )


if __name__ == "__main__":
    main()
