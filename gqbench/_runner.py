"""Run a grid: each case in a fresh worker process with a timeout, results appended atomically.

Re-running the same command after a crash or `kill -9` skips the finished cases (their files in
DIR/cases/) and runs the rest; nothing is lost or written twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from ._case import Case
from ._grid import RunSettings
from ._measure import failure_rows, reference_path
from ._methods import get_method
from ._results import rebuild_results, rebuild_tables, write_atomic, write_case, write_table

PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def worker_env(case: Case) -> dict:
    """The worker's environment: the same thread count for every library, and an allocator that
    returns freed tensors to the kernel so each repeat's RSS peak is its own."""
    env = dict(os.environ)
    n = str(case.threads)
    env.update(
        OMP_NUM_THREADS=n,
        MKL_NUM_THREADS=n,
        OPENBLAS_NUM_THREADS=n,
        MALLOC_MMAP_THRESHOLD_="65536",
        PYTHONPATH=os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")])),
    )
    if case.epochs is not None:
        env.pop("MALLOC_MMAP_THRESHOLD_")  # training epochs are timed under the allocator users' loops run on
    return env


def _spawn(job: dict, case: Case, timeout: float, log: Path) -> tuple[str, dict | None, str]:
    """-> (outcome, result, message); outcome is "done", "timeout", "killed" or "crashed"."""
    with tempfile.TemporaryDirectory(prefix="gqbench-") as tmp:
        job = dict(job, result=str(Path(tmp) / "result.json"))
        job_path = Path(tmp) / "job.json"
        job_path.write_text(json.dumps(job))
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gqbench._worker", str(job_path)],
                env=worker_env(case),
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                start_new_session=True,
            )
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the whole group: the worker's threads and children
                proc.wait()
                return "timeout", None, f"no result within the {timeout:g} s timeout (worker killed)"
            except BaseException:
                os.killpg(proc.pid, signal.SIGKILL)
                raise
        result_path = Path(job["result"])
        if rc == 0 and result_path.exists():
            return "done", json.loads(result_path.read_text()), ""
    tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:] or [""]
    if rc == -signal.SIGKILL:
        return "killed", None, "worker killed by SIGKILL (likely the kernel's out-of-memory killer)"
    why = f"signal {-rc}" if rc < 0 else f"exit code {rc}"
    return "crashed", None, f"worker died ({why}): {tail[0].strip()[:300]}"


def run_grid(
    cases: Sequence[Case],
    out_dir: str | Path,
    *,
    settings: RunSettings | None = None,
    spec: dict | None = None,
    progress: bool = True,
    reference_dir: str | Path | None = None,
):
    """Run every case not yet finished in `out_dir`; returns the whole results table."""
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

    from ._env import environment
    from ._results import finished_ids

    out_dir = Path(out_dir)
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    ref_dir = Path(reference_dir) if reference_dir is not None else out_dir / "references"
    done = finished_ids(out_dir)
    todo = [c for c in dict.fromkeys(cases) if c.case_id not in done]
    _write_environment(
        out_dir,
        environment(threads=sorted({c.threads for c in cases})),
        spec,
        settings,
        n_cases=len(cases),
        n_done=len(cases) - len(todo),
    )
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
        for case in todo:
            bar.update(task, description=f"{case.label} {case.problem} w={case.width} tol={case.rtol:g}")
            started = time.perf_counter()
            rows, tables = _run_case(case, out_dir, settings, ref_dir, failed_refs, console)
            for row in rows:
                row["label"] = case.label
                row["worker_s"] = time.perf_counter() - started
            for name, table in tables.items():  # before the case file, which marks the case finished
                write_table(out_dir, name, case.case_id, [dict(r, label=case.label) for r in table])
            write_case(out_dir, case.case_id, rows)
            rebuild_results(out_dir)
            if tables:
                rebuild_tables(out_dir)
            bar.advance(task)
    return rebuild_results(out_dir)


def _run_case(
    case: Case, out_dir: Path, settings: RunSettings, ref_dir: Path, failed_refs: dict, console
) -> tuple[list[dict], dict]:
    """-> (results rows, further tables {name: rows}, e.g. a training case's per-epoch rows)."""
    try:
        method = get_method(case.method)
        reason = method.unsupported(case)
    except Exception as exc:  # noqa: BLE001 -- a broken plugin must not stop the grid
        return failure_rows(case, "error", f"{type(exc).__name__}: {exc}"), {}
    if reason:
        return failure_rows(case, "skipped", reason), {}
    log = out_dir / "logs" / f"{case.case_id}.log"
    use_ref = method.needs_reference and case.epochs is None
    if use_ref and not reference_path(case, ref_dir).exists():
        key = case.reference_key
        if key not in failed_refs:
            job = dict(kind="reference", case=case.with_(dtype="float64").to_dict(), reference_dir=str(ref_dir))
            outcome, _, msg = _spawn(job, case, settings.reference_timeout, out_dir / "logs" / "reference.log")
            if outcome != "done":
                failed_refs[key] = msg
                console.print(f"[yellow]reference gradient for {key} failed: {msg}; grad_rel_err will be NaN")
        use_ref = key not in failed_refs
    job = dict(
        kind="case",
        case=case.to_dict(),
        repeats=settings.repeats,
        warmup=settings.warmup,
        reference_dir=str(ref_dir),
        reference=use_ref,
    )
    outcome, result, msg = _spawn(job, case, settings.timeout, log)
    if outcome == "done":
        log.unlink(missing_ok=True)  # keep logs of failures only
        return result["rows"], result.get("tables", {})
    status = {"timeout": "timeout", "killed": "oom"}.get(outcome, "error")
    return failure_rows(case, status, msg), {}


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
