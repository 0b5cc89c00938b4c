"""The self-contained HTML report (`gqbench report DIR`): plotly.js embedded once, works offline.

The figures are pure functions in `_figures` (DataFrame -> Figure); this module loads the data
(results, environment, an optional baseline run, profiles, asv's published site) and lays out
the page. `summarize`, `speedups` and `FIGURES` are re-exported from `_figures`.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from ..results.tables import load_results, load_table
from ..training import claims as train_claims
from ..training import figures as train_figures
from ..training import sde_figures
from .figures import (
    FIGURES,
    MATCH,
    OPTIONAL_FIGURES,
    QUAD_METHODS,
    SAMPLE_FIGURES,
    compare_runs,
    fig_baseline_comparison,
    fig_phases,
    speedups,
    summarize,
)
from .verdict import verdict_html

__all__ = [
    "FIGURES",
    "MATCH",
    "QUAD_METHODS",
    "render",
    "speedups",
    "status_table",
    "summarize",
    "write_report",
]

DEFAULT_THRESHOLD = 0.10

# Short explanations shown under each figure's heading, by figure function name.
NOTES = {
    "fig_backward_time": "Median over repeats, error bars from the 25th to the 75th percentile. Columns: tolerances.",
    "fig_total_time": "One training step's cost: forward solve plus gradient.",
    "fig_speedup_heatmap": "Each cell: baseline's backward time / GQ's on the same experiment (problem, width, "
    "batch, tolerances, solver, device, dtype, seed, threads), timed side by side, paired by round. With several "
    "processes per case: the geometric mean of each process's median ratio, and a 95% interval over processes "
    "(Student's t), which is what a rerun would see; with one: the median of the rounds' ratios and a bootstrap "
    "interval over its rounds, which cannot see how a new process differs. Hover: the interval, what it is over, "
    "each process's median; ~: the interval includes 1 (no clear difference). Blue: GQ faster.",
    "fig_speedup_heatmap_total": "As above for forward + backward time.",
    "fig_speedup": "The backward speed-up as lines over width (dashes: GQ setting).",
    "fig_peak_memory": "Peak memory of one forward + backward above what was allocated before it "
    "(CUDA: max_memory_allocated; CPU: RSS high-water mark).",
    "fig_memory_vs_nfe": "One point per case. A flat cloud per method: memory does not grow with solver steps "
    "(the adjoint's and GQ's promise); direct backprop grows with them.",
    "fig_work_precision": "Gradient error against a float64 reference vs time; points of one line are the "
    "tolerances of one method at one width.",
    "fig_nfe": "Solid: forward, dashed: backward function evaluations (medians). Adaptive solvers take "
    "different step counts per method, so read times together with these.",
    "fig_grad_error": "Relative L2 error of all parameter and y0 gradients.",
    "fig_quadrature_order": "GQ's own knob: nodes per observation interval, fixed (n) or from the paper's rule (gtol).",
    "fig_quadrature_error": "The adaptive rule's estimate |K5 - G2| relative to the gradient (an estimate of "
    "the 2-point rule's error; the 5-point result is kept, so it over-states the quadrature's share) against "
    "the measured error. Far below the diagonal: the solver, not the integral, limits accuracy.",
    "fig_device_comparison": "The same methods on CPU and CUDA, y axes shared.",
    "fig_single_width": "Problems measured at one width only (no scaling to plot): each method's median time over "
    "the fastest median, whiskers from its quartiles; hover for the gradient error and backward NFE. The paired "
    "speed-ups with their intervals are in the verdict table.",
    "fig_compile_time": "Tracing plus XLA compilation, measured once per case and kept out of the timed calls.",
    **sde_figures.NOTES,
    **train_figures.NOTES,
}
TITLES = {
    "fig_backward_time": "Backward time vs width",
    "fig_total_time": "Total time vs width",
    "fig_speedup_heatmap": "Speed-up of GQ: backward",
    "fig_speedup_heatmap_total": "Speed-up of GQ: forward + backward",
    "fig_speedup": "Speed-up vs width",
    "fig_peak_memory": "Peak memory vs width",
    "fig_memory_vs_nfe": "Peak memory vs forward NFE",
    "fig_work_precision": "Work-precision",
    "fig_nfe": "Function evaluations",
    "fig_grad_error": "Gradient error",
    "fig_quadrature_order": "Quadrature order",
    "fig_quadrature_error": "Quadrature error: estimated vs measured",
    "fig_single_width": "Single-width problems",
    "fig_device_comparison": "CPU vs CUDA",
    "fig_compile_time": "JAX compile time",
    "fig_baseline_comparison": "Against the baseline run",
    "fig_phases": "Where the time goes (profiles)",
    "sde_training": "SDE training",
    **sde_figures.TITLES,
    **train_figures.TITLES,
}

CSS = """
body{font-family:system-ui,sans-serif;margin:0 auto;max-width:1500px;padding:1em 2em;color:#222}
h1{margin-bottom:.2em} h2{margin-top:1.6em;border-bottom:1px solid #ddd}
.note{color:#555;margin:.2em 0 .6em} nav a{margin-right:1em} nav{line-height:1.8}
table{border-collapse:collapse;font-size:90%} td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:left}
table.env th{color:#555;font-weight:normal;white-space:nowrap}
tr.regression td{background:#fde0dc} tr.improvement td{background:#dff3e0}
code,pre{background:#f6f6f6} pre{padding:.6em;overflow:auto;max-height:30em}
.bad{color:#b00}
"""


# ----------------------------------------------------------------------------- HTML pieces


def _table(df: pd.DataFrame, cls: str = "") -> str:
    return df.to_html(index=False, escape=True, border=0, classes=cls, na_rep="", float_format=lambda x: f"{x:.4g}")


def status_table(df: pd.DataFrame) -> str:
    """Case counts by status, then every case that did not finish with its error."""
    cases = df.drop_duplicates("case_id")
    counts = cases["status"].value_counts().to_dict()
    head = " · ".join(f"{html.escape(str(k))}: {v}" for k, v in counts.items())
    cols = [c for c in ("label", "problem", "width", "rtol", "device", "status", "error", "case_id") if c in cases]
    bad = cases[cases["status"] != "ok"][cols]
    table = _table(bad, "fail") if len(bad) else ""
    return f"<p>{len(cases)} cases — {head}</p>{table}"


def _env_rows(env: dict) -> list[tuple[str, str]]:
    versions = env.get("versions") or {}
    gpus = env.get("gpus") or []
    gpu = "; ".join(f"{g.get('name')} (driver {g.get('driver')}, {g.get('memory')})" for g in gpus) or "none"
    sha = env.get("git_sha") or "unknown"
    if env.get("git_dirty"):
        sha += " (uncommitted changes)"
    runs = env.get("runs") or []
    rows = [
        ("run date", str(env.get("date", ""))),
        ("git commit", sha),
        ("CPU", f"{env.get('cpu_model', '?')} ({env.get('cpu_count', '?')} logical cores)"),
        ("threads", str(env.get("threads", ""))),
        ("GPU", gpu),
        ("python / platform", f"{env.get('python', '?')} / {env.get('platform', '?')}"),
        ("libraries", ", ".join(f"{k} {v}" for k, v in versions.items() if v)),
    ]
    gq = env.get("gq_defaults")
    if gq:  # what torch_gq with unset options ran: defaults change between versions
        rows.append(("odeint_adjoint_gq defaults", ", ".join(f"{k}={v}" for k, v in gq.items())))
    settings = env.get("settings")
    if settings:
        rows.append(("run settings", ", ".join(f"{k}={v}" for k, v in settings.items())))
    spec = env.get("spec") or {}
    if spec:
        rows.append(("grid", f"{spec.get('name', '')} — {spec.get('description', '')}".strip(" —")))
    if len(runs) > 1:
        rows.append(("invocations", f"{len(runs)} (resumed runs; first {runs[0].get('date')})"))
    return rows


def environment_html(out_dir: Path | None = None, env: dict | None = None) -> str:
    """The header table (environment, grid) and the full metadata folded below it."""
    if env is None:
        path = Path(out_dir) / "environment.json" if out_dir is not None else None
        if path is None or not path.exists():
            return "<p class='note'>No environment.json beside the results.</p>"
        env = json.loads(path.read_text())
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in _env_rows(env))
    spec = env.get("spec")
    spec_html = (
        f"<details><summary>Grid spec</summary><pre>{html.escape(json.dumps(spec, indent=2))}</pre></details>"
        if spec
        else ""
    )
    full = html.escape(json.dumps(env, indent=2, default=str))
    return (
        f"<table class='env'>{rows}</table>{spec_html}"
        f"<details><summary>All environment metadata</summary><pre>{full}</pre></details>"
    )


def _figure_div(fig: go.Figure, name: str) -> str:
    return fig.to_html(
        full_html=False,
        include_plotlyjs=False,  # plotly.js is in the page head, once
        div_id=name.replace("_", "-"),
        default_height=f"{int(fig.layout.height or 520)}px",
        default_width="100%",
        config={"displaylogo": False, "responsive": True},
    )


def _section(name: str, body: str) -> str:
    note = NOTES.get(name)
    anchor = name.replace("fig_", "")
    return (
        f"<section id='{anchor}'><h2>{html.escape(TITLES.get(name, name))}</h2>"
        f"{f'<p class=note>{html.escape(note)}</p>' if note else ''}{body}</section>"
    )


def _baseline_html(comparison: pd.DataFrame, threshold: float, label: str, n_now: int, n_base: int) -> str:
    from ..results.ratios import machine_factor

    counts = comparison["verdict"].value_counts().to_dict()
    factor = machine_factor(comparison.rename(columns={"ratio_total_s": "ratio_total"}))
    drift = (
        f" The baselines (code GQ does not change) ran {factor:.2f}× as long as in the baseline run: the machine's "
        "drift, which GQ's verdicts leave out by timing it relative to the baselines beside it."
        if factor == factor
        else ""
    )
    head = (
        f"<p>Compared with <code>{html.escape(label)}</code>: {len(comparison)} cases in both runs "
        f"({n_now - len(comparison)} only in this run, {n_base - len(comparison)} only in the baseline). "
        f"Threshold ±{threshold:.0%} on GQ's median total time relative to its baselines (on the raw time where "
        f"a GQ case has none), counted only when the 95% interval lies beyond it: "
        f"<b class=bad>{counts.get('regression', 0)} regressions</b>, "
        f"<b>{counts.get('improvement', 0)} improvements</b>, {counts.get('same', 0)} within the band.{drift}</p>"
    )
    moved = comparison[~comparison["verdict"].isin(["same", "-"])].sort_values("ratio_total_s", ascending=False)
    if moved.empty:
        return head

    def rows_html(part: pd.DataFrame) -> str:
        return "".join(_baseline_row(r) for _, r in part.iterrows())

    header = (
        "verdict",
        "method",
        "problem",
        "width",
        "tolerance",
        "device",
        "total s (baseline → now)",
        "total ratio [95% interval]",
        "backward ratio [95% interval]",
        "GQ vs baselines [95% interval]",
        "memory ratio",
        "backward IQR/median now",
    )
    th = "<tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>"
    # The largest changes first (worst regressions, then best improvements); the rest folded.
    reg, imp = moved[moved["verdict"] == "regression"], moved[moved["verdict"] == "improvement"]
    top = pd.concat([reg.head(MAX_ROWS), imp.sort_values("ratio_total_s").head(MAX_ROWS)])
    rest = moved.drop(top.index)
    more = (
        f"<details><summary>{len(rest)} more</summary><table class='baseline'>{th}{rows_html(rest)}</table></details>"
        if len(rest)
        else ""
    )
    return f"{head}<table class='baseline'>{th}{rows_html(top)}</table>{more}"


MAX_ROWS = 15


def _ratio_cell(r, col: str, name: str) -> str:
    lo, hi = r[f"{name}_lo"], r[f"{name}_hi"]
    return f"{r[col]:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo == lo else " (n<3)")


def _baseline_row(r) -> str:
    iqr = (r["bwd_q75"] - r["bwd_q25"]) / r["bwd_s"] if r["bwd_s"] else float("nan")
    cells = [
        r["verdict"],
        r["label"],
        r["problem"],
        str(r["width"]),
        r["tolerance"],
        str(r["device"]),
        f"{r['total_s_baseline']:.4g} → {r['total_s']:.4g}",
        _ratio_cell(r, "ratio_total_s", "total"),
        _ratio_cell(r, "ratio_bwd_s", "bwd"),
        _ratio_cell(r, "rel_total", "rel") if r["rel_total"] == r["rel_total"] else "",
        f"{r['ratio_peak_mem_bytes']:.3f}",
        f"{iqr:.0%}",
    ]
    return f"<tr class='{r['verdict']}'>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>"


def _profiles_html(phases: pd.DataFrame, root: Path, out_dir: Path | None) -> str:
    rel = os.path.relpath(root, out_dir) if out_dir is not None else str(root)
    rows = []
    for case_id, g in phases.groupby("case_id", sort=False):
        total = g["ms"].sum()
        split = "; ".join(
            f"{p} {ms:.1f} ms ({s:.0%})" for p, ms, s in zip(g["phase"], g["ms"], g["share"], strict=True)
        )
        res_path = root / case_id / "phases.json"
        top = ""
        try:
            res = json.loads(res_path.read_text())
            ops = (res.get("top_ops") or {}).get("backward") or []
            top = ", ".join(f"{o['name']} {o['self_ms']:.1f} ms" for o in ops[:4])
        except (OSError, ValueError):
            pass
        link = f"<a href='{html.escape(rel)}/{html.escape(case_id)}/'>{html.escape(case_id)}</a>"
        nfe = f"{g['nfe_fwd'].iloc[0]} / {g['nfe_bwd'].iloc[0]}"
        rows.append(
            f"<tr><td>{html.escape(g['case'].iloc[0])}</td><td>{total:.1f}</td><td>{html.escape(split)}</td>"
            f"<td>{html.escape(nfe)}</td><td>{html.escape(top)}</td><td>{link}</td></tr>"
        )
    th = "".join(
        f"<th>{h}</th>"
        for h in ("case", "ms / step", "phases", "NFE fwd / bwd", "top ops in backward (self time / step)", "traces")
    )
    return (
        f"<table>{th}{''.join(rows)}</table>"
        f"<p class=note>From <code>{html.escape(str(root))}</code>. Open the traces with "
        f"<code>tensorboard --logdir {html.escape(str(root))}</code> (PyTorch Profiler tab: Overview, Operator, "
        "Trace, Memory; needs torch-tb-profiler) or drop a <code>*.pt.trace.json</code> on "
        "ui.perfetto.dev.</p>"
    )


def _asv_html(asv: Path | None, out_dir: Path | None) -> str:
    if asv is None:
        return ""
    href = os.path.relpath(asv, out_dir) if out_dir is not None else str(asv)
    return f"<p>History across commits: <a href='{html.escape(href)}'>asv's published benchmarks</a>.</p>"


# ----------------------------------------------------------------------------- the page


def render(
    df: pd.DataFrame,
    *,
    title: str = "gqbench",
    env_html: str = "",
    baseline: pd.DataFrame | None = None,
    baseline_label: str = "baseline",
    threshold: float = DEFAULT_THRESHOLD,
    phases: pd.DataFrame | None = None,
    profiles_root: Path | None = None,
    asv: Path | None = None,
    out_dir: Path | None = None,
    epochs: pd.DataFrame | None = None,
    sde_bands: pd.DataFrame | None = None,
    toy_gradient: pd.DataFrame | None = None,
) -> str:
    """The whole page as a string. `baseline`: another run's results table to compare against;
    `phases`: `_profile.load_phases(...)` of the profiles to show; `epochs`/`sde_bands`: the training
    tables (the "SDE training" section)."""
    from plotly.offline import get_plotlyjs

    training = df["epochs"].notna() if "epochs" in df else pd.Series(False, index=df.index)
    # The figures show the initial weights (one point per width); trained states (`train_steps`) are in the
    # verdict's trained columns. Training cases have their own section.
    trained = df["train_steps"].fillna(0) > 0 if "train_steps" in df else pd.Series(False, index=df.index)
    summary = summarize(df[~training & ~trained])
    gradient = df[~training]
    sections: list[tuple[str, str]] = []
    if not summary.empty:
        for make in FIGURES:
            fig = make(summary, samples=df[~training & ~trained]) if make in SAMPLE_FIGURES else make(summary)
            if fig is not None:  # None: nothing of this kind was measured (e.g. no problem at two widths)
                sections.append((make.__name__, _figure_div(fig, make.__name__)))
        for make in OPTIONAL_FIGURES:
            fig = make(summary)
            if fig is not None:
                sections.append((make.__name__, _figure_div(fig, make.__name__)))
    sde = _sde_rows(epochs)
    ode = None if epochs is None else epochs[~sde]
    if (ode is not None and not ode.empty) or (toy_gradient is not None and not toy_gradient.empty):
        sections += _training_sections(ode, toy_gradient)
    if epochs is not None and not epochs[sde].empty:
        sections += _sde_sections(epochs[sde], sde_bands)
    if baseline is not None:
        base_training = baseline["epochs"].notna() if "epochs" in baseline else pd.Series(False, index=baseline.index)
        base_summary = summarize(baseline[~base_training])
        comparison = compare_runs(df[~training], baseline[~base_training], threshold) if not summary.empty else None
        if comparison is not None and not comparison.empty:
            fig = fig_baseline_comparison(comparison, threshold)
            body = _baseline_html(comparison, threshold, baseline_label, len(summary), len(base_summary)) + _figure_div(
                fig, "fig_baseline_comparison"
            )
        else:
            body = f"<p>No case of this run is in the baseline <code>{html.escape(baseline_label)}</code>.</p>"
        sections.append(("fig_baseline_comparison", body))
    if phases is not None and not phases.empty:
        fig = fig_phases(phases)
        sections.append(("fig_phases", _figure_div(fig, "fig_phases") + _profiles_html(phases, profiles_root, out_dir)))
    body = "\n".join(_section(name, html_) for name, html_ in sections)
    if summary.empty and not sections:
        body = "<p>No finished cases to plot.</p>\n" + body
    nav = " ".join(
        f"<a href='#{name.replace('fig_', '')}'>{html.escape(TITLES.get(name, name))}</a>" for name, _ in sections
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{CSS}</style>
<script type="text/javascript">{get_plotlyjs()}</script>
</head>
<body><h1>{html.escape(title)}</h1>
{verdict_html(gradient, summarize(gradient))}
<nav>{nav} <a href="#status">Cases and failures</a> <a href="#environment">Environment</a></nav>
{body}
<h2 id="status">Cases</h2>
{status_table(df)}
{_asv_html(asv, out_dir)}
<h2 id="environment">Environment</h2>
{env_html}
</body></html>"""


def _sde_rows(epochs: pd.DataFrame | None) -> pd.Series | None:
    """Which epoch rows belong to SDE training problems (their own section)."""
    if epochs is None:
        return None
    from ..define.training_problems import TRAINING_PROBLEMS

    sde = [n for n, p in TRAINING_PROBLEMS.items() if p.noise_axis]
    return epochs["problem"].isin(sde)


def _training_sections(epochs: pd.DataFrame | None, toy: pd.DataFrame | None) -> list[tuple[str, str]]:
    """The paper's ODE experiments: the claims table and tables first, then the figures."""
    figs = train_figures.section_figures(epochs, toy)
    out = [("training", train_claims.tables_html(epochs, toy))]
    return out + [(name, _figure_div(fig, name)) for name, fig in figs]


def _sde_sections(epochs: pd.DataFrame, bands: pd.DataFrame | None) -> list[tuple[str, str]]:
    figs = sde_figures.section_figures(epochs, bands)
    if not figs:
        return []
    out = [("sde_training", sde_figures.tables_html(epochs))]
    return out + [(name, _figure_div(fig, name)) for name, fig in figs]


def find_asv(out_dir: Path) -> Path | None:
    """asv's published site (`asv publish` -> reports/asv/index.html), looked for beside DIR,
    in DIR/.. and under ./reports."""
    for c in (out_dir / "asv", out_dir.parent / "asv", Path("reports") / "asv"):
        if (c / "index.html").is_file():
            return (c / "index.html").resolve()
    return None


def write_report(
    out_dir: str | Path,
    *,
    baseline: str | Path | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    profiles: str | Path | None = None,
    asv: str | Path | None = None,
) -> Path:
    """`DIR/index.html` from `DIR/results.parquet`; returns its path.

    `baseline`: another results folder, compared case by case (regressions/improvements beyond
    `threshold`, 0.1 = 10 %). `profiles`: a `gqbench profile` output folder (default: DIR/profiles,
    DIR/../profiles or reports/profiles, the first that holds profiles). `asv`: asv's published
    index.html (default: found beside DIR or under reports/asv)."""
    from ..measurement.profile import find_profiles, load_phases

    if not threshold > 0:
        raise ValueError(f"write_report(threshold={threshold}): must be > 0, e.g. 0.1 for 10 %")
    out_dir = Path(out_dir)
    df = load_results(out_dir)
    base_df = load_results(baseline) if baseline is not None else None
    if profiles is not None and not Path(profiles).is_dir():
        raise FileNotFoundError(f"profiles folder {profiles} does not exist; run `gqbench profile --out {profiles}`")
    root = find_profiles(*((profiles,) if profiles is not None else ()), out_dir / "profiles",
                         out_dir.parent / "profiles", Path("reports") / "profiles")  # fmt: skip
    asv_path = Path(asv).resolve() if asv is not None else find_asv(out_dir)
    page = render(
        df,
        title=f"gqbench — {out_dir.name}",
        env_html=environment_html(out_dir),
        baseline=base_df,
        baseline_label=str(baseline) if baseline is not None else "",
        threshold=threshold,
        phases=load_phases(root) if root is not None else None,
        profiles_root=root.resolve() if root is not None else None,
        asv=asv_path,
        out_dir=out_dir.resolve(),
        epochs=load_table(out_dir, "epochs"),
        sde_bands=load_table(out_dir, "sde_bands"),
        toy_gradient=load_table(out_dir, "toy_gradient"),
    )
    path = out_dir / "index.html"
    tmp = out_dir / ".index.html.tmp"
    tmp.write_text(page)
    tmp.replace(path)
    return path
