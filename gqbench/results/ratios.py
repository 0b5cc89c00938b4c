"""Ratios of times with 95% confidence intervals (scipy's bootstrap), from the raw samples.

Speed-ups of GQ over a baseline pair the two methods' samples by timing round (the runner alternates
compared methods round by round, so a round's two samples saw the same machine state); comparisons
of two runs (two commits, two machines) resample each run's samples independently.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..report.figures import MATCH, QUAD_METHODS

LEVEL = 0.95
RESAMPLES = 2000


def _median_ratio(a, b, axis=-1):
    return np.median(a, axis=axis) / np.median(b, axis=axis)


def _median_of_ratios(a, b, axis=-1):
    return np.median(a / b, axis=axis)


def ratio_ci(num, den, *, paired: bool, seed: int = 0, min_samples: int = 3) -> tuple[float, float, float]:
    """The ratio num/den and its 95% bootstrap interval (percentile method); NaN bounds with fewer
    than `min_samples` a side (no interval worth the name).

    paired (num[i] and den[i] timed in the same round): the median over rounds of the per-round ratio,
    so a slow spell that hits a whole round cancels (on a shared machine the ratio of the two medians
    swung 3-4x more between runs); unpaired: median(num) / median(den)."""
    from scipy.stats import bootstrap

    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    stat = _median_of_ratios if paired else _median_ratio
    point = float(stat(num, den))
    if min(len(num), len(den)) < min_samples:
        return point, float("nan"), float("nan")
    if (np.ptp(num / den) == 0) if paired else (np.ptp(num) == 0 and np.ptp(den) == 0):
        return point, point, point
    res = bootstrap((num, den), stat, paired=paired, vectorized=True, n_resamples=RESAMPLES,
                    confidence_level=LEVEL, method="percentile", rng=np.random.default_rng(seed))  # fmt: skip
    return point, float(res.confidence_interval.low), float(res.confidence_interval.high)


def paired_speedups(df: pd.DataFrame, gq_methods: tuple[str, ...] = QUAD_METHODS) -> pd.DataFrame:
    """GQ's speed-up over every baseline of its comparison group: baseline time / GQ time, backward
    and whole step (forward + backward), the median over rounds of each round's ratio, with its 95%
    interval (bootstrap over rounds).
    `*_includes_one`: the interval does not exclude "no difference". `gq_methods`: the methods
    whose speed-up is wanted (every other method of a group is a baseline)."""
    cols = [*MATCH, "gq", "baseline", "rounds", "speedup_bwd", "bwd_lo", "bwd_hi", "speedup_total", "total_lo",
            "total_hi", "bwd_includes_one", "total_includes_one"]  # fmt: skip
    ok = df[df["status"] == "ok"].copy()
    if ok.empty:
        return pd.DataFrame(columns=cols)
    ok["total_s"] = ok["fwd_s"] + ok["bwd_s"]
    # Results from before paired rounds: repeats were not taken side by side, so resample independently.
    paired = "round" in ok and ok["round"].notna().all()
    ok["round"] = ok["round"] if paired else ok["repeat"]
    is_gq = ok["method"].isin(gq_methods)
    out = []
    key = [c for c in MATCH if c in ok]
    for _, grp in ok.groupby(key, dropna=False, sort=True):
        by_label = {lab: g.set_index("round") for lab, g in grp.groupby("label")}
        gq_labels = sorted(grp.loc[is_gq.loc[grp.index], "label"].unique())
        base_labels = sorted(grp.loc[~is_gq.loc[grp.index], "label"].unique())
        for g_lab in gq_labels:
            for b_lab in base_labels:
                g, b = by_label[g_lab], by_label[b_lab]
                rounds = g.index.intersection(b.index)
                row = {c: grp.iloc[0][c] for c in key}
                row.update(gq=g_lab, baseline=b_lab, rounds=len(rounds))
                for m, name in (("bwd_s", "bwd"), ("total_s", "total")):
                    s, lo, hi = ratio_ci(b.loc[rounds, m], g.loc[rounds, m], paired=paired)
                    row.update({f"speedup_{name}": s, f"{name}_lo": lo, f"{name}_hi": hi,
                                f"{name}_includes_one": bool(not (lo > 1 or hi < 1))})  # fmt: skip
                out.append(row)
    return pd.DataFrame(out, columns=cols)


def compare_samples(now: pd.DataFrame, base: pd.DataFrame, threshold: float = 0.1) -> pd.DataFrame:
    """Cases in both runs (same case_id): now/base ratio of the median total time (forward +
    backward) and backward time with 95% intervals (independent resampling). Verdict "regression"
    only when the interval lies wholly above 1 + threshold, "improvement" wholly below
    1 / (1 + threshold), else "same" (within the threshold, or not distinguishable from it)."""
    rows = []
    now, base = now[now["status"] == "ok"].copy(), base[base["status"] == "ok"].copy()
    for d in (now, base):
        d["total_s"] = d["fwd_s"] + d["bwd_s"]
    base_by = dict(tuple(base.groupby("case_id")))
    for cid, a in now.groupby("case_id", sort=False):
        b = base_by.get(cid)
        if b is None:
            continue
        row = dict(case_id=cid, label=a["label"].iloc[0], problem=a["problem"].iloc[0], width=a["width"].iloc[0],
                   rtol=a["rtol"].iloc[0], device=a["device"].iloc[0])  # fmt: skip
        for m, name in (("total_s", "total"), ("bwd_s", "bwd")):
            r, lo, hi = ratio_ci(a[m], b[m], paired=False)
            row.update({f"ratio_{name}": r, f"{name}_lo": lo, f"{name}_hi": hi})
        lo, hi = row["total_lo"], row["total_hi"]
        if np.isnan(lo):  # too few samples for an interval: the point estimate decides
            lo = hi = row["ratio_total"]
        row["verdict"] = "regression" if lo > 1 + threshold else "improvement" if hi < 1 / (1 + threshold) else "same"
        rows.append(row)
    return pd.DataFrame(rows)
