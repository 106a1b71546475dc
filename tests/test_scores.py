import math

import pytest
import torch

from diffmem.mixture import gaussian_mixture
from diffmem.schedules import VE, VP
from diffmem.scores import EmpiricalScore, ThresholdScore, TikhonovScore

SCHEDULES = [VE(), VP()]


def log_density(x, train, sch, t):
    """log p_t^N(x) written directly: log (1/N) sum_n N(x; m x_n, sigma^2 I)."""
    m, s2 = sch.m(t), sch.sigma2(t)
    d = x.shape[1]
    sq = ((x[:, None, :] - m * train[None]) ** 2).sum(-1)
    return (torch.logsumexp(-sq / (2 * s2), 1) - math.log(train.shape[0])
            - d / 2 * torch.log(2 * math.pi * s2))


def autograd_score(x, train, sch, t):
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(log_density(xg, train, sch, t).sum(), xg)
    return g


def queries(train, sch, t, n=64, seed=0):
    """Points drawn from p_t^N (where the score matters) plus broad points."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, train.shape[0], (n,), generator=gen)
    near = sch.m(t) * train[idx] + sch.sigma(t) * torch.randn(n, train.shape[1], generator=gen,
                                                               dtype=train.dtype)
    far = 2 * torch.randn(n, train.shape[1], generator=gen, dtype=train.dtype)
    return torch.cat([near, far])


def rel_err(a, b):
    return float(((a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-300)).max())


@pytest.mark.parametrize("sch", SCHEDULES, ids=lambda s: s.name)
@pytest.mark.parametrize("t", [1e-4, 1e-3, 1e-2, 0.1, 0.5, 1.0])
def test_empirical_score_is_gradient_of_log_density(paper_points, sch, t):
    x = queries(paper_points, sch, t)
    score = EmpiricalScore(paper_points, sch)
    assert rel_err(score(x, t), autograd_score(x, paper_points, sch, t)) < 1e-6


@pytest.mark.parametrize("sch", SCHEDULES, ids=lambda s: s.name)
def test_both_kernel_paths_are_gradient_of_log_density_in_higher_dimension(sch):
    gen = torch.Generator().manual_seed(3)
    train = torch.randn(300, 16, generator=gen, dtype=torch.float64)
    for t in [1e-4, 1e-2, 0.7]:
        x = queries(train, sch, t, n=32)
        exact = autograd_score(x, train, sch, t)
        assert rel_err(EmpiricalScore(train, sch)(x, t), exact) < 1e-6  # direct path, d > 8
        mix_kwargs = dict(force_matmul=True, chunk_size=64)
        m = sch.m(t).expand(64)
        s2 = sch.sigma2(t).expand(64)
        mix = gaussian_mixture(x, train, m, s2, **mix_kwargs)
        score = (m[:, None] * mix.mean - x) / s2[:, None]
        assert rel_err(score, exact) < 1e-6


def test_time_may_be_a_batch_tensor(paper_points):
    sch = VP()
    t = torch.tensor([1e-3, 0.2, 0.9], dtype=torch.float64)
    x = torch.randn(3, 2, dtype=torch.float64)
    score = EmpiricalScore(paper_points, sch)
    batched = score(x, t)
    for i in range(3):
        assert torch.allclose(batched[i], score(x[i : i + 1], float(t[i]))[0])


@pytest.mark.parametrize("sch", SCHEDULES, ids=lambda s: s.name)
def test_tikhonov_forms(paper_points, sch):
    t = 0.05
    x = queries(paper_points, sch, t)
    emp = EmpiricalScore(paper_points, sch)(x, t)
    assert torch.allclose(TikhonovScore(paper_points, sch, 0.0)(x, t), emp, rtol=1e-12)
    c = 0.01
    iso = TikhonovScore(paper_points, sch, c)(x, t)
    s2 = float(sch.sigma2(t))
    assert torch.allclose(iso, emp * s2 / (s2 + c), rtol=1e-12)
    # matrix form with Gamma = (c / sigma^2) I equals the isotropic form
    gam = TikhonovScore(paper_points, sch, gamma=lambda tt: (c / sch.sigma2(tt))[:, None, None]
                        * torch.eye(2, dtype=torch.float64).expand(tt.shape[0], 2, 2))
    assert torch.allclose(gam(x, t), iso, rtol=1e-10)
    diag = TikhonovScore(paper_points, sch, gamma=lambda tt: (c / sch.sigma2(tt))[:, None]
                         .expand(tt.shape[0], 2))
    assert torch.allclose(diag(x, t), iso, rtol=1e-10)
    assert torch.allclose(TikhonovScore(paper_points, sch, c,
                                        precision=torch.eye(2, dtype=torch.float64))(x, t), iso)
    assert torch.allclose(TikhonovScore(paper_points, sch, c,
                                        precision=torch.ones(2, dtype=torch.float64))(x, t), iso)


def test_covariance_weighted_tikhonov_matches_direct_solve(paper_points):
    sch, t, c = VE(), 0.02, 0.05
    x = queries(paper_points, sch, t, n=8)
    score = TikhonovScore.covariance_weighted(paper_points, sch, c)
    cov = torch.cov(paper_points.T)
    gamma = c / float(sch.sigma2(t)) * torch.linalg.inv(cov)
    emp = EmpiricalScore(paper_points, sch)(x, t)
    direct = torch.linalg.solve(torch.eye(2, dtype=torch.float64) + gamma, emp.T).T
    assert torch.allclose(score(x, t), direct, rtol=1e-6)
    assert torch.isfinite(score(x, 0.0)).all()


def test_tikhonov_is_finite_at_t0_and_points_to_nearest(paper_points):
    c = 1e-3
    x = paper_points[:5] + 0.01
    s = TikhonovScore(paper_points, VE(), c)(x, 0.0)
    assert torch.allclose(s, (paper_points[:5] - x) / c)


def test_empirical_score_raises_at_t0(paper_points):
    with pytest.raises(ValueError, match="t: expected t > 0"):
        EmpiricalScore(paper_points, VE())(paper_points[:2], 0.0)


def test_threshold_score_dense_and_thin(paper_points):
    sch, t = VE(), 0.01
    emp = EmpiricalScore(paper_points, sch)
    tau = 0.1
    thr = ThresholdScore(paper_points, sch, tau)
    dense = paper_points[:4] + 0.01          # p~ close to 1 > tau
    thin = torch.tensor([[8.0, 8.0], [-7.0, 6.0]], dtype=torch.float64)  # p~ tiny
    assert torch.allclose(thr(dense, t), emp(dense, t), rtol=1e-12)
    sq = ((thin[:, None] - paper_points[None]) ** 2).sum(-1)
    p_tilde = torch.exp(-sq / (2 * sch.sigma2(t))).sum(1)
    assert torch.allclose(thr(thin, t), emp(thin, t) * (p_tilde / tau)[:, None], rtol=1e-9)
    assert float(thr(thin, t).norm()) < 1e-6 * float(emp(thin, t).norm())
    assert torch.allclose(ThresholdScore(paper_points, sch, 0.0)(thin, t), emp(thin, t))
    w = thr.weights(dense, t)
    assert torch.allclose(w.sum(1), torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("force_matmul", [False, True])
def test_results_do_not_depend_on_chunk_size(force_matmul):
    gen = torch.Generator().manual_seed(0)
    train = torch.randn(257, 8, generator=gen, dtype=torch.float64)
    x = torch.randn(40, 8, generator=gen, dtype=torch.float64)
    for s2 in [1e-6, 1e-2, 1.0]:
        m = torch.full((40,), 0.9, dtype=torch.float64)
        v = torch.full((40,), s2, dtype=torch.float64)
        ref = gaussian_mixture(x, train, m, v, chunk_size=257, return_weights=True,
                               force_matmul=force_matmul)
        for chunk in [1, 7, 64, 1000]:
            out = gaussian_mixture(x, train, m, v, chunk_size=chunk, return_weights=True,
                                   force_matmul=force_matmul)
            assert torch.allclose(out.log_norm, ref.log_norm, rtol=1e-12, atol=1e-12)
            assert torch.allclose(out.mean, ref.mean, rtol=1e-12, atol=1e-12)
            assert torch.allclose(out.weights, ref.weights, rtol=1e-10, atol=1e-14)


def test_matmul_path_is_exact_where_distances_are_small():
    """Large offsets make |x|^2 - 2x.y + |y|^2 lose ~1e-4 in float32; at sigma = 1e-3 that is a
    logit error of ~50. The kernel must recompute what decides the weights."""
    gen = torch.Generator().manual_seed(1)
    base = 100 + torch.randn(50, 64, generator=gen, dtype=torch.float64)
    x64 = base[:10] + 1e-3 * torch.randn(10, 64, generator=gen, dtype=torch.float64)
    x64[0] = 0.5 * (base[0] + base[1])  # on a bisector: two weights of 1/2
    m = torch.ones(10, dtype=torch.float64)
    s2 = torch.full((10,), 1e-6, dtype=torch.float64)
    for dtype, tol in [(torch.float64, 1e-8), (torch.float32, 2e-2)]:
        # reference: exact float64 arithmetic on the very values the kernel receives
        xq, yq = x64.to(dtype), base.to(dtype)
        d = ((xq.double()[:, None] - yq.double()[None]) ** 2).sum(-1)
        expected_w = torch.softmax(-d / 2e-6, 1)
        out = gaussian_mixture(xq, yq, m.to(dtype), s2.to(dtype),
                               force_matmul=True, return_weights=True)
        assert torch.isfinite(out.weights).all()
        assert float((out.weights.double() - expected_w).abs().max()) < tol
        assert torch.allclose(out.mean.double(), expected_w @ yq.double(), atol=100 * tol)


def test_no_nan_close_to_training_point(paper_points):
    sch = VE()
    t = float(sch.t_of_s(torch.tensor(-math.log(1e-4), dtype=torch.float64)))  # sigma = 1e-4
    x = paper_points + 1e-6
    for dtype in [torch.float32, torch.float64]:
        for score in [EmpiricalScore(paper_points.to(dtype), sch),
                      TikhonovScore(paper_points.to(dtype), sch, 1e-3),
                      ThresholdScore(paper_points.to(dtype), sch, 0.1)]:
            out = score(x.to(dtype), t)
            assert out.dtype == dtype
            assert torch.isfinite(out).all()
            assert torch.isfinite(score.weights(x.to(dtype), t)).all()
    exact = (paper_points - x) / float(sch.sigma2(t))
    assert torch.allclose(EmpiricalScore(paper_points, sch)(x, t), exact, rtol=1e-6)


def test_denoiser_and_weights(paper_points):
    sch, t = VP(), 0.3
    score = EmpiricalScore(paper_points, sch)
    x = queries(paper_points, sch, t, n=5)
    w = score.weights(x, t)
    assert torch.allclose(w.sum(1), torch.ones(10, dtype=torch.float64))
    assert torch.allclose(score.denoiser(x, t), sch.m(t) * w @ paper_points)
    assert torch.allclose(score.denoiser(x, t), x + sch.sigma2(t) * score(x, t))


def test_image_shaped_data():
    train = torch.rand(6, 1, 4, 4, dtype=torch.float64)
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    flat = EmpiricalScore(train.reshape(6, -1), VE())(x.reshape(3, -1), 0.1)
    assert torch.allclose(EmpiricalScore(train, VE())(x, 0.1).reshape(3, -1), flat)


def test_bad_input_raises(paper_points):
    sch = VE()
    with pytest.raises(ValueError, match="train: expected at least one"):
        EmpiricalScore(torch.empty(0, 2), sch)
    bad = paper_points.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="train: expected finite"):
        EmpiricalScore(bad, sch)
    score = EmpiricalScore(paper_points, sch)
    with pytest.raises(ValueError, match=r"x: expected shape \(batch, \*\(2,\)\)"):
        score(torch.zeros(4, 3, dtype=torch.float64), 0.5)
    with pytest.raises(ValueError, match="x: expected finite"):
        score(torch.tensor([[float("inf"), 0.0]]), 0.5)
    with pytest.raises(ValueError, match="t: expected times in"):
        score(paper_points, 1.5)
    with pytest.raises(ValueError, match=r"t: expected a float or a tensor of shape"):
        score(paper_points, torch.full((3,), 0.5))
    with pytest.raises(ValueError, match="c: expected a finite number >= 0"):
        TikhonovScore(paper_points, sch, -1.0)
    with pytest.raises(ValueError, match="tau: expected a finite number >= 0"):
        ThresholdScore(paper_points, sch, -0.1)
    with pytest.raises(ValueError, match="precision: expected positive definite"):
        TikhonovScore(paper_points, sch, 0.1, precision=-torch.ones(2))


def test_score_exact_near_training_point_in_high_dimension():
    """Image-sized data (d = 784, uniform pixels) through the matrix-product path, where
    |x|^2 - 2 x.y + |y|^2 alone would put logit errors of order 1e3 at sigma = 1e-4."""
    gen = torch.Generator().manual_seed(7)
    train = torch.rand(600, 784, generator=gen, dtype=torch.float64)
    sch = VE()
    direction = torch.randn(16, 784, generator=gen, dtype=torch.float64)
    direction /= direction.norm(dim=1, keepdim=True)
    for dtype, sigma, dist, tol in [(torch.float64, 1e-4, 1e-6, 1e-8),
                                    (torch.float32, 1e-4, 1e-6, None),
                                    (torch.float32, 1e-2, 1e-3, 1e-2)]:
        t = float(sch.t_of_s(torch.tensor(-math.log(sigma), dtype=torch.float64)))
        score = EmpiricalScore(train.to(dtype), sch, chunk_size=128)
        xq = (train[:16] + dist * direction).to(dtype)
        out = score(xq, t).double()
        assert torch.isfinite(out).all()
        w = score.weights(xq, t)
        assert torch.allclose(w.double(), torch.eye(600, dtype=torch.float64)[:16], atol=1e-6)
        if tol is not None:  # reference: exact float64 arithmetic on the same inputs
            ref = (train.to(dtype).double()[:16] - xq.double()) / float(sch.sigma2(t))
            assert rel_err(out, ref) < tol
