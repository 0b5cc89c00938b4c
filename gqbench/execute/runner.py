"""Run a grid: each case in a fresh worker process with a timeout, results appended atomically.

Cases that differ only in the method and its settings form a comparison group. The group's workers
are alive together and their timed calls alternate round by round (the order rotating each round,
never two at once), so a machine's drift hits every method alike and ratios can be taken per round.
Re-running the same command after a crash or `kill -9` skips the finished comparison groups (every
case's file in DIR/cases/) and runs the rest; nothing is lost or duplicated.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from ..define.case import METHOD_FIELDS, Case
from ..define.grid import RunSettings
from ..define.methods import get_method
from ..measurement.launch import PACKAGE_ROOT, Worker, WorkerFailed, run_to_end, worker_env  # noqa: F401 (re-exported)
from ..measurement.measure import failure_rows, reference_path
from ..results.tables import rebuild_results, rebuild_tables, write_atomic, write_case, write_table


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


def run_grid(
    cases: Sequence[Case],
    out_dir: str | Path,
    *,
    settings: RunSettings | None = None,
    spec: dict | None = None,
    progress: bool = True,
    reference_dir: str | Path | None = None,
    executor: str = "local",
    address: str | None = None,
    per_node: int = 1,
    shard: str | None = None,
):
    """Run every case not yet finished in `out_dir`; returns the whole results table.

    `executor="ray"`: comparison groups run as Ray tasks (`gqbench.execute.ray_executor`) on the
    cluster at `address` (None: a local one), at most `per_node` at a time per node. `shard` ("K/N"):
    only this shard's cases (`gqbench.execute.shard`)."""
    settings = RunSettings() if settings is None else settings
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from ..measurement.env import environment
    from ..results.tables import finished_ids

    out_dir = Path(out_dir)
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    ref_dir = Path(reference_dir) if reference_dir is not None else out_dir / "references"
    if executor not in ("local", "ray"):
        raise ValueError(f"executor={executor!r}: use 'local' or 'ray'")
    if per_node < 1:
        raise ValueError(f"--per-node {per_node}: must be >= 1")
    cases = list(dict.fromkeys(cases))
    from .merge import grid_identity

    grid = grid_identity(c.case_id for c in cases)  # the whole grid, before sharding: merge checks it
    if shard is not None:
        from .shard import Shard, assign

        cases = assign(cases, Shard.parse(shard))
    done = finished_ids(out_dir)
    # A comparison group is finished only when every case of it has its file: a group cut short (a kill
    # while its cases' files were being written) runs again whole, so its rounds stay paired.
    todo = [c for g in comparison_groups(cases) if any(c.case_id not in done for c in g) for c in g]
    env = environment(threads=sorted({c.threads for c in cases}))
    env.update(executor=executor, per_node=per_node, shard=shard, grid=grid)
    _write_environment(out_dir, env, spec, settings, n_cases=len(cases), n_done=len(cases) - len(todo))
    machine = machine_name()
    console = Console(stderr=True, quiet=not progress)
    if len(todo) < len(cases):
        console.print(f"{out_dir}: {len(cases) - len(todo)} of {len(cases)} cases already done; running the rest")
    failed_refs: dict[tuple, str] = {}
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=not progress) as bar:
        task = bar.add_task("gqbench", total=len(todo))
        groups = comparison_groups(todo)
        if executor == "ray":
            from .ray_executor import run_groups

            bar.update(task, description=f"{len(groups)} groups on Ray")
            finished = run_groups(groups, out_dir=out_dir, settings=settings, ref_dir=ref_dir, address=address,
                                  per_node=per_node)  # fmt: skip
        else:
            finished = _run_locally(groups, out_dir, settings, ref_dir, failed_refs, console, bar, task)
        for case, rows, tables, worker_s in finished:
            for row in rows:
                row["label"] = case.label
                row["worker_s"] = worker_s
                row.setdefault("machine", machine)
            for name, table in tables.items():  # before the case file, which marks the case finished
                write_table(out_dir, name, case.case_id, [dict(r, label=case.label) for r in table])
            write_case(out_dir, case.case_id, rows)
            if tables:
                rebuild_tables(out_dir)
            bar.advance(task)
            rebuild_results(out_dir)
    return rebuild_results(out_dir)


def machine_name() -> str:
    """This machine in a results row: hostname and CPU model."""
    import platform

    from ..measurement.env import _cpu_model

    return f"{platform.node()} ({_cpu_model()})"


def _run_locally(groups, out_dir, settings, ref_dir, failed_refs, console, bar, task):
    from rich.markup import escape

    for group in groups:
        c = group[0]
        methods = escape(", ".join(x.label for x in group))  # torch_gq[adaptive] is not rich markup
        bar.update(task, description=f"{c.problem} w={c.width} tol={c.rtol:g}: {methods}")
        yield from run_group(group, out_dir, settings, ref_dir, failed_refs, console)


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
    if method.needs_reference and case.epochs is None and not reference_path(case, ref_dir).exists():
        key = case.reference_key
        if key not in failed_refs:
            job = dict(kind="reference", case=case.with_(dtype="float64").to_dict(), reference_dir=str(ref_dir))
            try:
                run_to_end(job, case, out_dir / "logs" / "reference.log", settings.reference_timeout)
            except WorkerFailed as exc:
                failed_refs[key] = str(exc)
                console.print(f"[yellow]reference gradient for {key} failed: {escape(str(exc))}; grad_rel_err is NaN")
    return None


def _write_environment(
    out_dir: Path, env: dict, spec: dict | None, settings: RunSettings, n_cases: int, n_done: int
) -> None:
    path = out_dir / "environment.json"
    runs = []
    if path.exists():
        try:
            runs = json.loads(path.read_text()).get("runs", [])
        except (OSError, ValueError):
            runs = []
    runs.append(dict(date=env["date"], git_sha=env["git_sha"], cases=n_cases, already_done=n_done))
    data = dict(env, settings=vars(settings), spec=spec, runs=runs)
    write_atomic(path, json.dumps(data, indent=2, default=str).encode())
