"""Nearest-neighbour guidance: the predicted clean image kept away from its nearest training
item, found by diffmem's exact search (the dissimilarity guidance of AMG, Chen et al., CVPR
2024, in closed form)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from diffmem.metrics import distinct_second, knn
from diffmem.mitigate.base import Cure, CureContext, refuse
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
    pushed further out. The training set must be in the model's data space (latents for a
    latent pipeline). AMG's despecification and caption-negative guidances are not part of
    it."""

    name: ClassVar[str] = "nn-guidance"
    high: ClassVar[float] = 6.0
    grid: ClassVar[tuple[float, ...]] = (1.0, 2.0, 3.0, 3.1, 3.2, 3.5, 4.0)
    meaning: ClassVar[str] = "g in [0, 6]: the smallest d1 / d2 kept, times 3"

    def check(self, model: ModelScore, ctx: CureContext) -> None:
        if ctx.train is None:
            raise refuse(self, "a training set (--train)", model)
        shape = (model.network or {}).get("image_shape")
        if shape is not None or tuple(ctx.train.data_shape) != tuple(model.data_shape):
            raise refuse(self, f"a training set in its data space {tuple(model.data_shape)} "
                         f"(here of shape {tuple(ctx.train.data_shape)}"
                         + (", a latent model's images" if shape is not None else "") + ")",
                         model)

    def denoise(self, d: Tensor, x: Tensor, t: Tensor, ctx: CureContext,
                model: ModelScore) -> Tensor:
        if self.strength == 0:
            return d
        m = expand_as_batch(model.schedule.m(t.to(torch.float64)).to(d.dtype), d)
        x0 = d / m
        dist, idx = knn(x0.to(torch.float64), ctx.train, min(K, ctx.train.n_total), exact=2)
        d1 = dist[:, 0].to(d)
        d2 = distinct_second(dist.cpu(), idx.cpu(), ctx.train)[0].to(d)
        near = ctx.train.take_raw(idx[:, 0].cpu(), torch.empty(0, dtype=d.dtype)).to(d)
        near = near.reshape(x0.shape)
        floor = self.strength * d2 / 3
        push = (d1 < floor) & (d1 > 0)
        if not bool(push.any()):
            return d
        scale = torch.where(push, floor / d1.clamp_min(torch.finfo(d.dtype).tiny),
                            torch.ones_like(d1))
        moved = near + expand_as_batch(scale, x0) * (x0 - near)
        return m * moved
