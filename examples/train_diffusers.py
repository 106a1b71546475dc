"""Train a diffusers UNet2DModel with DDPMScheduler in a plain PyTorch loop, with the paper's
Tikhonov penalty (--penalty LAMBDA) and a memorization monitor that stops training in time;
--dedupe first removes exact duplicates from the training set (the usual cause of
memorization), by diffmem's exact duplicate search (``diffmem.metrics.distinct_rows``).

    python examples/train_diffusers.py --data images.npy --out run --steps 4000 --monitor
    python examples/train_diffusers.py --data pngs/ --out run --penalty 0.01
    python examples/train_diffusers.py --data images.npy --out run --steps 4000 --monitor \
        --resume                    # after a kill: continue from run/checkpoints

Training is checkpointed every --checkpoint-every steps (atomically, in OUT/checkpoints: the
weights, the optimizer, the batch generator and the monitor's records); --resume continues
from the latest one and ends with the same weights as an uninterrupted run.

Images: a .npy array (n, C, H, W) or (n, H, W) in [0, 1], or a folder of PNG/JPEG files.
Needs: pip install 'diffmem[diffusers]'.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from diffmem.images import load_images
from diffmem.metrics import distinct_rows
from diffmem.monitor import MemorizationMonitor
from diffmem.regularize import diffusers_tikhonov_penalty
from diffmem.training import Checkpoints, fingerprint, restore_rng


def load(path: str) -> torch.Tensor:
    """Images in [-1, 1], shape (n, C, H, W)."""
    if Path(path).is_dir():
        images = load_images(Path(path))
    else:
        images = torch.from_numpy(np.load(path)).float()
    if images.dim() == 3:
        images = images[:, None]
    return images * 2 - 1


def count(text: str) -> int:
    """A command-line count: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, received {text}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=count, default=4000)
    parser.add_argument("--batch-size", type=count, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--width", type=count, default=32, help="channels of the first block")
    parser.add_argument("--penalty", type=float, default=0.0, help="Tikhonov lambda")
    parser.add_argument("--monitor", action="store_true", help="stop when memorizing")
    parser.add_argument("--monitor-every", type=count, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=count, default=250)
    parser.add_argument("--resume", action="store_true", help="continue from the latest "
                        "checkpoint in OUT/checkpoints")
    parser.add_argument("--dedupe", action="store_true", help="train on the distinct images "
                        "only (exact duplicates removed)")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    images = load(args.data)
    if args.dedupe:
        kept = images[distinct_rows(images)]
        print(f"dedupe: {kept.shape[0]} distinct images of {images.shape[0]} "
              f"({images.shape[0] - kept.shape[0]} exact duplicates removed)")
        images = kept
    n, channels, size = images.shape[0], images.shape[1], images.shape[-1]
    model = UNet2DModel(
        sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=(args.width, 2 * args.width), norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    monitor = None
    if args.monitor:
        monitor = MemorizationMonitor(images, scheduler, out=Path(args.out) / "monitor",
                                      every=args.monitor_every, seed=args.seed)
        print(f"monitor: stops once the model follows the memorizing denoiser below "
              f"sigma = {monitor.stop_sigma:.3g}")

    generator = torch.Generator().manual_seed(args.seed)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "resume", "data")}
    ckpt = Checkpoints(Path(args.out) / "checkpoints", fingerprint(config, images), keep=2)
    start = 0
    if args.resume and (state := ckpt.load_latest()) is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        restore_rng(generator, state["rng"])
        start = int(state["step"])
        if monitor is not None:
            monitor.restore(json.loads(state["monitor"]))
        print(f"resumed at step {start}")
    for step in range(start + 1, args.steps + 1):
        if monitor is not None and monitor.should_stop:
            break
        batch = images[torch.randint(0, n, (args.batch_size,), generator=generator)]
        noise = torch.randn(batch.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps,
                                  (batch.shape[0],), generator=generator)
        noisy = scheduler.add_noise(batch, noise, timesteps)
        noise_pred = model(noisy, timesteps).sample
        loss = F.mse_loss(noise_pred, noise)
        if args.penalty > 0:  # the paper's Tikhonov regularization
            loss = loss + diffusers_tikhonov_penalty(noise_pred, noisy, timesteps, scheduler,
                                                     args.penalty).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            print(f"step {step}: loss {loss.item():.4f}")
        if monitor is not None:
            record = monitor.maybe_update(step, (model, scheduler))
            if record is not None:
                print(f"step {step}: follows the memorizing denoiser down to sigma = "
                      f"{record['follows_down_to']}")
        if step % args.checkpoint_every == 0 or (monitor is not None and monitor.should_stop):
            ckpt.save(step, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "rng": generator.get_state(),
                             "monitor": json.dumps(monitor.records if monitor else [])})
        if monitor is not None and monitor.should_stop:
            print(f"memorizing: stopped at step {step}")
            break

    DDPMPipeline(unet=model, scheduler=scheduler).save_pretrained(args.out)
    print(f"saved to {args.out}; audit it with: diffmem audit --model {args.out} "
          f"--sampler pipeline --steps 100 --train TRAIN.npy --out {args.out}/audit")


if __name__ == "__main__":
    main()
