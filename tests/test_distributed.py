"""Two gloo processes on this machine, started by the test with torchrun, give the
one-process results: scores (as denoisers ``x + sigma^2 s``), weights and nearest neighbours
to a relative 1e-12 of each row (float64), ODE samples to 1e-10 (adaptive steps taken from
values equal to round-off); also when N is not divisible by the number of processes, or
smaller than it (an empty block)."""

import os
import subprocess
import sys
from pathlib import Path

import distributed_worker as worker
import pytest
import torch

HERE = Path(__file__).parent


def run_group(tmp_path: Path, n: int, processes: int = 2) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={processes}", str(HERE / "distributed_worker.py"),
           str(tmp_path), str(n)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(tmp_path / f"rank_{r}.pt", weights_only=True) for r in range(processes)]


@pytest.mark.parametrize("n", [21, 1])
def test_two_processes_equal_one(tmp_path, n):
    train, labels, x, x_T = worker.data(n)
    alone = worker.evaluate(train, labels, x, x_T)
    ranks = run_group(tmp_path, n)
    for key, ref in alone.items():
        for r, got in enumerate(ranks):
            value = got[key]
            assert value.shape == ref.shape, (key, r)
            if key == "knn_i":
                assert torch.equal(value, ref), key
                continue
            # relative to each row's size: the blocks are summed in another order
            rel = (value - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-300)
            assert float(rel.max()) < (1e-10 if key == "ode" else 1e-12), (key, r, rel)


def test_torchrun_cli_splits_closed_form_experiments(tmp_path):
    """``torchrun --nproc-per-node 2 -m diffmem run`` writes the one-process metrics (process
    0 writes); a network experiment is refused with exit code 2."""
    import json

    from diffmem.experiments import get_experiment
    from diffmem.experiments.base import resolve_params, run_experiment

    exp = get_experiment("threshold-sweep")
    args = ["--set", "n_samples=40", "--set", "n_trajectories=3"]
    params = resolve_params(exp, quick=True, overrides=[a for a in args if a != "--set"])
    run_experiment(exp, tmp_path / "one", params, progress=False)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node=2", "-m", "diffmem", "run"]
    done = subprocess.run([*base, "threshold-sweep", "--quick", *args, "--out",
                           str(tmp_path / "two"), "--no-progress"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("[OK] threshold-sweep") == 1  # process 0 reports
    one = json.loads((tmp_path / "one" / exp.name / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / exp.name / "metrics.json").read_text())
    assert one["fraction_within"] == two["fraction_within"]
    assert one["trace_final_weight_sum"] == pytest.approx(two["trace_final_weight_sum"],
                                                          rel=1e-12)
    refused = subprocess.run([*base, "nn-width", "--quick", "--out", str(tmp_path / "nn")],
                             env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0
    assert "--nproc-per-node: expected 1 process for 'nn-width'" in refused.stderr


def test_torchrun_audit_equals_one_process(tmp_path):
    """``torchrun --nproc-per-node 2 -m diffmem audit`` splits the training set and writes
    the one-process audit."""
    import json

    import numpy as np

    gen = np.random.default_rng(0)
    train = gen.random((101, 6))
    samples = np.concatenate([train[:20] + 1e-4, gen.random((20, 6))])
    np.save(tmp_path / "train.npy", train)
    np.save(tmp_path / "samples.npy", samples)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = ["-m", "diffmem", "audit", str(tmp_path / "samples.npy"), "--train",
            str(tmp_path / "train.npy"), "--no-progress", "--bootstrap", "100"]
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node=2", *args, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "audit.json").read_text()) for d in ("one", "two"))
    for key in ("fraction_within", "nn_ratio", "calibrated_l2"):
        assert a[key] == pytest.approx(b[key], rel=1e-9), key
    assert a["duplicates"] == b["duplicates"] and a["n_train"] == b["n_train"] == 101
    rows = [(tmp_path / d / "per_sample.csv").read_text().splitlines() for d in ("one", "two")]
    assert [r.split(",")[:2] for r in rows[0]] == [r.split(",")[:2] for r in rows[1]]
