"""Detection of memorized conditions without the training set, and the two-model test:
constructed cases with known answers, the closed-form ends, and clear errors."""

import json
import textwrap

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from diffmem.audit.compare import compare_samples
from diffmem.cli import app
from diffmem.detect import detect, roc
from diffmem.models import ModelScore
from diffmem.samplers import sample_ode
from diffmem.schedules import VE, VP
from diffmem.scores import EmpiricalScore, GaussianScore

RUNNER = CliRunner()
GEN = torch.Generator().manual_seed(0)


def test_roc_on_constructed_scores():
    perfect = roc(torch.tensor([3.0, 2.0, 1.0, 0.0]), torch.tensor([1, 1, 0, 0]))
    assert perfect["auc"] == 1 and perfect["tpr_at_1pct_fpr"] == 1
    assert perfect["fpr"][0] == 0 and perfect["tpr"][-1] == 1
    assert roc(torch.ones(4), torch.tensor([1, 0, 1, 0]))["auc"] == 0.5  # all tied
    assert roc(torch.tensor([0.0, 1.0]), torch.tensor([1, 0]))["auc"] == 0
    with pytest.raises(ValueError, match="labels: expected both memorized"):
        roc(torch.ones(3), torch.ones(3))


def _half_memorizing():
    """Labels 0-2 name one training point each (the conditional empirical score: memorized);
    labels 3-5 get the unconditional Gaussian score, like the null label 6."""
    sch = VP()
    train = torch.randn(40, 4, generator=GEN, dtype=torch.float64)
    gauss = GaussianScore(train, sch)

    def fn(x, t, y):
        out = gauss(x.double(), t.double())
        for c in range(3):
            rows = y == c
            if rows.any():
                out[rows] = EmpiricalScore(train[c : c + 1], sch)(x[rows].double(),
                                                                  t[rows].double())
        return out.to(x.dtype)

    return ModelScore(fn, sch, (4,), conditional=True)


def test_detect_ranks_the_memorized_conditions_first():
    model = _half_memorizing()
    labels = torch.tensor([1, 1, 1, 0, 0, 0])
    result = detect(model, torch.arange(6), torch.tensor(6), n_noise=3, first_steps=4,
                    steps=20, labels=labels)
    by = {e["condition"]: e for e in result.conditions}
    assert all(by[c]["score"] > 0.1 for c in range(3))
    assert all(by[c]["score"] < 1e-6 for c in range(3, 6))  # the null's prediction itself
    assert all(by[c]["collapse"] > 0.99 for c in range(3))  # D returns one fixed point
    assert all(by[c]["collapse"] < 0.5 for c in range(3, 6))
    assert result.roc["score"]["auc"] == 1 and result.roc["collapse"]["auc"] == 1
    assert [e["condition"] for e in result.ranking()[:3]] == [0, 1, 2] or \
        {e["condition"] for e in result.ranking()[:3]} == {0, 1, 2}


def test_detect_bad_input():
    model = _half_memorizing()
    with pytest.raises(ValueError, match="--first-steps: expected at most the sampler's 10"):
        detect(model, torch.arange(6), torch.tensor(6), steps=10, first_steps=11)
    uncond = ModelScore(lambda x, t: -x, VE(), (4,))
    with pytest.raises(ValueError, match="--model: expected a conditional model"):
        detect(uncond, torch.arange(3), torch.tensor(6))
    with pytest.raises(ValueError, match="--labels: expected 6 labels of 0 or 1"):
        detect(model, torch.arange(6), torch.tensor(6), labels=torch.tensor([1, 2, 0, 0, 0, 0]))


def test_detect_command_writes_its_files_and_refuses_bad_input(tmp_path):
    pytest.importorskip("diffusers")
    import diffusers

    torch.manual_seed(0)
    diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1,
                          block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                          down_block_types=("DownBlock2D",) * 2,
                          up_block_types=("UpBlock2D",) * 2,
                          num_class_embeds=4).save_pretrained(tmp_path / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=50).save_pretrained(tmp_path / "sched")
    np.save(tmp_path / "conds.npy", np.arange(3))
    np.save(tmp_path / "labels.npy", np.array([1, 0, 0]))
    base = ["detect", "--model", str(tmp_path / "unet"), "--scheduler", str(tmp_path / "sched"),
            "--conditions", str(tmp_path / "conds.npy"), "--steps", "6", "--n-noise", "2",
            "--first-steps", "3", "--no-progress"]
    res = RUNNER.invoke(app, base + ["--null-cond", "3", "--labels",
                                     str(tmp_path / "labels.npy"), "--out", str(tmp_path / "d")])
    assert res.exit_code == 0, res.output
    written = json.loads((tmp_path / "d" / "detect.json").read_text())
    assert len(written["conditions"]) == 3 and set(written["roc"]) == {"score", "collapse"}
    assert (tmp_path / "d" / "detect.csv").read_text().startswith("index,condition,score")
    assert "ROC" in (tmp_path / "d" / "index.html").read_text() or "AUC" in (
        tmp_path / "d" / "index.html").read_text()
    for extra, message in [(["--null-cond", "9"], "--null-cond: expected conditions"),
                           (["--null-cond", "3", "--first-steps", "7"], "--first-steps"),
                           (["--null-cond", "3", "--data-shape", "a,b"], "--data-shape")]:
        out = tmp_path / "bad"
        res = RUNNER.invoke(app, [a for a in base if a != "3"] + extra + ["--out", str(out)]
                            if "--first-steps" in extra else base + extra + ["--out", str(out)])
        assert res.exit_code == 2 and message in res.output, res.output
        assert not out.exists()


def test_compare_on_constructed_pairs():
    a, b = torch.randn(30, 3, generator=GEN), torch.randn(30, 3, generator=GEN)
    copies = compare_samples(a[:10] + 1e-4, b[:10] + 1e-4, a, b, bootstrap=50)
    assert copies.agreement == 0 and float(copies.copy_a.float().mean()) == 1
    far = 5 + torch.randn(10, 3, generator=GEN)
    same = compare_samples(far, far + 1e-3, a, b, bootstrap=50)
    assert same.agreement == 1 and same.to_json()["median_d_ab"] == pytest.approx(1.7e-3,
                                                                                 rel=0.1)
    with pytest.raises(ValueError, match="--train-b: expected items of the shape"):
        compare_samples(a[:5], b[:5], a, torch.randn(30, 2))
    with pytest.raises(ValueError, match="samples_b: expected 5 samples"):
        compare_samples(a[:5], b[:4], a, b)


def test_closed_forms_give_the_two_ends_of_the_two_model_test():
    """Empirical halves never agree (each returns its own training points); Gaussian fits of
    two halves almost always do (d = 20: training points lie far apart, the two fits close)."""
    sch = VE()
    data = torch.randn(400, 20, generator=GEN, dtype=torch.float64)
    a, b = data[:200], data[200:]
    z = sch.prior_sample(50, 20, torch.Generator().manual_seed(1), dtype=torch.float64)
    ends = {}
    for name, make in (("empirical", EmpiricalScore), ("gaussian", GaussianScore)):
        xa = sample_ode(sch, make(a, sch), z, t_end=1e-4).samples
        xb = sample_ode(sch, make(b, sch), z, t_end=1e-4).samples
        ends[name] = compare_samples(xa, xb, a, b, bootstrap=50).agreement
    assert ends["empirical"] == 0 and ends["gaussian"] > 0.8


def test_compare_command_with_callables(tmp_path):
    gen = np.random.default_rng(0)
    np.save(tmp_path / "a.npy", gen.standard_normal((50, 2)))
    np.save(tmp_path / "b.npy", gen.standard_normal((50, 2)))
    np.save(tmp_path / "c3.npy", gen.standard_normal((50, 3)))
    (tmp_path / "models.py").write_text(textwrap.dedent("""
        import numpy as np, torch
        from diffmem.schedules import VE
        from diffmem.scores import EmpiricalScore
        A = EmpiricalScore(torch.from_numpy(np.load(PATH_A)), VE())
        B = EmpiricalScore(torch.from_numpy(np.load(PATH_B)), VE())
        def score_a(x, t):
            return A(x.double(), t.double()).to(x.dtype)
        def score_b(x, t):
            return B(x.double(), t.double()).to(x.dtype)
    """).replace("PATH_A", repr(str(tmp_path / "a.npy"))).replace(
        "PATH_B", repr(str(tmp_path / "b.npy"))))
    base = ["compare", "--model-a", f"{tmp_path / 'models.py'}:score_a", "--model-b",
            f"{tmp_path / 'models.py'}:score_b", "--schedule", "VE", "--train-a",
            str(tmp_path / "a.npy"), "--n-samples", "20", "--no-progress", "--bootstrap", "50"]
    res = RUNNER.invoke(app, base + ["--train-b", str(tmp_path / "b.npy"), "--out",
                                     str(tmp_path / "cmp")])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert summary["agreement"] == 0 and summary["copied_a"] > 0.9 and summary["copied_b"] > 0.9
    assert np.array_equal(np.load(tmp_path / "cmp" / "initial_noise.npy"),
                          np.load(tmp_path / "cmp" / "a" / "initial_noise.npy"))
    assert len((tmp_path / "cmp" / "per_pair.csv").read_text().splitlines()) == 21
    assert "Both sample clouds" in (tmp_path / "cmp" / "index.html").read_text()
    res = RUNNER.invoke(app, base + ["--train-b", str(tmp_path / "c3.npy"), "--out",
                                     str(tmp_path / "bad")])
    assert res.exit_code == 2 and "--train-b: expected items of the shape" in res.output
    assert not (tmp_path / "bad").exists()
