"""memorization-time: the times read from the records, the slope and its bootstrap on
constructed cases with known answers, the verdict's three states, and a tiny run."""

import json
import math

import numpy as np
import pytest

from diffmem.experiments import get_experiment
from diffmem.experiments.base import resolve_params, run_experiment
from diffmem.experiments.memorization_time import (
    bootstrap_slope,
    first_general,
    first_memorized,
    fit_slope,
    marks,
    run_steps,
)


def test_times_are_read_from_the_records_by_log_interpolation():
    steps = [100, 200, 400, 800]
    # copies cross one half halfway (in log steps) between 200 and 400
    assert first_memorized(steps, [0.0, 0.3, 0.7, 1.0]) == pytest.approx(200 * math.sqrt(2))
    assert first_memorized(steps, [0.0, 0.1, 0.2, 0.4]) is None
    assert first_memorized(steps, [0.9, 1.0, 1.0, 1.0]) == 100
    # the distance drops from 1.0 to its best 0.1; within 0.1 of the drop: 0.19
    pop = [1.0, 0.55, 0.1, 0.3]
    level = 0.1 + 0.1 * 0.9
    frac = (0.55 - level) / (0.55 - 0.1)
    assert first_general(steps, pop, 0.1) == pytest.approx(200 * 2 ** frac)
    assert first_general(steps, [0.1, 0.5, 0.2, 0.3], 0.1) == 100


def test_slope_and_bootstrap_on_known_power_laws():
    sizes = [2, 4, 8, 16, 32]
    assert fit_slope(sizes, [7 * n for n in sizes]) == pytest.approx(1.0)
    assert fit_slope(sizes, [3 * n ** 0.5 for n in sizes]) == pytest.approx(0.5)
    lo, hi = bootstrap_slope({n: [5.0 * n, 5.0 * n] for n in sizes}, 200, seed=0)
    assert lo == pytest.approx(1.0) and hi == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    noisy = {n: [n * math.exp(rng.normal(0, 0.3)) for _ in range(3)] for n in sizes}
    lo, hi = bootstrap_slope(noisy, 500, seed=0)
    assert lo < fit_slope([n for n in sizes for _ in range(3)],
                          [t for n in sizes for t in noisy[n]]) < hi and hi - lo < 0.6


def test_one_grid_of_evaluation_steps_for_every_size():
    p = {"sizes": [2, 8, 32], "steps_per_item": 100, "min_steps": 500, "first_step": 10,
         "n_log": 8}
    assert [run_steps(p, n) for n in p["sizes"]] == [500, 800, 3200]
    long, short = marks(p, 32), marks(p, 2)
    assert long[0] == 10 and long[-1] == 3200 and len(long) == 8
    assert short[-1] == 500 and set(short[:-1]) <= set(long)


def _metrics(slope, interval, spread, mem=100.0):
    return {"slope": slope, "slope_interval": interval, "gen_spread": spread,
            "per_size": {"2": {"tau_gen": 50.0, "tau_mem": mem, "monitor_inside_window":
                               [True]},
                         "8": {"tau_gen": 60.0, "tau_mem": 400.0, "monitor_inside_window":
                               [False]}}}


def test_verdicts():
    judge = get_experiment("memorization-time").judge
    assert judge(_metrics(1.0, [0.8, 1.2], 1.2), {}).status == "confirmed"
    assert judge(_metrics(1.0, [0.6, 1.2], 1.2), {}).status == "not_reproduced"
    assert judge(_metrics(1.0, [0.8, 1.2], 2.5), {}).status == "not_reproduced"
    assert judge(_metrics(None, None, 1.2, mem=None), {}).status == "inconclusive"


def test_tiny_run_records_times_and_resumes(tmp_path):
    exp = get_experiment("memorization-time")
    params = resolve_params(exp, quick=True, overrides=[
        "sizes=2,4", "seeds=1", "steps_per_item=100", "min_steps=300", "n_log=5",
        "n_samples=16", "n_fresh=64", "monitor_points=4", "bootstrap=50", "width=32"])
    rec = run_experiment(exp, tmp_path, params, progress=False)
    m = json.loads((tmp_path / "memorization-time" / "metrics.json").read_text())
    assert m["sizes"] == [2, 4] and len(m["runs"]) == 2
    for r in m["runs"]:
        assert r["steps"] == marks(params, r["n"])
        assert all(0 <= c <= 1 for c in r["copied"]) and all(v > -0.1 for v in r["population"])
        assert r["steps"][0] <= r["tau_gen"] <= r["steps"][-1]
    assert rec.verdict.status in ("confirmed", "not_reproduced", "inconclusive")
    assert (tmp_path / "memorization-time" / "memorization_time.png").is_file()
    again = run_experiment(exp, tmp_path, params, progress=False, resume=True)
    assert json.loads((tmp_path / "memorization-time" / "metrics.json").read_text())[
        "runs"] == m["runs"]
    assert again.elapsed_s < rec.elapsed_s


@pytest.mark.parametrize(("override", "message"), [
    ("sizes=1,4", "sizes: expected training-set sizes >= 2"),
    ("gen_fraction=nan", "gen_fraction: expected a number in (0, 1), received nan"),
    ("gen_fraction=1.5", "gen_fraction: expected a number in (0, 1), received 1.5"),
    ("first_step=5000", "first_step: expected a step before the end of the shortest run"),
])
def test_bad_parameters_are_refused_before_training(tmp_path, override, message):
    from typer.testing import CliRunner

    from diffmem.cli import app

    res = CliRunner().invoke(app, ["run", "memorization-time", "--quick", "--set", override,
                                   "--out", str(tmp_path), "--no-progress"])
    assert res.exit_code == 2 and message in res.output, res.output
    assert not (tmp_path / "memorization-time").exists()
