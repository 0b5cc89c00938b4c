"""asv benchmarks at a trained state: workload L's gradient after `STEPS` steps of gqbench's training recipe
(`gqbench.measurement.trained`), where a neural ODE's field is no longer the smooth initial one and GQ's
quadrature nodes and backward NFE grow. Through gqbench's own functions only: `parse_spec` builds the case,
`prepare` loads the trained weights (trained once per machine into the shared reference folder), the run's
forward()/backward() are what asv times, its own counters what it tracks.

Commits from before the `train_steps` axis skip (NotImplementedError in setup).
"""

from __future__ import annotations

from . import common
from .timing import _Timed

PROBLEM, WIDTH, BATCH, RTOL, STEPS = "workload_l", 100, 200, 1e-3, 40
METHODS = {"torch_direct": {}, "torch_adjoint": {}, "torch_gq[adaptive]": dict(quadrature=["adaptive"])}


def trained_case(label: str):
    gq = common._gqbench()
    fields = getattr(getattr(gq, "Case", None), "__dataclass_fields__", {})
    if "train_steps" not in fields:
        raise NotImplementedError("this commit's gqbench has no train_steps axis")
    axes = dict(method=[label.split("[")[0]], problem=[PROBLEM], width=[WIDTH], batch=[BATCH], rtol=[RTOL],
                threads=[2], train_steps=[STEPS], **METHODS[label])  # fmt: skip
    (case,) = gq.parse_spec({"axes": axes}, source=f"asv trained point {label}").cases
    return case


def trained_run(label: str):
    """The prepared run at the trained state, warmed up, once per process (`common.prepared_run`)."""
    return common.prepared_run(trained_case(label), common.reference_dir(common._gqbench()))


class TrainedGradient(_Timed):
    """Forward and backward at the trained state; NFE and (GQ) quadrature nodes as tracked figures."""

    params = [list(METHODS)]
    param_names = ["method"]
    timeout = 900.0

    def setup(self, method):
        self.run = trained_run(method)

    def time_gradient(self, method):
        self.run.forward()
        self.run.backward()

    def track_nfe_bwd(self, method):
        self.run.forward()
        self.run.backward()
        return self.run.nfe_backward

    track_nfe_bwd.unit = "evaluations"


class TrainedQuadrature(TrainedGradient):
    """GQ's quadrature nodes at the trained state (2 at the initial weights on workload L, more as it trains)."""

    params = [["torch_gq[adaptive]"]]

    def track_quad_nodes(self, method):
        self.run.forward()
        self.run.backward()
        return self.run.extra["quad_nodes"]

    track_quad_nodes.unit = "nodes"
