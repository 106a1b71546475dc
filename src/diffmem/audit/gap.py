"""How far is a model from the memorizing score? The denoiser gap to the empirical (and other
closed-form) denoisers at each noise level, and how far down a model follows it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffmem._checks import positive_int
from diffmem.audit.inputs import Rows
from diffmem.centres import TrainingData, as_centres


def model_denoiser(model: Any, x: Tensor, t: Tensor) -> Tensor:
    """``D(x, t) = x + sigma^2 s(x, t)`` of any score (its ``denoiser``/``sigma2_score`` when
    it has one)."""
    from diffmem.scores import HasDenoiser, HasSigma2Score

    if isinstance(model, HasDenoiser):
        return model.denoiser(x, t)
    if isinstance(model, HasSigma2Score):
        return x + model.sigma2_score(x, t)
    from diffmem.schedules import expand_as_batch

    return x + expand_as_batch(model.schedule.sigma2(t).to(x), x) * model(x, t)


def denoiser_gap(model: Any, train: TrainingData, *, held: Any = None,
                 sigmas: Sequence[float] | None = None,
                 references: dict[str, Any] | None = None, n_points: int = 256,
                 seed: int = 0) -> dict[str, Any]:
    """How far a model's denoiser is from the empirical (memorizing) one at each noise level:

        gap(sigma) = E |D_model(x, t) - D_e(x, t)|^2 / E |D_e(x, t) - x|^2

    (dimensionless; 0: the model memorizes like the empirical score, about 1 or more: it does
    something else), with ``x = m(t) y + sigma(t) z`` for training points ``y`` and,
    separately, held-out points, at ``sigma(t)`` on a log grid (``sigmas``; default 12
    levels from ``1e-3`` to ``sigma(T)``). ``references`` (name -> closed-form score on the
    model's schedule, e.g. Tikhonov and threshold at a few strengths) are compared the same
    way, ``E |D_model - D_ref|^2 / E |D_ref - x|^2``, and ``closest`` names, per level, the
    closed form (the empirical one included) nearest to the model in absolute terms, by
    ``E |D_model - D_ref|^2`` (the ratios have different denominators: a model that barely
    denoises is at ratio about 1 from every closed form, yet nearest to the one that barely
    denoises too)."""
    from diffmem.scores import EmpiricalScore

    sch = model.schedule
    centres = as_centres(train)
    if sigmas is None:
        top = float(sch.sigma(sch.T))
        sigmas = [float(v) for v in np.logspace(-3, math.log10(top), 12)]
    forms = {"empirical": EmpiricalScore(centres, sch), **(references or {})}
    gen = torch.Generator().manual_seed(seed)
    sets: dict[str, Rows] = {"train": Rows(centres, "train")}
    if held is not None:
        sets["held"] = Rows(held, "held")
    out: dict[str, Any] = {"sigma": list(sigmas), "units": "dimensionless (squared-distance "
                           "ratio)", "closest": {}}
    for label, points in sets.items():
        pick = torch.randint(0, points.n, (positive_int("n_points", n_points),),
                             generator=gen)
        y = points.take(pick.tolist()).to(torch.float64)
        gaps: dict[str, list[float]] = {name: [] for name in forms}
        distances: dict[str, list[float]] = {name: [] for name in forms}
        for sigma in sigmas:
            t = sch.t_of_s(torch.tensor(-math.log(sigma), dtype=torch.float64))
            tt = t.expand(y.shape[0]).contiguous()
            m = float(sch.m(t))
            x = m * y + float(sch.sigma(t)) * torch.randn(y.shape, generator=gen,
                                                          dtype=torch.float64)
            d_model = model_denoiser(model, x, tt).to(torch.float64)
            for name, form in forms.items():
                d_ref = form.denoiser(x, tt)
                scale = float((d_ref - x).flatten(1).pow(2).sum(1).mean())
                gap = float((d_model - d_ref).flatten(1).pow(2).sum(1).mean())
                distances[name].append(gap)
                gaps[name].append(gap / scale if scale > 0 else float("inf"))
        out[label] = gaps
        out["closest"][label] = [min(forms, key=lambda n, i=i: distances[n][i])
                                 for i in range(len(sigmas))]
    return out


def follows_down_to(gap: dict[str, Any], threshold: float = 0.1, form: str = "empirical",
                    where: str = "train") -> float | None:
    """The smallest noise level down to which the model's denoiser stays within
    ``threshold`` of ``form``'s on ``where`` points at every level from the top of the grid
    (``None``: not even at the largest level). At large noise every sensible denoiser agrees
    with the empirical one; the lower this level, the further down the model follows the
    memorizing score."""
    level = None
    for sigma, g in sorted(zip(gap["sigma"], gap[where][form], strict=True), reverse=True):
        if g > threshold:
            break
        level = sigma
    return level
