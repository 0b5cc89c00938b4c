"""diffrax's own adjoint test scenario, timed: `jax_gq` (impls.jax.GaussLegendreAdjoint) against diffrax's
BacksolveAdjoint, each adjoint in a fresh process (issue 23, item 6: the scenario took ~13 min with GQ
where it took ~3 before the probe rule; target: GQ <= 1.3x BacksolveAdjoint).

The scenario is the one diffrax tests its adjoints on (written here from its description, not copied):
a linear 2-d field whose module holds an int and a float, args = (float, int), Tsit5 with a PID
controller at rtol = atol = 1e-8 on [0.3, 9.5], float64 with JAX's strict dtype promotion, loss =
sum of the saved ys; every SaveAt(t0, t1, ts) of t0, t1 in {True, False} and ts in {None, [0.3],
[2.0], [9.5], [1.0, 7.0], [0.3, 7.0, 9.5]} (23 of 24: not all three empty); for each, four jitted
gradients: grad, grad with allow_int (args and the module's leaves traced), vmap of grad and grad
of vmap. Each gradient is checked against DirectAdjoint's (rtol 1e-5, atol 1e-5, untimed) and the
seconds (trace + compile + first run) summed per adjoint.

    python benchmarks/jax_diffrax_scenario.py [ROUNDS]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

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
adjoint = diffrax.BacksolveAdjoint() if sys.argv[1] == "backsolve" else GaussLegendreAdjoint(warn=False)
seconds, worst, count = {k: 0.0 for k in flavours}, 0.0, 0
for t0 in (True, False):
    for t1 in (True, False):
        for ts in (None, [0.3], [2.0], [9.5], [1.0, 7.0], [0.3, 7.0, 9.5]):
            if not (t0 or t1 or ts):
                continue
            saveat = diffrax.SaveAt(t0=t0, t1=t1, ts=ts)
            for name, (fn, arg) in flavours.items():
                start = time.perf_counter()
                got = jax.block_until_ready(fn(arg, saveat, adjoint))
                seconds[name] += time.perf_counter() - start
                want = fn(arg, saveat, diffrax.DirectAdjoint())
                for g, w in zip(jtu.tree_leaves(got), jtu.tree_leaves(want)):
                    if jnp.issubdtype(w.dtype, jnp.inexact):
                        if not np.allclose(g, w, rtol=1e-5, atol=1e-5):
                            raise SystemExit(f"{sys.argv[1]} {saveat} {name}: {g} against direct {w}")
                        worst = max(worst, float(jnp.max(jnp.abs(g - w) / (1e-5 + 1e-5 * jnp.abs(w)))))
                count += 1
print(json.dumps(dict(seconds=seconds, total_s=sum(seconds.values()), gradients=count, worst=worst)))
"""


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    got = {m: [] for m in ("backsolve", "gq")}
    for _ in range(rounds):  # alternated, each in a fresh process
        for method in got:
            out = subprocess.run([sys.executable, "-c", _ONE, method], capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"{method}: {out.stderr.strip().splitlines()[-1]}")
            got[method].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(method, got[method][-1], flush=True)
    med = {m: statistics.median(r["total_s"] for r in rs) for m, rs in got.items()}
    per_round = sorted(g["total_s"] / b["total_s"] for g, b in zip(got["gq"], got["backsolve"]))
    print(f"diffrax adjoint scenario ({got['gq'][0]['gradients']} jitted gradients, each checked against "
          f"DirectAdjoint): backsolve {med['backsolve']:.1f} s, gq {med['gq']:.1f} s "
          f"(x{med['gq'] / med['backsolve']:.2f}; rounds x{per_round[0]:.2f}-x{per_round[-1]:.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
