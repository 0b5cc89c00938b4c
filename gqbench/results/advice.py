"""Which gradient method to use: per comparison point, the fastest method whose gradient is within reach of
the tolerance, and its speed-up over every other method with a 95% interval (`gqbench advise`, the report's
verdict).

"Within reach": relative gradient error <= REACH x max(rtol, the best error any method reached there).
What an accurate gradient's error is at a tolerance varies by problem: measured with `gqbench.measure`
(float64, dopri5, widths 16-32), direct backprop and the adjoint were 0.002-36x rtol off the
reference on workload_l, spheres, sines, forced_mlp and examples/spiral.py at rtol 1e-3, 1e-4 and 1e-6,
and 400-9000x on oscillator and vanderpol at 1e-3/1e-4 (long horizons amplify the local errors). So:
10x rtol admits the spread among methods that are as accurate as the tolerance allows (the adjoint and
direct backprop differed by up to 30x), and where even the best method misses rtol by far, the best
error reached sets the bar instead. What it rejects is a different class of accuracy: the paper's gtol
rule on long oscillating intervals (20-250x the adjoint's error), a 1-node rule (~1e-3 where others
reach 1e-6). The report's verdict uses the same rule.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..define.case import MATCH
from .ratios import _with_totals, paired_speedups
from .tables import all_certified

REACH = 10.0
_RECOMMENDED = "<recommended>"  # a method name no registered method has
COLUMNS = [
    "label", "method", "status", "recommended", "within_reach", "certified", "clearly_slower", "total_s", "bwd_s",
    "speedup", "speedup_lo", "speedup_hi", "speedup_bwd", "speedup_bwd_lo", "speedup_bwd_hi", "grad_rel_err",
    "peak_mem_mib", "nfe_fwd", "nfe_bwd", "rounds", "error",
]  # fmt: skip


def reach(rtol: float, errors) -> float:
    """The largest gradient error that counts as accurate at `rtol`, given the errors methods reached."""
    errors = np.asarray(errors, dtype=float)
    best = np.nanmin(errors) if np.isfinite(errors).any() else np.nan
    return REACH * max(rtol, best) if best == best else np.inf


def advice_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per method setting (`label`) at each comparison point of `df` (a results table): its status,
    median forward + backward and backward seconds, gradient error, peak memory, NFE, whether it is within
    reach, which one is `recommended` (the fastest within reach), and the recommended one's speed-up over it
    (its time / the recommended one's, with `ratios.paired_speedups`' 95% interval: over processes when the
    cases ran in several, else a bootstrap over the paired rounds of one, NaN bounds with fewer than 3 rounds;
    `clearly_slower`: the interval lies above 1). Training runs are left out. Rows: each
    point's recommendation first, then the others from fast to slow, then the failed ones."""
    if "epochs" in df:
        df = df[df["epochs"].isna()]
    key = [c for c in MATCH if c in df]
    out = []
    for point, g in df.groupby(key, dropna=False, sort=True):
        meta = dict(zip(key, point if isinstance(point, tuple) else (point,), strict=True))
        rows = _summary(g)
        ok = rows["status"] == "ok"
        limit = reach(meta["rtol"], rows.loc[ok, "grad_rel_err"])
        # A GQ gradient that warned it is not certified is never recommended, whatever its error here.
        rows["within_reach"] = (ok & (rows["grad_rel_err"].isna() | (rows["grad_rel_err"] <= limit))
                                & ~rows["certified"].eq(False).fillna(False))  # fmt: skip
        rows["recommended"] = False
        if rows["within_reach"].any():
            best = rows.loc[rows["within_reach"], "total_s"].idxmin()
            rows.loc[best, "recommended"] = True
            # The recommended setting as the one "GQ" method of the group: every other setting is its baseline.
            marked = g.assign(method=g["method"].where(g["label"] != best, _RECOMMENDED))
            sp = paired_speedups(marked, gq_methods=(_RECOMMENDED,)).set_index("baseline")
            pairs = {"speedup": "speedup_total", "speedup_lo": "total_lo", "speedup_hi": "total_hi",
                     "speedup_bwd": "speedup_bwd", "speedup_bwd_lo": "bwd_lo", "speedup_bwd_hi": "bwd_hi",
                     "rounds": "rounds"}  # fmt: skip
            for mine, theirs in pairs.items():
                rows.loc[sp.index, mine] = sp[theirs].astype(float)
            rows.loc[best, ["speedup", "speedup_lo", "speedup_hi"]] = 1.0
        rows["clearly_slower"] = rows["speedup_lo"] > 1  # the recommended one's advantage is not noise
        order = np.lexsort((rows["total_s"].fillna(np.inf), ~ok, ~rows["recommended"]))
        rows = rows.iloc[order].reset_index()
        for k, v in reversed(meta.items()):
            rows.insert(0, k, v)
        out.append(rows)
    if not out:
        return pd.DataFrame(columns=[*key, *COLUMNS])
    return pd.concat(out, ignore_index=True)[[*key, *COLUMNS]]


def _summary(g: pd.DataFrame) -> pd.DataFrame:
    """Per label: status and error of its case, medians of its samples."""
    g = _with_totals(g)
    first = g.groupby("label", sort=True).first()
    med = g.groupby("label", sort=True)[["total_s", "bwd_s", "nfe_fwd", "nfe_bwd"]].median()
    rows = pd.DataFrame(index=first.index)
    rows["method"] = first["method"]
    rows["status"] = first["status"]
    rows[["total_s", "bwd_s", "nfe_fwd", "nfe_bwd"]] = med
    rows["grad_rel_err"] = first["grad_rel_err"].astype(float)
    rows["peak_mem_mib"] = first["peak_mem_bytes"].astype(float) / 2**20
    rows["error"] = first["error"].fillna("")
    cert = g["certified"].astype("boolean") if "certified" in g else pd.Series(pd.NA, index=g.index, dtype="boolean")
    rows["certified"] = cert.groupby(g["label"], sort=True).agg(all_certified).astype("boolean")
    for col in ("speedup", "speedup_lo", "speedup_hi", "speedup_bwd", "speedup_bwd_lo", "speedup_bwd_hi", "rounds"):
        rows[col] = np.nan
    failed = rows["status"] != "ok"
    rows.loc[failed, ["total_s", "bwd_s"]] = np.nan
    return rows
