"""U-Net speed on CPU per model size, and where the time goes (CI does not run this).

    python benchmarks/bench_unet.py [--resolution 32]

For each first-block width: training steps/s (batch 2), the time of one 40-step EDM sampling
of 100 images, and, from torch.profiler, the share of training-step CPU time spent in
convolution kernels (forward and backward) against everything else (Python and small ops).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from diffmem import images
from diffmem.edm import edm_sample, karras_sigmas
from diffmem.unet import EDMDenoiser, UNet, train_edm


def conv_share(den: EDMDenoiser, data: torch.Tensor, steps: int = 20) -> float:
    train_edm(den, data, 5, progress=False)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_edm(den, data, steps, progress=False)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    conv = sum(e.self_cpu_time_total for e in events
               if "conv" in e.key.lower() and "backward" not in e.key.lower()
               or e.key in {"aten::convolution_backward", "aten::mkldnn_convolution",
                            "aten::_convolution"})
    return conv / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--channels", default="4,8,16,32")
    args = parser.parse_args()
    data = images.two_squares(args.resolution)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.resolution}x{args.resolution}")
    print(f"{'channels':>8} {'params':>9} {'train steps/s':>13} {'sample 100 (s)':>14} "
          f"{'conv share':>10}")
    for c in [int(v) for v in args.channels.split(",")]:
        den = EDMDenoiser(UNet(c))
        start = time.perf_counter()
        train_edm(den, data, 100, progress=False)
        rate = 100 / (time.perf_counter() - start)
        x_T = 80 * torch.randn(100, 1, args.resolution, args.resolution)
        start = time.perf_counter()
        with torch.no_grad():
            edm_sample(den, x_T, karras_sigmas(40))
        sample = time.perf_counter() - start
        share = conv_share(den, data)
        print(f"{c:>8} {den.net.n_parameters():>9} {rate:>13.1f} {sample:>14.2f} "
              f"{100 * share:>9.0f}%")


if __name__ == "__main__":
    main()
