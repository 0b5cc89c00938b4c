"""Stub methods with known NFE and timing, for testing the harness (not a benchmark).

Import this module, or set GQBENCH_PLUGINS=gqbench._testing so worker processes register them too.
Per call: nfe_forward = width, nfe_backward = 2 * width + 1; forward sleeps FWD_S, backward BWD_S.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import ClassVar

import numpy as np

from ._methods import METHODS, AbstractMethod, AbstractRun, register_method

FWD_S = 0.02
TRACE_ENV = "GQBENCH_STUB_TRACE"  # a file each stub forward call appends "<method> <MALLOC_MMAP_THRESHOLD_>" to
ONCE_ENV = "GQBENCH_STUB_ONCE_DIR"  # stub_killparent_once leaves a marker here: it kills its parent only once
BWD_S = 0.05


class StubRun(AbstractRun):
    def __init__(self, kind: str, width: int, name: str = ""):
        self.kind, self.width, self.name, self.extra = kind, width, name, {}

    def forward(self):
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
        time.sleep(FWD_S)
        self.nfe_forward = self.width
        trace = os.environ.get(TRACE_ENV)
        if trace:  # which method ran when: the runner's paired rounds are checked with it
            with open(trace, "a") as f:
                f.write(f"{self.name} {os.environ.get('MALLOC_MMAP_THRESHOLD_', '-')}\n")

    def backward(self):
        time.sleep(BWD_S)
        self.nfe_backward = 2 * self.width + 1

    def loss_value(self):
        return float("nan") if self.kind == "nan" else 1.0

    def gradients(self):
        return [np.full(3, np.nan if self.kind == "nan" else 1.0)]


@dataclasses.dataclass(frozen=True)
class StubMethod(AbstractMethod):
    kind: str = "ok"
    needs_reference: ClassVar[bool] = False

    def build(self, *, case, problem):
        return StubRun(self.kind, case.width, self.name)


@dataclasses.dataclass(frozen=True)
class StubQuadMethod(StubMethod):
    quadrature: ClassVar[bool] = True


KINDS = ("ok", "crash", "nan", "hang", "oom", "max_steps", "abort")
# "killparent(_once)" kills the process that started the worker: only for executors that survive it (Ray).
for _kind in (*KINDS, "killparent", "killparent_once"):
    if f"stub_{_kind}" not in METHODS._methods:
        register_method(StubMethod(f"stub_{_kind}", f"test stub: {_kind}", kind=_kind))
if "stub_quad" not in METHODS._methods:
    register_method(StubQuadMethod("stub_quad", "test stub with quadrature axes"))
