"""asv time_* benchmarks: a gqbench-prepared run's forward()/backward(), which synchronise the device.

Parameters (see common.py): method label x width x rtol x device, e.g.
`timing.Gradient.time_gradient('torch_gq[n=2]', 100, 0.001, 'cpu')`.
"""

from __future__ import annotations

from . import common


class _Timed:
    params = common.PARAMS
    param_names = common.PARAM_NAMES
    version = common.VERSION
    # One call per sample: a backward needs a fresh forward (done in setup); the harness' warm-up
    # runs in setup too, so asv's own warm-up is off. 5-20 samples within ~10 s per point.
    number = 1
    repeat = (5, 20, 10.0)
    rounds = 1
    warmup_time = 0.0
    timeout = 600.0

    def setup(self, method, width, rtol, device):
        self.run = common.prepared_run(common.build_case(method, width, rtol, device))


class Gradient(_Timed):
    """Forward and backward of one case, and the forward alone."""

    def time_gradient(self, method, width, rtol, device):
        self.run.forward()
        self.run.backward()

    def time_forward(self, method, width, rtol, device):
        self.run.forward()


class Backward(_Timed):
    """The backward alone: setup (re-run by asv before every timed call) does the forward."""

    def setup(self, method, width, rtol, device):
        super().setup(method, width, rtol, device)
        self.run.forward()

    def time_backward(self, method, width, rtol, device):
        self.run.backward()
