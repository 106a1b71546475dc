"""Model sampling benchmark, measured side by side in one run (CI does not run this).

    python benchmarks/bench_models.py            # 32x32 UNet, 64 samples, 50 steps
    python benchmarks/bench_models.py --quick    # 16x16, 16 samples, 20 steps

``diffmem``'s ``--sampler pipeline`` (``sample_model`` with the model's own scheduler,
resumable batches written to disk, the initial noise recorded) against the diffusers
pipeline's own call for the same samples and steps (``DDIMPipeline`` with eta 0, and
``DDPMPipeline``), each the best of three runs, interleaved; the ratio is diffmem / diffusers
(target <= 1.10). The samples agree to round-off.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from diffmem.models import load_model, sample_model


def best_of(n: int, fn: object) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    import diffusers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    size, n, steps = (16, 16, 20) if args.quick else (32, 64, 50)
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=size, in_channels=3, out_channels=3, block_out_channels=(32, 64, 64),
        layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")).eval()
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"{torch.get_num_threads()} threads; {n} samples of 3x{size}x{size}, {steps} steps")
    print(f"{'scheduler':<16} {'diffusers s':>12} {'diffmem s':>10} {'ratio':>7} "
          f"{'max |diff|':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        for sched, pipe_cls, extra in [
                (diffusers.DDIMScheduler, diffusers.DDIMPipeline, {"eta": 0.0}),
                (diffusers.DDPMScheduler, diffusers.DDPMPipeline, {})]:
            pipe = pipe_cls(unet=unet, scheduler=sched(num_train_timesteps=1000))
            pipe.set_progress_bar_config(disable=True)
            folder = Path(tmp) / sched.__name__
            pipe.save_pretrained(folder)
            model = load_model(str(folder))
            out: dict[str, np.ndarray] = {}

            def theirs() -> None:
                out["ref"] = pipe(batch_size=n, generator=torch.Generator().manual_seed(0),
                                  num_inference_steps=steps, output_type="np", **extra).images

            def ours() -> None:
                (folder / "s.npy").unlink(missing_ok=True)
                out["ours"] = np.array(sample_model(
                    model, n, folder / "s.npy", sampler="pipeline", steps=steps, seed=0,
                    batch=n, progress=False, eta=extra.get("eta")))

            t_ref, t_ours = [], []
            for _ in range(3):  # interleaved: both see the same machine state
                t_ref.append(best_of(1, theirs))
                t_ours.append(best_of(1, ours))
            mine = np.clip(out["ours"] / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
            print(f"{sched.__name__:<16} {min(t_ref):>12.2f} {min(t_ours):>10.2f} "
                  f"{min(t_ours) / min(t_ref):>7.3f} {np.abs(mine - out['ref']).max():>11.2e}")


if __name__ == "__main__":
    main()
