"""The report renders from a small fixed table, offline (plotly.js inline), with GQ's speed-ups."""

import pandas as pd
import pytest

from gqbench import Case, write_report
from gqbench.report.html import FIGURES, render, speedups, summarize
from gqbench.results.tables import frame, write_case

BWD = {"torch_direct": 0.4, "torch_adjoint": 1.0, "torch_gq": 0.25}


def fixed_rows():
    rows = []
    for method, bwd in BWD.items():
        for width in (10, 100):
            case = Case(
                method,
                "workload_l",
                width,
                200,
                rtol=1e-3,
                atol=1e-3,
                gtol=0.1 if method == "torch_gq" else None,
                backward_state="backsolve" if method == "torch_gq" else None,
            )
            for r, jitter in enumerate((0.9, 1.0, 1.1)):
                rows.append(
                    dict(
                        case.to_dict(),
                        case_id=case.case_id,
                        label=case.label,
                        repeat=r,
                        fwd_s=0.1,
                        bwd_s=bwd * width / 10 * jitter,
                        peak_mem_bytes=1e6 * width,
                        nfe_fwd=20,
                        nfe_bwd=0 if method == "torch_direct" else 30,
                        grad_rel_err=1e-6,
                        status="ok",
                        error="",
                    )
                )
    crash = Case("torch_adjoint", "workload_l", 2000, 200, rtol=1e-3, atol=1e-3)
    rows.append(
        dict(
            crash.to_dict(),
            case_id=crash.case_id,
            label=crash.label,
            repeat=0,
            status="timeout",
            error="no result within the 90 s timeout",
        )
    )
    return rows


def test_summary_and_speedups_from_fixed_table():
    summary = summarize(frame(fixed_rows()))
    assert len(summary) == 6  # the timed-out case has no timings to plot
    sp = speedups(summary).set_index(["baseline", "width"])["speedup_bwd"]
    assert sp[("torch_adjoint", 10)] == pytest.approx(1.0 / 0.25)
    assert sp[("torch_direct", 100)] == pytest.approx(0.4 / 0.25)


def test_render_is_self_contained():
    page = render(frame(fixed_rows()), title="fixed")
    assert page.count('class="plotly-graph-div"') == len(FIGURES)
    assert "<script src=" not in page  # plotly.js inline, no CDN
    assert len(page) > 1_000_000 and "Plotly.newPlot" in page
    assert "timeout: 1" in page and "no result within the 90 s timeout" in page


def test_write_report_from_case_files(tmp_path):
    rows = fixed_rows()
    for cid in {r["case_id"] for r in rows}:
        write_case(tmp_path, cid, [r for r in rows if r["case_id"] == cid])
    path = write_report(tmp_path)  # results.parquet is rebuilt from DIR/cases
    assert path == tmp_path / "index.html" and path.stat().st_size > 1_000_000
    assert len(pd.read_parquet(tmp_path / "results.parquet")) == len(rows)


def test_report_with_only_failures_still_renders():
    page = render(frame(fixed_rows()[-1:]))
    assert "No finished cases to plot" in page
