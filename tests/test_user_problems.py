"""A user's own model: `examples/spiral.py:make` (not a built-in) through the grid, fresh workers, two shards
merged and `gqbench advise`; one-line errors for bad factories; references keyed on the file's contents;
the vanderpol problem that the adjoint family cannot backsolve."""

import re
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import gqbench._testing  # noqa: F401 -- registers the stub methods in this process
from gqbench import Case, GridSpecError, RunSettings, advice_table, advise, parse_spec, run_grid
from gqbench.cli import main
from gqbench.define.user_problems import check
from gqbench.execute.merge import merge
from gqbench.measurement.measure import classify, measure, reference_path

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = "examples/spiral.py:make"
FAST = RunSettings(repeats=3, warmup=1, rewarm=0, timeout=120)


@pytest.fixture
def in_repo(monkeypatch):
    """Relative user paths resolve against the working directory: run from the repository root."""
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("GQBENCH_PROBLEM_ROOT", raising=False)


def test_example_grid_in_fresh_workers_through_two_shards_merged(in_repo, tmp_path):
    spec = {"name": "mine", "axes": dict(method=["torch_direct", "torch_gq"], problem=[EXAMPLE], width=[8, 16],
                                         batch=[4], rtol=[1e-3], threads=[1])}  # fmt: skip
    cases = list(parse_spec(spec).cases)
    assert len(cases) == 4 and {c.problem for c in cases} == {EXAMPLE}
    for k in (1, 2):
        part = run_grid(cases, tmp_path / f"s{k}", settings=FAST, spec=spec, progress=False, shard=f"{k}/2")
        assert part["case_id"].nunique() == 2  # one comparison group (one width) per shard
    df = merge(tmp_path / "merged", [tmp_path / "s1", tmp_path / "s2"])
    one = df.drop_duplicates("case_id")
    assert sorted(one["case_id"]) == sorted(c.case_id for c in cases)
    assert set(one["status"]) == {"ok"}, one[["label", "error"]].to_dict("records")
    assert (one["grad_rel_err"] < 0.05).all() and (one["nfe_fwd"] > 0).all(), one["grad_rel_err"].tolist()
    refs = sorted(p.name for k in (1, 2) for p in (tmp_path / f"s{k}" / "references").glob("*.npz"))
    assert len(refs) == 2 and all(r.startswith("user-examples_spiral.py_make-") for r in refs)
    assert main(["report", str(tmp_path / "merged")]) == 0


def test_advise_names_a_method_with_intervals(in_repo, tmp_path, capsys):
    out = tmp_path / "advice"
    argv = ["advise", EXAMPLE, "--rtol", "1e-3", "--width", "8", "--batch", "4", "--threads", "1", "--repeats", "3",
            "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "measured at the initial weights (make's, seed 0)" in text and "warning: initial weights only" in text
    chosen = re.search(r"at rtol 0\.001: use (torch\w+(\[[^\]]*\])?)", text)  # torch_* or torchode_*
    assert chosen, text
    assert re.search(r"\d+\.\d\dx \[\d+\.\d\d, \d+\.\d\d\]", text), text  # a speed-up with its 95% interval
    assert (out / "index.html").exists() and (out / "results.parquet").exists()
    # The Python API: the same answer as a table (the finished cases are not run again).
    table = advise(EXAMPLE, rtol=1e-3, width=8, batch=4, threads=1, repeats=3, out=out, report=False)
    assert table["recommended"].sum() == 1 and table.iloc[0]["label"] == chosen.group(1)
    # 7 settings of torchdiffeq's methods and GQ, torchode's two (skipped rows without the [torchode] extra)
    assert len(table) == 9 and set(table["status"]) <= {"ok", "error", "nan", "timeout", "skipped"}
    others = table[~table["recommended"] & (table["status"] == "ok")]
    assert (others["speedup_lo"] <= others["speedup"]).all() and (others["speedup"] <= others["speedup_hi"]).all()


def test_advice_table_picks_the_fastest_within_reach():
    """Known samples: `fast` is fastest but 100x off at rtol 1e-4 -> not within reach; `mid` (2x `slow`'s
    speed, paired by round) is recommended; `broke` failed and comes last with its error."""
    rows = []
    for r in range(5):
        for label, t, err in (("fast", 0.01, 1e-2), ("mid", 0.05 + 0.001 * r, 2e-4), ("slow", 0.1 + 0.002 * r, 1e-4)):
            rows.append(dict(problem="p", width=1, batch=1, rtol=1e-4, atol=1e-4, solver="dopri5", device="cpu",
                             dtype="float32", seed=0, threads=1, label=label, method=label, round=r, repeat=r,
                             fwd_s=t / 2, bwd_s=t / 2, grad_rel_err=err, peak_mem_bytes=2**20, nfe_fwd=10,
                             nfe_bwd=20, status="ok", error=""))  # fmt: skip
    rows.append(dict(rows[0], label="broke", method="broke", status="error", error="AssertionError: underflow in dt"))
    table = advice_table(pd.DataFrame(rows)).set_index("label")
    assert list(table.index) == ["mid", "fast", "slow", "broke"]
    assert table["recommended"].tolist() == [True, False, False, False]
    assert not table.loc["fast", "within_reach"] and table.loc["slow", "within_reach"]
    assert table.loc["slow", "speedup"] == pytest.approx(2.0)  # slow's time / mid's, median over rounds
    assert table.loc["fast", "speedup"] == pytest.approx(0.01 / 0.052)  # below 1: faster, but not within reach
    assert table.loc["slow", "clearly_slower"] and not table.loc["fast", "clearly_slower"]
    assert table.loc["broke", "error"].startswith("AssertionError") and np.isnan(table.loc["broke", "speedup"])


FACTORY = textwrap.dedent("""
    import torch
    from torch import nn

    class Field(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.lin = nn.Linear(2, {out})

        def forward(self, t, y):
            return self.lin(y)

    def make({signature}):
        func = Field(width).to(dtype=dtype, device=device)
        {tweak}
        y0 = torch.ones({y0_batch}, 2, dtype=dtype, device=device)
        t = torch.linspace(0.0, 1.0, 3, dtype=dtype, device=device)
        return func, y0, t, lambda ys: {loss}
""")
GOOD = dict(out="2", signature="*, width=4, batch=3, seed, dtype, device", tweak="pass", y0_batch="batch",
            loss="ys.pow(2).sum()")  # fmt: skip
BAD = [
    (dict(signature="width, batch"), "does not take seed, dtype, device; the contract is make(*, width"),
    (dict(tweak="raise ValueError('no data here')"), "raised ValueError: no data here; fix make"),
    (dict(out="3"), "func(t, y0) returned (3, 3) for y0 of shape (3, 2); return dy/dt shaped like y"),
    (dict(y0_batch="5"), "y0 has shape (5, 2) for batch=3; make it (batch, ...)"),
    (dict(loss="ys.pow(2).sum(-1)"), "loss(ys) returned (3, 3), not a scalar tensor; reduce it"),
    (dict(tweak="func.lin.bias.requires_grad_(False)"), "parameters lin.bias do not require grad; set"),
    (dict(tweak="func = func.float()"), "parameter lin.weight is float32 for dtype=float64; build func with"),
]


def _factory(tmp_path, name="model.py", **changes):
    (tmp_path / name).write_text(FACTORY.format(**dict(GOOD, **changes)))
    return f"{name}:make"


@pytest.mark.parametrize("changes,message", BAD, ids=[m.split(";")[0][:28] for _, m in BAD])
def test_bad_factories_get_one_line_naming_the_fix(tmp_path, monkeypatch, changes, message):
    monkeypatch.chdir(tmp_path)
    name = _factory(tmp_path, **changes)
    with pytest.raises(GridSpecError) as info:  # the spec (import, signature), then the contract check
        parse_spec({"axes": dict(method=["torch_gq"], problem=[name])})
        check(name, width=4, batch=3, dtype="float64", device="cpu")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_paths_and_modules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases = [
        ("nope.py:make", "nope.py does not exist; give the path relative to the working directory"),
        ("no_such_pkg_xyz.models:make", "cannot import 'no_such_pkg_xyz.models'"),
        (_factory(tmp_path, "other.py") + "x", "defines no 'makex'; define make(*, width"),
    ]
    (tmp_path / "broken.py").write_text("import torch\nraise RuntimeError('half-written model')\n")
    cases.append(("broken.py:make", "raised RuntimeError: half-written model; fix the module"))
    for name, message in cases:
        with pytest.raises(GridSpecError) as info:
            parse_spec({"axes": dict(method=["torch_gq"], problem=[name])}, source="spec.toml")
        assert message in str(info.value) and "\n" not in str(info.value), str(info.value)
    # "pkg.module:make" from the working directory, as `python -m` would import it; defaults from the signature
    (tmp_path / "userpkg_a").mkdir()
    (tmp_path / "userpkg_a" / "__init__.py").write_text("")
    (tmp_path / "userpkg_a" / "models.py").write_text(FACTORY.format(**GOOD))
    cases = parse_spec({"axes": dict(method=["torch_direct"], problem=["userpkg_a.models:make"])}).cases
    assert [(c.width, c.batch) for c in cases] == [(4, 3)]
    _factory(tmp_path, "nodefaults.py", signature="*, width, batch, seed, dtype, device")
    with pytest.raises(GridSpecError, match="width is missing for 'nodefaults.py:make'.*add width = "):
        parse_spec({"axes": dict(method=["torch_direct"], problem=["nodefaults.py:make"])})


def test_cli_stops_before_any_case_with_exit_2(tmp_path, monkeypatch, capsys):
    """The contract is checked in a fresh worker (as the cases will build the model) before any case runs."""
    monkeypatch.chdir(tmp_path)
    name = _factory(tmp_path, loss="ys")
    grid = tmp_path / "grid.toml"
    grid.write_text(f'[axes]\nmethod = ["torch_direct"]\nproblem = ["{name}"]\nthreads = [1]\n')
    assert main(["run", "--grid", str(grid), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a scalar tensor" in err, err
    assert not list((tmp_path / "out").glob("cases/*.json"))


def test_reference_and_resume_follow_the_file(tmp_path, monkeypatch):
    """Editing the model changes its reference's cache key, and a resumed run refuses to mix the two models."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GQBENCH_PLUGINS", "gqbench._testing")
    shutil.copy(REPO / "examples" / "spiral.py", tmp_path / "spiral.py")
    case = Case("stub_ok", "spiral.py:make", 4, 2, threads=1)
    before = reference_path(case)
    run_grid([case, case.with_(width=5)], tmp_path / "out", settings=FAST, progress=False)
    with open(tmp_path / "spiral.py", "a") as f:
        f.write("\n# edited\n")
    assert reference_path(case) != before and reference_path(case).name.startswith("user-spiral.py_make-")
    with pytest.raises(GridSpecError, match="spiral.py changed since .* give a new --out"):
        run_grid([case, case.with_(width=5), case.with_(width=6)], tmp_path / "out", settings=FAST, progress=False)


def test_vanderpol_defeats_backsolving_adjoints(tmp_path):
    """mu = 5, float64, dopri5 at 1e-6: the adjoint and the seminorm adjoint stop with "underflow in dt"
    (their backward solve of the state leaves the attracting limit cycle); direct backprop gets the gradient."""
    base = Case("torch_direct", "vanderpol", 1, 4, rtol=1e-6, atol=1e-6, dtype="float64", threads=1)
    rows = measure(base, repeats=1, warmup=0, reference_dir=tmp_path)
    assert rows[0]["status"] == "ok" and rows[0]["grad_rel_err"] < 1e-4, rows[0]
    for method in ("torch_adjoint", "torch_seminorm"):
        with pytest.raises(AssertionError, match="underflow in dt") as info:
            measure(base.with_(method=method), repeats=1, warmup=0, reference_dir=tmp_path)
        assert classify(info.value) == "error"


def test_user_training_problem_trains_in_a_fresh_worker(in_repo, tmp_path):
    """`examples/spiral_training.py:experiment` (an ODEExperiment instance) names a training problem the same way."""
    name = "examples/spiral_training.py:experiment"
    (case,) = parse_spec({"axes": dict(method=["torch_gq"], problem=[name], epochs=[1], threads=[1])}).cases
    assert (case.epochs, case.lr, case.width, case.batch) == (1, 1e-2, 16, 16)  # the experiment's defaults
    df = run_grid([case], tmp_path, settings=FAST, progress=False)
    row = df.iloc[0]
    assert row["status"] == "ok" and row["epochs_done"] == 1 and row["nfe_bwd"] > 0, row["error"]
    with pytest.raises(GridSpecError, match="is a training problem; give it epochs"):
        check(name, width=4, batch=2, dtype="float32", device="cpu")
