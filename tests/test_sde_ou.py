"""The OU training problem's parts: data, loss, metric, and the three methods' steps."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("torchsde", reason="the sde extra (torchsde) is not installed")

from gqbench.training import sde_ou as ou  # noqa: E402


def test_data_are_seeded_and_have_the_ou_marginals():
    a = ou.make_ou_data(3, 400, seed=5, dt=0.01)
    b = ou.make_ou_data(3, 400, seed=5, dt=0.01)
    torch.testing.assert_close(a.ys, b.ys)
    assert a.ys.shape == (3, 400, ou.N_TIMES) and ((a.x0 >= -3) & (a.x0 <= 3)).all()
    torch.testing.assert_close(a.ys[:, :, 0], a.x0[:, None].expand(3, 400))
    # Mean at t = 10 in closed form: m' = 0.2 t - 0.1 m -> m(t) = x0 e^{-0.1t} + 2t - 20 (1 - e^{-0.1t}).
    e = math.exp(-1.0)
    mean10 = a.x0 * e + 20 - 20 * (1 - e)
    sd10 = a.ys[:, :, -1].std(1)
    assert ((a.ys[:, :, -1].mean(1) - mean10).abs() < 4 * sd10 / 20).all()


def test_kl_is_zero_for_equal_fits_and_grows_with_a_shift():
    data = ou.make_ou_data(4, 45, seed=0, dt=0.01).ys
    assert float(ou.kl_loss(data, data)) == pytest.approx(0.0, abs=1e-6)
    assert float(ou.kl_loss(data + 0.5, data)) > float(ou.kl_loss(data + 0.1, data)) > 0


def test_log_likelihood_prefers_the_true_process():
    obs = ou.make_ou_data(4, 45, seed=0, dt=0.01)
    same = ou.make_ou_data(4, 200, seed=0, dt=0.01)  # same x0 (same seed), other paths
    good = float(ou.log_likelihood(same.ys, obs.ys))
    assert good > float(ou.log_likelihood(same.ys + 1.0, obs.ys))
    assert good > float(ou.log_likelihood(same.ys * 0.5 + same.ys.mean(1, keepdim=True) * 0.5, obs.ys))


def _grads(method: str, settings: ou.OUSettings, data: ou.OUData):
    model = ou.build_model(6, seed=3)
    trainer = ou.Trainer(method, model, settings, noise_seed=11)
    pred, _ = trainer.predict(data.x0, data.ts)
    ou.kl_loss(pred, data.ys).backward()
    return [p.grad.clone() for p in model.parameters()]


def test_sde_direct_and_adjoint_take_the_same_gradient():
    s = ou.OUSettings(n_paths=8, sde_dt=0.05)
    data = ou.make_ou_data(2, 8, seed=1, dt=0.05)
    for d, a in zip(_grads("sde_direct", s, data), _grads("sde_adjoint", s, data)):
        torch.testing.assert_close(a, d, rtol=1e-3, atol=1e-6)


def test_training_runs_and_records_epochs():
    s = ou.OUSettings(n_train=4, n_val=2, n_paths=8, batch=2, data_dt=0.05, sde_dt=0.05, ncosines=5)
    rows, bands = ou.train_run("torch_gq", 4, s, seed=0, epochs=2)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert rows[1]["nfe_fwd"] > 0 and rows[1]["nfe_bwd"] > 0 and rows[2]["wall_s"] > rows[1]["wall_s"] > 0
    assert all(math.isfinite(r["val_loglik"]) for r in rows)
    assert {b["kind"] for b in bands} == {"model", "data"} and len(bands) == 2 * 3 * ou.N_TIMES


def test_bad_settings_are_one_line():
    with pytest.raises(ValueError, match=r"^ncosines=0: ncosines must be an int >= 1"):
        ou.OUSettings(ncosines=0)
    with pytest.raises(ValueError, match=r"^sde_dt=-1: sde_dt must be in \(0, 10\]"):
        ou.OUSettings(sde_dt=-1)
    with pytest.raises(ValueError, match="the OU experiment runs torch_gq, sde_direct, sde_adjoint"):
        ou.Trainer("torch_direct", ou.build_model(2, 0), ou.OUSettings())
