"""Ratios of times with 95% confidence intervals (scipy's bootstrap), from the raw samples.

Speed-ups of GQ over a baseline pair the two methods' samples by timing round (the runner alternates
compared methods round by round, so a round's two samples saw the same machine state); comparisons
of two runs (two commits, two machines) resample each run's samples independently.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..define.case import MATCH, QUAD_METHODS

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
    # Results from before paired rounds: repeats were not taken side by side, so resample independently.
    paired = "round" in ok and ok["round"].notna().all()
    ok = _with_totals(ok)
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


def compare_samples(now: pd.DataFrame, base: pd.DataFrame, threshold: float = 0.1, *,
                    absolute: bool = False) -> pd.DataFrame:  # fmt: skip
    """Cases in both runs (same case_id): now/base ratios of the median total (forward + backward) and
    backward times, with 95% intervals (each run resampled on its own).

    A GQ case whose comparison group has baselines is judged relative to them (`rel_*`, basis
    "baselines"): each round's GQ time over the geometric mean of the baselines' times in that round,
    now over base. A machine's speed drifts 20-30% between two runs of one commit minutes apart on a
    shared 2-core VM; the baselines timed beside GQ drift with it, so the relative ratio shows GQ's own
    change (a change that slows every method alike is not GQ's). Other cases (basis "absolute") and every
    case with `absolute=True` are judged on the raw ratio; baselines are shown but judged only then
    (basis "baseline", verdict "-").

    Verdict "regression" only when the interval lies wholly above 1 + threshold, "improvement" wholly
    below 1 / (1 + threshold), else "same" (within the threshold, or not distinguishable from it)."""
    rows = []
    now, base = (_with_totals(d[d["status"] == "ok"]) for d in (now, base))
    rel_now, rel_base = _relative_to_baselines(now), _relative_to_baselines(base)
    base_by = dict(tuple(base.groupby("case_id")))
    for cid, a in now.groupby("case_id", sort=False):
        b = base_by.get(cid)
        if b is None:
            continue
        row = dict(case_id=cid, label=a["label"].iloc[0], method=a["method"].iloc[0], problem=a["problem"].iloc[0],
                   width=a["width"].iloc[0], rtol=a["rtol"].iloc[0], device=a["device"].iloc[0])  # fmt: skip
        for m, name in (("total_s", "total"), ("bwd_s", "bwd")):
            r, lo, hi = ratio_ci(a[m], b[m], paired=False)
            row.update({f"ratio_{name}": r, f"{name}_lo": lo, f"{name}_hi": hi})
        x, y = rel_now.get(cid), rel_base.get(cid)
        row.update(rel_total=np.nan, rel_lo=np.nan, rel_hi=np.nan)
        if x is not None and y is not None:
            row["rel_total"], row["rel_lo"], row["rel_hi"] = ratio_ci(x, y, paired=False)
        if absolute or (row["method"] in QUAD_METHODS and np.isnan(row["rel_total"])):
            row["basis"], point, lo, hi = "absolute", row["ratio_total"], row["total_lo"], row["total_hi"]
        elif row["method"] in QUAD_METHODS:
            row["basis"], point, lo, hi = "baselines", row["rel_total"], row["rel_lo"], row["rel_hi"]
        else:
            row["basis"], row["verdict"] = "baseline", "-"
            rows.append(row)
            continue
        if np.isnan(lo):  # too few samples for an interval: the point estimate decides
            lo = hi = point
        row["verdict"] = "regression" if lo > 1 + threshold else "improvement" if hi < 1 / (1 + threshold) else "same"
        rows.append(row)
    return pd.DataFrame(rows)


def machine_factor(cmp: pd.DataFrame) -> float:
    """The median now/base total-time ratio of the baseline methods: how much slower (> 1) the machine
    ran the unchanged code in `now`; NaN when no baseline was compared."""
    base = cmp[~cmp["method"].isin(QUAD_METHODS)] if not cmp.empty else cmp
    return float(base["ratio_total"].median()) if len(base) else float("nan")


def _with_totals(d: pd.DataFrame) -> pd.DataFrame:
    """`total_s` (forward + backward), and `round` from `repeat` where rounds were not recorded."""
    d = d.copy()
    d["total_s"] = d["fwd_s"] + d["bwd_s"]
    if "round" not in d or d["round"].isna().any():  # results from before paired rounds
        d["round"] = d["repeat"]
    return d


def _relative_to_baselines(d: pd.DataFrame) -> dict[str, np.ndarray]:
    """{GQ case_id: per-round total time / geometric mean of its group's baselines' in that round}."""
    out = {}
    key = [c for c in MATCH if c in d]
    for _, grp in d.groupby(key, dropna=False, sort=False):
        is_gq = grp["method"].isin(QUAD_METHODS)
        if is_gq.all() or not is_gq.any():
            continue
        base = grp[~is_gq].pivot_table(index="round", columns="case_id", values="total_s", aggfunc="first")
        yard = np.exp(np.log(base.dropna()).mean(axis=1))  # rounds where every baseline has a sample
        for cid, g in grp[is_gq].groupby("case_id"):
            t = g.set_index("round")["total_s"]
            rounds = t.index.intersection(yard.index)
            if len(rounds):
                out[cid] = (t.loc[rounds] / yard.loc[rounds]).to_numpy()
    return out
