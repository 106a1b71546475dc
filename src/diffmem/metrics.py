"""Memorization metrics. Units: distances are Euclidean norms of the flattened difference,
in the units of the data (pixel values for images); fractions are in ``[0, 1]``
(dimensionless); ratios of distances are dimensionless. Nearest neighbours are exact
(:func:`diffmem.mixture.knn`).

The experiments and the audit compute memorization through these functions only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from diffmem._checks import fail, finite_tensor, positive, positive_int, training_set
from diffmem.mixture import knn


def _pair(samples: Tensor, train: Tensor) -> tuple[Tensor, Tensor]:
    training_set("train", train)
    finite_tensor("samples", samples)
    if samples.dim() < 1 or tuple(samples.shape[1:]) != tuple(train.shape[1:]):
        raise fail("samples", f"shape (batch, *{tuple(train.shape[1:])}) like train",
                   f"shape {tuple(samples.shape)}")
    dtype = torch.promote_types(samples.dtype, train.dtype)
    return (samples.reshape(samples.shape[0], -1).to(dtype),
            train.reshape(train.shape[0], -1).to(dtype=dtype, device=samples.device))


def nearest(samples: Tensor, train: Tensor) -> tuple[Tensor, Tensor]:
    """Index ``(batch,)`` and Euclidean distance ``(batch,)`` of each sample's nearest
    training point (data units)."""
    x, y = _pair(samples, train)
    d2, idx = knn(x, y, k=1)
    return idx[:, 0], d2[:, 0].sqrt()


def fraction_within(samples: Tensor, train: Tensor,
                    deltas: float | Iterable[float]) -> dict[float, float]:
    """The paper's memorization metric: for each tolerance ``delta`` (data units), the
    fraction of samples whose nearest training point is closer than ``delta``
    (``|x - x_0^n| < delta``)."""
    deltas = [deltas] if isinstance(deltas, int | float) else list(deltas)
    if not deltas:
        raise fail("deltas", "at least one tolerance", "an empty list")
    deltas = [positive("deltas", d) for d in deltas]
    _, dist = nearest(samples, train)
    return {d: float((dist < d).to(torch.float64).mean()) for d in deltas}


def delta_key(delta: float) -> str:
    """The JSON key of a tolerance: ``0.01 -> "0.01"`` (``repr`` of the float)."""
    return repr(float(delta))


def fractions(samples: Tensor, train: Tensor, deltas: Iterable[float]) -> dict[str, float]:
    """:func:`fraction_within` keyed by :func:`delta_key` (fractions; ``deltas`` in data
    units)."""
    return {delta_key(d): f for d, f in fraction_within(samples, train, deltas).items()}


def fraction_sweep(samples: Sequence[Tensor], train: Tensor,
                   deltas: Sequence[float]) -> dict[str, list[float]]:
    """The memorized fraction of each sample set of a sweep, per tolerance:
    ``{delta_key(delta): [fraction of samples[0], fraction of samples[1], ...]}``
    (fractions; ``deltas`` in data units)."""
    out: dict[str, list[float]] = {delta_key(d): [] for d in deltas}
    for s in samples:
        for key, frac in fractions(s, train, deltas).items():
            out[key].append(frac)
    return out


def paired_fraction(samples: Tensor, target: Tensor, delta: float) -> float:
    """Fraction of ``samples`` within ``delta`` (data units) of one given point ``target``
    (the training sample paired with a condition): ``mean_b [|x_b - target| < delta]``."""
    delta = positive("delta", delta)
    finite_tensor("samples", samples)
    flat = samples.reshape(samples.shape[0], -1)
    dist = (flat - target.reshape(1, -1).to(flat)).norm(dim=1)
    return float((dist < delta).to(torch.float64).mean())


def diversity(groups: Tensor) -> Tensor:
    """Mean pairwise Euclidean distance (data units) between the ``k >= 2`` samples of each
    group, ``groups`` ``(G, k, *shape)``: ``sum_{i != j} |x_i - x_j| / (k (k - 1))``, shape
    ``(G,)``. 0 when every sample of a group is the same (for instance one training copy)."""
    if groups.dim() < 3 or groups.shape[1] < 2:
        raise fail("groups", "a tensor (groups, k >= 2 samples, ...)",
                   f"shape {tuple(groups.shape)}")
    flat = groups.reshape(groups.shape[0], groups.shape[1], -1)
    k = flat.shape[1]
    return torch.cdist(flat, flat).sum((1, 2)) / (k * (k - 1))


def rms_per_coordinate(distance: Tensor | float, dim: int) -> Tensor | float:
    """A Euclidean distance in ``dim`` dimensions as the root-mean-square difference per
    coordinate, ``distance / sqrt(dim)`` (per-pixel units for images)."""
    return distance / math.sqrt(positive_int("dim", dim))


def decay_reference(rate: Tensor, distances: Tensor) -> Tensor:
    """The reference line ``c r(tau)`` for distances that should decay like ``r(tau)``
    (``r = sigma(t)`` for ``O(sigma)``, ``r = e^-s`` for ``O(e^-s)``), with ``c`` chosen so
    that the line passes through the median distance at the median rate:
    ``c = median(distances) / median(r)``. Same units as ``distances``."""
    return rate * float(distances.median() / rate.median())


def hit_counts(samples: Tensor, train: Tensor, delta: float) -> Tensor:
    """Number of samples within ``delta`` (data units) of each training point, counting each
    sample once, at its nearest training point; shape ``(N,)``."""
    delta = positive("delta", delta)
    idx, dist = nearest(samples, train)
    counts = torch.zeros(train.shape[0], dtype=torch.long)
    return counts.index_add_(0, idx[dist < delta].cpu(), torch.ones_like(idx[dist < delta].cpu()))


@dataclass
class NNRatio:
    """Result of :func:`nn_ratio`: ``fraction`` of samples with ``d1 / d2 < threshold``, its
    bootstrap percentile interval ``(ci_low, ci_high)`` at ``level``, and per-sample
    ``ratios``."""

    fraction: float
    ci_low: float
    ci_high: float
    level: float
    ratios: Tensor


def nn_ratio(samples: Tensor, train: Tensor, threshold: float = 1 / 3, bootstrap: int = 1000,
             level: float = 0.95, seed: int = 0) -> NNRatio:
    """Nearest-neighbour ratio test: a sample counts as a copy when the distance to its
    nearest training point is below ``threshold`` times the distance to the second nearest
    (``d1 / d2 < threshold``, dimensionless). Needs at least 2 training points."""
    threshold = positive("threshold", threshold)
    bootstrap = positive_int("bootstrap", bootstrap)
    if not 0 < level < 1:
        raise fail("level", "a confidence level in (0, 1)", level)
    x, y = _pair(samples, train)
    if y.shape[0] < 2:
        raise fail("train", "at least 2 training points for d1/d2", y.shape[0])
    d2, _ = knn(x, y, k=2)
    d = d2.sqrt()
    ratios = torch.where(d[:, 1] > 0, d[:, 0] / d[:, 1], torch.zeros_like(d[:, 0]))
    copies = (ratios < threshold).to(torch.float64).cpu()
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, copies.shape[0], (bootstrap, copies.shape[0]), generator=gen)
    boot = copies[idx].mean(1)
    alpha = (1 - level) / 2
    lo, hi = torch.quantile(boot, torch.tensor([alpha, 1 - alpha], dtype=torch.float64))
    return NNRatio(fraction=float(copies.mean()), ci_low=float(lo), ci_high=float(hi),
                   level=level, ratios=ratios)


def convergence_slopes(trajectory: Tensor, final: Tensor, abscissa: Tensor,
                       window: tuple[float, float], log_abscissa: bool = True) -> Tensor:
    """Per-trajectory least-squares slope of ``log |x(tau) - x_final|`` against ``log tau``
    (``log_abscissa``) or ``tau``, using the recorded points with ``window[0] < tau <
    window[1]``. ``trajectory`` is ``(B, n, *shape)``, ``abscissa`` ``(n,)``.

    With ``tau = sigma(t)`` a slope of 1 is the ``O(sigma)`` rate; with ``tau = s`` a slope of
    ``-1`` is the ``O(e^-s)`` rate."""
    dist = (trajectory - final[:, None]).reshape(trajectory.shape[0], trajectory.shape[1], -1)
    dist = dist.norm(dim=-1).to(torch.float64)
    tau = abscissa.to(torch.float64)
    mask = (tau > window[0]) & (tau < window[1])
    if int(mask.sum()) < 2:
        raise fail("window", f"a range holding at least 2 recorded points of {tau.tolist()[:3]}…",
                   window)
    xs = torch.log(tau[mask]) if log_abscissa else tau[mask]
    ys = torch.log(dist[:, mask].clamp_min(1e-300))
    design = torch.stack([xs, torch.ones_like(xs)], 1)
    return torch.linalg.lstsq(design, ys.T).solution[0]
