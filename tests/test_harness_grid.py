"""Grid spec expansion, case ids, presets and every malformed-spec error."""

import pytest

from gqbench import Case, GridSpecError, list_presets, load_preset, load_spec, parse_spec
from gqbench.cli import main

BASE = {"axes": {"method": ["torch_direct", "torch_gq"], "problem": ["workload_l"], "width": [10, 100]}}


def spec(**axes):
    return {"axes": dict(BASE["axes"], **axes)}


def test_quadrature_axes_apply_to_gq_only():
    s = parse_spec(spec(gtol=[0.1, 1.0], quad_order=[2, 4], backward_state=["backsolve", "interpolate"]))
    direct = [c for c in s.cases if c.method == "torch_direct"]
    gq = [c for c in s.cases if c.method == "torch_gq"]
    assert len(direct) == 2  # one per width, not duplicated by the quadrature axes
    assert all(c.gtol is None and c.quad_order is None and c.backward_state is None for c in direct)
    assert len(gq) == 2 * (1 + 2 + 2) * 2  # widths x (adaptive + gtol values + quad orders) x backward states
    assert {(c.quadrature, c.gtol, c.quad_order) for c in gq} == {
        ("adaptive", None, None),
        ("gtol", 0.1, None),
        ("gtol", 1.0, None),
        ("fixed", None, 2),
        ("fixed", None, 4),
    }


def test_quadrature_axis_picks_the_rules():
    s = parse_spec(spec(quadrature=["gtol"], gtol=[0.1], quad_order=[2]))
    assert {(c.quadrature, c.gtol, c.quad_order) for c in s.cases if c.method == "torch_gq"} == {("gtol", 0.1, None)}
    s = parse_spec(spec())
    gq = [c for c in s.cases if c.method == "torch_gq"]
    assert {c.quadrature for c in gq} == {"adaptive"} and {c.label for c in gq} == {"torch_gq[adaptive]"}
    with pytest.raises(GridSpecError, match=r"quadrature lists \"fixed\" but no quad_order"):
        parse_spec(spec(quadrature=["fixed"]))
    with pytest.raises(GridSpecError, match=r"quadrature value 'gauss' is unknown"):
        parse_spec(spec(quadrature=["gauss"]))


def test_warm_start_axis_applies_to_gq_only():
    s = parse_spec(spec(warm_start=[False, True], gtol=[0.1], quadrature=["gtol"]))
    assert {c.warm_start for c in s.cases if c.method == "torch_direct"} == {None}
    gq = [c for c in s.cases if c.method == "torch_gq"]
    assert sorted(c.warm_start for c in gq) == [False, False, True, True]
    assert {c.label for c in gq} == {"torch_gq[gtol=0.1]", "torch_gq[gtol=0.1,cold]"}  # warm is the default
    cold = next(c for c in gq if c.warm_start is False)
    # Unset means the implementation's default (warm): off must not share its id.
    assert cold.case_id != cold.with_(warm_start=None).case_id
    assert cold.case_id != cold.with_(warm_start=True).case_id
    default = parse_spec(spec(gtol=[0.1], quadrature=["gtol"])).cases
    assert list(default) == [c for c in s.cases if c.warm_start is not False]


def test_quad_order_alone_drops_default_gtol():
    s = parse_spec(spec(quad_order=[3]))
    assert {(c.gtol, c.quad_order) for c in s.cases if c.method == "torch_gq"} == {(None, None), (None, 3)}


def test_tolerances_paired_and_crossed():
    paired = parse_spec(spec(rtol=[1e-3, 1e-6], atol=[1e-4, 1e-7]))
    assert {(c.rtol, c.atol) for c in paired.cases} == {(1e-3, 1e-4), (1e-6, 1e-7)}
    crossed = parse_spec(spec(rtol=[1e-3, 1e-6], atol=[1e-4, 1e-7], tolerances="crossed"))
    assert len({(c.rtol, c.atol) for c in crossed.cases}) == 4
    same = parse_spec(spec(rtol=[1e-5]))
    assert {(c.rtol, c.atol) for c in same.cases} == {(1e-5, 1e-5)}


def test_grids_union_without_duplicates_and_problem_defaults():
    s = parse_spec(
        {
            "axes": {"method": ["torch_adjoint"], "problem": ["g1d", "sines"]},
            "grid": [{"width": [10, 20]}, {"width": [20, 40]}],
        }
    )
    assert sorted({c.width for c in s.cases}) == [10, 20, 40]
    assert len(s.cases) == 2 * 3
    assert {(c.problem, c.batch) for c in s.cases} == {("g1d", 2), ("sines", 100)}


def test_threads_override_and_run_settings():
    s = parse_spec(dict(spec(), run={"repeats": 5, "processes": 4, "warmup": 0, "timeout": 30}), threads=1)
    assert {c.threads for c in s.cases} == {1}
    assert (s.settings.repeats, s.settings.processes, s.settings.warmup, s.settings.timeout) == (5, 4, 0, 30)
    with pytest.raises(GridSpecError, match="run.processes value 0 must be an integer > 0"):
        parse_spec(dict(spec(), run={"processes": 0}))


def test_case_id_is_stable_and_distinguishes_fields():
    c = Case("torch_gq", "workload_l", 10, 200, rtol=1e-6, atol=1e-6, gtol=0.1, backward_state="backsolve")
    assert c.case_id == Case.from_dict(c.to_dict()).case_id
    assert c.case_id == "e2e4dc99d2a4"  # fixed across processes and machines (not hash())
    assert (
        len(
            {
                c.case_id,
                c.with_(width=11).case_id,
                c.with_(gtol=None, quad_order=2).case_id,
                c.with_(dtype="float64").case_id,
                c.with_(threads=1).case_id,
            }
        )
        == 5
    )
    assert c.label == "torch_gq[gtol=0.1,backsolve]"  # the default ("auto") goes unnamed
    assert c.with_(gtol=None, quad_order=4, backward_state="interpolate").label == "torch_gq[n=4,interpolate]"


@pytest.mark.parametrize("name", ["smoke", "default", "paper", "gpu"])
def test_presets_load(name):
    s = load_preset(name)
    assert s.cases and s.name == name
    methods = {c.method for c in s.cases}
    assert {"torch_direct", "torch_adjoint", "torch_seminorm", "torch_gq"} <= methods
    if name == "gpu":
        assert {c.device for c in s.cases} == {"cuda"}
    if name == "smoke":
        assert sorted({c.width for c in s.cases}) == [10, 100]


BAD = [
    ({"axes": {"problem": ["g1d"]}}, "method is missing"),
    ({"axes": {"method": ["torch_gq"]}}, "problem is missing"),
    (spec(method=["torch_magic"]), "method value 'torch_magic' is unknown; use one of torch_direct"),
    (spec(problem=["mnist"]), "problem value 'mnist' is unknown"),
    (spec(width=[0]), "width value 0 must be an integer > 0"),
    (spec(width=[10.5]), "width value 10.5 must be an integer"),
    (spec(width=[]), "width is an empty list"),
    (spec(batch=[-1]), "batch value -1"),
    (spec(rtol=[0.0]), "rtol value 0.0 must be a number > 0"),
    (spec(rtol=["1e-6"]), "rtol value '1e-6' must be a number"),
    (spec(rtol=[1e-3, 1e-6], atol=[1e-3]), "atol has 1 values but rtol has 2"),
    (spec(tolerances="zipped"), "tolerances is 'zipped'; use \"paired\""),
    (spec(gtol=[-0.1]), "gtol value -0.1"),
    (spec(quad_order=[0]), "quad_order value 0"),
    (spec(quad_order=[65]), "quad_order value 65 is above 64"),
    (spec(backward_state=["forward"]), "backward_state value 'forward' is unknown"),
    (spec(warm_start=["yes"]), "warm_start value 'yes' is not a boolean; use true or false"),
    (spec(device=["tpu"]), "device value 'tpu' is not a device"),
    (spec(dtype=["float16"]), "dtype value 'float16' is unknown"),
    (spec(solver=["euler"]), "solver value 'euler' is unknown"),
    (spec(threads=[0]), "threads value 0"),
    (spec(tol=[1e-3]), "tol is not an axis (did you mean 'rtol'/'atol'?)"),
    (dict(spec(), runs={}), "runs is not a spec key"),
    (dict(spec(), run={"repeat": 3}), "run.repeat is not a run setting"),
    (dict(spec(), run={"repeats": 0}), "run.repeats value 0 must be an integer > 0, e.g. repeats = 3"),
    (dict(spec(), run={"timeout": "1m"}), "run.timeout value '1m' must be a number"),
    (dict(spec(), run=[1]), "run must be a table"),
    (dict(spec(), grid={"width": [1]}), "grid must be an array of tables"),
]


@pytest.mark.parametrize("data,message", BAD, ids=[m.split(" value")[0][:30] for _, m in BAD])
def test_malformed_spec_names_key_and_fix(data, message):
    with pytest.raises(GridSpecError) as info:
        parse_spec(data, source="spec.toml")
    text = str(info.value)
    assert message in text
    assert text.startswith("spec.toml") and "\n" not in text


def test_invalid_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[axes\nmethod = 1")
    with pytest.raises(GridSpecError, match=r"bad.toml: not valid TOML .*fix the syntax"):
        load_spec(bad)
    with pytest.raises(GridSpecError, match="cannot read the grid spec"):
        load_spec(tmp_path / "nope.toml")
    with pytest.raises(GridSpecError, match="unknown preset 'nope'; choose one of: .*default"):
        load_preset("nope")
    assert "default" in list_presets()


def test_cli_reports_spec_errors_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[axes]\nmethod = ["torch_gq"]\nproblem = ["workload_l"]\nwidth = [0]\n')
    assert main(["run", "--grid", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "width value 0" in err and "Traceback" not in err
    assert main(["run", "--preset", "nope"]) == 2
    assert main(["run", "--preset", "smoke", "--repeats", "0"]) == 2
    assert not (tmp_path / "out").exists()


def test_cli_list_and_dry_run(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("smoke", "default", "torch_gq", "workload_l", "linear"):
        assert name in out
    assert main(["run", "--preset", "smoke", "--dry-run", "--threads", "1"]) == 0
    assert "threads=1" in capsys.readouterr().out
