"""The one way to start a case in a fresh process: `Worker`, used by the runner (paired timing
rounds, references, training runs), the profiler and any executor that runs cases elsewhere.

A worker is `python -m gqbench.measurement.worker JOB FD`: commands on its stdin, JSON-line replies on file
descriptor FD, its stdout/stderr to a log. Each worker has a time budget that counts only the time
it works (from start-up and from each command until its reply), not the time it waits while the
other methods of its comparison group take their turn.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..define.case import Case

PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def worker_env(case: Case) -> dict:
    """The worker's environment: the same thread count for every library, the default allocator
    (users' training loops run on it; memory repeats adjust it themselves, after the timed ones)."""
    env = dict(os.environ)
    n = str(case.threads)
    env.update(
        OMP_NUM_THREADS=n,
        MKL_NUM_THREADS=n,
        OPENBLAS_NUM_THREADS=n,
        PYTHONPATH=os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")])),
    )
    env.pop("MALLOC_MMAP_THRESHOLD_", None)  # an inherited setting would slow every timed call
    if ":" in case.problem:  # a user's problem: its relative path resolves against the same folder here
        from ..define.user_problems import ROOT_ENV, problem_root

        env[ROOT_ENV] = str(problem_root())
    return env


class WorkerFailed(Exception):
    """The worker gave no reply: `outcome` is "timeout", "killed" (SIGKILL, likely out of memory) or
    "crashed"; the message says why in one line."""

    def __init__(self, outcome: str, message: str):
        super().__init__(message)
        self.outcome = outcome

    @property
    def status(self) -> str:
        return {"timeout": "timeout", "killed": "oom"}.get(self.outcome, "error")


class Worker:
    def __init__(self, job: dict, case: Case, log: Path, *, budget: float, module: str = "gqbench.measurement.worker"):
        self.case, self.log, self.budget = case, Path(log), float(budget)
        self.busy = 0.0
        self._tmp = tempfile.TemporaryDirectory(prefix="gqbench-")
        job_path = Path(self._tmp.name) / "job.json"
        job_path.write_text(json.dumps(job))
        read_fd, write_fd = os.pipe()
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", module, str(job_path), str(write_fd)],
                env=worker_env(case),
                stdin=subprocess.PIPE,
                stdout=log_file,
                stderr=log_file,
                pass_fds=(write_fd,),
                start_new_session=True,
            )
        os.close(write_fd)
        self._fd, self._buf = read_fd, b""

    def request(self, command: str | None = None) -> dict:
        """Send `command` (None: just wait for the next message) and return the reply."""
        started = time.perf_counter()
        try:
            if command is not None:
                self.proc.stdin.write(command.encode() + b"\n")
                self.proc.stdin.flush()
            return self._read_line(started)
        except OSError:  # a broken pipe: the worker is gone
            raise self._died() from None
        finally:
            self.busy += time.perf_counter() - started

    def _read_line(self, started: float) -> dict:
        while b"\n" not in self._buf:
            left = self.budget - self.busy - (time.perf_counter() - started)
            if left <= 0 or not select.select([self._fd], [], [], left)[0]:
                self.kill()
                raise WorkerFailed("timeout", f"no result within the {self.budget:g} s timeout (worker killed)")
            chunk = os.read(self._fd, 1 << 16)
            if not chunk:
                raise self._died()
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def _died(self) -> WorkerFailed:
        rc = self.proc.wait()
        tail = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()][-1:] or [""]
        if rc == -signal.SIGKILL:
            return WorkerFailed("killed", "worker killed by SIGKILL (likely the kernel's out-of-memory killer)")
        why = f"signal {-rc}" if rc < 0 else f"exit code {rc}"
        return WorkerFailed("crashed", f"worker died ({why}): {tail[0].strip()[:300]}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the whole group: threads and children too
            except ProcessLookupError:
                pass
        self.proc.wait()

    def close(self) -> None:
        """End the worker: EOF on its stdin ends its command loop; one that does not exit is killed."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        self.kill()
        os.close(self._fd)
        self._tmp.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_user_problems(cases, log: Path, timeout: float) -> None:
    """Build every user problem of `cases` ("pkg.module:make", "file.py:make") in a fresh worker, as their
    cases' workers will (each width, batch, dtype and device, and float64 for the reference), and test the
    contract. Raises `UserProblemError` (one line naming the fix) before any case starts."""
    from ..define.user_problems import UserProblemError

    combos = {}
    for c in cases:
        if ":" in c.problem and c.epochs is None:
            for dtype, device in ((c.dtype, c.device), ("float64", "cpu")):
                p = dict(name=c.problem, width=c.width, batch=c.batch, dtype=dtype, device=device, seed=c.seed)
                combos[tuple(p.values())] = p
    if not combos:
        return
    case = next(c for c in cases if ":" in c.problem)
    try:
        reply = run_to_end(dict(kind="check", case=case.to_dict(), problems=list(combos.values())), case, log, timeout)
    except WorkerFailed as exc:
        raise UserProblemError(f"checking {case.problem}: {exc} (log: {log})") from None
    if reply.get("errors"):
        raise UserProblemError(reply["errors"][0])
    log.unlink(missing_ok=True)  # logs are kept for failures only


def run_to_end(job: dict, case: Case, log: Path, timeout: float, module: str = "gqbench.measurement.worker") -> dict:
    """A worker whose first message is its result (a reference gradient, a training run, a profile).
    Raises `WorkerFailed` when it has none."""
    with Worker(job, case, log, budget=timeout, module=module) as worker:
        return worker.request()
