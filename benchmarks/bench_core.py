"""Core benchmarks, every comparison measured side by side in one run (CI does not run this).

    python benchmarks/bench_core.py            # all parts
    python benchmarks/bench_core.py --quick    # smaller sizes, for a smoke test

A. Score evaluation against the machine's matrix-product rate for the same shapes
   (256 queries; N = 2000, d = 4096 and N = 60000, d = 784; float32). The kernel needs two
   products of size B x N x d (distances and the weighted mean), so the reported fraction of
   the matmul rate is ``2 t_matmul / t_score``. Peak memory beyond the inputs is read from
   the kernel's VmHWM after resetting it (Linux).
B. Against a naive score that loops over the training points in Python (N = 1000, d = 784).
C. Sampling 1000 samples of the paper's 2-D VE and VP set-ups to t_end = 1e-6 against scipy's
   solve_ivp RK45 on the flattened batch (rtol = atol = 1e-5), with its right-hand side built
   on (i) diffmem's kernel and (ii) a per-training-point numpy loop (the reference code's
   way); accuracy against a tight-tolerance solution.
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy.integrate import solve_ivp

from diffmem import data, metrics, samplers, schedules, scores


def timeit(fn: Callable[[], object], repeat: int = 5) -> float:
    """Median wall time of ``fn`` over ``repeat`` runs after one warm-up."""
    return side_by_side([fn], repeat)[0]


def side_by_side(fns: list[Callable[[], object]], repeat: int = 7) -> list[float]:
    """Median wall times of several functions, run interleaved (a, b, a, b, ...) so that the
    machine's load drifts affect them alike."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return -1


def peak_extra_bytes(N: int, d: int, t: float) -> int:
    """Peak resident memory of one score evaluation above its inputs, measured in a fresh
    process (so no allocator cache hides it; Linux only)."""
    code = (
        "import torch, sys; sys.path.insert(0, 'benchmarks');"
        "from bench_core import _status; from diffmem import schedules, scores;"
        f"g = torch.Generator().manual_seed(0); y = torch.rand({N}, {d}, generator=g);"
        "sch = schedules.VE(); sc = scores.EmpiricalScore(y, sch);"
        f"x = y[:256] + sch.sigma({t}).float() * torch.randn(256, {d}, generator=g);"
        "sc._centres_like(x); import pathlib; pathlib.Path('/proc/self/clear_refs')"
        ".write_text('5'); before = _status('VmRSS:');"
        f"sc(x, {t}); print(_status('VmHWM:') - before)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    return int(out.stdout.strip() or -1)


def part_a(quick: bool) -> None:
    print("\nA. score evaluation vs matrix-product rate (float32, 256 queries)")
    print(f"{'N':>6} {'d':>5} {'t':>7} {'matmul ms':>10} {'score ms':>9} {'rate':>6} "
          f"{'peak extra MB':>13} {'inputs MB':>9}")
    shapes = [(2000, 4096), (60000, 784)] if not quick else [(500, 1024), (4000, 256)]
    gen = torch.Generator().manual_seed(0)
    sch = schedules.VE()
    for N, d in shapes:
        train = torch.rand(N, d, generator=gen)
        score = scores.EmpiricalScore(train, sch)
        for t in (0.5, 0.05):
            x = (train[:256] + sch.sigma(t).float() * torch.randn(256, d, generator=gen))
            tm, ts = side_by_side([lambda x=x: x @ train.T, lambda x=x, t=t: score(x, t)])
            peak = peak_extra_bytes(N, d, t)
            inputs = (train.numel() + x.numel()) * 4
            print(f"{N:>6} {d:>5} {t:>7} {1e3 * tm:>10.1f} {1e3 * ts:>9.1f} "
                  f"{2 * tm / ts:>6.2f} {peak / 2**20:>13.1f} {inputs / 2**20:>9.1f}")


def naive_score(train: torch.Tensor, sch: schedules.Schedule,
                x: torch.Tensor, t: float) -> torch.Tensor:
    """The reference way: one distance per training point, in a Python loop."""
    m, s2 = float(sch.m(t)), float(sch.sigma2(t))
    logits = torch.stack([-((x - m * y) ** 2).sum(1) / (2 * s2) for y in train], 1)
    w = torch.softmax(logits, 1)
    mean = sum(w[:, n : n + 1] * train[n] for n in range(train.shape[0]))
    return (m * mean - x) / s2


def part_b(quick: bool) -> None:
    N, d = (1000, 784) if not quick else (200, 256)
    print(f"\nB. against a Python loop over the training points (N = {N}, d = {d}, 256 queries)")
    gen = torch.Generator().manual_seed(1)
    train = torch.rand(N, d, generator=gen)
    sch = schedules.VE()
    score = scores.EmpiricalScore(train, sch)
    x = train[:256] + torch.randn(256, d, generator=gen)
    err = float((score(x, 0.5) - naive_score(train, sch, x, 0.5)).norm()
                / naive_score(train, sch, x, 0.5).norm())
    tn, ts = side_by_side([lambda: naive_score(train, sch, x, 0.5), lambda: score(x, 0.5)], 3)
    print(f"naive {1e3 * tn:.1f} ms, diffmem {1e3 * ts:.1f} ms, speed-up {tn / ts:.1f}x "
          f"(relative difference {err:.1e})")


def numpy_loop_score(train: np.ndarray, sch: schedules.Schedule) -> Callable:
    """A numpy score looping over the training points (reference-code style)."""

    def score(x: np.ndarray, t: float) -> np.ndarray:
        m, s2 = float(sch.m(t)), float(sch.sigma2(t))
        logits = np.stack([-((x - m * y) ** 2).sum(1) / (2 * s2) for y in train], 1)
        logits -= logits.max(1, keepdims=True)
        w = np.exp(logits)
        w /= w.sum(1, keepdims=True)
        mean = sum(w[:, n : n + 1] * train[n] for n in range(train.shape[0]))
        return (m * mean - x) / s2

    return score


def part_c(quick: bool) -> None:
    n = 1000 if not quick else 200
    print(f"\nC. sampling {n} samples of the paper's 2-D set-up to t_end = 1e-6 "
          "(rtol = atol = 1e-5; best of 3 runs each)")
    train = data.paper_points()
    t_end = 1e-6
    print(f"{'schedule':<8} {'sampler':<34} {'time s':>7} {'evals':>6} {'speed-up':>8} "
          f"{'max dist':>9} {'max err':>9}")
    for sch in (schedules.VE(), schedules.VP()):
        score = scores.EmpiricalScore(train, sch)
        x = sch.prior_sample(n, 2, torch.Generator().manual_seed(0), dtype=torch.float64)
        exact = samplers.sample_ode(sch, score, x, t_end=t_end, rtol=1e-11, atol=1e-11).samples
        loop = numpy_loop_score(train.numpy(), sch)
        runs: dict[str, tuple[float, int, torch.Tensor]] = {}

        def scipy_run(kind: str, sch: schedules.Schedule = sch, score: scores.Score = score,
                      loop: Callable = loop, x: torch.Tensor = x) -> tuple[torch.Tensor, int]:
            calls = [0]

            def rhs(t: float, y: np.ndarray) -> np.ndarray:
                calls[0] += 1
                xt = y.reshape(-1, 2)
                tt = torch.tensor(t, dtype=torch.float64)
                g2, dlogm = float(sch.g2(tt)), float(sch.dlog_m(tt))
                s = (score(torch.from_numpy(xt), tt).numpy() if kind == "kernel"
                     else loop(xt, t))
                return (dlogm * xt - 0.5 * g2 * s).reshape(-1)

            sol = solve_ivp(rhs, (sch.T, t_end), x.reshape(-1).numpy(), method="RK45",
                            rtol=1e-5, atol=1e-5)
            return torch.from_numpy(sol.y[:, -1].reshape(-1, 2)), calls[0]

        for label, fn in [
            ("scipy RK45, flat batch, numpy loop", lambda: scipy_run("loop")),
            ("scipy RK45, flat batch, kernel", lambda: scipy_run("kernel")),
            ("diffmem rk45-torchode (in t)",
             lambda: _ours(sch, score, x, "rk45-torchode", "t")),
            ("diffmem rk45 (in t)", lambda: _ours(sch, score, x, "rk45", "t")),
            ("diffmem rk45 (default, in s)", lambda: _ours(sch, score, x, "rk45", "auto")),
        ]:
            times = []
            for _ in range(3):  # best of three, every sampler alike (the machine is noisy)
                start = time.perf_counter()
                out, evals = fn()
                times.append(time.perf_counter() - start)
            runs[label] = (min(times), evals, out)
        ref_time = runs["scipy RK45, flat batch, numpy loop"][0]
        for label, (sec, evals, out) in runs.items():
            _, dist = metrics.nearest(out, train)
            err = (out - exact).norm(dim=1).max()
            print(f"{sch.name:<8} {label:<34} {sec:>7.3f} {evals:>6} {ref_time / sec:>7.1f}x "
                  f"{float(dist.max()):>9.2e} {float(err):>9.2e}")
        _, dist = metrics.nearest(exact, train)
        print(f"{sch.name:<8} {'(tight-tolerance solution)':<34} {'':>7} {'':>6} {'':>8} "
              f"{float(dist.max()):>9.2e}")


def _ours(sch: schedules.Schedule, score: scores.Score, x: torch.Tensor, method: str,
          variable: str) -> tuple[torch.Tensor, int]:
    res = samplers.sample_ode(sch, score, x, t_end=1e-6, method=method, variable=variable)
    return res.samples, res.stats["score_evals"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--parts", default="abc", help="subset of a, b, c")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"python float eps {math.ulp(1.0):.1e}")
    if "a" in args.parts:
        part_a(args.quick)
    if "b" in args.parts:
        part_b(args.quick)
    if "c" in args.parts:
        part_c(args.quick)


if __name__ == "__main__":
    main()
