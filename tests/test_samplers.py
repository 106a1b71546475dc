import math

import pytest
import torch

from diffmem.metrics import convergence_slopes, fraction_within, nearest
from diffmem.samplers import sample_ode, sample_ode_transformed, sample_sde
from diffmem.schedules import VE, VP
from diffmem.scores import EmpiricalScore, TikhonovScore

SCHEDULES = [VE(), VP()]


def noise(sch, n, seed=0):
    return sch.prior_sample(n, 2, torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("sch", SCHEDULES, ids=lambda s: s.name)
def test_ode_with_empirical_score_returns_training_points(paper_points, sch):
    result = sample_ode(sch, EmpiricalScore(paper_points, sch), noise(sch, 300), t_end=1e-6)
    assert fraction_within(result.samples, paper_points, 1e-2)[1e-2] == 1.0
    assert result.stats["score_evals"] > 0


@pytest.mark.parametrize("sch", SCHEDULES, ids=lambda s: s.name)
def test_trajectories_converge_at_rate_sigma(paper_points, sch):
    t_end = 1e-6
    result = sample_ode(sch, EmpiricalScore(paper_points, sch), noise(sch, 30, seed=1),
                        t_end=t_end, return_trajectory=True)
    sigma = sch.sigma(result.times)
    slopes = convergence_slopes(result.trajectory, result.samples, sigma,
                                (10 * float(sch.sigma(t_end)), 0.1))
    assert abs(float(slopes.median()) - 1.0) < 0.1


@pytest.mark.parametrize("sch", SCHEDULES, ids=lambda s: s.name)
def test_transformed_time_rate_and_agreement(paper_points, sch):
    score = EmpiricalScore(paper_points, sch)
    x = noise(sch, 20, seed=2)
    res = sample_ode_transformed(sch, score, x, s_end=20.0, rtol=1e-8, atol=1e-10,
                                 return_trajectory=True)
    slopes = convergence_slopes(res.trajectory, res.samples, res.s_times, (3.0, 15.0),
                                log_abscissa=False)
    assert abs(float(slopes.median()) + 1.0) < 0.05
    # the same ODE in t ends at the same points
    t_end = float(sch.t_of_s(torch.tensor(20.0, dtype=torch.float64)))
    direct = sample_ode(sch, score, x, t_end=t_end, rtol=1e-8, atol=1e-10)
    assert torch.allclose(direct.samples, res.samples, atol=1e-5)
    assert torch.allclose(res.times, sch.t_of_s(res.s_times))


def test_ve_transformed_drift_is_denoiser_minus_x(paper_points):
    """For VE, dx/ds = D_e(x, t) - x: one small Euler step in s moves x by h (D_e - x)."""
    sch = VE()
    score = EmpiricalScore(paper_points, sch)
    x = noise(sch, 5)
    s0 = float(sch.s(sch.T))
    h = 1e-3
    res = sample_ode_transformed(sch, score, x, s_end=s0 + h, method="euler", steps=1)
    expected = x + h * (score.denoiser(x, sch.T) - x)
    assert torch.allclose(res.samples, expected, rtol=1e-10)


def test_bisector_starts_go_to_the_average():
    sch = VE()
    two = torch.tensor([[-1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    starts = torch.tensor([[0.0, 2.1], [0.0, -2.1], [0.3, 2.1]], dtype=torch.float64)
    res = sample_ode_transformed(sch, EmpiricalScore(two, sch), starts, s_end=40.0,
                                 rtol=1e-9, atol=1e-9)
    assert res.samples[:2].abs().max() < 1e-6
    assert torch.allclose(res.samples[2], two[1], atol=1e-6)
    four = torch.tensor([[1.0, 0], [0, 1.0], [-1.0, 0], [0, -1.0]], dtype=torch.float64)
    corners = torch.tensor([[2.1, 2.1], [-2.1, 2.1], [-2.1, -2.1]], dtype=torch.float64)
    res = sample_ode_transformed(sch, EmpiricalScore(four, sch), corners, s_end=40.0,
                                 rtol=1e-9, atol=1e-9)
    assert torch.allclose(res.samples, corners.sign() / 2, atol=1e-6)


def test_step_control_is_per_sample(paper_points):
    sch = VE()
    score = EmpiricalScore(paper_points, sch)
    x = noise(sch, 200, seed=3)
    batch = sample_ode(sch, score, x, t_end=1e-6)
    alone = sample_ode(sch, score, x[:1], t_end=1e-6)
    assert batch.stats["steps_per_sample"][0] == alone.stats["steps_per_sample"][0]
    assert batch.stats["steps_max"] > alone.stats["steps_max"]
    assert torch.allclose(batch.samples[0], alone.samples[0], atol=1e-12)
    stiff = sample_ode(sch, score, x, t_end=1e-6, variable="t")
    stiff_alone = sample_ode(sch, score, x[:1], t_end=1e-6, variable="t")
    assert stiff.stats["steps_per_sample"][0] == stiff_alone.stats["steps_per_sample"][0]


@pytest.mark.parametrize(("method", "order"), [("euler", 1), ("heun", 2)])
def test_fixed_step_methods_converge_at_their_order(method, order):
    """One training point at 0: s = -x / sigma^2 and the VE flow is x(t) = x_T sigma(t)/sigma(T)."""
    sch = VE()
    score = EmpiricalScore(torch.zeros(1, 2, dtype=torch.float64), sch)
    x = noise(sch, 4)
    t_end = 0.2
    exact = x * sch.sigma(t_end) / sch.sigma(1.0)
    errs = [float((sample_ode(sch, score, x, t_end=t_end, method=method, steps=n).samples
                   - exact).abs().max()) for n in (20, 40, 80)]
    ratios = [errs[0] / errs[1], errs[1] / errs[2]]
    assert all(abs(math.log2(r) - order) < 0.15 for r in ratios), (errs, ratios)


def test_tikhonov_ode_runs_to_t0(paper_points):
    sch = VE()
    res = sample_ode(sch, TikhonovScore(paper_points, sch, 1e-2), noise(sch, 100), t_end=0.0)
    assert torch.isfinite(res.samples).all()
    _, dist = nearest(res.samples, paper_points)
    assert float(dist.max()) < 1.0


def test_trajectory_recording(paper_points):
    sch = VP()
    score = EmpiricalScore(paper_points, sch)
    x = noise(sch, 6)
    times = torch.tensor([1.0, 0.5, 0.1, 0.01], dtype=torch.float64)
    res = sample_ode(sch, score, x, t_end=0.01, return_trajectory=True, t_eval=times)
    assert res.trajectory.shape == (6, 4, 2)
    assert torch.allclose(res.trajectory[:, 0], x)
    assert torch.allclose(res.trajectory[:, -1], res.samples)
    heun = sample_ode(sch, score, x, t_end=0.01, method="heun", steps=10,
                      return_trajectory=True, t_eval=times)
    assert heun.trajectory.shape == (6, 4, 2)
    assert torch.allclose(heun.trajectory[:, -1], heun.samples)


def test_sde_memorizes(paper_points):
    sch = VP()
    gen = torch.Generator().manual_seed(0)
    res = sample_sde(sch, EmpiricalScore(paper_points, sch), noise(sch, 300), steps=100,
                     t_end=1e-3, generator=gen, grid="geometric")
    assert fraction_within(res.samples, paper_points, 1e-2)[1e-2] > 0.99
    # the same noise gives the same samples
    again = sample_sde(sch, EmpiricalScore(paper_points, sch), noise(sch, 300), steps=100,
                       t_end=1e-3, generator=torch.Generator().manual_seed(0), grid="geometric")
    assert torch.equal(res.samples, again.samples)


def test_sampler_bad_input(paper_points):
    sch = VE()
    score = EmpiricalScore(paper_points, sch)
    x = noise(sch, 3)
    with pytest.raises(ValueError, match="t_end: expected"):
        sample_ode(sch, score, x, t_end=1.0)
    with pytest.raises(ValueError, match="t_end: expected"):
        sample_ode(sch, score, x, t_end=-1e-3)
    with pytest.raises(ValueError, match="method: expected"):
        sample_ode(sch, score, x, method="rk4")
    calls = []
    with pytest.raises(ValueError, match="max_steps: expected"):  # before any integration
        sample_ode(sch, lambda x, t: calls.append(1) or score(x, t), x, max_steps=0)
    assert not calls
    with pytest.raises(ValueError, match="x_T: expected finite"):
        sample_ode(sch, score, torch.full((2, 2), float("nan")))
    with pytest.raises(ValueError, match="s_end: expected exactly one"):
        sample_ode_transformed(sch, score, x)
    with pytest.raises(ValueError, match="s_end: expected a finite value"):
        sample_ode_transformed(sch, score, x, s_end=-10.0)
    with pytest.raises(ValueError, match="steps: expected an integer"):
        sample_sde(sch, score, x, steps=0)
    with pytest.raises(ValueError, match="t: expected t > 0"):
        sample_ode(sch, score, x, t_end=0.0)


def test_dopri5_matches_exact_solution_per_sample():
    """dy/dt = -k y with k from 1 to 1000 per sample: each sample meets its tolerance, the
    stiff ones take more steps without slowing the others, and dense output is accurate."""
    from diffmem.ode import dopri5

    k = torch.logspace(0, 3, 50, dtype=torch.float64)[:, None]
    y0 = torch.ones(50, 2, dtype=torch.float64)
    rec = torch.linspace(0, 1, 11, dtype=torch.float64)
    sol = dopri5(lambda t, y, rows: -k[rows] * y, y0, 0.0, 1.0, rtol=1e-8, atol=1e-10, record=rec)
    exact = torch.exp(-k * rec[None, :])[..., None].expand(-1, -1, 2)
    assert torch.allclose(sol.y, exact[:, -1], atol=1e-8)
    assert torch.allclose(sol.recorded, exact, atol=1e-6)
    assert sol.steps[0] < sol.steps[-1]
    backwards = dopri5(lambda t, y, rows: k[rows] * y, y0, 1.0, 0.0, rtol=1e-8, atol=1e-10)
    assert torch.allclose(backwards.y, torch.exp(-k).expand(-1, 2), atol=1e-8)


@pytest.mark.parametrize("sch", SCHEDULES, ids=lambda s: s.name)
def test_integration_variables_agree(paper_points, sch):
    score = EmpiricalScore(paper_points, sch)
    x = noise(sch, 50, seed=5)
    in_t = sample_ode(sch, score, x, t_end=1e-3, variable="t", rtol=1e-9, atol=1e-9)
    in_s = sample_ode(sch, score, x, t_end=1e-3, variable="s", rtol=1e-9, atol=1e-9)
    ref = sample_ode(sch, score, x, t_end=1e-3, method="rk45-torchode", variable="t",
                     rtol=1e-9, atol=1e-9)
    assert torch.allclose(in_t.samples, in_s.samples, atol=1e-6)
    assert torch.allclose(ref.samples, in_s.samples, atol=1e-6)
    assert in_s.stats["variable"] == "s" and in_t.stats["variable"] == "t"
    # at the default tolerances, the smooth flow in s needs fewer score evaluations
    fast = sample_ode(sch, score, x, t_end=1e-6)
    slow = sample_ode(sch, score, x, t_end=1e-6, variable="t")
    assert fast.stats["score_evals"] < slow.stats["score_evals"]


def test_score_of_another_schedule_is_refused(paper_points):
    ve_score = EmpiricalScore(paper_points, VE())
    x = noise(VP(), 3)
    for sampler in (sample_ode, sample_sde):
        with pytest.raises(ValueError, match=r"schedule: expected the score's own schedule "
                                             r"VE\(a=10.0\), received VP\(beta_min=0.001, "
                                             r"beta_max=3.0\)"):
            sampler(VP(), ve_score, x)
    # equal parameters are the same schedule, whichever object carries them
    assert sample_ode(VE(), ve_score, noise(VE(), 3), t_end=1e-3).samples.shape == (3, 2)
    with pytest.raises(ValueError, match=r"received VE\(a=5.0\)"):
        sample_ode(VE(a=5.0), ve_score, x)


def test_transformed_alias_is_sample_ode_in_s(paper_points):
    sch = VP()
    score = EmpiricalScore(paper_points, sch)
    x = noise(sch, 10, seed=4)
    a = sample_ode_transformed(sch, score, x, s_end=12.0, return_trajectory=True, n_record=7)
    b = sample_ode(sch, score, x, s_end=12.0, return_trajectory=True, n_record=7)
    assert torch.equal(a.samples, b.samples) and torch.equal(a.trajectory, b.trajectory)
    assert torch.allclose(b.s_times, torch.linspace(float(sch.s(1.0)), 12.0, 7,
                                                    dtype=torch.float64))
    # t_end and the s it maps to end at the same point
    t_end = float(sch.t_of_s(torch.tensor(12.0, dtype=torch.float64)))
    c = sample_ode(sch, score, x, t_end=t_end, variable="s")
    assert torch.allclose(c.samples, b.samples, atol=1e-9)
    with pytest.raises(ValueError, match="s_end: expected exactly one of s_end or t_end"):
        sample_ode(sch, score, x, t_end=1e-3, s_end=12.0)
    with pytest.raises(ValueError, match="variable: expected 's' or 'auto' with s_end"):
        sample_ode(sch, score, x, s_end=12.0, variable="t")


def test_samplers_stop_on_non_finite_or_misshapen_scores(paper_points):
    sch = VE()
    x = noise(sch, 6)

    def nan_below(x, t):
        out = -x / sch.sigma2(t)[:, None]
        out[:2] = torch.where(t[:2, None] < 0.5, float("nan"), out[:2])
        return out

    for call in (lambda s: sample_ode(sch, s, x, t_end=1e-3),
                 lambda s: sample_ode(sch, s, x, t_end=1e-3, method="heun", steps=10),
                 lambda s: sample_ode(sch, s, x, t_end=1e-3, method="euler", steps=10),
                 lambda s: sample_sde(sch, s, x, steps=10)):
        with pytest.raises(ValueError, match=r"score: expected finite values, received "
                                             r"non-finite values for [12] of 6 samples at "
                                             r"t = 0\.[34]\d*"):
            call(nan_below)
    with pytest.raises(ValueError, match=r"score: expected a tensor of the shape of x, "
                                         r"\(6, 2\), received shape \(6, 3\)"):
        sample_ode(sch, lambda x, t: torch.zeros(6, 3, dtype=x.dtype), x)
