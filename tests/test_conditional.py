import math

import pytest
import torch

from diffmem import nn as dnn
from diffmem.metrics import nearest
from diffmem.samplers import sample_ode, sample_sde
from diffmem.schedules import VE, VP
from diffmem.scores import ConditionalEmpiricalScore, EmpiricalScore

GEN = torch.Generator().manual_seed(0)
X = torch.randn(12, 2, generator=GEN, dtype=torch.float64)
Y_CONT = X[:, :1] + 0.1 * torch.randn(12, 1, generator=GEN, dtype=torch.float64)
LABELS = torch.tensor([0, 1, 2] * 4)
A = torch.tensor([[1.0, 0.5]], dtype=torch.float64)


def autograd_conditional(x, t, sch, log_pi):
    """grad_x log sum_n pi_n N(x; m x_n, sigma^2 I), pi given as (B, N) log weights."""
    xg = x.clone().requires_grad_(True)
    sq = ((xg[:, None] - sch.m(t) * X[None]) ** 2).sum(-1)
    logp = torch.logsumexp(log_pi - sq / (2 * sch.sigma2(t)), 1)
    (g,) = torch.autograd.grad(logp.sum(), xg)
    return g


def queries(sch, t, n=24):
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 12, (n,), generator=gen)
    return idx, sch.m(t) * X[idx] + sch.sigma(t) * torch.randn(n, 2, generator=gen,
                                                                 dtype=torch.float64)


@pytest.mark.parametrize("sch", [VE(), VP()], ids=lambda s: s.name)
@pytest.mark.parametrize("t", [1e-3, 0.05, 0.6])
def test_each_mode_is_gradient_of_its_conditional_log_density(sch, t):
    idx, x = queries(sch, t)
    # labels
    score = ConditionalEmpiricalScore(X, LABELS, sch, mode="labels")
    y = LABELS[idx]
    log_pi = torch.where(y[:, None] == LABELS[None], 0.0, -math.inf).double()
    assert torch.allclose(score(x, t, y), autograd_conditional(x, t, sch, log_pi), rtol=1e-6)
    # kernel
    h = 0.3
    score = ConditionalEmpiricalScore(X, Y_CONT, sch, mode="kernel", bandwidth=h)
    yq = Y_CONT[idx] + 0.05
    log_pi = -((yq[:, None] - Y_CONT[None]) ** 2).sum(-1) / (2 * h * h)
    assert torch.allclose(score(x, t, yq), autograd_conditional(x, t, sch, log_pi), rtol=1e-6)
    # inverse problem y = A x + eta
    s_y = 0.2
    score = ConditionalEmpiricalScore(X, None, sch, mode="inverse", operator=A, noise_std=s_y)
    obs = X[idx] @ A.T + 0.1
    log_pi = -((obs[:, None] - (X @ A.T)[None]) ** 2).sum(-1) / (2 * s_y**2)
    assert torch.allclose(score(x, t, obs), autograd_conditional(x, t, sch, log_pi),
                          rtol=1e-6)


def test_inverse_weights_are_bayes_rule():
    sch, t = VE(), 0.02
    s_y = torch.tensor([0.3], dtype=torch.float64)
    score = ConditionalEmpiricalScore(X, None, sch, mode="inverse", operator=lambda v: v[:, :1]
                                      + 0.5 * v[:, 1:], noise_std=s_y)
    x = X[:3] + 0.05
    obs = torch.tensor([[0.2], [-0.4], [1.0]], dtype=torch.float64)
    w = score.weights(x, t, obs)
    # Bayes: p(n | x, y) = p(n) p(y | n) p(x | n) / sum, p(n) = 1/N
    prior = torch.full((12,), 1 / 12, dtype=torch.float64)
    lik_y = torch.exp(-((obs - (X @ A.T).T) ** 2) / (2 * 0.09))
    sig2 = sch.sigma2(t)
    lik_x = torch.exp(-((x[:, None] - X[None]) ** 2).sum(-1) / (2 * sig2)) / (2 * math.pi * sig2)
    post = prior * lik_y * lik_x
    assert torch.allclose(w, post / post.sum(1, keepdim=True), rtol=1e-9)


def test_training_labels_return_their_sample_and_kernel_converges():
    sch = VE()
    distinct = torch.arange(12)
    x_T = sch.prior_sample(12, 2, torch.Generator().manual_seed(2), dtype=torch.float64)
    exact = ConditionalEmpiricalScore(X, distinct, sch, mode="labels")
    res = sample_ode(sch, exact, x_T, t_end=1e-6, cond=distinct)
    assert (res.samples - X).norm(dim=1).max() < 1e-2
    errs = []
    for h in [0.3, 0.03, 1e-3]:
        ker = ConditionalEmpiricalScore(X, distinct.double()[:, None], sch, mode="kernel",
                                        bandwidth=h)
        out = sample_ode(sch, ker, x_T, t_end=1e-6, cond=distinct.double()[:, None])
        errs.append(float((out.samples - X).norm(dim=1).max()))
    assert errs[-1] < 1e-2 and errs[-1] <= errs[0]


def test_regularized_variants_and_broadcast():
    sch, t = VP(), 0.1
    idx, x = queries(sch, t, n=6)
    y = Y_CONT[idx]
    plain = ConditionalEmpiricalScore(X, Y_CONT, sch, mode="kernel", bandwidth=0.2)
    tik0 = ConditionalEmpiricalScore(X, Y_CONT, sch, mode="kernel", bandwidth=0.2, c=0.0)
    tik = ConditionalEmpiricalScore(X, Y_CONT, sch, mode="kernel", bandwidth=0.2, c=0.05)
    thr = ConditionalEmpiricalScore(X, Y_CONT, sch, mode="kernel", bandwidth=0.2, tau=1e-12)
    s2 = float(sch.sigma2(t))
    assert torch.allclose(tik0(x, t, y), plain(x, t, y))
    assert torch.allclose(tik(x, t, y), plain(x, t, y) * s2 / (s2 + 0.05))
    assert torch.allclose(thr(x, t, y), plain(x, t, y))
    one = Y_CONT[3]
    assert torch.allclose(plain(x, t, one), plain(x, t, one.expand(6, 1)))
    # the same through a sampler: a single y broadcasts
    x_T = sch.prior_sample(6, 2, torch.Generator().manual_seed(3), dtype=torch.float64)
    a = sample_ode(sch, plain, x_T, t_end=1e-3, cond=one[None])
    b = sample_ode(sch, plain, x_T, t_end=1e-3, cond=one.expand(6, 1))
    assert torch.allclose(a.samples, b.samples)
    c = sample_sde(sch, plain, x_T, t_end=1e-3, cond=one[None],
                   generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(c.samples).all()


def test_conditional_network_trains_and_samples():
    sch = VP()
    cfg = dnn.TrainConfig(lambdas=[0.0], parameterizations=["score"], steps=300,
                          ema_half_life=6.6, batch_size=64, mlp={"width": 32})
    trained = dnn.train_dsm(X, sch, cfg, train_y=Y_CONT, progress=False)
    score = dnn.NetworkScore(trained.model, sch)
    x_T = sch.prior_sample(5, 2, dtype=torch.float64)
    res = sample_ode(sch, score, x_T, t_end=1e-3, cond=Y_CONT[:1])
    assert res.samples.shape == (5, 2) and torch.isfinite(res.samples).all()
    with pytest.raises(ValueError, match="y: expected a condition of 1 values"):
        score(x_T, 0.5)


def test_conditional_bad_input():
    sch = VE()
    with pytest.raises(ValueError, match="bandwidth: expected a finite number > 0"):
        ConditionalEmpiricalScore(X, Y_CONT, sch, mode="kernel", bandwidth=0.0)
    with pytest.raises(ValueError, match="bandwidth: expected a bandwidth"):
        ConditionalEmpiricalScore(X, Y_CONT, sch, mode="kernel")
    with pytest.raises(ValueError, match="operator: expected a matrix with 2 columns"):
        ConditionalEmpiricalScore(X, None, sch, mode="inverse", operator=torch.ones(1, 3),
                                  noise_std=0.1)
    with pytest.raises(ValueError, match="noise_std: expected"):
        ConditionalEmpiricalScore(X, None, sch, mode="inverse", operator=A, noise_std=-1.0)
    with pytest.raises(ValueError, match="train_y: expected a tensor with one condition"):
        ConditionalEmpiricalScore(X, Y_CONT[:5], sch, mode="kernel", bandwidth=0.1)
    with pytest.raises(ValueError, match="mode: expected one of"):
        ConditionalEmpiricalScore(X, Y_CONT, sch, mode="posterior")
    score = ConditionalEmpiricalScore(X, Y_CONT, sch, mode="kernel", bandwidth=0.1)
    with pytest.raises(ValueError, match=r"y: expected shape \(3, \*\(1,\)\)"):
        score(X[:3], 0.5, torch.zeros(3, 2, dtype=torch.float64))
    labels = ConditionalEmpiricalScore(X, LABELS, sch, mode="labels")
    with pytest.raises(ValueError, match="y: expected labels present in the training set"):
        labels(X[:2], 0.5, torch.tensor([0, 7]))


def test_empirical_and_labels_agree_with_one_class():
    sch, t = VE(), 0.2
    _, x = queries(sch, t, n=5)
    one_class = ConditionalEmpiricalScore(X, torch.zeros(12), sch, mode="labels")
    assert torch.allclose(one_class(x, t, torch.zeros(5)), EmpiricalScore(X, sch)(x, t))
    assert nearest(X[:2], X)[1].max() == 0
