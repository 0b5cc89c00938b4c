"""Training mode (issue 11): the paper's experiments as cases, the epoch loop's fairness, failure rows,
kill -9 and resume, the toy gradient against its closed form, the claims' verdicts, the train-smoke preset."""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from gqbench import Case
from gqbench.define.experiments import G1D, ODE_METHODS, exact
from gqbench.define.grid import GridSpecError, load_preset, parse_spec
from gqbench.define.training_problems import TRAINING_PROBLEMS, AbstractTrainingProblem
from gqbench.training import claims as tc
from gqbench.training import run_problem
from gqbench.training.loop import run_case

pytest.importorskip("sklearn", reason="the train extra (scikit-learn) is not installed")


def _spec(**axes):
    return parse_spec({"axes": {"method": ["torch_gq"], **axes}})


@pytest.mark.parametrize(
    "axes, message",
    [
        (dict(problem=["mnist"]), "problem value 'mnist' is unknown; use one of"),
        (dict(problem=["images"], lr=[-0.01]), "lr value -0.01 must be a number > 0, e.g. lr = [1e-3]"),
        (dict(problem=["images"], epochs=[0]), "epochs value 0 must be an integer > 0"),
        (dict(problem=["workload_l"], lr=[0.1]), "lr does not apply to 'workload_l'"),
        (dict(problem=["images"], method=["jax_gq"]), "images trains torch_direct"),
    ],
)
def test_bad_training_specs_stop_with_one_line(axes, message):
    with pytest.raises(GridSpecError) as err:
        _spec(**axes)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_shared_names_train_only_when_epochs_are_given():
    (grad,) = _spec(problem=["g1d"]).cases
    assert grad.epochs is None and grad.lr is None
    (train,) = _spec(problem=["g1d"], epochs=[3]).cases
    assert (train.epochs, train.lr, train.width) == (3, 0.01, 32)
    (img,) = _spec(problem=["images"]).cases  # a training-only name: its default epochs and lr
    assert (img.epochs, img.lr, img.batch) == (15, 1e-3, 32)
    assert train.case_id != grad.case_id and Case.from_dict(train.to_dict()) == train


def test_every_experiment_implements_the_interface():
    for name in ("g1d", "spheres", "sines", "sines_irregular", "images", "toy_gradient"):
        p = TRAINING_PROBLEMS[name]
        assert isinstance(p, AbstractTrainingProblem) and set(ODE_METHODS) <= set(p.methods)
    assert TRAINING_PROBLEMS["g1d"].unsupported("sde_direct")


def _case(method, **kw):
    base = dict(method=method, problem="g1d", width=8, batch=32, rtol=1e-5, atol=1e-5, epochs=3, lr=0.01, threads=1)
    if method == "torch_gq":
        base.update(quadrature="adaptive", backward_state="backsolve", warm_start=False)
    return Case(**{**base, **kw})


def test_methods_start_alike_and_train_alike():
    """Same initial weights and data order: epoch 0 is identical, and methods with the same gradient stay close."""
    exp = TRAINING_PROBLEMS["g1d"]
    (d,), tables = run_case(exp, case=_case("torch_direct"))
    (g,), tables_gq = run_case(exp, case=_case("torch_gq"))
    ed, eg = tables["epochs"], tables_gq["epochs"]
    assert [r["epoch"] for r in ed] == [0, 1, 2, 3] and d["status"] == g["status"] == "ok"
    assert ed[0]["val_metric"] == eg[0]["val_metric"]
    for a, b in zip(ed[1:], eg[1:], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)
        assert a["nfe_bwd"] == 0 and b["nfe_bwd"] > 0 and a["nfe_fwd"] > 0
        assert a["epoch_s"] == pytest.approx(a["fwd_s"] + a["bwd_s"] + a["step_s"])
    assert d["val_metric"] == pytest.approx(g["val_metric"], rel=1e-3)
    assert ed[-1]["val_metric"] < ed[0]["val_metric"]  # it learns
    for row in ed:  # every epoch row carries the case fields
        assert row["case_id"] == _case("torch_direct").case_id and row["lr"] == 0.01


@dataclasses.dataclass(frozen=True)
class _Exploding(G1D):
    """g1d whose training loss turns NaN at its `bad_call`-th evaluation."""

    bad_call: int = 2
    calls: list = dataclasses.field(default_factory=list)

    def loss(self, *, pred, target):
        loss = super().loss(pred=pred, target=target)
        if torch.is_grad_enabled():
            self.calls.append(1)
            if len(self.calls) == self.bad_call:
                return loss * float("nan")
        return loss


def test_a_diverging_run_is_a_nan_row_and_keeps_its_epochs():
    exp = _Exploding("g1d", "", 8, 32, 5, 0.01)
    (row,), tables = run_case(exp, case=_case("torch_direct", epochs=5))
    assert row["status"] == "nan" and "epoch 2" in row["error"] and row["epochs_done"] == 1
    assert [r["epoch"] for r in tables["epochs"]] == [0, 1]


@pytest.mark.parametrize("method", ["torch_direct", "torch_adjoint", "torch_gq"])
def test_toy_gradient_matches_the_closed_form_and_tightens(method):
    toy = TRAINING_PROBLEMS["toy_gradient"]
    errs = {}
    for tol in (1e-4, 1e-9):
        case = _case(method, problem="toy_gradient", rtol=tol, atol=tol, dtype="float64", epochs=1, lr=None)
        (row,), tables = run_problem(toy, case=case)
        assert row["status"] == "ok" and [r["T"] for r in tables["toy_gradient"]] == list(toy.horizons)
        errs[tol] = max(r["grad_rel_err"] for r in tables["toy_gradient"])
        assert all(math.isfinite(r["err_T"]) for r in tables["toy_gradient"])  # dL/dT too
    assert errs[1e-9] < 1e-6 and errs[1e-9] < errs[1e-4]
    assert exact(2.0)["T"] == pytest.approx(2 * 0.2 * 100 * math.exp(0.8))


def _epochs_frame(gq_scale: float, seeds=(0, 1, 2), gq_metric_shift=0.0) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for method, label in (("torch_direct", "torch_direct"), ("torch_adjoint", "torch_adjoint"),
                          ("torch_gq", "torch_gq[adaptive]")):  # fmt: skip
        for width in (16, 64):
            for seed in seeds:
                base = (1.0 if method == "torch_gq" else 2.0) * width / 16
                for epoch in range(6):
                    scale = gq_scale if method == "torch_gq" else 1
                    t = 0.0 if epoch == 0 else base * scale * rng.uniform(0.95, 1.05)
                    metric = 0.9 + 0.01 * seed + (gq_metric_shift if method == "torch_gq" else 0)
                    rows.append(dict(problem="spheres", metric="accuracy", method=method, label=label, width=width,
                                     seed=seed, epoch=epoch, epoch_s=t, fwd_s=t / 2, bwd_s=t / 2, step_s=0.0,
                                     nfe_fwd=10, nfe_bwd=10, loss=1.0 / (epoch + 1), val_metric=metric,
                                     wall_s=t * epoch, peak_mem_bytes=1e6))  # fmt: skip
    return pd.DataFrame(rows)


def test_claims_verdicts_follow_the_data():
    def verdicts(df):
        t = tc.claims_table(df, None)
        return {c: t.loc[t["claim"].str.startswith(c), "verdict"].tolist() for c in ("GQ trains sig", "GQ reaches")}

    assert verdicts(_epochs_frame(1.0)) == {"GQ trains sig": ["confirmed"], "GQ reaches": ["confirmed"]}
    slow = verdicts(_epochs_frame(4.0, gq_metric_shift=0.5))  # GQ twice as slow, far worse metric
    assert slow == {"GQ trains sig": ["not confirmed"], "GQ reaches": ["not confirmed"]}
    grows = tc.claims_table(_epochs_frame(1.0), None)
    grows = grows.loc[grows["claim"].str.contains("grows"), "verdict"].tolist()
    assert grows == ["not confirmed"]  # the same ratio at both widths

    def wider_gain(df):  # GQ half as long again at width 64 as at 16
        df = df.copy()
        df.loc[(df["method"] == "torch_gq") & (df["width"] == 64), "epoch_s"] *= 0.5
        t = tc.claims_table(df, None)
        return t.loc[t["claim"].str.contains("grows"), "verdict"].tolist()

    assert wider_gain(_epochs_frame(1.0)) == ["confirmed"]
    one_seed = verdicts(_epochs_frame(1.0, seeds=(0,)))
    assert one_seed["GQ reaches"] == ["not measurable here"]
    html = tc.tables_html(_epochs_frame(1.0), None)
    assert "The paper&#x27;s claims, re-run" in html or "The paper's claims, re-run" in html


def test_train_smoke_preset_covers_every_experiment_and_method():
    cases = load_preset("train-smoke").cases
    assert {c.problem for c in cases} == {"g1d", "spheres", "sines", "sines_irregular", "images", "toy_gradient"}
    assert set(ODE_METHODS) <= {c.method for c in cases} and all(c.epochs for c in cases)
    for name in ("train", "paper-train"):
        assert {c.problem for c in load_preset(name).cases} >= {"g1d", "spheres", "sines", "images", "toy_gradient"}


def test_train_smoke_killed_then_resumed_then_reported(tmp_path):
    """The preset end to end in fresh processes: kill -9 mid-grid, the same command finishes it, the report
    has the training section. (The slowest test here: about 2 CPU-minutes.)"""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "gqbench", "run", "--preset", "train-smoke", "--out", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while len(list((out / "cases").glob("*.json"))) < 3 and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {p: p.stat().st_mtime_ns for p in (out / "cases").glob("*.json")}
    assert 3 <= len(before) < 20
    subprocess.run([*cmd, "--report"], check=True, timeout=1200)
    df = pd.read_parquet(out / "results.parquet")
    cases = load_preset("train-smoke").cases
    assert sorted(df["case_id"]) == sorted(c.case_id for c in cases)  # one row per case, none lost or doubled
    assert all(p.stat().st_mtime_ns == m for p, m in before.items())
    assert (df["status"] == "ok").all(), df.loc[df["status"] != "ok", ["label", "problem", "error"]]
    epochs = pd.read_parquet(out / "epochs.parquet")
    trained = [c for c in cases if c.problem != "toy_gradient"]
    assert set(epochs["case_id"]) == {c.case_id for c in trained}
    for c in trained:
        e = epochs[epochs["case_id"] == c.case_id]
        assert sorted(e["epoch"]) == list(range(c.epochs + 1)) and (e["method"] == c.method).all()
        assert (e.loc[e["epoch"] > 0, ["fwd_s", "bwd_s", "step_s", "nfe_fwd", "val_metric"]].notna()).all().all()
    toy = pd.read_parquet(out / "toy_gradient.parquet")
    assert set(toy["method"]) == set(ODE_METHODS) and (toy["grad_rel_err"] < 0.05).all()
    page = (out / "index.html").read_text()
    for part in ("The paper's claims, re-run", "fig-train-epoch-time", "fig-train-curves", "fig-toy-gradient"):
        assert part in page


def test_claims_say_at_which_epochs_gq_is_faster():
    """GQ faster than direct backprop in epochs 1-3, slower from 4 on (its cost drifts as the model trains)."""
    df = _epochs_frame(1.0)
    drift = (df["method"] == "torch_gq") & (df["epoch"] >= 4)
    df.loc[drift, "epoch_s"] *= 3.0  # 2x -> 6x of its early cost: slower than direct's 2x
    t = tc.claims_table(df, None)
    direct = t.loc[t["claim"].str.startswith("GQ trains faster than direct"), "measured"].iloc[0]
    assert "GQ faster at epochs 1-3 (of 1-5)" in direct, direct
    slow = tc.claims_table(_epochs_frame(4.0), None)
    assert slow["measured"].str.contains("GQ faster at no epoch").any()
    from gqbench.training.figures import fig_train_cost

    df["quad_nodes"] = np.where(df["method"] == "torch_gq", 2.0 + df["epoch"], np.nan)
    fig = fig_train_cost(df)
    assert fig is not None and {tr.name for tr in fig.data} >= {"torch_gq[adaptive]", "torch_direct"}


def test_epoch_rows_count_quadrature_nodes():
    exp = G1D("g1d", "", 8, 32, 2, 0.01)
    (row,), tables = run_case(exp, case=_case("torch_gq", epochs=2))
    assert row["status"] == "ok" and row["quad_nodes"] > 0
    assert all(r["quad_nodes"] > 0 for r in tables["epochs"] if r["epoch"] >= 1)
    (row,), tables = run_case(exp, case=_case("torch_direct", epochs=1))
    assert math.isnan(tables["epochs"][-1]["quad_nodes"])  # no quadrature: NaN, not 0
