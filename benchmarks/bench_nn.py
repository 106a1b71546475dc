"""Sweep training speed, measured side by side in one run (CI does not run this).

    python benchmarks/bench_nn.py [--steps 3000]

Trains the paper's five-lambda sweep (width-256 MLPs on the 20 points, VP, full batch) for
``--steps`` steps (a) as one stack of 5 models and (b) as 5 single models one after another,
and prints steps/s, the speed-up, the projected time of the paper's 500k-step sweep, and the
speed of autograd against the hand-written ReLU gradients.
"""

from __future__ import annotations

import argparse
import time

import torch

from diffmem import data, schedules
from diffmem.nn import TrainConfig, train_dsm

LAMBDAS = [0.0, 1e-4, 1e-3, 1e-2, 1e-1]


def run(lambdas: list[float], steps: int, manual: bool = True) -> float:
    cfg = TrainConfig(lambdas=lambdas, parameterizations=["score"] * len(lambdas), steps=steps,
                      ema_half_life=69.0, mlp={"width": 256, "depth": 2})
    start = time.perf_counter()
    train_dsm(data.paper_points(), schedules.VP(), cfg, progress=False,
              manual_gradients=manual)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    args = parser.parse_args()
    n = args.steps
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {n} steps each")
    stacked = run(LAMBDAS, n)
    one_by_one = sum(run([lam], n) for lam in LAMBDAS)
    autograd = run(LAMBDAS, n, manual=False)
    print(f"stack of 5:           {stacked:7.2f} s  ({n / stacked:6.0f} steps/s)")
    print(f"5 models in sequence: {one_by_one:7.2f} s  ({5 * n / one_by_one:6.0f} model-steps/s,"
          f" {n * 5 / one_by_one / 5:6.0f} steps/s per model)")
    print(f"speed-up of the stack: {one_by_one / stacked:.2f}x")
    print(f"stack with autograd:  {autograd:7.2f} s  (hand-written gradients "
          f"{autograd / stacked:.2f}x faster)")
    print(f"projected 500k-step sweep: stack {500_000 / n * stacked / 60:.0f} min, "
          f"sequential {500_000 / n * one_by_one / 60:.0f} min")


if __name__ == "__main__":
    main()
