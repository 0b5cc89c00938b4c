"""A first self-contained HTML report (plotly.js embedded, works offline).

One function per figure, each taking the per-case summary from `summarize`, so the dashboard
(issue 5) can reuse and rearrange them.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from ._results import load_results

# Cases that are the same experiment except for the method: GQ is compared to baselines on these.
MATCH = ["problem", "width", "batch", "rtol", "atol", "solver", "device", "dtype", "seed", "threads"]
QUAD_METHODS = ("torch_gq", "jax_gq")


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """One row per finished (`status == "ok"`) case: medians over repeats, IQR of the backward time."""
    ok = df[df["status"] == "ok"].copy()
    if ok.empty:
        return pd.DataFrame(columns=["case_id", "label", "method", *MATCH, "bwd_s", "fwd_s", "tolerance"])
    ok["total_s"] = ok["fwd_s"] + ok["bwd_s"]
    keys = ["case_id", "label", "method", "gtol", "quad_order", "backward_state", *MATCH]
    obj = ok[keys].astype(object).where(ok[keys].notna(), None)
    ok[keys] = obj
    g = ok.groupby("case_id", sort=False)
    med = g[["fwd_s", "bwd_s", "total_s", "peak_mem_bytes", "nfe_fwd", "nfe_bwd", "grad_rel_err"]].median()
    med["bwd_iqr_s"] = g["bwd_s"].quantile(0.75) - g["bwd_s"].quantile(0.25)
    med["repeats"] = g.size()
    out = ok.drop_duplicates("case_id").set_index("case_id")[[k for k in keys if k != "case_id"]].join(med)
    out = out.reset_index()
    out["peak_mem_mib"] = out["peak_mem_bytes"] / 2**20
    out["tolerance"] = [f"rtol={r:g}, atol={a:g}" for r, a in zip(out["rtol"], out["atol"], strict=True)]
    return out.sort_values(["problem", "label", "tolerance", "width"]).reset_index(drop=True)


def _facets(summary: pd.DataFrame) -> dict:
    kw = dict(facet_col="tolerance")
    if summary["problem"].nunique() > 1:
        kw["facet_row"] = "problem"
    return kw


def _style(fig: go.Figure, title: str) -> go.Figure:
    fig.update_layout(title=title, legend_title_text="", template="plotly_white", height=None)
    fig.for_each_annotation(
        lambda a: a.update(
            text=a.text.split("=", 1)[-1] if a.text.startswith("problem=") else a.text.replace("tolerance=", "")
        )
    )
    return fig


def fig_backward_time(summary: pd.DataFrame) -> go.Figure:
    fig = px.line(
        summary,
        x="width",
        y="bwd_s",
        color="label",
        markers=True,
        log_x=True,
        log_y=True,
        error_y="bwd_iqr_s",
        hover_data=["nfe_fwd", "nfe_bwd", "fwd_s", "grad_rel_err"],
        labels={"bwd_s": "backward time (s, median)", "width": "width"},
        **_facets(summary),
    )
    return _style(fig, "Backward time vs width")


def fig_peak_memory(summary: pd.DataFrame) -> go.Figure:
    fig = px.line(
        summary,
        x="width",
        y="peak_mem_mib",
        color="label",
        markers=True,
        log_x=True,
        log_y=True,
        labels={"peak_mem_mib": "peak memory of forward+backward (MiB, median)"},
        **_facets(summary),
    )
    return _style(fig, "Peak memory vs width")


def speedups(summary: pd.DataFrame) -> pd.DataFrame:
    """GQ's backward (and total) time speed-up over every baseline run on the same experiment."""
    gq = summary[summary["method"].isin(QUAD_METHODS)]
    base = summary[~summary["method"].isin(QUAD_METHODS)]
    if gq.empty or base.empty:
        return pd.DataFrame(columns=[*MATCH, "tolerance", "gq", "baseline", "speedup_bwd", "speedup_total"])
    cols = [*MATCH, "tolerance"]
    m = gq[cols + ["label", "bwd_s", "total_s"]].merge(
        base[cols + ["label", "bwd_s", "total_s"]], on=cols, suffixes=("_gq", "_base")
    )
    m["speedup_bwd"] = m["bwd_s_base"] / m["bwd_s_gq"]
    m["speedup_total"] = m["total_s_base"] / m["total_s_gq"]
    m["pair"] = m["label_gq"] + " vs " + m["label_base"]
    return m.rename(columns={"label_gq": "gq", "label_base": "baseline"})


def fig_speedup(summary: pd.DataFrame) -> go.Figure:
    sp = speedups(summary)
    fig = px.line(
        sp,
        x="width",
        y="speedup_bwd",
        color="baseline",
        line_dash="gq",
        markers=True,
        log_x=True,
        log_y=True,
        hover_data=["speedup_total", "bwd_s_gq", "bwd_s_base"],
        labels={"speedup_bwd": "baseline backward time / GQ backward time"},
        **(_facets(sp) if not sp.empty else {}),
    )
    fig.add_hline(y=1.0, line_dash="dot", line_color="gray")
    return _style(fig, "GQ's backward speed-up over each baseline (> 1: GQ faster)")


def fig_nfe(summary: pd.DataFrame) -> go.Figure:
    fig = px.line(
        summary,
        x="width",
        y="nfe_bwd",
        color="label",
        markers=True,
        log_x=True,
        labels={"nfe_bwd": "backward NFE"},
        hover_data=["nfe_fwd"],
        **_facets(summary),
    )
    return _style(fig, "Backward function evaluations (direct backprop: 0, it replays the graph)")


def fig_grad_error(summary: pd.DataFrame) -> go.Figure:
    fig = px.line(
        summary.dropna(subset=["grad_rel_err"]),
        x="width",
        y="grad_rel_err",
        color="label",
        markers=True,
        log_x=True,
        log_y=True,
        labels={"grad_rel_err": "gradient relative L2 error vs float64 reference"},
        **_facets(summary),
    )
    return _style(fig, "Gradient error")


def status_table(df: pd.DataFrame) -> str:
    cases = df.drop_duplicates("case_id")
    counts = cases["status"].value_counts().to_dict()
    head = " · ".join(f"{html.escape(str(k))}: {v}" for k, v in counts.items())
    bad = cases[cases["status"] != "ok"][["label", "problem", "width", "rtol", "status", "error"]]
    table = bad.to_html(index=False, escape=True, border=0, classes="fail") if len(bad) else ""
    return f"<p>{len(cases)} cases — {head}</p>{table}"


def environment_html(out_dir: Path) -> str:
    path = out_dir / "environment.json"
    if not path.exists():
        return ""
    env = json.loads(path.read_text())
    keep = {
        k: env.get(k)
        for k in (
            "date",
            "git_sha",
            "git_dirty",
            "cpu_model",
            "cpu_count",
            "threads",
            "gpus",
            "python",
            "platform",
            "versions",
            "settings",
        )
    }
    return f"<details><summary>Environment</summary><pre>{html.escape(json.dumps(keep, indent=2))}</pre></details>"


FIGURES = (fig_backward_time, fig_speedup, fig_peak_memory, fig_nfe, fig_grad_error)


def render(df: pd.DataFrame, *, title: str = "gqbench", env_html: str = "") -> str:
    summary = summarize(df)
    parts = []
    for i, make in enumerate(FIGURES):
        if summary.empty:
            break
        fig = make(summary)
        # plotly.js once, inline: the page works offline and from a file:// URL.
        parts.append(fig.to_html(full_html=False, include_plotlyjs=i == 0, default_height="520px"))
    body = "\n".join(parts) if parts else "<p>No finished cases to plot.</p>"
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table.fail td{{padding:2px 8px}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>Medians over repeats; error bars are the IQR of the backward time. Lines join widths of one method
setting; columns are tolerances.</p>
{status_table(df)}
{body}
{env_html}
</body></html>"""


def write_report(out_dir: str | Path) -> Path:
    """`DIR/index.html` from `DIR/results.parquet`; returns its path."""
    out_dir = Path(out_dir)
    df = load_results(out_dir)
    path = out_dir / "index.html"
    tmp = out_dir / ".index.html.tmp"
    tmp.write_text(render(df, title=f"gqbench — {out_dir.name}", env_html=environment_html(out_dir)))
    tmp.replace(path)
    return path
