"""Prompt cures of a text-to-image pipeline: Wen et al.'s inference-time mitigation (ICLR
2024), each prompt's embedding moved until its text-conditional noise prediction is no larger
than a typical prompt's; and Somepalli et al.'s (NeurIPS 2023) random tokens, words added to
each prompt, and Gaussian noise on each prompt's embedding."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from diffmem._checks import fail
from diffmem.mitigate.base import Cure, CureContext, refuse
from diffmem.models import ModelScore, network_output_to_score, prediction_of
from diffmem.parallel import generator

#: Noise draws ``z`` per prompt, gradient steps at most, and the Adam step relative to the
#: embeddings' RMS.
DRAWS, STEPS, RATE = 4, 10, 0.05
#: Prompts optimized at once.
CHUNK = 16


class PromptOptimization(Cure):
    """Wen et al. (ICLR 2024), inference-time mitigation: each prompt's embedding ``e``
    (its text encoder's hidden states, ``(seq, dim)``) is moved by Adam steps on

        g(e)^2 = mean_z |eps(x_T, e) - eps(x_T, null)|^2 / d

    (the first-step text-conditional noise prediction, noise units per coordinate, at
    ``x_T = sigma(T) z`` for :data:`DRAWS` seeded draws of ``z``) until ``g(e) <= tau`` or
    :data:`STEPS` steps are done, with ``tau = s median_j g(e_j)``: ``s`` times the median
    over the prompts of their own starting ``g`` (scale-free: a memorized prompt stands far
    above the median, Wen et al.'s detection). Prompts already at or below ``tau`` keep their
    embedding; the negative prompt's is never changed. The step is :data:`RATE` times the
    RMS of the embeddings. Larger ``s``: fewer prompts touched."""

    name: ClassVar[str] = "prompt-opt"
    direction: ClassVar[int] = -1
    high: ClassVar[float] = 100.0
    grid: ClassVar[tuple[float, ...]] = (2.0, 1.5, 1.0, 0.75)
    meaning: ClassVar[str] = "the factor s in [0, 100] of the prompts' median first-step " \
        "text-conditional noise prediction that each prompt's is brought under"

    def check(self, model: ModelScore, ctx: CureContext) -> None:
        if ctx.null is None or not text_unet(model, "with_embeddings"):
            raise refuse(self, "prompts embedded by a UNet text-to-image pipeline (Stable "
                         "Diffusion 1.x/2.x, SDXL: --prompts) and its negative prompt", model)

    def prepare(self, model: ModelScore, ctx: CureContext) -> ModelScore:
        assert model.network is not None and ctx.null is not None
        table = model.network["embeds"]
        gaps = first_step_gaps(model, table, int(ctx.null))
        tau = self.strength * float(gaps[:-1].median())
        moved = table.clone()
        todo = [j for j in range(table.shape[0] - 1) if float(gaps[j]) > tau]
        for lo in range(0, len(todo), CHUNK):
            rows = todo[lo:lo + CHUNK]
            moved[rows] = _optimize(model, table, rows, int(ctx.null), tau).to(table.dtype)
        return model.network["with_embeddings"](moved, model)


class _FirstStep:
    """``g(e)^2`` of :class:`PromptOptimization` for the prompts ``rows``: their noises
    (:data:`DRAWS` each, prompt ``j``'s from the generator seeded ``(0, j)``) and the
    negative prompt's prediction on them, made once; :meth:`gap2` is differentiable in the
    embeddings."""

    def __init__(self, model: ModelScore, table: Tensor, rows: list[int], null: int) -> None:
        net = model.network
        assert net is not None
        self.unet, self.rows = net["unet"], rows
        sch = model.schedule
        T = torch.tensor(float(sch.T), dtype=torch.float64)
        self.m, self.sigma = sch.m(T), sch.sigma(T)
        dev = self.unet.device
        z = torch.cat([torch.randn(DRAWS, *model.data_shape, generator=generator(0, j))
                       for j in rows]).to(dev)
        self.x = float(self.sigma) * z
        self.k = sch.timestep(T.to(torch.float32)).to(dev).expand(self.x.shape[0])
        self.prediction = prediction_of(net["scheduler_config"])
        self.channels = int(model.data_shape[0])
        y = torch.tensor(rows).repeat_interleave(DRAWS)
        self.kwargs = net["embed"](y, self.x)
        nul = torch.full_like(y, null)
        with torch.no_grad():
            self.e_null = self._eps(net["embed"](nul, self.x), table[nul])

    def _eps(self, kwargs: dict[str, Any], hidden: Tensor) -> Tensor:
        """The network's noise prediction at ``x_T`` with the text states ``hidden``."""
        x, unet = self.x, self.unet
        out = unet(x.to(unet.dtype), timestep=self.k, **{
            **kwargs, "encoder_hidden_states": hidden.to(x.device, unet.dtype)}).sample
        s = network_output_to_score(out[:, :self.channels].to(torch.float32), x,
                                    self.m.to(x), self.sigma.to(x), self.prediction)
        return -float(self.sigma) * s

    def gap2(self, emb: Tensor) -> Tensor:
        """``g^2`` per prompt for the embeddings ``emb`` (one per row of ``rows``)."""
        delta = self._eps(self.kwargs, emb.repeat_interleave(DRAWS, 0)) - self.e_null
        return delta.flatten(1).pow(2).mean(1).reshape(len(self.rows), DRAWS).mean(1)


def first_step_gaps(model: ModelScore, table: Tensor, null: int) -> Tensor:
    """``g(e_j)`` of :class:`PromptOptimization` for every row of ``table`` (the negative
    prompt's, 0, last)."""
    out = torch.zeros(table.shape[0], dtype=torch.float64)
    rows = list(range(table.shape[0] - 1))
    with torch.no_grad():
        for lo in range(0, len(rows), CHUNK):
            part = rows[lo:lo + CHUNK]
            out[part] = _FirstStep(model, table, part, null).gap2(table[part]).double().sqrt()
    return out


def _optimize(model: ModelScore, table: Tensor, rows: list[int], null: int, tau: float
              ) -> Tensor:
    """Adam on the embeddings of ``rows`` until each prompt's ``g <= tau`` (it then stops
    moving) or :data:`STEPS` steps."""
    step = _FirstStep(model, table, rows, null)
    unet = step.unet
    start = table[rows].to(torch.float32)
    emb = start.clone().requires_grad_(True)
    rate = RATE * float(start.pow(2).mean().sqrt())
    opt = torch.optim.Adam([emb], lr=rate if math.isfinite(rate) and rate > 0 else RATE)
    was = [p.requires_grad for p in unet.parameters()]
    for p in unet.parameters():
        p.requires_grad_(False)
    held = torch.zeros(len(rows), dtype=torch.bool)  # prompts that reached tau: kept there
    kept = start.clone()
    try:
        with torch.enable_grad():
            for _ in range(STEPS):
                g2 = step.gap2(emb)
                reached = (g2.detach().sqrt() <= tau).cpu() & ~held
                kept[reached] = emb.detach()[reached]
                held |= reached
                if bool(held.all()):
                    break
                opt.zero_grad()
                (g2 * (~held).to(g2)).sum().backward()
                opt.step()
                with torch.no_grad():  # Adam's momentum would carry them on
                    emb[held] = kept[held]
    finally:
        for p, flag in zip(unet.parameters(), was, strict=True):
            p.requires_grad_(flag)
    return emb.detach()


def text_unet(model: ModelScore, *needs: str) -> bool:
    """Whether ``model`` is a text-to-image pipeline on a ``UNet2DConditionModel`` (Stable
    Diffusion 1.x/2.x, SDXL) whose network entry has the hooks ``needs``."""
    net = model.network or {}
    return type(net.get("unet")).__name__ == "UNet2DConditionModel" and \
        all(net.get(n) is not None for n in needs)


class RandomTokens(Cure):
    """Somepalli et al. (NeurIPS 2023), random token addition at sampling time: ``k`` words
    drawn uniformly from the pipeline's tokenizer vocabulary (its whole alphabetic words) are
    appended to each prompt, which the pipeline encodes again; prompt ``j``'s words come
    from the generator seeded ``(0, j)`` (the same words for all its samples: Somepalli et
    al. draw them per generation). Words past the tokenizer's length are cut, as the
    pipeline cuts them. ``k = 0`` is the model."""

    name: ClassVar[str] = "random-tokens"
    high: ClassVar[float] = 32.0
    grid: ClassVar[tuple[float, ...]] = (1.0, 2.0, 4.0, 8.0)
    meaning: ClassVar[str] = "the whole number k in [0, 32] of random words added to each " \
        "prompt"

    def __post_init__(self) -> None:
        super().__post_init__()
        if float(self.strength) != int(self.strength):
            raise fail("--cure", f"{self.name}=K with a whole number K ({self.meaning})",
                       f"{self.name}={self.strength}")

    def check(self, model: ModelScore, ctx: CureContext) -> None:
        net = model.network or {}
        if "reencoded" not in net or not net.get("words"):
            raise refuse(self, "prompts encoded by a text-to-image pipeline (--prompts) "
                         "whose tokenizer has whole words", model)

    def prepare(self, model: ModelScore, ctx: CureContext) -> ModelScore:
        assert model.network is not None
        words, k = model.network["words"], int(self.strength)
        texts = [text + "".join(" " + words[int(i)] for i in torch.randint(
            len(words), (k,), generator=generator(0, j)))
            for j, text in enumerate(model.network["prompts"])]
        return model.network["reencoded"](texts, model)


class EmbeddingNoise(Cure):
    """Somepalli et al. (NeurIPS 2023), Gaussian noise on the text embedding at sampling time:
    each prompt's embedding ``e`` (``(seq, dim)``) becomes ``e + s rms(E) z`` with ``z``
    standard normal from the generator seeded ``(0, j)`` for prompt ``j`` (the same noise for
    all its samples: Somepalli et al. draw it per generation), ``rms(E)`` the RMS of the
    prompts' embeddings; the negative prompt's is unchanged. ``s = 0`` is the model."""

    name: ClassVar[str] = "embedding-noise"
    high: ClassVar[float] = 10.0
    grid: ClassVar[tuple[float, ...]] = (0.1, 0.2, 0.5, 1.0)
    meaning: ClassVar[str] = "the noise's standard deviation s in [0, 10], in units of the " \
        "embeddings' RMS"

    def check(self, model: ModelScore, ctx: CureContext) -> None:
        if "with_embeddings" not in (model.network or {}):
            raise refuse(self, "prompts embedded by a text-to-image pipeline (--prompts)",
                         model)

    def prepare(self, model: ModelScore, ctx: CureContext) -> ModelScore:
        assert model.network is not None
        table = model.network["embeds"]
        scale = self.strength * float(table[:-1].to(torch.float32).pow(2).mean().sqrt())
        noisy = table.clone()
        for j in range(table.shape[0] - 1):
            z = torch.randn(table.shape[1:], generator=generator(0, j))
            noisy[j] = (table[j].to(torch.float32) + scale * z).to(table.dtype)
        return model.network["with_embeddings"](noisy, model)
