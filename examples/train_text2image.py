"""Fine-tune the UNet of a latent text-to-image pipeline (Stable Diffusion layout) on images
with captions, in a plain PyTorch loop, optionally with the paper's Tikhonov penalty; then
audit and detect it with prompts:

    python examples/train_text2image.py --pipeline sd_folder --data captions.jsonl \
        --out run --steps 300
    diffmem audit --model run/pipeline --prompts prompts.txt --train images/ --out audit
    diffmem detect --model run/pipeline --prompts prompts.txt --out detect

--data is JSON lines with ``image`` (a PNG/JPEG path, relative to the file) and ``caption``;
an image listed several times is duplicated in the training set, the usual cause of
memorization (--dedupe trains on each distinct picture once, with its first caption;
--embedding-noise adds Gaussian noise to the caption embeddings, Somepalli et al.'s GNI;
--caption-randomization P replaces an item's caption, with probability P at each step, by a
random sequence of the captions' own words, Somepalli et al.'s random caption replacement;
--loss-filter drops the items whose caption steers the output too hard, Wen et al.'s filter). Images
are resized to the pipeline's resolution and encoded once by its VAE (the latent mean, times
its scaling factor); captions are encoded once by its own text encoder, and dropped to the
empty caption with probability --drop (what classifier-free guidance needs). The loss is the
scheduler's: the noise (epsilon) or v, ``|out - target|^2`` at timesteps drawn uniformly.
The fine-tuned pipeline is saved in OUT/pipeline.

OUT/reconstructions.npy holds the VAE's reconstructions of the distinct training images (in
OUT/images): a sample that copies a training image decodes to its reconstruction, which a
well-trained VAE makes equal to the image and a small or untrained one does not, so audit
against them when the VAE is not a good one, or first fit the VAE to the images with
--vae-steps (Adam on ``|decode(z) - x|^2 + 1e-6 KL``, ``z`` drawn from the encoder; then the
scaling factor is set to ``1 / std`` of the latent means, the convention of Stable
Diffusion's).

Needs: pip install 'diffmem[pipelines]'.
"""

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from diffmem.finetune import fit_vae, train_text_unet
from diffmem.images import load_images
from diffmem.metrics import distinct_rows
from diffmem.prompts import read_prompts
from diffmem.text import load_text_model, pipeline_resolution


def count(text: str) -> int:
    """A command-line count: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, received {text}")
    return value


def read_data(path: Path) -> tuple[list[Path], list[str]]:
    """``(image, caption)`` pairs of a JSON-lines file, image paths relative to it."""
    images, captions = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            images.append(path.parent / item["image"])
            captions.append(str(item["caption"]))
        except (ValueError, KeyError, TypeError) as err:
            raise SystemExit(f"--data: expected JSON lines with 'image' and 'caption', "
                             f"received line {number}: {line[:80]} ({err})") from err
    if not images:
        raise SystemExit(f"--data: expected at least one image, received {path} (empty)")
    return images, captions


#: Random captions drawn once for --caption-randomization.
RANDOM_CAPTIONS = 256


def random_captions(captions: list[str], n: int, seed: int) -> list[str]:
    """``n`` captions of random words from ``captions``' vocabulary, each as many words as a
    caption drawn at random (seeded)."""
    rng = np.random.default_rng(seed)
    words = sorted({w for c in captions for w in c.split()})
    lengths = [len(c.split()) for c in captions]
    return [" ".join(rng.choice(words, size=int(rng.choice(lengths)))) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", required=True, help="A pipeline folder to fine-tune.")
    parser.add_argument("--data", required=True, type=Path, help="JSON lines: image, caption.")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--steps", type=count, default=300)
    parser.add_argument("--batch-size", type=count, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--drop", type=float, default=0.1, help="Caption dropout.")
    parser.add_argument("--penalty", type=float, default=0.0, help="Tikhonov lambda.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=0,
                        help="Fit the VAE to the training images first (steps).")
    parser.add_argument("--dedupe", action="store_true", help="Train on each distinct image "
                        "once, with its first caption (exact duplicates removed).")
    parser.add_argument("--embedding-noise", type=float, default=0.0, help="Gaussian noise "
                        "of this standard deviation added to the caption embeddings at each "
                        "step (Somepalli et al., 2023).")
    parser.add_argument("--caption-randomization", type=float, default=0.0, help="Probability "
                        "that an item's caption is replaced, at a step, by random words of "
                        "the captions (Somepalli et al., 2023).")
    parser.add_argument("--loss-filter", type=float, default=None, help="Drop from the loss "
                        "the items whose |out(caption) - out(empty caption)| (L2 per item, "
                        "the network's output units) exceeds this (Wen et al., 2024).")
    args = parser.parse_args()
    if not args.embedding_noise >= 0:
        raise SystemExit(f"--embedding-noise: expected a standard deviation >= 0, received "
                         f"{args.embedding_noise}")
    if args.loss_filter is not None and not args.loss_filter > 0:
        raise SystemExit(f"--loss-filter: expected a threshold > 0, received {args.loss_filter}")
    if not 0 <= args.caption_randomization <= 1:
        raise SystemExit(f"--caption-randomization: expected a probability in [0, 1], "
                         f"received {args.caption_randomization}")
    if args.vae_steps < 0:
        raise SystemExit(f"--vae-steps: expected an integer >= 0, received {args.vae_steps}")
    if not 0 <= args.drop < 1:
        raise SystemExit(f"--drop: expected a probability in [0, 1), received {args.drop}")

    files, captions = read_data(args.data)
    size = pipeline_resolution(args.pipeline)
    prompts_file = args.out / "captions.txt"
    args.out.mkdir(parents=True, exist_ok=True)
    prompts_file.write_text("\n".join(captions) + "\n")
    text = load_text_model(args.pipeline, read_prompts(prompts_file))
    pipe = text.pipe
    with torch.no_grad():
        table = pipe.encode_prompt(captions + [""], "cpu", 1, False)[0]
        randomized = None
        if args.caption_randomization > 0:
            randomized = pipe.encode_prompt(random_captions(captions, RANDOM_CAPTIONS,
                                                            args.seed), "cpu", 1, False)[0]
        distinct = {p: i for i, p in enumerate(dict.fromkeys(files))}
        folder = args.out / "images"
        folder.mkdir(exist_ok=True)
        for f, i in distinct.items():
            shutil.copyfile(f, folder / f"{i:04d}{f.suffix}")
        pixels = (load_images(folder, resize=size) * 2 - 1).float()
        rows = torch.tensor([distinct[f] for f in files])
        if args.dedupe:  # each distinct picture once, by its pixels: the first item showing it
            keep = distinct_rows(pixels[rows])
            print(f"dedupe: {keep.numel()} distinct images of {rows.numel()} items "
                  f"({rows.numel() - keep.numel()} exact duplicates removed)")
            rows = rows[keep]
            table = torch.cat([table[keep], table[-1:]])
            captions = [captions[int(i)] for i in keep]
    if args.vae_steps:
        fit_vae(pipe.vae, pixels, args.vae_steps, args.seed, log=print)
    with torch.no_grad():
        means = pipe.vae.encode(pixels).latent_dist.mode()
        # what an exact copy looks like after decoding: the VAE's reconstructions
        recon = (pipe.vae.decode(means).sample / 2 + 0.5).clamp(0, 1)
        np.save(args.out / "reconstructions.npy", recon.numpy().astype(np.float32))
        latents = means[rows] * pipe.vae.config.scaling_factor
    train_text_unet(pipe.unet, pipe.scheduler, latents, table, steps=args.steps,
                    batch_size=args.batch_size, lr=args.lr, drop=args.drop, seed=args.seed,
                    randomized=randomized, caption_randomization=args.caption_randomization,
                    embedding_noise=args.embedding_noise, loss_filter=args.loss_filter,
                    penalty=args.penalty, log=print)
    pipe.save_pretrained(str(args.out / "pipeline"))
    print(f"-> {args.out / 'pipeline'} (training images in {folder})")


if __name__ == "__main__":
    main()
