"""Detection cost, measured side by side in one run (CI does not run this).

    python benchmarks/bench_detect.py              # 1,000 conditions
    python benchmarks/bench_detect.py --n 200      # fewer

On the detect-digits architecture (a class-conditional diffusers ``UNet2DModel`` for 1x8x8
digits, width 16, with ``n + 1`` class embeddings; untrained: the cost does not depend on the
weights), for ``n`` conditions and 4 noise draws each:

* the minimal batched first-step gap: ``detect(measures=["wen"])``, 2 network evaluations per
  draw, all conditions and draws batched;
* ``diffmem detect``'s default run (``detect()`` with its default measures and confirmation).

Alternated ``--repeat`` times; prints each time, the ratio default / minimal (target <= 10)
and the default run's seconds for ``n`` conditions (target <= 60 s for 1,000 on 2 cores).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from diffmem.detect import detect


def main() -> None:
    import diffusers

    from diffmem.models import wrap_diffusers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1,
                                 layers_per_block=1, block_out_channels=(16, 32),
                                 norm_num_groups=8, down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2,
                                 num_class_embeds=args.n + 1).eval()
    model = wrap_diffusers(unet, diffusers.DDPMScheduler(num_train_timesteps=1000))
    conds, null = torch.arange(args.n), torch.tensor(args.n)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.n} conditions,"
          " 4 draws each")
    print(f"{'minimal s':>10} {'default s':>10} {'ratio':>7}")
    ratios, defaults = [], []
    for _ in range(args.repeat):
        start = time.perf_counter()
        detect(model, conds, null, measures=["wen"], chunk=256)
        minimal = time.perf_counter() - start
        start = time.perf_counter()
        res = detect(model, conds, null)
        full = time.perf_counter() - start
        ratios.append(full / minimal)
        defaults.append(full)
        print(f"{minimal:>10.2f} {full:>10.2f} {full / minimal:>7.2f}")
    print(f"median ratio {statistics.median(ratios):.2f} (target <= 10); default run "
          f"{statistics.median(defaults):.1f} s for {args.n} conditions (target <= 60 s for "
          f"1,000); measures {res.settings['measures']}, confirm {res.settings['confirm']}")


if __name__ == "__main__":
    main()
