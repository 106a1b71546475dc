"""``diffmem detect`` and ``diffmem mitigate`` on a Stable-Diffusion-layout pipeline, each against
its cheapest counterpart, side by side in one run (CI does not run this; ``gpu.sh`` runs it on
a GPU):

    python benchmarks/bench_sd_layout.py --device cuda --dtype float16 --latent 64 \\
        --channels 320,640 --prompts 64
    python benchmarks/bench_sd_layout.py              # a small CPU check of the same commands

An untrained pipeline of the SD layout (``tests/tiny_pipelines.sd_pipeline``: a tiny CLIP
text encoder, a UNet of ``--channels`` on ``--latent`` squared latents, a VAE), ``--prompts``
prompts (each given twice, so identical prompts are generated once) and a folder of random
training images. As a user types them, timed:

* ``detect --measures wen`` (Wen et al.'s first-step screen alone) against ``detect`` at its
  defaults, with verdicts;
* ``audit --model`` (one draw and audit of every prompt) against ``mitigate`` (the search),
  ``--per-condition 4``.

The weights are random, so nothing is memorized: the figures are the commands' cost, not
their verdicts (``bench_detect.py`` and ``bench_mitigate.py`` measure those on trained models).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "diffmem"]


def run(args: list[str]) -> float:
    """Seconds of one ``diffmem`` command (an error ends the benchmark)."""
    start = time.perf_counter()
    res = subprocess.run(CLI + args + ["--no-progress"], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{args[0]} failed:\n{res.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--latent", type=int, default=8)
    parser.add_argument("--channels", default="16,32")
    parser.add_argument("--prompts", type=int, default=8, help="distinct prompts")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from PIL import Image
    from tiny_pipelines import sd_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        sd = sd_pipeline(t / "sd", latent_size=args.latent,
                         channels=tuple(int(c) for c in args.channels.split(",")))
        texts = [f"a photo of thing {i}" for i in range(args.prompts)] * 2
        (t / "prompts.txt").write_text("\n".join(texts) + "\n")
        (t / "images").mkdir()
        rng = np.random.default_rng(0)
        size = 2 * args.latent
        for i in range(16):
            Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(
                t / "images" / f"{i}.png")
        common = ["--model", str(sd), "--prompts", str(t / "prompts.txt"), "--device",
                  args.device, "--dtype", args.dtype, "--steps", str(args.steps)]
        print(f"SD layout {args.latent}x{args.latent}x4 latents, UNet {args.channels}, "
              f"{args.dtype} on {args.device}; {len(texts)} prompts ({args.prompts} distinct)")
        screen = run(["detect", *common, "--measures", "wen", "--out", str(t / "d0")])
        full = run(["detect", *common, "--out", str(t / "d1")])
        print(f"detect: first-step screen {screen:.1f} s, defaults with verdicts {full:.1f} s "
              f"= {full / screen:.2f}x (target <= 5)")
        draw = ["--train", str(t / "images"), "--sampler", "pipeline", "--per-condition", "4"]
        audit = run(["audit", *common, *draw, "--out", str(t / "a")])
        mitigate = run(["mitigate", *common, *draw, "--out", str(t / "m")])
        print(f"mitigate (search) {mitigate:.1f} s against audit --model {audit:.1f} s = "
              f"{mitigate / audit:.2f}x (target <= 5; nothing memorized: the uncured run)")


if __name__ == "__main__":
    main()
