"""Stub methods with known NFE and timing, for testing the harness (not a benchmark).

Import this module, or set GQBENCH_PLUGINS=gqbench._testing so worker processes register them too.
Per call: nfe_forward = width, nfe_backward = 2 * width + 1; forward sleeps FWD_S, backward BWD_S
(both times `time_scale` for the stubs of known speed-up). `stub_alloc` holds ALLOC_BYTES of touched
memory during its backward (a known peak), `stub_fresh` touches a freshly mapped FRESH_BYTES (known
page faults); `stub_crash_later`/`stub_hang_later` fail on their
second timed call (in the middle of the paired rounds, after one warm-up).
"""

from __future__ import annotations

import ctypes
import dataclasses
import mmap
import os
import time
from typing import ClassVar

import numpy as np

from .define.methods import METHODS, AbstractMethod, AbstractRun, register_method

FWD_S = 0.02
# A file each stub forward + backward appends "<method> <MALLOC_MMAP_THRESHOLD_> <start> <end>" to.
TRACE_ENV = "GQBENCH_STUB_TRACE"
ONCE_ENV = "GQBENCH_STUB_ONCE_DIR"  # stub_killparent_once leaves a marker here: it kills its parent only once
BWD_S = 0.05
HOLD_ENV = "GQBENCH_STUB_HOLD"  # stub_hold's gradients() (in the runner's "finish") wait while this file exists
ALLOC_BYTES = 60 * 2**20  # three 20 MiB blocks: under the default allocator glibc reuses such freed blocks
FRESH_BYTES = 64 * 2**20  # stub_fresh's backward: one block glibc always maps anew (>= 32 MiB)
LATER_CALL = 3  # the *_later kinds fail on this forward call (warm-up, round 0, then here)


class StubRun(AbstractRun):
    def __init__(self, kind: str, width: int, name: str = "", time_scale: float = 1.0):
        self.kind, self.width, self.name = kind, width, name
        self.extra = {"pid": os.getpid()}  # in every sample: which worker process timed it
        self.time_scale, self.calls = time_scale, 0

    def forward(self):
        self.calls += 1
        if self.kind.endswith("_later") and self.calls == LATER_CALL:
            if self.kind == "hang_later":
                time.sleep(3600)
            raise RuntimeError("stub crashed in the middle of its rounds on purpose")
        if self.kind == "crash":
            raise RuntimeError("stub crashed on purpose")
        if self.kind == "oom":
            raise MemoryError("stub ran out of memory on purpose")
        if self.kind == "max_steps":
            raise AssertionError("max_num_steps exceeded (stub)")
        if self.kind == "hang":
            time.sleep(3600)
        if self.kind == "abort":
            os.abort()
        if self.kind == "killparent":  # the process that started this worker (e.g. a Ray worker) dies
            os.kill(os.getppid(), 9)
        if self.kind == "killparent_once":  # ... the first time only (a marker per width in $GQBENCH_STUB_ONCE_DIR)
            marker = os.path.join(os.environ[ONCE_ENV], f"killparent-w{self.width}")
            if not os.path.exists(marker):
                open(marker, "w").close()
                os.kill(os.getppid(), 9)
        self._started = time.time()
        time.sleep(FWD_S * self.time_scale)
        self.nfe_forward = self.width

    def backward(self):
        time.sleep(BWD_S * self.time_scale)
        trace = os.environ.get(TRACE_ENV)
        if trace:  # which method ran when: the runner's paired rounds are checked with it
            with open(trace, "a") as f:
                env = os.environ.get("MALLOC_MMAP_THRESHOLD_", "-")
                f.write(f"{self.name} {env} {self._started!r} {time.time()!r}\n")
        if self.kind == "alloc":
            blocks = [np.ones(ALLOC_BYTES // 3 // 8) for _ in range(3)]  # touched: resident
            del blocks
        if self.kind == "fresh":  # FRESH_BYTES // 4096 minor page faults, every call: an anonymous
            # mapping of its own (a malloc'd block may come from a heap top an earlier test left faulted-in),
            # in small pages (numpy asks for huge pages: 32 faults)
            block = mmap.mmap(-1, FRESH_BYTES)
            if hasattr(mmap, "MADV_NOHUGEPAGE"):
                block.madvise(mmap.MADV_NOHUGEPAGE)
            view = (ctypes.c_char * FRESH_BYTES).from_buffer(block)
            ctypes.memset(view, 1, FRESH_BYTES)
            del view
            block.close()
        self.nfe_backward = 2 * self.width + 1

    def loss_value(self):
        return float("nan") if self.kind == "nan" else 1.0

    def gradients(self):
        if self.kind == "hold":  # the runner's "finish" waits while the file HOLD_ENV names exists
            while os.path.exists(os.environ.get(HOLD_ENV, "")):
                time.sleep(0.05)
        return [np.full(3, np.nan if self.kind == "nan" else 1.0)]


@dataclasses.dataclass(frozen=True)
class StubMethod(AbstractMethod):
    kind: str = "ok"
    time_scale: float = 1.0
    needs_reference: ClassVar[bool] = False

    def build(self, *, case, problem):
        return StubRun(self.kind, case.width, self.name, self.time_scale)


@dataclasses.dataclass(frozen=True)
class StubQuadMethod(StubMethod):
    quadrature: ClassVar[bool] = True


KINDS = ("ok", "crash", "nan", "hang", "oom", "max_steps", "abort")
# "killparent(_once)" kills the process that started the worker: only for executors that survive it (Ray).
for _kind in (*KINDS, "killparent", "killparent_once", "alloc", "fresh", "crash_later", "hang_later", "hold"):
    if f"stub_{_kind}" not in METHODS._methods:
        register_method(StubMethod(f"stub_{_kind}", f"test stub: {_kind}", kind=_kind))
if "stub_quad" not in METHODS._methods:
    register_method(StubQuadMethod("stub_quad", "test stub with quadrature axes"))
if "stub_quad_half" not in METHODS._methods:  # twice as fast as stub_ok: a known speed-up of 2
    register_method(StubQuadMethod("stub_quad_half", "test stub with quadrature axes, half the time", time_scale=0.5))
