""" "The paper's claims, re-run": each claim of Norcliffe & Deisenroth (TMLR 2023) about training, our number
with its spread, and a verdict computed from the data (never typed by hand).

Verdict rules (per experiment, at its largest width):
- speed claims: GQ's time per epoch over the baseline's with `ratio_ci`'s 95 % interval over seeds (each seed's
  median epoch ratio; over the trained epochs with one seed); "confirmed" when the whole interval is below 1,
  "not confirmed" otherwise (GQ slower, or no clear difference); "not measurable here" without both methods
  or without an interval; beside it, the epochs at which GQ was faster (per epoch: the interval over seeds
  below 1, or with one seed the ratio below 1), since the cost drifts as the model trains;
- "especially for large models": the GQ/direct ratio at the largest width below the one at the smallest;
- "same final accuracy": |mean GQ - mean direct| of the last epoch's validation metric within twice the larger
  of their seed-to-seed standard deviations (needs two seeds or more of each);
- toy gradient: GQ's largest error over T within a factor 10 of the adjoint's at every tolerance; and GQ's
  error falls as the tolerance tightens.
"""

from __future__ import annotations

import html

import numpy as np
import pandas as pd

from .figures import GQ, epoch_ratios, epoch_spans, epochs_faster, final_metrics, largest_width

CONFIRMED, NOT_CONFIRMED, NOT_MEASURABLE = "confirmed", "not confirmed", "not measurable here"
COLUMNS = ["claim", "experiment", "measured", "verdict"]


def _fmt_ratio(r) -> str:
    if not np.isfinite(r["ratio"]):
        return "n/a"
    if not np.isfinite(r["low"]):
        return f"{r['ratio']:.2f}x (no interval: < 2 epochs)"
    return f"{r['ratio']:.2f}x [{r['low']:.2f}, {r['high']:.2f}] over {r['over']}"


def _speed_verdict(r) -> str:
    if not np.isfinite(r["high"]):
        return NOT_MEASURABLE
    return CONFIRMED if r["high"] < 1 else NOT_CONFIRMED


def _gq_label(labels) -> str | None:
    labels = sorted(set(labels))
    return next((x for x in labels if x == "torch_gq[adaptive]"), labels[0] if labels else None)


def claims_table(epochs: pd.DataFrame | None, toy: pd.DataFrame | None) -> pd.DataFrame:
    rows: list[dict] = []
    if epochs is not None and not epochs.empty:
        rows += _speed_claims(epochs) + _accuracy_claims(epochs)
    if toy is not None and not toy.empty:
        rows += _toy_claims(toy)
    return pd.DataFrame(rows, columns=COLUMNS)


def _speed_claims(epochs: pd.DataFrame) -> list[dict]:
    rows = []
    ratios = epoch_ratios(epochs)
    gq = _gq_label(ratios["gq"]) if not ratios.empty else None
    r = ratios[ratios["gq"] == gq]
    top = r[r["width"] == r.groupby("problem")["width"].transform("max")]
    for base, claim in (("torch_adjoint", "GQ trains significantly faster than the adjoint (time per epoch)"),
                        ("torch_direct", "GQ trains faster than direct backprop (time per epoch)")):  # fmt: skip
        faster = []
        for problem in sorted(epochs["problem"].unique()):
            x = top[(top["problem"] == problem) & (top["baseline"] == base)]
            if x.empty:
                rows.append(dict(claim=claim, experiment=problem, measured="not run", verdict=NOT_MEASURABLE))
                continue
            x = x.iloc[0]
            verdict = _speed_verdict(x)
            faster.append(verdict == CONFIRMED)
            # Over the whole run the verdict may hide a drift: say at which epochs GQ was faster.
            when = epoch_spans(epochs_faster(epochs, problem, x["width"], gq, base))
            measured = f"GQ / {base.removeprefix('torch_')} = {_fmt_ratio(x)}; GQ faster {when}"
            rows.append(
                dict(claim=claim, experiment=f"{problem} (width {x['width']})", measured=measured, verdict=verdict)
            )
        if base == "torch_direct" and faster:
            k, n = sum(faster), len(faster)
            rows.append(dict(claim="GQ is often faster than direct backprop", experiment="all experiments",
                             measured=f"faster in {k} of {n} experiments",
                             verdict=CONFIRMED if 2 * k >= n else NOT_CONFIRMED))  # fmt: skip
    claim = "GQ's advantage over direct backprop grows with model size"
    for problem, p in r[r["baseline"] == "torch_direct"].groupby("problem"):
        p = p.sort_values("width")
        if len(p) < 2:
            rows.append(dict(claim=claim, experiment=problem, measured="one width only", verdict=NOT_MEASURABLE))
            continue
        small, large = p.iloc[0], p.iloc[-1]
        # Grows: the largest width's 95% interval lies wholly below the smallest width's (two points
        # inside each other's spread say nothing).
        rows.append(dict(claim=claim, experiment=problem,
                         measured=f"GQ / direct {_fmt_ratio(small)} at width {small['width']} -> "
                                  f"{_fmt_ratio(large)} at width {large['width']}",
                         verdict=CONFIRMED if large["high"] < small["low"] else NOT_CONFIRMED))  # fmt: skip
    return rows


def _accuracy_claims(epochs: pd.DataFrame) -> list[dict]:
    rows = []
    claim = "GQ reaches the same final metric as direct backprop"
    fm = largest_width(final_metrics(epochs))
    gq = _gq_label(fm.loc[fm["method"] == GQ, "label"])
    for problem, p in fm.groupby("problem"):
        g, d = p[p["label"] == gq], p[p["method"] == "torch_direct"]
        if g.empty or d.empty:
            rows.append(dict(claim=claim, experiment=problem, measured="not run", verdict=NOT_MEASURABLE))
            continue
        g, d = g.iloc[0], d.iloc[0]
        metric = p["metric"].iloc[0]
        measured = (f"{metric}: GQ {g['mean']:.4g} ± {_sd(g)}, direct {d['mean']:.4g} ± {_sd(d)} "
                    f"({int(g['seeds'])} / {int(d['seeds'])} seeds)")  # fmt: skip
        if min(g["seeds"], d["seeds"]) < 2:
            verdict = NOT_MEASURABLE
        else:
            spread = max(g["std"], d["std"])
            verdict = CONFIRMED if abs(g["mean"] - d["mean"]) <= 2 * spread + 1e-12 else NOT_CONFIRMED
        rows.append(dict(claim=claim, experiment=f"{problem} (width {g['width']})", measured=measured, verdict=verdict))
    return rows


def _sd(r) -> str:
    return f"{r['std']:.2g}" if np.isfinite(r["std"]) else "?"


def _toy_claims(toy: pd.DataFrame) -> list[dict]:
    rows = []
    worst = toy.groupby(["label", "method", "rtol", "dtype"])["grad_rel_err"].max().reset_index()
    gq_label = _gq_label(worst.loc[worst["method"] == GQ, "label"])
    gq = worst[worst["label"] == gq_label].set_index("rtol")["grad_rel_err"]
    adj = worst[worst["method"] == "torch_adjoint"].set_index("rtol")["grad_rel_err"]
    both = sorted(set(gq.index) & set(adj.index), reverse=True)
    claim = "GQ's gradients are as accurate as the adjoint's (toy problem, all T)"
    if both:
        parts = [f"rtol {t:g}: GQ {gq[t]:.2g} vs adjoint {adj[t]:.2g}" for t in both]
        ok = all(gq[t] <= 10 * adj[t] for t in both)
        rows.append(dict(claim=claim, experiment="toy_gradient", measured="; ".join(parts),
                         verdict=CONFIRMED if ok else NOT_CONFIRMED))  # fmt: skip
    else:
        rows.append(dict(claim=claim, experiment="toy_gradient", measured="not run", verdict=NOT_MEASURABLE))
    claim = "GQ's gradient error falls as the tolerance tightens (toy problem)"
    if len(gq) >= 2:
        loose, tight = gq.index.max(), gq.index.min()
        rows.append(dict(claim=claim, experiment="toy_gradient",
                         measured=f"worst error {gq[loose]:.2g} at rtol {loose:g} -> {gq[tight]:.2g} at rtol {tight:g}",
                         verdict=CONFIRMED if gq[tight] < gq[loose] else NOT_CONFIRMED))  # fmt: skip
    else:
        rows.append(dict(claim=claim, experiment="toy_gradient", measured="one tolerance", verdict=NOT_MEASURABLE))
    return rows


def _table(df: pd.DataFrame, cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>" for r in df.itertuples(index=False)
    )
    return f"<table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def tables_html(epochs: pd.DataFrame | None, toy: pd.DataFrame | None) -> str:
    """The section's head: the claims table, GQ's per-epoch time ratios and the final metrics."""
    out = ["<p>The paper's experiments trained end to end by every method (same initial weights, batch order and "
           "Adam for every method of a seed). The images experiment uses scikit-learn's 8x8 digits, shipped inside "
           "that package (no download), not MNIST.</p>"]  # fmt: skip
    claims = claims_table(epochs, toy)
    if not claims.empty:
        out.append("<h3>The paper's claims, re-run</h3>" + _table(claims, "claims"))
    if epochs is not None and not epochs.empty:
        r = epoch_ratios(epochs)
        if not r.empty:
            r = largest_width(r).assign(**{"GQ / baseline": lambda x: x.apply(_fmt_ratio, axis=1)})
            out.append("<h3>Time per epoch, GQ over each baseline (largest width; 95 % interval over seeds, or over "
                       "the epochs of one seed)</h3>"
                       + _table(r[["problem", "width", "gq", "baseline", "GQ / baseline"]]))  # fmt: skip
        fm = final_metrics(epochs)
        fm = largest_width(fm).assign(mean=lambda x: x["mean"].map("{:.4g}".format),
                                      std=lambda x: x["std"].map("{:.2g}".format))  # fmt: skip
        out.append("<h3>Final validation metric (largest width; mean and standard deviation over seeds)</h3>"
                   + _table(fm[["problem", "metric", "label", "width", "mean", "std", "seeds"]]))  # fmt: skip
    return "\n".join(out)
