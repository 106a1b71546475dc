"""U-Net speed on CPU per model size, and where the time goes (CI does not run this).

    python benchmarks/bench_unet.py [--resolution 32] [--channels 4,16,64] [--samples 100]

For each first-block width: training steps/s (batch 2, after a warm-up), the time of one
40-step EDM sampling of ``--samples`` images, and a breakdown of a profiled training step
(torch.profiler, CPU): the share of the step's wall time spent in convolution kernels
(forward and backward), in the other tensor kernels (normalization, activations, Adam, ...),
in autograd/optimizer bookkeeping events, and outside any recorded op (Python).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from diffmem import images
from diffmem.edm import edm_sample, karras_sigmas
from diffmem.unet import EDMDenoiser, UNet, train_edm

CONV = {"aten::convolution_backward", "aten::mkldnn_convolution", "aten::_convolution",
        "aten::convolution", "aten::conv2d", "aten::_slow_conv2d_forward",
        "aten::_slow_conv2d_backward", "aten::thnn_conv2d"}


def breakdown(den: EDMDenoiser, data: torch.Tensor, steps: int) -> dict[str, float]:
    """Shares of the wall time of ``steps`` profiled training steps."""
    train_edm(den, data, 3, progress=False)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        train_edm(den, data, steps, progress=False)
        wall = time.perf_counter() - start
    parts = {"conv": 0.0, "other kernels": 0.0, "bookkeeping": 0.0}
    for e in prof.key_averages():
        self_s = e.self_cpu_time_total / 1e6
        if e.key in CONV:
            parts["conv"] += self_s
        elif e.key.startswith("aten::"):
            parts["other kernels"] += self_s
        else:  # autograd engine nodes, AccumulateGrad, Optimizer.step / zero_grad
            parts["bookkeeping"] += self_s
    parts["python"] = max(0.0, wall - sum(parts.values()))
    return {k: v / wall for k, v in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--channels", default="4,8,16,32")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--steps", type=int, default=50, help="timed training steps")
    args = parser.parse_args()
    data = images.two_squares(args.resolution)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.resolution}x{args.resolution}, batch 2")
    print(f"{'channels':>8} {'params':>9} {'steps/s':>8} {f'sample {args.samples} (s)':>14} "
          f"{'conv':>5} {'other':>6} {'bookkeeping':>11} {'python':>6}   (share of step time)")
    for c in [int(v) for v in args.channels.split(",")]:
        den = EDMDenoiser(UNet(c))
        train_edm(den, data, 5, progress=False)  # warm-up: oneDNN primitives, allocator
        start = time.perf_counter()
        train_edm(den, data, args.steps, progress=False)
        rate = args.steps / (time.perf_counter() - start)
        x_T = 80 * torch.randn(args.samples, 1, args.resolution, args.resolution)
        start = time.perf_counter()
        with torch.no_grad():
            edm_sample(den, x_T, karras_sigmas(40))
        sample = time.perf_counter() - start
        b = breakdown(den, data, max(5, min(20, args.steps)))
        print(f"{c:>8} {den.net.n_parameters():>9} {rate:>8.1f} {sample:>14.2f} "
              f"{b['conv']:>5.0%} {b['other kernels']:>6.0%} {b['bookkeeping']:>11.0%} "
              f"{b['python']:>6.0%}")


if __name__ == "__main__":
    main()
