"""Ratios of times with 95% confidence intervals, from the raw samples: one estimator for every
interval the suite prints (the run's speed-up table, the report's verdict and heatmaps, `gqbench
compare`, `benchmarks/alternate.py`, training's per-epoch ratios).

Where the samples come from several processes (or training seeds), the interval is taken over them:
each process's median (of its per-round ratios when paired) is one observation, and the interval is
Student's t on their logs (`scipy.stats.ttest_1samp`, or Welch's `ttest_ind` for two runs' processes).
A process's heap history shifts its times by up to ~20% on CPU, so rounds within one process share an
offset that a rerun (a new process) does not; an interval over rounds alone cannot see it and missed
the rerun's point in 6-7 of 10 speed-ups (issue 19). Why t and not a bootstrap over processes: with
the few processes a run can afford (3-8), a percentile bootstrap has few distinct resamples (35 for
4) and its interval is sqrt((n-1)/n) * z / t(n-1) as wide as it should be (54% at n = 4); the
t interval on cluster summaries is the textbook estimator for few, equal clusters and covers what it
says (tests/test_ratios.py checks its coverage on simulated processes). The within-process spread is
inside each process's median, so it is counted too.

With samples from one process only (old results, `processes = 1`), the interval is scipy's bootstrap
over its rounds (paired: the median of per-round ratios), and says so: it covers the rounds, not a
rerun.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd

from ..define.case import MATCH, QUAD_METHODS

LEVEL = 0.95
RESAMPLES = 2000


class Ratio(NamedTuple):
    """A ratio, its 95% interval, what the interval is taken over and each process's own value."""

    point: float
    lo: float
    hi: float
    clusters: int  # processes (or seeds) the interval is over; 1: over the samples of one
    per_cluster: tuple[float, ...]  # each process's median ratio (one entry when clusters == 1)


def _median_ratio(a, b, axis=-1):
    return np.median(a, axis=axis) / np.median(b, axis=axis)


def _median_of_ratios(a, b, axis=-1):
    return np.median(a / b, axis=axis)


def ratio_ci(num, den, *, paired: bool, clusters=None, clusters_den=None, matched: bool = False, seed: int = 0,
             min_samples: int = 3) -> Ratio:  # fmt: skip
    """The ratio num/den and its 95% interval.

    `clusters` (one label per sample of `num`: the process, or the training seed; `clusters_den` the
    same for `den` when unpaired): with two or more, the interval is over them, each contributing one
    value. Paired (num[i], den[i] timed in the same round): each process's median of its per-round
    ratios; unpaired and `matched` (a label is the same unit on both sides, e.g. a training seed):
    median(num) / median(den) per label; unpaired otherwise (two runs' independent processes): each
    side's per-process medians and Welch's t on the difference of their mean logs. The point is the
    geometric mean of the per-process values.

    Without clusters (or with one): scipy's bootstrap over the samples (percentile method), NaN bounds
    with fewer than `min_samples` a side. Paired: the median of per-round ratios, so a slow spell that
    hits a whole round cancels; unpaired: median(num) / median(den)."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    if clusters is not None:
        cn = np.asarray(clusters)
        cd = cn if paired else np.asarray(clusters_den)
        got = _over_clusters(num, den, cn, cd, paired=paired, matched=matched)
        if got is not None:
            return got
    return _over_samples(num, den, paired=paired, seed=seed, min_samples=min_samples)


def _over_samples(num, den, *, paired: bool, seed: int, min_samples: int) -> Ratio:
    from scipy.stats import bootstrap

    stat = _median_of_ratios if paired else _median_ratio
    point = float(stat(num, den))
    if min(len(num), len(den)) < min_samples:
        return Ratio(point, float("nan"), float("nan"), 1, (point,))
    if (np.ptp(num / den) == 0) if paired else (np.ptp(num) == 0 and np.ptp(den) == 0):
        return Ratio(point, point, point, 1, (point,))
    res = bootstrap((num, den), stat, paired=paired, vectorized=True, n_resamples=RESAMPLES,
                    confidence_level=LEVEL, method="percentile", rng=np.random.default_rng(seed))  # fmt: skip
    return Ratio(point, float(res.confidence_interval.low), float(res.confidence_interval.high), 1, (point,))


def _over_clusters(num, den, cn, cd, *, paired: bool, matched: bool) -> Ratio | None:
    """The t interval over processes; None with fewer than two (a side), to fall back to the samples."""
    from scipy import stats

    if paired or matched:
        labels = np.intersect1d(cn, cd)
        if paired:
            logs = np.log([np.median(num[cn == c] / den[cd == c]) for c in labels])
        else:
            logs = np.log([np.median(num[cn == c]) / np.median(den[cd == c]) for c in labels])
        if len(logs) < 2:
            return None
        point, per = float(np.exp(logs.mean())), tuple(float(x) for x in np.exp(logs))
        if np.ptp(logs) == 0:
            return Ratio(point, point, point, len(per), per)
        ci = stats.ttest_1samp(logs, 0.0).confidence_interval(LEVEL)
    else:
        a = np.log([np.median(num[cn == c]) for c in np.unique(cn)])
        b = np.log([np.median(den[cd == c]) for c in np.unique(cd)])
        if min(len(a), len(b)) < 2:
            return None
        point, per = float(np.exp(a.mean() - b.mean())), tuple(float(x) for x in np.exp(a - b.mean()))
        if np.ptp(a) == 0 and np.ptp(b) == 0:
            return Ratio(point, point, point, len(per), per)
        ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(LEVEL)
    return Ratio(point, float(np.exp(ci.low)), float(np.exp(ci.high)), len(per), per)


def covers(processes: int, rounds: int, unit: str = "processes") -> str:
    """What an interval is taken over, in words (the console and the report say it)."""
    r = f"{rounds} round{'s' if rounds != 1 else ''}"
    return f"{processes} {unit} x {r}" if processes >= 2 else f"{r} of one process"


def per_round_speedups(df: pd.DataFrame, gq_methods: tuple[str, ...] = QUAD_METHODS) -> pd.DataFrame:
    """One row per GQ method x baseline of its comparison group x paired round: the group's MATCH
    fields, `gq`, `baseline`, `process`, `round`, both methods' `*_bwd_s`/`*_total_s` and the speed-ups
    `bwd`, `total` (baseline time / GQ time). Results from before paired rounds pair by repeat."""
    cols = [*MATCH, "gq", "baseline", "process", "round", "base_bwd_s", "gq_bwd_s", "base_total_s", "gq_total_s",
            "bwd", "total"]  # fmt: skip
    ok = df[df["status"] == "ok"]
    if ok.empty:
        return pd.DataFrame(columns=cols)
    ok = _with_totals(ok)
    is_gq = ok["method"].isin(gq_methods)
    key = [c for c in MATCH if c in ok]
    out = []
    for _, grp in ok.groupby(key, dropna=False, sort=True):
        by_label = {lab: g.set_index("round") for lab, g in grp.groupby("label")}
        head = {c: grp.iloc[0][c] for c in key}
        for g_lab in sorted(grp.loc[is_gq.loc[grp.index], "label"].unique()):
            for b_lab in sorted(grp.loc[~is_gq.loc[grp.index], "label"].unique()):
                g, b = by_label[g_lab], by_label[b_lab]
                rounds = g.index.intersection(b.index)
                g, b = g.loc[rounds], b.loc[rounds]
                out.append(pd.DataFrame(dict(head, gq=g_lab, baseline=b_lab, process=g["process"].to_numpy(),
                                             round=rounds, base_bwd_s=b["bwd_s"].to_numpy(),
                                             gq_bwd_s=g["bwd_s"].to_numpy(), base_total_s=b["total_s"].to_numpy(),
                                             gq_total_s=g["total_s"].to_numpy())))  # fmt: skip
    if not out:
        return pd.DataFrame(columns=cols)
    out = pd.concat(out, ignore_index=True)
    out["bwd"], out["total"] = out["base_bwd_s"] / out["gq_bwd_s"], out["base_total_s"] / out["gq_total_s"]
    return out[[c for c in cols if c in out]]


def paired_speedups(df: pd.DataFrame, gq_methods: tuple[str, ...] = QUAD_METHODS) -> pd.DataFrame:
    """GQ's speed-up over every baseline of its comparison group: baseline time / GQ time, backward
    and whole step (forward + backward), with its 95% interval (`ratio_ci`, paired by round): over
    processes when the cases ran in several (`processes`), else over the rounds of one.
    `covers`: what the interval is over, in words; `*_per_process`: each process's median speed-up;
    `rounds`: paired rounds in all; `*_includes_one`: the interval does not exclude "no difference".
    `gq_methods`: the methods whose speed-up is wanted (every other method of a group is a baseline)."""
    cols = [*MATCH, "gq", "baseline", "processes", "rounds", "covers", "speedup_bwd", "bwd_lo", "bwd_hi",
            "speedup_total", "total_lo", "total_hi", "bwd_includes_one", "total_includes_one", "bwd_per_process",
            "total_per_process"]  # fmt: skip
    ok = df[df["status"] == "ok"] if "status" in df else df
    # Results from before paired rounds: repeats were not taken side by side, so resample independently.
    paired = "round" in ok and ok["round"].notna().all()
    per = per_round_speedups(df, gq_methods)
    if per.empty:
        return pd.DataFrame(columns=cols)
    key = [c for c in MATCH if c in per]
    out = []
    for (*head, g_lab, b_lab), g in per.groupby([*key, "gq", "baseline"], dropna=False, sort=True):
        n_proc = g["process"].nunique()
        row = dict(zip(key, head, strict=True), gq=g_lab, baseline=b_lab, processes=n_proc, rounds=len(g),
                   covers=covers(n_proc, round(len(g) / n_proc)))  # fmt: skip
        for name in ("bwd", "total"):
            r = ratio_ci(g[f"base_{name}_s"], g[f"gq_{name}_s"], paired=paired, clusters=g["process"],
                         clusters_den=g["process"], matched=True)  # fmt: skip
            row.update({f"speedup_{name}": r.point, f"{name}_lo": r.lo, f"{name}_hi": r.hi,
                        f"{name}_includes_one": bool(not (r.lo > 1 or r.hi < 1)),
                        f"{name}_per_process": r.per_cluster})  # fmt: skip
        out.append(row)
    return pd.DataFrame(out, columns=cols)


def compare_samples(now: pd.DataFrame, base: pd.DataFrame, threshold: float = 0.1, *,
                    absolute: bool = False) -> pd.DataFrame:  # fmt: skip
    """Cases in both runs (same case_id): now/base ratios of the median total (forward + backward) and
    backward times, with 95% intervals (`ratio_ci`: Welch's t over the two runs' processes when both
    ran their cases in several, else each run's rounds resampled on their own).

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
            r, lo, hi, *_ = ratio_ci(a[m], b[m], paired=False, clusters=a["process"], clusters_den=b["process"])
            row.update({f"ratio_{name}": r, f"{name}_lo": lo, f"{name}_hi": hi})
        x, y = rel_now.get(cid), rel_base.get(cid)
        row.update(rel_total=np.nan, rel_lo=np.nan, rel_hi=np.nan)
        if x is not None and y is not None:
            rel = ratio_ci(x["rel"], y["rel"], paired=False, clusters=x["process"], clusters_den=y["process"])
            row["rel_total"], row["rel_lo"], row["rel_hi"] = rel.point, rel.lo, rel.hi
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
    """`total_s` (forward + backward), `round` from `repeat` where rounds were not recorded, `process`
    0 where processes were not."""
    d = d.copy()
    d["total_s"] = d["fwd_s"] + d["bwd_s"]
    if "round" not in d or d["round"].isna().any():  # results from before paired rounds
        d["round"] = d["repeat"]
    if "process" not in d:  # results from before several processes per case: one
        d["process"] = 0
    d["process"] = d["process"].fillna(0).astype(int)
    return d


def _relative_to_baselines(d: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """{GQ case_id: per round, `rel` = its total time / the geometric mean of its group's baselines' in
    that round, and the round's `process`}."""
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
                proc = g.set_index("round").loc[rounds, "process"].to_numpy()
                out[cid] = pd.DataFrame(dict(rel=(t.loc[rounds] / yard.loc[rounds]).to_numpy(), process=proc))
    return out
