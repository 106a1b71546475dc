"""The cost of a Jacobian spectrum against one score evaluation, side by side in one run (CI
does not run this).

    python benchmarks/bench_geometry.py            # N = 20,000, d = 30, 64 points
    python benchmarks/bench_geometry.py --quick    # N = 2,000

For the empirical score of ``losing-dimensions``' data (EDM, sigma = 0.1, float64):

A. the exact spectrum (the kernel's weights, the streamed weighted covariance, one
   symmetric eigensolve a point) against one score evaluation of the same points;
B. the probed spectrum (central differences along all d directions: 2 d evaluations a point,
   the way any network or loaded model is measured) against the same evaluation, and its
   largest eigenvalue error against the exact one;
C. for a score MLP (width 256, VP), the probed spectrum with d and with 8 probes against one
   evaluation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import side_by_side  # noqa: E402

from diffmem import schedules, scores  # noqa: E402
from diffmem.experiments.dimensions import sphere_data  # noqa: E402
from diffmem.geometry import jacobian_spectrum  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--points", type=int, default=64)
    args = parser.parse_args()
    n = 2_000 if args.quick else 20_000
    gen = torch.Generator().manual_seed(0)
    blocks, stds = [5, 10, 15], [1.0, 0.3, 0.01]  # losing-dimensions' data
    train = sphere_data(n, blocks, stds, gen)
    sch = schedules.EDM()
    score = scores.EmpiricalScore(train, sch)
    x = sphere_data(args.points, blocks, stds, gen) + 0.1 * torch.randn(args.points, train.shape[1],
                                                          generator=gen, dtype=train.dtype)
    t = torch.full((args.points,), 0.1, dtype=train.dtype)
    d = train.shape[1]
    one, exact, probed = side_by_side([
        lambda: score(x, t),
        lambda: jacobian_spectrum(score, x, t),
        lambda: jacobian_spectrum(score, x, t, method="differences")], repeat=5)
    err = (jacobian_spectrum(score, x, t) - jacobian_spectrum(score, x, t,
                                                              method="differences")).abs()
    print(f"empirical score, N = {n}, d = {d}, {args.points} points at sigma = 0.1 (float64)")
    print(f"  one score evaluation          {one * 1e3:9.2f} ms   1.00x")
    print(f"  exact spectrum                {exact * 1e3:9.2f} ms  {exact / one:5.2f}x")
    print(f"  probed spectrum ({2 * d} evals)   {probed * 1e3:9.2f} ms  {probed / one:5.2f}x"
          f"   max |error| {float(err.max()):.2e} (eigenvalues of order 1/sigma^2 = 100)")
    from diffmem.nn import MLPConfig, NetworkScore, ScoreMLP

    net = ScoreMLP(MLPConfig(dim=d, width=256, depth=2), ["score"], seed=0)
    ns = NetworkScore(net, schedules.VP())
    x32 = x.float()
    tv = torch.full((args.points,), 0.05)
    one, full, few = side_by_side([
        lambda: ns(x32, tv),
        lambda: jacobian_spectrum(ns, x32, tv),
        lambda: jacobian_spectrum(ns, x32, tv, probes=8)], repeat=5)
    print(f"score MLP (width 256, float32), d = {d}, {args.points} points")
    print(f"  one score evaluation          {one * 1e3:9.2f} ms   1.00x")
    print(f"  probed spectrum, {d} probes    {full * 1e3:9.2f} ms  {full / one:5.2f}x")
    print(f"  probed spectrum, 8 probes     {few * 1e3:9.2f} ms  {few / one:5.2f}x")


if __name__ == "__main__":
    main()
