"""The kernel density, smoothed and Gaussian closed-form scores: gradients of their log
densities, their samples' distributions, and their limits."""

import math

import pytest
import torch

from diffmem import metrics
from diffmem.samplers import sample_ode
from diffmem.schedules import VE, VP
from diffmem.scores import EmpiricalScore, GaussianScore, KDEScore, SmoothedScore

SCHEDULES = [VE(), VP()]
GEN = torch.Generator().manual_seed(0)
TRAIN = torch.randn(15, 3, generator=GEN, dtype=torch.float64)


def grad(fn, x):
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(xg).sum(), xg)
    return g


def queries(sch, t, n=20):
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 15, (n,), generator=gen)
    near = sch.m(t) * TRAIN[idx] + sch.sigma(t) * torch.randn(n, 3, generator=gen,
                                                               dtype=torch.float64)
    return torch.cat([near, 2 * torch.randn(n, 3, generator=gen, dtype=torch.float64)])


@pytest.mark.parametrize("sch", SCHEDULES, ids=lambda s: s.name)
@pytest.mark.parametrize("t", [1e-3, 0.05, 0.7])
def test_kde_and_gaussian_scores_are_gradients_of_their_log_densities(sch, t):
    x = queries(sch, t)
    m, s2 = sch.m(t), sch.sigma2(t)
    h = 0.3
    var = s2 + (m * h) ** 2

    def log_kde(v):
        sq = ((v[:, None] - m * TRAIN[None]) ** 2).sum(-1)
        return torch.logsumexp(-sq / (2 * var), 1)

    assert torch.allclose(KDEScore(TRAIN, sch, h)(x, t), grad(log_kde, x), rtol=1e-7)
    mu = TRAIN.mean(0)
    cov = (TRAIN - mu).T @ (TRAIN - mu) / 15
    prec = torch.linalg.inv(m * m * cov + s2 * torch.eye(3, dtype=torch.float64))

    def log_gauss(v):
        r = v - m * mu
        return -0.5 * ((r @ prec) * r).sum(1)

    assert torch.allclose(GaussianScore(TRAIN, sch)(x, t), grad(log_gauss, x), rtol=1e-8)


def test_kde_samples_are_training_points_plus_bandwidth_noise():
    """From the exact marginal at T, the ODE carries p_T onto (1/N) sum N(y_n, h^2 I)."""
    sch, h, n = VP(), 0.2, 2000
    gen = torch.Generator().manual_seed(2)
    pick = torch.randint(0, 15, (n,), generator=gen)
    m, var = sch.m(1.0), sch.sigma2(1.0) + (sch.m(1.0) * h) ** 2
    x_T = m * TRAIN[pick] + var.sqrt() * torch.randn(n, 3, generator=gen, dtype=torch.float64)
    out = sample_ode(sch, KDEScore(TRAIN, sch, h), x_T, t_end=0.0).samples
    truth = TRAIN[torch.randint(0, 15, (n,), generator=gen)] + h * torch.randn(
        n, 3, generator=gen, dtype=torch.float64)
    other = TRAIN[torch.randint(0, 15, (n,), generator=gen)] + h * torch.randn(
        n, 3, generator=gen, dtype=torch.float64)
    same = metrics.energy_distance(out, truth)
    baseline = metrics.energy_distance(other, truth)  # two samples of the same law
    assert same < 3 * abs(baseline) + 5e-3
    # not the training points themselves: nearest distances spread like |h z| in 3-D
    _, dist = metrics.nearest(out, TRAIN)
    assert metrics.fraction_within(out, TRAIN, 0.01)[0.01] < 0.01
    assert abs(float(dist.median()) - h * math.sqrt(2.37)) < 0.05  # median of chi_3 = 1.54


def test_gaussian_samples_follow_the_fitted_gaussian():
    sch, n = VE(), 2000
    gen = torch.Generator().manual_seed(3)
    mu = TRAIN.mean(0)
    cov = (TRAIN - mu).T @ (TRAIN - mu) / 15
    chol = torch.linalg.cholesky(cov)
    x_T = mu + torch.randn(n, 3, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(
        cov + sch.sigma2(1.0) * torch.eye(3, dtype=torch.float64)).T
    out = sample_ode(sch, GaussianScore(TRAIN, sch), x_T, t_end=1e-6).samples
    truth = mu + torch.randn(n, 3, generator=gen, dtype=torch.float64) @ chol.T
    assert torch.allclose(out.mean(0), mu, atol=0.1)
    assert torch.allclose(torch.cov(out.T), cov, atol=0.1)
    assert metrics.energy_distance(out, truth) < 0.01


def test_smoothed_score_limits():
    sch, t = VE(), 0.02
    x = queries(sch, t)
    emp = EmpiricalScore(TRAIN, sch)
    assert torch.equal(SmoothedScore(TRAIN, sch, 0.0)(x, t), emp(x, t))
    # the estimate is the average of empirical denoisers at the perturbed inputs
    smooth = SmoothedScore(TRAIN, sch, 0.3, n_draws=5, seed=4)
    z = smooth._z
    by_hand = torch.stack([emp.denoiser(x + 0.3 * zk, t) for zk in z]).mean(0)
    assert torch.allclose(smooth.denoiser(x, t), by_hand, rtol=1e-12)
    # fixed draws: deterministic; the estimate converges as n_draws grows
    assert torch.equal(smooth(x, t), smooth(x, t))
    reference = SmoothedScore(TRAIN, sch, 0.3, n_draws=8000, seed=99).denoiser(x, t)
    errors = [float((SmoothedScore(TRAIN, sch, 0.3, n_draws=k, seed=5).denoiser(x, t)
                     - reference).norm(dim=1).mean()) for k in (4, 64, 1024)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.25 * errors[0]


def test_new_scores_validate_and_work_in_float32():
    sch = VE()
    with pytest.raises(ValueError, match="h: expected a finite number >= 0"):
        KDEScore(TRAIN, sch, -0.1)
    with pytest.raises(ValueError, match="lam: expected a finite number >= 0"):
        SmoothedScore(TRAIN, sch, math.nan)
    with pytest.raises(ValueError, match="n_draws: expected an integer >= 1"):
        SmoothedScore(TRAIN, sch, 0.1, n_draws=0)
    with pytest.raises(ValueError, match="GaussianScore: expected no mixture weights"):
        GaussianScore(TRAIN, sch).weights(TRAIN, 0.5)
    x_T = sch.prior_sample(50, 3, torch.Generator().manual_seed(6))
    for score in (KDEScore(TRAIN.float(), sch, 0.1), SmoothedScore(TRAIN.float(), sch, 0.1, 4),
                  GaussianScore(TRAIN.float(), sch)):
        out = sample_ode(sch, score, x_T, t_end=1e-4).samples
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        assert torch.isfinite(score.sigma2_score(x_T, 0.0)).all()
    assert torch.isfinite(KDEScore(TRAIN, sch, 0.1)(TRAIN, 0.0)).all()


@pytest.mark.parametrize("sch", SCHEDULES, ids=lambda s: s.name)
@pytest.mark.parametrize("t", [1e-12, 1e-15, 0.0])
def test_closed_forms_near_t0_match_their_analytic_values(sch, t):
    """No cancellation as sigma -> 0: the Gaussian score against -(m^2 S + sigma^2 I)^-1
    (x - m mu), KDE (h > 0) against its kernel formula, Tikhonov (c > 0) against
    (m y_nearest - x) / (sigma^2 + c); all finite at t = 0 and to round-off near it."""
    from diffmem.scores import TikhonovScore

    x = 2 * torch.randn(30, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    tt = torch.tensor(t, dtype=torch.float64)
    m, s2 = sch.m(tt), sch.sigma2(tt)
    mu, cov = TRAIN.mean(0), torch.cov(TRAIN.T, correction=0)
    expected = {
        "gaussian": -torch.linalg.solve(m * m * cov + s2 * torch.eye(3, dtype=torch.float64),
                                        (x - m * mu).T).T,
    }
    h = 0.3
    var = s2 + (m * h) ** 2
    w = torch.softmax(-torch.cdist(x, m * TRAIN).pow(2) / (2 * var), dim=1)
    expected["kde"] = (m * w @ TRAIN - x) / var
    c = 0.05
    nearest = TRAIN[torch.cdist(x, m * TRAIN).argmin(1)]
    expected["tikhonov"] = (m * nearest - x) / (s2 + c)
    got = {"gaussian": GaussianScore(TRAIN, sch)(x, t), "kde": KDEScore(TRAIN, sch, h)(x, t),
           "tikhonov": TikhonovScore(TRAIN, sch, c=c)(x, t)}
    for name, ref in expected.items():
        err = ((got[name] - ref).norm(dim=1) / ref.norm(dim=1)).max()
        assert err < 1e-12, (name, float(err))


def test_gaussian_score_refuses_t0_only_for_a_singular_covariance():
    flat = torch.cat([TRAIN[:, :2], torch.zeros(15, 1, dtype=torch.float64)], 1)  # rank 2
    score = GaussianScore(flat, VE())
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with pytest.raises(ValueError, match=r"t: expected t > 0: the training set's covariance is "
                                         r"singular \(rank 2 of 3\)"):
        score(x, 0.0)
    assert torch.isfinite(score.sigma2_score(x, 0.0)).all()
    assert torch.isfinite(score(x, 1e-6)).all()
    assert torch.isfinite(GaussianScore(TRAIN, VE())(x, 0.0)).all()
