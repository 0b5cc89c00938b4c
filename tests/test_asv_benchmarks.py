"""The asv suite (benchmarks/): its grid is the harness' `history` preset, its points become Cases
through gqbench, and its time_/track_ benchmarks run through gqbench's prepare/run_grid."""

from __future__ import annotations

import importlib
import itertools
import math

import pytest

import gqbench
from benchmarks import common, timing, tracking


def test_labels_are_the_harness_expansion_of_the_preset():
    spec = gqbench.load_preset(common.PRESET_NAME)
    assert {c.label for c in spec.cases} == set(common.LABELS)
    assert {c.width for c in spec.cases} == set(common.WIDTHS)
    assert {c.rtol for c in spec.cases} == set(common.RTOLS)
    assert {c.method for c in spec.cases} <= set(gqbench.METHODS)


def test_every_registered_method_is_tracked():
    # gqbench's own methods; other tests register stubs (gqbench._testing) in this process.
    from gqbench.define.methods import TrainingOnly

    builtin = {
        n
        for n, m in gqbench.METHODS.items()
        if type(m).__module__ in ("gqbench.define.methods", "gqbench.define.jax_methods")
        and not isinstance(m, TrainingOnly)
    }  # training-only methods (torchsde's) have no single-gradient case for asv to time
    assert {common.method_of(label) for label in common.LABELS} == builtin


def test_params_and_names_come_from_one_table():
    assert common.PARAM_NAMES == ["method", "width", "rtol", "device"]
    assert len(common.PARAMS) == len(common.PARAM_NAMES)
    for cls in (timing.Gradient, timing.Backward, tracking.Measured):
        assert cls.params is common.PARAMS and cls.param_names is common.PARAM_NAMES
        assert cls.version == common.VERSION
    assert common.VERSION.endswith(f"harness.{gqbench.HARNESS_VERSION}")


def test_default_subsample():
    pts = common.default_points()
    assert pts == common.SELECTED and not common.FULL
    assert {common.method_of(label) for label, _, _ in pts} == set(common.METHODS_IN_PRESET)
    large = [p for p in pts if p[1] == max(common.WIDTHS)]
    assert len(large) == 1 and common.is_quadrature(large[0][0])
    product = set(itertools.product(*common.PARAMS[:3]))
    assert pts <= product
    assert len(product) <= 3 * len(pts), "each skipped combination still costs asv a fresh interpreter"


def test_full_switch(monkeypatch):
    monkeypatch.setenv(common.FULL_ENV, "1")
    monkeypatch.setenv(common.DEVICES_ENV, "cpu,cuda")
    try:
        full = importlib.reload(common)
        assert full.FULL and full.AXES["device"] == ["cpu", "cuda"]
        assert len(full.SELECTED) == len(full.LABELS) * len(full.WIDTHS) * len(full.RTOLS)
        assert set(itertools.product(*full.PARAMS[:3])) == full.SELECTED
    finally:
        monkeypatch.delenv(common.FULL_ENV)
        monkeypatch.delenv(common.DEVICES_ENV)
        importlib.reload(common)


def test_build_case_is_the_harness_case():
    label, width, rtol = sorted(common.SELECTED)[0]
    case = common.build_case(label, width, rtol, "cpu")
    assert case.label == label and case.width == width and case.rtol == rtol == case.atol
    assert case in gqbench.load_preset(common.PRESET_NAME).cases


def test_unselected_and_unknown_points_skip(monkeypatch):
    unselected = next(p for p in itertools.product(*common.PARAMS[:3]) if p not in common.SELECTED)
    with pytest.raises(NotImplementedError, match="GQBENCH_ASV_FULL=1"):
        common.build_case(*unselected, "cpu")
    # A method an older commit's registry does not know: skipped, not an error.
    monkeypatch.setitem(common.POINTS, "torch_future", dict(common.POINTS["torch_direct"], method=["torch_future"]))
    monkeypatch.setattr(common, "SELECTED", {("torch_future", 10, 1e-3)})
    with pytest.raises(NotImplementedError, match="cannot build torch_future"):
        common.build_case("torch_future", 10, 1e-3, "cpu")


def test_cuda_point_skips_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    label, width, rtol = sorted(common.SELECTED)[0]
    bench = timing.Gradient()
    with pytest.raises(NotImplementedError, match="cuda"):
        bench.setup(label, width, rtol, "cuda")


def test_time_benchmarks_run_the_prepared_case():
    point = ("torch_gq[n=2]", min(common.WIDTHS), common.RTOLS[0], "cpu")
    assert point[:3] in common.SELECTED
    grad = timing.Gradient()
    grad.setup(*point)
    grad.time_gradient(*point)
    grad.time_forward(*point)
    bwd = timing.Backward()
    bwd.setup(*point)  # asv re-runs setup (a fresh forward) before each timed backward
    assert bwd.run is grad.run  # prepared once per process
    bwd.time_backward(*point)
    assert grad.run.nfe_backward > 0 and grad.run.extra["quad_nodes"] > 0


def test_track_benchmarks_read_the_cache():
    point = sorted(common.SELECTED)[0]
    key = common.point_key(*point, "cpu")
    row = dict(peak_mem_bytes=1024.0, nfe_fwd=14.0, nfe_bwd=20.0, grad_rel_err=1e-6)
    bench = tracking.Measured()
    bench.setup({key: row}, *point, "cpu")
    assert bench.track_peak_mem({}, *point, "cpu") == 1024.0
    assert bench.track_nfe_fwd({}, *point, "cpu") == 14.0
    assert bench.track_nfe_bwd({}, *point, "cpu") == 20.0
    assert bench.track_grad_rel_err({}, *point, "cpu") == 1e-6
    assert tracking.Measured.track_peak_mem.unit == "bytes"
    with pytest.raises(NotImplementedError, match="timeout: too slow"):
        bench.setup({key: {"skip": "timeout: too slow"}}, *point, "cpu")


def test_measure_selected_runs_gqbench(monkeypatch, tmp_path):
    """setup_cache: the selected points through gqbench.run_grid (fresh worker per case)."""
    monkeypatch.setenv("ASV_CONF_DIR", str(tmp_path))
    monkeypatch.setattr(common, "SELECTED", {("torch_gq[n=2]", 10, 1e-3), ("torch_direct", 10, 1e-3)})
    monkeypatch.setattr(common, "DEVICES", ("cpu", "cuda:7"))
    out = common.measure_selected()
    gq = out[common.point_key("torch_gq[n=2]", 10, 1e-3, "cpu")]
    assert gq["nfe_fwd"] > 0 and gq["nfe_bwd"] > 0 and gq["peak_mem_bytes"] >= 0
    assert 0 <= gq["grad_rel_err"] < 1e-3
    assert out[common.point_key("torch_direct", 10, 1e-3, "cpu")]["nfe_bwd"] == 0
    assert "skip" in out[common.point_key("torch_gq[n=2]", 10, 1e-3, "cuda:7")]
    assert any((tmp_path / ".asv" / "references").rglob("*.npz"))


@pytest.mark.parametrize(
    "toml, match",
    [
        ("[axes]\nrtol=[1e-3]\n[[grid]]\nmethod=['torch_gq']\n", "width must be a non-empty list"),
        ("[axes]\nwidth=[10]\nrtol=[1e-3]\natol=[1e-3]\n[[grid]]\nmethod=['a']\n", "atol is not supported"),
        ("[axes]\nwidth=[10]\nrtol=[1e-3]\n[[grid]]\nmethod=['a']\nwidth=[5]\n", "sets width"),
        ("[axes]\nwidth=[10]\nrtol=[1e-3]\n[[grid]]\nmethod=['a']\n[[grid]]\nmethod=['a']\n", "a appears twice"),
    ],
)
def test_read_grid_rejects_shapes_it_cannot_follow(tmp_path, toml, match):
    path = tmp_path / "p.toml"
    path.write_text(toml)
    with pytest.raises(common.GridError, match=match):
        common.read_grid(path)


def test_quadrature_labels():
    assert common.is_quadrature("torch_gq[n=2]") and not common.is_quadrature("torch_adjoint")
    assert common.POINTS["torch_gq[n=2]"]["quad_order"] == [2] and "gtol" not in common.POINTS["torch_gq[n=2]"]
    assert not math.isnan(common._median([1.0, float("nan"), 3.0]))


def test_trained_benchmarks_run_at_the_trained_state(monkeypatch, tmp_path):
    from benchmarks import common, trained

    monkeypatch.setattr(trained, "WIDTH", 8)
    monkeypatch.setattr(trained, "STEPS", 2)
    monkeypatch.setenv("ASV_CONF_DIR", str(tmp_path))
    monkeypatch.setattr(common, "_RUNS", {})
    case = trained.trained_case("torch_gq[adaptive]")
    assert case.train_steps == 2 and case.label == "torch_gq[adaptive]"
    bench = trained.TrainedQuadrature()
    bench.setup("torch_gq[adaptive]")
    bench.time_gradient("torch_gq[adaptive]")
    assert bench.track_quad_nodes("torch_gq[adaptive]") > 0 and bench.track_nfe_bwd("torch_gq[adaptive]") > 0
    assert len(list((tmp_path / ".asv" / "references").rglob("trained-workload_l-w8-*t2-*.npz"))) == 1
