"""The report's "Training" section (the paper's neural-ODE experiments): pure functions, tables in, plotly out.

`epochs`: `epochs.parquet` rows of ODE experiments (case fields, epoch, fwd_s, bwd_s, step_s, epoch_s, wall_s,
nfe_fwd, nfe_bwd, quad_nodes, loss, val_metric, metric, peak_mem_bytes); epoch 0 is the untrained model
(validation only).
`toy`: `toy_gradient.parquet` (case fields, T, err_a, err_z0, err_T, grad_rel_err). A figure function returns
None when its data are absent.
"""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from ..results.ratios import ratio_ci

TEMPLATE = "plotly_white"
GQ = "torch_gq"
BASELINES = ("torch_adjoint", "torch_direct", "torch_seminorm", "torch_mali", "torch_aca", "torch_paper_gq")
RUN = ["problem", "label", "width", "seed"]

TITLES = {
    "training": "Training (the paper's experiments)",
    "fig_train_epoch_time": "Training: time per epoch vs width",
    "fig_train_nfe": "Training: NFE per epoch over training",
    "fig_train_cost": "Training: time and quadrature nodes per epoch over training",
    "fig_train_curves": "Training: loss and metric vs epoch and wall-clock",
    "fig_train_final": "Training: final metric per method",
    "fig_toy_gradient": "Toy gradient: error vs T",
}
NOTES = {
    "fig_train_epoch_time": "Median time per trained epoch (forward + backward + optimiser step; the first epoch, "
    "which holds the warm-up, is left out when a run has three or more), over epochs and seeds; bars: 25th-75th "
    "percentile.",
    "fig_train_nfe": "Forward (solid) and backward (dotted) function evaluations summed over each epoch, at each "
    "experiment's largest width, mean over seeds. A growing count means the learnt dynamics get stiffer.",
    "fig_train_cost": "Time per epoch (forward + backward + optimiser step) and GQ's quadrature nodes summed over "
    "each epoch, against the epoch, at each experiment's largest width, median over seeds: the drift of each "
    "method's cost as the model trains (GQ's nodes and backward NFE grow as the field stiffens). The first "
    "epoch holds the warm-up.",
    "fig_train_curves": "Median over seeds at each experiment's largest width. Wall-clock is the summed training "
    "time (validation excluded): the time to reach a target metric is read off the right-hand columns.",
    "fig_train_final": "Validation metric after the last epoch, one point per seed, at each experiment's largest "
    "width. Methods that compute the same gradient should land within the seed-to-seed spread.",
    "fig_toy_gradient": "dz/dt = a z, z0 = 10, a = 0.2, loss z(T)^2: relative L2 error of the gradient with respect "
    "to (a, z0, T) against the closed form (MALI and ACA: (a, z0) only; they give no T-gradient).",
}


def trained(epochs: pd.DataFrame) -> pd.DataFrame:
    """Trained epochs; a run's first is dropped when it has three or more (it holds the warm-up)."""
    d = epochs[epochs["epoch"] >= 1]
    n = d.groupby(RUN)["epoch"].transform("max")
    return d[(d["epoch"] > 1) | (n < 3)]


def largest_width(d: pd.DataFrame) -> pd.DataFrame:
    """Each experiment's rows at its largest width."""
    return d[d["width"] == d.groupby("problem")["width"].transform("max")]


def per_epoch_summary(epochs: pd.DataFrame) -> pd.DataFrame:
    """Median time per epoch (quartiles, phases, NFE) per experiment, method setting and width."""
    g = trained(epochs).groupby(["problem", "label", "method", "width"])
    out = g["epoch_s"].median().rename("epoch_s").to_frame()
    out["q25"], out["q75"] = g["epoch_s"].quantile(0.25), g["epoch_s"].quantile(0.75)
    for c in ("fwd_s", "bwd_s", "step_s", "nfe_fwd", "nfe_bwd", "quad_nodes", "peak_mem_bytes"):
        out[c] = g[c].median() if c in trained(epochs) else float("nan")
    out["seeds"] = g["seed"].nunique()
    return out.reset_index()


def epoch_ratios(epochs: pd.DataFrame) -> pd.DataFrame:
    """GQ's per-epoch time over each baseline's, per experiment and width, with `ratio_ci`'s 95% interval:
    over seeds (each seed's run is its own process; median epoch ratio per seed) with two or more,
    else over the trained epochs of one run; `over` says which."""
    d = trained(epochs)
    rows = []
    for (problem, width), w in d.groupby(["problem", "width"]):
        gq = w[w["method"] == GQ]
        for gq_label, g in gq.groupby("label"):
            for base in BASELINES:
                b = w.loc[w["method"] == base, "epoch_s"].to_numpy()
                if len(b) == 0:
                    continue
                seeds = w.loc[w["method"] == base, "seed"].to_numpy()
                r = ratio_ci(g["epoch_s"].to_numpy(), b, paired=False, clusters=g["seed"].to_numpy(),
                             clusters_den=seeds, matched=True, min_samples=2)  # fmt: skip
                over = f"{r.clusters} seeds" if r.clusters > 1 else f"{len(g)} epochs of one seed"
                rows.append(dict(problem=problem, width=width, gq=gq_label, baseline=base, ratio=r.point, low=r.lo,
                                 high=r.hi, over=over))  # fmt: skip
    return pd.DataFrame(rows, columns=["problem", "width", "gq", "baseline", "ratio", "low", "high", "over"])


def epochs_faster(epochs: pd.DataFrame, problem: str, width: int, gq_label: str, base: str) -> list[tuple]:
    """Per trained epoch: (epoch, GQ's time / the baseline's, holds) where `holds` says GQ was faster at that
    epoch: the 95% interval over seeds (each seed's ratio at that epoch) lies below 1, or with one seed the
    ratio itself is below 1."""
    d = epochs[(epochs["problem"] == problem) & (epochs["width"] == width) & (epochs["epoch"] >= 1)]
    g, b = d[d["label"] == gq_label], d[d["method"] == base]
    out = []
    for epoch in sorted(set(g["epoch"]) & set(b["epoch"])):
        ge, be = g[g["epoch"] == epoch], b[b["epoch"] == epoch]
        r = ratio_ci(ge["epoch_s"].to_numpy(), be["epoch_s"].to_numpy(), paired=False, clusters=ge["seed"].to_numpy(),
                     clusters_den=be["seed"].to_numpy(), matched=True, min_samples=2)  # fmt: skip
        holds = bool(r.hi < 1) if r.hi == r.hi else bool(r.point < 1)
        out.append((int(epoch), float(r.point), holds))
    return out


def epoch_spans(per_epoch: list[tuple]) -> str:
    """ "at epochs 1-12, 30 (of 1-40)" from `epochs_faster`'s rows; "at no epoch (of 1-40)" when none."""
    if not per_epoch:
        return "no common epochs"
    held = [e for e, _, ok in per_epoch if ok]
    first, last = per_epoch[0][0], per_epoch[-1][0]
    spans, start, prev = [], None, None
    for e in held:
        if start is None:
            start = prev = e
        elif e == prev + 1:
            prev = e
        else:
            spans.append((start, prev))
            start = prev = e
    if start is not None:
        spans.append((start, prev))
    text = ", ".join(f"{a}" if a == z else f"{a}-{z}" for a, z in spans)
    return f"at epochs {text} (of {first}-{last})" if spans else f"at no epoch (of {first}-{last})"


def final_metrics(epochs: pd.DataFrame) -> pd.DataFrame:
    """Last epoch's validation metric per run, then mean, std, min, max over seeds (per width)."""
    last = epochs[epochs["epoch"] == epochs.groupby(RUN)["epoch"].transform("max")]
    g = last.groupby(["problem", "metric", "label", "method", "width"])["val_metric"]
    out = g.agg(["mean", "std", "min", "max", "count"]).rename(columns={"count": "seeds"}).reset_index()
    return out


def _style(fig: go.Figure, title: str, height: int = 420) -> go.Figure:
    fig.update_layout(title=title, template=TEMPLATE, height=height, legend_title_text="", margin=dict(t=90))
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=", 1)[-1]))
    return fig


def fig_train_epoch_time(epochs: pd.DataFrame) -> go.Figure | None:
    s = per_epoch_summary(epochs)
    if s.empty:
        return None
    s = s.sort_values(["problem", "label", "width"])
    fig = px.line(s, x="width", y="epoch_s", color="label", facet_col="problem", facet_col_wrap=3, markers=True,
                  log_x=True, log_y=True, error_y=s["q75"] - s["epoch_s"], error_y_minus=s["epoch_s"] - s["q25"],
                  hover_data=["fwd_s", "bwd_s", "step_s", "nfe_fwd", "nfe_bwd", "seeds"],
                  labels=dict(epoch_s="s / epoch", width="width"))  # fmt: skip
    fig.update_yaxes(matches=None, showticklabels=True)
    rows = -(-s["problem"].nunique() // 3)
    return _style(fig, TITLES["fig_train_epoch_time"], height=320 * rows + 100)


def fig_train_nfe(epochs: pd.DataFrame) -> go.Figure | None:
    d = largest_width(epochs[epochs["epoch"] >= 1])
    if d.empty:
        return None
    m = d.groupby(["problem", "label", "epoch"])[["nfe_fwd", "nfe_bwd"]].mean().reset_index()
    long = m.melt(id_vars=["problem", "label", "epoch"], value_vars=["nfe_fwd", "nfe_bwd"], var_name="pass",
                  value_name="NFE per epoch")  # fmt: skip
    long["pass"] = long["pass"].map({"nfe_fwd": "forward", "nfe_bwd": "backward"})
    fig = px.line(long, x="epoch", y="NFE per epoch", color="label", line_dash="pass", facet_col="problem",
                  facet_col_wrap=3, line_dash_map={"forward": "solid", "backward": "dot"})  # fmt: skip
    fig.update_yaxes(matches=None, showticklabels=True)
    fig.update_xaxes(matches=None, showticklabels=True)
    rows = -(-long["problem"].nunique() // 3)
    return _style(fig, TITLES["fig_train_nfe"], height=320 * rows + 100)


def fig_train_cost(epochs: pd.DataFrame) -> go.Figure | None:
    d = largest_width(epochs[epochs["epoch"] >= 1])
    if d.empty:
        return None
    if "quad_nodes" not in d:  # tables from before the column
        d = d.assign(quad_nodes=float("nan"))
    m = d.groupby(["problem", "label", "epoch"])[["epoch_s", "quad_nodes"]].median().reset_index()
    names = {"epoch_s": "time per epoch (s)", "quad_nodes": "quadrature nodes per epoch"}
    long = m.melt(id_vars=["problem", "label", "epoch"], value_vars=list(names), var_name="panel", value_name="y")
    long = long.dropna(subset=["y"]).assign(panel=lambda x: x["panel"].map(names))
    if long.empty:
        return None
    fig = px.line(long, x="epoch", y="y", color="label", facet_row="problem", facet_col="panel",
                  category_orders={"panel": list(names.values())})  # fmt: skip
    fig.update_yaxes(matches=None, showticklabels=True, title_text="")
    return _style(fig, TITLES["fig_train_cost"], height=260 * long["problem"].nunique() + 120)


def fig_train_curves(epochs: pd.DataFrame) -> go.Figure | None:
    d = largest_width(epochs)
    if d.empty:
        return None
    m = d.groupby(["problem", "metric", "label", "epoch"])[["loss", "val_metric", "wall_s"]].median().reset_index()
    panels = []
    for y, yname in (("loss", "training loss"), ("val_metric", "validation metric")):
        for x, xname in (("epoch", "epoch"), ("wall_s", "wall-clock s")):
            p = m[["problem", "metric", "label"]].copy()
            p["x"], p["y"], p["panel"] = m[x], m[y], f"{yname} vs {xname}"
            panels.append(p[p["y"].notna()])
    long = pd.concat(panels, ignore_index=True)
    long["problem"] = long["problem"] + " (" + long["metric"] + ")"
    fig = px.line(long, x="x", y="y", color="label", facet_row="problem", facet_col="panel", markers=False,
                  labels=dict(x="", y=""))  # fmt: skip
    fig.update_xaxes(matches=None, showticklabels=True)
    fig.update_yaxes(matches=None, showticklabels=True)
    return _style(fig, TITLES["fig_train_curves"], height=260 * long["problem"].nunique() + 120)


def fig_train_final(epochs: pd.DataFrame) -> go.Figure | None:
    last = largest_width(epochs[epochs["epoch"] == epochs.groupby(RUN)["epoch"].transform("max")])
    if last.empty:
        return None
    last = last.assign(problem=last["problem"] + " (" + last["metric"] + ")").sort_values("label")
    fig = px.box(last, x="label", y="val_metric", color="label", facet_col="problem", facet_col_wrap=3,
                 points="all", hover_data=["seed", "width"], labels=dict(val_metric="", label=""))  # fmt: skip
    fig.update_yaxes(matches=None, showticklabels=True)
    fig.update_xaxes(showticklabels=False)
    rows = -(-last["problem"].nunique() // 3)
    return _style(fig, TITLES["fig_train_final"], height=320 * rows + 100)


def fig_toy_gradient(toy: pd.DataFrame | None) -> go.Figure | None:
    if toy is None or toy.empty:
        return None
    t = toy.assign(tolerance="rtol=" + toy["rtol"].map("{:g}".format) + ", " + toy["dtype"]).sort_values(["label", "T"])
    t = t.assign(grad_rel_err=t["grad_rel_err"].clip(lower=1e-17))
    fig = px.line(t, x="T", y="grad_rel_err", color="label", facet_col="tolerance", markers=True, log_y=True,
                  hover_data=["err_a", "err_z0", "err_T", "nfe_fwd", "nfe_bwd"],
                  labels=dict(grad_rel_err="relative gradient error"))  # fmt: skip
    return _style(fig, TITLES["fig_toy_gradient"])


def section_figures(epochs: pd.DataFrame | None, toy: pd.DataFrame | None) -> list[tuple[str, go.Figure]]:
    out = []
    if epochs is not None and not epochs.empty:
        for make in (fig_train_epoch_time, fig_train_nfe, fig_train_cost, fig_train_curves, fig_train_final):
            fig = make(epochs)
            if fig is not None:
                out.append((make.__name__, fig))
    fig = fig_toy_gradient(toy)
    if fig is not None:
        out.append(("fig_toy_gradient", fig))
    return out
