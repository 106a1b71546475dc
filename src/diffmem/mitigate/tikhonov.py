"""The paper's Tikhonov regularization applied at sampling time to a trained model."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from diffmem.mitigate.base import Cure, CureContext
from diffmem.models import ModelScore
from diffmem.schedules import expand_as_batch


class Tikhonov(Cure):
    """``s_lambda(x, t) = (D(x, t) - x) / (sigma(t)^2 + lambda)`` with ``D`` the model's
    (guided) denoiser ``x + sigma^2 s``: the minimizer of the score-matching loss with the
    penalty ``lambda E|s|^2`` (Baptista et al., section 3), so the cured denoiser is ``x +
    sigma^2 / (sigma^2 + lambda) (D - x)``. For an epsilon network it scales the predicted
    noise by ``sigma^2 / (sigma^2 + lambda)``. ``lambda = 0`` is the model itself."""

    name: ClassVar[str] = "tikhonov"
    grid: ClassVar[tuple[float, ...]] = (0.01, 0.03, 0.05, 0.1, 0.2)
    meaning: ClassVar[str] = "lambda >= 0, in squared data units"

    def denoise(self, d: Tensor, x: Tensor, t: Tensor, ctx: CureContext,
                model: ModelScore, y: Tensor | None = None) -> Tensor:
        s2 = expand_as_batch(model.schedule.sigma2(t.to(torch.float64)).to(d.dtype), d)
        return x + s2 / (s2 + self.strength) * (d - x)
