"""What an audit measured: :class:`AuditResult` (the aggregates of ``audit.json`` with their
units, and per-sample arrays), copies per training item, and quantiles."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from diffmem.io import versions

#: Default threshold of the calibrated distance, measured on scikit-learn's 8x8 digits (1500
#: training, 297 held out; ``tests/test_audit.py`` repeats it): training digits plus pixel
#: noise of standard deviation 0.02 score at most 0.34 (median 0.20), with noise 0.05 median
#: 0.47 (max 0.73); held-out digits score at least 0.61 (5% quantile 0.89, median 1.25). At
#: 0.5 every lightly perturbed copy and no held-out digit is flagged.
CALIBRATED_THRESHOLD = 0.5
#: Quantiles reported for d1, d1/d2 and the calibrated distance.
QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)
#: Training items listed as the most copied.
TOP_COPIED = 20

UNITS = {
    "distances": "Euclidean norm of the flattened difference, in data units (feature units "
                 "with features); for images also per-pixel RMS (delta / sqrt(d))",
    "fractions": "fraction of samples in [0, 1]",
    "reproduction": "fraction of a condition's samples whose nearest training item is the "
                    "condition's most frequent one and lies closer to it than that item's "
                    "nearest other training item",
    "ratios": "dimensionless (d1 / d2; calibrated distance)",
    "cosine": "cosine similarity in [-1, 1] between a sample's features and its nearest "
              "training item's",
}


@dataclass
class AuditResult:
    """What :func:`audit` measured: the aggregates (attributes named as in ``audit.json``)
    and per-sample arrays (``nearest``, ``d1``, ``d2``, ``ratio``, ``calibrated``,
    ``copies`` per criterion, and ``cosine`` with features)."""

    n_samples: int
    n_train: int
    dim: int
    data_shape: tuple[int, ...]
    features: str | None
    index: str
    fraction_within: dict[str, float]
    rms_per_coordinate: dict[str, float] | None
    nn_ratio: dict[str, float]
    calibrated_l2: dict[str, float]
    exact_match: float | None
    duplicates: dict[str, Any]
    quantiles: dict[str, dict[str, float]]
    nearest: Tensor
    d1: Tensor
    d2: Tensor
    ratio: Tensor
    calibrated: Tensor
    copies: dict[str, Tensor]
    cosine: Tensor | None = None
    cosine_summary: dict[str, float] | None = None
    recall: dict[str, Any] | None = None
    search: dict[str, Any] = field(default_factory=dict)
    conditions: list[dict[str, Any]] | None = None
    sample_condition: list[Any] | None = None
    #: With the samples' conditions: the fraction of samples that reproduce their
    #: condition's training item (:func:`diffmem.metrics.reproductions`).
    reproduction: dict[str, float] | None = None

    def to_json(self) -> dict[str, Any]:
        """The aggregates as plain JSON values, with units and versions."""
        out = {"n_samples": self.n_samples, "n_train": self.n_train, "dim": self.dim,
               "data_shape": list(self.data_shape), "features": self.features,
               "index": self.index, "search": self.search, "units": UNITS,
               "fraction_within": self.fraction_within,
               "fraction_within_rms_per_pixel": self.rms_per_coordinate,
               "nn_ratio": self.nn_ratio, "calibrated_l2": self.calibrated_l2,
               "exact_match": self.exact_match, "duplicates": self.duplicates,
               "quantiles": self.quantiles, "versions": versions()}
        if self.cosine_summary is not None:
            out["cosine"] = self.cosine_summary
        if self.recall is not None:
            out["recall"] = self.recall
        if self.reproduction is not None:
            out["reproduction"] = self.reproduction
        if self.conditions is not None:
            out["conditions"] = [{k: v for k, v in e.items() if k != "samples"}
                                 for e in self.conditions]
        return out

    def per_sample(self) -> Iterator[dict[str, Any]]:
        """One row per sample: index, nearest training item, d1, d2, ratio, calibrated
        distance, a copy flag per criterion (and the cosine similarity with features)."""
        for i in range(self.n_samples):
            row: dict[str, Any] = {"sample": i}
            if self.sample_condition is not None:
                row["condition"] = self.sample_condition[i]
            row.update({"nearest": int(self.nearest[i]), "d1": float(self.d1[i]),
                        "d2": float(self.d2[i]), "ratio": float(self.ratio[i]),
                        "calibrated": float(self.calibrated[i])})
            if self.cosine is not None:
                row["cosine"] = float(self.cosine[i])
            row.update({f"copy_{k}": int(v[i]) for k, v in self.copies.items()})
            yield row


def quantiles(v: Tensor) -> dict[str, float]:
    q = torch.quantile(v.to(torch.float64), torch.tensor(QUANTILES, dtype=torch.float64))
    return {repr(p): float(x) for p, x in zip(QUANTILES, q, strict=True)}


def duplicates(nearest: Tensor, copied: Tensor, n_train: int) -> dict[str, Any]:
    """Copies per training item by ``copied`` samples: how many items, the coverage and the
    :data:`TOP_COPIED` most copied."""
    counts = torch.zeros(n_train, dtype=torch.long)
    hit = nearest[copied]
    counts.index_add_(0, hit, torch.ones_like(hit))
    top = torch.argsort(counts, descending=True, stable=True)[:TOP_COPIED]
    return {"criterion": "nn_ratio", "copied_samples": int(copied.sum()),
            "distinct_train_items": int((counts > 0).sum()),
            "coverage": float((counts > 0).to(torch.float64).mean()),
            "most_copied": [{"train_index": int(i), "copies": int(counts[i])}
                            for i in top if counts[i] > 0]}
