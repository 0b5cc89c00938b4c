"""The one measurement path: `prepare` a case, then `measure` it (warm-up, repeats, peak memory,
NFE, gradient error). The worker, asv and pytest-benchmark all call these functions."""

from __future__ import annotations

import math
import os
import resource
import time
import traceback
from pathlib import Path

import numpy as np

from ..define.case import Case
from ..define.methods import AbstractRun, Unsupported, get_method

REFERENCE_ENV = "GQBENCH_REFERENCE_DIR"
# The reference: direct backprop in float64 through dopri8, stepping onto every observation time
# (torchdiffeq's dopri8 interpolant between steps is low order and would spoil it).
REFERENCE_SOLVER = dict(method="dopri8", rtol=1e-10, atol=1e-10)
STATUSES = ("ok", "nan", "error", "timeout", "oom", "max_steps", "skipped")
# Bump when what a measurement means changes (timing/memory/NFE/error semantics, warm-up, the
# reference): asv keys its stored results on it (benchmarks/common.py), so old numbers measured
# under other rules are not compared with new ones.
# 2: the runner's rounds re-warm each method before its timed call; 3: each case in several fresh processes
# (RunSettings.processes), intervals over them
HARNESS_VERSION = "3"


# The case cannot run here (CUDA without a GPU, a method that cannot solve the problem): a `skipped` row.
# One class, defined beside the methods so that their `build` can raise it too.
Skip = Unsupported


def prepare(case: Case, cache_dir: str | Path | None = None) -> AbstractRun:
    """Threads, seed, problem (at its trained state when `case.train_steps`, from the cache in `cache_dir`:
    `gqbench.measurement.trained`) and method set up; the next forward()/backward() is timed work."""
    import torch

    from ..define.problems import get_problem

    method = get_method(case.method)
    reason = method.unsupported(case)
    if reason:
        raise Skip(reason)
    torch.set_num_threads(case.threads)
    torch.manual_seed(case.seed)
    problem = get_problem(case.problem).build(
        width=case.width, batch=case.batch, dtype=case.dtype, device=case.device, seed=case.seed
    )
    if case.train_steps or case.weights:
        from .trained import apply_trained

        apply_trained(problem.func, case, cache_dir)
    return method.build(case=case, problem=problem)


class PeakMemory:
    """Peak bytes allocated inside the block above what was in use when it started.

    CUDA: the caching allocator's own peak. CPU: the kernel's RSS high-water mark, reset through
    /proc/self/clear_refs (falls back to ru_maxrss, which cannot be reset: then only the first
    block in a process is meaningful). Call `return_freed_memory()` first (the runner's workers do,
    after their timed calls) so freed tensors go back to the kernel and the peak is the block's own.
    """

    def __init__(self, device: str, baseline: int | None = None):
        self.cuda = device.startswith("cuda")
        self.device = device
        self.bytes = float("nan")
        self.baseline = baseline  # measure above this many bytes instead of what is in use at entry

    @staticmethod
    def in_use(device: str) -> int:
        """Bytes in use now (CUDA: allocated by torch; CPU: resident set): a `baseline` to measure above."""
        if device.startswith("cuda"):
            import torch

            return torch.cuda.memory_allocated(device)
        try:
            return _vm("VmRSS")
        except OSError:
            return _maxrss()

    def __enter__(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device) if self.baseline is None else self.baseline
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self._proc = True
            except OSError:
                self._proc = False
            self._base = (_vm("VmRSS") if self._proc else _maxrss()) if self.baseline is None else self.baseline
        return self

    def __exit__(self, *exc):
        if self.cuda:
            import torch

            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            peak = _vm("VmHWM") if self._proc else _maxrss()
            self.bytes = max(0, peak - self._base)
        return False


def _vm(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/self/status")


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def warm_up(case: Case, warmup: int = 1, cache_dir: str | Path | None = None) -> tuple[AbstractRun, float]:
    """`prepare` the case and make `warmup` untimed calls: -> (run, setup seconds)."""
    t0 = time.perf_counter()
    run = prepare(case, cache_dir)
    setup_s = time.perf_counter() - t0
    untimed_calls(run, warmup)
    return run, setup_s


def untimed_calls(run: AbstractRun, n: int) -> None:
    """`n` forward + backward calls whose time is not taken (warm-up, re-warm)."""
    for _ in range(n):
        run.forward()
        run.backward()


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_call(run: AbstractRun, rewarm: int = 0) -> dict:
    """`rewarm` untimed calls, then one timed forward + backward (each returns after the device is
    idle): a sample's fields.

    `*_page_faults`: the process's minor page faults during the call (one getrusage each side,
    ~1 us). Fresh pages the allocator had to map (glibc mmaps blocks >= 32 MiB, and smaller ones
    when its adaptive threshold is low) are a large part of some methods' time on CPU -- torchdiffeq's
    adjoint at workload L w=2000 takes 0.3-0.7 M faults per backward depending on what ran earlier
    in the process -- and they say why a ratio moves between one process and another."""
    untimed_calls(run, rewarm)
    fa = minor_faults()
    a = time.perf_counter()
    run.forward()
    b = time.perf_counter()
    fb = minor_faults()
    run.backward()
    c = time.perf_counter()
    fc = minor_faults()
    return dict(
        fwd_s=b - a,
        bwd_s=c - b,
        fwd_page_faults=fb - fa,
        bwd_page_faults=fc - fb,
        nfe_fwd=run.nfe_forward,
        nfe_bwd=run.nfe_backward,
        loss=run.loss_value(),
        compile_s=run.compile_s,
        **run.extra,
    )


def alternate(
    cases: list[Case], warmup: int = 1, repeats: int = 7, rewarm: int = 0, cache_dir: str | Path | None = None
) -> list[dict]:
    """Every case of a comparison group prepared in THIS process and timed round by round, the order
    rotating each round, each timed call after `rewarm` untimed ones (as the runner's workers): the
    in-process check of the runner's ratios (`benchmarks/alternate.py`, one fresh worker per group).
    -> one row per sample, with its `round`."""
    runs = {case: warm_up(case, warmup, cache_dir)[0] for case in cases}
    rows = []
    for r in range(repeats):
        k = r % len(cases)
        for case in cases[k:] + cases[:k]:
            rows.append(dict(case.to_dict(), case_id=case.case_id, label=case.label, round=r, repeat=r,
                             status="ok", **time_call(runs[case], rewarm)))  # fmt: skip
    return rows


def memory_call(run: AbstractRun, device: str) -> float:
    """Peak bytes of one forward + backward above what was in use before (see `PeakMemory`)."""
    if not device.startswith("cuda"):
        _trim()  # free heap left by earlier calls would otherwise absorb part of this call's peak
    with PeakMemory(device) as mem:
        run.forward()
        run.backward()
    return float(mem.bytes)


def return_freed_memory() -> None:
    """From now on, glibc hands freed blocks >= 64 KiB back to the kernel (as MALLOC_MMAP_THRESHOLD_=65536
    would), so an RSS high-water mark measures the block's own peak. Only for memory repeats, after the
    timed ones: it slows allocation-heavy code (direct backprop's backward by up to 45%).

    malloc_trim(0) first returns what the timed calls left free in the heaps: without it the next call
    reuses those resident pages and its peak reads low (60 MB of live tensors measured as 40 MB)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _trim() -> None:
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def finish(
    case: Case,
    run: AbstractRun,
    samples: list[dict],
    *,
    peak_mem_bytes: float,
    setup_s: float,
    warmup: int,
    reference_dir: str | Path | None = None,
    reference: bool = True,
) -> list[dict]:
    """The case's rows, one per timed sample (`repeat` = `round`: the round it was timed in), with
    the peak memory, the gradient error against the float64 reference and the status."""
    method = get_method(case.method)
    grads = [np.asarray(g, dtype=np.float64) for g in run.gradients()]
    finite = all(np.isfinite(g).all() for g in grads) and all(math.isfinite(s["loss"]) for s in samples)
    err = float("nan")
    if finite and reference and method.needs_reference:
        err = grad_rel_err(grads, reference_gradients(case, cache_dir=reference_dir))
    return [
        dict(
            case.to_dict(),
            case_id=case.case_id,
            repeat=r,
            round=r,
            **sample,
            peak_mem_bytes=peak_mem_bytes,
            setup_s=setup_s,
            warmup=warmup,
            grad_rel_err=err,
            status="ok" if finite else "nan",
            error="" if finite else "non-finite loss or gradient",
        )
        for r, sample in enumerate(samples)
    ]


def measure(
    case: Case,
    *,
    repeats: int = 3,
    warmup: int = 1,
    reference_dir: str | Path | None = None,
    run: AbstractRun | None = None,
    reference: bool = True,
) -> list[dict]:
    """In one process: warm up, time `repeats` forward and backward calls, then one memory call.

    Rows carry the case fields, `repeat`, `fwd_s`, `bwd_s`, `peak_mem_bytes`, `nfe_fwd`, `nfe_bwd`,
    `grad_rel_err` (vs the cached float64 reference), `loss`, `status` ("ok" or "nan") and more.
    Exceptions propagate (the worker turns them into failure rows with `classify`).
    `run`: an already prepared run (asv/pytest-benchmark set up once); `reference=False`: no
    gradient error (NaN), e.g. when the reference could not be computed. The runner does the same
    steps in worker processes, with the timed calls of compared methods alternating round by round.
    Here the memory call keeps the default allocator (this process goes on timing other things) but
    trims the heap first, so blocks the timed calls freed do not absorb its peak (60 MiB stub: 59.9 MiB
    here, as in the runner's workers, which also `return_freed_memory()`).
    """
    if run is None:
        run, setup_s = warm_up(case, warmup, reference_dir)
    else:
        setup_s = 0.0
        untimed_calls(run, warmup)
    samples = [time_call(run) for _ in range(repeats)]
    peak = memory_call(run, case.device)
    return finish(case, run, samples, peak_mem_bytes=peak, setup_s=setup_s, warmup=warmup,
                  reference_dir=reference_dir, reference=reference)  # fmt: skip


def grad_rel_err(grads: list[np.ndarray], ref: list[np.ndarray]) -> float:
    """||g - g_ref|| / ||g_ref|| over all parameter and y0 gradients together."""
    if len(grads) != len(ref) or any(g.shape != r.shape for g, r in zip(grads, ref, strict=True)):
        raise ValueError(
            f"gradient shapes {[g.shape for g in grads]} do not match the reference's "
            f"{[r.shape for r in ref]}; gradients() must list params in order, then y0"
        )
    num = math.sqrt(sum(float(np.sum((g - r) ** 2)) for g, r in zip(grads, ref, strict=True)))
    den = math.sqrt(sum(float(np.sum(r**2)) for r in ref))
    return num / den if den > 0 else num


def reference_dir(cache_dir: str | Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get(REFERENCE_ENV) or Path.home() / ".cache" / "gqbench" / "references")


def reference_path(case: Case, cache_dir: str | Path | None = None) -> Path:
    """A user problem's file name carries a hash of its source file: an edited model gets a new reference.
    At a trained state, the reference is the trained state's (its file's name, `reference-` before it)."""
    if case.train_steps or case.weights:
        from .trained import trained_path

        path = trained_path(case, cache_dir)
        return path.with_name("reference-" + path.name)
    problem, width, batch, seed = case.reference_key
    stem = problem
    if ":" in problem:  # "pkg.module:make" / "file.py:make" (imported only then: it loads torch)
        from ..define.user_problems import cache_name

        stem = cache_name(problem)
    return reference_dir(cache_dir) / f"{stem}-w{width}-b{batch}-s{seed}.npz"


def reference_gradients(case: Case, *, cache_dir: str | Path | None = None) -> list[np.ndarray]:
    """The float64 reference gradient for the case's (problem, width, batch, seed), cached on disk."""
    path = reference_path(case, cache_dir)
    if path.exists():
        with np.load(path) as z:
            return [z[f"g{i}"] for i in range(len(z.files))]
    grads = compute_reference(case, cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, **{f"g{i}": g for i, g in enumerate(grads)})
    os.replace(tmp, path)  # atomic: a concurrent or killed writer never leaves half a file
    return grads


def compute_reference(case: Case, cache_dir: str | Path | None = None) -> list[np.ndarray]:
    """Closed form where the problem has one, else float64 direct backprop through dopri8; at the case's
    trained state (cast to float64) when `train_steps` is set."""
    import torch
    import torchdiffeq

    from ..define.problems import get_problem

    torch.set_num_threads(case.threads)
    problem = get_problem(case.problem)
    inst = problem.build(width=case.width, batch=case.batch, dtype="float64", device="cpu", seed=case.seed)
    if case.train_steps or case.weights:
        from .trained import apply_trained

        apply_trained(inst.func, case, cache_dir)
    exact = problem.exact_gradients(inst)
    if exact is None:
        y0 = inst.y0.detach().requires_grad_(True)
        ys = torchdiffeq.odeint(inst.func, y0, inst.t, options=dict(step_t=inst.t), **REFERENCE_SOLVER)
        exact = torch.autograd.grad(inst.loss(ys), (*inst.params, y0), allow_unused=True)
        wrt = (*inst.params, y0)
        exact = [torch.zeros_like(p) if g is None else g for p, g in zip(wrt, exact, strict=True)]
    return [g.detach().numpy() for g in exact]


def classify(exc: BaseException) -> str:
    """The `status` of a case that raised `exc`."""
    text = f"{type(exc).__name__}: {exc}".lower()
    if isinstance(exc, Skip):
        return "skipped"
    if isinstance(exc, MemoryError) or "out of memory" in text or "can't allocate memory" in text:
        return "oom"
    if "max_num_steps" in text:
        return "max_steps"
    return "error"


def one_line(exc: BaseException) -> str:
    """A failure row's `error`: the exception's type and message on one line, and where it was raised."""
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" (at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno})" if tb else ""
    text = " ".join(str(exc).split())
    if len(text) > 500:
        text = text[:497] + "..."
    return f"{type(exc).__name__}: {text}{where}"


def failure_rows(case: Case, status: str, error: str) -> list[dict]:
    """The single row recorded for a case that produced no measurements."""
    nan = float("nan")
    return [
        dict(
            case.to_dict(),
            case_id=case.case_id,
            repeat=0,
            fwd_s=nan,
            bwd_s=nan,
            peak_mem_bytes=nan,
            nfe_fwd=nan,
            nfe_bwd=nan,
            grad_rel_err=nan,
            loss=nan,
            compile_s=nan,
            setup_s=nan,
            status=status,
            error=error,
        )
    ]
