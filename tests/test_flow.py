"""Flow matching: the linear path as a schedule, the exact velocity of the empirical loss,
diffusers' flow-matching schedulers mapped exactly, and models saved with them audited."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from diffmem import data
from diffmem.cli import app
from diffmem.metrics import nearest
from diffmem.models import DiscreteFlow, load_diffusers, sample_model, scheduler_schedule
from diffmem.pipeline import make_scheduler, pipeline_sample
from diffmem.samplers import probability_flow_drift, sample_ode
from diffmem.schedules import RectifiedFlow
from diffmem.scores import EmpiricalScore

GEN = torch.Generator().manual_seed(3)
TRAIN = torch.randn(7, 3, generator=GEN, dtype=torch.float64)


def _exact_velocity(x, train, t):
    """argmin_u E|u(x_t) - (z - x_0)|^2 over the empirical data: E[z - x_0 | x_t = x] with
    the posterior over training points (x_t = (1 - t) x_n + t z), summed directly in float64
    and extended precision for the log-weights."""
    logits = -((x[:, None, :] - (1 - t) * train[None]) ** 2).sum(-1) / (2 * t * t)
    w = torch.softmax(logits, 1)
    z = (x[:, None, :] - (1 - t) * train[None]) / t  # the noise that leads from x_n to x
    return (w[..., None] * (z - train[None])).sum(1)


@pytest.mark.parametrize("t", [0.05, 0.3, 0.8, 0.99])
def test_probability_flow_of_the_empirical_score_is_the_exact_velocity(t):
    sch = RectifiedFlow()
    x = 1.3 * torch.randn(9, 3, generator=GEN, dtype=torch.float64)
    drift = probability_flow_drift(sch, EmpiricalScore(TRAIN, sch), (3,))
    got = drift(torch.tensor(t, dtype=torch.float64), x, torch.arange(9))
    want = _exact_velocity(x, TRAIN, t)
    # the drift f - g^2 s / 2 has terms of size |x| / (1 - t) that cancel: relative error
    # a few units of round-off times 1 / (1 - t)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12 / (1 - t))


def test_sampling_the_exact_velocity_returns_training_points_at_rate_sigma():
    sch = RectifiedFlow()
    train = data.paper_points().double()
    z = torch.randn(40, 2, generator=GEN, dtype=torch.float64) * float(sch.sigma(sch.T))
    res = sample_ode(sch, EmpiricalScore(train, sch), z, t_end=1e-6, rtol=1e-6, atol=1e-6,
                     n_record=40, return_trajectory=True)
    _, d = nearest(res.samples, train)
    assert float(d.max()) < 1e-4
    # |x(t) - x(t_end)| = O(sigma) with sigma = t: the ratio is bounded at small t
    t = res.times
    late = (t < 1e-2) & (t > 1e-5)
    gap = (res.trajectory[:, late] - res.samples[:, None]).norm(dim=-1)
    ratio = gap / t[late]
    assert float(ratio.max()) < 10 * float(ratio.median()) and float(ratio.median()) < 5


@pytest.mark.parametrize("options", [{"shift": 1.0}, {"shift": 3.0},
                                     {"use_dynamic_shifting": True, "shift": 1.0}],
                         ids=["plain", "shift-3", "dynamic"])
def test_flow_match_scheduler_is_the_linear_path_exactly(options):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=200, **options)
    sch = scheduler_schedule({"_class_name": type(sched).__name__, **dict(sched.config)})
    assert isinstance(sch, DiscreteFlow) and sch.K == 200
    kwargs = {"mu": 0.8} if options.get("use_dynamic_shifting") else {}
    sched.set_timesteps(12, **kwargs)
    sigmas = sched.sigmas[:-1].double()
    t = sigmas.clamp(max=sch.T)  # sigma = 1 (pure noise) is past the schedule's T = 1 - 1/K
    assert torch.allclose(sch.timestep(sigmas), sched.timesteps.double(), rtol=1e-6)
    x0 = torch.randn(12, 4, generator=GEN)
    z = torch.randn(12, 4, generator=GEN)
    noisy = sched.scale_noise(x0, sched.timesteps, z)
    mine = sch.m(t)[:, None] * x0.double() + sch.sigma(t)[:, None] * z.double()
    inside = sigmas <= sch.T
    assert torch.allclose(noisy.double()[inside], mine[inside], atol=1e-6)


def _flow_folder(folder, **sched_options):
    diffusers = pytest.importorskip("diffusers")
    from tiny_pipelines import tiny_unet

    unet = tiny_unet()
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=100, **sched_options)
    unet.save_pretrained(str(folder / "unet"))
    sched.save_pretrained(str(folder / "scheduler"))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}))
    return unet, sched


def test_a_flow_matching_model_is_a_velocity_on_the_linear_path(tmp_path):
    unet, _ = _flow_folder(tmp_path)
    model = load_diffusers(tmp_path)
    assert isinstance(model.schedule, DiscreteFlow)
    x = torch.randn(3, 1, 8, 8, generator=GEN)
    t = torch.tensor([0.1, 0.5, 0.9])
    with torch.no_grad():
        u = unet(x, 100 * t).sample  # the network receives K sigma
    want = -((1 - t)[:, None, None, None] * u + x) / t[:, None, None, None]
    assert torch.allclose(model(x, t), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", [{}, {"use_dynamic_shifting": True}], ids=["plain",
                                                                               "dynamic"])
def test_pipeline_sampler_is_the_flow_matching_euler_loop(tmp_path, options):
    unet, sched = _flow_folder(tmp_path, **options)
    model = load_diffusers(tmp_path)
    out = sample_model(model, 3, tmp_path / "s.npy", sampler="pipeline", steps=5, batch=3,
                       progress=False)
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    # by hand: Euler on the velocity, x <- x + (sigma_next - sigma) u, from x = z at sigma = 1
    kwargs = {"mu": 0.5 + 0.65 * (64 - 256) / (4096 - 256)} if options else {}
    sched.set_timesteps(5, **kwargs)
    x = z.clone()
    with torch.no_grad():
        for i, k in enumerate(sched.timesteps):
            u = unet(x, k.expand(3)).sample
            x = x + (sched.sigmas[i + 1] - sched.sigmas[i]) * u
    assert np.allclose(out, x.numpy(), atol=1e-5)
    again = pipeline_sample(model.network["net"], z, make_scheduler(
        model.network["scheduler_config"], None, 5, tokens=64), 5, tokens=64)
    assert np.allclose(out, again.numpy(), atol=1e-6)


def test_cli_audits_a_flow_matching_folder_with_its_scheduler(tmp_path):
    _flow_folder(tmp_path / "model")
    train = np.random.default_rng(0).standard_normal((6, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "train.npy", train)
    for sampler in ("pipeline", "ode"):
        res = CliRunner().invoke(app, [
            "audit", "--model", str(tmp_path / "model"), "--train", str(tmp_path / "train.npy"),
            "--sampler", sampler, "--steps", "4", "--n-samples", "4", "--no-progress",
            "--out", str(tmp_path / sampler)])
        assert res.exit_code == 0, res.output
        report = json.loads((tmp_path / sampler / "audit.json").read_text())
        assert report["n_samples"] == 4


def test_monitor_takes_a_unet_with_a_flow_matching_scheduler(tmp_path):
    from diffmem.monitor import MemorizationMonitor

    unet, sched = _flow_folder(tmp_path)
    train = torch.randn(5, 1, 8, 8, generator=GEN)
    mon = MemorizationMonitor(train, sched, n_points=4, every=1)
    assert isinstance(mon.schedule, DiscreteFlow)
    rec = mon.update(0, (unet, sched))
    assert all(np.isfinite(v) for v in rec["gap"].values())


def test_flow_matching_experiment_shows_the_claims_on_the_linear_path(tmp_path):
    from diffmem.experiments import get_experiment
    from diffmem.experiments.base import resolve_params, run_experiment
    from diffmem.experiments.flow import part_params

    exp = get_experiment("flow-matching")
    params = {**resolve_params(exp, quick=True), "n_samples": 100, "n_trajectories": 4,
              "n_record": 80}
    assert part_params(params, "velocity")["schedules"] == ["RF"]
    assert part_params(params, "tikhonov")["schedule"] == "RF"
    run_experiment(exp, tmp_path, params, progress=False)
    m = json.loads((tmp_path / "flow-matching" / "metrics.json").read_text())
    assert m["status"] == "confirmed" and len(m["claims"]) == 3
    assert m["velocity"]["RF"]["fraction_within"]["0.01"] == 1.0
    assert abs(m["velocity"]["RF"]["convergence_slope"] - 1) < 0.1
    tik = dict(zip(m["tikhonov"]["values"], m["tikhonov"]["fraction_within"]["0.01"],
                   strict=True))
    assert tik[1e-5] > 0.9 and tik[1e-1] < 0.05
    assert (tmp_path / "flow-matching" / "velocity_trajectories_RF.png").is_file()
