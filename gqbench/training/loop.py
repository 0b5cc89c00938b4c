"""The epoch loop of an `ODEExperiment`, the same for every method, and its timing.

Fair to every method: the same initial weights (the case's seed), the same batch order (a generator seeded
by the case's seed), Adam at the case's `lr`, the same threads. Per step, forward (encoder, solve, loss),
backward and the optimiser step are timed apart, the device synchronised before each clock read, under
the default allocator. Per epoch: those times summed, forward and backward NFE and (GQ) quadrature nodes
summed (`quad_nodes`, NaN for methods without quadrature), the mean training
loss, the validation metric (the model solved with torchdiffeq's odeint under no_grad at the case's solver
and tolerances -- the same evaluation for every method, outside the timed phases) and the peak memory.
Epoch 0 is the untrained model (validation only). A run whose loss turns non-finite stops there: its
epochs so far are kept and its results row says `nan` ("diverged").
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

from ..define.case import Case
from ..define.experiments import DATA_SEED, Dataset, ODEExperiment


class Diverged(FloatingPointError):
    """The training loss became non-finite."""


class CountedSolve:
    """`solve(func, y0, t)` of the case's method with NFE counted: the baselines by wrapping the field
    (`impls.NFECounter`), GQ by its own `gq_stats` (as the gradient measurement does)."""

    def __init__(self, case: Case, field):
        import impls

        from ..define.methods import get_method

        method = get_method(case.method)
        if not hasattr(method, "solver"):
            raise TypeError(f"{case.method} has no solve(func, y0, t) to train with; use one of the torch methods")
        self._impls = impls
        self._solve = method.solver(case)
        self.own_stats = method.quadrature
        self.field = field if self.own_stats else impls.NFECounter(field)
        self._stats = None
        self.nfe_forward = self.nfe_backward = 0
        self.quad_nodes = float("nan")  # GQ's quadrature nodes of the last backward (NaN: not a quadrature method)

    def __call__(self, field, y0, t):
        if self.own_stats:
            with self._impls.gq_stats() as self._stats:
                ys = self._solve(self.field, y0, t)
            self.nfe_forward = self._stats.nfe_forward
        else:
            self.field.nfe = 0
            ys = self._solve(self.field, y0, t)
            self.nfe_forward = self.field.nfe
        return ys

    def after_backward(self) -> None:
        self.nfe_backward = self._stats.nfe_backward if self.own_stats else self.field.nfe - self.nfe_forward
        if self.own_stats:
            self.quad_nodes = self._stats.quad_nodes


def train(experiment: ODEExperiment, case: Case, data: Dataset, *, on_epoch: Callable | None = None):
    """Train one model; -> (epoch rows, error or None). Stops at a non-finite loss or an exception
    (the error says which and where); the rows so far are returned either way."""
    import torch

    from ..measurement.measure import PeakMemory, classify, minor_faults, one_line

    dtype = getattr(torch, case.dtype)
    data = data.to(case.device, dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(case.seed)  # the same initial weights for every method of a seed
        model = experiment.make_model(width=case.width).to(device=case.device, dtype=dtype)
    solve = CountedSolve(case, model.field)
    optimiser = torch.optim.Adam(model.parameters(), lr=case.lr)
    order = torch.Generator().manual_seed(case.seed)  # the same batch order for every method of a seed
    sync = solve._impls.synchronize
    n = len(data.x_train)
    baseline = PeakMemory.in_use(case.device)
    rows, wall = [], 0.0

    def validate(row):
        with torch.no_grad():
            pred = model(data.x_val, data.t, lambda f, y0, t: solve._impls.odeint_direct(
                f, y0, t, rtol=case.rtol, atol=case.atol, method=case.solver))  # fmt: skip
            row["val_loss"] = float(experiment.loss(pred=pred, target=data.y_val))
            row["val_metric"] = experiment.metric(pred=pred, target=data.y_val)
        row["metric"] = experiment.metric_name
        rows.append(row)
        if on_epoch is not None:
            on_epoch(row)

    validate(dict(epoch=0, fwd_s=0.0, bwd_s=0.0, step_s=0.0, epoch_s=0.0, wall_s=0.0, nfe_fwd=0, nfe_bwd=0,
                  quad_nodes=math.nan, loss=math.nan, peak_mem_bytes=math.nan, batches=0, bwd_page_faults=0,
                  step_page_faults=0))  # fmt: skip
    for epoch in range(1, case.epochs + 1):
        row = dict(epoch=epoch, fwd_s=0.0, bwd_s=0.0, step_s=0.0, nfe_fwd=0, nfe_bwd=0, quad_nodes=0.0, loss=0.0,
                   batches=0, bwd_page_faults=0, step_page_faults=0)  # fmt: skip
        perm = torch.randperm(n, generator=order).to(case.device)
        try:
            with PeakMemory(case.device, baseline=baseline) as mem:
                for idx in perm.split(case.batch):
                    optimiser.zero_grad(set_to_none=True)
                    sync(case.device)
                    a = time.perf_counter()
                    loss = experiment.loss(pred=model(data.x_train[idx], data.t, solve), target=data.y_train[idx])
                    sync(case.device)
                    b = time.perf_counter()
                    fb = minor_faults()
                    loss.backward()
                    sync(case.device)
                    c = time.perf_counter()
                    fc = minor_faults()
                    solve.after_backward()
                    optimiser.step()
                    sync(case.device)
                    d = time.perf_counter()
                    # Pages the step maps afresh: after a backward that freed little (GQ's), glibc has
                    # returned the heap's top and Adam's temporaries fault it back in (docs/measuring.md).
                    row["step_page_faults"] += minor_faults() - fc
                    row["bwd_page_faults"] += fc - fb
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        raise Diverged(f"training loss is {value} at epoch {epoch}, batch {row['batches'] + 1}")
                    row["fwd_s"] += b - a
                    row["bwd_s"] += c - b
                    row["step_s"] += d - c
                    row["nfe_fwd"] += solve.nfe_forward
                    row["nfe_bwd"] += solve.nfe_backward
                    row["quad_nodes"] += solve.quad_nodes  # summed over the epoch's batches, as the NFE
                    row["loss"] += value * len(idx) / n
                    row["batches"] += 1
        except Exception as exc:  # noqa: BLE001 -- a failing run keeps its epochs and becomes a failure row
            status = "nan" if isinstance(exc, Diverged) else classify(exc)
            return rows, (status, one_line(exc))
        row["epoch_s"] = row["fwd_s"] + row["bwd_s"] + row["step_s"]
        wall += row["epoch_s"]
        row["wall_s"] = wall
        row["peak_mem_bytes"] = float(mem.bytes)
        validate(row)
    return rows, None


def run_case(experiment: ODEExperiment, *, case: Case, cache_dir=None):
    """The worker's entry for an ODE experiment: train; one results row (medians over the trained epochs,
    the first left out when there are three or more: it holds the warm-up) and the `epochs` table."""
    import torch

    from ..measurement.measure import Skip

    if case.device.startswith("cuda") and not torch.cuda.is_available():
        raise Skip(f"device={case.device} but torch.cuda.is_available() is False on this machine")
    if case.lr is None or case.epochs is None:
        raise ValueError(f"{case.problem}: a training case needs epochs and lr (got {case.epochs}, {case.lr})")
    torch.set_num_threads(case.threads)
    t0 = time.perf_counter()
    data = experiment.make_data(seed=DATA_SEED)
    setup_s = time.perf_counter() - t0
    epochs, failure = train(experiment, case, data)
    key = dict(case.to_dict(), case_id=case.case_id)
    trained = [r for r in epochs if r["epoch"] > 0]
    timed = trained[1:] if len(trained) >= 3 else trained

    def med(k):
        return float(statistics.median(r[k] for r in timed)) if timed else math.nan

    last = epochs[-1]
    metrics = [r["val_metric"] for r in epochs]
    best = (max if experiment.higher_is_better else min)(metrics)
    row = dict(key, repeat=0, fwd_s=med("fwd_s"), bwd_s=med("bwd_s"), step_s=med("step_s"), epoch_s=med("epoch_s"),
               nfe_fwd=med("nfe_fwd"), nfe_bwd=med("nfe_bwd"), quad_nodes=med("quad_nodes"),
               peak_mem_bytes=max((r["peak_mem_bytes"] for r in trained), default=math.nan),
               grad_rel_err=math.nan, loss=last["loss"], val_metric=last["val_metric"], best_val_metric=best,
               metric=experiment.metric_name, epochs_done=len(trained), train_s=last["wall_s"],
               compile_s=math.nan, setup_s=setup_s, warmup=0, status="ok", error="")  # fmt: skip
    if failure is not None:
        row.update(status=failure[0], error=failure[1])
    elif not all(math.isfinite(m) for m in metrics):
        row.update(status="nan", error="non-finite validation metric")
    return [row], dict(epochs=[dict(key, **r) for r in epochs])
