import json
import os

import pytest
from typer.testing import CliRunner

from diffmem.cli import app
from diffmem.experiments import REGISTRY, get_experiment
from diffmem.experiments.base import ConfigError, resolve_params, run_experiment
from diffmem.io import atomic_write_json


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    """Every registered 2-D experiment in --quick mode, once for the module."""
    out = tmp_path_factory.mktemp("quick")
    names = ["trajectories", "transformed-time", "structured-points", "tikhonov-sweep",
             "threshold-sweep"]
    for name in names:
        exp = get_experiment(name)
        run_experiment(exp, out, resolve_params(exp, quick=True), seed=0, progress=False)
    return out


def load(out, name, kind="metrics"):
    return json.loads((out / name / f"{kind}.json").read_text())


def test_trajectories_memorize_at_rate_sigma(quick_runs):
    m = load(quick_runs, "trajectories")
    for sch in ["VE", "VP"]:
        assert m[sch]["fraction_within"]["0.01"] == 1.0
        assert abs(m[sch]["convergence_slope"] - 1) < 0.1
        assert sum(m[sch]["hit_counts"]) == m[sch]["n_samples"]
    assert m["status"] == "confirmed"
    assert (quick_runs / "trajectories" / "trajectories_VE.png").stat().st_size > 10_000


def test_transformed_time_rate(quick_runs):
    m = load(quick_runs, "transformed-time")
    for sch in ["VE", "VP"]:
        assert abs(m[sch]["rate"] - 1) < 0.05


def test_structured_points_limits(quick_runs):
    m = load(quick_runs, "structured-points")
    two, four = m["two"], m["four"]
    assert sorted(map(tuple, two["bisector_starts"])) == [(0.0, -2.1), (0.0, 2.1)]
    for lim in two["bisector_limits"]:
        assert abs(lim[0]) < 1e-5 and abs(lim[1]) < 1e-5
    assert len(four["bisector_limits"]) == 4
    for start, lim in zip(four["bisector_starts"], four["bisector_limits"], strict=True):
        assert lim == pytest.approx([0.5 * (1 if start[0] > 0 else -1),
                                     0.5 * (1 if start[1] > 0 else -1)], abs=1e-5)
    assert two["max_generic_distance"] < 1e-4 and four["max_generic_distance"] < 1e-4


@pytest.mark.parametrize(("name", "param"), [("tikhonov-sweep", "c"),
                                             ("threshold-sweep", "tau")])
def test_sweeps_fraction_decreases(quick_runs, name, param):
    m = load(quick_runs, name)
    assert m["parameter"] == param
    pairs = sorted(zip(m["values"], m["fraction_within"]["0.01"], strict=True))
    fracs = [f for _, f in pairs]
    assert fracs[0] > 0.9 and fracs[-1] < 0.05
    assert all(b <= a + 0.02 for a, b in zip(fracs, fracs[1:], strict=False))
    assert m["n_samples"] == 200


@pytest.mark.parametrize(("name", "parameter"), [("nn-tikhonov", "lambda"),
                                                 ("nn-width", "width")])
def test_network_experiments_quick(tmp_path, name, parameter):
    exp = get_experiment(name)
    rec = run_experiment(exp, tmp_path, resolve_params(exp, quick=True), progress=False)
    m = load(tmp_path, name)
    assert m["parameter"] == parameter
    assert set(m["fraction_within"]) == {"0.01", "0.05", "0.1", "0.5"}
    for fr in m["fraction_within"].values():
        assert len(fr) == len(m["values"]) and all(0 <= f <= 1 for f in fr)
    # even at quick sizes the regularized / narrow network copies less at 0.1
    first, last = m["fraction_within"]["0.1"][0], m["fraction_within"]["0.1"][-1]
    assert (first > last) if name == "nn-tikhonov" else (first < last)
    assert rec.verdict.status == "confirmed"
    assert (tmp_path / name / "checkpoints" if name == "nn-tikhonov"
            else tmp_path / name / "checkpoints_w4").is_dir()


def test_early_stopping_quick(tmp_path):
    exp = get_experiment("nn-early-stopping")
    params = resolve_params(exp, quick=True, overrides=["steps=3000", "every=1000"])
    run_experiment(exp, tmp_path, params, progress=False)
    m = load(tmp_path, "nn-early-stopping")
    assert m["parameter"] == "steps" and m["values"] == [1000, 2000, 3000]
    for name in ["score", "noise"]:
        assert len(m[name]["fraction_within"]["0.1"]) == 3


def test_conditional_experiments_quick(tmp_path):
    for name in ["conditional-2d", "inverse-digits"]:
        exp = get_experiment(name)
        params = resolve_params(exp, quick=True, overrides=["network_steps=50"])
        run_experiment(exp, tmp_path, params, progress=False)
    two = load(tmp_path, "conditional-2d")
    by = {name.split()[0]: m for name, m in two["methods"].items()}
    assert all(f == 1.0 for f in by["empirical"]["fraction_paired_at_training_y"])
    assert sum(by["Tikhonov"]["fraction_within"]) < sum(by["empirical"]["fraction_within"])
    digits = load(tmp_path, "inverse-digits")["methods"]
    assert digits["empirical"]["copy_fraction_nn_ratio"] == 1.0
    assert digits["Tikhonov c = 0.05"]["copy_fraction_nn_ratio"] < 0.5
    assert digits["Tikhonov c = 0.05"]["diversity_mean_pairwise"] > digits["empirical"][
        "diversity_mean_pairwise"]


def test_config_records_everything(quick_runs):
    cfg = load(quick_runs, "tikhonov-sweep", "config")
    assert cfg["seed"] == 0 and cfg["params"]["n_samples"] == 200
    assert set(cfg["versions"]) >= {"diffmem", "torch"}


def test_same_seed_same_bytes(tmp_path):
    exp = get_experiment("tikhonov-sweep")
    params = resolve_params(exp, quick=True, overrides=["n_samples=100"])
    a = run_experiment(exp, tmp_path / "a", params, seed=3, progress=False)
    b = run_experiment(exp, tmp_path / "b", params, seed=3, progress=False)
    c = run_experiment(exp, tmp_path / "c", params, seed=4, progress=False)
    read = lambda r: (r.folder / "metrics.json").read_bytes()  # noqa: E731
    assert read(a) == read(b)
    assert read(a) != read(c)


def test_param_resolution(tmp_path):
    exp = get_experiment("tikhonov-sweep")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[tikhonov-sweep]\nn_samples = 50\nvalues = [0.1, 0.01]\n')
    p = resolve_params(exp, config_file=cfg, overrides=["rtol=1e-6", "deltas=0.01,0.05"])
    assert p["n_samples"] == 50 and p["values"] == [0.1, 0.01]
    assert p["rtol"] == 1e-6 and p["deltas"] == [0.01, 0.05]
    with pytest.raises(ConfigError, match="unknown key 'nope'"):
        resolve_params(exp, overrides=["nope=1"])
    with pytest.raises(ConfigError, match="n_samples: expected a value of type int"):
        resolve_params(exp, overrides=["n_samples=1.5"])
    with pytest.raises(ConfigError, match="expected key=value"):
        resolve_params(exp, overrides=["n_samples"])
    with pytest.raises(ConfigError, match="experiment: expected one of"):
        get_experiment("nope")


def test_atomic_write_survives_interruption(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"a": 1})

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_cli_list_and_errors(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["list"])
    assert res.exit_code == 0
    for name in REGISTRY:
        assert name in res.output
    res = runner.invoke(app, ["run", "nope", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "experiment: expected one of" in res.output
    res = runner.invoke(app, ["run", "tikhonov-sweep", "--quick", "--set", "bogus=1"])
    assert res.exit_code == 2 and "unknown key 'bogus'" in res.output
    res = runner.invoke(app, ["run", "tikhonov-sweep", "--quick", "--set", "n_samples=x"])
    assert res.exit_code == 2 and "n_samples: expected a value of type int" in res.output
    res = runner.invoke(app, ["run", "tikhonov-sweep", "--quick", "--set", "values=-1",
                              "--out", str(tmp_path)])
    assert res.exit_code == 2 and "c: expected a finite number >= 0" in res.output
    res = runner.invoke(app, ["run", "tikhonov-sweep", "--device", "cuda:7",
                              "--out", str(tmp_path)])
    if not __import__("torch").cuda.is_available():
        assert res.exit_code == 2 and "--device: expected" in res.output


def test_cli_reproduce_writes_report(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["reproduce", "--quick", "--out", str(tmp_path), "--no-progress",
                              "--only", "tikhonov-sweep,structured-points"])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["experiments"]) == {"tikhonov-sweep", "structured-points"}
    assert all(e["status"] == "confirmed" for e in summary["experiments"].values())
    page = (tmp_path / "index.html").read_text()
    assert page.count("data:image/png;base64,") >= 3
    assert "Verdict" in page and "Paper's claim" in page


def _unet_metrics(curves):
    return {"values": [100, 200, 300], "sizes": {
        c: {"exact_match": f, "first_step_half_memorized": next(
            (s for s, v in zip([100, 200, 300], f, strict=True) if v >= 0.5), None),
            "follows_empirical_down_to_sigma": 0.0217 if c == "8" else None}
        for c, f in curves.items()}}


@pytest.mark.parametrize(("curves", "statuses"), [
    ({"4": [0.1, 0.6, 0.9], "8": [0.6, 0.9, 1.0]}, ["confirmed", "confirmed"]),
    ({"4": [0.6, 0.9, 0.9], "8": [0.1, 0.6, 1.0]}, ["confirmed", "not_reproduced"]),
    ({"4": [0.6, 0.9, 0.2], "8": [0.6, 0.9, 1.0]}, ["not_reproduced", "confirmed"]),
    ({"4": [0.0, 0.1, 0.2], "8": [0.6, 0.9, 1.0]}, ["inconclusive", "inconclusive"]),
])
def test_squares_unet_judges_its_two_claims_apart(curves, statuses):
    exp = get_experiment("squares-unet")
    verdict = exp.judge(_unet_metrics(curves), dict(exp.defaults))
    assert [c.status for c in verdict.claims] == statuses
    worst = ("not_reproduced" if "not_reproduced" in statuses else
             "inconclusive" if "inconclusive" in statuses else "confirmed")
    assert verdict.status == worst
    assert all(str(v) in verdict.text for v in curves["4"][-1:])
    assert "width 4: none of the grid, width 8: sigma = 0.0217" in verdict.text


def test_figures_are_drawn_from_the_recorded_values_only(quick_runs):
    """Every figure of a run can be redrawn from metrics.json and arrays.npz alone."""
    import numpy as np

    from diffmem.experiments.base import Recorded

    for name in ["trajectories", "transformed-time", "structured-points", "threshold-sweep"]:
        exp = get_experiment(name)
        folder = quick_runs / name
        metrics = load(quick_runs, name)
        with np.load(folder / "arrays.npz") as arrays:
            rec = Recorded(metrics, dict(arrays))
        params = load(quick_runs, name, "config")["params"]
        figures = exp.draw(rec, params)
        assert sorted(f"{k}.png" for k in figures) == sorted(
            load(quick_runs, name, "config")["figures"])
        assert exp.judge(metrics, params).as_json()["verdict"] == metrics["verdict"]


def test_rerun_replaces_stale_outputs_and_checkpoints(tmp_path):
    exp = get_experiment("tikhonov-sweep")
    params = resolve_params(exp, quick=True, overrides=["n_samples=20"])
    folder = tmp_path / exp.name
    folder.mkdir()
    (folder / "old_figure.png").write_bytes(b"stale")
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "step_000000010.pt").write_bytes(b"stale")
    (folder / ".metrics.json.x1.tmp").write_bytes(b"partial")
    rec = run_experiment(exp, tmp_path, params, progress=False)
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(["metrics.json", "config.json", "arrays.npz", *rec.figures])
    for p in folder.iterdir():  # shareable: 0644 under the usual umask
        assert p.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_second_writer_is_refused_and_failed_run_leaves_nothing(tmp_path, monkeypatch):
    from diffmem.experiments.base import FolderLock

    exp = get_experiment("tikhonov-sweep")
    params = resolve_params(exp, quick=True, overrides=["n_samples=20"])
    (tmp_path / exp.name).mkdir()
    with FolderLock(tmp_path / exp.name), pytest.raises(ConfigError, match="locked by running "
                                                                            "process"):
        run_experiment(exp, tmp_path, params, progress=False)
    (tmp_path / exp.name).rmdir()
    # a lock left by a process that is gone is taken over
    (tmp_path / exp.name).mkdir()
    (tmp_path / exp.name / ".lock").write_text("999999999")
    run_experiment(exp, tmp_path, params, progress=False)
    assert not (tmp_path / exp.name / ".lock").exists()
    # a run that fails before writing leaves no folder behind
    bad = resolve_params(exp, quick=True, overrides=["values=-1"])
    with pytest.raises(ValueError, match="c: expected a finite number >= 0"):
        run_experiment(exp, tmp_path / "fresh", bad, progress=False)
    assert not (tmp_path / "fresh" / exp.name).exists()


def test_cli_user_errors_exit_2_with_a_message(tmp_path):
    runner = CliRunner()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [
        (["run", "tikhonov-sweep", "--quick", "--out", str(a_file)],
         "--out: expected a folder, received"),
        (["run", "tikhonov-sweep", "--quick", "--out", str(a_file / "sub")],
         "--out: expected a folder that can be created"),
        (["run", "tikhonov-sweep", "--quick", "--device", "foo", "--out", str(tmp_path)],
         "--device: expected 'cpu' or an available CUDA device"),
        (["run", "tikhonov-sweep", "--quick", "--device", "mps", "--out", str(tmp_path)],
         "--device: expected 'cpu' or an available CUDA device"),
        (["run", "tikhonov-sweep", "--quick", "--set", "n_samples=-5", "--out", str(tmp_path)],
         "n_samples: expected a count >= 1, received '-5'"),
        (["reproduce", "--quick", "--only", "nope", "--out", str(tmp_path)],
         "experiment: expected one of"),
    ]
    for args, message in cases:
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert f"Error: {message}" in res.output, (args, res.output)
        assert "Traceback" not in res.output


def test_reproduce_jobs_and_the_page_while_running(tmp_path):
    from diffmem.report import write_report

    res = CliRunner().invoke(app, ["reproduce", "--quick", "--jobs", "0", "--out",
                                   str(tmp_path), "--only", "tikhonov-sweep"])
    assert res.exit_code == 2 and "--jobs: expected an integer >= 1" in res.output
    exp = REGISTRY["tikhonov-sweep"]
    rec = run_experiment(exp, tmp_path, resolve_params(exp, quick=True), progress=False)
    write_report(tmp_path, [rec], dict(REGISTRY), quick=True, seed=0, total_s=3.0,
                 pending=["threshold-sweep", "trajectories"])
    page = (tmp_path / "index.html").read_text()
    assert "<progress value='1' max='3'>" in page and "http-equiv='refresh'" in page
    assert "still running or waiting: threshold-sweep, trajectories" in page
    assert json.loads((tmp_path / "summary.json").read_text())["pending"] == [
        "threshold-sweep", "trajectories"]
    write_report(tmp_path, [rec], dict(REGISTRY), quick=True, seed=0, total_s=3.0)
    page = (tmp_path / "index.html").read_text()
    assert "<progress" not in page and "refresh" not in page
    # each experiment's time, in summary.json and in the page's table
    seconds = json.loads((tmp_path / "summary.json").read_text())["experiments"][
        "tikhonov-sweep"]["elapsed_s"]
    assert seconds == round(rec.elapsed_s, 3) and seconds > 0
    assert "Time per experiment" in page
    assert f"<td style='text-align:right'>{rec.elapsed_s:.1f}</td>" in page
