"""The full report: every figure from a synthetic table with all the axes a real run can have
(CPU and CUDA, two tolerances, GQ quadrature settings, JAX methods, failures), the baseline
comparison, profiles and the asv link; and in headless Chromium: every figure drawn, no console
errors. Synthetic numbers, so the whole file runs in seconds (the browser test in ~10 s)."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest

from gqbench import Case, write_report
from gqbench.measurement.profile import leaf_phases, load_phases
from gqbench.report.figures import (
    FIGURES,
    OPTIONAL_FIGURES,
    compare_runs,
    fig_backward_time,
    fig_baseline_comparison,
    fig_compile_time,
    fig_device_comparison,
    fig_phases,
    fig_quadrature_error,
    fig_quadrature_order,
    fig_single_width,
    fig_speedup_heatmap,
    speedups,
    summarize,
)
from gqbench.report.html import render
from gqbench.results.tables import frame, write_case

# Backward seconds at width 10, rtol 1e-3, CPU; scaled below with width, tolerance and device.
BWD = {
    "torch_direct": 0.4,
    "torch_adjoint": 1.0,
    "torch_seminorm": 0.8,
    "torch_gq": 0.25,
    "jax_checkpoint": 0.3,
    "jax_gq": 0.1,
}
QUAD = [dict(quadrature="adaptive"), dict(gtol=0.1), dict(gtol=0.01), dict(quad_order=2), dict(quad_order=8)]


def single_width_rows(slow: float = 1.0) -> list[dict]:
    """g1d at one width: a problem with no scaling to plot (bars, not a facet holding one dot)."""
    rows = []
    for method, kw in (("torch_direct", {}), ("torch_gq", dict(quadrature="adaptive", backward_state="auto"))):
        case = Case(method, "g1d", 64, 2, rtol=1e-5, atol=1e-5, **kw)
        for r in range(3):
            rows.append(dict(case.to_dict(), case_id=case.case_id, label=case.label, repeat=r, round=r,
                             fwd_s=0.01 * slow, bwd_s=(0.02 if kw else 0.03) * slow, peak_mem_bytes=1e6,
                             nfe_fwd=20, nfe_bwd=0 if not kw else 20, grad_rel_err=1e-5, quad_nodes=5 if kw else None,
                             quad_err_est=1e-6 if kw else None, status="ok", error=""))  # fmt: skip
    return rows


def rich_rows(*, slow: float = 1.0, gq_slow: float = 1.0, jax: bool = True) -> list[dict]:
    """`slow`: every method's times scaled (the machine); `gq_slow`: GQ's scaled again (GQ's own change)."""
    rows = []
    rng = np.random.default_rng(0)
    for method, bwd in BWD.items():
        if method.startswith("jax") and not jax:
            continue
        settings = QUAD if method.endswith("_gq") else [{}]
        for q in settings:
            for device in ("cpu", "cuda"):
                for width in (10, 100, 1000):
                    for rtol in (1e-3, 1e-6):
                        case = Case(
                            method,
                            "workload_l",
                            width,
                            200,
                            rtol=rtol,
                            atol=rtol,
                            quadrature=q.get("quadrature"),
                            gtol=q.get("gtol"),
                            quad_order=q.get("quad_order"),
                            backward_state="auto" if q else None,
                            device=device,
                        )
                        scale = (width / 10) ** 0.8 * (2.0 if rtol < 1e-4 else 1.0) * (0.2 if device == "cuda" else 1)
                        scale *= gq_slow if q else 1.0
                        n = q.get("quad_order") or (3 if q.get("gtol") == 0.1 else 12)
                        for r in range(3):
                            rows.append(
                                dict(
                                    case.to_dict(),
                                    case_id=case.case_id,
                                    label=case.label,
                                    repeat=r,
                                    fwd_s=0.1 * scale * slow,
                                    bwd_s=bwd * scale * slow * (1 + 0.01 * n if q else 1) * (1 + 0.05 * rng.random()),
                                    peak_mem_bytes=1e6 * width * (50 if method == "torch_direct" else 1),
                                    nfe_fwd=20 if rtol > 1e-4 else 80,
                                    nfe_bwd=0 if method == "torch_direct" else (30 if rtol > 1e-4 else 110),
                                    grad_rel_err=(rtol * 10 / n) if q else rtol,
                                    compile_s=2.5 if method.startswith("jax") else float("nan"),
                                    quad_nodes=n if q else float("nan"),
                                    quad_err_est=rtol / n if q.get("quadrature") == "adaptive" else float("nan"),
                                    status="ok",
                                    error="",
                                )
                            )
    for status, error in (("timeout", "no result within the 90 s timeout"), ("oom", "CUDA out of memory <b>")):
        crash = Case("torch_adjoint", "workload_l", 4000 if status == "oom" else 2000, 200, rtol=1e-6, atol=1e-6)
        rows.append(
            dict(crash.to_dict(), case_id=crash.case_id, label=crash.label, repeat=0, status=status, error=error)
        )
    return rows


PHASES = {
    "torch_gq": [
        ("forward", None, 100.0),
        ("backward", None, 300.0),
        ("gq::forward_solve", "forward", 95.0),
        ("gq::backward_solve", "backward", 200.0),
        ("gq::quadrature_vjp", "backward", 80.0),
        ("gq::accumulate", "backward", 5.0),
    ],
    "torch_adjoint": [("forward", None, 110.0), ("backward", None, 900.0)],
}


def write_profiles(root):
    for method, phases in PHASES.items():
        case = Case(method, "workload_l", 32, 200, rtol=1e-3, atol=1e-3, gtol=0.1 if method == "torch_gq" else None)
        rows = [dict(phase=p, label=p, parent=parent, ms=ms, calls=1.0) for p, parent, ms in phases]
        res = dict(
            case_id=case.case_id,
            label=case.label,
            case=case.to_dict(),
            phases=rows,
            leaves=leaf_phases(rows),
            nfe_fwd=14,
            nfe_bwd=26,
            top_ops={"backward": [dict(name="aten::mm", self_ms=500.0, calls=150.0)]},
            source="synthetic",
        )
        (root / case.case_id).mkdir(parents=True)
        (root / case.case_id / "phases.json").write_text(json.dumps(res))


@pytest.fixture(scope="module")
def report_dirs(tmp_path_factory):
    """reports/{now,base,profiles,asv} laid out like a real run: DIR/../profiles, DIR/../asv."""
    root = tmp_path_factory.mktemp("reports")
    for name, slow in (("now", 1.0), ("base", 0.8)):  # base: the machine 25% faster, GQ 25% faster again
        rows = rich_rows(slow=slow, gq_slow=slow) + single_width_rows(slow)
        for cid in dict.fromkeys(r["case_id"] for r in rows):
            write_case(root / name, cid, [r for r in rows if r["case_id"] == cid])
    env = dict(
        date="2026-01-01T00:00:00+00:00",
        git_sha="abc123",
        git_dirty=False,
        cpu_model="Test CPU",
        cpu_count=2,
        threads=[2],
        gpus=[dict(name="Test GPU", driver="555.1", memory="80 GiB")],
        versions={"torch": "2.13.0", "plotly": "x"},
        settings=dict(repeats=3),
        spec=dict(name="default", description="test grid", axes={"width": [10, 100]}),
    )
    (root / "now" / "environment.json").write_text(json.dumps(env))
    write_profiles(root / "profiles")
    (root / "asv").mkdir()
    (root / "asv" / "index.html").write_text("<html>asv</html>")
    path = write_report(root / "now", baseline=root / "base", threshold=0.1)
    return root, path


# ----------------------------------------------------------------------------- figures and data


def test_summary_has_quartiles_and_panels():
    s = summarize(frame(rich_rows()))
    assert (s["bwd_q25"] <= s["bwd_s"]).all() and (s["bwd_s"] <= s["bwd_q75"]).all()
    assert set(s["panel"]) == {"cpu", "cuda"}  # device varies -> a row facet per device
    assert len(s) == (4 + 2 * len(QUAD)) * 2 * 3 * 2  # (baselines + GQ settings) x devices x widths x tolerances


def test_speedup_heatmap_covers_torch_gq_and_jax_gq_over_every_baseline():
    s = summarize(frame(rich_rows()))
    sp = speedups(s)
    assert set(sp["baseline"]) == {"torch_direct", "torch_adjoint", "torch_seminorm", "jax_checkpoint"}
    assert {g.split("[")[0] for g in sp["gq"]} == {"torch_gq", "jax_gq"}
    fig = fig_speedup_heatmap(s)
    heat = [t for t in fig.data if t.type == "heatmap"]
    assert len(heat) == 2 * 4  # rows: devices; columns: baselines
    assert all(t.z.shape == (2 * len(QUAD) * 2, 3) for t in heat)  # (GQ settings x tolerances) x widths
    assert (np.exp2(np.concatenate([t.z.ravel() for t in heat])) > 1).all()  # GQ is faster everywhere here


def test_figures_without_jax_or_cuda_rows():
    rows = [r for r in rich_rows(jax=False) if r.get("device") == "cpu"]
    s = summarize(frame(rows))
    assert not s["method"].str.startswith("jax").any()
    assert fig_device_comparison(s) is None and fig_compile_time(s) is None
    assert fig_quadrature_order(s) is not None
    err = fig_quadrature_error(s)  # adaptive GQ: its estimate against the measured error
    assert err is not None and len(err.data) == 2 and err.data[0].name == "torch_gq[adaptive] · workload_l"
    for make in FIGURES:
        make(s)  # all draw, nothing raises


def test_quadrature_order_figure_only_with_several_settings():
    rows = [r for r in rich_rows() if r.get("quad_order") is None and r.get("gtol") in (None, 0.1)]
    rows = [r for r in rows if r.get("quadrature") != "adaptive"]
    assert fig_quadrature_order(summarize(frame(rows))) is None


def test_compare_runs_marks_regressions_beyond_threshold():
    now = frame(rich_rows(slow=1.0))
    slower_base = frame(rich_rows(slow=0.8))  # now is 25 % slower
    same_base = frame(rich_rows(slow=1.05))  # now is 5 % faster: inside the band
    assert (compare_runs(now, slower_base, 0.1, absolute=True)["verdict"] == "regression").all()
    assert (compare_runs(now, same_base, 0.1, absolute=True)["verdict"] == "same").all()
    assert (compare_runs(now, slower_base, 0.5, absolute=True)["verdict"] == "same").all()
    assert (compare_runs(slower_base, now, 0.1, absolute=True)["verdict"] == "improvement").all()
    # Every method 25% slower is the machine, not GQ: judged against its baselines, GQ did not move.
    rel = compare_runs(now, slower_base, 0.1)
    gq = rel["method"].isin(["torch_gq", "jax_gq"])
    assert (rel.loc[gq, "basis"] == "baselines").any()
    assert (rel.loc[gq & (rel["basis"] == "baselines"), "verdict"] == "same").all()
    assert (rel.loc[~gq, "verdict"] == "-").all()


def test_phase_breakdown_adds_up(tmp_path):
    write_profiles(tmp_path)
    ph = load_phases(tmp_path)
    gq = ph[ph["method"] == "torch_gq"].set_index("phase")["ms"]
    assert gq["gq::backward_solve"] == 200 and gq["backward (other)"] == pytest.approx(15)
    assert ph.groupby("case_id")["share"].sum().round(9).eq(1).all()
    fig = fig_phases(ph)
    assert {t.name for t in fig.data} >= {"gq::quadrature_vjp", "backward"}


def test_single_width_problems_are_bars_not_empty_facets():
    s = summarize(frame(rich_rows(jax=False) + single_width_rows()))
    back = fig_backward_time(s)
    facets = {a.text for a in back.layout.annotations}
    assert facets and not any("g1d" in f for f in facets)  # only problems measured at several widths
    assert len(facets) == 2 * 2  # workload_l x {cpu, cuda} panels x 2 tolerances, no empty cell
    bars = fig_single_width(s)
    assert bars is not None and {t.type for t in bars.data} == {"bar"}
    assert {x for t in bars.data for x in t.x} == {"g1d w=64 rtol=1e-05"}
    assert fig_single_width(summarize(frame(rich_rows(jax=False)))) is None
    assert fig_backward_time(summarize(frame(single_width_rows()))) is None


def test_no_figure_has_an_empty_facet():
    """No figure has a blank facet amid its grid (a reader must not scroll past blank axes): only the
    last row of a wrapped grid may end early. Old layout (problem rows x tolerance columns) failed this."""
    df = frame(rich_rows(jax=False) + single_width_rows())
    s = summarize(df)
    figs = [(make.__name__, make(s)) for make in (*FIGURES, *OPTIONAL_FIGURES)]
    figs.append(("fig_baseline_comparison", fig_baseline_comparison(compare_runs(df, frame(rich_rows(slow=0.8))))))
    for name, fig in figs:
        if fig is None:
            continue
        layout = fig.layout.to_plotly_json()
        shown = {k.replace("axis", "") for k, v in layout.items() if k.startswith("xaxis") and v.get("visible", True)}
        drawn = {t.xaxis or "x" for t in fig.data}
        columns = {tuple(layout[f"xaxis{a[1:]}"].get("domain", (0, 1))) for a in shown}
        assert len(shown - drawn) < len(columns), (name, sorted(shown - drawn), len(columns))


def test_page_has_every_section(report_dirs):
    root, path = report_dirs
    page = path.read_text()
    n_divs = page.count('class="plotly-graph-div"')
    assert n_divs == len(FIGURES) + len(OPTIONAL_FIGURES) + 2  # + baseline comparison + phases
    assert page.count("Plotly.newPlot") == n_divs
    assert page.count("plotly.js v") == 1  # embedded once, not per figure
    assert not re.search(r"<script[^>]*\bsrc=|<link[^>]*\bhref=[\"']?https?:", page)  # nothing fetched
    for text in ("abc123", "Test CPU", "Test GPU (driver 555.1", "torch 2.13.0", "test grid", "2026-01-01"):
        assert text in page
    assert "regressions</b>" in page and "tr class='regression'" in page
    assert "no result within the 90 s timeout" in page and "CUDA out of memory &lt;b&gt;" in page
    assert "href='../asv/index.html'" in page
    assert "tensorboard --logdir" in page and 'id="fig-phases"' in page


def test_render_without_extras_skips_optional_sections():
    rows = [r for r in rich_rows(jax=False) if r.get("device") == "cpu" and r.get("quad_order") is None]
    rows = [r for r in rows if r.get("gtol") in (None, 0.1) and r.get("quadrature") != "adaptive"]
    page = render(frame(rows))
    assert page.count('class="plotly-graph-div"') == len(FIGURES)
    assert "fig-phases" not in page and "asv" not in page


def test_cli_report_with_baseline(report_dirs, tmp_path):
    from gqbench.cli import main

    root, _ = report_dirs
    out = tmp_path / "now"
    shutil.copytree(root / "now", out)
    assert main(["report", str(out), "--baseline", str(root / "base"), "--threshold", "0.3",
                 "--profiles", str(root / "profiles")]) == 0  # fmt: skip
    page = (out / "index.html").read_text()
    assert "±30%" in page and "fig-phases" in page
    assert main(["report", str(out), "--threshold", "0"]) == 2


# ----------------------------------------------------------------------------- in a real browser

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if os.path.exists(p)), None)
CHROMEDRIVER = shutil.which("chromedriver") or (
    "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None
)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    if CHROMIUM is None or CHROMEDRIVER is None:
        return (
            "Debian packages chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
        )
    return None


COLLECT_ERRORS_JS = (
    "window.__errors = [];"
    "window.addEventListener('error', e => window.__errors.push(String(e.message)));"
    "window.addEventListener('unhandledrejection', e => window.__errors.push('unhandled: ' + String(e.reason)));"
)


@pytest.fixture
def browser():
    why = _browser_missing()
    if why:
        if IN_CI:
            pytest.fail(f"CI=true but {why}: .ci/run must install them")
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="gqbench-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,2600",  # tall enough that a figure screenshot is not cut off
        f"--user-data-dir={profile}",
    ):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    # Collect the page's own JavaScript errors from its first script on (read as window.__errors).
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": COLLECT_ERRORS_JS})
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_every_figure_renders_in_chromium(report_dirs, browser, tmp_path_factory):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    _, path = report_dirs
    undrawn = (
        "return [...document.querySelectorAll('.plotly-graph-div')]"
        ".filter(d => !(d.classList.contains('js-plotly-plot') && d.querySelector('svg.main-svg'))).map(d => d.id)"
    )

    def wait_drawn() -> str | None:
        try:
            WebDriverWait(browser, 60).until(lambda d: not d.execute_script(undrawn))
            return None
        except TimeoutException:  # say what was left, so a failure in CI can be read from its log
            severe = [e["message"][:300] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
            return (
                f"not drawn after 60 s: {browser.execute_script(undrawn)}; page errors: "
                f"{browser.execute_script('return window.__errors')}; browser log: {severe}"
            )

    browser.get(path.as_uri())
    first = wait_drawn()
    if first:  # one reload, so that one stalled page load on a busy CI machine is told from a broken figure
        browser.refresh()
        second = wait_drawn()
        assert not second, f"{first}; after a reload: {second}"
        warnings.warn(f"the report drew only after a reload ({first})", stacklevel=1)
    divs = browser.execute_script("return document.querySelectorAll('.plotly-graph-div').length")
    assert divs == len(FIGURES) + len(OPTIONAL_FIGURES) + 2
    # Heatmaps really drew their cells, lines their traces.
    assert browser.execute_script("return document.querySelectorAll('#fig-speedup-heatmap .heatmaplayer image, "
                                  "#fig-speedup-heatmap .hm image').length") > 0  # fmt: skip
    assert (
        browser.execute_script("return document.querySelectorAll('#fig-backward-time .scatterlayer .trace').length") > 0
    )
    # A screenshot per figure, as a reader sees it: none blank (a blank PNG of this size compresses to ~10 kB).
    from selenium.webdriver.common.by import By

    # GQBENCH_SCREENSHOTS=DIR keeps them for a person to look at.
    shots = Path(os.environ.get("GQBENCH_SCREENSHOTS") or tmp_path_factory.mktemp("shots"))
    shots.mkdir(parents=True, exist_ok=True)
    for el in browser.find_elements(By.CSS_SELECTOR, ".plotly-graph-div"):
        browser.execute_script("arguments[0].scrollIntoView()", el)
        png = el.screenshot_as_png
        (shots / f"{el.get_attribute('id') or 'fig'}.png").write_bytes(png)
        assert len(png) > 15_000, f"figure {el.get_attribute('id')} looks blank ({len(png)} bytes)"
    logs = browser.get_log("browser")
    errors = [e for e in logs if e["level"] == "SEVERE" and "favicon.ico" not in e["message"]]
    assert not errors, errors
    js_errors = browser.execute_script("return window.__errors")
    assert js_errors == [], js_errors  # None would mean the collector never ran
