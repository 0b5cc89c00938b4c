"""Speed-ups and run comparisons with bootstrap intervals: known samples in, known verdicts out."""

import numpy as np
import pandas as pd
import pytest

from gqbench import Case
from gqbench.cli import main
from gqbench.results.ratios import compare_samples, machine_factor, paired_speedups, ratio_ci


def rows(method, times, *, drift=None, width=100, **case_kw):
    case = Case(method, "workload_l", width, 200, rtol=1e-3, atol=1e-3, **case_kw)
    drift = np.ones(len(times)) if drift is None else drift
    return [
        dict(
            case.to_dict(),
            case_id=case.case_id,
            label=case.label,
            repeat=r,
            round=r,
            fwd_s=0.1 * t * d,
            bwd_s=t * d,
            status="ok",
            error="",
        )  # fmt: skip
        for r, (t, d) in enumerate(zip(times, drift))
    ]


def test_ratio_ci_calls_scipy_bootstrap_and_brackets_the_median_ratio():
    rng = np.random.default_rng(0)
    a, b = 2 + 0.05 * rng.standard_normal(9), 1 + 0.02 * rng.standard_normal(9)
    point, lo, hi, *_ = ratio_ci(a, b, paired=True)
    assert lo < point < hi and 1.85 < lo and hi < 2.15
    assert np.isnan(ratio_ci(a[:2], b[:2], paired=True)[1])  # no interval from two samples


def test_paired_rounds_cancel_drift():
    """A machine slowing down 3x over the run: paired by round, GQ's 2x speed-up keeps a tight interval."""
    drift = np.linspace(1, 3, 7)
    df = pd.DataFrame(
        rows("torch_direct", [2.0] * 7, drift=drift)
        + rows("torch_gq", [1.0] * 7, drift=drift * (1 + 0.01 * np.sin(np.arange(7))), quadrature="adaptive")
    )
    sp = paired_speedups(df)
    (r,) = sp.itertuples()
    assert r.gq == "torch_gq[adaptive]" and r.baseline == "torch_direct" and r.rounds == 7
    assert r.speedup_bwd == pytest.approx(2.0, rel=0.02) and 1.9 < r.bwd_lo <= r.bwd_hi < 2.1
    assert not r.bwd_includes_one


def test_speedup_interval_flags_no_difference():
    rng = np.random.default_rng(1)
    df = pd.DataFrame(
        rows("torch_adjoint", list(1 + 0.2 * rng.standard_normal(6)))
        + rows("torch_gq", list(1 + 0.2 * rng.standard_normal(6)), gtol=0.1, quadrature="gtol")
    )
    (r,) = paired_speedups(df).itertuples()
    assert r.bwd_lo < 1 < r.bwd_hi and r.bwd_includes_one


def test_compare_flags_regressions_only_beyond_the_threshold(tmp_path):
    base = pd.DataFrame(rows("torch_gq", [1.0, 1.01, 0.99, 1.0, 1.02], quadrature="adaptive"))
    slower = pd.DataFrame(rows("torch_gq", [1.3, 1.31, 1.29, 1.3, 1.32], quadrature="adaptive"))
    noisy = pd.DataFrame(rows("torch_gq", [0.8, 1.4, 1.0, 1.2, 0.9], quadrature="adaptive"))
    assert compare_samples(slower, base)["verdict"].tolist() == ["regression"]
    assert compare_samples(noisy, base)["verdict"].tolist() == ["same"]  # the interval includes 1.1
    assert compare_samples(base, slower)["verdict"].tolist() == ["improvement"]
    for name, df in (("base", base), ("slower", slower), ("same", base)):
        (tmp_path / name).mkdir()
        df.to_parquet(tmp_path / name / "results.parquet")
    assert main(["compare", str(tmp_path / "slower"), str(tmp_path / "base")]) == 1
    assert main(["compare", str(tmp_path / "same"), str(tmp_path / "base")]) == 0
    assert main(["compare", str(tmp_path / "slower"), str(tmp_path / "base"), "--threshold", "0.5"]) == 0
    assert main(["compare", str(tmp_path / "slower"), str(tmp_path / "base"), "--threshold", "-1"]) == 2


def test_compare_judges_gq_relative_to_the_baselines_timed_beside_it(tmp_path):
    """The machine 30% slower in the new run (every method alike): no GQ regression, unless raw times
    are asked for; GQ alone 30% slower beside an unchanged baseline: a regression either way."""
    noise = [1.0, 1.01, 0.99, 1.0, 1.02, 0.98]
    gq = dict(quadrature="adaptive")
    base = pd.DataFrame(rows("torch_direct", noise) + rows("torch_gq", [0.5 * t for t in noise], **gq))
    drift = pd.DataFrame(rows("torch_direct", noise, drift=[1.3] * 6) + rows("torch_gq", [0.5 * t for t in noise],
                                                                               drift=[1.3] * 6, **gq))  # fmt: skip
    gq_slower = pd.DataFrame(rows("torch_direct", noise) + rows("torch_gq", [0.65 * t for t in noise], **gq))
    verdicts = lambda now, **kw: dict(zip(*compare_samples(now, base, **kw)[["method", "verdict"]].T.values))  # noqa: E731
    assert verdicts(drift) == {"torch_direct": "-", "torch_gq": "same"}
    assert verdicts(drift, absolute=True) == {"torch_direct": "regression", "torch_gq": "regression"}
    assert verdicts(gq_slower) == {"torch_direct": "-", "torch_gq": "regression"}
    cmp = compare_samples(drift, base)
    assert cmp.loc[cmp["method"] == "torch_gq", "rel_total"].item() == pytest.approx(1.0)
    assert machine_factor(cmp) == pytest.approx(1.3)
    for name, df in (("base", base), ("drift", drift), ("gq_slower", gq_slower)):
        (tmp_path / name).mkdir()
        df.to_parquet(tmp_path / name / "results.parquet")
    assert main(["compare", str(tmp_path / "drift"), str(tmp_path / "base")]) == 0
    assert main(["compare", str(tmp_path / "drift"), str(tmp_path / "base"), "--absolute"]) == 1
    assert main(["compare", str(tmp_path / "gq_slower"), str(tmp_path / "base")]) == 1


def test_alternate_against_exits_1_only_beyond_the_tolerance(capsys):
    """benchmarks/alternate.py --against: speed-up 2.0 in both protocols agrees; 2.0 against 1.6
    (25% apart, intervals disjoint) does not, and says so."""
    from benchmarks.alternate import agreement

    noise = [1.0, 1.01, 0.99, 1.0, 1.02, 0.98, 1.0]
    gq = dict(quadrature="adaptive")
    run = pd.DataFrame(rows("torch_direct", noise) + rows("torch_gq", [0.5 * t for t in noise], **gq))
    alt_same = pd.DataFrame(rows("torch_direct", noise[::-1]) + rows("torch_gq", [0.5 * t for t in noise[::-1]], **gq))
    alt_off = pd.DataFrame(rows("torch_direct", noise) + rows("torch_gq", [0.625 * t for t in noise], **gq))
    assert agreement(alt_same, run, 0.10) == 0
    assert "agree);" in capsys.readouterr().out
    assert agreement(alt_off, run, 0.10) == 1
    out = capsys.readouterr().out
    assert "DISAGREE" in out and "apart: bwd, total" in out and "+25%" in out
    assert agreement(alt_off, run, 0.30) == 0


def test_printed_speedups_keep_the_labels(capsys):
    """`gqbench run`'s closing table names the GQ setting (rich would eat "[adaptive]" as markup)."""
    from gqbench.cli import _print_speedups

    df = pd.DataFrame(rows("torch_direct", [2.0] * 5) + rows("torch_gq", [1.0] * 5, quadrature="adaptive"))
    _print_speedups(df)
    out = capsys.readouterr().out
    assert "torch_gq[adaptive]" in out and "2.00x" in out and "torch_gq[adaptive] (uncertified)" not in out


def test_printed_speedups_mark_uncertified_gq_and_trained_weights(capsys):
    """A GQ gradient that warned is marked in the closing table; trained-state rows say at which weights."""
    from gqbench.cli import _print_speedups

    warned = [dict(r, certified=False) for r in rows("torch_gq", [1.0] * 5, quadrature="adaptive", train_steps=40)]
    initial = rows("torch_direct", [2.0] * 5) + rows("torch_gq", [1.0] * 5, quadrature="adaptive")
    df = pd.DataFrame(rows("torch_direct", [2.0] * 5, train_steps=40) + warned + initial)
    _print_speedups(df)
    out = capsys.readouterr().out
    assert out.count("torch_gq[adaptive] (uncertified)") == 1 and "step 40" in out and "initial" in out


def test_paired_ratio_is_the_median_of_per_round_ratios():
    """Paired: the statistic is median(base_r / gq_r) over rounds (here 1.5), not median(base) / median(gq) (1.0)."""
    base, gq = [1.0, 2.0, 3.0, 2.5, 0.5], [3.0, 1.0, 2.0, 2.0, 1.0]
    assert ratio_ci(base, gq, paired=True)[0] == pytest.approx(np.median(np.divide(base, gq)))
    assert ratio_ci(base, gq, paired=False)[0] == pytest.approx(1.0)


def test_verdict_sentences_and_columns_from_known_speedups():
    """The report's first screen: speed-ups below 1 read as slow-downs, all-unsure ones as no clear
    difference; columns in a fixed order whatever problem comes first."""
    from gqbench.report.figures import summarize
    from gqbench.report.verdict import sentences, verdict_table
    from gqbench.results.tables import frame

    rng = np.random.default_rng(2)
    data = []
    for w in (100, 1000):  # workload_l: GQ 4x faster than the adjoint, 2x slower than direct backprop
        data += rows("torch_adjoint", [4.0] * 5, width=w) + rows("torch_direct", [0.5] * 5, width=w)
        data += rows("torch_gq", [1.0] * 5, width=w, quadrature="adaptive")
    for r in data:
        r.update(grad_rel_err=1e-6, peak_mem_bytes=2**20)
    noisy = [
        dict(r, problem="g1d", case_id=r["case_id"] + "g")
        for r in rows("torch_direct", list(1 + 0.3 * rng.standard_normal(6)))
    ]
    noisy += [dict(r, problem="g1d", case_id=r["case_id"] + "g")
              for r in rows("torch_gq", list(1 + 0.3 * rng.standard_normal(6)), quadrature="adaptive")]  # fmt: skip
    df = frame(data + noisy)
    summary = summarize(df)
    text = " ".join(sentences(df, summary))
    assert "4x faster than torch_adjoint at w = 100-1000" in text
    assert "2x slower than torch_direct at w = 100-1000" in text
    assert "not clearly different from torch_direct at w = 100" in text  # g1d
    cols = list(verdict_table(df, summary).columns)
    assert cols[:5] == ["problem", "width", "rtol", "fastest (within reach)", "GQ"]
    assert cols[5:7] == ["GQ vs torch_direct", "GQ vs torch_adjoint"]  # g1d (no adjoint) sorts first


# ----------------------------------------------------------------------------- intervals over processes


def _processes_run(rng, *, speedup=2.0, between=0.08, within=0.02, processes=6, rounds=4, **case_kw):
    """A run whose baseline's times carry a per-process offset (log-normal, SD `between`) that every
    round of that process shares, plus per-round noise (`within`): what a process's heap history does."""
    out = []
    for p in range(processes):
        offset = np.exp(between * rng.standard_normal())
        base = offset * np.exp(within * rng.standard_normal(rounds))
        gq = np.exp(within * rng.standard_normal(rounds)) / speedup
        for method, t, kw in (("torch_adjoint", base, {}), ("torch_gq", gq, dict(quadrature="adaptive"))):
            for r in rows(method, list(t), **kw, **case_kw):
                out.append(dict(r, process=p, round=r["round"] + p * rounds, repeat=r["repeat"] + p * rounds))
    return pd.DataFrame(out)


def test_interval_over_processes_covers_a_rerun_and_one_over_rounds_does_not():
    """Simulated runs of 6 processes x 4 rounds with a between-process spread 4x the within: the
    interval over processes covers the true speed-up in ~95% of runs (and the next run's point in
    most); one over 11 rounds of one process (what the suite printed before) in far fewer."""
    rng = np.random.default_rng(19)
    over_proc = over_rounds = caught = 0
    n = 200
    prev = None
    for _ in range(n):
        df = _processes_run(rng)
        (r,) = paired_speedups(df).itertuples()
        assert r.processes == 6 and r.rounds == 24 and r.covers == "6 processes x 4 rounds"
        over_proc += r.bwd_lo <= 2.0 <= r.bwd_hi
        (one,) = paired_speedups(_processes_run(rng, processes=1, rounds=11)).itertuples()
        over_rounds += one.bwd_lo <= 2.0 <= one.bwd_hi
        if prev is not None:
            caught += prev[0] <= r.speedup_bwd <= prev[1]
        prev = (r.bwd_lo, r.bwd_hi)
    assert 0.90 * n <= over_proc <= 0.99 * n, over_proc
    assert over_rounds < 0.6 * n, over_rounds
    assert caught > 0.75 * (n - 1), caught


def test_speedup_over_processes_is_the_geometric_mean_of_their_medians():
    rng = np.random.default_rng(3)
    df = _processes_run(rng, processes=3, rounds=5)
    (r,) = paired_speedups(df).itertuples()
    per = []
    for _, g in df.groupby("process"):
        b, q = (g[g.method == m].sort_values("round")["bwd_s"].to_numpy() for m in ("torch_adjoint", "torch_gq"))
        per.append(np.median(b / q))
    assert r.bwd_per_process == pytest.approx(tuple(per))
    assert r.speedup_bwd == pytest.approx(np.exp(np.mean(np.log(per))))
    assert r.bwd_lo < r.speedup_bwd < r.bwd_hi and r.covers == "3 processes x 5 rounds"


def test_results_from_one_process_keep_the_interval_over_rounds():
    """Old results (no `process` column) and one-process runs: a bootstrap over rounds, said so."""
    gq = rows("torch_gq", [1.0] * 5, quadrature="adaptive")
    df = pd.DataFrame(rows("torch_direct", [2.0, 2.1, 1.9, 2.0, 2.05]) + gq)
    (r,) = paired_speedups(df).itertuples()
    assert r.processes == 1 and r.covers == "5 rounds of one process" and r.speedup_bwd == pytest.approx(2.0)
    assert r.bwd_lo < 2.0 < r.bwd_hi


def test_compare_over_processes_welch():
    """Two runs of one commit whose processes scatter alike: `same`; GQ 30% slower in every process of
    the new run: a regression. The interval is Welch's t over the two runs' processes."""
    a, b = _processes_run(np.random.default_rng(1)), _processes_run(np.random.default_rng(2))
    slow = _processes_run(np.random.default_rng(1), speedup=2.0 / 1.3)
    cmp = compare_samples(a, b)
    assert cmp.set_index("method")["verdict"].to_dict() == {"torch_adjoint": "-", "torch_gq": "same"}
    assert compare_samples(slow, b).set_index("method").loc["torch_gq", "verdict"] == "regression"
    point, lo, hi, clusters, per = ratio_ci(a["bwd_s"], b["bwd_s"], paired=False, clusters=a["process"],
                                            clusters_den=b["process"])  # fmt: skip
    assert clusters == 6 and len(per) == 6 and lo < point < hi


def test_training_ratios_are_over_seeds_when_there_are_several():
    """Epoch times of two seeds (GQ 0.5x the baseline in both, the seeds 20% apart): the interval is
    over the seeds, each seed's ratio of medians; one seed: over its epochs."""
    gq = np.array([0.5, 0.51, 0.49, 0.6, 0.61, 0.59])
    base = np.array([1.0, 1.02, 0.98, 1.2, 1.22, 1.18, 1.19])
    seeds_gq, seeds_base = np.array([0, 0, 0, 1, 1, 1]), np.array([0, 0, 0, 1, 1, 1, 1])
    r = ratio_ci(gq, base, paired=False, clusters=seeds_gq, clusters_den=seeds_base, matched=True, min_samples=2)
    assert r.clusters == 2 and r.per_cluster == pytest.approx((0.5, 0.6 / 1.195))
    one = ratio_ci(gq[:3], base[:3], paired=False, clusters=seeds_gq[:3], clusters_den=seeds_base[:3], matched=True)
    assert one.clusters == 1 and one.point == pytest.approx(0.5)


def test_rerun_check_passes_two_runs_of_one_code_and_fails_a_shifted_one(tmp_path, capsys):
    """benchmarks/rerun.py's pair check: two simulated runs of the same code (processes scattering
    alike) pass; a second run with GQ 30% slower in every process has disjoint intervals and fails."""
    from benchmarks.rerun import check_pair

    runs = {"run1": _processes_run(np.random.default_rng(1)), "run2": _processes_run(np.random.default_rng(2)),
            "slow": _processes_run(np.random.default_rng(2), speedup=2.0 / 1.3)}  # fmt: skip
    for name, df in runs.items():
        (tmp_path / name).mkdir()
        df.to_parquet(tmp_path / name / "results.parquet")
    assert check_pair(tmp_path / "run1", tmp_path / "run2", min_inside=1)
    out = capsys.readouterr().out
    assert "6x4" in out and "PASS" in out and "disjoint pairs 0" in out
    assert not check_pair(tmp_path / "run1", tmp_path / "slow", min_inside=1)
    assert "disjoint pairs 1" in capsys.readouterr().out
