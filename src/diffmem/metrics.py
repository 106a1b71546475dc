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
from typing import Any

import torch
from torch import Tensor

from diffmem._checks import fail, finite_tensor, positive, positive_int, training_set
from diffmem.centres import TrainingData, as_centres
from diffmem.mixture import knn as _knn


def _samples(samples: Tensor, data_shape: tuple[int, ...]) -> Tensor:
    """``samples`` checked: a finite floating tensor ``(batch, *data_shape)``."""
    if not isinstance(samples, Tensor):
        raise fail("samples", f"a torch.Tensor of shape (batch, *{data_shape})",
                   type(samples).__name__)
    if samples.dim() < 1 or tuple(samples.shape[1:]) != tuple(data_shape):
        raise fail("samples", f"shape (batch, *{tuple(data_shape)}) like train",
                   f"shape {tuple(samples.shape)}")
    return finite_tensor("samples", samples)


def knn(samples: Tensor, train: TrainingData, k: int = 1, *, process_group: Any = None,
        storage: str | None = None, chunk_size: int = 4096,
        exact: int | None = None) -> tuple[Tensor, Tensor]:
    """The ``k`` nearest training points of each sample, exactly: Euclidean distances
    ``(batch, k)`` (data units, ascending; ties by index) and their indices ``(batch, k)``
    into the whole training set. ``train`` is a tensor ``(N, *data_shape)``, a numpy array or
    memory-map, a ``.npy`` path, a list of shards or a :class:`diffmem.centres.Centres`
    (streamed in chunks; memory ``O(chunk x batch)``); with ``process_group`` each process
    passes its block and every process gets the full result. ``exact = m < k`` certifies
    only the first ``m`` (the rest carry matrix-product round-off; see
    :func:`diffmem.mixture.knn`)."""
    k = positive_int("k", k)
    if isinstance(train, Tensor) and process_group is None and storage is None:
        training_set("train", train)
        x = _samples(samples, tuple(train.shape[1:]))
        dtype = torch.promote_types(x.dtype, train.dtype)
        y = train.reshape(train.shape[0], -1).to(dtype=dtype, device=x.device)
        xf = x.flatten(1).to(dtype)
        d2, idx = _knn(xf, y, k=k, chunk_size=chunk_size, exact=exact)
        return d2.sqrt(), idx
    centres = as_centres(train, process_group=process_group, storage=storage)
    x = _samples(samples, centres.data_shape)
    dtype = torch.promote_types(x.dtype, centres.source_dtype)
    dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    d2, idx = _knn(x.flatten(1).to(dtype), centres, k=k, chunk_size=chunk_size, exact=exact)
    return d2.sqrt(), idx


def nearest(samples: Tensor, train: TrainingData, **source: Any) -> tuple[Tensor, Tensor]:
    """Index ``(batch,)`` and Euclidean distance ``(batch,)`` of each sample's nearest
    training point (data units); ``train`` and ``source`` (``process_group``, ``storage``) as
    in :func:`knn`. An empty batch gives empty results."""
    dist, idx = knn(samples, train, 1, **source)
    return idx[:, 0], dist[:, 0]


def _some(samples: Tensor) -> None:
    """A fraction of no samples is undefined."""
    if isinstance(samples, Tensor) and samples.dim() >= 1 and samples.shape[0] == 0:
        raise fail("samples", "at least one sample", "an empty batch")


def _deltas(deltas: float | Iterable[float]) -> list[float]:
    deltas = [deltas] if isinstance(deltas, int | float) else list(deltas)
    if not deltas:
        raise fail("deltas", "at least one tolerance", "an empty list")
    return [positive("deltas", d) for d in deltas]


def within(distances: Tensor, deltas: float | Iterable[float]) -> dict[float, float]:
    """For each tolerance ``delta`` (the distances' units), the fraction of ``distances``
    below it: ``mean [d < delta]``."""
    deltas = _deltas(deltas)
    if distances.numel() == 0:
        raise fail("samples", "at least one sample", "an empty batch")
    return {d: float((distances < d).to(torch.float64).mean()) for d in deltas}


def fraction_within(samples: Tensor, train: TrainingData,
                    deltas: float | Iterable[float], **source: Any) -> dict[float, float]:
    """The paper's memorization metric: for each tolerance ``delta`` (data units), the
    fraction of samples whose nearest training point is closer than ``delta``
    (``|x - x_0^n| < delta``). ``train`` and ``source`` as in :func:`knn`."""
    deltas = _deltas(deltas)
    _some(samples)
    _, dist = nearest(samples, train, **source)
    return within(dist, deltas)


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
    _some(samples)
    flat = samples.flatten(1)
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


def hit_counts(samples: Tensor, train: TrainingData, delta: float, **source: Any) -> Tensor:
    """Number of samples within ``delta`` (data units) of each training point, counting each
    sample once, at its nearest training point; shape ``(N,)`` (all processes' points)."""
    delta = positive("delta", delta)
    src = train if isinstance(train, Tensor) and not source else as_centres(train, **source)
    idx, dist = nearest(samples, src)
    counts = torch.zeros(src.shape[0] if isinstance(src, Tensor) else src.n_total,
                         dtype=torch.long)
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


def nn_ratio(samples: Tensor, train: TrainingData, threshold: float = 1 / 3,
             bootstrap: int = 1000, level: float = 0.95, seed: int = 0,
             **source: Any) -> NNRatio:
    """Nearest-neighbour ratio test: a sample counts as a copy when the distance to its
    nearest training point is below ``threshold`` times the distance to the second nearest
    (``d1 / d2 < threshold``, dimensionless). Needs at least 2 training points."""
    _some(samples)
    d, _ = knn(samples, train, 2, **source)
    if d.shape[1] < 2:
        raise fail("train", "at least 2 training points for d1/d2", d.shape[1])
    return ratio_test(d[:, 0], d[:, 1], threshold, bootstrap, level, seed)


def distance_ratios(d1: Tensor, d2: Tensor) -> Tensor:
    """``d1 / d2`` per sample (dimensionless), 0 where ``d2 = 0`` (a copy of a duplicated
    training point)."""
    return torch.where(d2 > 0, d1 / d2.clamp_min(torch.finfo(d2.dtype).tiny),
                       torch.zeros_like(d1))


def bootstrap_interval(flags: Tensor, bootstrap: int = 1000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval at ``level`` of the mean of 0/1 ``flags``."""
    bootstrap = positive_int("bootstrap", bootstrap)
    level = positive("level", level)
    if not 0 < level < 1:
        raise fail("level", "a confidence level in (0, 1)", level)
    values = flags.to(torch.float64).cpu()
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, values.shape[0], (bootstrap, values.shape[0]), generator=gen)
    boot = values[idx].mean(1)
    tail = (1 - level) / 2
    lo, hi = torch.quantile(boot, torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return float(lo), float(hi)


def ratio_test(d1: Tensor, d2: Tensor, threshold: float = 1 / 3, bootstrap: int = 1000,
               level: float = 0.95, seed: int = 0) -> NNRatio:
    """The nn-ratio test on given nearest and second-nearest distances: copies are the
    samples with ``d1 / d2 < threshold``; their fraction with a bootstrap interval."""
    threshold = positive("threshold", threshold)
    if d1.numel() == 0:
        raise fail("samples", "at least one sample", "an empty batch")
    ratios = distance_ratios(d1, d2)
    copies = ratios < threshold
    lo, hi = bootstrap_interval(copies, bootstrap, level, seed)
    return NNRatio(fraction=float(copies.to(torch.float64).mean()), ci_low=lo, ci_high=hi,
                   level=level, ratios=ratios)


def calibrated_l2(distances: Tensor, alpha: float = 0.5, n: int = 50) -> Tensor:
    """Carlini et al. (2023)'s calibrated distance per sample (dimensionless):
    ``d1 / (alpha * mean of the distances to the n nearest training points)``, from the
    sorted nearest distances ``(batch, k >= n)``; 0 where that mean is 0. A copy scores
    near 0, a novel sample as far from its nearest point as from the others near
    ``1 / alpha``."""
    alpha = positive("alpha", alpha)
    n = positive_int("n", n)
    if distances.dim() != 2 or distances.shape[1] < min(n, 1):
        raise fail("distances", f"sorted nearest distances (batch, >= {n})",
                   f"shape {tuple(distances.shape)}")
    scale = alpha * distances[:, :n].mean(1)
    return torch.where(scale > 0, distances[:, 0] / scale.clamp_min(torch.finfo(
        distances.dtype).tiny), torch.zeros_like(scale))


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
