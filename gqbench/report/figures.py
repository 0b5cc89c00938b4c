"""The report's figures: pure functions, DataFrame in, plotly Figure out (no I/O, no HTML).

`summarize(results)` turns the results table (one row per case x repeat) into one row per case
(medians and quartiles over repeats); most figures take that summary. A figure function returns
None when its data are absent (e.g. no CUDA rows: no CPU-vs-CUDA figure), so the page shows
only what the run measured.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..define.case import MATCH, QUAD_METHODS
from ..results.tables import all_certified

# Cases that are the same experiment except for the method: GQ is compared to baselines on these.
MEDIANS = (
    "fwd_s",
    "bwd_s",
    "total_s",
    "peak_mem_bytes",
    "nfe_fwd",
    "nfe_bwd",
    "grad_rel_err",
    "compile_s",
    "quad_nodes",
    "quad_err_est",
    "fwd_page_faults",
    "bwd_page_faults",
)
KEYS = ["case_id", "label", "method", "quadrature", "gtol", "quad_order", "backward_state", "warm_start", *MATCH]
TEMPLATE = "plotly_white"


# ----------------------------------------------------------------------------- data


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """One row per finished (`status == "ok"`) case: medians over repeats and the quartiles of
    the backward and total times (`*_q25`, `*_q75`; `bwd_iqr_s` = their spread)."""
    ok = df[df["status"] == "ok"].copy()
    for col, default in (("train_steps", 0), ("weights", "")):  # tables from before these case fields
        ok[col] = ok[col].fillna(default) if col in ok else default
    cols = [*KEYS, *MEDIANS, "bwd_iqr_s", "tolerance", "panel", "device_kind", "peak_mem_mib", "total_s"]
    if ok.empty:
        return pd.DataFrame(columns=list(dict.fromkeys(cols)))
    for col in MEDIANS:
        if col not in ok and col != "total_s":
            ok[col] = np.nan
    ok["total_s"] = ok["fwd_s"] + ok["bwd_s"]
    obj = ok[KEYS].astype(object).where(ok[KEYS].notna(), None)
    ok[KEYS] = obj
    g = ok.groupby("case_id", sort=False)
    num = ok[["case_id", *MEDIANS]].copy()
    num[list(MEDIANS)] = num[list(MEDIANS)].apply(pd.to_numeric, errors="coerce").astype("float64")
    gn = num.groupby("case_id", sort=False)
    med = gn[list(MEDIANS)].median()
    for col in ("bwd_s", "total_s"):
        med[col.replace("_s", "_q25")] = gn[col].quantile(0.25)
        med[col.replace("_s", "_q75")] = gn[col].quantile(0.75)
    med["bwd_iqr_s"] = med["bwd_q75"] - med["bwd_q25"]
    med["repeats"] = g.size()
    out = ok.drop_duplicates("case_id").set_index("case_id")[[k for k in KEYS if k != "case_id"]].join(med)
    out = out.join(_certified(ok)).reset_index()
    out["width"] = out["width"].astype("int64")
    out["peak_mem_mib"] = out["peak_mem_bytes"] / 2**20
    out["tolerance"] = [f"rtol={r:g}, atol={a:g}" for r, a in zip(out["rtol"], out["atol"], strict=True)]
    out["device_kind"] = [str(d).split(":")[0] for d in out["device"]]
    out["panel"] = _panel(out)
    return out.sort_values(["problem", "label", "rtol", "width"]).reset_index(drop=True)


def _certified(ok: pd.DataFrame) -> pd.Series:
    """Per case: False when any repeat's GQ gradient warned it is not certified, True when all were
    certified, NA for methods that do not say (baselines)."""
    if "certified" not in ok:
        return pd.Series(pd.NA, index=ok["case_id"].unique(), dtype="boolean", name="certified")
    return ok.groupby("case_id", sort=False)["certified"].agg(all_certified).astype("boolean")


def _panel(s: pd.DataFrame) -> list[str]:
    """A row-facet name from whichever of problem/device/dtype vary ("" when none does)."""
    vary = [c for c in ("problem", "device", "dtype") if s[c].nunique() > 1]
    return [" · ".join(str(r[c]) for c in vary) for _, r in s.iterrows()] if vary else [""] * len(s)


def speedups(summary: pd.DataFrame) -> pd.DataFrame:
    """GQ's backward (and total) time speed-up over every baseline run on the same experiment."""
    cols = [*MATCH, "tolerance", "panel"]
    gq = summary[summary["method"].isin(QUAD_METHODS)]
    base = summary[~summary["method"].isin(QUAD_METHODS)]
    if gq.empty or base.empty:
        return pd.DataFrame(
            columns=[*cols, "gq", "baseline", "pair", "speedup_bwd", "speedup_total", "bwd_s_gq", "bwd_s_base"]
        )
    keep = cols + ["label", "bwd_s", "total_s"]
    m = gq[keep].merge(base[keep], on=cols, suffixes=("_gq", "_base"))
    m["speedup_bwd"] = m["bwd_s_base"] / m["bwd_s_gq"]
    m["speedup_total"] = m["total_s_base"] / m["total_s_gq"]
    m["pair"] = m["label_gq"] + " vs " + m["label_base"]
    return m.rename(columns={"label_gq": "gq", "label_base": "baseline"})


def compare_runs(
    current: pd.DataFrame, baseline: pd.DataFrame, threshold: float = 0.1, *, absolute: bool = False
) -> pd.DataFrame:
    """Two runs' raw result rows -> the cases in both (same case_id): each run's summary side by
    side, the peak memory ratio, and from `results.ratios.compare_samples` the current/baseline ratios
    of the median total and backward times with 95% intervals, GQ's ratio relative to the baselines
    timed beside it, and the verdict ("regression" only when the judged interval lies wholly above
    1 + `threshold`; baselines are not judged: "-")."""
    from ..results.ratios import compare_samples  # _ratios imports this module

    now, base = summarize(current), summarize(baseline)
    cols = ["case_id", "bwd_s", "total_s", "peak_mem_bytes", "bwd_q25", "bwd_q75"]
    m = now.merge(base[cols], on="case_id", suffixes=("", "_baseline"))
    m["ratio_peak_mem_bytes"] = m["peak_mem_bytes"] / m["peak_mem_bytes_baseline"]
    cmp = compare_samples(current, baseline, threshold, absolute=absolute)
    if cmp.empty:
        return m.iloc[:0]
    keep = ["case_id", "ratio_total", "total_lo", "total_hi", "ratio_bwd", "bwd_lo", "bwd_hi", "rel_total", "rel_lo",
            "rel_hi", "basis", "verdict"]  # fmt: skip
    m = m.merge(cmp[keep], on="case_id")
    return m.rename(columns={"ratio_total": "ratio_total_s", "ratio_bwd": "ratio_bwd_s"})


# ----------------------------------------------------------------------------- helpers


def _facets(df: pd.DataFrame, col: str = "tolerance") -> dict:
    kw = dict(facet_col=col)
    if df["panel"].nunique() > 1:
        kw["facet_row"] = "panel"
    return kw


def _style(fig: go.Figure, title: str, *, rows: int = 1) -> go.Figure:
    fig.update_layout(
        title=title,
        legend_title_text="",
        template=TEMPLATE,
        height=max(420, 120 + 320 * rows),
        margin=dict(t=90),
    )
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=", 1)[-1]) if "=" in a.text[:12] else None)
    return fig


def _orders(df: pd.DataFrame) -> dict:
    """The same colour per method label in every figure, tolerance columns loose to tight."""
    labels = sorted(df["label"].dropna().unique()) if "label" in df else []
    palette = px.colors.qualitative.Dark24
    out = dict(color_discrete_map={lab: palette[i % len(palette)] for i, lab in enumerate(labels)})
    orders = {"label": labels}
    if "tolerance" in df and "rtol" in df:
        orders["tolerance"] = list(df.sort_values(["rtol", "atol"], ascending=False)["tolerance"].unique())
    if "panel" in df and "width" in df:
        # The panel with the most widths (the scaling study) on top, single-width checks below it.
        orders["panel"] = list(df.groupby("panel")["width"].nunique().sort_values(ascending=False, kind="stable").index)
    out["category_orders"] = orders
    return out


def _rows(df: pd.DataFrame) -> int:
    return max(1, df["panel"].nunique()) if "panel" in df and len(df) else 1


def _empty(title: str, why: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=why, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _style(fig, title)


def _errors(df: pd.DataFrame, col: str) -> dict:
    """Asymmetric IQR error bars around the median, where the quartiles were computed."""
    q = col.replace("_s", "")
    if f"{q}_q25" not in df:
        return {}
    return dict(
        error_y=(df[f"{q}_q75"] - df[col]).clip(lower=0).to_numpy(),
        error_y_minus=(df[col] - df[f"{q}_q25"]).clip(lower=0).to_numpy(),
    )


def scaling_part(d: pd.DataFrame) -> pd.DataFrame:
    """The rows of (panel, tolerance) facets measured at two widths or more: a width axis means
    something only there. Single-width problems are drawn by `fig_single_width` instead."""
    if d.empty or "panel" not in d:
        return d
    n = d.groupby(["panel", "tolerance"])["width"].transform("nunique")
    return d[n >= 2]


def _facet_wrap(d: pd.DataFrame) -> tuple[pd.DataFrame, dict, int]:
    """One facet per (panel, tolerance) that holds data, wrapped at 3 columns (no empty facets):
    -> (d with a `facet` column, the px keywords, rows)."""
    d = d.assign(facet=[f"{p} · {t}" if p else t for p, t in zip(d["panel"], d["tolerance"], strict=True)])
    order = _orders(d)
    facets = list(d.sort_values(["panel", "rtol"], ascending=[True, False])["facet"].unique())
    order["category_orders"]["facet"] = facets
    cols = min(3, len(facets))
    kw = dict(facet_col="facet", facet_col_wrap=cols, facet_row_spacing=0.12 if len(facets) > cols else 0.03, **order)
    return d, kw, -(-len(facets) // cols)


def _vs_width(
    d: pd.DataFrame, col: str, title: str, ylabel: str, *, hover=None, iqr: bool = False, log_y=True, **px_kw
) -> go.Figure | None:
    """One log-log line per method setting of `col` against width, one facet per (panel, tolerance)
    that holds a scaling study: no empty facets, no single dots."""
    d = scaling_part(d)
    if d.empty:
        return None  # every problem ran at a single width: `fig_single_width` shows them
    if iqr:
        d = d.assign(**{f"_{k}": v for k, v in _errors(d, col).items()})
    d, facet_kw, rows = _facet_wrap(d)
    fig = px.line(
        d,
        x="width",
        y=col,
        color="label",
        markers=True,
        log_x=True,
        log_y=log_y,
        error_y="_error_y" if "_error_y" in d else None,
        error_y_minus="_error_y_minus" if "_error_y_minus" in d else None,
        hover_data=hover,
        labels={col: ylabel, "width": "width"},
        **facet_kw,
        **px_kw,
    )
    fig.update_yaxes(showticklabels=True)
    return _style(fig, title, rows=rows)


def fig_single_width(summary: pd.DataFrame) -> go.Figure | None:
    """Problems run at one width: each method's backward and forward + backward time relative to the
    fastest method at that point (linear; 1 = fastest; hover for seconds, error, NFE), grouped bars
    per problem x tolerance. None when every problem is a scaling study."""
    if summary.empty:
        return None
    d = summary.dropna(subset=["bwd_s"])
    d = d[~d.index.isin(scaling_part(d).index)]
    if d.empty:
        return None
    d = d.assign(point=[f"{p} w={w} rtol={r:g}" for p, w, r in zip(d["problem"], d["width"], d["rtol"], strict=True)])
    parts = []
    for col, what in (("bwd", "backward"), ("total", "forward + backward")):
        part = d[["point", "label", "grad_rel_err", "nfe_bwd"]].assign(
            what=what, seconds=d[f"{col}_s"], q25=d[f"{col}_q25"], q75=d[f"{col}_q75"]
        )
        fastest = part.groupby("point")["seconds"].transform("min")
        # Bars: median / the fastest median; whiskers: this method's quartiles on the same scale (the
        # paired speed-ups with their intervals are in the verdict table).
        parts.append(part.assign(relative=part["seconds"] / fastest, lo=(part["seconds"] - part["q25"]) / fastest,
                                 hi=(part["q75"] - part["seconds"]) / fastest))  # fmt: skip
    long = pd.concat(parts, ignore_index=True)
    fig = px.bar(long, x="point", y="relative", color="label", barmode="group", facet_row="what",
                 error_y="hi", error_y_minus="lo", hover_data=["seconds", "grad_rel_err", "nfe_bwd"],
                 labels={"point": "", "relative": "time / fastest (IQR whiskers)"}, **_orders(long))  # fmt: skip
    fig.add_hline(y=1, line_dash="dot", line_color="#888")
    return _style(fig, "Problems run at a single width: time relative to the fastest method there", rows=2)


def _time_vs_width(summary: pd.DataFrame, col: str, title: str, ylabel: str) -> go.Figure:
    d = summary.dropna(subset=[col])
    if d.empty:
        return _empty(title, "no finished case has this measurement")
    hover = ["nfe_fwd", "nfe_bwd", "fwd_s", "bwd_s", "bwd_page_faults", "grad_rel_err", "repeats"]
    return _vs_width(d, col, title, ylabel, hover=hover, iqr=True)


# ----------------------------------------------------------------------------- scaling


def fig_backward_time(summary: pd.DataFrame) -> go.Figure:
    return _time_vs_width(
        summary, "bwd_s", "Backward time vs width (median, IQR bars)", "backward time (s, median over repeats)"
    )


def fig_total_time(summary: pd.DataFrame) -> go.Figure:
    return _time_vs_width(
        summary, "total_s", "Forward + backward time vs width (median, IQR bars)", "forward + backward time (s)"
    )


def fig_peak_memory(summary: pd.DataFrame) -> go.Figure:
    d = summary.dropna(subset=["peak_mem_mib"])
    if d.empty:
        return _empty("Peak memory vs width", "no peak-memory measurements")
    ylabel = "peak memory of forward+backward (MiB, median)"
    return _vs_width(d, "peak_mem_mib", "Peak memory vs width", ylabel, hover=["nfe_fwd", "nfe_bwd"])


def fig_memory_vs_nfe(summary: pd.DataFrame) -> go.Figure:
    """Does memory stay flat when the solver takes more steps? One point per case."""
    d = summary.dropna(subset=["peak_mem_mib", "nfe_fwd"])
    title = "Peak memory vs forward NFE (flat = memory independent of the number of solver steps)"
    if d.empty:
        return _empty(title, "no cases with both peak memory and forward NFE")
    fig = px.scatter(
        d,
        x="nfe_fwd",
        y="peak_mem_mib",
        color="label",
        symbol="tolerance",
        log_x=True,
        log_y=True,
        hover_data=["width", "problem", "device", "nfe_bwd"],
        labels={"nfe_fwd": "forward NFE", "peak_mem_mib": "peak memory (MiB, median)"},
        facet_col="panel" if d["panel"].nunique() > 1 else None,
        **_orders(d),
    )
    return _style(fig, title)


# ----------------------------------------------------------------------------- speed-ups


def _log2_ticks(lo: float, hi: float) -> tuple[list[float], list[str]]:
    step = max(1, math.ceil((hi - lo) / 8))  # at most ~9 labels
    vals = [v for v in range(math.floor(lo), math.ceil(hi) + 1) if v % step == 0] or [0]
    text = [f"{2**v:g}×" if v >= 0 else f"1/{2**-v:g}×" for v in vals]
    return vals, text


def _short_tol(rtol: float, atol: float) -> str:
    return f"rtol={rtol:g}" if rtol == atol else f"rtol={rtol:g} atol={atol:g}"


def _speedup_heatmap(summary: pd.DataFrame, metric: str, what: str, samples: pd.DataFrame | None) -> go.Figure:
    """Columns: baselines; rows: panels (device/problem), each as tall as its rows; in each cell a
    heatmap of width (x) by GQ setting x tolerance (y). Colour: log2 of the speed-up, blue where GQ
    is faster. With `samples` (the raw rows) every cell carries its 95% interval, what it is over
    (processes, or the rounds of one) and each process's median on hover (`results.ratios.paired_speedups`;
    "~" marks an interval that includes 1)."""
    title = f"Speed-up of the GQ adjoint over each baseline: {what} time (> 1×: GQ faster)"
    name = "bwd" if metric == "speedup_bwd" else "total"
    if samples is not None:
        from ..results.ratios import paired_speedups  # _ratios imports this module

        sp = paired_speedups(samples)
        panels_of = summary[[*MATCH, "tolerance", "panel"]].drop_duplicates(MATCH)
        sp = sp.merge(panels_of, on=[c for c in MATCH if c in sp], how="inner")
    else:
        sp = speedups(summary)
        sp[f"{name}_lo"] = sp[f"{name}_hi"] = np.nan
        sp[f"{name}_includes_one"] = False
    sp["hover"] = [_interval_hover(r, name) for _, r in sp.iterrows()]
    sp[metric] = pd.to_numeric(sp[metric], errors="coerce").astype("float64")
    sp = sp[np.isfinite(sp[metric]) & (sp[metric] > 0)]
    if sp.empty:
        return _empty(title, "needs torch_gq (or jax_gq) and a baseline run on the same experiments")
    sp = sp.sort_values(["gq", "rtol", "atol"], ascending=[True, False, False])
    sp = sp.assign(y=[f"{g} · {_short_tol(r, a)}" for g, r, a in zip(sp["gq"], sp["rtol"], sp["atol"], strict=True)])
    # The panel with the most widths (the scaling study) on top, as in the other figures.
    panels = list(sp.groupby("panel")["width"].nunique().sort_values(ascending=False, kind="stable").index)
    cols = sorted(sp["baseline"].unique())
    n_ys = [sp.loc[sp["panel"] == p, "y"].nunique() for p in panels]
    height = 170 + 26 * sum(n_ys) + 55 * len(panels)
    fig = make_subplots(
        rows=len(panels),
        cols=len(cols),
        column_titles=[f"over {c}" for c in cols],
        row_titles=panels if len(panels) > 1 else None,
        row_heights=n_ys,  # a panel of one GQ setting is one row high, not half the figure
        horizontal_spacing=0.03,
        vertical_spacing=min(0.3, 50 / (height - 170)) if len(panels) > 1 else 0.0,  # ~50 px: the width labels
    )
    span = max(1.0, float(np.abs(np.log2(sp[metric].to_numpy())).max()))
    for i, panel in enumerate(panels, 1):
        ys = list(dict.fromkeys(sp.loc[sp["panel"] == panel, "y"]))
        labelled = False  # y labels on the row's first drawn cell only
        for j, c in enumerate(cols, 1):
            cell = sp[(sp["panel"] == panel) & (sp["baseline"] == c)]
            if cell.empty:  # this baseline did not run on this panel: no axes either
                fig.update_xaxes(visible=False, row=i, col=j)
                fig.update_yaxes(visible=False, row=i, col=j)
                continue
            widths = sorted(cell["width"].unique())

            def grid(col, cell=cell, ys=ys, widths=widths, dtype=float):
                g = cell.pivot_table(index="y", columns="width", values=col, aggfunc="first", dropna=False)
                return g.reindex(index=ys, columns=widths).to_numpy(dtype=dtype)

            v = grid(metric)
            one = grid(f"{name}_includes_one") > 0
            text = [
                ["" if np.isnan(x) else f"{x:.2f}×" + ("~" if u else "") for x, u in zip(rv, ru, strict=True)]
                for rv, ru in zip(v, one, strict=True)
            ]
            ci = grid("hover", dtype=object)
            fig.add_trace(
                go.Heatmap(
                    x=[str(w) for w in widths],
                    y=ys,
                    z=np.log2(v),
                    text=text,
                    texttemplate="%{text}",
                    customdata=np.dstack([v, np.array(ci, dtype=object)]),
                    hovertemplate=f"%{{y}} over {c}<br>width %{{x}}<br>{what} speed-up %{{customdata[0]:.3g}}×"
                    "<br>%{customdata[1]}<extra></extra>",
                    coloraxis="coloraxis",
                    xgap=1,
                    ygap=1,
                ),
                row=i,
                col=j,
            )
            fig.update_yaxes(showticklabels=not labelled, row=i, col=j)
            labelled = True
    vals, text = _log2_ticks(-span, span)
    fig.update_layout(
        coloraxis=dict(
            colorscale="RdBu", cmin=-span, cmax=span, colorbar=dict(title="speed-up", tickvals=vals, ticktext=text)
        )
    )
    fig.update_xaxes(type="category")
    fig.update_xaxes(title_text="width", row=len(panels))
    fig.update_yaxes(autorange="reversed", type="category")
    fig = _style(fig, title)
    fig.update_layout(height=max(300, height))
    return fig


def _interval_hover(r, name: str) -> str:
    """A speed-up cell's hover: its 95% interval, what it is over, each process's median."""
    lo, hi = r.get(f"{name}_lo", np.nan), r.get(f"{name}_hi", np.nan)
    if lo != lo:
        return "no interval (< 3 rounds)"
    text = f"95% interval {lo:.3g}–{hi:.3g}× over {r['covers']}"
    per = r.get(f"{name}_per_process")
    if isinstance(per, tuple) and len(per) > 1:
        text += "<br>per process: " + ", ".join(f"{x:.3g}×" for x in per)
    return text


def fig_speedup_heatmap(summary: pd.DataFrame, samples: pd.DataFrame | None = None) -> go.Figure:
    return _speedup_heatmap(summary, "speedup_bwd", "backward", samples)


def fig_speedup_heatmap_total(summary: pd.DataFrame, samples: pd.DataFrame | None = None) -> go.Figure:
    return _speedup_heatmap(summary, "speedup_total", "forward + backward", samples)


def fig_speedup(summary: pd.DataFrame) -> go.Figure:
    title = "GQ's backward speed-up over each baseline vs width (> 1: GQ faster)"
    sp = speedups(summary).dropna(subset=["speedup_bwd"])
    if sp.empty:
        return _empty(title, "needs torch_gq (or jax_gq) and a baseline run on the same experiments")
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
        **_facets(sp),
    )
    fig.add_hline(y=1.0, line_dash="dot", line_color="gray")
    return _style(fig, title, rows=_rows(sp))


# ----------------------------------------------------------------------------- accuracy and work


def fig_work_precision(summary: pd.DataFrame) -> go.Figure:
    """The ODE-solver field's standard plot: gradient error against time, one line per method
    setting through its tolerances (lower-left is better)."""
    title = "Work-precision: gradient error vs forward + backward time (lower left is better)"
    d = summary.dropna(subset=["grad_rel_err", "total_s"])
    d = d[d["grad_rel_err"] > 0]
    if d.empty:
        return _empty(title, "no gradient errors recorded (reference missing?)")
    d = d.sort_values(["label", "width", "rtol"], ascending=[True, True, False])
    d = d.assign(series=[f"{lab} w={w}" for lab, w in zip(d["label"], d["width"], strict=True)])
    fig = px.line(
        d,
        x="total_s",
        y="grad_rel_err",
        color="label",
        line_group="series",
        symbol="tolerance",
        markers=True,
        log_x=True,
        log_y=True,
        hover_data=["width", "tolerance", "nfe_fwd", "nfe_bwd", "bwd_s"],
        labels={"total_s": "forward + backward time (s, median)", "grad_rel_err": "gradient relative L2 error"},
        facet_col="panel" if d["panel"].nunique() > 1 else None,
        **_orders(d),
    )
    return _style(fig, title)


def fig_nfe(summary: pd.DataFrame) -> go.Figure | None:
    title = (
        "Function evaluations per method: forward and backward (direct backprop's backward: 0, it replays the graph)"
    )
    d = summary.dropna(subset=["nfe_fwd", "nfe_bwd"], how="all")
    if d.empty:
        return _empty(title, "no NFE recorded")
    long = d.melt(
        id_vars=["label", "width", "tolerance", "rtol", "atol", "panel"],
        value_vars=["nfe_fwd", "nfe_bwd"],
        var_name="pass",
        value_name="nfe",
    )
    long["pass"] = long["pass"].map({"nfe_fwd": "forward", "nfe_bwd": "backward"})
    # Single-width problems: their NFE is in the single-width figure's hover.
    return _vs_width(long, "nfe", title, "function evaluations (median)", log_y=False, line_dash="pass")


def fig_grad_error(summary: pd.DataFrame) -> go.Figure:
    d = summary.dropna(subset=["grad_rel_err"])
    d = d[d["grad_rel_err"] > 0]
    if d.empty:
        return _empty("Gradient error vs width", "no gradient errors recorded")
    ylabel = "gradient relative L2 error vs float64 reference"
    return _vs_width(d, "grad_rel_err", "Gradient error vs width", ylabel)


# ----------------------------------------------------------------------------- conditional figures


def fig_quadrature_order(summary: pd.DataFrame) -> go.Figure | None:
    """GQ's knob: gradient error and backward time against the fixed node count n (top) and
    against gtol (bottom). None unless some GQ experiment ran with two or more settings."""
    gq = summary[summary["method"].isin(QUAD_METHODS)].copy()
    if gq.empty:
        return None
    exp = ["method", "backward_state", *MATCH]
    gq[exp] = gq[exp].astype(object).where(gq[exp].notna(), "-")
    settings = gq.groupby(exp, dropna=False).size()
    if settings.max() < 2:
        return None
    fixed = gq[gq["quad_order"].notna()]
    rule = gq[gq["quad_order"].isna() & gq["gtol"].notna()]
    fig = make_subplots(
        rows=2,
        cols=2,
        subplot_titles=[
            "gradient error vs n (fixed nodes per interval)",
            "backward time vs n",
            "gradient error vs gtol (the paper's rule)",
            "backward time vs gtol",
        ],
        horizontal_spacing=0.1,
        vertical_spacing=0.16,
    )
    colors = px.colors.qualitative.Plotly

    def name(r):
        b = r["backward_state"]
        p = f" {r['panel']}" if r["panel"] else ""
        return f"{r['method']}{'' if b in (None, '-', 'auto') else ' ' + str(b)} w={r['width']} {r['tolerance']}{p}"

    shown: set[str] = set()
    series = sorted({name(r) for _, r in gq.iterrows()})
    color_of = {s: colors[i % len(colors)] for i, s in enumerate(series)}
    for row, (data, xcol) in enumerate(((fixed, "quad_order"), (rule, "gtol")), 1):
        if data.empty:
            continue
        data = data.assign(series=[name(r) for _, r in data.iterrows()])
        for s, g in data.groupby("series", sort=True):
            g = g.sort_values(xcol)
            for col, ycol in enumerate(("grad_rel_err", "bwd_s"), 1):
                fig.add_trace(
                    go.Scatter(
                        x=g[xcol].astype(float),
                        y=g[ycol],
                        mode="lines+markers",
                        name=s,
                        legendgroup=s,
                        showlegend=col == 1 and s not in shown,
                        line=dict(color=color_of.get(s)),
                        customdata=g[["quad_nodes", "nfe_bwd"]].to_numpy(),
                        hovertemplate=f"{s}<br>{xcol} %{{x}}<br>{ycol} %{{y:.3g}}"
                        "<br>nodes %{customdata[0]}<br>backward NFE %{customdata[1]}<extra></extra>",
                    ),
                    row=row,
                    col=col,
                )
            shown.add(s)
    fig.update_yaxes(type="log")
    fig.update_xaxes(type="log", row=2)
    fig.update_xaxes(title_text="quadrature nodes per interval n", row=1)
    fig.update_xaxes(title_text="gtol", row=2)
    fig.update_yaxes(title_text="gradient rel. error", col=1)
    fig.update_yaxes(title_text="backward time (s)", col=2)
    fig = _style(fig, "Quadrature order: accuracy and cost of the GQ adjoint's node count", rows=2)
    return fig


def fig_quadrature_error(summary: pd.DataFrame) -> go.Figure | None:
    """GQ's own estimate of its quadrature error against the measured gradient error, one point per
    case. Points on the diagonal: the integral limits accuracy; far below it: the solver does."""
    d = summary.dropna(subset=["quad_err_est", "grad_rel_err"]) if "quad_err_est" in summary else summary.iloc[:0]
    d = d[(d["quad_err_est"] > 0) & (d["grad_rel_err"] > 0)]
    if d.empty:
        return None
    fig = go.Figure()
    for (label, problem), g in d.groupby(["label", "problem"], sort=True):
        fig.add_trace(
            go.Scatter(
                x=g["grad_rel_err"],
                y=g["quad_err_est"],
                mode="markers",
                name=f"{label} · {problem}",
                customdata=g[["width", "rtol", "quad_nodes"]].to_numpy(),
                hovertemplate=f"{label} · {problem}<br>w=%{{customdata[0]}} rtol=%{{customdata[1]:g}}"
                "<br>measured %{x:.2g}<br>estimated %{y:.2g}<br>nodes %{customdata[2]}<extra></extra>",
            )
        )
    lo = float(min(d["grad_rel_err"].min(), d["quad_err_est"].min())) / 2
    hi = float(max(d["grad_rel_err"].max(), d["quad_err_est"].max())) * 2
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(color="#999", dash="dot"),
                             name="estimate = measured", hoverinfo="skip"))  # fmt: skip
    fig.update_xaxes(type="log", title_text="measured gradient rel. error (vs float64 reference)")
    fig.update_yaxes(type="log", title_text="quadrature's own error estimate (relative)")
    return _style(fig, "Quadrature error: GQ's estimate vs the measured gradient error")


def fig_device_comparison(summary: pd.DataFrame) -> go.Figure | None:
    """CPU and CUDA side by side (shared y axis), when both are in the results."""
    if summary.empty or summary["device_kind"].nunique() < 2:
        return None
    d = summary.dropna(subset=["bwd_s"]).copy()
    d["row"] = [
        f"{t}{' · ' + p if p and 'device' not in p else ''}" for t, p in zip(d["tolerance"], d["problem"], strict=True)
    ]
    fig = px.line(
        d,
        x="width",
        y="bwd_s",
        color="label",
        markers=True,
        log_x=True,
        log_y=True,
        facet_col="device_kind",
        facet_row="row" if d["row"].nunique() > 1 else None,
        hover_data=["total_s", "nfe_fwd", "nfe_bwd", "peak_mem_mib"],
        labels={"bwd_s": "backward time (s, median)", "device_kind": "device"},
        category_orders={"device_kind": sorted(d["device_kind"].unique())},
        color_discrete_map=_orders(d)["color_discrete_map"],
    )
    return _style(fig, "CPU vs CUDA: backward time side by side", rows=d["row"].nunique())


def fig_compile_time(summary: pd.DataFrame) -> go.Figure | None:
    """JAX methods' tracing + compilation time (its own column, never inside the timed calls)."""
    d = summary.dropna(subset=["compile_s"])
    if d.empty:
        return None
    title = "JAX compile time (not included in the timed calls)"
    return _vs_width(d, "compile_s", title, "compile time (s, once per case)")


def fig_baseline_comparison(comparison: pd.DataFrame, threshold: float = 0.1) -> go.Figure | None:
    """current / baseline total time per case; points beyond the threshold band are coloured."""
    if comparison is None or comparison.empty:
        return None
    colors = {"regression": "#d62728", "improvement": "#2ca02c", "same": "#7f7f7f", "-": "#c7c7c7"}
    comparison = comparison.assign(
        interval_plus=comparison["total_hi"] - comparison["ratio_total_s"],
        interval_minus=comparison["ratio_total_s"] - comparison["total_lo"],
    )
    comparison, facet_kw, rows = _facet_wrap(comparison)
    facet_kw["color_discrete_map"] = colors
    facet_kw["category_orders"]["verdict"] = ["regression", "improvement", "same", "-"]
    fig = px.scatter(
        comparison,
        error_y="interval_plus",
        error_y_minus="interval_minus",
        x="width",
        y="ratio_total_s",
        color="verdict",
        symbol="label",
        log_x=True,
        log_y=True,
        hover_data=[
            "label",
            "problem",
            "tolerance",
            "total_s",
            "total_s_baseline",
            "ratio_bwd_s",
            "rel_total",
            "ratio_peak_mem_bytes",
        ],
        labels={"ratio_total_s": "total time: this run / baseline"},
        **facet_kw,
    )
    fig.update_yaxes(showticklabels=True)
    for y, dash in ((1.0, "solid"), (1 + threshold, "dot"), (1 / (1 + threshold), "dot")):
        fig.add_hline(y=y, line_dash=dash, line_color="gray", line_width=1)
    return _style(
        fig,
        f"Against the baseline run: total time ratio per case with its 95% interval (band: ±{threshold:.0%})",
        rows=rows,
    )


PHASE_COLORS = {
    "forward": "#9ecae1",
    "gq::forward_solve": "#6baed6",
    "forward (other)": "#c6dbef",
    "backward": "#fd8d3c",
    "gq::backward_solve": "#e6550d",
    "gq::quadrature_vjp": "#31a354",
    "gq::accumulate": "#756bb1",
    "backward (other)": "#fdae6b",
}


def fig_phases(phases: pd.DataFrame) -> go.Figure | None:
    """Where the time goes: stacked per-step milliseconds of each profiled phase per case, from
    torch.profiler's own aggregation (`key_averages`) of the record_function ranges.

    `phases`: one row per (case, leaf phase) with columns case, phase, ms (per step)."""
    if phases is None or phases.empty:
        return None
    order = [p for p in PHASE_COLORS if p in set(phases["phase"])]
    order += sorted(set(phases["phase"]) - set(order))
    fig = px.bar(
        phases,
        y="case",
        x="ms",
        color="phase",
        orientation="h",
        color_discrete_map=PHASE_COLORS,
        category_orders={"phase": order},
        hover_data=[c for c in ("share", "calls", "source") if c in phases],
        labels={"ms": "milliseconds per step (forward + backward)", "case": ""},
        text=[f"{v:.0f}" if v >= 1 else "" for v in phases["ms"]],
    )
    fig.update_layout(barmode="stack")
    fig.update_yaxes(autorange="reversed")
    fig = _style(fig, "Where the time goes: profiled phases per step")
    fig.update_layout(
        height=max(360, 220 + 60 * phases["case"].nunique()),
        legend=dict(orientation="h", yanchor="top", y=-0.25, x=0),
    )
    return fig


# The figures every report shows (each one div, data or not); the conditional ones follow.
FIGURES = (
    fig_backward_time,
    fig_total_time,
    fig_speedup_heatmap,
    fig_speedup_heatmap_total,
    fig_peak_memory,
    fig_memory_vs_nfe,
    fig_work_precision,
    fig_nfe,
    fig_grad_error,
)
# Figures that also take the raw rows (`samples=`): their ratios carry intervals over paired rounds.
SAMPLE_FIGURES = (fig_speedup_heatmap, fig_speedup_heatmap_total)
OPTIONAL_FIGURES = (
    fig_single_width,
    fig_quadrature_order,
    fig_quadrature_error,
    fig_device_comparison,
    fig_compile_time,
)
