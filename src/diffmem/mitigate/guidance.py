"""Cures of classifier-free guidance: its weight, and when the condition starts (Jain et
al., CVPR 2025)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from diffmem.mitigate.base import Cure, CureContext, refuse
from diffmem.models import ModelScore


class Guidance(Cure):
    """Classifier-free guidance of weight ``w``: ``out(null) + w (out(y) - out(null))``;
    ``w < 1`` pulls the samples toward the unconditional model (``w = 0``: no condition)."""

    name: ClassVar[str] = "guidance"
    direction: ClassVar[int] = -1
    high: ClassVar[float] = 50.0
    grid: ClassVar[tuple[float, ...]] = (0.75, 0.5, 0.25, 0.0)
    meaning: ClassVar[str] = "the guidance weight w in [0, 50]"

    def check(self, model: ModelScore, ctx: CureContext) -> None:
        _needs_null(self, model, ctx)

    def guidance_weight(self, w: float | None) -> float | None:
        return float(self.strength)


class GuidanceSchedule(Cure):
    """No condition early in sampling (Jain et al., CVPR 2025, static transition): the null
    condition replaces ``y`` while ``t > (1 - s) T``, ``s`` the strength, so the first
    fraction ``s`` of the time axis is sampled unconditionally and the condition (with its
    guidance) takes over from there; no extra network calls. ``s = 0`` is the model."""

    name: ClassVar[str] = "guidance-schedule"
    high: ClassVar[float] = 1.0
    grid: ClassVar[tuple[float, ...]] = (0.2, 0.4, 0.6, 0.8)
    meaning: ClassVar[str] = "the fraction s in [0, 1] of the time axis sampled without " \
        "the condition"

    def check(self, model: ModelScore, ctx: CureContext) -> None:
        _needs_null(self, model, ctx)

    def condition(self, y: Tensor, t: Tensor, ctx: CureContext) -> Tensor:
        assert ctx.null is not None
        late = t.to(torch.float64) > (1 - self.strength) * ctx.T
        return _where_rows(late, ctx.null, y)


def _needs_null(cure: Cure, model: ModelScore, ctx: CureContext) -> None:
    """The guidance cures act on the condition against the null one: both must be there."""
    if not model.conditional or ctx.null is None:
        raise refuse(cure, "a condition and a null condition (--null-cond, or a pipeline's "
                     "negative prompt)", model)


def _where_rows(rows: Tensor, value: Tensor, y: Tensor) -> Tensor:
    """``y`` with the ``rows`` (booleans, one per row) replaced by ``value`` (one condition)."""
    if not bool(rows.any()):
        return y
    mask = rows.to(y.device).reshape(-1, *([1] * (y.dim() - 1)))
    return torch.where(mask, value.to(device=y.device, dtype=y.dtype).expand_as(y), y)
