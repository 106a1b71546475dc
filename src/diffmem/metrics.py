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
        exact: int | None = None, shortlist: str = "torch") -> tuple[Tensor, Tensor]:
    """The ``k`` nearest training points of each sample, exactly: Euclidean distances
    ``(batch, k)`` (data units, ascending; ties by index) and their indices ``(batch, k)``
    into the whole training set. ``train`` is a tensor ``(N, *data_shape)``, a numpy array or
    memory-map, a ``.npy`` path, a list of shards or a :class:`diffmem.centres.Centres`
    (streamed in chunks; memory ``O(chunk x batch)``); with ``process_group`` each process
    passes its block and every process gets the full result. ``exact = m < k`` certifies
    only the first ``m`` (the rest carry matrix-product round-off; see
    :func:`diffmem.mixture.knn`). ``shortlist='faiss'`` finds the candidates with faiss's
    matrix-product kernel (faster on some CPUs; the certified result is the same)."""
    k = positive_int("k", k)
    if isinstance(train, Tensor) and process_group is None and storage is None:
        training_set("train", train)
        x = _samples(samples, tuple(train.shape[1:]))
        dtype = torch.promote_types(x.dtype, train.dtype)
        y = train.reshape(train.shape[0], -1).to(dtype=dtype, device=x.device)
        xf = x.flatten(1).to(dtype)
        d2, idx = _knn(xf, y, k=k, chunk_size=chunk_size, exact=exact, shortlist=shortlist)
        return d2.sqrt(), idx
    centres = as_centres(train, process_group=process_group, storage=storage)
    x = _samples(samples, centres.data_shape)
    dtype = torch.promote_types(x.dtype, centres.source_dtype)
    dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    d2, idx = _knn(x.flatten(1).to(dtype), centres, k=k, chunk_size=chunk_size, exact=exact,
                   shortlist=shortlist)
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


#: Neighbours :func:`nn_ratio` searches for a second training item distinct from the nearest.
RATIO_K = 8


def nn_ratio(samples: Tensor, train: TrainingData, threshold: float = 1 / 3,
             bootstrap: int = 1000, level: float = 0.95, seed: int = 0,
             **source: Any) -> NNRatio:
    """Nearest-neighbour ratio test: a sample counts as a copy when the distance to its
    nearest training point is below ``threshold`` times the distance ``d2`` to the nearest
    training point that is not an exact duplicate of it (``d1 / d2 < threshold``,
    dimensionless; :func:`distinct_second` over the :data:`RATIO_K` nearest). Needs at
    least 2 training points."""
    _some(samples)
    centres = as_centres(train, process_group=source.get("process_group"),
                         storage=source.get("storage"))
    if centres.n_total < 2:
        raise fail("train", "at least 2 training points for d1/d2", centres.n_total)
    d, idx = knn(samples, centres, min(RATIO_K, centres.n_total), exact=2,
                 **{k: v for k, v in source.items() if k not in ("process_group", "storage")})
    d2, _ = distinct_second(d, idx, centres)
    return ratio_test(d[:, 0], d2, threshold, bootstrap, level, seed)


def distinct_second(dist: Tensor, idx: Tensor, train: Any, batch_size: int = 1024
                    ) -> tuple[Tensor, int]:
    """``d2`` of the nn-ratio test: per sample, the distance to the nearest of its ``k``
    found training items (``dist``, ``idx``: ``(n, k)``, nearest first) whose row differs
    from the nearest item's, so exact duplicates in the training set count once (a copy of
    an image held three times is a copy). Where all ``k`` are duplicates of the nearest,
    the ``k``-th distance (a lower bound of ``d2``: the ratio is then an upper bound).
    ``train`` is a :class:`~diffmem.centres.Centres`. Returns ``d2`` and how many samples
    that bound was used for. A training set split over processes is not deduplicated
    (``d2`` is the second distance; the count is ``-1``)."""
    n, k = idx.shape
    if getattr(train, "group", None) is not None:
        return dist[:, 1].clone(), -1
    d2 = dist[:, -1].clone()
    exhausted = 0
    like = torch.empty(0, dtype=train.source_dtype)  # rows as stored: no converted copy
    for lo in range(0, n, batch_size):
        block = idx[lo:lo + batch_size]
        first = train.take_raw(block[:, 0], like)
        open_rows = torch.arange(block.shape[0])
        for j in range(1, k):
            if open_rows.numel() == 0:
                break
            other = train.take_raw(block[open_rows, j], like)
            differs = (other != first[open_rows]).any(dim=1)
            d2[lo + open_rows[differs]] = dist[lo + open_rows[differs], j]
            open_rows = open_rows[~differs]
        exhausted += int(open_rows.numel())
    return d2, exhausted


def distinct_rows(data: Tensor) -> Tensor:
    """The indices of the first occurrence of each distinct row of ``data`` ``(n, ...)``
    (rows equal in every value are exact duplicates), ascending: ``data[distinct_rows(data)]``
    is the deduplicated set, in its original order."""
    flat = data.reshape(data.shape[0], -1)
    _, inverse = torch.unique(flat, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), flat.shape[0], dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(flat.shape[0]), reduce="amin")
    return torch.sort(first).values


def _rows_of(items: Tensor, train: Any) -> Tensor:
    """The uncentred rows ``(len(items), d)`` of the training items ``items`` (indices
    into ``train``, a :class:`~diffmem.centres.Centres`; a split set: each row read by the
    process that holds it and summed over the group)."""
    from diffmem.centres import all_reduce

    like = torch.empty(0, dtype=torch.promote_types(train.source_dtype, torch.float32))
    local = items - train.start  # rows held here (a split set: each by its owner)
    mine = (local >= 0) & (local < train.n)
    rows = torch.zeros(items.shape[0], train.d, dtype=like.dtype)
    if bool(mine.any()):
        rows[mine] = train.take_raw(local[mine], like).to(like.dtype)
    all_reduce(rows, train.group)
    return rows


def nearest_other(items: Tensor, train: Any, k: int = 50, chunk_size: int = 4096) -> Tensor:
    """Per training item of ``items`` (indices into ``train``, a
    :class:`~diffmem.centres.Centres`), the distance to its nearest *other* training item,
    exact duplicates of it skipped (:func:`distinct_second` on the item queried against
    the set, whose nearest is itself at 0); data (or feature) units. Where the ``k``
    nearest are all duplicates of the item, the ``k``-th distance (a lower bound)."""
    rows = _rows_of(items, train)
    dist, idx = knn(rows.reshape(-1, *train.data_shape), train,
                    min(train.n_total, positive_int("k", k)), chunk_size=chunk_size, exact=2)
    return distinct_second(dist.cpu(), idx.cpu(), train)[0]


def same_items(nearest: Tensor, train: Any, block: int = 1024) -> Tensor:
    """``nearest`` (indices into ``train``) with each index replaced by the smallest index
    of ``nearest`` whose row holds exactly the same bytes: the exact duplicates of one
    training image are one item. Which of them a search returns as a sample's nearest is
    decided by rounding (their distances tie), so a condition whose samples all land on
    an image held 20 times would otherwise spread over 20 "items". Rows are read ``block``
    at a time and compared by a 128-bit BLAKE2 digest of their bytes."""
    import hashlib

    uniq, inverse = torch.unique(nearest, return_inverse=True)
    first: dict[bytes, int] = {}
    canon = torch.empty_like(uniq)
    for lo in range(0, uniq.numel(), block):  # ascending: the first seen is the smallest
        for j, row in enumerate(_rows_of(uniq[lo:lo + block], train).numpy()):
            key = hashlib.blake2b(row.tobytes(), digest_size=16).digest()
            canon[lo + j] = first.setdefault(key, int(uniq[lo + j]))
    return canon[inverse].reshape(nearest.shape)


def reproductions(nearest: Tensor, d1: Tensor, groups: Tensor, radius: Tensor,
                  modes: Tensor) -> Tensor:
    """Per sample, whether it reproduces its group's training item: sample ``i`` of group
    ``g`` (a condition) is a reproduction when its nearest training item is the group's
    most frequent nearest item ``modes[g]`` (exact duplicates as one item:
    ``nearest`` from :func:`same_items`) and it lies closer to that item than the item's
    own nearest other training item, ``d1_i < radius[g]``. All the samples of a memorized
    condition landing on one image count, however typical the image (the nn-ratio test
    misses a copy of an image with a close neighbour: ``d1 / d2`` near 1/2, not below 1/3).
    Returns booleans ``(n,)``."""
    return (nearest == modes[groups].to(nearest)) & (d1 < radius[groups].to(d1))


def modal_items(nearest: Tensor, groups: Tensor, n_groups: int) -> Tensor:
    """Per group ``0..n_groups-1``, its samples' most frequent nearest training item (the
    smallest index among ties)."""
    return torch.stack([torch.mode(nearest[groups == g]).values for g in range(n_groups)])


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


# --- distance to the true distribution -----------------------------------------------------
def _flat64(name: str, v: Tensor) -> Tensor:
    if not isinstance(v, Tensor) or v.dim() < 1 or v.shape[0] == 0:
        raise fail(name, "a non-empty tensor (n, *shape)",
                   tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__)
    return finite_tensor(name, v.flatten(1).to(torch.float64))


def _mean_pairwise(a: Tensor, b: Tensor, fn: Any, block: int = 512) -> float:
    """``mean_{i, j} fn(|a_i - b_j|)`` over all pairs, in blocks (small enough to stay in
    cache)."""
    total = 0.0
    for i in range(0, a.shape[0], block):
        for j in range(0, b.shape[0], 8 * block):
            total += float(fn(torch.cdist(a[i : i + block], b[j : j + 8 * block])).sum())
    return total / (a.shape[0] * b.shape[0])


def _mean_within(a: Tensor, fn: Any, pairs: int, seed: int) -> float:
    """``mean_{i != j} fn(|a_i - a_j|)``: exact for up to ``pairs`` pairs, else over
    ``pairs`` random pairs with ``i != j`` (an unbiased incomplete U-statistic)."""
    n = a.shape[0]
    if n < 2:
        raise fail("samples", "at least 2 points for a within-set mean", n)
    if n * (n - 1) <= pairs:
        total = _mean_pairwise(a, a, fn) * n * n - n * float(fn(torch.zeros(1,
                                                                        dtype=a.dtype)))
        return total / (n * (n - 1))
    gen = torch.Generator().manual_seed(seed)
    i = torch.randint(0, n, (pairs,), generator=gen)
    j = (i + torch.randint(1, n, (pairs,), generator=gen)) % n  # uniform over j != i
    return float(fn((a[i] - a[j]).norm(dim=1)).mean())


def _two_sample_means(x: Tensor, y: Tensor, fn: Any, pairs: int, seed: int,
                      x_empirical: bool, y_within: float | None
                      ) -> tuple[float, float, float]:
    """``(E fn|X - Y|, E fn|X - X'|, E fn|Y - Y'|)``: the three means of a two-sample
    discrepancy, within-sample over pairs ``i != j`` (seeds ``seed`` and ``seed + 1`` when
    subsampled), or over every pair for ``x_empirical``; ``y_within`` if given is used as
    the third."""
    a, b = _flat64("x", x), _flat64("y", y)
    if a.shape[1] != b.shape[1]:
        raise fail("y", f"points of dimension {a.shape[1]} like x", b.shape[1])
    x_within = _mean_pairwise(a, a, fn) if x_empirical else _mean_within(a, fn, pairs, seed)
    if y_within is None:
        y_within = _mean_within(b, fn, pairs, seed + 1)
    return _mean_pairwise(a, b, fn), x_within, y_within


def energy_distance(x: Tensor, y: Tensor, pairs: int = 4_000_000, seed: int = 0,
                    y_within: float | None = None, x_empirical: bool = False) -> float:
    """Energy distance between two samples (data units):
    ``2 E|X - Y| - E|X - X'| - E|Y - Y'|``, with unbiased within-sample means (pairs
    ``i != j``; beyond ``pairs`` pairs, over that many random pairs). 0 in expectation when
    the two laws are equal, positive otherwise. ``y_within`` passes a precomputed
    ``E|Y - Y'|`` (:func:`within_mean_distance`) for a reference used many times;
    ``x_empirical`` takes the points of ``x`` as the law itself (their empirical measure, as
    a sampler that reproduces a training set exactly): ``E|X - X'|`` then includes the
    pairs ``i = j``."""
    cross, x_within, y_within = _two_sample_means(x, y, lambda d: d, pairs, seed,
                                                  x_empirical, y_within)
    return 2 * cross - x_within - y_within


def within_mean_distance(y: Tensor, pairs: int = 4_000_000, seed: int = 1) -> float:
    """``E|Y - Y'|`` over pairs ``i != j`` of one sample (data units), as in
    :func:`energy_distance`."""
    return _mean_within(_flat64("y", y), lambda d: d, pairs, seed)


def median_bandwidth(x: Tensor, y: Tensor, n: int = 2000, seed: int = 0) -> float:
    """The median heuristic: the median distance between points of the pooled sample (a
    random subsample of ``n``), in data units."""
    pooled = torch.cat([_flat64("x", x), _flat64("y", y)])
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(pooled.shape[0], generator=gen)[:n]
    d = torch.cdist(pooled[pick], pooled[pick])
    upper = d[torch.triu(torch.ones_like(d, dtype=torch.bool), diagonal=1)]
    return float(upper.median()) if upper.numel() else 1.0


def _gaussian_kernel(s: float) -> Any:
    def kernel(d: Tensor) -> Tensor:
        return torch.exp(-d * d / (2 * s * s))

    return kernel


def mmd(x: Tensor, y: Tensor, bandwidth: float | None = None, pairs: int = 4_000_000,
        seed: int = 0, x_empirical: bool = False, y_within: float | None = None) -> float:
    """Squared maximum mean discrepancy with the Gaussian kernel
    ``k(a, b) = exp(-|a - b|^2 / (2 s^2))`` (dimensionless; ``s`` the median heuristic by
    default): ``E k(X, X') + E k(Y, Y') - 2 E k(X, Y)``, unbiased (within-sample pairs
    ``i != j``); ``x_empirical`` and ``y_within`` (here :func:`within_mean_kernel`) as in
    :func:`energy_distance`."""
    s = median_bandwidth(x, y, seed=seed) if bandwidth is None else positive("bandwidth",
                                                                              bandwidth)
    cross, x_within, y_within = _two_sample_means(x, y, _gaussian_kernel(s), pairs, seed,
                                                  x_empirical, y_within)
    return x_within + y_within - 2 * cross


def within_mean_kernel(y: Tensor, bandwidth: float, pairs: int = 4_000_000,
                       seed: int = 1) -> float:
    """``E k(Y, Y')`` over pairs ``i != j`` of one sample, as in :func:`mmd`."""
    return _mean_within(_flat64("y", y), _gaussian_kernel(positive("bandwidth", bandwidth)),
                        pairs, seed)


def mean_log_density(samples: Tensor, log_density: Any) -> float:
    """The mean of a known ``log_density`` over the samples (nats): how typical the samples
    are of the true law."""
    values = log_density(_flat64("samples", samples))
    return float(finite_tensor("log_density(samples)", values).mean())


def test_train_ratio(samples: Tensor, train: TrainingData, test: TrainingData) -> Tensor:
    """Per sample, the distance to the nearest held-out point over the distance to the
    nearest training point (dimensionless): about 1 for samples as close to unseen data as
    to the training set, large for copies of training points."""
    _, d_train = nearest(samples, train)
    _, d_test = nearest(samples, test)
    return d_test / d_train.clamp_min(torch.finfo(d_train.dtype).tiny)


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two sets of feature vectors (squared
    feature units): ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))``, the FID formula
    (with ``tr (S_a S_b)^(1/2)`` from the eigenvalues of ``S_a^(1/2) S_b S_a^(1/2)``)."""
    fa, fb = _flat64("a", a), _flat64("b", b)
    if fa.shape[0] < 2 or fb.shape[0] < 2:
        raise fail("a", "at least 2 feature vectors per set", (fa.shape[0], fb.shape[0]))
    mu_a, mu_b = fa.mean(0), fb.mean(0)
    cov_a, cov_b = torch.cov(fa.T).reshape(fa.shape[1], -1), torch.cov(fb.T).reshape(
        fb.shape[1], -1)
    evals, evecs = torch.linalg.eigh(cov_a)
    root_a = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b)
                 - 2 * cross)
