"""One comparison group's run: which cases are timed side by side (`group_key`, `comparison_groups`)
and `run_group`, which starts their fresh worker processes, alternates their timed calls round by
round and yields each case's rows. The local runner and the Ray executor both call it (neither imports
the other for it).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from ..define.case import METHOD_FIELDS, Case
from ..define.grid import RunSettings
from ..define.methods import get_method
from ..measurement.launch import Worker, WorkerFailed, run_to_end
from ..measurement.measure import failure_rows, reference_path
from ..measurement.trained import trained_path


def group_key(case: Case) -> tuple:
    """Cases with equal keys are timed side by side. Training runs (`epochs`) run alone."""
    if case.epochs is not None:
        return ("training", case.case_id)
    return tuple(v for k, v in case.to_dict().items() if k not in METHOD_FIELDS)


def comparison_groups(cases: Sequence[Case]) -> list[list[Case]]:
    """The cases grouped by `group_key`, in the order their first case appears."""
    groups: dict[tuple, list[Case]] = {}
    for case in cases:
        groups.setdefault(group_key(case), []).append(case)
    return list(groups.values())


def machine_name() -> str:
    """This machine in a results row: hostname and CPU model."""
    import platform

    from ..measurement.env import _cpu_model

    return f"{platform.node()} ({_cpu_model()})"


def run_group(group: list[Case], out_dir: Path, settings: RunSettings, ref_dir: Path, failed_refs: dict, console):
    """Run one comparison group; yields (case, rows, tables, worker seconds) as each case finishes.

    Timing cases run in `settings.processes` fresh workers each, one set of workers after another:
    each set warms up and takes its paired rounds as below, and a row records its `process` and its
    `round` (numbered on across processes). Only the first process measures peak memory (the others
    repeat its figure). A case that fails in any process becomes its failure rows and leaves."""
    started: dict[Case, float] = {}
    rows: dict[Case, list[dict]] = {}
    live: list[Case] = []
    for case in group:
        early = _precheck(case, out_dir, settings, ref_dir, failed_refs, console)
        if early is not None:
            yield case, early, {}, 0.0
        else:
            live.append(case)
            rows[case] = []
    processes = 1 if any(c.epochs is not None for c in live) else settings.processes
    for p in range(processes):
        done = yield from _one_process(live, p, p == processes - 1, out_dir, settings, ref_dir, failed_refs, rows,
                                       started)  # fmt: skip
        live = [c for c in live if c not in done]


def _one_process(live: list[Case], p: int, last: bool, out_dir, settings, ref_dir, failed_refs, rows, started):
    """One fresh worker per live case: warm-up, `settings.repeats` paired rounds, finish. Yields the
    cases that end here (failures, training runs; in the `last` process every case, with all its
    processes' rows); returns them as a set."""
    workers: dict[Case, Worker] = {}
    ended: set[Case] = set()
    r0 = p * settings.repeats

    def end(case, case_rows, tables=None):
        worker = workers.pop(case, None)
        if worker is not None:
            worker.close()
            if case_rows and case_rows[0].get("status") == "ok":
                worker.log.unlink(missing_ok=True)  # keep logs of failures only
        ended.add(case)
        return case, case_rows, tables or {}, time.perf_counter() - started[case]

    try:
        # The set's workers start together: their imports (most of a start-up, ~1.5 s of CPU each) run
        # side by side, as nothing is timed yet. Then one worker at a time sets up and warms up (set-up
        # and JAX compile times are columns too, so not side by side with another's); a training case
        # sends its result here.
        for case in live:
            job = dict(kind="case", case=case.to_dict(), warmup=settings.warmup, rewarm=settings.rewarm,
                       reference_dir=str(ref_dir), reference=case.reference_key not in failed_refs,
                       memory=p == 0, preload=case.epochs is None)  # fmt: skip
            started.setdefault(case, time.perf_counter())
            workers[case] = Worker(job, case, _log(out_dir, case), budget=settings.timeout)
        for case in [c for c in live if c.epochs is None]:
            try:
                msg = workers[case].request()
            except WorkerFailed as exc:
                yield end(case, failure_rows(case, exc.status, str(exc)))
                continue
            if "rows" in msg:
                yield end(case, msg["rows"])
        for case in list(workers):
            try:
                msg = workers[case].request(None if case.epochs is not None else "setup")
            except WorkerFailed as exc:
                yield end(case, failure_rows(case, exc.status, str(exc)))
                continue
            if "rows" in msg:
                yield end(case, msg["rows"], msg.get("tables", {}))
        # Paired rounds: one timed call per method per round, the order rotating.
        for r in range(settings.repeats):
            alive = list(workers)
            if not alive:
                break
            k = (r0 + r) % len(alive)
            for case in alive[k:] + alive[:k]:
                try:
                    msg = workers[case].request("time")
                except WorkerFailed as exc:
                    yield end(case, failure_rows(case, exc.status, str(exc)))
                    continue
                if "rows" in msg:  # the call raised: failure rows
                    yield end(case, msg["rows"])
        # Memory (allocator set to return freed blocks) and gradient error, one worker at a time.
        for case in list(workers):
            try:
                got = workers[case].request("finish")["rows"]
            except WorkerFailed as exc:
                yield end(case, failure_rows(case, exc.status, str(exc)))
                continue
            for row in got:
                row.update(process=p, round=row.get("round", 0) + r0, repeat=row["repeat"] + r0)
            if got and got[0].get("status") != "ok":
                yield end(case, got)
                continue
            rows[case] += got
            if last:
                peak = rows[case][0]["peak_mem_bytes"]  # measured in the first process only
                yield end(case, [dict(r, peak_mem_bytes=peak) for r in rows[case]])
            else:
                worker = workers.pop(case)
                worker.close()
                worker.log.unlink(missing_ok=True)
    finally:
        for worker in workers.values():
            worker.close()
    return ended


def _log(out_dir: Path, case: Case) -> Path:
    return out_dir / "logs" / f"{case.case_id}.log"


def _precheck(case: Case, out_dir: Path, settings: RunSettings, ref_dir: Path, failed_refs: dict, console):
    """Failure rows for a case that cannot run here (or whose method is broken); else None, after
    making sure the float64 reference gradient exists (its failure only blanks grad_rel_err)."""
    from rich.markup import escape

    try:
        method = get_method(case.method)
        reason = method.unsupported(case)
    except Exception as exc:  # noqa: BLE001 -- a broken plugin must not stop the grid
        return failure_rows(case, "error", f"{type(exc).__name__}: {exc}")
    if reason:
        return failure_rows(case, "skipped", reason)
    if case.train_steps and case.epochs is None and not trained_path(case, ref_dir).exists():
        # The trained state before any worker of the group starts: trained once, not inside a case's timeout.
        key = ("trained", *case.reference_key)
        if key not in failed_refs:
            job = dict(kind="trained", case=case.to_dict(), reference_dir=str(ref_dir))
            try:
                msg = run_to_end(job, case, out_dir / "logs" / "trained.log", settings.reference_timeout)
                if msg.get("error"):
                    raise WorkerFailed("error", msg["error"])
            except WorkerFailed as exc:
                failed_refs[key] = str(exc)
                console.print(f"[yellow]trained state for {key[1:]} failed: {escape(str(exc))}")
        if key in failed_refs:
            return failure_rows(case, "error", f"no trained state at train_steps={case.train_steps}: "
                                               f"{failed_refs[key]}")  # fmt: skip
    if method.needs_reference and case.epochs is None and not reference_path(case, ref_dir).exists():
        key = case.reference_key
        if key not in failed_refs:
            # Untrained: one reference per (problem, width, batch, seed) whatever the dtype; trained: the dtype
            # the weights were trained in matters (the reference itself is float64 either way).
            ref_case = case if case.train_steps or case.weights else case.with_(dtype="float64")
            job = dict(kind="reference", case=ref_case.to_dict(), reference_dir=str(ref_dir))
            try:
                run_to_end(job, case, out_dir / "logs" / "reference.log", settings.reference_timeout)
            except WorkerFailed as exc:
                failed_refs[key] = str(exc)
                console.print(f"[yellow]reference gradient for {key} failed: {escape(str(exc))}; grad_rel_err is NaN")
    return None
