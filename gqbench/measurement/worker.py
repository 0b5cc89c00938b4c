"""One case (or one reference gradient) in a fresh process: `python -m gqbench.measurement.worker JOB.json FD`.

JOB: {"kind": "case" | "reference", "case": {...}, "warmup", "rewarm", "reference_dir", "reference", "memory"}.
Messages go to the parent as JSON lines on file descriptor FD (stdout and stderr stay free for the user's code
and go to the case's log). Commands come on stdin, one per line.

kind "reference": computes and caches the float64 reference gradient, then sends {"rows": []}.
kind "trained": trains and caches the case's trained state (`train_steps`), then sends {"rows": []}.
kind "check": builds each of `problems` (user problems: name, width, batch, dtype, device, seed) and tests its
  contract -> {"errors": [one line each]}; the runner does this before any case starts.
kind "profile": `gqbench profile`'s traced steps -> {"profile": phases} (or {"error": ...}).
kind "alternate": every case of `cases` (a comparison group) in this one process, timed alternately
  for `repeats` rounds -> {"rows": samples} (`benchmarks/alternate.py`'s check of the runner's ratios).
kind "case": (with "preload": imports torch, sends {"loaded": true} and waits for "setup") prepares the
case and warms it up, then sends {"ready": true} and serves
- "time": `rewarm` untimed calls, then one timed forward + backward under the default allocator
  -> {"sample": {...}};
- "finish": one memory call unless the job says "memory": false (freed blocks returned to the kernel
  from here on, so the RSS peak is the call's own), the gradient error -> {"rows": [...]} (one row per
  sample), then exits.
A training case (`epochs` set) runs whole and sends {"rows": [...], "tables": {...}} at once.
Any exception becomes {"rows": failure rows}; a hard crash or a timeout is recorded by the runner.
Imports stay lean: no pandas, no plotly, and no jax unless the method's own build imports it.
"""

from __future__ import annotations

import json
import os
import signal
import sys


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


def _json(x):
    return x.item() if hasattr(x, "item") else str(x)


def serve(job: dict, send, commands) -> None:
    """The worker's side of the protocol; `send(dict)` writes a message, `commands` yields lines."""
    from ..define.case import Case
    from .measure import (
        classify,
        failure_rows,
        finish,
        memory_call,
        one_line,
        reference_gradients,
        return_freed_memory,
        time_call,
        warm_up,
    )

    case = Case.from_dict(job["case"])

    def fail(exc: BaseException):
        if isinstance(exc, KeyboardInterrupt):
            raise exc
        send({"rows": failure_rows(case, classify(exc), one_line(exc))})

    if job["kind"] == "reference":
        reference_gradients(case, cache_dir=job.get("reference_dir"))
        send({"rows": []})
        return
    if job["kind"] == "trained":
        from .trained import trained_state

        try:
            trained_state(case, job.get("reference_dir"))
        except Exception as exc:  # noqa: BLE001 -- the runner turns it into the cases' error rows
            send({"rows": [], "error": one_line(exc)})
            return
        send({"rows": []})
        return
    if job["kind"] == "check":
        send({"errors": _check_problems(job["problems"])})
        return
    if job["kind"] == "profile":
        from .profile import profile_case

        try:
            send({"profile": profile_case(case, job["out_dir"], **job["profile"])})
        except Exception as exc:  # noqa: BLE001 -- reported as the case's error
            send({"error": one_line(exc)})
        return
    if job["kind"] == "alternate":
        from .measure import alternate

        try:
            cases = [Case.from_dict(c) for c in job["cases"]]
            rows = alternate(
                cases, job.get("warmup", 1), job["repeats"], job.get("rewarm", 0), job.get("reference_dir")
            )
            send({"rows": rows})
        except BaseException as exc:  # noqa: BLE001 -- reported as the group's first case's error
            fail(exc)
        return
    if case.epochs is not None:
        send(_run_training(case, job))
        return
    if job.get("preload"):  # the runner starts a process set's workers together: imports side by side
        try:  # most of a worker's start-up: torch, the method's backend, the problems and the measurement code
            import torch  # noqa: F401

            from ..define.methods import get_method
            from ..define.problems import get_problem

            get_method(case.method).preload(case)
            if case.train_steps or case.weights:
                from . import trained  # noqa: F401
            get_problem(case.problem)
        except BaseException as exc:  # noqa: BLE001
            return fail(exc)
        send({"loaded": True})
        if next(commands, "").strip() != "setup":  # set-up and warm-up one worker at a time, on command
            return
    try:
        run, setup_s = warm_up(case, job.get("warmup", 1), job.get("reference_dir"))
    except BaseException as exc:  # noqa: BLE001 -- every failure of a case becomes a row
        return fail(exc)
    send({"ready": True})
    samples = []
    for line in commands:
        try:
            if line.strip() == "time":
                samples.append(time_call(run, job.get("rewarm", 0)))
                send({"sample": samples[-1]})
            elif line.strip() == "finish":
                peak = float("nan")
                if job.get("memory", True):  # the runner's later processes of a case skip it
                    if not case.device.startswith("cuda"):
                        return_freed_memory()
                    peak = memory_call(run, case.device)
                rows = finish(case, run, samples, peak_mem_bytes=peak, setup_s=setup_s, warmup=job.get("warmup", 1),
                              reference_dir=job.get("reference_dir"), reference=job.get("reference", True))  # fmt: skip
                send({"rows": rows})
                return
        except BaseException as exc:  # noqa: BLE001
            return fail(exc)


def _check_problems(problems: list[dict]) -> list[str]:
    """The user problems' contract, each as a case's worker will build it: a one-line error for each that fails."""
    from ..define.user_problems import UserProblemError, check

    errors = []
    for p in problems:
        if p["device"].startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                continue  # its cases are skipped rows on this machine
        try:
            check(**p)
        except UserProblemError as exc:
            errors.append(str(exc))
        except Exception as exc:  # noqa: BLE001 -- anything else the user's code raised: one line
            errors.append(f"{p['name']}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
    return errors


def _run_training(case, job: dict) -> dict:
    from ..define.training_problems import get_training_problem
    from ..training import run_problem
    from .measure import classify, failure_rows, one_line

    try:
        problem = get_training_problem(case.problem)
        rows, tables = run_problem(problem, case=case, cache_dir=job.get("reference_dir"))
    except BaseException as exc:  # noqa: BLE001 -- every failure of a case becomes a row
        if isinstance(exc, KeyboardInterrupt):
            raise
        return {"rows": failure_rows(case, classify(exc), one_line(exc))}
    return {"rows": rows, "tables": tables}


def main(argv: list[str]) -> int:
    _die_with_parent()
    with open(argv[0]) as f:
        job = json.load(f)
    out = os.fdopen(int(argv[1]), "w", buffering=1)

    def send(msg: dict) -> None:
        out.write(json.dumps(msg, default=_json) + "\n")
        out.flush()

    serve(job, send, iter(sys.stdin.readline, ""))
    # Everything is sent: skip the interpreter's teardown (~0.7 s of CPU with torch loaded), which would
    # otherwise hold up the runner's next one-at-a-time step or run beside another worker's timed call.
    out.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
