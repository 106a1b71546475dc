"""No silent NaN: every score, sampler and metric returns finite values or raises the
documented ``ValueError`` (``argument: expected ..., received ...``), for random sizes, dtypes,
schedules, times down to the smallest normal number and 0, and points at, near and far from
the data; and one test per class of defect found by hand."""

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffmem import metrics
from diffmem import nn as dnn
from diffmem.samplers import sample_ode, sample_sde
from diffmem.schedules import EDM, VE, VP
from diffmem.scores import (
    ConditionalEmpiricalScore,
    EmpiricalScore,
    ThresholdScore,
    TikhonovScore,
)

STANDARD = re.compile(r"^[\w.()\-\[\] ]+: expected .+, received .+", re.S)
SCHEDULES = [VE(), VP(), EDM()]


def documented(err: ValueError) -> bool:
    return bool(STANDARD.match(str(err)))


def make_case(seed, n, d, dtype, kind, scale):
    gen = torch.Generator().manual_seed(seed)
    train = (scale * torch.randn(n, d, generator=gen, dtype=torch.float64)).to(dtype)
    if n > 1 and seed % 3 == 0:
        train[1] = train[0]  # duplicated training point
    idx = torch.randint(0, n, (5,), generator=gen)
    noise = torch.randn(5, d, generator=gen, dtype=torch.float64)
    if kind == "at":
        x = train[idx].double()
    elif kind == "near":
        x = train[idx].double() + 1e-6 * scale * noise
    else:
        x = 1e3 * scale * noise
    return train, x.to(dtype)


def times(sch, dtype):
    tiny = torch.finfo(dtype).tiny
    grid = [0.0, tiny, math.sqrt(tiny), 1e-30, 1e-12, 1e-6, 1e-3, 0.1, 0.5]
    return [t * sch.T if t >= 1e-30 else t for t in grid] + [sch.T]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), n=st.integers(1, 30), d=st.integers(1, 5),
       dtype=st.sampled_from([torch.float32, torch.float64]),
       sch=st.sampled_from(SCHEDULES), kind=st.sampled_from(["at", "near", "far"]),
       scale=st.sampled_from([1e-3, 1.0, 100.0]),
       which=st.sampled_from(["empirical", "tikhonov", "threshold"]))
def test_scores_are_finite_or_raise_the_documented_error(seed, n, d, dtype, sch, kind, scale,
                                                         which):
    train, x = make_case(seed, n, d, dtype, kind, scale)
    score = {"empirical": lambda: EmpiricalScore(train, sch),
             "tikhonov": lambda: TikhonovScore(train, sch, 0.1),
             "threshold": lambda: ThresholdScore(train, sch, 0.1)}[which]()
    for t in times(sch, dtype):
        for method in (score, score.sigma2_score, score.denoiser, score.weights):
            try:
                out = method(x, t)
            except ValueError as err:
                assert documented(err), str(err)
                assert method is score, f"{method.__name__} raised at t={t}: {err}"
                continue
            assert torch.isfinite(out).all(), (method, t)
            if method is score.weights:  # the threshold's weights sum to min(1, p~/tau)
                sums = out.double().sum(1)
                if which == "threshold":
                    assert bool(((sums >= 0) & (sums <= 1 + 1e-3)).all())
                else:
                    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-3)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), n=st.integers(1, 12),
       dtype=st.sampled_from([torch.float32, torch.float64]),
       sch=st.sampled_from(SCHEDULES), t_end=st.sampled_from([0.0, 1e-9, 1e-4]),
       method=st.sampled_from(["rk45", "heun", "euler", "sde"]),
       which=st.sampled_from(["empirical", "tikhonov"]))
def test_samplers_and_metrics_are_finite_or_raise(seed, n, dtype, sch, t_end, method, which):
    train, _ = make_case(seed, n, 2, dtype, "at", 1.0)
    score = EmpiricalScore(train, sch) if which == "empirical" else TikhonovScore(train, sch,
                                                                                   0.05)
    x_T = sch.prior_sample(6, 2, torch.Generator().manual_seed(seed), dtype=dtype)
    try:
        if method == "sde":
            res = sample_sde(sch, score, x_T, steps=20, t_end=t_end,
                             generator=torch.Generator().manual_seed(seed))
        else:
            res = sample_ode(sch, score, x_T, t_end=t_end, method=method, steps=20)
    except ValueError as err:
        assert documented(err), str(err)
        return
    assert torch.isfinite(res.samples).all()
    frac = metrics.fraction_within(res.samples, train, [1e-2, 1.0])
    assert all(0 <= f <= 1 for f in frac.values())
    if n >= 2:
        ratio = metrics.nn_ratio(res.samples, train, bootstrap=20)
        assert 0 <= ratio.ci_low <= ratio.fraction <= ratio.ci_high <= 1


# --- one test per class of defect ---------------------------------------------------------
TRAIN = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)


def test_unchecked_regularizer_inputs_are_refused():
    sch = VE()
    with pytest.raises(ValueError, match="precision: expected finite values"):
        TikhonovScore(TRAIN, sch, 0.1, precision=torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="precision: expected a torch.Tensor"):
        TikhonovScore(TRAIN, sch, 0.1, precision=np.eye(2))
    x = TRAIN + 0.1
    singular = TikhonovScore(TRAIN, sch, gamma=lambda t: -torch.ones(t.shape[0], 2))
    with pytest.raises(ValueError, match=r"gamma\(t\): expected 1 \+ Gamma > 0"):
        singular(x, 0.5)
    nan_gamma = TikhonovScore(TRAIN, sch, gamma=lambda t: torch.full((t.shape[0], 2), math.nan))
    with pytest.raises(ValueError, match=r"gamma\(t\): expected finite values"):
        nan_gamma.sigma2_score(x, 0.5)
    indefinite = TikhonovScore(TRAIN, sch, gamma=lambda t: -2 * torch.eye(2).expand(
        t.shape[0], 2, 2))
    with pytest.raises(ValueError, match=r"gamma\(t\): expected a symmetric Gamma with I \+ "
                                         r"Gamma positive definite"):
        indefinite(x, 0.5)
    score = EmpiricalScore(TRAIN, sch)
    for prior, message in [(torch.full((3,), -math.inf), "at least one finite entry per row"),
                           (torch.tensor([0.0, math.nan, 0.0]), "no NaN, no"),
                           (torch.tensor([0.0, math.inf, 0.0]), "no NaN, no"),
                           (torch.zeros(4), r"shape \(3,\) or \(3, 3\)")]:
        with pytest.raises(ValueError, match=f"log_prior: expected .*{message}"):
            score(x, 0.5, log_prior=prior)
    y = torch.tensor([[0.1], [0.2], [0.3]], dtype=torch.float64)
    for std in (math.nan, math.inf, -1.0, "abc"):
        with pytest.raises(ValueError, match="noise_std: expected"):
            ConditionalEmpiricalScore(TRAIN, None, sch, mode="inverse",
                                      operator=torch.eye(2), noise_std=std)
    kernel = ConditionalEmpiricalScore(TRAIN, y, sch, mode="kernel", bandwidth=0.1)
    with pytest.raises(ValueError, match="y: expected finite conditions"):
        kernel(x, 0.5, torch.full((3, 1), math.nan, dtype=torch.float64))


def test_network_score_inputs_and_singularity():
    sch = VP()
    cfg = dnn.TrainConfig(lambdas=[0.0, 0.0], parameterizations=["score", "noise"], steps=2,
                          ema_half_life=0.0, mlp={"width": 8})
    trained = dnn.train_dsm(TRAIN, sch, cfg, progress=False)
    score, noise = dnn.NetworkScore(trained.model, sch, 0), dnn.NetworkScore(trained.model,
                                                                             sch, 1)
    x = TRAIN.clone()
    with pytest.raises(ValueError, match="x: expected finite values"):
        score(torch.full((2, 2), math.nan), 0.5)
    with pytest.raises(ValueError, match="x: expected a tensor .* with 2 values per sample"):
        score(torch.zeros(2, 3), 0.5)
    with pytest.raises(ValueError, match="t: expected t > 0 .*noise parameterization"):
        noise(x, 0.0)
    assert torch.isfinite(noise.sigma2_score(x, 0.0)).all()
    assert torch.isfinite(score(x, 0.0)).all()
    assert score(torch.zeros(0, 2), 0.5).shape == (0, 2)
    with pytest.raises(ValueError, match="t: expected a number or a tensor of times, "
                                         "received list"):
        score(x, [0.5, 0.5, 0.5])


def test_small_t_limit_is_continuous_and_finite_or_refused():
    """sigma^2 that underflows (subnormal) takes the sigma -> 0 limit: sigma2_score is finite
    and continuous, a singular score raises, a score that overflows the dtype raises."""
    cases = [(torch.float32, EDM(), 1e-20), (torch.float64, EDM(), 1e-160)]
    for dtype, sch, t in cases:
        train = TRAIN.to(dtype)
        x = train[:2] + 0.25
        for score in (EmpiricalScore(train, sch), TikhonovScore(train, sch, 0.1),
                      ThresholdScore(train, sch, 0.1)):
            at_t, at_0 = score.sigma2_score(x, t), score.sigma2_score(x, 0.0)
            assert torch.isfinite(at_t).all() and torch.allclose(at_t, at_0, atol=1e-30)
            w = score.weights(x, t)
            assert torch.isfinite(w).all()
        with pytest.raises(ValueError, match="t: expected t > 0 with sigma"):
            EmpiricalScore(train, sch)(x, t)
        tik = TikhonovScore(train, sch, 0.1)
        assert torch.allclose(tik(x, t), (train[[0, 1]] - x) / 0.1, rtol=1e-6)
    # far from the data in float32 at tiny t: weights one-hot, the score refused (overflow)
    far = torch.tensor([[300.0, 300.0]])
    score = EmpiricalScore(TRAIN.float(), VE())
    w = score.weights(far, 1e-37)
    assert torch.equal(w, torch.tensor([[0.0, 0.0, 1.0]]))
    with pytest.raises(ValueError, match=r"t: expected a time at which the score is "
                                         r"representable in torch.float32"):
        score(far, 1e-37)
    assert torch.isfinite(score.sigma2_score(far, 1e-37)).all()
    # the threshold's damping is continuous down to t = 0: off the data p~ -> 0
    thr = ThresholdScore(TRAIN, VE(), 0.1)
    off = TRAIN[:1] + 0.3
    assert torch.equal(thr.sigma2_score(off, 1e-12), thr.sigma2_score(off, 0.0))
    assert torch.equal(thr.sigma2_score(off, 0.0), torch.zeros(1, 2, dtype=torch.float64))
    on = TRAIN[:1] + 1e-9  # near a point the limit is the undamped pull, at every small t
    assert torch.allclose(thr.sigma2_score(on, 1e-12), thr.sigma2_score(on, 1e-30))


def test_weights_far_from_duplicated_points_sum_to_one_and_ties_split():
    twice = torch.tensor([[0.0, 0.0], [0.0, 0.0], [5.0, 0.0]], dtype=torch.float64)
    score = EmpiricalScore(twice, EDM())
    w = score.weights(torch.tensor([[-500.0, 300.0]], dtype=torch.float64), 1e-7)
    assert torch.allclose(w, torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64))
    # at t = 0 a point equidistant from the three points gets the softmax limit: equal
    # weights on every tied point (the duplicate counts twice), their average as denoiser
    mid = torch.tensor([[2.5, 1.0]], dtype=torch.float64)
    assert torch.allclose(score.weights(mid, 0.0), torch.full((1, 3), 1 / 3,
                                                              dtype=torch.float64))
    assert torch.allclose(score.denoiser(mid, 0.0), torch.tensor([[5 / 3, 0.0]],
                                                                 dtype=torch.float64))
    assert torch.allclose(score.weights(mid, 1e-3), score.weights(mid, 0.0))


def test_obscure_api_errors_are_named():
    with pytest.raises(ValueError, match="n: expected an integer >= 0, received -1"):
        VE().prior_sample(-1, 2)
    assert VE().prior_sample(0, 2).shape == (0, 2)
    with pytest.raises(ValueError, match="a: expected a finite number > 0, received 'abc'"):
        VE(a="abc")
    with pytest.raises(ValueError, match="t: expected a number or a tensor of times"):
        VE().sigma([0.1, 0.2])
    score = EmpiricalScore(TRAIN, VE())
    empty = torch.zeros(0, 2, dtype=torch.float64)
    assert score(empty, 0.5).shape == (0, 2) and score.weights(empty, 0.5).shape == (0, 3)
    res = sample_ode(VE(), score, empty)
    assert res.samples.shape == (0, 2) and res.stats["score_evals"] == 0
    assert sample_sde(VE(), score, empty).samples.shape == (0, 2)
    assert metrics.nearest(empty, TRAIN)[0].shape == (0,)
    with pytest.raises(ValueError, match="samples: expected at least one sample"):
        metrics.fraction_within(empty, TRAIN, 0.1)
    with pytest.raises(ValueError, match="samples: expected at least one sample"):
        metrics.nn_ratio(empty, TRAIN)
    with pytest.raises(ValueError, match="n_record: expected an integer >= 1"):
        sample_ode(VE(), score, TRAIN, return_trajectory=True, n_record=0)
    with pytest.raises(ValueError, match="samples: expected a torch.Tensor"):
        metrics.nearest(np.zeros((2, 2)), TRAIN)


def test_edm_sampler_stops_on_a_non_finite_denoiser():
    from diffmem.edm import edm_sample, karras_sigmas

    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)

    def broken(v, sigma):
        return torch.where(sigma[:, None, None, None] < 1, math.nan, 0.0) * v

    with pytest.raises(ValueError, match=r"denoiser: expected finite values, received "
                                         r"non-finite values for 3 of 3 samples at sigma = 0\."):
        edm_sample(broken, x, karras_sigmas(10))
    with pytest.raises(ValueError, match=r"denoiser: expected a tensor of the shape of x"):
        edm_sample(lambda v, s: v[:, :, :2], x, karras_sigmas(3))
