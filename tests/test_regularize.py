"""The Tikhonov penalty for every parameterization: minimizing the exact posterior expectation
of loss + penalty over the network's output gives the paper's Tikhonov score."""

import pytest
import torch

from diffmem.models import network_output_to_score
from diffmem.regularize import (
    diffusers_m_sigma,
    diffusers_tikhonov_penalty,
    tikhonov_penalty,
)
from diffmem.schedules import EDM, VP, RectifiedFlow
from diffmem.scores import EmpiricalScore, TikhonovScore

GEN = torch.Generator().manual_seed(0)
TRAIN = torch.randn(6, 3, generator=GEN, dtype=torch.float64)


def _targets(kind, x, y, m, sigma):
    """Per training point n: the regression target of ``kind`` for noisy x from y_n."""
    eps = (x[:, None, :] - m * y[None]) / sigma  # (B, N, d)
    if kind == "epsilon":
        return eps
    if kind == "v_prediction":
        return m * eps - sigma * y[None]
    if kind == "flow":
        return eps - y[None]
    return y[None].expand_as(eps)  # sample, edm


def _minimize(kind, x, weights, targets, m, sigma, lam):
    """argmin_o sum_n w_n |o - target_n|^2 (times EDM's weight) + P(o): the loss is
    quadratic in o, so its minimizer solves (grad = 0) exactly by Newton's step from 0."""
    o = torch.zeros_like(x, requires_grad=True)

    def objective(out):
        fit = (weights[..., None] * (out[:, None, :] - targets).pow(2)).sum((1, 2))
        if kind == "edm":
            fit = fit * (sigma**2 + 0.25) / (sigma * 0.5) ** 2
        pen = tikhonov_penalty(out, x, m=m, sigma=sigma, prediction_type=kind, lam=lam)
        return (fit + pen).sum()

    (g,) = torch.autograd.grad(objective(o), o, create_graph=True)
    hess_diag = torch.stack([torch.autograd.grad(g[:, i].sum(), o, retain_graph=True)[0][:, i]
                             for i in range(x.shape[1])], 1)  # the Hessian is diagonal
    return (-g / hess_diag).detach()


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample", "flow", "edm"])
@pytest.mark.parametrize("lam", [0.05, torch.tensor([0.01, 0.1, 1.0], dtype=torch.float64)],
                         ids=["isotropic", "diagonal"])
def test_minimizer_of_loss_plus_penalty_is_the_tikhonov_score(kind, lam):
    sch = EDM() if kind == "edm" else RectifiedFlow() if kind == "flow" else VP()
    t = 0.3 if kind == "edm" else 0.4
    x = 1.5 * torch.randn(8, 3, generator=GEN, dtype=torch.float64)
    m, sigma = float(sch.m(t)), float(sch.sigma(t))
    weights = EmpiricalScore(TRAIN, sch).weights(x, t)  # the exact posterior over y_n
    out = _minimize(kind, x, weights, _targets(kind, x, TRAIN, m, sigma), m, sigma, lam)
    if kind == "edm":
        score = (out - x) / sigma**2
    else:
        score = network_output_to_score(out, x, torch.tensor(m, dtype=torch.float64),
                                       torch.tensor(sigma, dtype=torch.float64), kind)
    if isinstance(lam, float):
        expected = TikhonovScore(TRAIN, sch, c=lam)(x, t)
    else:
        expected = TikhonovScore(TRAIN, sch, c=1.0, precision=lam)(x, t)
    assert torch.allclose(score, expected, rtol=1e-9, atol=1e-10)
    plain = _minimize(kind, x, weights, _targets(kind, x, TRAIN, m, sigma), m, sigma, 0.0)
    assert not torch.allclose(plain, out, rtol=1e-3)  # the penalty matters


def test_time_dependent_lambda_and_reductions():
    x = torch.randn(4, 2, 3, generator=GEN)
    out = torch.randn(4, 2, 3, generator=GEN)
    sigma = torch.tensor([0.1, 0.5, 1.0, 2.0])
    full = tikhonov_penalty(out, x, m=1.0, sigma=sigma, prediction_type="epsilon",
                            lam=lambda s: 0.1 * s)  # Lambda(t) = 0.1 sigma
    per = (0.1 * sigma[:, None] * out.flatten(1).pow(2) / sigma[:, None] ** 2).sum(1)
    assert torch.allclose(full, per)
    mean = tikhonov_penalty(out, x, m=1.0, sigma=sigma, prediction_type="epsilon",
                            lam=lambda s: 0.1 * s, reduction="mean")
    assert torch.allclose(mean, per / 6)


def test_diffusers_helper_reads_the_scheduler():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(num_train_timesteps=100, prediction_type="v_prediction")
    k = torch.tensor([0, 50, 99])
    m, sigma = diffusers_m_sigma(k, sched)
    assert torch.allclose(m**2, sched.alphas_cumprod[k].double())
    x, v = torch.randn(3, 1, 4, 4, generator=GEN), torch.randn(3, 1, 4, 4, generator=GEN)
    got = diffusers_tikhonov_penalty(v, x, k, sched, lam=0.01)
    want = tikhonov_penalty(v, x, m=m.float(), sigma=sigma.float(),
                            prediction_type="v_prediction", lam=0.01, reduction="mean")
    assert torch.allclose(got, want)
    with pytest.raises(ValueError, match=r"timesteps: expected integer timesteps in \[0, 100\)"):
        diffusers_m_sigma(torch.tensor([100]), sched)


def test_diffusers_helper_reads_a_flow_matching_scheduler():
    """FlowMatchEulerDiscreteScheduler: timesteps are K sigma, the path m = 1 - sigma, the
    network predicts the velocity; at sigma = 1 (x = z) there is nothing to penalize."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=100, shift=3.0)
    k = sched.timesteps[[0, 40, 99]]
    m, sigma = diffusers_m_sigma(k, sched)
    assert torch.allclose(sigma, sched.sigmas[[0, 40, 99]].double())
    assert torch.allclose(m + sigma, torch.ones(3, dtype=torch.float64))
    x, u = torch.randn(3, 1, 4, 4, generator=GEN), torch.randn(3, 1, 4, 4, generator=GEN)
    got = diffusers_tikhonov_penalty(u, x, k, sched, lam=0.01)
    want = tikhonov_penalty(u, x, m=m.float(), sigma=sigma.float(), prediction_type="flow",
                            lam=0.01, reduction="mean")
    assert torch.allclose(got, want) and got[0] == 0 and bool((got[1:] > 0).all())
    with pytest.raises(ValueError, match=r"timesteps: expected timesteps K sigma in \(0, 100\]"):
        diffusers_m_sigma(torch.tensor([0.0]), sched)


@pytest.mark.parametrize("kwargs, message", [
    (dict(lam=-0.1), "lam: expected finite weights >= 0"),
    (dict(lam=torch.ones(5)), "lam: expected a number or weights broadcastable"),
    (dict(prediction_type="x0"), "prediction_type: expected one of"),
    (dict(sigma=torch.tensor([0.5, 0.0, 1.0])), "sigma: expected finite values > 0"),
    (dict(sigma=torch.ones(2)), r"sigma: expected a number or a tensor of shape \(3,\)"),
    (dict(m=torch.ones(3, 1)), r"m: expected a number or a tensor of shape \(3,\)"),
    (dict(reduction="max"), "reduction: expected 'sum' or 'mean'"),
])
def test_bad_input_names_the_argument(kwargs, message):
    args = dict(m=0.9, sigma=0.3, prediction_type="epsilon", lam=0.1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        tikhonov_penalty(torch.zeros(3, 4), torch.zeros(3, 4), **args)
