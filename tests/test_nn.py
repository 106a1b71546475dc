import warnings

import pytest
import torch

from diffmem import nn as dnn
from diffmem.metrics import fraction_within
from diffmem.samplers import sample_ode
from diffmem.schedules import VP
from diffmem.scores import TikhonovScore
from diffmem.training import half_life_from_decay

TWO = torch.tensor([[-1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)


def config(**kw):
    base = dict(lambdas=[0.0], parameterizations=["score"], steps=50,
                ema_half_life=half_life_from_decay(0.9), mlp={"width": 32})
    base.update(kw)
    return dnn.TrainConfig(**base)


def test_losses_match_direct_formulas_and_penalty_gradient():
    gen = torch.Generator().manual_seed(0)
    out = torch.randn(2, 6, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    z = torch.randn(2, 6, 3, generator=gen, dtype=torch.float64)
    sigma = 0.1 + torch.rand(2, 6, generator=gen, dtype=torch.float64)
    noise = [dnn.parameterization("score"), dnn.parameterization("noise")]
    lam = torch.tensor([0.3, 0.2], dtype=torch.float64)[:, None, None]
    loss = dnn.dsm_loss(out, z, sigma, noise, lam)
    s0, s1 = out[0], out[1] / sigma[1, :, None]
    expected0 = ((sigma[0, :, None] * out[0] + z[0]) ** 2).sum(1).mean() + 0.3 * (s0**2).sum(
        1).mean()
    expected1 = ((out[1] + z[1]) ** 2).sum(1).mean() + 0.2 * (s1**2).sum(1).mean()
    assert torch.allclose(loss, torch.stack([expected0, expected1]))
    # gradient of the penalty alone: d/d out of lambda mean |s|^2 = 2 lambda s / (B q)
    zero = torch.zeros_like(z)
    pen_only = dnn.dsm_loss(out, zero, sigma, noise, lam)
    fit = dnn.dsm_loss(out, zero, sigma, noise, 0 * lam)
    (g,) = torch.autograd.grad((pen_only - fit).sum(), out)
    assert torch.allclose(g[0], 2 * 0.3 * out[0] / 6)
    assert torch.allclose(g[1], 2 * 0.2 * out[1] / sigma[1, :, None] ** 2 / 6)


def test_manual_gradients_equal_autograd():
    cfg = dnn.MLPConfig(dim=3, width=16, depth=2)
    model = dnn.ScoreMLP(cfg, ["score", "noise", "score"], seed=1).double()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 7, 3, generator=gen, dtype=torch.float64)
    t = torch.rand(3, 7, generator=gen, dtype=torch.float64)
    z = torch.randn(3, 7, 3, generator=gen, dtype=torch.float64)
    sigma = 0.1 + torch.rand(3, 7, generator=gen, dtype=torch.float64)
    pen = torch.tensor([0.0, 0.1, 0.01], dtype=torch.float64)[:, None, None]
    auto = dnn.dsm_loss(model(x, t), z, sigma, model.params_k, pen)
    auto.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with torch.no_grad():
        manual = dnn.manual_relu_step(model, x, t, z, sigma, pen)
    assert torch.allclose(auto, manual)
    for a, b in zip(grads, [p.grad for p in model.parameters()], strict=True):
        assert torch.allclose(a, b)


def test_stacked_models_are_independent():
    """Training a stack equals training its members one by one (same seed per model)."""
    sch = VP()
    both = dnn.train_dsm(TWO, sch, config(lambdas=[0.0, 0.1],
                                          parameterizations=["score", "score"], steps=30,
                                          batch_size=16), progress=False)
    x = torch.randn(1, 5, 2)
    t = torch.rand(1, 5)
    for k in range(2):
        out = both.model(x, t, slice(k, k + 1))
        assert out.shape == (1, 5, 2)
    assert not torch.allclose(both.model.weights[0][0], both.model.weights[0][1])


def test_large_lambda_network_approaches_closed_form_tikhonov():
    sch = VP()
    lam = 0.1
    errors = []
    gen = torch.Generator().manual_seed(0)
    ts = torch.tensor([0.05, 0.2, 0.5, 0.8], dtype=torch.float64).repeat_interleave(64)
    idx = torch.randint(0, 2, (ts.shape[0],), generator=gen)
    x = (sch.m(ts)[:, None] * TWO[idx] + sch.sigma(ts)[:, None]
         * torch.randn(ts.shape[0], 2, generator=gen, dtype=torch.float64))
    target = TikhonovScore(TWO, sch, lam)(x, ts)

    def record(step, model, ema):
        learned = dnn.NetworkScore(model, sch)(x, ts)
        errors.append(float((learned - target).norm() / target.norm()))

    dnn.train_dsm(TWO, sch, config(lambdas=[lam], steps=3000, batch_size=512,
                                   mlp={"width": 64}, lr=3e-3),
                  checkpoints=[100, 3000], callback=record, progress=False)
    assert errors[1] < 0.5 * errors[0]
    assert errors[1] < 0.1, errors


def test_unregularized_network_memorizes_more_with_more_steps():
    sch = VP()
    x_T = sch.prior_sample(300, 2, torch.Generator().manual_seed(1), dtype=torch.float64)
    fracs = []

    def record(step, model, ema):
        res = sample_ode(sch, dnn.NetworkScore(model, sch), x_T, t_end=1e-3)
        fracs.append(fraction_within(res.samples, TWO, 0.05)[0.05])

    dnn.train_dsm(TWO, sch, config(steps=4000, batch_size=256, mlp={"width": 64}, lr=3e-3),
                  checkpoints=[200, 4000], callback=record, progress=False)
    assert fracs[1] > fracs[0] + 0.2, fracs


def test_interrupt_and_resume_equals_uninterrupted(tmp_path):
    sch = VP()
    cfg = config(lambdas=[0.0, 1e-2], parameterizations=["score", "noise"], steps=240,
                 batch_size=8)
    full = dnn.train_dsm(TWO, sch, cfg, progress=False)
    half = config(lambdas=[0.0, 1e-2], parameterizations=["score", "noise"], steps=120,
                  batch_size=8)
    dnn.train_dsm(TWO, sch, half, checkpoint_dir=tmp_path, progress=False)
    assert dnn.latest_checkpoint(tmp_path).name == "step_000000120.pt"
    resumed = dnn.train_dsm(TWO, sch, cfg, checkpoint_dir=tmp_path, resume=True,
                            progress=False)
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    for a, b in zip(full.ema.state_dict().values(), resumed.ema.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    assert dnn.latest_checkpoint(tmp_path).name == "step_000000240.pt"


def test_checkpoint_schedules():
    assert dnn.checkpoint_steps(100, every=25) == [25, 50, 75, 100]
    log = dnn.checkpoint_steps(10_000, n_log=5)
    assert log == [1, 10, 100, 1000, 10_000]


def test_network_score_plugs_into_samplers():
    sch = VP()
    trained = dnn.train_dsm(TWO, sch, config(parameterizations=["noise"]), progress=False)
    score = dnn.NetworkScore(trained.model, sch)
    x = torch.randn(7, 2, dtype=torch.float64)
    t = torch.full((7,), 0.3, dtype=torch.float64)
    s = score(x, t)
    assert s.shape == x.shape and s.dtype == x.dtype
    assert torch.allclose(score.sigma2_score(x, t), sch.sigma2(t)[:, None] * s, rtol=1e-5)
    res = sample_ode(sch, score, sch.prior_sample(5, 2, dtype=torch.float64), t_end=1e-3)
    assert torch.isfinite(res.samples).all()


def test_ema_warning_when_half_life_is_long():
    with pytest.warns(UserWarning, match=r"decay 0.9999\)"):
        dnn.train_dsm(TWO, VP(), config(ema_half_life=half_life_from_decay(0.9999), steps=20),
                      progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dnn.train_dsm(TWO, VP(), config(ema_half_life=half_life_from_decay(0.9), steps=60),
                      progress=False)


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="parameterization: expected one of"):
        config(parameterizations=["eps"])
    with pytest.raises(ValueError, match="lambda: expected a finite number >= 0"):
        config(lambdas=[-0.1])
    with pytest.raises(ValueError, match="steps: expected an integer >= 1"):
        config(steps=0)
    with pytest.raises(ValueError, match="lambdas: expected one value per model"):
        config(lambdas=[0.0, 0.1])
    with pytest.raises(ValueError, match="width: expected an integer >= 1"):
        dnn.train_dsm(TWO, VP(), config(mlp={"width": 0}), progress=False)
    dnn.train_dsm(TWO, VP(), config(steps=20), checkpoint_dir=tmp_path, progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match="checkpoint: expected a checkpoint of this"):
        dnn.train_dsm(TWO, VP(), config(steps=40, lambdas=[0.5]), checkpoint_dir=tmp_path,
                      resume=True, progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_diagonal_penalty_weight():
    """A unit penalty function reproduces the scalar penalty bit for bit; a diagonal one
    enters the loss as lambda sum_i Lambda_i s_i^2."""
    sch = VP()
    cfg = config(lambdas=[0.1], steps=40, batch_size=8)
    plain = dnn.train_dsm(TWO, sch, cfg, progress=False)
    unit = dnn.train_dsm(TWO, sch, cfg, progress=False, penalty=lambda t: torch.ones(1, 1, 1))
    assert all(torch.equal(a, b) for a, b in zip(plain.model.parameters(),
                                                 unit.model.parameters(), strict=True))
    diag = dnn.train_dsm(TWO, sch, cfg, progress=False,
                         penalty=lambda t: torch.tensor([1.0, 5.0]).expand(*t.shape, 2))
    assert not torch.equal(plain.model.weights[0], diag.model.weights[0])
