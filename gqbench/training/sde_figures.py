"""The report's "SDE training" section: pure functions, the OU experiment's tables in, plotly figures out.

`epochs`: one row per (case, epoch) with the case fields (method, width, ncosines, seed, ...) and epoch,
epoch_s, wall_s, nfe_fwd, nfe_bwd, loss, val_loglik. `bands`: one row per (case, kind, x0, t) with mean, std.
Epoch 0 is the untrained model (validation only, no time). A figure function returns None when its data
are absent.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..results.ratios import ratio_ci

TEMPLATE = "plotly_white"
GQ, BASELINES = "torch_gq", ("sde_direct", "sde_adjoint")
DEFAULT_NCOSINES = 10
COLOURS = {"torch_gq": "#1f77b4", "sde_direct": "#d62728", "sde_adjoint": "#2ca02c"}


def main_runs(epochs: pd.DataFrame) -> pd.DataFrame:
    """The method comparison: GQ at the paper's ncosines (or the only one run), every torchsde run."""
    gq = epochs["method"] == GQ
    nc = epochs.loc[gq, "ncosines"].dropna().unique()
    keep = DEFAULT_NCOSINES if DEFAULT_NCOSINES in nc or not len(nc) else sorted(nc)[0]
    return epochs[~gq | (epochs["ncosines"] == keep)]


def epoch_times(epochs: pd.DataFrame) -> pd.DataFrame:
    """Trained epochs only; the first is dropped when a run has three or more (it holds the warm-up)."""
    d = epochs[epochs["epoch"] >= 1]
    n = d.groupby(["method", "width", "seed"])["epoch"].transform("max")
    return d[(d["epoch"] > 1) | (n < 3)]


def per_epoch_summary(epochs: pd.DataFrame) -> pd.DataFrame:
    """Median time per epoch (and its quartiles, NFE) per method and width, over seeds and epochs."""
    d = epoch_times(main_runs(epochs))
    g = d.groupby(["method", "width"])
    out = g["epoch_s"].median().rename("epoch_s").to_frame()
    out["q25"], out["q75"] = g["epoch_s"].quantile(0.25), g["epoch_s"].quantile(0.75)
    out["nfe_fwd"], out["nfe_bwd"] = g["nfe_fwd"].median(), g["nfe_bwd"].median()
    out["seeds"] = g["seed"].nunique()
    return out.reset_index()


def ratios(epochs: pd.DataFrame) -> pd.DataFrame:
    """GQ's median epoch time over each baseline's, per width, with `ratio_ci`'s 95% interval: over seeds
    (median epoch ratio per seed) with two or more, else over the epochs of one run; `over` says which."""
    d = epoch_times(main_runs(epochs))
    rows = []
    for width, w in d.groupby("width"):
        gq = w[w["method"] == GQ]
        for base in BASELINES:
            b = w[w["method"] == base]
            if len(gq) == 0 or len(b) == 0:
                continue
            r = ratio_ci(gq["epoch_s"].to_numpy(), b["epoch_s"].to_numpy(), paired=False, matched=True, min_samples=2,
                         clusters=gq["seed"].to_numpy(), clusters_den=b["seed"].to_numpy())  # fmt: skip
            over = f"{r.clusters} seeds" if r.clusters > 1 else f"{len(gq)} epochs of one seed"
            rows.append(dict(width=width, baseline=base, ratio=r.point, low=r.lo, high=r.hi, over=over))
    return pd.DataFrame(rows, columns=["width", "baseline", "ratio", "low", "high", "over"])


def final_metrics(epochs: pd.DataFrame) -> pd.DataFrame:
    """Last epoch's validation log-likelihood per run, then mean, std, min, max over seeds."""
    d = main_runs(epochs)
    last = d[d["epoch"] == d.groupby(["method", "width", "seed"])["epoch"].transform("max")]
    g = last.groupby(["method", "width"])["val_loglik"]
    return g.agg(["mean", "std", "min", "max", "count"]).rename(columns={"count": "seeds"}).reset_index()


def _style(fig: go.Figure, title: str, height: int = 420) -> go.Figure:
    fig.update_layout(title=title, template=TEMPLATE, height=height, legend_title_text="", margin=dict(t=90))
    return fig


def fig_epoch_time(epochs: pd.DataFrame) -> go.Figure | None:
    s = per_epoch_summary(epochs)
    if s.empty:
        return None
    s = s.assign(err_plus=s["q75"] - s["epoch_s"], err_minus=s["epoch_s"] - s["q25"])
    fig = px.line(s, x="width", y="epoch_s", color="method", markers=True, log_x=True, log_y=True,
                  error_y="err_plus", error_y_minus="err_minus", color_discrete_map=COLOURS,
                  hover_data=["nfe_fwd", "nfe_bwd", "seeds"],
                  labels={"epoch_s": "time per epoch (s, median, IQR)"})  # fmt: skip
    return _style(fig, "SDE training: time per epoch vs width")


def _curves(epochs: pd.DataFrame, x: str, title: str, xlabel: str) -> go.Figure | None:
    d = main_runs(epochs).dropna(subset=["val_loglik"])
    if d.empty:
        return None
    widths = sorted(d["width"].unique())
    fig = make_subplots(rows=1, cols=len(widths), subplot_titles=[f"width {w}" for w in widths], shared_yaxes=True)
    for col, w in enumerate(widths, start=1):
        for method, m in d[d["width"] == w].groupby("method"):
            g = m.groupby("epoch").agg(x=(x, "mean"), y=("val_loglik", "mean"), lo=("val_loglik", "min"),
                                       hi=("val_loglik", "max"), n=("seed", "nunique"))  # fmt: skip
            colour = COLOURS.get(method, "#7f7f7f")
            fig.add_trace(go.Scatter(x=np.r_[g["x"], g["x"][::-1]], y=np.r_[g["hi"], g["lo"][::-1]], fill="toself",
                                     fillcolor=colour, opacity=0.15, line=dict(width=0), hoverinfo="skip",
                                     showlegend=False, legendgroup=method), row=1, col=col)  # fmt: skip
            fig.add_trace(go.Scatter(x=g["x"], y=g["y"], mode="lines+markers", name=method, legendgroup=method,
                                     line=dict(color=colour), showlegend=col == 1,
                                     customdata=g["n"], hovertemplate="%{y:.3f} (mean of %{customdata} seeds)"),
                          row=1, col=col)  # fmt: skip
        fig.update_xaxes(title_text=xlabel, row=1, col=col)
    fig.update_yaxes(title_text="validation log-likelihood (mean; band: min-max over seeds)", row=1, col=1)
    return _style(fig, title)


def fig_loglik_vs_epoch(epochs: pd.DataFrame) -> go.Figure | None:
    return _curves(epochs, "epoch", "SDE training: validation log-likelihood vs epoch", "epoch")


def fig_loglik_vs_time(epochs: pd.DataFrame) -> go.Figure | None:
    return _curves(epochs, "wall_s", "SDE training: validation log-likelihood vs wall-clock training time",
                   "training time (s, mean over seeds)")  # fmt: skip


def fig_bands(bands: pd.DataFrame) -> go.Figure | None:
    """Model mean +- 2 std (shaded) against the data's (dashed), widest model of the first seed per method."""
    if bands is None or bands.empty:
        return None
    d = bands[bands["ncosines"].isna() | (bands["ncosines"] == DEFAULT_NCOSINES) | (bands["method"] != GQ)]
    d = d[d["width"] == d.groupby("method")["width"].transform("max")]
    d = d[d["seed"] == d.groupby("method")["seed"].transform("min")]
    methods = [m for m in (GQ, *BASELINES) if m in set(d["method"])]
    if not methods:
        return None
    fig = make_subplots(rows=1, cols=len(methods), shared_yaxes=True,
                        subplot_titles=[f"{m} (width {int(d.loc[d['method'] == m, 'width'].iloc[0])})"
                                        for m in methods])  # fmt: skip
    palette = px.colors.qualitative.Set2
    for col, method in enumerate(methods, start=1):
        m = d[d["method"] == method]
        for i, (x0, c) in enumerate(m.groupby("x0")):
            colour = palette[i % len(palette)]
            model, data = c[c["kind"] == "model"].sort_values("t"), c[c["kind"] == "data"].sort_values("t")
            t = model["t"].to_numpy()
            lo, hi = model["mean"] - 2 * model["std"], model["mean"] + 2 * model["std"]
            fig.add_trace(go.Scatter(x=np.r_[t, t[::-1]], y=np.r_[hi, lo[::-1]], fill="toself", fillcolor=colour,
                                     opacity=0.3, line=dict(width=0), name=f"model x0={x0:.2f}",
                                     legendgroup=f"x{i}", showlegend=col == 1), row=1, col=col)  # fmt: skip
            fig.add_trace(go.Scatter(x=t, y=model["mean"], line=dict(color=colour), showlegend=False,
                                     legendgroup=f"x{i}", name="model mean"), row=1, col=col)  # fmt: skip
            for y, name in ((data["mean"], "data mean"), (data["mean"] + 2 * data["std"], "data +2 std"),
                            (data["mean"] - 2 * data["std"], "data -2 std")):  # fmt: skip
                fig.add_trace(go.Scatter(x=data["t"], y=y, line=dict(color=colour, dash="dash", width=1),
                                         showlegend=False, legendgroup=f"x{i}", name=name), row=1, col=col)  # fmt: skip
        fig.update_xaxes(title_text="t", row=1, col=col)
    fig.update_yaxes(title_text="x: model mean ± 2 std (shaded) vs data (dashed)", row=1, col=1)
    return _style(fig, "SDE training: fitted marginals (sampled with torchsde) against the data", height=460)


def fig_ablation(epochs: pd.DataFrame) -> go.Figure | None:
    """GQ runs over ncosines at one width: final validation log-likelihood and time per epoch."""
    gq = epochs[epochs["method"] == GQ].dropna(subset=["ncosines"])
    if gq.empty:
        return None
    width = gq.groupby("width")["ncosines"].nunique().idxmax()
    gq = gq[gq["width"] == width]
    if gq["ncosines"].nunique() < 2:
        return None
    last = gq[gq["epoch"] == gq.groupby(["ncosines", "seed"])["epoch"].transform("max")]
    ll = last.groupby("ncosines")["val_loglik"].agg(["mean", "min", "max"]).reset_index()
    t = epoch_times(gq).groupby("ncosines")["epoch_s"].median().reset_index()
    fig = make_subplots(rows=1, cols=2, subplot_titles=["final validation log-likelihood", "time per epoch (s)"])
    fig.add_trace(go.Scatter(x=ll["ncosines"], y=ll["mean"], mode="lines+markers", name="log-likelihood",
                             error_y=dict(array=ll["max"] - ll["mean"], arrayminus=ll["mean"] - ll["min"]),
                             line=dict(color=COLOURS[GQ])), row=1, col=1)  # fmt: skip
    fig.add_trace(go.Scatter(x=t["ncosines"], y=t["epoch_s"], mode="lines+markers", name="time per epoch",
                             line=dict(color=COLOURS[GQ], dash="dot")), row=1, col=2)  # fmt: skip
    for col in (1, 2):
        fig.update_xaxes(title_text="ncosines", type="log", row=1, col=col)
    return _style(fig, f"SDE training: ncosines ablation (torch_gq, width {width}; bars: min-max over seeds)")


def claims(epochs: pd.DataFrame) -> list[dict]:
    """The paper's SDE claim, split into its speed and its fit, each with our number and verdict."""
    speed = "SDE (OU): training the Wong–Zakai ODE with GQ is faster per epoch than torchsde direct and adjoint"
    fit = "SDE (OU): the GQ-trained SDE fits as well (validation log-likelihood) as the torchsde-trained ones"
    r = ratios(epochs)
    have = {GQ, *BASELINES} <= set(epochs["method"])
    if r.empty or not have:
        why = "needs torch_gq, sde_direct and sde_adjoint runs of the OU problem"
        return [dict(claim=c, measured=why, verdict="not measurable here") for c in (speed, fit)]
    w = r["width"].max()
    rw = r[r["width"] == w]
    txt = "; ".join(f"GQ/{b} = {x:.2f} [{lo:.2f}, {hi:.2f}]" for b, x, lo, hi in
                    rw[["baseline", "ratio", "low", "high"]].itertuples(index=False))  # fmt: skip
    upper = rw["high"].fillna(rw["ratio"])
    faster = bool((upper < 1).all() and len(rw) == len(BASELINES))
    slower = bool((rw["low"].fillna(rw["ratio"]) > 1).any())
    verdict = "confirmed" if faster else ("not confirmed" if slower else "inconclusive")
    over = ", ".join(sorted(set(rw["over"])))
    out = [dict(claim=speed, measured=f"width {w}, time per epoch: {txt} (95% interval over {over})",
                verdict=verdict)]  # fmt: skip
    f = final_metrics(epochs)
    fw = f["width"].max()
    f = f[f["width"] == fw].set_index("method")
    if GQ not in f.index or f["seeds"].min() < 2:
        out.append(dict(claim=fit, measured="needs at least 2 seeds per method", verdict="not measurable here"))
        return out
    txt = "; ".join(f"{m}: {f.loc[m, 'mean']:.3f} ± {f.loc[m, 'std']:.3f}" for m in f.index)
    best = f.drop(index=GQ)["mean"].max()
    spread = max(f["std"].max(), 1e-12)
    gap = best - f.loc[GQ, "mean"]
    verdict = "confirmed" if gap <= 2 * spread else "not confirmed"
    out.append(dict(claim=fit, measured=f"width {fw}, final log-likelihood "
                    f"(mean ± std over {int(f['seeds'].min())} seeds): {txt}; best baseline − GQ = {gap:.3f}",
                    verdict=verdict))  # fmt: skip
    return out


# ----------------------------------------------------------------------------- the section

NOTES = {
    "fig_sde_epoch_time": "Median over seeds and trained epochs (the first epoch, which holds the warm-up, is "
    "left out when a run has three or more), error bars from the 25th to the 75th percentile. One epoch: "
    "forward, backward and optimiser step over every training batch; validation is not timed.",
    "fig_sde_loglik_epoch": "Log-likelihood of the validation paths under Gaussian fits of the model's marginals; "
    "every method's model is sampled the same way (torchsde, reversible Heun, dt 0.01, the same Brownian "
    "paths). Epoch 0: the untrained model, identical for every method of a seed.",
    "sde_training": "Read the fit verdict with the number of optimiser steps in mind: Adam's first steps move "
    "every weight by about lr whatever the gradient's size, so after a few steps all methods' models are close "
    "(sde_direct and sde_adjoint compute the same gradient and differ only by round-off).",
    "fig_sde_loglik_time": "The same curves against cumulative training time: what reaching a given fit costs.",
    "fig_sde_bands": "The trained drift and diffusion sampled as a Stratonovich SDE in torchsde (200 paths) "
    "for three validation initial values; dashed: the data's mean ± 2 std over its 45 paths.",
    "fig_sde_ablation": "GQ's Wong–Zakai noise with more cosine terms: closer to Brownian motion, "
    "at the cost of more solver steps.",
}
TITLES = {
    "fig_sde_epoch_time": "SDE training: time per epoch vs width",
    "fig_sde_loglik_epoch": "SDE training: validation log-likelihood vs epoch",
    "fig_sde_loglik_time": "SDE training: validation log-likelihood vs wall-clock time",
    "fig_sde_bands": "SDE training: fitted marginals against the data",
    "fig_sde_ablation": "SDE training: ncosines ablation",
}


def section_figures(epochs: pd.DataFrame, bands: pd.DataFrame | None) -> list[tuple[str, go.Figure]]:
    """(name, figure) for every figure the data support, in page order."""
    epochs = epochs[epochs["problem"].astype(str).str.startswith("sde_ou")]
    if epochs.empty:
        return []
    made = [
        ("fig_sde_epoch_time", fig_epoch_time(epochs)),
        ("fig_sde_loglik_epoch", fig_loglik_vs_epoch(epochs)),
        ("fig_sde_loglik_time", fig_loglik_vs_time(epochs)),
        ("fig_sde_bands", fig_bands(bands) if bands is not None else None),
        ("fig_sde_ablation", fig_ablation(epochs)),
    ]
    return [(n, f) for n, f in made if f is not None]


def tables_html(epochs: pd.DataFrame) -> str:
    """The claims (with verdicts from the data), the time ratios per width and the final log-likelihoods."""
    import html

    epochs = epochs[epochs["problem"].astype(str).str.startswith("sde_ou")]
    if epochs.empty:
        return ""

    def table(df: pd.DataFrame) -> str:
        return df.to_html(index=False, border=0, float_format=lambda x: f"{x:.3g}", escape=True)

    claim_rows = pd.DataFrame(claims(epochs))
    out = ["<h3>The paper's SDE claim, re-run</h3>", table(claim_rows)]
    r = ratios(epochs)
    if not r.empty:
        out += ["<h3>Time per epoch: GQ / baseline (95% interval over seeds, or over the epochs of one seed)</h3>",
                table(r)]  # fmt: skip
    f = final_metrics(epochs)
    if not f.empty:
        out += ["<h3>Final validation log-likelihood per method (over seeds)</h3>", table(f)]
    problems = ", ".join(sorted(epochs["problem"].astype(str).unique()))
    note = (f"Problem(s): {html.escape(problems)}. Data: the OU SDE dX = (0.2t − 0.1X)dt + (0.6 + 0.15t)∘dW, "
            "generated from a seed with torchsde at a fine step (no data files).")  # fmt: skip
    out.insert(0, f"<p class=note>{note}</p>")
    return "\n".join(out)
