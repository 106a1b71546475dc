"""Geometric memorization: the exact Jacobian of every closed-form score equals the Hessian of
its log-density by autograd (float64), one training point is a point (every eigenvalue
-1/sigma^2), many Gaussian points give the Gaussian score's spectrum, the probed path equals
the exact one for the closed form wrapped as a module, the dimension estimators count what
constructed spectra hold, and bad input is refused by name."""

import math

import pytest
import torch

from diffmem import geometry
from diffmem.schedules import EDM, VE, VP
from diffmem.scores import (
    ConditionalEmpiricalScore,
    EmpiricalScore,
    GaussianScore,
    KDEScore,
    SmoothedScore,
    ThresholdScore,
    TikhonovScore,
)

TRAIN = torch.randn(7, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
X = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
T = torch.tensor([0.3, 0.5, 0.05], dtype=torch.float64)
# float64 Hessians of a smooth log-density against a closed form: round-off, not a machine
TOL = 1e-9


def _log_mixture(x, m, var, train=TRAIN, log_prior=None):
    logits = -((x[None] - m * train) ** 2).sum(1) / (2 * var)
    return torch.logsumexp(logits if log_prior is None else logits + log_prior, 0)


def _hessians(fn, x):
    return torch.stack([torch.autograd.functional.hessian(lambda v, i=i: fn(v, i), x[i])
                        for i in range(x.shape[0])])


def _close(got, want):
    assert float((got - want).abs().max()) <= TOL * float(want.abs().max())


@pytest.mark.parametrize("sch", [VE(), VP()], ids=["VE", "VP"])
def test_closed_form_jacobians_equal_autograd_hessians(sch):
    m, s2 = sch.m_sigma2(T)
    hess = _hessians(lambda v, i: _log_mixture(v, m[i], s2[i]), X)
    _close(geometry.jacobian(EmpiricalScore(TRAIN, sch), X, T), hess)
    c = 0.05  # Tikhonov: s_c = sigma^2 / (sigma^2 + c) grad log p
    _close(geometry.jacobian(TikhonovScore(TRAIN, sch, c), X, T),
           hess * (s2 / (s2 + c))[:, None, None])
    h = 0.3  # KDE: the mixture at variance sigma^2 + m^2 h^2
    _close(geometry.jacobian(KDEScore(TRAIN, sch, h), X, T),
           _hessians(lambda v, i: _log_mixture(v, m[i], s2[i] + (m[i] * h) ** 2), X))
    tau = 0.5  # threshold: grad p~ / max(p~, tau), symmetrized

    def thresholded(v, i):
        p = torch.exp(-((v[None] - m[i] * TRAIN) ** 2).sum(1) / (2 * s2[i])).sum()
        return torch.autograd.grad(p, v, create_graph=True)[0] / torch.clamp(p, min=tau)

    jac = torch.stack([torch.autograd.functional.jacobian(
        lambda v, i=i: thresholded(v, i), X[i].clone().requires_grad_(True))
        for i in range(3)])
    _close(geometry.jacobian(ThresholdScore(TRAIN, sch, tau), X, T),
           0.5 * (jac + jac.mT))
    centred = TRAIN - TRAIN.mean(0)
    cov = centred.T @ centred / TRAIN.shape[0]  # the Gaussian score: -(m^2 Sigma + s^2 I)^-1
    want = -torch.linalg.inv(m[:, None, None] ** 2 * cov + s2[:, None, None] * torch.eye(4))
    _close(geometry.jacobian(GaussianScore(TRAIN, sch), X, T), want)
    smoothed = SmoothedScore(TRAIN, sch, 0.2, n_draws=3)  # the mean over its fixed draws
    z = smoothed._z
    _close(geometry.jacobian(smoothed, X, T), torch.stack([
        sum(torch.autograd.functional.hessian(
            lambda v, i=i: _log_mixture(v, m[i], s2[i]), X[i] + 0.2 * z[k]) for k in range(3))
        / 3 for i in range(3)]))


def test_a_conditional_score_uses_its_conditions_weights():
    labels = torch.tensor([0, 0, 1, 1, 1, 0, 1])
    score = ConditionalEmpiricalScore(TRAIN, labels, VE())
    y = torch.tensor([1, 0, 1])
    m, s2 = VE().m_sigma2(T)
    prior = [torch.where(labels == int(y[i]), 0.0, -math.inf).to(torch.float64)
             for i in range(3)]
    want = _hessians(lambda v, i: _log_mixture(v, m[i], s2[i], log_prior=prior[i]), X)
    _close(geometry.jacobian(score, X, T, y), want)
    with pytest.raises(ValueError, match="y: expected the conditions"):
        geometry.jacobian(score, X, T)


def test_one_training_point_is_a_point():
    for sch in (VE(), VP(), EDM()):
        values = geometry.jacobian_spectrum(EmpiricalScore(TRAIN[:1], sch), X, 0.4)
        want = -1 / float(sch.sigma2(torch.tensor(0.4, dtype=torch.float64)))
        assert torch.allclose(values, torch.full_like(values, want), rtol=1e-12)
        dims = geometry.dimensions(values, torch.full((3,), -1 / want))
        assert dims["relative"].tolist() == [0, 0, 0] == dims["cliff"].tolist()


def test_many_gaussian_points_give_the_gaussian_scores_spectrum():
    """With N = 20,000 draws of N(0, diag(4, 1, 0.25)), at a level where the mixture's
    components overlap, the empirical score's spectrum is the Gaussian score's to the
    sampling error of the covariance (a few per cent)."""
    gen = torch.Generator().manual_seed(3)
    train = torch.randn(20000, 3, generator=gen, dtype=torch.float64) * torch.tensor(
        [2.0, 1.0, 0.5], dtype=torch.float64)
    sch = EDM()
    x = torch.randn(4, 3, generator=gen, dtype=torch.float64) * 0.3
    emp = geometry.jacobian_spectrum(EmpiricalScore(train, sch), x, 1.5)
    gauss = geometry.jacobian_spectrum(GaussianScore(train, sch), x, 1.5)
    assert torch.allclose(emp, gauss, rtol=0.05)
    assert torch.allclose(gauss[0], -1 / (torch.tensor([4.0, 1.0, 0.25]) + 2.25).to(gauss),
                          rtol=0.05)


def test_the_probed_path_equals_the_closed_form_for_the_score_as_a_module():
    """The empirical score behind an ``nn.Module`` (no closed form visible): central
    differences along every direction recover the exact spectrum to O(h^2); with fewer
    probes the Ritz values lie within the exact spectrum's range."""
    score = EmpiricalScore(TRAIN, VE())

    class Wrapped(torch.nn.Module):
        schedule = score.schedule

        def forward(self, x, t):
            return score(x, t)

    net = Wrapped()
    exact = geometry.jacobian_spectrum(score, X, 0.4)
    probed = geometry.jacobian_spectrum(net, X, 0.4)
    assert torch.allclose(probed, exact, rtol=1e-3, atol=1e-4 * float(exact.abs().max()))
    few = geometry.jacobian_spectrum(net, X, 0.4, probes=2)
    assert few.shape == (3, 2)
    assert bool((few <= exact[:, :1] + 1e-6).all() and (few >= exact[:, -1:] - 1e-6).all())
    assert geometry.jacobian_spectrum(score, X, 0.4, top_k=2).shape == (3, 2)


def test_estimators_on_constructed_spectra():
    """Ten directions pulling back at 1 and four at 0.01: 4 dimensions by every estimator;
    an isotropic pull: 0; positive eigenvalues pull back at 0 (kept)."""
    spec = torch.tensor([[-0.01] * 4 + [-1.0] * 10], dtype=torch.float64)
    dims = geometry.dimensions(spec, torch.tensor([1.0]))
    assert dims["relative"].tolist() == dims["cliff"].tolist() == dims["gap"].tolist() == [4]
    assert dims["absolute"].tolist() == [4]  # sigma^2 q: 0.01 kept, 1 lost
    weak = geometry.dimensions(spec / 100, torch.tensor([1.0]))  # a pull 100 times weaker:
    assert weak["absolute"].tolist() == [14] and weak["relative"].tolist() == [4]  # scale
    flat = torch.full((1, 14), -2.0, dtype=torch.float64) + 1e-15 * torch.rand(1, 14)
    flat_dims = geometry.dimensions(flat, torch.tensor([0.5]))
    assert flat_dims["relative"].tolist() == flat_dims["cliff"].tolist() == [0]
    assert flat_dims["absolute"].tolist() == [0]  # sigma^2 q = 1: pure noise's pull
    assert flat_dims["gap"].tolist() == [0]
    convex = torch.tensor([[0.3, -1.0, -1.0, -1.0]], dtype=torch.float64)
    assert geometry.relative_dimension(convex).tolist() == [1]
    trace = geometry.dimensions(spec, torch.tensor([1.0]), score_sq=torch.tensor([0.5]))
    assert float(trace["flipd"][0]) == pytest.approx(14 + (-10.04 + 0.5))


def test_bad_input_is_refused_by_name():
    score = EmpiricalScore(TRAIN, VE())
    for kw, match in [({"t": 0.0}, "t: expected a time t > 0"),
                      ({"t": -1.0}, "t: expected a time t > 0"),
                      ({"t": 0.3, "probes": 0}, "probes: expected"),
                      ({"t": 0.3, "probes": 9}, "probes: expected at most the dimension 4"),
                      ({"t": 0.3, "top_k": 0}, "top_k: expected"),
                      ({"t": 0.3, "method": "magic"}, "method: expected")]:
        t = kw.pop("t")
        with pytest.raises(ValueError, match=match):
            geometry.jacobian_spectrum(score, X, t, **kw)
    with pytest.raises(ValueError, match="x: expected finite values"):
        geometry.jacobian_spectrum(score, torch.full((2, 4), math.nan, dtype=torch.float64),
                                   0.3)
    with pytest.raises(ValueError, match="x: expected a tensor"):
        geometry.jacobian_spectrum(score, torch.zeros(4), 0.3)
    with pytest.raises(ValueError, match="score: expected a closed-form score"):
        geometry.jacobian(lambda x, t: -x, X, 0.3)
    tiny = geometry.jacobian_spectrum(score, X, 1e-6)  # sigma ~ 1e-6: finite, no NaN
    assert bool(torch.isfinite(tiny).all())
