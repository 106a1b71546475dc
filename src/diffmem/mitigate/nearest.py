"""The cures that look at the training set while sampling (Anti-Memorization Guidance, Chen et
al., CVPR 2024, with diffmem's exact nearest-neighbour search): the predicted clean sample
kept away from its nearest training item (``nn-guidance``, AMG's dissimilarity guidance in
closed form), and the condition's pull removed and reversed while the prediction reproduces
an item (``amg``, AMG's despecification and caption-negative guidances). For a latent model
the search is in its latent space, the training images encoded by its VAE
(:func:`~diffmem.mitigate.base.cure_context`)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from diffmem.metrics import distinct_second, knn, nearest_other
from diffmem.mitigate.base import Cure, CureContext, refuse
from diffmem.mitigate.guidance import _needs_null
from diffmem.models import ModelScore
from diffmem.schedules import expand_as_batch

#: Nearest training items searched per step (duplicates of the nearest skipped for d2).
K = 8


class NearestGuidance(Cure):
    """At every step the model's prediction of the clean sample, ``x0 = D / m``, is compared
    with its nearest training item ``n1`` (distance ``d1``) and the nearest distinct other
    (``d2``); when ``d1 < g d2 / 3`` it is moved along ``x0 - n1`` out to ``d1 = g d2 / 3``,
    so at ``g = 1`` no step's prediction passes the nn-ratio copy test (``d1 / d2 < 1/3``),
    at ``g = 3`` each stays as far from its nearest item as from the next, and beyond it is
    pushed further out. The training set must be in the model's data space (a latent
    pipeline's training images are encoded to its latents). AMG's despecification and
    caption-negative guidances are ``amg``."""

    name: ClassVar[str] = "nn-guidance"
    high: ClassVar[float] = 6.0
    grid: ClassVar[tuple[float, ...]] = (1.0, 2.0, 3.0, 3.1, 3.2, 3.5, 4.0)
    meaning: ClassVar[str] = "g in [0, 6]: the smallest d1 / d2 kept, times 3"
    searches: ClassVar[bool] = True

    def check(self, model: ModelScore, ctx: CureContext) -> None:
        _needs_train(self, model, ctx)

    def denoise(self, d: Tensor, x: Tensor, t: Tensor, ctx: CureContext,
                model: ModelScore, y: Tensor | None = None) -> Tensor:
        if self.strength == 0:
            return d
        m = expand_as_batch(model.schedule.m(t.to(torch.float64)).to(d.dtype), d)
        x0 = d / m
        d1, d2, first = _nearest(x0, ctx)
        near = ctx.train.take_raw(first, torch.empty(0, dtype=d.dtype)).to(d)
        near = near.reshape(x0.shape)
        floor = self.strength * d2 / 3
        push = (d1 < floor) & (d1 > 0)
        if not bool(push.any()):
            return d
        scale = torch.where(push, floor / d1.clamp_min(torch.finfo(d.dtype).tiny),
                            torch.ones_like(d1))
        moved = near + expand_as_batch(scale, x0) * (x0 - near)
        return m * moved


class AntiMemorization(Cure):
    """AMG's despecification and caption-negative guidances (Chen et al., CVPR 2024), on
    only while the sampling heads for a copy. At every evaluation the model's prediction of
    the clean sample, ``x0 = D / m``, is compared with its nearest training item ``n``
    (distance ``d1``) and with ``n``'s own nearest other training item (distance ``r_n``,
    the audit's reproduction radius): the trigger ``e = clamp(1 - d1 / r_n, 0, 1)`` is 0
    while the prediction reproduces no item and 1 when it is the item. With ``D(y)`` and
    ``D(null)`` the unguided denoisers, ``y_n`` the condition of ``n`` (when the training
    items' conditions are given, ``--train-cond``) and ``w`` the guidance weight (1 when
    unguided), the guided denoiser ``D_g`` becomes

        ``D_g - c_y (D(y) - D(null)) - c_n (D(y_n) - D(null))``,
        ``c_y = min(a e, w)``, ``c_n = min(a e, w)`` (``y_n != y``),
        ``c_y = min(2 a e, w)``, ``c_n = 0`` (``y_n = y``: the two pulls are one),

    ``a`` the strength: the condition's pull taken away (despecification) and the pull
    toward the copied item's own condition reversed (caption-negative; ``c_n = 0`` without
    training conditions, and then ``c_y = min(a e, w)``). The caps keep the cured model
    from guiding past the unconditional one: on a class-conditional model that copies its
    single-image labels, weights past it (``c_y`` up to ``2 a e``) drew blurred,
    in-between images (see docs/mitigate.md). Rows with ``e = 0`` cost nothing; the others
    two or three network calls. AMG's third part, dissimilarity guidance, is
    ``nn-guidance`` (chain them: ``amg=a+nn-guidance=g``). ``a = 0`` is the model."""

    name: ClassVar[str] = "amg"
    high: ClassVar[float] = 20.0
    grid: ClassVar[tuple[float, ...]] = (0.5, 1.0, 2.0, 4.0)
    meaning: ClassVar[str] = "a in [0, 20]: the weight taken off the condition (and put " \
        "against the copied item's) when the prediction is the item"
    searches: ClassVar[bool] = True

    def check(self, model: ModelScore, ctx: CureContext) -> None:
        _needs_null(self, model, ctx)
        _needs_train(self, model, ctx)
        if ctx.train_cond is not None and ctx.train_cond.shape[0] != ctx.train.n_total:
            raise refuse(self, f"one training condition per training item "
                         f"({ctx.train.n_total}; got {ctx.train_cond.shape[0]})", model)

    def denoise(self, d: Tensor, x: Tensor, t: Tensor, ctx: CureContext,
                model: ModelScore, y: Tensor | None = None) -> Tensor:
        if self.strength == 0 or y is None:
            return d
        assert ctx.null is not None
        m = expand_as_batch(model.schedule.m(t.to(torch.float64)).to(d.dtype), d)
        d1, _, first = _nearest(d / m, ctx)
        radius = _radius(first, ctx).to(d1)
        e = (1 - d1 / radius.clamp_min(torch.finfo(d1.dtype).tiny)).clamp(0, 1)
        rows = torch.nonzero(e > 0).reshape(-1)
        if rows.numel() == 0:
            return d
        xr, tr, yr = x[rows], t[rows], y[rows.to(y.device)]
        ys = [yr, ctx.null.to(device=y.device, dtype=y.dtype).expand_as(yr)]
        if ctx.train_cond is not None:
            ys.append(ctx.train_cond[first[rows.cpu()]].to(device=y.device, dtype=y.dtype))
        outs = _unguided(model, xr.repeat(len(ys), *[1] * (x.dim() - 1)), tr.repeat(len(ys)),
                         torch.cat(ys)).to(d).chunk(len(ys))
        w = 1.0 if model.guidance is None else float(model.guidance)
        ae = self.strength * e[rows].to(d)
        same = torch.ones_like(ae, dtype=torch.bool) if len(ys) == 2 else \
            (ys[2] == yr).reshape(yr.shape[0], -1).all(1).to(ae.device)
        c_y = torch.where(same, (2 * ae if len(ys) == 3 else ae).clamp(max=w), ae.clamp(max=w))
        cured = d.clone()
        cured[rows] = d[rows] - expand_as_batch(c_y, d[rows]) * (outs[0] - outs[1])
        if len(ys) == 3:
            c_n = torch.where(same, torch.zeros_like(ae), ae.clamp(max=w))
            cured[rows] -= expand_as_batch(c_n, d[rows]) * (outs[2] - outs[1])
        return cured


def _needs_train(cure: Cure, model: ModelScore, ctx: CureContext) -> None:
    """The nearest-neighbour cures compare the model's predictions with the training set:
    it must be given, in the model's data space."""
    if ctx.train is None:
        raise refuse(cure, "a training set (--train)", model)
    if tuple(ctx.train.data_shape) != tuple(model.data_shape):
        latent = (model.network or {}).get("image_shape") is not None
        raise refuse(cure, f"a training set in its data space {tuple(model.data_shape)} "
                     f"(here of shape {tuple(ctx.train.data_shape)}"
                     + (", which its VAE does not encode to its latents" if latent else "")
                     + ")", model)


def _nearest(x0: Tensor, ctx: CureContext) -> tuple[Tensor, Tensor, Tensor]:
    """Per row of ``x0``: the distance ``d1`` to its nearest training item, ``d2`` to the
    nearest distinct other (the nn-ratio test's), and the nearest item's index (on the CPU).
    The ``k`` items searched start at :data:`K` and grow fourfold (remembered in the
    context) while some row's ``k`` nearest are all duplicates of one item, so that ``d2``
    is the distinct other's distance, not a lower bound (0 for an item held ``k`` times)."""
    n = ctx.train.n_total
    k = min(max(K, ctx.neighbours), n)
    while True:
        dist, idx = knn(x0.to(torch.float64), ctx.train, k, exact=2)
        d2, exhausted = distinct_second(dist.cpu(), idx.cpu(), ctx.train)
        if exhausted <= 0 or k == n:
            break
        k = min(4 * k, n)
    ctx.neighbours = k
    return dist[:, 0].to(x0), d2.to(x0), idx[:, 0].cpu()


def _radius(items: Tensor, ctx: CureContext) -> Tensor:
    """Per item of ``items``, the distance to its nearest other training item
    (:func:`diffmem.metrics.nearest_other`), each item searched once per context (a set
    split over processes is searched every time, so that every process takes part)."""
    if getattr(ctx.train, "group", None) is not None:
        return nearest_other(items, ctx.train)
    wanted = [int(i) for i in items.tolist()]
    missing = sorted(set(wanted) - ctx.radii.keys())
    if missing:
        found = nearest_other(torch.tensor(missing), ctx.train)
        ctx.radii.update(zip(missing, found.tolist(), strict=True))
    return torch.tensor([ctx.radii[i] for i in wanted], dtype=torch.float64)


def _unguided(model: ModelScore, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
    """The model's denoiser ``D(x, t | y) = x + sigma^2 s`` without guidance, per row."""
    out = model.fn(x, t, y)
    if model.kind == "denoiser":
        return out
    return x + expand_as_batch(model.schedule.sigma2(t.to(torch.float64)).to(x.dtype), x) * out
