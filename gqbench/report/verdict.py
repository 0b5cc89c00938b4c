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


def verdict_table(df: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    if summary.empty:
        return pd.DataFrame()
    sp = paired_speedups(df)
    rows = []
    for key, g in summary.groupby(POINT, sort=True):
        point = dict(zip(POINT, key))
        err = g["grad_rel_err"]
        # A gradient its method could not certify (GQ's warning) is not ranked, however close it came.
        uncertified = g["certified"].eq(False).fillna(False) if "certified" in g else pd.Series(False, index=g.index)
        ok = g[((err <= reach(point["rtol"], err)) | err.isna()) & ~uncertified]
        fastest = ok.loc[ok["total_s"].idxmin()] if not ok.empty else None
        gq_label = preferred_gq(g.loc[g["method"].isin(QUAD_METHODS), "label"])
        row = dict(point)
        row["fastest (within reach)"] = "-" if fastest is None else f"{fastest['label']} ({fastest['total_s']:.3g} s)"
        if uncertified.any():
            row["fastest (within reach)"] += " · not ranked, uncertified: " + ", ".join(g.loc[uncertified, "label"])
        by_label = g.set_index("label")
        if gq_label is not None:
            here = sp[(sp["gq"] == gq_label) & np.logical_and.reduce([sp[c] == point[c] for c in POINT])]
            for _, s in here.iterrows():
                row[f"GQ vs {s['baseline']}"] = _ratio_text(s, "total")
            row["GQ"] = gq_label
        names = {gq_label: "GQ"}  # the GQ column names the setting
        for lab in [gq_label, "torch_direct", "torch_adjoint"]:
            if lab in by_label.index:
                row[f"error {names.get(lab, lab)}"] = by_label.loc[lab, "grad_rel_err"]
        for lab in [gq_label, "torch_direct"]:
            if lab in by_label.index:
                row[f"peak MiB {names.get(lab, lab)}"] = by_label.loc[lab, "peak_mem_mib"]
        rows.append(row)
    table = pd.DataFrame(rows)
    # Point, verdict, GQ's speed-ups, errors, memory (not in order of first appearance: a problem
    # without the adjoint must not push "GQ vs torch_adjoint" to the far right).
    first = [c for c in POINT if table[c].nunique() > 1 or c not in ("device", "dtype")]
    groups = [[c for c in table if c.startswith(p)] for p in ("fastest", "GQ", "GQ vs ", "error ", "peak ")]
    ordered = first + [c for g in groups for c in dict.fromkeys(sorted(g, key=_baseline_order))]
    return table[list(dict.fromkeys(ordered))]


def _baseline_order(col: str) -> tuple:
    """GQ first, then direct backprop, the adjoint, the seminorm adjoint, the rest by name."""
    tail = col.rsplit(" ", 1)[-1]
    rank = next((i for i, k in enumerate(("gq", "direct", "adjoint", "seminorm")) if k in tail.lower()), 4)
    return rank, col


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
        parts = []
        for base, b in s.groupby("baseline", sort=True):
            widths = f"w = {b['width'].min()}" + (f"-{b['width'].max()}" if b["width"].nunique() > 1 else "")
            parts.append(_speed_phrase(b, base, widths))
        errs = g.set_index("label")["grad_rel_err"]
        err_txt = ""
        if gq_label in errs and "torch_adjoint" in errs:
            mine = g[g["label"] == gq_label].set_index(["width", "rtol"])["grad_rel_err"]
            adj = g[g["label"] == "torch_adjoint"].set_index(["width", "rtol"])["grad_rel_err"]
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
        f"whose gradient error is within {REACH:g}x of max(rtol, the best error reached there); GQ's speed-up "
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
