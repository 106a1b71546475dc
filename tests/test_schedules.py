import math

import pytest
import torch

from diffmem.schedules import EDM, VE, VP, RectifiedFlow, Schedule, get_schedule

SCHEDULES = [VE(), VP(), EDM(), RectifiedFlow()]


def test_ve_formulas_match_paper():
    ve = VE(a=10.0)
    t = torch.tensor([0.0, 0.1, 0.5, 1.0], dtype=torch.float64)
    assert torch.allclose(ve.sigma2(t), (10.0 ** (2 * t) - 1) / (2 * math.log(10.0)))
    assert torch.allclose(ve.g(t), 10.0**t)
    assert torch.equal(ve.m(t), torch.ones_like(t))
    x = torch.randn(4, 3, dtype=torch.float64)
    assert torch.equal(ve.f(x, t), torch.zeros_like(x))


def test_vp_formulas_match_paper():
    vp = VP(beta_min=0.001, beta_max=3.0)
    t = torch.tensor([0.0, 0.1, 0.5, 1.0], dtype=torch.float64)
    alpha = 0.001 * t + t**2 * (3.0 - 0.001) / 2
    beta = 0.001 + t * (3.0 - 0.001)
    assert torch.allclose(vp.m(t), torch.exp(-alpha / 2))
    assert torch.allclose(vp.sigma2(t), 1 - torch.exp(-alpha))
    assert torch.allclose(vp.g2(t), beta)
    x = torch.randn(4, 3, dtype=torch.float64)
    assert torch.allclose(vp.f(x, t), -beta[:, None] * x / 2)


def test_edm_formulas():
    edm = EDM()
    t = torch.tensor([0.0, 0.5, 3.0, 80.0], dtype=torch.float64)
    assert torch.allclose(edm.sigma(t), t)
    assert torch.allclose(edm.g2(t), 2 * t)
    assert edm.T == 80.0


@pytest.mark.parametrize("sch", SCHEDULES, ids=lambda s: s.name)
def test_g2_is_consistent_with_autograd_derivatives(sch):
    t = torch.linspace(0.01, 0.99, 7, dtype=torch.float64) * sch.T
    tg = t.clone().requires_grad_(True)
    s2 = sch.sigma2(tg)
    (ds2,) = torch.autograd.grad(s2.sum(), tg)
    tg = t.clone().requires_grad_(True)
    (dlogm,) = torch.autograd.grad(torch.log(sch.m(tg)).sum(), tg)
    assert torch.allclose(sch.dsigma2(t), ds2, rtol=1e-10)
    assert torch.allclose(sch.dlog_m(t), dlogm, rtol=1e-10, atol=1e-14)
    assert torch.allclose(sch.g2(t), ds2 - 2 * dlogm * sch.sigma2(t), rtol=1e-10)


@pytest.mark.parametrize("sch", SCHEDULES, ids=lambda s: s.name)
def test_transformed_time_inverts(sch):
    t = torch.logspace(-8, 0, 30, dtype=torch.float64) * sch.T
    s = sch.s(t)
    assert torch.allclose(s, -torch.log(sch.sigma(t)))
    assert torch.allclose(sch.t_of_s(s), t, rtol=1e-9)
    # far into transformed time (s = 100, sigma = e^-100) the inverse is still accurate
    t_far = sch.t_of_s(torch.tensor(100.0, dtype=torch.float64))
    assert t_far > 0
    assert math.isclose(float(sch.s(t_far)), 100.0, rel_tol=1e-12)


@pytest.mark.parametrize("sch", [VE(), VP()], ids=lambda s: s.name)
def test_float32_accurate_at_small_t(sch):
    t64 = torch.tensor([1e-6, 1e-4, 1e-3], dtype=torch.float64)
    exact = sch.sigma2(t64)
    approx = sch.sigma2(t64.float()).double()
    assert torch.allclose(approx, exact, rtol=1e-5)


def test_prior_sample_scale_and_shape():
    vp = VP()
    gen = torch.Generator().manual_seed(0)
    x = vp.prior_sample(20000, (2, 3), gen, dtype=torch.float64)
    assert x.shape == (20000, 2, 3)
    assert abs(float(x.std()) - float(vp.sigma(1.0))) < 0.01


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_time_outside_range_raises(bad):
    with pytest.raises(ValueError, match="t: expected"):
        VE().sigma(bad)
    with pytest.raises(ValueError, match="t: expected"):
        VP().m(torch.tensor([0.5, bad]))


def test_bad_schedule_parameters_raise():
    with pytest.raises(ValueError, match="a: expected"):
        VE(a=-2.0)
    with pytest.raises(ValueError, match="beta_max: expected"):
        VP(beta_min=1.0, beta_max=0.5)
    with pytest.raises(ValueError, match="schedule: expected"):
        get_schedule("XX")


def test_cached_start_of_transformed_time_follows_the_parameters():
    sch = VE()
    assert sch.s_T == pytest.approx(float(sch.s(sch.T)), rel=1e-15)
    sch.a = 5.0
    assert sch.s_T == pytest.approx(float(VE(5.0).s(1.0)), rel=1e-15)
    assert repr(sch) == "VE(a=5.0)"


@pytest.mark.parametrize("sch", SCHEDULES, ids=lambda s: s.name)
def test_t_of_ratio_inverts_sigma_over_m(sch):
    t = torch.logspace(-6, 0, 25, dtype=torch.float64) * sch.T
    r = sch.sigma(t) / sch.m(t)
    assert torch.allclose(sch.t_of_ratio(r), t, rtol=1e-9)
    generic = Schedule.t_of_ratio(sch, r)  # the bisection every schedule inherits
    assert torch.allclose(generic, t, rtol=1e-9, atol=1e-15)


def test_rectified_flow_is_the_linear_path():
    sch = RectifiedFlow()
    t = torch.tensor([0.0, 0.25, 0.5, 0.9], dtype=torch.float64)
    assert torch.equal(sch.m(t), 1 - t) and torch.equal(sch.sigma(t), t)
    with pytest.raises(ValueError, match=r"t_max: expected a time in \(0, 1\)"):
        RectifiedFlow(1.0)
    with pytest.raises(ValueError, match="t: expected times in"):
        sch.m(0.9995)
