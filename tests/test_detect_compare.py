"""The two-model test: constructed cases with known answers, the closed-form ends, and clear
errors."""

import json
import textwrap

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from diffmem.audit.compare import compare_samples
from diffmem.cli import app
from diffmem.samplers import sample_ode
from diffmem.schedules import VE
from diffmem.scores import EmpiricalScore, GaussianScore

RUNNER = CliRunner()
GEN = torch.Generator().manual_seed(0)


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
