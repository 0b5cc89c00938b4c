"""One case (or one reference gradient) in a fresh process: `python -m gqbench._worker JOB.json`.

JOB: {"kind": "case" | "reference", "case": {...}, "repeats", "warmup", "reference_dir", "result"}.
Writes {"rows": [...]} (or {"ok": true}) to JOB["result"] atomically; a training case (`epochs` set) adds
{"tables": {name: [rows]}} (per-epoch rows and the like). An exception becomes failure
rows with a status; a hard crash or a timeout is recorded by the runner. Imports stay lean: no
pandas, no plotly, and no jax unless the method's own build imports it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback


def _die_with_parent() -> None:
    """If the runner is killed (even with -9), stop too instead of burning CPU as an orphan."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:
            os._exit(1)
    except (OSError, AttributeError):
        pass


def _one_line(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" (at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno})" if tb else ""
    text = " ".join(str(exc).split())
    if len(text) > 500:
        text = text[:497] + "..."
    return f"{type(exc).__name__}: {text}{where}"


def run_job(job: dict) -> dict:
    from ._case import Case
    from ._measure import classify, failure_rows, measure, reference_gradients

    case = Case.from_dict(job["case"])
    if job["kind"] == "reference":
        reference_gradients(case, cache_dir=job.get("reference_dir"))
        return {"ok": True}
    if case.epochs is not None:
        return _run_training(case, job)
    try:
        rows = measure(
            case,
            repeats=job["repeats"],
            warmup=job["warmup"],
            reference_dir=job.get("reference_dir"),
            reference=job.get("reference", True),
        )
    except BaseException as exc:  # noqa: BLE001 -- every failure of a case becomes a row
        if isinstance(exc, KeyboardInterrupt):
            raise
        rows = failure_rows(case, classify(exc), _one_line(exc))
    return {"rows": rows}


def _run_training(case, job: dict) -> dict:
    from ._measure import classify, failure_rows
    from .training import TRAINING_PROBLEMS

    try:
        problem = TRAINING_PROBLEMS[case.problem]
        rows, tables = problem.run(case, cache_dir=job.get("reference_dir"))
    except BaseException as exc:  # noqa: BLE001 -- every failure of a case becomes a row
        if isinstance(exc, KeyboardInterrupt):
            raise
        return {"rows": failure_rows(case, classify(exc), _one_line(exc))}
    return {"rows": rows, "tables": tables}


def main(argv: list[str]) -> int:
    _die_with_parent()
    with open(argv[0]) as f:
        job = json.load(f)
    result = run_job(job)
    tmp = job["result"] + f".{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, default=lambda x: x.item() if hasattr(x, "item") else str(x))
    os.replace(tmp, job["result"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
