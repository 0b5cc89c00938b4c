"""Profile chosen cases: traces for TensorBoard (torch-tb-profiler) and Perfetto, and a phase
breakdown per case for the HTML report ("where the time goes").

Layout of `OUT` (default `reports/profiles`), one folder per case so TensorBoard lists one run
per case::

    OUT/<case_id>/<method>.<timestamp>.pt.trace.json   torch.profiler trace (tensorboard_trace_handler)
    OUT/<case_id>/plugins/profile/...                  JAX cases: jax.profiler.trace output
    OUT/<case_id>/memory_snapshot.pickle               CUDA only: torch.cuda.memory._dump_snapshot
    OUT/<case_id>/phases.json                          the phase breakdown (see `profile_case`)
    OUT/<case_id>/ops.txt                              key_averages() table, by self time

Each case runs in a fresh process (a `gqbench.measurement.launch.Worker`, as the runner starts them), like the benchmark
worker, with the same thread environment; `profile_case` is the in-process function it calls.
Step = one forward + one backward, each inside an outer `record_function` range
(`gqbench::forward`, `gqbench::backward`); the GQ adjoint adds its own ranges inside them
(`gq::forward_solve`, `gq::backward_solve`, `gq::quadrature_vjp`, `gq::accumulate`). The
profiler's schedule skips `warmup` steps and records `steps` steps.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from ..define.case import Case

DEFAULT_OUT = Path("reports") / "profiles"
OUTER = {"forward": "gqbench::forward", "backward": "gqbench::backward"}
# Inner ranges of the GQ adjoint (impls/_gq.py) and the outer phase each one sits in.
INNER = {
    "gq::forward_solve": "forward",
    "gq::backward_solve": "backward",
    "gq::quadrature_vjp": "backward",
    "gq::accumulate": "backward",
}
TOP_OPS = 12


def _trace_files(case_dir: Path) -> list[str]:
    return sorted(p.name for p in case_dir.glob("*.pt.trace.json*"))


def _clear(case_dir: Path) -> None:
    """Drop an earlier profile of the same case (TensorBoard would show both as spans)."""
    for p in case_dir.glob("*.pt.trace.json*"):
        p.unlink()
    for name in ("phases.json", "ops.txt", "memory_snapshot.pickle"):
        (case_dir / name).unlink(missing_ok=True)


def profile_case(
    case: Case,
    out_dir: str | Path = DEFAULT_OUT,
    *,
    steps: int = 2,
    warmup: int = 1,
    with_stack: bool = False,
    memory_snapshot: bool = True,
) -> dict:
    """Profile `case` in this process; returns (and writes to `OUT/<case_id>/phases.json`) the
    breakdown: {"case_id", "label", "case", "backend", "steps", "warmup", "phases": [{"phase",
    "label", "parent", "ms", "calls"}], "leaves": [...], "top_ops": {...}, "nfe_fwd", "nfe_bwd",
    "trace_files", "memory_snapshot", ...}. `ms` is milliseconds per recorded step."""
    from ..define.methods import get_method
    from .measure import prepare

    if steps < 1 or warmup < 0:
        raise ValueError(f"profile_case(steps={steps}, warmup={warmup}): need steps >= 1 and warmup >= 0")
    case_dir = Path(out_dir) / case.case_id
    case_dir.mkdir(parents=True, exist_ok=True)
    _clear(case_dir)
    backend = get_method(case.method).backend
    t0 = time.perf_counter()
    run = prepare(case)
    setup_s = time.perf_counter() - t0
    if backend == "jax":
        result = _profile_jax(run, case, case_dir, steps=steps, warmup=warmup)
    else:
        result = _profile_torch(run, case, case_dir, steps=steps, warmup=warmup, with_stack=with_stack)
        if memory_snapshot and case.device.startswith("cuda"):
            result["memory_snapshot"] = _cuda_snapshot(run, case_dir)
    result.update(
        case_id=case.case_id,
        label=case.label,
        case=case.to_dict(),
        backend=backend,
        steps=steps,
        warmup=warmup,
        setup_s=setup_s,
        nfe_fwd=run.nfe_forward,
        nfe_bwd=run.nfe_backward,
        compile_s=run.compile_s,
        trace_files=_trace_files(case_dir),
    )
    result.setdefault("memory_snapshot", None)
    result["leaves"] = leaf_phases(result["phases"])
    (case_dir / "phases.json").write_text(json.dumps(result, indent=2, default=_json_default))
    (case_dir / "case.json").write_text(json.dumps(case.to_dict(), indent=2))
    return result


def _json_default(x):
    try:
        return x.item()
    except AttributeError:
        return str(x)


def _profile_torch(run, case: Case, case_dir: Path, *, steps: int, warmup: int, with_stack: bool) -> dict:
    import torch
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    activities = [ProfilerActivity.CPU]
    cuda = case.device.startswith("cuda")
    if cuda:
        activities.append(ProfilerActivity.CUDA)
    wall = {"forward": [], "backward": []}
    handler = tensorboard_trace_handler(str(case_dir), worker_name=case.method)
    with profile(
        activities=activities,
        schedule=schedule(wait=0, warmup=warmup, active=steps, repeat=1),
        on_trace_ready=handler,
        record_shapes=True,
        profile_memory=True,
        with_stack=with_stack,
    ) as prof:
        for i in range(warmup + steps):
            a = time.perf_counter()
            with record_function(OUTER["forward"]):
                run.forward()
            b = time.perf_counter()
            with record_function(OUTER["backward"]):
                run.backward()
            c = time.perf_counter()
            if i >= warmup:
                wall["forward"].append((b - a) * 1e3)
                wall["backward"].append((c - b) * 1e3)
            prof.step()
    averages = prof.key_averages()
    (case_dir / "ops.txt").write_text(
        averages.table(sort_by="self_cpu_time_total", row_limit=60, max_name_column_width=60)
    )
    by_key = {}
    for e in averages:
        # On CUDA a range also shows up as a device-side annotation; keep the host-side one.
        if e.key not in by_key or e.cpu_time_total > by_key[e.key].cpu_time_total:
            by_key[e.key] = e
    phases = []
    for phase, label in OUTER.items():
        e = by_key.get(label)
        phases.append(_phase_row(phase, label, None, e, steps, cuda))
    for label, parent in INNER.items():
        e = by_key.get(label)
        if e is not None:
            phases.append(_phase_row(label, label, parent, e, steps, cuda))
    return dict(
        phases=phases,
        wall_ms=wall,
        top_ops=_top_ops(prof.events(), steps),
        source="torch.profiler key_averages()",
        torch=torch.__version__,
    )


def _phase_row(phase: str, label: str, parent: str | None, e, steps: int, cuda: bool) -> dict:
    if e is None:
        return dict(phase=phase, label=label, parent=parent, ms=0.0, calls=0)
    row = dict(phase=phase, label=label, parent=parent, ms=e.cpu_time_total / 1e3 / steps, calls=e.count / steps)
    if cuda:
        row["device_ms"] = getattr(e, "device_time_total", 0.0) / 1e3 / steps
    return row


def _top_ops(events, steps: int) -> dict:
    """Per outer phase, the operators with the most self CPU time inside it (by time interval,
    so ops that autograd runs on another thread count too)."""
    ranges = {p: [] for p in OUTER}
    for e in events:
        for p, label in OUTER.items():
            if e.name == label:
                ranges[p].append((e.time_range.start, e.time_range.end))
    skip = set(OUTER.values()) | set(INNER) | {"ProfilerStep"}
    out = {}
    for p, spans in ranges.items():
        totals: dict[str, list[float]] = {}
        for e in events:
            if e.name in skip or e.name.startswith("ProfilerStep"):
                continue
            s = e.time_range.start
            if any(lo <= s and e.time_range.end <= hi for lo, hi in spans):
                t = totals.setdefault(e.name, [0.0, 0])
                t[0] += e.self_cpu_time_total
                t[1] += 1
        top = sorted(totals.items(), key=lambda kv: -kv[1][0])[:TOP_OPS]
        out[p] = [dict(name=n, self_ms=v[0] / 1e3 / steps, calls=v[1] / steps) for n, v in top]
    return out


def _cuda_snapshot(run, case_dir: Path) -> str | None:
    """One more forward+backward with the allocator's history recorded (after the profile, so
    the recording's overhead stays out of it); open the pickle at https://pytorch.org/memory_viz."""
    import torch

    try:
        torch.cuda.memory._record_memory_history(max_entries=200_000)
    except (AttributeError, RuntimeError):  # an old torch or no CUDA allocator
        return None
    try:
        run.forward()
        run.backward()
        path = case_dir / "memory_snapshot.pickle"
        torch.cuda.memory._dump_snapshot(str(path))
        return path.name
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)


def _profile_jax(run, case: Case, case_dir: Path, *, steps: int, warmup: int) -> dict:
    """jax.profiler trace of the recorded steps (TensorBoard's profile plugin, or Perfetto);
    the phases are the wall times of the outer annotations (JAX has no key_averages)."""
    import jax

    for _ in range(warmup):
        run.forward()
        run.backward()
    wall = {"forward": [], "backward": []}
    with jax.profiler.trace(str(case_dir), create_perfetto_trace=True):
        for i in range(steps):
            with jax.profiler.StepTraceAnnotation("gqbench_step", step_num=i):
                a = time.perf_counter()
                with jax.profiler.TraceAnnotation(OUTER["forward"]):
                    run.forward()
                b = time.perf_counter()
                with jax.profiler.TraceAnnotation(OUTER["backward"]):
                    run.backward()
                c = time.perf_counter()
            wall["forward"].append((b - a) * 1e3)
            wall["backward"].append((c - b) * 1e3)
    phases = [dict(phase=p, label=OUTER[p], parent=None, ms=sum(v) / len(v), calls=1.0) for p, v in wall.items()]
    return dict(
        phases=phases,
        wall_ms=wall,
        top_ops={},
        source="wall clock around jax.profiler.TraceAnnotation",
        jax=jax.__version__,
        jax_trace_files=sorted(str(p.relative_to(case_dir)) for p in (case_dir / "plugins").rglob("*") if p.is_file()),
    )


def leaf_phases(phases: list[dict]) -> list[dict]:
    """Non-overlapping phases that add up to the step: inner ranges, plus "<outer> (other)" for
    the part of an outer range not covered by its inner ones (an outer range without inner ones
    is a leaf itself)."""
    leaves = []
    for p in (r for r in phases if r["parent"] is None):
        inner = [r for r in phases if r["parent"] == p["phase"]]
        if not inner:
            leaves.append(dict(phase=p["phase"], ms=p["ms"], calls=p["calls"]))
            continue
        for r in inner:
            leaves.append(dict(phase=r["phase"], ms=r["ms"], calls=r["calls"]))
        rest = p["ms"] - sum(r["ms"] for r in inner)
        leaves.append(dict(phase=f"{p['phase']} (other)", ms=max(rest, 0.0), calls=p["calls"]))
    total = sum(r["ms"] for r in leaves) or 1.0
    for r in leaves:
        r["share"] = r["ms"] / total
    return leaves


# ----------------------------------------------------------------------------- many cases, fresh processes


def profile_cases(
    cases: Sequence[Case],
    out_dir: str | Path = DEFAULT_OUT,
    *,
    steps: int = 2,
    warmup: int = 1,
    with_stack: bool = False,
    memory_snapshot: bool = True,
    timeout: float = 900.0,
    isolate: bool = True,
    log=print,
) -> list[dict]:
    """Profile each case (in a fresh process when `isolate`); returns one dict per case: the
    breakdown from `profile_case`, or {"case_id", "label", "status", "error"} for a failed one."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kw = dict(steps=steps, warmup=warmup, with_stack=with_stack, memory_snapshot=memory_snapshot)
    results = []
    for case in cases:
        log(f"profiling {case.label} {case.problem} w={case.width} rtol={case.rtol:g} {case.device} -> "
            f"{out_dir / case.case_id}")  # fmt: skip
        if isolate:
            res = _spawn(case, out_dir, kw, timeout)
        else:
            try:
                res = dict(profile_case(case, out_dir, **kw), status="ok")
            except Exception as exc:  # noqa: BLE001 -- one failing case must not stop the others
                res = dict(case_id=case.case_id, label=case.label, status="error", error=f"{type(exc).__name__}: {exc}")
        results.append(res)
        log("  " + summary_line(res))
    return results


def _spawn(case: Case, out_dir: Path, kw: dict, timeout: float) -> dict:
    """The case in a fresh worker process, started as the runner starts its workers."""
    from .launch import WorkerFailed, run_to_end

    job = dict(kind="profile", case=case.to_dict(), out_dir=str(out_dir.resolve()), profile=kw)
    try:
        msg = run_to_end(job, case, out_dir / case.case_id / "worker.log", timeout)
    except WorkerFailed as exc:
        return dict(case_id=case.case_id, label=case.label, status=exc.status, error=str(exc))
    if "error" in msg:
        return dict(case_id=case.case_id, label=case.label, status="error", error=msg["error"])
    return dict(msg["profile"], status="ok")


def summary_line(res: dict) -> str:
    if res.get("status") != "ok":
        return f"{res.get('status')}: {res.get('error')}"
    parts = [f"{r['phase']} {r['ms']:.1f} ms ({r['share']:.0%})" for r in res["leaves"]]
    return f"per step: {'; '.join(parts)}; NFE fwd {res['nfe_fwd']} bwd {res['nfe_bwd']}"


# ----------------------------------------------------------------------------- reading back (for the report)


def find_profiles(*candidates: str | Path) -> Path | None:
    """The first of `candidates` holding at least one `*/phases.json`."""
    for c in candidates:
        if c is not None and Path(c).is_dir() and any(Path(c).glob("*/phases.json")):
            return Path(c)
    return None


def load_phases(root: str | Path):
    """Every `ROOT/*/phases.json` as a DataFrame of leaf phases: case_id, case (a row label),
    method, phase, ms (per step), share, calls, source, trace_dir."""
    import pandas as pd

    rows = []
    for path in sorted(Path(root).glob("*/phases.json")):
        try:
            res = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        c = res.get("case", {})
        name = (
            f"{res.get('label', c.get('method'))} · {c.get('problem')} w={c.get('width')} "
            f"rtol={c.get('rtol', float('nan')):g} {c.get('device')}"
        )
        for leaf in res.get("leaves") or leaf_phases(res.get("phases", [])):
            rows.append(
                dict(
                    case_id=res.get("case_id", path.parent.name),
                    case=name,
                    method=c.get("method"),
                    width=c.get("width"),
                    phase=leaf["phase"],
                    ms=leaf["ms"],
                    share=leaf.get("share"),
                    calls=leaf.get("calls"),
                    source=res.get("source", ""),
                    trace_dir=str(path.parent),
                    nfe_fwd=res.get("nfe_fwd"),
                    nfe_bwd=res.get("nfe_bwd"),
                )
            )
    cols = ["case_id", "case", "method", "width", "phase", "ms", "share", "calls", "source", "trace_dir"]
    return pd.DataFrame(rows, columns=cols + ["nfe_fwd", "nfe_bwd"])
