"""SDE training as cases on the runner: the sde-smoke preset end to end, its tables, the report section,
and the grid's one-line errors for training-only methods and bad axes."""

from __future__ import annotations

import pandas as pd
import pytest

from gqbench import GridSpecError, load_preset, parse_spec, run_grid, write_report
from gqbench.training import sde_figures

pytest.importorskip("torchsde", reason="the sde extra (torchsde) is not installed")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("sde-smoke")
    spec = load_preset("sde-smoke")
    results = run_grid(spec.cases, out, settings=spec.settings, spec=spec.source, progress=False)
    return out, spec, results


def test_sde_smoke_preset_trains_every_method(smoke):
    out, spec, results = smoke
    assert len(results) == len(spec.cases) == 4
    assert set(results["status"]) == {"ok"}, results[["label", "status", "error"]].to_string()
    assert set(results["method"]) == {"torch_gq", "sde_direct", "sde_adjoint"}
    assert (results["epochs"] == 2).all() and results["grad_rel_err"].isna().all()
    epochs = pd.read_parquet(out / "epochs.parquet")
    # One row per case and epoch (0 = untrained), with the case fields on every row.
    assert len(epochs) == 4 * 3 and set(epochs["case_id"]) == set(results["case_id"])
    trained = epochs[epochs["epoch"] > 0]
    assert (trained["epoch_s"] > 0).all() and (trained["nfe_fwd"] > 0).all()
    gq = trained[trained["method"] == "torch_gq"]
    assert (gq["nfe_bwd"] > 0).all() and set(gq["ncosines"]) == {5, 10}
    sde_direct = trained[trained["method"] == "sde_direct"]
    assert (sde_direct["nfe_fwd"] == 1002).all()  # reversible Heun, 10 / 0.01 steps (+2 evaluations to start)
    # Epoch 0 is the same untrained model for every method of the seed.
    assert epochs.loc[epochs["epoch"] == 0, "val_loglik"].nunique() == 1
    bands = pd.read_parquet(out / "sde_bands.parquet")
    assert set(bands["kind"]) == {"model", "data"} and bands["x0"].nunique() == 3


def test_sde_smoke_report_has_the_section(smoke):
    out, _, _ = smoke
    page = write_report(out).read_text()
    for name, title in sde_figures.TITLES.items():
        assert title in page, name
    assert "The paper&#x27;s SDE claim, re-run" in page or "The paper's SDE claim, re-run" in page
    assert "No finished cases to plot" not in page
    epochs = pd.read_parquet(out / "epochs.parquet")
    claims = sde_figures.claims(epochs)
    assert claims[0]["verdict"] in ("confirmed", "not confirmed", "inconclusive")
    assert claims[1]["verdict"] == "not measurable here"  # one seed: no spread to judge the fit by


def test_sde_smoke_resumes_without_rerunning(smoke):
    out, spec, results = smoke
    again = run_grid(spec.cases, out, settings=spec.settings, progress=False)
    pd.testing.assert_frame_equal(again, results)


def _spec(**grid):
    return {"axes": {"problem": ["sde_ou_small"], "epochs": [1]}, "grid": [grid]}


def test_grid_errors_are_one_line():
    with pytest.raises(GridSpecError, match=r"method 'torch_direct': sde_ou_small trains torch_gq, sde_direct"):
        parse_spec(_spec(method=["torch_direct"]))
    with pytest.raises(GridSpecError, match=r"method 'sde_direct' trains only \(sde_ou, sde_ou_small\)"):
        parse_spec({"axes": {"method": ["sde_direct"], "problem": ["workload_l"]}})
    for key, bad in (("ncosines", 0), ("epochs", 0), ("ncosines", 2.5)):
        with pytest.raises(GridSpecError, match=rf"{key} value {bad!r} must be an integer > 0") as e:
            parse_spec(_spec(method=["torch_gq"], **{key: [bad]}))
        assert "\n" not in str(e.value)


def test_ncosines_applies_to_gq_only():
    spec = parse_spec(_spec(method=["torch_gq", "sde_adjoint"], ncosines=[5, 50], seed=[0, 1]))
    gq = [c for c in spec.cases if c.method == "torch_gq"]
    assert sorted(c.ncosines for c in gq) == [5, 5, 50, 50]
    assert all(c.ncosines is None for c in spec.cases if c.method == "sde_adjoint")
    # Training cases run seed by seed, every method of a seed back to back.
    assert [c.seed for c in spec.cases] == [0, 0, 0, 1, 1, 1]
