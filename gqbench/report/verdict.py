"""The report's first screen: which method to use at each problem x width x tolerance, GQ's speed-ups
with their 95% intervals, gradient errors and memory beside the times, and a sentence per problem
written from the data."""

from __future__ import annotations

import html

import numpy as np
import pandas as pd

from ..define.case import QUAD_METHODS
from ..results.advice import REACH, reach
from ..results.ratios import paired_speedups

POINT = ["problem", "width", "rtol", "device", "dtype"]
# A method's gradient is "within reach" of the tolerance when its error is at most REACH times the larger of
# rtol and the best error reached at that point (gqbench.results.advice says why; `gqbench advise` uses it too).


def preferred_gq(labels) -> str | None:
    """The GQ setting the verdict speaks for: the default (adaptive) rule when it ran."""
    labels = sorted(set(labels))
    for want in ("torch_gq[adaptive]", "torch_gq"):
        if want in labels:
            return want
    return next((x for x in labels if x.split("[")[0] in QUAD_METHODS), None)


def _state(steps) -> str:
    """A column's weights: "" at the initial weights, " (step N)" after N steps of the training recipe."""
    return "" if not steps else f" (step {int(steps)})"


def verdict_table(df: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """One row per problem x width x tolerance; columns per weights state: at the initial weights (no suffix)
    and after N training steps (" (step N)", where `train_steps` measured them). `ranked by` says which
    state the row's verdict (`use`) comes from: the most trained one measured, else the initial weights."""
    if summary.empty:
        return pd.DataFrame()
    sp = paired_speedups(df)
    if "train_steps" not in summary:
        summary = summary.assign(train_steps=0)
    if "train_steps" not in sp:
        sp = sp.assign(train_steps=0)
    rows = []
    for key, point_rows in summary.groupby(POINT, sort=True):
        point = dict(zip(POINT, key))
        row = dict(point)
        states = sorted(int(v) for v in point_rows["train_steps"].fillna(0).unique())
        for steps in states:
            g = point_rows[point_rows["train_steps"].fillna(0) == steps]
            suffix = _state(steps)
            err = g["grad_rel_err"]
            # A gradient its method could not certify (GQ's warning) is not ranked, however close it came.
            uncertified = g["certified"].eq(False).fillna(False) if "certified" in g else pd.Series(False, g.index)
            ok = g[((err <= reach(point["rtol"], err)) | err.isna()) & ~uncertified]
            fastest = ok.loc[ok["total_s"].idxmin()] if not ok.empty else None
            text = "-" if fastest is None else f"{fastest['label']} ({fastest['total_s']:.3g} s)"
            if uncertified.any():
                text += " · not ranked, uncertified: " + ", ".join(g.loc[uncertified, "label"])
            row["fastest (within reach)" if not steps else f"fastest (within reach, step {steps})"] = text
            row["use"], row["ranked by"] = text, "initial weights" if not steps else f"step {steps}"
            gq_label = preferred_gq(g.loc[g["method"].isin(QUAD_METHODS), "label"])
            by_label = g.set_index("label")
            if gq_label is not None:
                here = sp[(sp["gq"] == gq_label) & (sp["train_steps"].fillna(0) == steps)
                          & np.logical_and.reduce([sp[c] == point[c] for c in POINT])]  # fmt: skip
                for _, s in here.iterrows():
                    row[f"GQ vs {s['baseline']}{suffix}"] = _ratio_text(s, "total")
                row["GQ"] = gq_label
            names = {gq_label: "GQ"}  # the GQ column names the setting
            for lab in [gq_label, "torch_direct", "torch_adjoint"]:
                if lab in by_label.index:
                    row[f"error {names.get(lab, lab)}{suffix}"] = by_label.loc[lab, "grad_rel_err"]
            for lab in [gq_label, "torch_direct"]:
                if lab in by_label.index and not steps:  # memory hardly moves with the weights
                    row[f"peak MiB {names.get(lab, lab)}"] = by_label.loc[lab, "peak_mem_mib"]
        rows.append(row)
    table = pd.DataFrame(rows)
    if (table["ranked by"] == "initial weights").all():
        table = table.drop(columns=["use", "ranked by"])  # no trained state: "fastest" is the verdict
    # Point, verdict, GQ's speed-ups, errors, memory (not in order of first appearance: a problem
    # without the adjoint must not push "GQ vs torch_adjoint" to the far right).
    first = [c for c in POINT if table[c].nunique() > 1 or c not in ("device", "dtype")]
    groups = [[c for c in table if c.startswith(p)] for p in ("use", "ranked by", "fastest", "GQ", "GQ vs ",
                                                               "error ", "peak ")]  # fmt: skip
    ordered = first + [c for g in groups for c in dict.fromkeys(sorted(g, key=_baseline_order))]
    return table[list(dict.fromkeys(ordered))]


def _baseline_order(col: str) -> tuple:
    """GQ first, then direct backprop, the adjoint, the seminorm adjoint, the rest by name; each method's
    initial-weights column before its trained ones (step N, by N)."""
    base, _, steps = col.partition(" (step ")
    tail = base.rsplit(" ", 1)[-1]
    rank = next((i for i, k in enumerate(("gq", "direct", "adjoint", "seminorm")) if k in tail.lower()), 4)
    return rank, base, int(steps.rstrip(")") or 0)


def _ranks_note(table: pd.DataFrame) -> str:
    """Which weights the verdict ranks by, where trained states were measured."""
    if "ranked by" not in table:
        return "all at the models' initial weights (no train_steps measured); "
    return ("columns without a suffix are at the initial weights, \"(step N)\" after N steps of the training "
            "recipe (direct backprop, Adam; gqbench.measurement.trained); <b>use</b> ranks by the most trained state "
            "measured at that point (<b>ranked by</b>), since that is where users' gradients are taken; ")  # fmt: skip


def _constant_note(df: pd.DataFrame) -> str:
    same = [f"{c} {df[c].iloc[0]}" for c in ("device", "dtype") if c in df and df[c].nunique() == 1]
    return f" (all cases: {', '.join(same)})" if same else ""


def _covers_note(df: pd.DataFrame) -> str:
    """What the verdict's intervals are over, from the samples."""
    sp = paired_speedups(df)
    if sp.empty:
        return ""
    over = ", ".join(sorted(set(sp["covers"])))
    if (sp["processes"] > 1).all():
        return (f"over processes ({over}: each process's median ratio, Student's t; a rerun, in new processes, "
                "should land inside)")  # fmt: skip
    return f"({over}: a bootstrap over rounds; it does not cover how a new process's times differ)"


def _ratio_text(s, name: str) -> str:
    v, lo, hi = s[f"speedup_{name}"], s[f"{name}_lo"], s[f"{name}_hi"]
    if lo != lo:
        return f"{v:.2f}x (n<3)"
    return f"{v:.2f}x [{lo:.2f}-{hi:.2f}]" + (" ~1" if s[f"{name}_includes_one"] else "")


def sentences(df: pd.DataFrame, summary: pd.DataFrame) -> list[str]:
    """One sentence per problem: GQ's backward speed-up range over each baseline, and its error."""
    sp = paired_speedups(df)
    out = []
    for problem, g in summary.groupby("problem", sort=True):
        gq_label = preferred_gq(g.loc[g["method"].isin(QUAD_METHODS), "label"])
        if gq_label is None:
            continue
        s = sp[(sp["problem"] == problem) & (sp["gq"] == gq_label)]
        if "train_steps" not in s:
            s = s.assign(train_steps=0)
        parts = []
        for (steps, base), b in s.groupby([s["train_steps"].fillna(0), "baseline"], sort=True):
            widths = f"w = {b['width'].min()}" + (f"-{b['width'].max()}" if b["width"].nunique() > 1 else "")
            parts.append(_speed_phrase(b, base, widths + (f" after {int(steps)} training steps" if steps else "")))
        errs = g.set_index("label")["grad_rel_err"]
        err_txt = ""
        if gq_label in errs and "torch_adjoint" in errs:
            at = [c for c in ("width", "rtol", "train_steps") if c in g]
            mine = g[g["label"] == gq_label].set_index(at)["grad_rel_err"]
            adj = g[g["label"] == "torch_adjoint"].set_index(at)["grad_rel_err"]
            ratio = (mine / adj).dropna()
            if len(ratio):
                lo, hi = f"{ratio.min():.2g}", f"{ratio.max():.2g}"
                err_txt = f"; its gradient error is {lo if lo == hi else f'{lo}-{hi}'}x the adjoint's"
        if parts:
            out.append(f"<b>{html.escape(str(problem))}</b>: {html.escape(gq_label)}'s backward is "
                       + "; ".join(html.escape(p) for p in parts) + html.escape(err_txt) + ".")  # fmt: skip
    return out


def _speed_phrase(b: pd.DataFrame, base: str, where: str) -> str:
    """GQ's backward against `base` over the rows `b` of `paired_speedups`, in words: "3.2-4.1x faster
    than X at w = ...", "1.7-2.1x slower than X at ..." (speed-ups below 1 as slow-downs), or no clear
    difference where every interval includes 1."""
    lo, hi = b["speedup_bwd"].min(), b["speedup_bwd"].max()

    def span(a, z):
        return f"{a:.2g}x" if np.isclose(a, z, rtol=0.05) else f"{a:.2g}-{z:.2g}x"

    unsure = int(b["bwd_includes_one"].sum())
    if unsure == len(b):
        return f"not clearly different from {base} at {where} ({span(lo, hi)}; the 95% intervals include 1x)"
    note = f" ({unsure} of {len(b)} not distinguishable from 1x)" if unsure else ""
    if lo > 1:
        return f"{span(lo, hi)} faster than {base} at {where}{note}"
    if hi < 1:
        return f"{span(1 / hi, 1 / lo)} slower than {base} at {where}{note}"
    return f"from {1 / lo:.2g}x slower to {hi:.2g}x faster than {base} at {where}{note}"


def verdict_html(df: pd.DataFrame, summary: pd.DataFrame) -> str:
    table = verdict_table(df, summary)
    if table.empty:
        return ""
    text = "".join(f"<li>{s}</li>" for s in sentences(df, summary))
    note = (
        "<p class='note'>Per problem, width and tolerance: the fastest method (forward + backward) among those "
        f"whose gradient error is within {REACH:g}x of max(rtol, the best error reached there); {_ranks_note(table)}"
        "GQ's speed-up "
        "over each baseline (baseline time / GQ time, whole step, paired by round) with its 95% interval "
        f"{_covers_note(df)} (~1: the interval includes 1); relative gradient errors; peak memory"
        f"{_constant_note(df)}.</p>"
    )
    shown = table.to_html(index=False, border=0, classes="verdict", na_rep="",
                          float_format=lambda x: f"{x:.3g}")  # fmt: skip
    machines = df["machine"].dropna().unique() if "machine" in df else []
    warn = ""
    if len(machines) > 1:
        names = ", ".join(html.escape(str(m)) for m in machines)
        warn = (
            f"<p class='bad'>These results come from {len(machines)} machines ({names}): each speed-up compares "
            "methods run side by side on one machine, but absolute times of different problems or widths may not "
            "be comparable.</p>"
        )
    return f"<h2 id='verdict'>Verdict</h2>{warn}<ul>{text}</ul>{note}{shown}"
