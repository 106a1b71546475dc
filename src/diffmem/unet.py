"""A small U-Net with EDM preconditioning, and its denoising training loop.

``UNet(channels)`` has three resolutions with ``channels``, ``2 channels`` and
``4 channels`` feature maps (``channels`` is the first block's width, the model-size knob of
the paper's study), two residual blocks per resolution conditioned on the noise level, and
skip connections. :class:`EDMDenoiser` wraps it as ``D(x, sigma) = c_skip x + c_out
F(c_in x, c_noise)`` and :func:`train_edm` minimises EDM's loss
``E weight(sigma) |D(x + sigma n, sigma) - x|^2`` with ``log sigma ~ N(P_mean, P_std^2)``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffmem._checks import fail, positive_int
from diffmem.edm import Precond, training_sigmas
from diffmem.nn import ema_init_share


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
    """``F(x, c_noise)`` for images ``(B, C, H, W)`` with ``H, W`` divisible by 4."""

    def __init__(self, channels: int = 16, image_channels: int = 1, seed: int = 0) -> None:
        super().__init__()
        c = positive_int("channels", channels)
        torch.manual_seed(seed)
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


def train_edm(
    den: EDMDenoiser,
    train: Tensor,
    steps: int,
    batch_size: int = 2,
    lr: float = 1e-3,
    seed: int = 0,
    checkpoints: Sequence[int] = (),
    callback: Callable[[int, EDMDenoiser], None] | None = None,
    progress: bool = True,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    ema_decay: float | None = None,
) -> list[float]:
    """Adam on :func:`edm_loss` with batches drawn (with replacement) from ``train``
    ``(N, C, H, W)``; ``callback(step, den)`` at each step in ``checkpoints``. Returns the
    loss history (every step). With ``ema_decay``, an exponential moving average of the
    weights (``ema <- decay ema + (1 - decay) w`` after every step) is what the callback
    receives and what ``den`` holds at the end; the raw weights are discarded."""
    steps = positive_int("steps", steps)
    if ema_decay is not None and not 0 <= ema_decay < 1:
        raise fail("ema_decay", "None or a number in [0, 1)", ema_decay)
    dev = next(den.parameters()).device
    data = train.to(device=dev, dtype=torch.float32)
    gen = torch.Generator(device=dev).manual_seed(seed)
    opt = torch.optim.Adam(den.parameters(), lr=lr, fused=True)
    ema = None
    if ema_decay is not None:
        ema_init_share(ema_decay, steps)
        ema = copy.deepcopy(den).requires_grad_(False)
        params, ema_params = list(den.parameters()), list(ema.parameters())
    marks = set(checkpoints)
    losses = []
    for step in tqdm(range(1, steps + 1), desc="EDM training", disable=not progress,
                     leave=False):
        idx = torch.randint(0, data.shape[0], (batch_size,), generator=gen, device=dev)
        sigma = training_sigmas(batch_size, p_mean, p_std, generator=gen, device=dev)
        noise = torch.randn(data[idx].shape, generator=gen, device=dev)
        loss = edm_loss(den, data[idx], sigma, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, params, 1 - ema_decay)
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"EDM training diverged at step {step} (loss {losses[-1]})")
        if step in marks and callback is not None:
            shown = den if ema is None else ema
            shown.eval()
            callback(step, shown)
            shown.train()
    if ema is not None:
        den.load_state_dict(ema.state_dict())
    return losses
