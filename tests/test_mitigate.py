"""Cures on trained models and ``diffmem mitigate``: the Tikhonov cure is the closed-form
Tikhonov score, a cured diffusers network is sampled by its own scheduler in its own
parameterization, the guidance cures give the condition they state, nearest-neighbour
guidance keeps predictions off the training items; the sweep on a class-conditional UNet, a
text-to-image pipeline and a callable, resumed to the same mitigate.json; clear errors."""

import json
import math
import textwrap

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from diffmem.cli import app
from diffmem.mitigate import CureContext, cure_model, parse_cure
from diffmem.models import (
    ModelScore,
    network_output_to_score,
    sample_model,
    score_to_network_output,
)
from diffmem.schedules import VE, VP
from diffmem.scores import EmpiricalScore, TikhonovScore

RUNNER = CliRunner()


@pytest.mark.parametrize("sch", [VP(), VE()], ids=["VP", "VE"])
@pytest.mark.parametrize("kind", ["score", "denoiser"])
def test_tikhonov_cure_is_the_closed_form_tikhonov_score(sch, kind):
    """The empirical score wrapped as a model (score or denoiser output) and cured with
    lambda is the paper's Tikhonov minimizer (D_e - x) / (sigma^2 + lambda)."""
    gen = torch.Generator().manual_seed(0)
    train = torch.randn(10, 3, generator=gen, dtype=torch.float64)
    emp = EmpiricalScore(train, sch)
    fn = (lambda x, t: emp(x, t)) if kind == "score" else (
        lambda x, t: x + sch.sigma2(t)[:, None] * emp(x, t))
    cured = cure_model(ModelScore(fn, sch, (3,), kind=kind), [parse_cure("tikhonov=0.05")])
    closed = TikhonovScore(train, sch, 0.05)
    x = 3 * torch.randn(7, 3, generator=gen, dtype=torch.float64)
    for t in (0.05, 0.3, 0.9):
        ref = closed(x, t)
        assert torch.allclose(cured(x, t), ref, rtol=1e-9, atol=1e-9 * float(ref.abs().max()))


def test_network_parameterizations_round_trip():
    """score_to_network_output inverts network_output_to_score for every prediction type,
    and each discrete schedule's time of a timestep inverts its timestep."""
    from diffmem.models import DiscreteFlow, DiscreteVP, discrete_alphas_cumprod

    gen = torch.Generator().manual_seed(1)
    x, out = torch.randn(4, 2, 3, generator=gen, dtype=torch.float64), torch.randn(
        4, 2, 3, generator=gen, dtype=torch.float64)
    m, sigma = torch.tensor([0.9, 0.5, 0.3, 0.99], dtype=torch.float64), torch.tensor(
        [0.4, 0.8, 0.95, 0.1], dtype=torch.float64)
    for kind in ("epsilon", "v_prediction", "sample", "flow"):
        s = network_output_to_score(out, x, m, sigma, kind)
        assert torch.allclose(score_to_network_output(s, x, m, sigma, kind), out, atol=1e-12)
    k = torch.tensor([0.0, 17.5, 99.0], dtype=torch.float64)
    for sch in (DiscreteVP(discrete_alphas_cumprod({"num_train_timesteps": 100})),
                DiscreteFlow(100)):
        assert torch.allclose(sch.timestep(sch.time_of_timestep(k)), k, atol=1e-12)


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    """A class-conditional UNet2DModel (labels 0-2, 3 the null one) with a DDIM scheduler of
    50 training steps, 12 training images in [-1, 1] and their labels."""
    pytest.importorskip("diffusers")
    from tiny_pipelines import class_unet

    return class_unet(tmp_path_factory.mktemp("mitigate"), "v_prediction")


def test_pipeline_sampler_samples_the_cured_network(unet):
    """--sampler pipeline on the cured model equals the scheduler's own loop with the cure
    written by hand in the network's parameterization (v): v' from the scaled score; at
    lambda = 0 it is the uncured model's samples exactly."""
    from diffusers import DDIMScheduler, UNet2DModel

    from diffmem.models import load_model

    model = load_model(str(unet / "net"), scheduler=str(unet / "net"))
    cond = torch.tensor([0, 1, 2, 1])
    lam = 0.05
    cured = cure_model(model, [parse_cure(f"tikhonov={lam}")])
    got = sample_model(cured, 4, unet / "s.npy", sampler="pipeline", steps=6, seed=3,
                       cond=cond, progress=False)
    plain = sample_model(cure_model(model, [parse_cure("tikhonov=0")]), 4, unet / "p.npy",
                         sampler="pipeline", steps=6, seed=3, cond=cond, progress=False)
    base = sample_model(model, 4, unet / "b.npy", sampler="pipeline", steps=6, seed=3,
                        cond=cond, progress=False)
    assert np.array_equal(plain, base)
    net = UNet2DModel.from_pretrained(str(unet / "net")).eval()
    sched = DDIMScheduler.from_pretrained(str(unet / "net"))
    sched.set_timesteps(6)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    abar = sched.alphas_cumprod.to(torch.float64)
    with torch.no_grad():
        for k in sched.timesteps:
            v = net(x, k, class_labels=cond).sample.double()
            a = abar[int(k)]
            m, s2 = a.sqrt(), 1 - a
            xd = x.double()
            eps = m * v + s2.sqrt() * xd  # v = m eps - sigma x0
            eps = eps * s2 / (s2 + lam)  # the Tikhonov score, as the noise it predicts
            x0 = (xd - s2.sqrt() * eps) / m
            v_cured = m * eps - s2.sqrt() * x0
            x = sched.step(v_cured.float(), k, x).prev_sample
    assert np.abs(got - x.numpy()).max() <= 1e-5
    assert np.abs(got - base).max() > 1e-3


def _recorder(sch):
    seen = []

    def fn(x, t, y):
        seen.append((t.clone(), y.clone()))
        return torch.zeros_like(x)

    return ModelScore(fn, sch, (2,), conditional=True), seen


def test_guidance_cures_give_the_condition_they_state():
    sch = VP()
    model, seen = _recorder(sch)
    ctx = CureContext(null=torch.tensor(9))
    cured = cure_model(model, [parse_cure("guidance-schedule=0.25")], ctx)
    x = torch.zeros(4, 2, dtype=torch.float64)
    y = torch.tensor([1, 2, 3, 4])
    for t in (0.9, 0.76, 0.74, 0.1):
        seen.clear()
        cured(x, torch.full((4,), t, dtype=torch.float64), y)
        expect = torch.full((4,), 9) if t > 0.75 else y
        assert torch.equal(seen[-1][1], expect), t
    guided = cure_model(model, [parse_cure("guidance=0.5")], ctx)
    assert guided.guidance == 0.5 and int(guided.null) == 9
    seen.clear()
    guided(x, 0.5, y)  # one call of null and condition together, as classifier-free guidance
    assert torch.equal(seen[-1][1], torch.cat([torch.full((4,), 9), y]))


def test_nn_guidance_keeps_predictions_off_the_training_items():
    """A memorizing denoiser (the empirical one) cured with g: every prediction is moved
    straight away from its nearest training item n1 to g d2 / 3 of it (d1, d2 before the
    move); predictions already that far are left."""
    from diffmem.centres import Centres
    from diffmem.metrics import knn

    sch = VE()
    gen = torch.Generator().manual_seed(2)
    train = torch.randn(12, 4, generator=gen, dtype=torch.float64)
    emp = EmpiricalScore(train, sch)
    model = ModelScore(lambda x, t: emp(x, t), sch, (4,))
    x = train[:6] + 0.05 * torch.randn(6, 4, generator=gen, dtype=torch.float64)
    ctx = CureContext(train=Centres(train))
    t = torch.full((6,), 0.2, dtype=torch.float64)  # predictions 0.02 or more from n1
    before = model.denoiser(x, t)
    d0, i0 = knn(before, train, 2)
    n1 = train[i0[:, 0]]
    for g in (1.0, 2.0):
        after = cure_model(model, [parse_cure(f"nn-guidance={g}")], ctx).denoiser(x, t)
        assert bool((d0[:, 0] < g * d0[:, 1] / 3).all())  # copies before the cure
        assert torch.allclose((after - n1).norm(dim=1), g * d0[:, 1] / 3, rtol=1e-9)
        direction = torch.nn.functional.cosine_similarity(after - n1, before - n1, dim=1)
        assert torch.allclose(direction, torch.ones(6, dtype=torch.float64), atol=1e-9)
    far = ModelScore(lambda x, t: torch.full_like(x, 10.0), sch, (4,), kind="denoiser")
    assert torch.equal(cure_model(far, [parse_cure("nn-guidance=1")], ctx).denoiser(x, t),
                       far.denoiser(x, t))
    # each item held 20 times (more than the 8 searched at first): d2 is still the distinct
    # other's distance, so the cure is the one on the distinct set
    held = CureContext(train=Centres(train.repeat_interleave(20, dim=0)))
    for g in (1.0, 3.0):
        want = cure_model(model, [parse_cure(f"nn-guidance={g}")], ctx).denoiser(x, t)
        got = cure_model(model, [parse_cure(f"nn-guidance={g}")], held).denoiser(x, t)
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), g


def _amg_expected(table, train, train_cond, y, a):
    """AMG's cured denoiser of an unguided model (w = 1), by brute force, row by row:
    trigger e from the nearest item n of the prediction and n's nearest other item;
    ``D(y) - c_y (D(y) - D0) - c_n (D(y_n) - D0)`` with the capped weights."""
    dist = torch.cdist(table[y], train)
    d1, n = dist.min(dim=1)
    own = torch.cdist(train, train) + torch.diag(torch.full((len(train),), math.inf))
    e = (1 - d1 / own.min(dim=1).values[n]).clamp(0, 1)
    rows = []
    for i, yi in enumerate(y.tolist()):
        ae = a * float(e[i])
        yn = None if train_cond is None else int(train_cond[n[i]])
        c_y = min(2 * ae if yn == yi else ae, 1.0)
        c_n = 0.0 if yn in (None, yi) else min(ae, 1.0)
        rows.append(table[yi] - c_y * (table[yi] - table[9])
                    - (c_n * (table[yn] - table[9]) if yn is not None else 0))
    return torch.stack(rows), e


def test_amg_takes_the_pull_off_only_while_the_prediction_reproduces_an_item():
    """A model whose denoiser for condition y is a constant point near (or on) training
    item y: the cured denoiser is AMG's despecification plus caption-negative guidance
    weighted by the trigger e, computed here by brute force; e spans 1 (on an item), a
    fraction (half-way to its reproduction radius) and 0 (no reproduction: unchanged); the
    weights below, at and past their cap (never past the unconditional model), with the
    copied item's condition the row's own or another's, and without training conditions."""
    from diffmem.centres import Centres

    sch = VE()
    gen = torch.Generator().manual_seed(5)
    train = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    own = (torch.cdist(train, train) + torch.diag(torch.full((6,), math.inf))).min(1).values
    table = torch.zeros(10, 4, dtype=torch.float64)  # row 9: the null condition, D = 0
    u = torch.nn.functional.normalize(torch.randn(6, 4, generator=gen, dtype=torch.float64))
    for i, scale in enumerate([0.0, 0.5, 0.25, 3.0, 0.0, 0.1]):
        table[i] = train[i] + scale * own[i] * u[i]
    table[6] = train[4] + 0.3 * own[4] * u[4]  # a condition whose prediction reproduces item 4
    model = ModelScore(lambda x, t, y: table[y].to(x), sch, (4,), kind="denoiser",
                       conditional=True)
    y = torch.tensor([0, 1, 2, 3, 6])
    x = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    t = torch.full((5,), 0.3, dtype=torch.float64)
    labels = torch.arange(6)
    for cond, a in [(labels, 0.2), (labels, 0.4), (labels, 2.0), (None, 0.7)]:
        ctx = CureContext(null=torch.tensor(9), train=Centres(train), train_cond=cond)
        got = cure_model(model, [parse_cure(f"amg={a}")], ctx).denoiser(x, t, y)
        want, e = _amg_expected(table, train, cond, y, a)
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), (cond, a)
        assert e[0] == 1 and 0.3 < float(e[1]) < 0.7 and e[3] == 0 and 0.5 < e[4] < 0.9
        assert torch.allclose(got[3], table[3], rtol=1e-12)  # no reproduction: unchanged
    ctx = CureContext(null=torch.tensor(9), train=Centres(train), train_cond=labels)
    chain = cure_model(model, [parse_cure("guidance=0.5"), parse_cure("amg=2")], ctx)
    got = chain.denoiser(x, t, y)  # capped at the chain's guidance 0.5: D(null) on an item
    assert torch.allclose(got[0], table[9], atol=1e-12)
    assert torch.allclose(got[3], 0.5 * table[3] + 0.5 * table[9], rtol=1e-12)
    unguided = ModelScore(lambda x, t: x, sch, (4,), kind="denoiser")
    with pytest.raises(ValueError, match="for amg"):
        cure_model(unguided, [parse_cure("amg=1")], CureContext(train=Centres(train)))


def test_amg_in_the_pipeline_sampler_converts_back_to_the_network(unet):
    """On a diffusers v-prediction UNet (--sampler pipeline): the cured network output, read
    as a denoiser, is AMG's formula on the network's own denoisers, with the training set
    placed on the conditional predictions (trigger 1) and far from the null one."""
    from diffmem.centres import Centres
    from diffmem.models import load_model
    from diffmem.schedules import expand_as_batch

    model = load_model(str(unet / "net"), scheduler=str(unet / "net"))
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 1, 8, 8, generator=gen, dtype=torch.float64)
    y, null = torch.tensor([0, 1, 2]), torch.tensor(3)
    k = 20
    t = model.schedule.time_of_timestep(torch.tensor(float(k), dtype=torch.float64))
    tt = t.expand(3)
    m = model.schedule.m(t)
    d = {c: model.denoiser(x, tt, torch.full((3,), c)) for c in range(4)}
    d_y = model.denoiser(x, tt, y)
    train = torch.cat([d_y / m, 50 + d_y / m])  # the predictions, and far copies of them
    cond = torch.cat([y, y])
    ctx = CureContext(null=null, train=Centres(train), train_cond=cond)
    cured = cure_model(model, [parse_cure("amg=0.4")], ctx)
    out = model.network["net"](x.float(), torch.tensor(k), y).double()
    post = cured.network["post"](out, x, torch.tensor(k), y)
    s = network_output_to_score(post.double(), x, m, model.schedule.sigma(t), "v_prediction")
    got = x + expand_as_batch(model.schedule.sigma2(t), x) * s
    want = d_y - min(2 * 0.4, 1) * (d_y - d[3])  # y_n = y: the two pulls as one
    assert torch.allclose(got, want, atol=1e-4 * float(want.abs().max()))


def test_bad_cures_are_refused_with_their_reason():
    for text, message in [("magic=1", "NAME one of"), ("tikhonov=abc", "with a number"),
                          ("tikhonov=nan", "finite strength"), ("tikhonov=-1", "[0, inf]"),
                          ("guidance-schedule=1.5", "[0, 1]"), ("tikhonov", "finite")]:
        with pytest.raises(ValueError, match="--cure: expected") as err:
            parse_cure(text)
        assert message in str(err.value), (text, str(err.value))
    uncond = ModelScore(lambda x, t: -x, VP(), (2,))
    with pytest.raises(ValueError, match=r"a null condition .* for guidance, received"):
        cure_model(uncond, [parse_cure("guidance=0.5")])
    with pytest.raises(ValueError, match=r"a training set \(--train\) for nn-guidance"):
        cure_model(uncond, [parse_cure("nn-guidance=1")])


def _mitigate(args, out):
    res = RUNNER.invoke(app, ["mitigate", *args, "--no-progress", "--out", str(out)])
    return res


def _without_seconds(doc):
    if isinstance(doc, dict):
        return {k: _without_seconds(v) for k, v in doc.items() if k != "seconds"}
    if isinstance(doc, list):
        return [_without_seconds(v) for v in doc]
    return doc


def test_mitigate_command_on_a_class_unet_resumes_to_the_same_json(unet, tmp_path):
    args = ["--model", str(unet / "net"), "--scheduler", str(unet / "net"), "--train",
            str(unet / "train.npy"), "--train-cond", str(unet / "labels.npy"), "--null-cond",
            "3", "--sampler", "pipeline", "--steps", "3", "--per-condition", "4",
            "--strengths", "tikhonov=0.05,0.5", "--strengths", "guidance=0.5",
            "--strengths", "guidance-schedule=0.5", "--strengths", "nn-guidance=3",
            "--strengths", "amg=1", "--exhaustive"]
    out = tmp_path / "m"
    res = _mitigate(args, out)
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "mitigate.json").read_text())
    assert set(doc) >= {"baseline", "runs", "recommended", "rule", "frontier", "units"}
    assert [(r["cure"], r["strength"]) for r in doc["runs"]] == [
        ("tikhonov", 0.05), ("tikhonov", 0.5), ("guidance", 0.5), ("guidance-schedule", 0.5),
        ("nn-guidance", 3.0), ("amg", 1.0)]
    for r in [doc["baseline"], *doc["runs"]]:
        assert {"cure", "strength", "copy_fraction", "cost", "samples",
                "sample_conditions"} <= set(r)
        assert np.load(out / r["samples"]).shape == (12, 1, 8, 8)
        assert np.load(out / r["sample_conditions"]).tolist() == np.repeat(
            np.arange(3), 4).tolist()
        assert 0 <= r["copy_fraction"] <= 1 and r["cost"] >= 0
    assert doc["baseline"]["cost"] == 0 and doc["baseline"]["distance_ratio"] == 1
    assert np.array_equal(np.load(out / "baseline" / "initial_noise.npy"),
                          np.load(out / doc["runs"][0]["samples"].replace(
                              "samples.npy", "initial_noise.npy")))  # the same noise
    page = (out / "index.html").read_text()
    assert "The plane" in page and "Cured samples beside uncured ones" in page
    # killed mid-sweep: the last run's measure and samples gone; the rerun ends the same
    last = out / "runs" / "amg=1"
    (last / "measure.json").unlink()
    (last / "samples.npy.progress.json").unlink()
    res = _mitigate(args, out)
    assert res.exit_code == 0, res.output
    again = json.loads((out / "mitigate.json").read_text())
    assert _without_seconds(again) == _without_seconds(doc)


POINTS_MODEL = textwrap.dedent('''
    import torch
    from diffmem.schedules import VP
    POINTS = torch.tensor([[1.5, -0.5, 0.25, 2.0], [-1.0, 1.0, -2.0, 0.5]], dtype=torch.float64)
    def fn(x, t, y):
        """Labels 0-1: one training point each (a memorizing denoiser); 2-3 and the null 4:
        the denoiser of N(0, 0.6 I) (D = m E[x0 | x])."""
        sch = VP()
        x, t = x.double(), t.double()
        m, s2 = sch.m(t)[:, None], sch.sigma2(t)[:, None]
        d = m * 0.6 / (m * m * 0.6 + s2) * x
        for c in (0, 1):
            d[y == c] = m[y == c] * POINTS[c]
        return d
''')


def _points_inputs(tmp_path):
    """The model above, its training set (the two points and six draws of N(0, 0.6 I)) and
    their labels."""
    (tmp_path / "pmodel.py").write_text(POINTS_MODEL)
    rng = np.random.default_rng(0)
    train = np.concatenate([[[1.5, -0.5, 0.25, 2.0], [-1.0, 1.0, -2.0, 0.5]],
                            rng.normal(0, 0.6 ** 0.5, (6, 4))]).astype(np.float32)
    np.save(tmp_path / "train.npy", train)
    np.save(tmp_path / "labels.npy", np.array([0, 1, 2, 2, 2, 3, 3, 3]))
    return ["--model", f"{tmp_path / 'pmodel.py'}:fn", "--model-kind", "denoiser",
            "--schedule", "VP", "--train", str(tmp_path / "train.npy"), "--train-cond",
            str(tmp_path / "labels.npy"), "--null-cond", "4", "--per-condition", "8",
            "--sampler", "edm", "--steps", "8", "--cures", "guidance,tikhonov"]


def test_mitigate_search_recommends_the_grids_answer_with_fewer_full_runs(tmp_path):
    """On a model whose labels 0-1 are memorized points and 2-3 a Gaussian like the null,
    the search (screen, refine, confirm) recommends a run of the exhaustive grid with the
    same figures (the same full-size draw), at copies at most the target and no higher
    cost than the grid's recommendation, with fewer full-size runs; its screen points are
    marked as estimates; killed (a screen run's measure and samples gone) and rerun, it
    ends with the same mitigate.json."""
    args = _points_inputs(tmp_path)
    res = _mitigate(args + ["--exhaustive"], tmp_path / "grid")
    assert res.exit_code == 0, res.output
    grid = json.loads((tmp_path / "grid" / "mitigate.json").read_text())
    assert grid["mode"] == "exhaustive" and grid["baseline"]["copy_fraction"] == 1
    assert grid["recommended"] is not None and len(grid["runs"]) == 9
    res = _mitigate(args, tmp_path / "s")
    assert res.exit_code == 0, res.output
    found = json.loads((tmp_path / "s" / "mitigate.json").read_text())
    best, want = found["recommended"], grid["recommended"]
    assert found["mode"] == "search" and best is not None
    same = [r for r in grid["runs"] if (r["cure"], r["strength"]) == (best["cure"],
                                                                      best["strength"])]
    assert same and _without_seconds(same[0]) == _without_seconds(best)
    assert best["copy_fraction"] <= found["target"] and best["cost"] <= want["cost"]
    assert len(found["runs"]) < len(grid["runs"])
    assert found["screen"] and all(p["estimate"] == "screen" for p in found["screen"])
    assert set(found["search"]) == {"guidance", "tikhonov"}
    assert found["search"][best["cure"]]["weakest"] == best["strength"]
    assert "The search" in (tmp_path / "s" / "index.html").read_text()
    point = tmp_path / "s" / found["screen"][-1]["samples"]
    (point.parent / "measure.json").unlink()
    (point.parent / "samples.npy.progress.json").unlink()
    res = _mitigate(args, tmp_path / "s")
    assert res.exit_code == 0, res.output
    again = json.loads((tmp_path / "s" / "mitigate.json").read_text())
    assert _without_seconds(again) == _without_seconds(found)


def test_mitigate_refuses_bad_input_and_writes_nothing(unet, tmp_path):
    base = ["--model", str(unet / "net"), "--scheduler", str(unet / "net"), "--train",
            str(unet / "train.npy"), "--train-cond", str(unet / "labels.npy"), "--null-cond",
            "3", "--steps", "3", "--sampler", "pipeline"]
    for extra, message in [
            (["--cures", "tikhonov,magic"], "--cures: expected names among"),
            (["--strengths", "tikhonov=nan"], "--cure: expected tikhonov=STRENGTH"),
            (["--strengths", "tikhonov=x"], "--strengths: expected NAME=a,b,c"),
            (["--strengths", "guidance=60"], "[0, 50]"),
            (["--target", "1.5"], "--target: expected a copy fraction in (0, 1)"),
            (["--target", "0"], "--target: expected a copy fraction in (0, 1)"),
            (["--per-condition", "0"], "--per-condition: expected")]:
        out = tmp_path / "bad"
        res = _mitigate(base + extra, out)
        assert res.exit_code == 2 and message in res.output, (extra, res.output)
        assert not out.exists()
    res = _mitigate(["--model", str(unet / "net"), "--scheduler", str(unet / "net"),
                     "--conditions", str(unet / "labels.npy"),
                     "--steps", "3", "--sampler", "pipeline", "--cures", "guidance"],
                    tmp_path / "bad")
    assert res.exit_code == 2 and "for guidance, received" in res.output
    assert not (tmp_path / "bad").exists()


def test_mitigate_a_callable_without_the_training_set(tmp_path):
    """A conditional callable whose labels 0-1 each return one point (memorized) and 2-3 the
    null's Gaussian denoiser; without --train the copies are detect's verdicts: both
    memorized conditions before any cure, and guidance 0 (no condition) removes them."""
    (tmp_path / "cmodel.py").write_text(textwrap.dedent('''
        import torch
        POINT = torch.tensor([1.5, -0.5, 0.25, 2.0], dtype=torch.float64)
        def fn(x, t, y):
            from diffmem.schedules import VP
            sch = VP()
            x, t = x.double(), t.double()
            m, s2 = sch.m(t)[:, None], sch.sigma2(t)[:, None]
            d = m * 0.6 / (m * m * 0.6 + s2) * x
            for c in (0, 1):
                d[y == c] = m[y == c] * POINT * (1 + c)
            return d
    '''))
    np.save(tmp_path / "conds.npy", np.arange(4))
    res = _mitigate(["--model", f"{tmp_path / 'cmodel.py'}:fn", "--model-kind", "denoiser",
                     "--data-shape", "4", "--conditions", str(tmp_path / "conds.npy"),
                     "--null-cond", "4", "--per-condition", "3", "--cures", "guidance",
                     "--strengths", "guidance=0"], tmp_path / "m")
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "m" / "mitigate.json").read_text())
    assert "detect's verdict" in doc["copy_measure"]
    assert doc["baseline"]["copy_fraction"] == 1 and doc["memorized"] == 6
    assert doc["runs"][0]["copy_fraction"] == 0
    assert doc["recommended"]["cure"] == "guidance"


def test_audit_and_detect_take_cures(unet, tmp_path):
    common = ["--model", str(unet / "net"), "--scheduler", str(unet / "net"), "--steps", "3",
              "--no-progress"]
    res = RUNNER.invoke(app, ["audit", *common, "--train", str(unet / "train.npy"),
                              "--train-cond", str(unet / "labels.npy"), "--null-cond", "3",
                              "--sampler", "pipeline", "--per-condition", "2",
                              "--cure", "tikhonov=0.1", "--cure", "guidance-schedule=0.3",
                              "--bootstrap", "20", "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert doc["inputs"]["cures"] == ["tikhonov=0.1", "guidance-schedule=0.3"]
    assert "reproduction" in doc["conditions"][0]
    np.save(tmp_path / "c.npy", np.arange(3))
    res = RUNNER.invoke(app, ["detect", *common, "--conditions", str(tmp_path / "c.npy"),
                              "--null-cond", "3", "--n-noise", "2", "--cure",
                              "guidance-schedule=0.5", "--out", str(tmp_path / "d")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "d" / "detect.json").read_text())["inputs"]["cures"] == [
        "guidance-schedule=0.5"]
    for cmd, extra, cure in (
            ("audit", ["--train", str(unet / "train.npy"), "--train-cond",
                       str(unet / "labels.npy"), "--per-condition", "2"], "guidance=2"),
            ("detect", ["--conditions", str(tmp_path / "c.npy"), "--null-cond", "3"],
             "nn-guidance=1"),  # no training set in detect
            ("audit", ["--train", str(unet / "train.npy"), "--train-cond",
                       str(unet / "labels.npy")], "tikhonov=-2")):
        res = RUNNER.invoke(app, [cmd, *common, *extra, "--cure", cure,
                                  "--out", str(tmp_path / "bad")])
        assert res.exit_code == 2 and "--cure" in res.output, res.output
        assert not (tmp_path / "bad").exists()


def _sd_with_images(tmp_path):
    """A tiny SD pipeline, a file of two prompts and a folder of four random 16x16 training
    images (also returned as a ``(4, 16, 16, 3)`` uint8 array)."""
    from PIL import Image
    from tiny_pipelines import sd_pipeline

    sd = sd_pipeline(tmp_path / "sd")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    images = tmp_path / "images"
    images.mkdir()
    train = (np.random.default_rng(0).random((4, 16, 16, 3)) * 255).astype(np.uint8)
    for i, im in enumerate(train):
        Image.fromarray(im).save(images / f"{i}.png")
    return sd, prompts, images, train


def test_mitigate_a_text_to_image_pipeline_with_prompts(tmp_path):
    """A tiny SD pipeline with prompts: the cures that apply to it (Tikhonov on its latents,
    the guidance schedule against the negative prompt) sampled by its own scheduler and
    audited against images; the nearest-neighbour cures search the training images as
    latents, and without a training set, named, are refused."""
    pytest.importorskip("transformers")
    sd, prompts, images, _ = _sd_with_images(tmp_path)
    args = ["--model", str(sd), "--prompts", str(prompts), "--train", str(images),
            "--sampler", "pipeline", "--steps", "3", "--per-condition", "2"]
    res = _mitigate(args + ["--exhaustive", "--strengths", "tikhonov=0.1", "--strengths",
                            "guidance-schedule=0.5", "--strengths", "guidance=1",
                            "--strengths", "prompt-opt=1", "--strengths", "random-tokens=2",
                            "--strengths", "embedding-noise=0.5", "--strengths",
                            "attention-rescale=1.2", "--strengths", "amg=1",
                            "--strengths", "nn-guidance=3"],
                    tmp_path / "m")
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "m" / "mitigate.json").read_text())
    assert [r["cure"] for r in doc["runs"]] == ["tikhonov", "guidance", "guidance-schedule",
                                                "nn-guidance", "amg", "prompt-opt",
                                                "random-tokens", "embedding-noise",
                                                "attention-rescale"]
    assert doc["not_applicable"] == {}  # amg and nn-guidance: the images searched as latents
    assert np.load(tmp_path / "m" / doc["runs"][0]["samples"]).shape == (4, 3, 16, 16)
    assert doc["inputs"]["prompt_texts"] == ["a red square", "a blue circle"]
    res = _mitigate([a for a in args if a not in ("--train", str(images))]
                    + ["--cures", "nn-guidance"], tmp_path / "bad")
    assert res.exit_code == 2 and "for nn-guidance" in res.output
    assert not (tmp_path / "bad").exists()


def test_mitigate_measures_in_a_clip_space_with_its_score(tmp_path):
    """--features with a two-tower CLIP folder: the copies' distances and the cost are
    measured between CLIP image features (d1 is the nearest training image's distance in
    that space), and each run's CLIP score is the mean cosine of its clean samples' image
    features with their prompts' text features."""
    pytest.importorskip("transformers")
    from tiny_pipelines import clip_model

    from diffmem.audit.features import load_clip_text, load_features

    sd, prompts, images, train = _sd_with_images(tmp_path)
    clip = clip_model(tmp_path / "clip")
    out = tmp_path / "m"
    res = _mitigate(["--model", str(sd), "--prompts", str(prompts), "--train", str(images),
                     "--sampler", "pipeline", "--steps", "3", "--per-condition", "2",
                     "--features", str(clip), "--cures", "tikhonov", "--strengths",
                     "tikhonov=0.1", "--exhaustive"], out)
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "mitigate.json").read_text())
    assert doc["features"] == str(clip) and "feature units" in doc["units"]["cost"]
    feats, text = load_features(clip), load_clip_text(clip)
    train_f = feats(torch.from_numpy(train).permute(0, 3, 1, 2).float() / 255)
    for entry, sub in ((doc["baseline"], "baseline"), (doc["runs"][0], "runs/tikhonov=0.1")):
        samples = torch.from_numpy(np.load(out / sub / "samples.npy"))
        cond = torch.from_numpy(np.load(out / sub / "sample_conditions.npy")).reshape(-1).long()
        f = feats(samples)
        with np.load(out / sub / "measure.npz") as m:
            d1, clean_clip = torch.from_numpy(m["d1"]), torch.from_numpy(m["clip"])
        assert torch.allclose(d1.float(), torch.cdist(f, train_f).min(1).values, atol=1e-4)
        cos = (f * text(["a red square", "a blue circle"])[cond]).sum(1)
        assert torch.allclose(clean_clip.float(), cos, atol=1e-5)
        assert entry["clip_score"] == pytest.approx(float(cos.mean()), abs=1e-5)  # all clean
    assert "CLIP score" in (out / "index.html").read_text()


def test_a_latent_models_training_images_are_searched_as_its_latents(tmp_path):
    """cure_context encodes a latent pipeline's training images with its VAE as the
    training scripts do (diffusers' own encoder: latent mean times the scaling factor, of
    ``2 x - 1``), chunk by chunk to the same rows; images of another size are refused."""
    pytest.importorskip("transformers")
    import diffusers
    from tiny_pipelines import sd_pipeline

    from diffmem.mitigate import base
    from diffmem.prompts import Prompts
    from diffmem.text import load_text_model

    sd = sd_pipeline(tmp_path / "sd")
    model = load_text_model(sd, Prompts(["a red square"])).model
    images = torch.rand(7, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    vae = diffusers.AutoencoderKL.from_pretrained(str(sd / "vae"))
    with torch.no_grad():
        want = vae.encode(2 * images - 1).latent_dist.mean * vae.config.scaling_factor
    whole = base.cure_context(model, None, images).train.to_tensor(torch.float32)
    assert whole.shape == (7, *model.data_shape)
    assert torch.allclose(whole, want, atol=1e-5 * float(want.abs().max()))
    chunk = base.LATENT_CHUNK
    try:
        base.LATENT_CHUNK = 3
        parts = base.cure_context(model, None, images).train.to_tensor(torch.float32)
    finally:
        base.LATENT_CHUNK = chunk
    assert torch.allclose(parts, whole, atol=1e-5 * float(want.abs().max()))
    assert base.cure_context(model, None, images, search=False).train.data_shape == (3, 16, 16)
    small = base.cure_context(model, torch.tensor(1), torch.rand(3, 3, 8, 8))
    with pytest.raises(ValueError, match=r"does not encode.*for nn-guidance"):
        cure_model(model, [parse_cure("nn-guidance=1")], small)


@pytest.mark.parametrize("layout", ["dit", "flux", "sdxl", "sd3", "pixart"])
def test_cured_transformers_sample_in_their_own_parameterization(tmp_path, layout):
    """DiT (learned variance dropped), SDXL (pooled embeddings, size conditioning), SD3 (flow
    matching), PixArt (T5, learned variance) and FLUX (packed latents) cured through their own
    schedulers: lambda = 0 gives the uncured samples exactly; lambda > 0 changes them,
    finitely, except the tiny FLUX's, whose shifted steps all lie at sigma ~ 1, beyond the
    schedule's T, where the denoiser cure leaves the velocity as it is; the guidance schedule
    changes every model's condition."""
    pytest.importorskip("transformers")
    import tiny_pipelines

    from diffmem.models import load_model
    from diffmem.prompts import Prompts
    from diffmem.text import load_text_model

    if layout == "dit":
        model = load_model(str(tiny_pipelines.dit_pipeline(tmp_path / "p")))
        cond, null = torch.tensor([3, 7]), torch.tensor(1000)
    else:
        build = getattr(tiny_pipelines, f"{layout}_pipeline")
        model = load_text_model(build(tmp_path / "p"), Prompts(["a red square",
                                                                "a blue dot"])).model
        cond, null = torch.tensor([0, 1]), torch.tensor(2)
    ctx = CureContext(null=null)

    def draw(cures, name):
        m = cure_model(model, [parse_cure(c) for c in cures], ctx)
        return sample_model(m, 2, tmp_path / f"{name}.npy", sampler="pipeline", steps=3,
                            seed=1, cond=cond, progress=False)

    base = draw([], "base")
    assert np.array_equal(draw(["tikhonov=0"], "zero"), base)
    cured = draw(["tikhonov=0.5"], "half")
    assert np.isfinite(cured).all()
    if layout == "flux":
        assert np.array_equal(cured, base)
    else:
        assert np.abs(cured - base).max() > 1e-4
    scheduled = draw(["guidance-schedule=0.5"], "sched")
    assert np.isfinite(scheduled).all() and np.abs(scheduled - base).max() > 1e-4


def test_mitigate_a_diffmem_checkpoint_on_vectors(tmp_path):
    """A score MLP checkpoint of diffmem's own (2-D vectors, VP) swept with the ODE sampler:
    an unconditional model, so copies are over all samples and the cost over the uncured
    non-copies; vectors get no image gallery."""
    from diffmem import nn as dnn

    train = torch.randn(12, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    np.save(tmp_path / "train.npy", train.numpy())
    cfg = dnn.TrainConfig(lambdas=[0.0], parameterizations=["score"], steps=5,
                          ema_half_life=0.2, mlp={"width": 8})
    dnn.train_dsm(train, VP(), cfg, checkpoint_dir=tmp_path / "mlp", progress=False)
    res = _mitigate(["--model", str(tmp_path / "mlp" / "step_000000005.pt"), "--train",
                     str(tmp_path / "train.npy"), "--n-samples", "6", "--strengths",
                     "tikhonov=0.5", "--strengths", "nn-guidance=3", "--exhaustive"],
                    tmp_path / "m")
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "m" / "mitigate.json").read_text())
    assert [r["cure"] for r in doc["runs"]] == ["tikhonov", "nn-guidance"]
    assert set(doc["not_applicable"]) == {"guidance", "guidance-schedule", "prompt-opt",
                                          "random-tokens", "embedding-noise",
                                          "attention-rescale", "amg"}
    assert "a condition and a null condition" in doc["not_applicable"]["amg"]
    assert "prompts embedded by a UNet text-to-image pipeline" in \
        doc["not_applicable"]["prompt-opt"]
    assert doc["baseline"]["sample_conditions"] is None
    base = np.load(tmp_path / "m" / doc["baseline"]["samples"])
    cured = np.load(tmp_path / "m" / doc["runs"][0]["samples"])
    assert base.shape == cured.shape == (6, 2) and np.abs(base - cured).max() > 1e-3
    assert "Cured samples beside uncured ones" not in (tmp_path / "m" / "index.html").read_text()


def test_prompt_optimization_moves_only_the_atypical_prompts(tmp_path):
    """prompt-opt=s: the prompts whose first-step text-conditional noise prediction exceeds
    s times the median are moved (Adam steps) and end at or below it, or at least lower; the
    others, and the negative prompt, keep their embeddings bit for bit; s so large that no
    prompt exceeds it is the model itself, sample for sample."""
    pytest.importorskip("transformers")
    from tiny_pipelines import sd_pipeline

    from diffmem.mitigate import CureContext, PromptOptimization, cure_model
    from diffmem.mitigate.prompt import first_step_gaps
    from diffmem.models import sample_model
    from diffmem.prompts import Prompts
    from diffmem.text import load_text_model

    texts = ["a red square", "a blue circle", "a green cross", "a red circle", "a dog"]
    tm = load_text_model(sd_pipeline(tmp_path / "sd"), Prompts(texts))
    null = torch.tensor(len(texts))
    model = tm.model.guided(7.5, null)
    table = model.network["embeds"]
    gaps = first_step_gaps(model, table, len(texts))
    assert gaps[-1] == 0 and bool((gaps[:-1] > 0).all())
    s = 0.9
    tau = s * float(gaps[:-1].median())
    cured = cure_model(model, [PromptOptimization(s)], CureContext(null=null))
    moved = cured.network["embeds"]
    after = first_step_gaps(cured, moved, len(texts))
    above = [j for j in range(len(texts)) if float(gaps[j]) > tau]
    assert 0 < len(above) < len(texts)
    for j in range(len(texts) + 1):
        if j in above:
            assert not torch.equal(moved[j], table[j])
            assert float(after[j]) < float(gaps[j])
        else:
            assert torch.equal(moved[j], table[j]), j
    assert sum(float(after[j]) <= tau * (1 + 1e-6) for j in above) >= 1
    cond = torch.arange(len(texts))
    same = cure_model(model, [PromptOptimization(100.0)], CureContext(null=null))
    a = sample_model(model, 5, tmp_path / "a.npy", sampler="pipeline", steps=3, cond=cond,
                     progress=False)
    b = sample_model(same, 5, tmp_path / "b.npy", sampler="pipeline", steps=3, cond=cond,
                     progress=False)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    c = sample_model(cured, 5, tmp_path / "c.npy", sampler="pipeline", steps=3, cond=cond,
                     progress=False)
    changed = [j for j in range(len(texts)) if not np.array_equal(np.asarray(a)[j],
                                                                 np.asarray(c)[j])]
    assert changed == above  # only the moved prompts' samples change


def test_random_tokens_add_seeded_words_to_every_prompt(tmp_path):
    """random-tokens=k: every prompt gets k words of the tokenizer's vocabulary (seeded per
    prompt: the same words again), encoded by the pipeline as if typed; the negative prompt's
    embedding is unchanged; k = 0 is the model, sample for sample; a fractional k is refused."""
    pytest.importorskip("transformers")
    from tiny_pipelines import sd_pipeline

    from diffmem.mitigate import CureContext, RandomTokens, cure_model, parse_cure
    from diffmem.models import sample_model
    from diffmem.prompts import Prompts
    from diffmem.text import load_text_model

    texts = ["a red square", "a blue circle"]
    sd = sd_pipeline(tmp_path / "sd")
    model = load_text_model(sd, Prompts(texts)).model.guided(7.5, torch.tensor(2))
    words = model.network["words"]
    assert "a" in words and all(w.isalpha() for w in words)
    ctx = CureContext(null=torch.tensor(2))
    cured = cure_model(model, [RandomTokens(3)], ctx)
    table, base = cured.network["embeds"], model.network["embeds"]
    assert torch.equal(table[2], base[2])
    assert not torch.equal(table[0], base[0]) and not torch.equal(table[1], base[1])
    # the words the cure adds, typed into the prompts, encode to the same table
    from diffmem.parallel import generator

    typed = [t + "".join(" " + words[int(i)] for i in torch.randint(
        len(words), (3,), generator=generator(0, j))) for j, t in enumerate(texts)]
    direct = load_text_model(sd, Prompts(typed)).model.network["embeds"]
    assert torch.equal(direct, table)
    assert torch.equal(cure_model(model, [RandomTokens(3)], ctx).network["embeds"], table)
    cond = torch.arange(2)
    a = sample_model(model, 2, tmp_path / "a.npy", sampler="pipeline", steps=3, cond=cond,
                     progress=False)
    b = sample_model(cure_model(model, [RandomTokens(0)], ctx), 2, tmp_path / "b.npy",
                     sampler="pipeline", steps=3, cond=cond, progress=False)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="random-tokens=K with a whole number K"):
        parse_cure("random-tokens=1.5")


def test_embedding_noise_has_the_stated_scale_and_spares_the_negative_prompt(tmp_path):
    """embedding-noise=s: each prompt's embedding moves by s rms(E) z with z standard normal
    (the sample standard deviation of the moves within 5 standard errors of s rms(E)), the
    same noise on a second call, the negative prompt's embedding unchanged; s = 0 leaves
    the table bit for bit."""
    pytest.importorskip("transformers")
    from tiny_pipelines import sd_pipeline

    from diffmem.mitigate import CureContext, EmbeddingNoise, cure_model
    from diffmem.prompts import Prompts
    from diffmem.text import load_text_model

    model = load_text_model(sd_pipeline(tmp_path / "sd"), Prompts(
        ["a red square", "a blue circle", "a dog"])).model.guided(7.5, torch.tensor(3))
    ctx = CureContext(null=torch.tensor(3))
    table = model.network["embeds"]
    rms = float(table[:-1].pow(2).mean().sqrt())
    noisy = cure_model(model, [EmbeddingNoise(0.5)], ctx).network["embeds"]
    moves = (noisy[:-1] - table[:-1]).double().flatten()
    n = moves.numel()
    std = float(moves.std())
    assert abs(std - 0.5 * rms) < 5 * 0.5 * rms / math.sqrt(2 * n), (std, 0.5 * rms, n)
    assert abs(float(moves.mean())) < 5 * 0.5 * rms / math.sqrt(n)
    assert torch.equal(noisy[-1], table[-1])
    assert torch.equal(cure_model(model, [EmbeddingNoise(0.5)], ctx).network["embeds"], noisy)
    assert torch.equal(cure_model(model, [EmbeddingNoise(0.0)], ctx).network["embeds"], table)


def test_attention_rescale_scales_the_start_token_and_masks_the_summary(tmp_path):
    """attention-rescale=C: its processor at C = 1 without a mask is the UNet's own attention
    (to float32 round-off); with the summary tokens masked, changing a prompt's embedding at
    those positions changes nothing of its prediction; C > 1 changes it; and the uncured
    model, called after the cured one, gives its own outputs again (processors restored)."""
    pytest.importorskip("transformers")
    from tiny_pipelines import sd_pipeline

    from diffmem.mitigate import AttentionRescale, CureContext, cure_model
    from diffmem.mitigate.attention import Rescaled, summary_mask, with_processors
    from diffmem.prompts import Prompts
    from diffmem.text import load_text_model

    model = load_text_model(sd_pipeline(tmp_path / "sd"), Prompts(
        ["a red square", "a blue circle"])).model.guided(7.5, torch.tensor(2))
    net, unet = model.network, model.network["unet"]
    x = torch.randn(2, *model.data_shape, generator=torch.Generator().manual_seed(0))
    y, k = torch.tensor([0, 1]), torch.tensor(40)
    own = net["net"](x, k, y)
    plain = {n: Rescaled(p, 1.0) for n, p in unet.attn_processors.items()}
    same = with_processors(model, unet, plain).network["net"](x, k, y)
    assert torch.allclose(same, own, rtol=1e-4, atol=1e-5 * float(own.abs().max()))
    mask = summary_mask(net["tokenize"](net["texts"]), net["end_token"])
    assert mask[:, 0].tolist() == [1, 1, 1] and mask[-1].min() == 1
    end = int(mask[0].sum())  # "a red square": start, 10 letters, then the end token
    assert end == 11 and mask[0, end:].max() == 0
    ctx = CureContext(null=torch.tensor(2))
    cured = cure_model(model, [AttentionRescale(1.2)], ctx)
    out = cured.network["net"](x, k, y)
    table = net["embeds"].clone()
    table[0, end:] += 3.0  # only the masked positions of prompt 0
    moved = cure_model(net["with_embeddings"](table, model), [AttentionRescale(1.2)], ctx)
    again = moved.network["net"](x, k, y)
    assert torch.allclose(again[0], out[0], rtol=0, atol=1e-6 * float(out.abs().max()))
    flat = cure_model(model, [AttentionRescale(1.0)], ctx).network["net"](x, k, y)
    assert float((flat - out).abs().max()) > 1e-4 * float(out.abs().max())
    assert torch.equal(net["net"](x, k, y), own)
