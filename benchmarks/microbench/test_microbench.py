"""pytest-benchmark micro-benchmarks: one gradient (forward + backward) per registered method at a
few widths, built by `gqbench.prepare`, with gqbench's NFE and gradient error in `extra_info`.

Run by `nox -s microbench` (enabled, JSON into reports/microbench/, compared with the last saved
run). Not collected by the plain `pytest` (testpaths = tests), and not an asv module either: this
folder has no __init__.py, so asv's discovery does not import it.
"""

from __future__ import annotations

import pytest

gqbench = pytest.importorskip("gqbench")

WIDTHS = (10, 100)
RTOL = 1e-3
PROBLEM = "workload_l"


def _case(method: str, width: int):
    spec = {"axes": {"method": [method], "problem": [PROBLEM], "width": [width], "rtol": [RTOL]}}
    (case,) = gqbench.parse_spec(spec, source="microbench").cases
    return case


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("method", list(gqbench.METHODS))
def test_gradient(benchmark, method, width):
    case = _case(method, width)
    try:
        run = gqbench.prepare(case)
    except gqbench.Skip as exc:
        pytest.skip(str(exc))
    # gqbench's own pass first: its warm-up, one measured repeat, NFE and gradient error.
    (row,) = gqbench.measure(case, run=run, repeats=1, warmup=1)
    assert row["status"] == "ok", row["error"]

    def gradient():
        run.forward()
        run.backward()

    benchmark.group = f"{PROBLEM} w={width} rtol={RTOL:g}"
    benchmark(gradient)
    benchmark.extra_info.update(
        case_id=case.case_id,
        label=case.label,
        nfe_fwd=run.nfe_forward,
        nfe_bwd=run.nfe_backward,
        grad_rel_err=row["grad_rel_err"],
        peak_mem_bytes=row["peak_mem_bytes"],
        harness_version=str(getattr(gqbench, "HARNESS_VERSION", "0")),
    )
    assert row["grad_rel_err"] < 1e-2
