"""The trade-off experiments' quick runs: every regularizer on the memorization/distance
plane, with the references and the verdict naming the best."""

import json

import pytest

from diffmem.experiments import get_experiment
from diffmem.experiments.base import resolve_params, run_experiment

REGULARIZERS = {"tikhonov", "threshold", "kde", "smoothed", "empirical", "gaussian"}


def load(folder, name):
    return json.loads((folder / name / "metrics.json").read_text())


def test_tradeoff_2d_quick(tmp_path):
    exp = get_experiment("tradeoff-2d")
    params = resolve_params(exp, quick=True, overrides=[
        "truths=gaussian", "n_samples=120", "reference_n=5000", "c_values=1e-3,0.3",
        "tau_values=1e-2,3.0", "h_values=0.01,0.5", "lam_values=0.05,1.0",
        "smoothed_draws=8", "network_steps=200", "network_ema_half_life=10",
        "network_lambdas=0.0,0.1"])
    rec = run_experiment(exp, tmp_path, params, progress=False)
    m = load(tmp_path, "tradeoff-2d")["truths"]["gaussian"]
    regs = m["regularizers"]
    assert set(regs) == REGULARIZERS | {"network"}
    for r in regs.values():
        assert set(r["memorized"]) == {"0.01", "0.1"}
        assert len(r["energy_distance"]) == len(r["values"]) == len(r["mmd"])
    assert regs["empirical"]["memorized"]["0.01"] == [1.0]  # the end points
    assert regs["gaussian"]["memorized"]["0.01"] == [0.0]
    for name in ("tikhonov", "kde", "smoothed"):  # weak: memorizes; strong: does not
        assert regs[name]["memorized"]["0.1"][0] > regs[name]["memorized"]["0.1"][-1]
    refs = m["references"]
    assert refs["training_set"]["energy_distance"] > 0
    assert refs["fresh_draws"]["n_draws"] == 30
    # the memorizing sampler's law is the training set's empirical measure
    assert regs["empirical"]["energy_distance"][0] == pytest.approx(
        refs["training_set"]["energy_distance"], abs=0.05)
    assert m["best"] is not None and m["best"]["memorized"] < 0.05
    assert "trained here for 200 steps" in regs["network"]["source"]
    assert rec.verdict.status in {"confirmed", "inconclusive"}
    assert m["best"]["regularizer"] in rec.verdict.text
    assert (tmp_path / "tradeoff-2d" / "tradeoff_gaussian.png").stat().st_size > 10_000


def test_tradeoff_digits_quick(tmp_path):
    exp = get_experiment("tradeoff-digits")
    params = resolve_params(exp, quick=True, overrides=[
        "n_samples=40", "c_values=1e-5,1.0", "tau_values=1e-20,1e-6", "h_values=0.1,1.0",
        "lam_values=0.1,1.0", "smoothed_draws=2"])
    run_experiment(exp, tmp_path, params, progress=False)
    m = load(tmp_path, "tradeoff-digits")
    regs = m["regularizers"]
    assert set(regs) == REGULARIZERS
    assert regs["empirical"]["copies_nn_ratio"] == [1.0]
    assert regs["gaussian"]["copies_nn_ratio"] == [0.0]
    assert regs["tikhonov"]["copies_nn_ratio"][-1] < regs["tikhonov"]["copies_nn_ratio"][0]
    for r in regs.values():
        assert all(v > 0 for v in r["test_train_ratio_median"])
        assert len(r["frechet_features"]) == len(r["values"])
    # copies sit as close to the training set as it sits to the held-out digits
    assert regs["empirical"]["mmd_to_test"][0] == pytest.approx(
        m["references"]["training_set"]["mmd_to_test"], abs=0.02)
    assert regs["empirical"]["test_train_ratio_median"][0] > 20  # copies: far closer to train
    assert m["classifier_train_accuracy"] > 0.9
