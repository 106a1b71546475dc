"""A small U-Net with EDM preconditioning, and its denoising training loop.

``UNet(channels)`` has three resolutions with ``channels``, ``2 channels`` and
``4 channels`` feature maps (``channels`` is the first block's width, the model-size knob of
the paper's study), two residual blocks per resolution conditioned on the noise level, and
skip connections. :class:`EDMDenoiser` wraps it as ``D(x, sigma) = c_skip x + c_out
F(c_in x, c_noise)`` and :func:`train_edm` minimises EDM's loss
``E weight(sigma) |D(x + sigma n, sigma) - x|^2`` with ``log sigma ~ N(P_mean, P_std^2)``,
with the EMA, checkpoints and divergence check of :mod:`diffmem.training`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffmem._checks import fail, positive_int
from diffmem.edm import Precond, training_sigmas
from diffmem.training import EMA, Checkpoints, check_losses, fingerprint, restore_rng


def _groups(ch: int) -> int:
    return max(g for g in (8, 4, 2, 1) if ch % g == 0)


class ResBlock(nn.Module):
    """``x + conv(act(norm(conv(act(norm(x))) + emb))))`` with a 1x1 skip when widths differ."""

    def __init__(self, c_in: int, c_out: int, emb: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb, c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = h + self.emb(e)[:, :, None, None]
        h = self.conv2(nn.functional.silu(self.norm2(h)))
        return self.skip(x) + h


class UNet(nn.Module):
    """``F(x, c_noise)`` for images ``(B, C, H, W)`` with ``H, W`` divisible by 4. The
    initial weights are drawn from ``seed`` (or from a seed drawn from ``generator``) inside
    :func:`torch.random.fork_rng`: the caller's global random state is left as it was."""

    def __init__(self, channels: int = 16, image_channels: int = 1, seed: int = 0,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if generator is not None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self._build(positive_int("channels", channels), image_channels)

    def _build(self, c: int, image_channels: int) -> None:
        self.channels, self.image_channels = c, image_channels
        emb = 4 * c
        self.register_buffer("freqs", torch.randn(emb // 2) * 16)
        self.embed = nn.Sequential(nn.Linear(emb, emb), nn.SiLU(), nn.Linear(emb, emb))
        widths = [c, 2 * c, 4 * c]
        self.stem = nn.Conv2d(image_channels, c, 3, padding=1)
        self.down = nn.ModuleList()
        prev = c
        for w in widths:
            self.down.append(nn.ModuleList([ResBlock(prev, w, emb), ResBlock(w, w, emb)]))
            prev = w
        self.mid = ResBlock(prev, prev, emb)
        self.up = nn.ModuleList()
        for w in reversed(widths):
            self.up.append(nn.ModuleList([ResBlock(prev + w, w, emb), ResBlock(w, w, emb)]))
            prev = w
        self.out = nn.Sequential(nn.GroupNorm(_groups(c), c), nn.SiLU(),
                                 nn.Conv2d(c, image_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def architecture(self) -> dict[str, int]:
        """What determines the network's shape."""
        return {"channels": self.channels, "image_channels": self.image_channels,
                "parameters": self.n_parameters()}

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        if x.shape[-1] % 4 or x.shape[-2] % 4:
            raise fail("x", "images with height and width divisible by 4",
                       f"shape {tuple(x.shape)}")
        angle = c_noise[:, None] * self.freqs[None, :]
        e = self.embed(torch.cat([torch.sin(angle), torch.cos(angle)], 1))
        h = self.stem(x)
        skips = []
        for i, (b1, b2) in enumerate(self.down):
            h = b2(b1(h, e), e)
            skips.append(h)
            if i < len(self.down) - 1:
                h = nn.functional.avg_pool2d(h, 2)
        h = self.mid(h, e)
        for i, (b1, b2) in enumerate(self.up):
            if i > 0:
                h = nn.functional.interpolate(h, scale_factor=2.0, mode="nearest")
            h = b2(b1(torch.cat([h, skips.pop()], 1), e), e)
        return self.out(h)


class EDMDenoiser(nn.Module):
    """``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)`` (EDM preconditioning)."""

    def __init__(self, net: UNet, sigma_data: float = 0.5) -> None:
        super().__init__()
        self.net = net
        self.precond = Precond(sigma_data)

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        c_skip, c_out, c_in, c_noise = self.precond.coefficients(sigma.to(torch.float32))
        shape = (-1, 1, 1, 1)
        xf = x.to(torch.float32)
        out = c_skip.reshape(shape) * xf + c_out.reshape(shape) * self.net(
            c_in.reshape(shape) * xf, c_noise)
        return out.to(x.dtype)


def edm_loss(den: EDMDenoiser, x0: Tensor, sigma: Tensor, noise: Tensor) -> Tensor:
    """``mean weight(sigma) |D(x0 + sigma n, sigma) - x0|^2`` (per-pixel mean)."""
    s = sigma.reshape(-1, 1, 1, 1)
    err = den(x0 + s * noise, sigma) - x0
    return (den.precond.weight(sigma).reshape(-1, 1, 1, 1) * err * err).mean()


@dataclass
class EDMTraining:
    """What :func:`train_edm` returns: the loss at every step, what the callback returned at
    each checkpoint step, the EMA's weight on the initialisation (0 without an EMA) and how
    many steps this call trained (fewer than ``steps`` after a resume)."""

    losses: list[float]
    evaluations: dict[int, Any] = field(default_factory=dict)
    ema_init_weight: float = 0.0
    steps_run: int = 0


def train_edm(
    den: EDMDenoiser,
    train: Tensor,
    steps: int,
    batch_size: int = 2,
    lr: float = 1e-3,
    seed: int = 0,
    checkpoints: Sequence[int] = (),
    callback: Callable[[int, EDMDenoiser], Any] | None = None,
    progress: bool = True,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    ema_half_life: float | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    keep_checkpoints: int | None = 1,
) -> EDMTraining:
    """Adam on :func:`edm_loss` with batches drawn (with replacement) from ``train``
    ``(N, C, H, W)``; ``callback(step, den)`` at each step in ``checkpoints`` (its return
    values are kept in the result and in the checkpoints). With ``ema_half_life`` (steps), an
    exponential moving average of the weights (:class:`diffmem.training.EMA`) is what the
    callback receives and what ``den`` holds at the end; the raw weights are discarded. With
    ``checkpoint_dir`` a checkpoint is written at every step in ``checkpoints`` (the newest
    ``keep_checkpoints`` are kept) and ``resume`` continues from the latest one."""
    steps = positive_int("steps", steps)
    dev = next(den.parameters()).device
    data = train.to(device=dev, dtype=torch.float32)
    gen = torch.Generator(device=dev).manual_seed(seed)
    opt = torch.optim.Adam(den.parameters(), lr=lr, fused=True)
    ema = None if ema_half_life is None else EMA(den, ema_half_life, steps)
    config = {"batch_size": batch_size, "lr": lr, "seed": seed, "p_mean": p_mean,
              "p_std": p_std, "ema_half_life": ema_half_life,
              "sigma_data": den.precond.sigma_data, "net": repr(den.net.architecture())}
    store = Checkpoints(checkpoint_dir, fingerprint(config, data), keep=keep_checkpoints)
    result = EDMTraining(losses=[], ema_init_weight=0.0 if ema is None else ema.init_share)
    start = 1
    if resume and checkpoint_dir is not None and (state := store.load_latest(dev, steps)):
        den.load_state_dict(state["model"])
        if ema is not None:
            ema.model.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        restore_rng(gen, state["rng"])
        result.losses = list(state["losses"])
        result.evaluations = dict(state["evaluations"])
        start = int(state["step"]) + 1
    marks = set(checkpoints)
    for step in tqdm(range(start, steps + 1), initial=start - 1, total=steps,
                     desc="EDM training", disable=not progress, leave=False):
        idx = torch.randint(0, data.shape[0], (batch_size,), generator=gen, device=dev)
        sigma = training_sigmas(batch_size, p_mean, p_std, generator=gen, device=dev)
        noise = torch.randn(data[idx].shape, generator=gen, device=dev)
        loss = edm_loss(den, data[idx], sigma, noise)
        check_losses(loss.detach(), step, lr, store.latest())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            ema.update()
        result.losses.append(float(loss.detach()))
        result.steps_run += 1
        if step in marks:
            if callback is not None:
                shown = den if ema is None else ema.model
                shown.eval()
                value = callback(step, shown)
                shown.train()
                if value is not None:
                    result.evaluations[step] = value
            store.save(step, {"model": den.state_dict(),
                              "ema": None if ema is None else ema.model.state_dict(),
                              "optimizer": opt.state_dict(), "rng": gen.get_state(),
                              "losses": result.losses, "evaluations": result.evaluations,
                              "architecture": den.net.architecture(),
                              "data_shape": list(data.shape[1:])})
    if ema is not None:
        den.load_state_dict(ema.model.state_dict())
    return result
