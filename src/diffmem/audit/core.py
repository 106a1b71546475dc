"""Does a model copy its training data? Audit any set of samples against any training set.

:func:`audit` finds, for every sample, its nearest training points (exactly by default, or
with a faiss index) in data units or in the units of a feature space, and computes, through
the functions of :mod:`diffmem.metrics` that the experiments use too:

* ``fraction_within``: the paper's metric, the fraction of samples closer than ``delta`` to a
  training point (data or feature units; for images also as the per-pixel RMS difference
  ``delta / sqrt(d)``);
* ``nn_ratio``: copies by ``d1 / d2 < threshold`` (dimensionless; 1/3 as in Gu et al. and
  Bonnaire et al.), with a bootstrap interval; ``d2`` is the distance to the nearest training
  item that is not an exact duplicate of the nearest one (:func:`distinct_second`: a copy of
  an image the training set holds three times is a copy, ``d1 / d2`` near 0, not 1, as in
  :func:`diffmem.metrics.nn_ratio`);
* ``calibrated_l2``: Carlini et al. (2023)'s ``d1 / (alpha * mean distance to the n nearest
  training points)`` (dimensionless; ``alpha = 0.5``, ``n = 50``); copies below a threshold
  (:data:`CALIBRATED_THRESHOLD`, chosen by the measurement described there);
* ``exact_match``: when the training images are binary, the fraction of samples equal to a
  training image after thresholding at 0.5;
* ``reproduction`` (with the samples' conditions): per condition, the fraction of its
  samples that land on one training item, the condition's most frequent nearest item (an
  image held several times counted once: :func:`diffmem.metrics.same_items`), closer
  to it than that item's own nearest other training item (:func:`diffmem.metrics.reproductions`;
  it counts the copies of a typical-looking image that the nn-ratio test misses);
* ``duplicates``: how many samples land on each training item (copies by the nn-ratio
  test), the most-copied items and how many distinct items were copied (coverage);
* quantiles of ``d1``, ``d1 / d2`` and the calibrated distance.

Samples and training sets are tensors, numpy arrays or memory-maps (streamed in batches and
chunks, never loaded whole), ``.npy`` paths, or (training sets) lists of shards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffmem._checks import fail, positive, positive_int
from diffmem.audit.features import feature_space
from diffmem.audit.inputs import Rows
from diffmem.audit.result import CALIBRATED_THRESHOLD, AuditResult, duplicates, quantiles
from diffmem.audit.search import INDEXES, nearest
from diffmem.centres import Centres, TrainingData, all_reduce, as_centres
from diffmem.conditions import as_conditions, describe, distinct, same
from diffmem.images import exact_matches, is_binary
from diffmem.metrics import (
    bootstrap_interval,
    calibrated_l2,
    delta_key,
    distance_ratios,
    distinct_second,
    modal_items,
    nearest_other,
    ratio_test,
    reproductions,
    rms_per_coordinate,
    same_items,
    within,
)

#: Default tolerances of ``fraction_within`` (data or feature units).
DEFAULT_DELTAS = (0.01, 0.1, 1.0)


def audit(
    samples: Any,
    train: TrainingData,
    *,
    deltas: Sequence[float] = DEFAULT_DELTAS,
    ratio_threshold: float = 1 / 3,
    calibrated_alpha: float = 0.5,
    calibrated_n: int = 50,
    calibrated_threshold: float = CALIBRATED_THRESHOLD,
    features: Callable[[Tensor], Tensor] | str | Path | None = None,
    index: str = "exact",
    bootstrap: int = 1000,
    seed: int = 0,
    chunk_size: int = 4096,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
    progress: bool = False,
    feature_cache: Path | None = None,
    process_group: Any = None,
    sample_cond: Tensor | None = None,
    train_cond: Tensor | None = None,
) -> AuditResult:
    """Audit ``samples`` ``(n, *data_shape)`` against ``train`` ``(N, *data_shape)``: the
    nearest training points of every sample and the memorization figures listed in the
    module's description, each in the units stated in :data:`UNITS`.

    Args:
        samples: a tensor, numpy array or memory-map, or a ``.npy`` path; ``train``: the
            same, or a list of shards.
        deltas: tolerances of ``fraction_within`` (data or feature units, > 0).
        ratio_threshold: the nn-ratio test's ``d1 / d2`` threshold; ``calibrated_alpha``,
            ``calibrated_n`` and ``calibrated_threshold``: the calibrated distance's
            ``alpha``, the nearest items it averages over and its copy threshold (Carlini
            et al.).
        features: a callable or the path of a TorchScript module mapping a batch of
            ``data_shape`` arrays to vectors; distances are then measured between vectors,
            and cosine similarities reported beside them.
        index: ``'exact'`` (streamed matrix products with exact re-ranking), ``'faiss-flat'``
            or ``'faiss-ivf'`` (its recall against exact search is measured on a subsample).
        bootstrap: the nn-ratio interval's resamples; ``seed``: their seed (also the IVF's).
        chunk_size: training rows processed at once; ``batch_size``: samples at once.
        feature_cache: a folder in which feature vectors are kept and reused.
        process_group: a torch.distributed group when each process holds a contiguous block
            of ``train`` (exact search only); every process returns the full result.
        sample_cond: the condition each sample was drawn for (integer labels ``(n,)`` or
            vectors ``(n, *cond_shape)``): the figures are also reported per condition
            (``conditions``), sorted by nn-ratio copy fraction.
        train_cond: each training item's condition (every item, whatever the process
            group): adds ``same_condition``, the fraction of a condition's samples whose
            nearest training item carries that condition.
    """
    settings = _settings(deltas, ratio_threshold, calibrated_alpha, calibrated_n,
                         calibrated_threshold, bootstrap, seed)
    batch_size = _check_search(index, batch_size, process_group)
    rows = Rows(samples, "samples")
    centres = as_centres(train, process_group=process_group)
    sample_cond, train_cond = _checked_inputs(rows, centres, sample_cond, train_cond)
    space_rows, space_train, feature_name = feature_space(
        rows, centres, features, batch_size, torch.device(device), progress, feature_cache,
        (samples, train))
    k = min(centres.n_total, max(2, settings["n"]))
    settings["n"] = min(settings["n"], k)
    found = _Found.find(space_rows, space_train, k, index, batch_size, chunk_size, seed,
                        progress, settings)
    groups = None if sample_cond is None else _reproductions(
        found.copies, sample_cond, found.item, found.d1, space_train, k, chunk_size)
    exact = _exact_matches(rows, centres, batch_size, process_group)
    if exact is not None:
        found.copies["exact_match"] = exact
    result = found.result(rows, centres, feature_name, index, settings, exact, features is None)
    if groups is not None:
        assert sample_cond is not None
        result.reproduction = _fraction(found.copies["reproduction"], settings)
        result.conditions, result.sample_condition = _per_condition(
            result, sample_cond, train_cond, settings, groups)
    if features is not None:
        _cosines(result, space_rows.data, space_train, found.idx)
    return result


@dataclass
class _Found:
    """What the nearest-neighbour search finds: the neighbours, the distances and ratios,
    each sample's copy verdicts and its nearest item (exact duplicates one item)."""

    idx: Tensor
    d1: Tensor
    d2: Tensor
    ratio: Tensor
    calibrated: Tensor
    copies: dict[str, Tensor]
    item: Tensor
    search: dict[str, Any]
    recall: Any

    @classmethod
    def find(cls, space_rows: Any, space_train: Any, k: int, index: str, batch_size: int,
               chunk_size: int, seed: int, progress: bool, settings: dict[str, Any]) -> _Found:
        dist, idx, search, recall = nearest(space_rows, space_train, k, index, batch_size,
                                             chunk_size, seed, progress)
        d1 = dist[:, 0]
        d2, search["duplicates_beyond_k"] = distinct_second(dist, idx, space_train,
                                                            batch_size)
        ratio = distance_ratios(d1, d2)
        calibrated = calibrated_l2(dist, settings["alpha"], settings["n"])
        copies = {f"within_{delta_key(d)}": d1 < d for d in settings["deltas"]}
        copies["nn_ratio"] = ratio < settings["ratio_threshold"]
        copies["calibrated_l2"] = calibrated < settings["calibrated_threshold"]
        return cls(idx, d1, d2, ratio, calibrated, copies,
                   same_items(idx[:, 0], space_train), search, recall)

    def result(self, rows: Rows, centres: Centres, feature_name: str | None, index: str,
               settings: dict[str, Any], exact: Tensor | None, pixels: bool) -> AuditResult:
        """The audit's result from what was found (``pixels``: no feature space)."""
        dim = int(math.prod(rows.data_shape))
        return AuditResult(
            n_samples=rows.n, n_train=centres.n_total, dim=dim, data_shape=rows.data_shape,
            features=feature_name, index=index,
            **_figures(self.d1, self.d2, self.copies["calibrated_l2"], settings),
            rms_per_coordinate=({delta_key(d): float(rms_per_coordinate(d, dim))
                                 for d in settings["deltas"]}
                                if len(rows.data_shape) >= 2 and pixels else None),
            exact_match=None if exact is None else float(exact.to(torch.float64).mean()),
            duplicates=duplicates(self.item, self.copies["nn_ratio"], centres.n_total),
            quantiles={"d1": quantiles(self.d1), "ratio": quantiles(self.ratio),
                       "calibrated": quantiles(self.calibrated)},
            nearest=self.idx[:, 0], d1=self.d1, d2=self.d2, ratio=self.ratio,
            calibrated=self.calibrated, copies=self.copies, recall=self.recall,
            search=self.search)


def _check_search(index: str, batch_size: int, process_group: Any) -> int:
    """The search index checked (exact search with a split training set), and the batch
    size."""
    if index not in INDEXES:
        raise fail("index", f"one of {INDEXES}", repr(index))
    batch_size = positive_int("batch_size", batch_size)
    if process_group is not None and index != "exact":
        raise fail("index", "'exact' when the training set is split over processes", index)
    return batch_size


def _settings(deltas: Sequence[float], ratio_threshold: float, alpha: float, n: int,
              threshold: float, bootstrap: int, seed: int) -> dict[str, Any]:
    """The audit's tolerances and thresholds, checked (errors name the argument)."""
    deltas = [positive("deltas", d) for d in deltas]
    if not deltas:
        raise fail("deltas", "at least one tolerance", "an empty list")
    return {"deltas": deltas, "ratio_threshold": positive("ratio_threshold", ratio_threshold),
            "bootstrap": bootstrap, "seed": seed, "alpha": positive("calibrated_alpha", alpha),
            "n": positive_int("calibrated_n", n),
            "calibrated_threshold": positive("calibrated_threshold", threshold)}


def _reproductions(copies: dict[str, Tensor], sample_cond: Tensor, item: Tensor, d1: Tensor,
                   space_train: Any, k: int, chunk_size: int) -> tuple[Any, ...]:
    """All a condition's samples on one item: the reproductions, into ``copies``; the
    conditions, each sample's, their modal items and those items' radii."""
    keys, which = distinct(sample_cond)
    modes = modal_items(item, which, keys.shape[0])
    radius = nearest_other(modes, space_train, k, chunk_size)
    copies["reproduction"] = reproductions(item, d1, which, radius, modes)
    return keys, which, modes, radius


def _checked_inputs(rows: Rows, centres: Centres, sample_cond: Tensor | None,
                    train_cond: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """The conditions, one per sample and per training item, and the samples' shape and
    the training set's size checked."""
    if sample_cond is not None:
        sample_cond = as_conditions(sample_cond, "sample_cond", rows.n)
    if train_cond is not None:
        train_cond = as_conditions(train_cond, "train_cond", centres.n_total)
    if rows.data_shape != centres.data_shape:
        raise fail("samples", f"arrays of shape (n, *{centres.data_shape}) like train",
                   f"shape ({rows.n}, *{rows.data_shape})")
    if centres.n_total < 2:
        raise fail("train", "at least 2 training points (for d1 / d2)", centres.n_total)
    return sample_cond, train_cond


def _cosines(result: AuditResult, vectors: Tensor, space_train: Any, idx: Tensor) -> None:
    """The cosine similarity of each sample's feature vector with its nearest training
    item's, into ``result``."""
    near = space_train.take_raw(idx[:, 0], vectors)
    cos = torch.nn.functional.cosine_similarity(vectors, near, dim=1)
    result.cosine = cos
    result.cosine_summary = {"nearest_mean": float(cos.mean()), "quantiles": quantiles(cos)}


def _exact_matches(rows: Rows, centres: Centres, batch_size: int,
                   process_group: Any) -> Tensor | None:
    """For binary training images: whether each sample, thresholded at 0.5, equals a
    training image (``None`` when the training set is not binary)."""
    binary = float(all_reduce(torch.tensor([float(centres.n == 0 or is_binary(centres))]),
                              process_group, "min")) == 1.0
    if not binary:
        return None
    local = (exact_matches((x for _, x in rows.batches(batch_size)), centres) if centres.n
             else torch.zeros(rows.n, dtype=torch.bool))
    return all_reduce(local.to(torch.float64), process_group, "max") > 0


def _figures(d1: Tensor, d2: Tensor, calibrated_copies: Tensor,
             settings: dict[str, Any]) -> dict[str, Any]:
    """The fraction within each delta, the nn-ratio test with its bootstrap interval and the
    calibrated-l2 copy fraction with its interval, for one set of samples."""
    seed, bootstrap = settings["seed"], settings["bootstrap"]
    test = ratio_test(d1, d2, settings["ratio_threshold"], bootstrap, seed=seed)
    return {
        "fraction_within": {delta_key(d): f for d, f in within(d1, settings["deltas"]).items()},
        "nn_ratio": {"threshold": settings["ratio_threshold"], "fraction": test.fraction,
                     "ci_low": test.ci_low, "ci_high": test.ci_high, "level": test.level},
        "calibrated_l2": {"alpha": settings["alpha"], "n": settings["n"],
                          "threshold": settings["calibrated_threshold"],
                          **_fraction(calibrated_copies, settings)},
    }


def _fraction(flags: Tensor, settings: dict[str, Any]) -> dict[str, float]:
    """The fraction of ``flags`` set, with its bootstrap interval."""
    lo, hi = bootstrap_interval(flags, settings["bootstrap"], seed=settings["seed"])
    return {"fraction": float(flags.to(torch.float64).mean()), "ci_low": lo, "ci_high": hi}


def _per_condition(result: AuditResult, sample_cond: Tensor, train_cond: Tensor | None,
                   settings: dict[str, Any], groups: tuple[Tensor, Tensor, Tensor, Tensor]
                   ) -> tuple[list[dict[str, Any]], list[Any]]:
    """One entry per distinct sample condition (sorted by the larger of its nn-ratio and
    reproduction fractions, most copied first), and each sample's condition as written in
    ``per_sample.csv``."""
    keys, which, modes, radius = groups
    same_cond = None
    if train_cond is not None:
        same_cond = same(sample_cond, train_cond[result.nearest])
    labels = [describe(key, j) for j, key in enumerate(keys)]
    entries = []
    for j in range(keys.shape[0]):
        mask = which == j
        entry = {"condition": labels[j], "n_samples": int(mask.sum()),
                 **_figures(result.d1[mask], result.d2[mask],
                            result.copies["calibrated_l2"][mask], settings)}
        entry["reproduction"] = {**_fraction(result.copies["reproduction"][mask], settings),
                                 "train_index": int(modes[j]), "radius": float(radius[j])}
        entry["same_condition"] = (None if same_cond is None else
                                   float(same_cond[mask].to(torch.float64).mean()))
        entry["samples"] = torch.nonzero(mask).squeeze(1).tolist()
        entries.append(entry)
    entries.sort(key=lambda e: -max(e["nn_ratio"]["fraction"],
                                    e["reproduction"]["fraction"]))
    per_sample = [labels[int(j)] if not isinstance(labels[int(j)], list) else int(j)
                  for j in which]
    return entries, per_sample
