"""Model sampling benchmark, measured side by side in one run (CI does not run this).

    python benchmarks/bench_models.py            # 32x32 UNet, 64 samples, 50 steps
    python benchmarks/bench_models.py --quick    # 16x16, 16 samples, 20 steps

``diffmem``'s ``--sampler pipeline`` (``sample_model`` with the model's own scheduler,
resumable batches written to disk, the initial noise recorded) against the diffusers
pipeline's own call for the same samples and steps (``DDIMPipeline`` with eta 0, and
``DDPMPipeline``), each the best of three runs, interleaved; the ratio is diffmem / diffusers
(target <= 1.10). The samples agree to round-off.

Then a latent text-to-image pipeline (the tiny Stable Diffusion layout of the tests, built
here: CLIP tokenizer and text encoder, a UNet2DConditionModel on 16x16x4 latents, a VAE to
32x32 images, DDIM): ``diffmem.text`` sampling with guidance 7.5 and VAE decoding against
``StableDiffusionPipeline.__call__`` from the same latents (prompts encoded once by diffmem,
at every call by the pipeline).

On a GPU (``--device cuda --dtype float16 --latent 64 --text-only``, the device script
``benchmarks/gpu.sh``): the same comparison for an SD-layout pipeline on 64x64 latents in
half precision.
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
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="of the text-to-image pipeline")
    parser.add_argument("--latent", type=int, default=16, help="text-to-image latent size")
    parser.add_argument("--channels", default="32,64", help="text-to-image UNet widths")
    parser.add_argument("--text-only", action="store_true")
    args = parser.parse_args()
    size, n, steps = (16, 16, 20) if args.quick else (32, 64, 50)
    channels = tuple(int(v) for v in args.channels.split(","))
    if args.text_only:
        text_to_image(8 if args.quick else 16, steps, args.device, args.dtype, args.latent,
                      channels)
        return
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
    text_to_image(8 if args.quick else 16, steps, args.device, args.dtype, args.latent,
                  channels)


def text_to_image(n: int, steps: int, device: str = "cpu", dtype: str = "float32",
                  latent: int = 16, channels: tuple[int, ...] = (32, 64)) -> None:
    """The latent text-to-image comparison (module docstring)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tiny_pipelines import sd_pipeline

    from diffmem.text import Prompts, TextOptions, load_text_model

    prompts = [f"a photo of thing {i}" for i in range(4)]
    print(f"SD layout: {latent}x{latent}x4 latents, UNet widths {channels}, {dtype}, "
          f"{device}, {n} images, {steps} steps, guidance 7.5")
    with tempfile.TemporaryDirectory() as tmp:
        folder = sd_pipeline(Path(tmp) / "sd", latent_size=latent, channels=channels)
        tm = load_text_model(folder, Prompts(prompts), TextOptions(dtype=dtype),
                             device=device)
        model, pipe = tm.model, tm.pipe
        model.guided(7.5, torch.tensor(len(prompts)))
        cond = torch.arange(n) % len(prompts)
        out: dict[str, np.ndarray] = {}

        def ours() -> None:
            (Path(tmp) / "s.npy").unlink(missing_ok=True)
            out["ours"] = np.array(sample_model(model, n, Path(tmp) / "s.npy",
                                                sampler="pipeline", steps=steps, seed=0,
                                                batch=n, progress=False, cond=cond,
                                                device=device))

        def theirs() -> None:
            z = torch.from_numpy(np.load(Path(tmp) / "s_initial_noise.npy")).to(
                device, getattr(torch, dtype))
            out["ref"] = pipe(prompt=[prompts[i] for i in cond], latents=z,
                              num_inference_steps=steps, guidance_scale=7.5,
                              output_type="np").images

        ours()  # the initial latents both start from
        t_ref, t_ours = [], []
        for _ in range(3):
            t_ref.append(best_of(1, theirs))
            t_ours.append(best_of(1, ours))
        diff = np.abs(out["ours"].transpose(0, 2, 3, 1) - out["ref"]).max()
        print(f"{'SD text-to-image':<16} {min(t_ref):>12.2f} {min(t_ours):>10.2f} "
              f"{min(t_ours) / min(t_ref):>7.3f} {diff:>11.2e}")


if __name__ == "__main__":
    main()
