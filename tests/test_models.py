"""Auditing models: diffusers folders, diffmem checkpoints and callables as scores; resumable
sampling; the distance of a model's denoiser to the empirical one."""

import json
import re

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from diffmem import nn as dnn
from diffmem.audit import denoiser_gap, follows_down_to
from diffmem.cli import app
from diffmem.models import (
    DiscreteVP,
    ModelScore,
    discrete_alphas_cumprod,
    load_callable,
    load_checkpoint_model,
    load_diffusers,
    network_output_to_score,
    sample_model,
)
from diffmem.schedules import VP
from diffmem.scores import EmpiricalScore, TikhonovScore

TRAIN = torch.randn(12, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_the_empirical_score_is_at_distance_zero_at_every_level():
    sch = VP()
    as_model = ModelScore(EmpiricalScore(TRAIN, sch), sch, (2,))
    gap = denoiser_gap(as_model, TRAIN, held=torch.randn(30, 2, dtype=torch.float64),
                       references={"tikhonov c=0.1": TikhonovScore(TRAIN, sch, 0.1)})
    assert max(gap["train"]["empirical"]) < 1e-20 and max(gap["held"]["empirical"]) < 1e-20
    assert all(c == "empirical" for c in gap["closest"]["train"])
    assert follows_down_to(gap) == gap["sigma"][0]
    assert min(gap["train"]["tikhonov c=0.1"][:4]) > 0.01  # another denoiser at small sigma


def test_the_nearest_closed_form_is_judged_in_absolute_distance():
    # A model that does not denoise (s = 0) is at ratio 1 from every closed form; nearest
    # to it at small noise is the strongly regularized Tikhonov denoiser, which barely moves.
    sch = VP()
    still = ModelScore(lambda x, t: torch.zeros_like(x), sch, (2,))
    gap = denoiser_gap(still, TRAIN, references={"tikhonov c=10": TikhonovScore(TRAIN, sch, 10.0)},
                       sigmas=[1e-3, 1e-2])
    assert gap["train"]["empirical"] == pytest.approx([1.0, 1.0])
    assert gap["train"]["tikhonov c=10"] == pytest.approx([1.0, 1.0])
    assert gap["closest"]["train"] == ["tikhonov c=10", "tikhonov c=10"]


def test_follows_down_to_reads_the_grid_from_the_top():
    gap = {"sigma": [0.01, 0.1, 1.0, 10.0], "train": {"empirical": [0.05, 0.5, 0.02, 0.01]}}
    assert follows_down_to(gap) == 1.0  # 0.05 at sigma 0.01 is below a level that is not
    assert follows_down_to(gap, threshold=0.6) == 0.01
    assert follows_down_to({**gap, "train": {"empirical": [0, 0, 0, 0.2]}}) is None


def test_network_outputs_become_the_score_of_the_noise():
    """x_t = m x_0 + sigma eps: every prediction type gives the score -eps / sigma."""
    gen = torch.Generator().manual_seed(1)
    x0, eps = (torch.randn(5, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    m = torch.tensor([0.9, 0.5, 0.2, 0.99, 0.7], dtype=torch.float64)
    sigma = (1 - m * m).sqrt()
    x = m[:, None] * x0 + sigma[:, None] * eps
    expected = -eps / sigma[:, None]
    outputs = {"epsilon": eps, "v_prediction": m[:, None] * eps - sigma[:, None] * x0,
               "sample": x0}
    for kind, out in outputs.items():
        assert torch.allclose(network_output_to_score(out, x, m, sigma, kind), expected,
                              rtol=1e-12), kind
    # flow matching: the linear path m = 1 - sigma, the velocity u = eps - x_0
    s_lin = 1 - m
    x_lin = m[:, None] * x0 + s_lin[:, None] * eps
    assert torch.allclose(network_output_to_score(eps - x0, x_lin, m, s_lin, "flow"),
                          -eps / s_lin[:, None], rtol=1e-12)
    with pytest.raises(ValueError, match="prediction_type: expected one of"):
        network_output_to_score(eps, x, m, sigma, "mean")


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_discrete_schedule_matches_diffusers(kind):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(num_train_timesteps=50, beta_schedule=kind)
    abar = discrete_alphas_cumprod(dict(sched.config))
    assert torch.allclose(abar, sched.alphas_cumprod.double(), rtol=1e-6)
    vp = DiscreteVP(abar)
    t = torch.arange(1, 51, dtype=torch.float64) / 50  # t = (k + 1) / K is timestep k
    assert torch.allclose(vp.m(t) ** 2, abar, rtol=1e-12)
    assert torch.allclose(vp.timestep(t), torch.arange(50, dtype=torch.float64))
    grid = torch.linspace(0.01, 1, 37, dtype=torch.float64)
    assert torch.allclose(vp.t_of_s(vp.s(grid)), grid, rtol=1e-9)
    assert float(vp.sigma(0.0)) == 0.0


def _tiny_pipeline(folder, prediction="v_prediction"):
    diffusers = pytest.importorskip("diffusers")
    from tiny_pipelines import tiny_unet

    unet = tiny_unet()
    sched = diffusers.DDPMScheduler(num_train_timesteps=100, prediction_type=prediction)
    diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(str(folder))
    return unet


def test_tiny_diffusers_model_round_trips_and_samples(tmp_path):
    unet = _tiny_pipeline(tmp_path / "pipe")
    model = load_diffusers(tmp_path / "pipe")
    assert model.data_shape == (1, 8, 8) and isinstance(model.schedule, DiscreteVP)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.2, 0.5, 0.9])
    with torch.no_grad():
        raw = unet(x, model.schedule.timestep(t)).sample
    m2 = model.schedule.m(t.double()) ** 2
    expected = network_output_to_score(raw, x, m2.sqrt().float(), (1 - m2).sqrt().float(),
                                       "v_prediction")
    assert torch.allclose(model(x, t), expected, rtol=1e-4, atol=1e-5)  # same after loading
    for sampler in ("ode", "edm"):
        out = sample_model(model, 3, tmp_path / f"{sampler}.npy", sampler=sampler, steps=6,
                           batch=2, progress=False)
        assert out.shape == (3, 1, 8, 8) and np.isfinite(out).all()
    # a bare UNet2DModel folder with --scheduler
    bare = load_diffusers(tmp_path / "pipe" / "unet", tmp_path / "pipe" / "scheduler")
    assert torch.allclose(bare(x, t), model(x, t))


def test_interrupted_sampling_resumes_without_redrawing(tmp_path):
    sch = VP()
    score = TikhonovScore(TRAIN, sch, 0.1)
    calls = {"n": 0, "stop": None}

    def counted(x, t):
        calls["n"] += 1
        if calls["stop"] is not None and calls["n"] > calls["stop"]:
            raise KeyboardInterrupt
        return score(x, t)

    model = ModelScore(counted, sch, (2,), name="tikhonov")
    full = np.array(sample_model(model, 6, tmp_path / "full.npy", batch=2, progress=False))
    per_batch = calls["n"] // 3
    calls.update(n=0, stop=2 * per_batch + 1)  # dies in the third batch
    with pytest.raises(KeyboardInterrupt):
        sample_model(model, 6, tmp_path / "cut.npy", batch=2, progress=False)
    assert json.loads((tmp_path / "cut.npy.progress.json").read_text())["done"] == 4
    calls.update(n=0, stop=None)
    resumed = sample_model(model, 6, tmp_path / "cut.npy", batch=2, progress=False)
    assert calls["n"] == per_batch  # only the last batch was drawn
    assert np.array_equal(np.array(resumed), full)


def test_diffmem_checkpoints_load_as_scores(tmp_path):
    from diffmem.unet import EDMDenoiser, UNet, train_edm

    cfg = dnn.TrainConfig(lambdas=[0.0, 0.1], parameterizations=["score", "noise"], steps=5,
                          ema_half_life=0.2, mlp={"width": 8})
    trained = dnn.train_dsm(TRAIN, VP(), cfg, checkpoint_dir=tmp_path / "mlp", progress=False)
    loaded = load_checkpoint_model(tmp_path / "mlp" / "step_000000005.pt", index=1)
    x, t = torch.randn(4, 2, dtype=torch.float64), torch.full((4,), 0.4, dtype=torch.float64)
    assert torch.allclose(loaded(x, t), dnn.NetworkScore(trained.ema, VP(), 1)(x, t))
    with pytest.raises(ValueError, match="--model-index: expected a model of the stack"):
        load_checkpoint_model(tmp_path / "mlp" / "step_000000005.pt", index=2)
    den = EDMDenoiser(UNet(4))
    images = torch.rand(2, 1, 8, 8)
    train_edm(den, images, 3, checkpoints=[3], checkpoint_dir=tmp_path / "unet",
              progress=False, ema_half_life=0.2)
    unet = load_checkpoint_model(tmp_path / "unet" / "step_000000003.pt")
    assert unet.data_shape == (1, 8, 8) and unet.kind == "denoiser"
    sig = torch.full((2,), 0.5)
    with torch.no_grad():
        assert torch.allclose(unet.denoiser(images, sig), den(images, sig), atol=1e-6)


def test_conditional_mlp_checkpoint_loads_as_a_conditional_score(tmp_path):
    cfg = dnn.TrainConfig(lambdas=[0.0], parameterizations=["score"], steps=5,
                          ema_half_life=0.2, mlp={"width": 8})
    y = torch.arange(TRAIN.shape[0], dtype=torch.float64)[:, None] % 3
    trained = dnn.train_dsm(TRAIN, VP(), cfg, checkpoint_dir=tmp_path / "c", progress=False,
                            train_y=y)
    loaded = load_checkpoint_model(tmp_path / "c" / "step_000000005.pt")
    assert loaded.conditional
    x, t = torch.randn(4, 2, dtype=torch.float64), torch.full((4,), 0.4, dtype=torch.float64)
    cond = torch.tensor([[0.0], [1.0], [2.0], [1.0]], dtype=torch.float64)
    expected = dnn.NetworkScore(trained.ema, VP())(x, t, cond)
    assert torch.allclose(loaded(x, t, cond), expected)
    assert not torch.allclose(loaded(x, t, cond), loaded(x, t, cond.flip(0)))
    with pytest.raises(ValueError, match="y: expected conditions"):
        loaded(x, t)


def test_callable_models_and_their_errors(tmp_path):
    code = tmp_path / "mine.py"
    code.write_text("import torch\n"
                    "def score(x, t):\n    return -x\n"
                    "def wrong(x, t):\n    return x[:, :1]\n"
                    "value = 3\n")
    model = load_callable(f"{code}:score", "VE", "score", (2,))
    assert torch.equal(model(TRAIN, 0.5), -TRAIN)
    with pytest.raises(ValueError, match="expected outputs of the shape of x"):
        load_callable(f"{code}:wrong", "VE", "score", (2,))(TRAIN, 0.5)
    with pytest.raises(ValueError, match="--model: expected a callable named 'value'"):
        load_callable(f"{code}:value", "VE", "score", (2,))
    with pytest.raises(ValueError, match="--model: expected an existing Python file"):
        load_callable(f"{tmp_path / 'none.py'}:score", "VE", "score", (2,))
    with pytest.raises(ValueError, match="--model: expected an importable module "
                                         "'no_such_module_xyz'"):
        load_callable("no_such_module_xyz:f", "VE", "score", (2,))
    with pytest.raises(ValueError, match="schedule: expected one of"):
        load_callable(f"{code}:score", "XY", "score", (2,))


def test_model_audit_command_and_its_errors(tmp_path):
    _tiny_pipeline(tmp_path / "pipe", prediction="epsilon")
    train = np.random.default_rng(0).random((20, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "train.npy", train)
    runner = CliRunner()
    res = runner.invoke(app, ["audit", "--model", str(tmp_path / "pipe"), "--train",
                              str(tmp_path / "train.npy"), "--n-samples", "4", "--out",
                              str(tmp_path / "out"), "--no-progress", "--bootstrap", "50",
                              "--sampler", "edm", "--steps", "5"])
    assert res.exit_code == 0, res.output
    assert np.load(tmp_path / "out" / "samples.npy").shape == (4, 1, 8, 8)
    gap = json.loads((tmp_path / "out" / "denoiser_gap.json").read_text())
    assert len(gap["sigma"]) == len(gap["train"]["empirical"]) == 12
    assert "How far is the model" in (tmp_path / "out" / "index.html").read_text()
    (tmp_path / "not_model").mkdir()
    (tmp_path / "bad_pred").mkdir()
    _tiny_pipeline(tmp_path / "bad_pred", prediction="epsilon")
    config = tmp_path / "bad_pred" / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()),
                                  "prediction_type": "flow"}))
    (tmp_path / "no_sched").mkdir()
    (tmp_path / "no_sched" / "config.json").write_text("{}")
    np.save(tmp_path / "wide.npy", np.zeros((5, 1, 4, 4), np.float32))
    cases = [
        (["--model", str(tmp_path / "not_model")], "--model: expected a diffusers pipeline"),
        (["--model", str(tmp_path / "no_sched")], "--scheduler: expected a diffusers"),
        (["--model", str(tmp_path / "bad_pred")], "prediction_type: expected one of"),
        (["--model", "no_such_module_xyz:f"], "--model: expected an importable module"),
    ]
    for extra, message in cases:
        res = runner.invoke(app, ["audit", *extra, "--train", str(tmp_path / "train.npy"),
                                  "--out", str(tmp_path / "err"), "--n-samples", "2",
                                  "--no-progress"])
        assert res.exit_code == 2, (extra, res.output)
        assert re.search(f"Error: {re.escape(message)}", res.output), (extra, res.output)
    res = runner.invoke(app, ["audit", "--model", str(tmp_path / "pipe"), "--train",
                              str(tmp_path / "wide.npy"), "--out", str(tmp_path / "err"),
                              "--no-progress"])
    assert res.exit_code == 2 and "--model: expected a model of the training data's shape" \
        in res.output
    res = runner.invoke(app, ["audit", "--train", str(tmp_path / "train.npy"), "--out",
                              str(tmp_path / "err")])
    assert res.exit_code == 2 and "SAMPLES: expected samples or --model" in res.output
