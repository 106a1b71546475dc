"""How far is a model from the memorizing score? The denoiser gap to the empirical (and other
closed-form) denoisers at each noise level, and how far down a model follows it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffmem._checks import fail, positive_int
from diffmem.audit.inputs import Rows
from diffmem.centres import TrainingData, as_centres
from diffmem.parallel import SOLO, Team, generator


def model_denoiser(model: Any, x: Tensor, t: Tensor, *cond: Tensor) -> Tensor:
    """``D(x, t) = x + sigma^2 s(x, t)`` of any score (its ``denoiser``/``sigma2_score`` when
    it has one)."""
    from diffmem.scores import HasDenoiser, HasSigma2Score

    if isinstance(model, HasDenoiser):
        return model.denoiser(x, t, *cond)
    if isinstance(model, HasSigma2Score):
        return x + model.sigma2_score(x, t, *cond)
    from diffmem.schedules import expand_as_batch

    return x + expand_as_batch(model.schedule.sigma2(t).to(x), x) * model(x, t, *cond)


def denoiser_gap(model: Any, train: TrainingData, *, held: Any = None,
                 sigmas: Sequence[float] | None = None,
                 references: dict[str, Any] | None = None, n_points: int = 256,
                 seed: int = 0, team: Team | None = None) -> dict[str, Any]:
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
    denoises too).

    The points of each set and the noise at each level come from their own generators
    (:func:`diffmem.parallel.generator` of ``seed``), so the levels split over ``team``'s
    processes with the numbers of one process."""
    from diffmem.scores import EmpiricalScore

    sch = model.schedule
    centres = as_centres(train)
    if sigmas is None:
        sigmas = _default_sigmas(sch)
    forms = {"empirical": EmpiricalScore(centres, sch), **(references or {})}
    sets: dict[str, Rows] = {"train": Rows(centres, "train")}
    if held is not None:
        sets["held"] = Rows(held, "held")
    labels = list(sets)
    n_points = positive_int("n_points", n_points)
    points = {}
    for i, label in enumerate(labels):  # the points of each set: its own seeded draw
        pick = torch.randint(0, sets[label].n, (n_points,), generator=generator(seed, i))
        points[label] = sets[label].take(pick.tolist()).to(torch.float64)
    units = [(i, j) for i in range(len(labels)) for j in range(len(sigmas))]
    found, _ = (team or SOLO).map(lambda u: _level_gaps(
        model, forms, points[labels[u[0]]], sigmas[u[1]], generator(seed, u[0], u[1] + 1)),
        units)
    assert found is not None
    out: dict[str, Any] = {"sigma": list(sigmas), "units": "dimensionless (squared-distance "
                           "ratio)", "closest": {}}
    for i, label in enumerate(labels):
        mine = [found[k] for k, u in enumerate(units) if u[0] == i]
        out[label] = {name: [g[name] / sc[name] if sc[name] > 0 else float("inf")
                             for g, sc in mine] for name in forms}
        out["closest"][label] = [min(forms, key=lambda n, g=g: g[n]) for g, _ in mine]
    return out


def _level_gaps(model: Any, forms: dict[str, Any], y: Tensor, sigma: float,
                gen: torch.Generator, cond: Tensor | None = None
                ) -> tuple[dict[str, float], dict[str, float]]:
    """For each form at noise ``sigma``: ``E |D_model(x) - D_ref(x)|^2`` and ``E |D_ref(x) -
    x|^2`` over ``x = m y + sigma z``, ``z`` from ``gen`` (conditioned on ``cond``, one row
    per point, when given)."""
    sch = model.schedule
    extra = () if cond is None else (cond,)
    t = sch.t_of_s(torch.tensor(-math.log(sigma), dtype=torch.float64))
    tt = t.expand(y.shape[0]).contiguous()
    x = float(sch.m(t)) * y + float(sch.sigma(t)) * torch.randn(y.shape, generator=gen,
                                                                dtype=torch.float64)
    d_model = model_denoiser(model, x, tt, *extra).to(torch.float64)
    distances, scales = {}, {}
    for name, form in forms.items():
        d_ref = form.denoiser(x, tt, *extra)
        scales[name] = float((d_ref - x).flatten(1).pow(2).sum(1).mean())
        distances[name] = float((d_model - d_ref).flatten(1).pow(2).sum(1).mean())
    return distances, scales


def conditional_denoiser_gap(model: Any, train: TrainingData, train_cond: Tensor,
                             conditions: Tensor, *, bandwidth: float | None = None,
                             sigmas: Sequence[float] | None = None, n_points: int = 64,
                             seed: int = 0, team: Team | None = None) -> dict[str, Any]:
    """:func:`denoiser_gap` of a conditional model against the paper's conditional empirical
    denoiser ``D_e(x, t | y)`` (:class:`diffmem.scores.ConditionalEmpiricalScore`: the
    training items of condition ``y`` exactly, or with ``bandwidth`` a Gaussian kernel of
    that width in ``y``), for each of ``conditions`` on noisy training items of that
    condition (``n_points`` draws; a condition no training item carries is skipped), and
    pooled, ``sum_c E_c |D_model - D_e|^2 / sum_c E_c |D_e - x|^2``, under ``train``
    ``empirical`` as in the unconditional gap (so :func:`follows_down_to` reads it)."""
    from diffmem.conditions import as_conditions, describe, distinct, same
    from diffmem.scores import ConditionalEmpiricalScore

    sch = model.schedule
    centres = as_centres(train)
    train_cond = as_conditions(train_cond, "train_cond", centres.n_total)
    keys, _ = distinct(as_conditions(conditions, "conditions"))
    if sigmas is None:
        sigmas = _default_sigmas(sch)
    mode = "kernel" if bandwidth is not None else "labels"
    form = ConditionalEmpiricalScore(centres, train_cond, sch, mode=mode, bandwidth=bandwidth)
    rows = Rows(centres, "train")
    n_points = positive_int("n_points", n_points)

    def one(j: int) -> dict[str, Any] | None:
        """Condition ``j``'s squared gaps at every level (its own seeded draws)."""
        key = keys[j]
        carriers = torch.nonzero(same(train_cond, key[None].expand_as(train_cond))).squeeze(1)
        if carriers.numel() == 0:
            return None
        pick = carriers[torch.randint(0, carriers.numel(), (n_points,),
                                      generator=generator(seed, j))]
        y = rows.take(pick.tolist()).to(torch.float64)
        cond = key[None].expand(y.shape[0], *key.shape)
        found = [_level_gaps(model, {"empirical": form}, y, sigma,
                             generator(seed, j, i + 1), cond) for i, sigma in enumerate(sigmas)]
        return {"dist": [g["empirical"] for g, _ in found],
                "scale": [sc["empirical"] for _, sc in found],
                "n_points": int(y.shape[0]), "carriers": int(carriers.numel())}

    per, _ = (team or SOLO).map(one, list(range(len(keys))))
    assert per is not None
    total_num, total_den = [0.0] * len(sigmas), [0.0] * len(sigmas)
    entries = []
    for j, got in enumerate(per):
        if got is None:
            continue
        gaps = [g / sc if sc > 0 else float("inf")
                for g, sc in zip(got["dist"], got["scale"], strict=True)]
        total_num = [a + b for a, b in zip(total_num, got["dist"], strict=True)]
        total_den = [a + b for a, b in zip(total_den, got["scale"], strict=True)]
        entry = {"condition": describe(keys[j], j), "n_points": got["n_points"], "gap": gaps,
                 "training_items": got["carriers"]}
        entry["follows_down_to"] = follows_down_to(
            {"sigma": list(sigmas), "train": {"empirical": gaps}})
        entries.append(entry)
    if not entries:
        raise fail("conditions", "at least one condition carried by a training item",
                   "none of them")
    pooled = [a / b if b > 0 else float("inf") for a, b in zip(total_num, total_den,
                                                              strict=True)]
    return {"sigma": list(sigmas), "units": "dimensionless (squared-distance ratio)",
            "conditional": {"mode": mode, "bandwidth": bandwidth},
            "train": {"empirical": pooled}, "conditions": entries,
            "closest": {"train": ["empirical"] * len(sigmas)}}


def _default_sigmas(sch: Any) -> list[float]:
    """12 levels, log-spaced from ``1e-3`` to ``sigma(T)``."""
    top = float(sch.sigma(sch.T))
    return [float(v) for v in np.logspace(-3, math.log10(top), 12)]


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
