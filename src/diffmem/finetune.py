"""Fine-tuning a latent text-to-image pipeline: its VAE fitted to the pictures
(:func:`fit_vae`) and its UNet trained on the captions with the training-time cures and the
paper's Tikhonov penalty (:func:`train_text_unet`), checkpointed and resumable; what
``examples/train_text2image.py`` and the ``mitigate-captions`` experiment run. It sits above
:mod:`diffmem.regularize` (the penalty) and :mod:`diffmem.training` (checkpoints)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffmem.regularize import diffusers_tikhonov_penalty
from diffmem.training import Checkpoints, check_losses, restore_rng


def fit_vae(vae: Any, pixels: Tensor, steps: int, seed: int,
            log: Callable[[str], None] | None = None, batch_size: int | None = None) -> None:
    """Fit a diffusers ``AutoencoderKL`` to ``pixels`` (in ``[-1, 1]``) by ``steps`` Adam
    steps (learning rate 2e-3; all images at once, or ``batch_size`` of them drawn with
    replacement each step) on ``|decode(z) - x|^2 + 1e-6 KL``, ``z`` drawn from the encoder,
    seeded; then set its scaling factor to ``1 / std`` of the latent means (Stable
    Diffusion's convention: unit-scale latents)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    vae.train()
    for step in range(steps):
        batch = pixels if batch_size is None or batch_size >= pixels.shape[0] else \
            pixels[torch.randint(0, pixels.shape[0], (batch_size,), generator=gen)]
        post = vae.encode(batch).latent_dist
        loss = ((vae.decode(post.sample()).sample - batch) ** 2).mean() + \
            1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log is not None and (step % 100 == 0 or step == steps - 1):
            log(f"vae step {step}: loss {loss.item():.5f}")
    vae.eval()
    with torch.no_grad():
        std = float(vae.encode(pixels).latent_dist.mode().std())
    vae.register_to_config(scaling_factor=1 / std)


@dataclass
class TextCures:
    """The training-time cures of :func:`train_text_unet` and the paper's penalty."""

    randomized: Tensor | None = None
    caption_randomization: float = 0.0
    embedding_noise: float = 0.0
    loss_filter: float | None = None
    penalty: float = 0.0


def _text_loss(unet: Any, scheduler: Any, latents: Tensor, table: Tensor, batch_size: int,
               drop: float, cures: TextCures, gen: torch.Generator) -> tuple[Tensor, int]:
    """One step's loss (module docstring of :func:`train_text_unet`) on a batch drawn from
    ``gen``, and how many items the loss filter left out."""
    n, K = latents.shape[0], scheduler.config.num_train_timesteps
    idx = torch.randint(0, n, (batch_size,), generator=gen)
    x0 = latents[idx]
    noise = torch.randn(x0.shape, generator=gen)
    k = torch.randint(0, K, (batch_size,), generator=gen)
    noisy = scheduler.add_noise(x0, noise, k)
    dropped = torch.rand(batch_size, generator=gen) < drop
    cond = table[torch.where(dropped, n, idx)]
    if cures.randomized is not None and cures.caption_randomization > 0:
        swap = (torch.rand(batch_size, generator=gen) < cures.caption_randomization) & \
            ~dropped
        pick = torch.randint(0, cures.randomized.shape[0], (batch_size,), generator=gen)
        cond = torch.where(swap[:, None, None], cures.randomized[pick], cond)
    if cures.embedding_noise > 0:
        cond = cond + cures.embedding_noise * torch.randn(cond.shape, generator=gen)
    out = unet(noisy, k, encoder_hidden_states=cond).sample
    prediction = scheduler.config.prediction_type
    target = noise if prediction == "epsilon" else scheduler.get_velocity(x0, noise, k)
    per_item = ((out - target) ** 2).flatten(1).mean(1)
    filtered = 0
    if cures.loss_filter is not None:
        with torch.no_grad():
            empty = unet(noisy, k, encoder_hidden_states=table[-1:].expand_as(cond)).sample
        kept = (out.detach() - empty).flatten(1).norm(dim=1) <= cures.loss_filter
        filtered = int((~kept).sum())
        per_item = per_item * kept
    loss = per_item.mean()
    if cures.penalty > 0:
        loss = loss + diffusers_tikhonov_penalty(out, noisy, k, scheduler,
                                                 cures.penalty).mean()
    return loss, filtered


def train_text_unet(unet: Any, scheduler: Any, latents: Tensor, table: Tensor, *,
                    steps: int, batch_size: int, lr: float, drop: float = 0.1, seed: int = 0,
                    randomized: Tensor | None = None, caption_randomization: float = 0.0,
                    embedding_noise: float = 0.0, loss_filter: float | None = None,
                    penalty: float = 0.0, checkpoints: Checkpoints | None = None,
                    every: int = 0, resume: bool = False,
                    bar: Callable[[Any, str], Any] | None = None,
                    log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train the ``UNet2DConditionModel`` of a latent text-to-image pipeline on ``latents``
    ``(n, ...)`` with their captions' embeddings ``table`` (``(n + 1, L, D)``: item ``i``'s
    caption ``table[i]``, the empty caption last), AdamW at ``lr``: at each step
    ``batch_size`` items and timesteps ``k`` drawn uniformly (seeded), the loss
    ``|out(x_k, k, c) - target|^2`` with the scheduler's target (the noise, or ``v``) and
    ``c`` the empty caption with probability ``drop`` (for classifier-free guidance). The
    training-time cures: ``caption_randomization`` ``p``, an item's caption replaced with
    probability ``p`` by a row of ``randomized`` (Somepalli et al.'s random captions);
    ``embedding_noise`` ``s``, ``c + s z`` (their GNI); ``loss_filter`` ``tau``, the items
    whose ``|out(c) - out(empty)|`` (L2 per item) exceeds ``tau`` left out of the loss (Wen
    et al.'s filter); ``penalty`` ``lambda``, the paper's Tikhonov penalty
    (:func:`diffmem.regularize.diffusers_tikhonov_penalty`). With ``checkpoints`` the state
    is saved every ``every`` steps and, with ``resume``, training continues from the
    latest. Returns the steps run, the losses, the items filtered and the seconds."""
    cures = TextCures(randomized, caption_randomization, embedding_noise, loss_filter,
                      penalty)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr)
    start, losses, filtered = 0, [], 0
    if resume and checkpoints is not None and (state := checkpoints.load_latest()) is not None:
        unet.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        restore_rng(gen, state["rng"])
        start, losses, filtered = int(state["step"]), list(state["losses"]), \
            int(state["filtered"])
    unet.train()
    began = time.perf_counter()
    steps_iter = range(start + 1, steps + 1)
    for step in (bar(steps_iter, "text-to-image training") if bar else steps_iter):
        loss, dropped = _text_loss(unet, scheduler, latents, table, batch_size, drop, cures,
                                   gen)
        filtered += dropped
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        check_losses(losses[-1], step, lr, None if checkpoints is None else
                     checkpoints.latest())
        if log is not None and (step % 50 == 0 or step in (1, steps)):
            log(f"step {step}: loss {losses[-1]:.4f}" + (
                f" ({filtered} items filtered so far)" if loss_filter is not None else ""))
        if checkpoints is not None and every and (step % every == 0 or step == steps):
            checkpoints.save(step, {"model": unet.state_dict(), "opt": opt.state_dict(),
                                    "rng": gen.get_state(), "losses": losses,
                                    "filtered": filtered})
    unet.eval()
    return {"steps": max(start, steps), "losses": losses,
            "filtered": filtered, "train_s": time.perf_counter() - began}
