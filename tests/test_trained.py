"""Trained states (`train_steps`): the cache (made once, reused, invalidated by a changed user file or
recipe), stable case ids, and a tiny grid through the real runner at 0 and 2 steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gqbench import Case, RunSettings, parse_spec, run_grid
from gqbench.define.grid import GridSpecError
from gqbench.define.problems import get_problem
from gqbench.measurement import trained

USER = """
import torch
from torch import nn


def make(*, width=8, batch=4, seed, dtype, device):
    func = nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, 2)).to(dtype=dtype, device=device)
    field = Field(func)
    y0 = torch.randn(batch, 2, dtype=dtype, device=device)
    return field, y0, torch.tensor([0.0, 1.0], dtype=dtype, device=device), lambda ys: ys[-1].pow(2).sum(), -y0


class Field(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, t, y):
        return self.net(y)
"""


def _case(problem="workload_l", steps=2, **kw):
    return Case("torch_direct", problem, kw.pop("width", 8), kw.pop("batch", 4), threads=1, train_steps=steps, **kw)


def test_train_steps_zero_keeps_case_ids_and_nonzero_changes_them():
    base = Case("torch_gq", "workload_l", 8, 4)
    assert base.with_(train_steps=0).case_id == base.case_id == "1231ed5dfaad"  # the id before the axis existed
    assert base.with_(train_steps=2).case_id != base.case_id
    assert Case.from_dict({**base.to_dict(), "train_steps": float("nan")}).train_steps == 0  # older results


def test_trained_state_is_made_once_and_reused(tmp_path):
    case = _case()
    path = trained.trained_path(case, tmp_path)
    assert not path.exists()
    state = trained.trained_state(case, tmp_path)
    stamp = path.stat().st_mtime_ns
    again = trained.trained_state(case, tmp_path)
    assert path.stat().st_mtime_ns == stamp  # read, not trained again
    assert all(torch.equal(state[k], again[k]) for k in state)
    init = get_problem("workload_l").build(width=8, batch=4, seed=0).func.state_dict()
    assert any(not torch.equal(init[k], state[k]) for k in init)  # the steps moved the weights
    # Same steps from the same seed: the same weights (deterministic recipe); another seed: other weights.
    fresh, losses = trained.train(case)
    assert len(losses) == 2 and all(torch.equal(fresh[k], state[k]) for k in state)
    assert trained.trained_path(case.with_(seed=1), tmp_path) != path
    assert trained.trained_path(case.with_(dtype="float64"), tmp_path) != path
    assert trained.trained_path(case.with_(method="torch_gq"), tmp_path) == path  # shared by every method


def test_a_changed_recipe_or_user_file_trains_anew(tmp_path, monkeypatch):
    user = tmp_path / "model.py"
    user.write_text(USER)
    monkeypatch.setenv("GQBENCH_PROBLEM_ROOT", str(tmp_path))
    case = _case("model.py:make")
    before = trained.trained_path(case, tmp_path)
    trained.trained_state(case, tmp_path)
    assert before.exists()
    user.write_text(USER.replace("nn.Tanh()", "nn.Softplus()"))
    edited = trained.trained_path(case, tmp_path)
    assert edited != before and not edited.exists()
    monkeypatch.setitem(trained.RECIPE, "lr", 2e-3)
    assert trained.trained_path(case, tmp_path) not in (before, edited)


def test_a_user_target_is_what_the_recipe_fits(tmp_path, monkeypatch):
    (tmp_path / "model.py").write_text(USER)
    monkeypatch.setenv("GQBENCH_PROBLEM_ROOT", str(tmp_path))
    problem = get_problem("model.py:make")
    inst = problem.build(width=8, batch=4, seed=0)
    loss = trained.training_loss(problem, inst)
    ys = torch.stack([inst.y0, -inst.y0])
    assert float(loss(ys)) == 0.0  # the 5th element (-y0) is the target of y(t_end)


def test_train_steps_is_validated():
    with pytest.raises(GridSpecError, match="train_steps"):
        parse_spec({"axes": {"method": ["torch_gq"], "problem": ["workload_l"], "train_steps": [-1]}})
    with pytest.raises(GridSpecError, match="does not apply to training problem"):
        parse_spec({"axes": {"method": ["torch_gq"], "problem": ["g1d"], "epochs": [2], "train_steps": [0, 5]}})


def test_tiny_grid_at_0_and_2_steps_through_the_runner(tmp_path):
    spec = parse_spec({"axes": {"method": ["torch_direct", "torch_gq"], "problem": ["workload_l"], "width": [8],
                                "batch": [4], "rtol": [1e-6], "threads": [1], "train_steps": [0, 2]}})  # fmt: skip
    assert sorted({c.train_steps for c in spec.cases}) == [0, 2]
    df = run_grid(spec.cases, tmp_path, settings=RunSettings(repeats=2, warmup=1, timeout=120), progress=False)
    assert (df["status"] == "ok").all(), df[["method", "train_steps", "status", "error"]]
    assert sorted(df["train_steps"].unique()) == [0, 2]
    assert (df["grad_rel_err"] < 1e-3).all()  # each against the reference at its own weights
    refs = sorted(p.name for p in (tmp_path / "references").iterdir())
    assert sum(n.startswith("trained-") for n in refs) == 1 and sum(n.startswith("reference-trained-") for n in refs)
    loss = df.groupby(["method", "train_steps"])["loss"].median()
    assert loss["torch_direct", 0] != loss["torch_direct", 2]  # timed at other weights
    assert np.isclose(loss["torch_direct", 2], loss["torch_gq", 2], rtol=1e-4)  # both at the same weights
    # The verdict: initial and trained columns side by side, ranked by the trained state.
    from gqbench.report.figures import summarize
    from gqbench.report.verdict import verdict_html, verdict_table

    table = verdict_table(df, summarize(df))
    assert len(table) == 1 and table.iloc[0]["ranked by"] == "step 2"
    want = {"fastest (within reach)", "fastest (within reach, step 2)", "GQ vs torch_direct",
            "GQ vs torch_direct (step 2)"}  # fmt: skip
    assert want <= set(table) and table.iloc[0]["use"] == table.iloc[0]["fastest (within reach, step 2)"]
    assert "ranks by the most trained state" in verdict_html(df, summarize(df))


def _advise(tmp_path, *args):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "gqbench.cli", "advise", "examples/spiral.py:make", "--width", "8",
           "--out", str(tmp_path / "out"), "--quiet", "--no-report", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "make_file, why",
    [
        (lambda p: None, "no such file"),
        (lambda p: p.write_text("not a checkpoint"), "not a state_dict torch.load can read"),
        (lambda p: torch.save({"linear.weight": torch.zeros(2, 2)}, p), "do not fit the model (missing mlp.0.bias"),
        (lambda p: torch.save(_spiral(16).state_dict(), p), "mlp.0.weight is (16, 2), the model's (8, 2)"),
    ],
)
def test_advise_weights_errors_are_one_line_and_exit_2(tmp_path, make_file, why):
    path = tmp_path / "model.pt"
    make_file(path)
    out = _advise(tmp_path, "--weights", str(path))
    assert out.returncode == 2, out.stderr[-2000:]
    assert why in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "out" / "cases").exists()  # nothing ran


def test_train_steps_needs_a_user_target(tmp_path, monkeypatch):
    (tmp_path / "four.py").write_text(USER.replace(", -y0\n", "\n"))
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "gqbench.cli", "advise", "four.py:make", "--train-steps", "3", "--out",
           str(tmp_path / "out"), "--quiet", "--no-report"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 2 and "returns no training target" in out.stderr, out.stderr[-2000:]


def test_a_case_with_user_weights_is_measured_at_them(tmp_path):
    from gqbench.measurement.measure import prepare, reference_path

    model = _spiral(8)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    case = Case("torch_direct", "examples/spiral.py:make", 8, 16, threads=1)
    sha = trained.import_weights(tmp_path / "model.pt", case, tmp_path / "refs")
    run = prepare(case.with_(weights=sha), tmp_path / "refs")
    assert all(torch.equal(a, b) for a, b in zip(run.params, model.parameters(), strict=True))
    assert case.with_(weights=sha).case_id != case.case_id
    assert reference_path(case.with_(weights=sha), tmp_path) != reference_path(case, tmp_path)


def _spiral(width):
    from gqbench.define.user_problems import load_object

    return load_object("examples/spiral.py:make")(width=width, batch=4, seed=0, dtype=torch.float32,
                                                   device=torch.device("cpu"))[0]  # fmt: skip
