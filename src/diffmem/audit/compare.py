"""The two-model test (Kadkhodaie et al., ICLR 2024): two models of the same kind trained on
disjoint halves ``A`` and ``B`` of a data set, sampled from the same initial noise. When they
generalize, the two samples of a pair nearly coincide; when they memorize, each is a copy
from its own half.

For each pair ``(x_a, x_b)``: ``d_ab = |x_a - x_b|``, ``d_a`` the distance of ``x_a`` to the
nearest item of ``A`` and ``d_b`` that of ``x_b`` to ``B`` (data units); the pair *agrees* when
``d_ab < min(d_a, d_b)``: the two models are closer to each other than either is to its own
training data. The closed forms give the two ends: empirical halves never agree, Gaussian
halves (almost) always do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffmem._checks import fail
from diffmem.centres import TrainingData, as_centres
from diffmem.metrics import bootstrap_interval, distance_ratios, knn

UNITS = {"distances": "Euclidean norm of the flattened difference, in data units",
         "fractions": "fraction of pairs (or samples) in [0, 1]"}


@dataclass
class CompareResult:
    """Per pair ``d_ab``, ``d_a``, ``d_b``, ``agree`` and each side's copy flag, and the
    aggregates of :meth:`to_json`."""

    d_ab: Tensor
    d_a: Tensor
    d_b: Tensor
    agree: Tensor
    copy_a: Tensor
    copy_b: Tensor
    nearest_a: Tensor
    nearest_b: Tensor
    interval: tuple[float, float]

    @property
    def agreement(self) -> float:
        return float(self.agree.to(torch.float64).mean())

    def to_json(self) -> dict[str, Any]:
        from diffmem.io import versions

        lo, hi = self.interval
        return {"n_pairs": int(self.d_ab.shape[0]), "agreement": self.agreement,
                "agreement_ci": [lo, hi], "median_d_ab": float(self.d_ab.median()),
                "median_d_a": float(self.d_a.median()), "median_d_b": float(self.d_b.median()),
                "copied_a": float(self.copy_a.to(torch.float64).mean()),
                "copied_b": float(self.copy_b.to(torch.float64).mean()),
                "criterion": "agree: d_ab < min(d_a, d_b); copies: nn-ratio d1/d2 < 1/3 "
                             "against the side's own training set",
                "units": UNITS, "versions": versions()}

    def per_pair(self) -> list[dict[str, Any]]:
        return [{"pair": i, "d_ab": float(self.d_ab[i]), "d_a": float(self.d_a[i]),
                 "d_b": float(self.d_b[i]), "nearest_a": int(self.nearest_a[i]),
                 "nearest_b": int(self.nearest_b[i]), "agree": int(self.agree[i]),
                 "copy_a": int(self.copy_a[i]), "copy_b": int(self.copy_b[i])}
                for i in range(self.d_ab.shape[0])]


def compare_samples(samples_a: Tensor, samples_b: Tensor, train_a: TrainingData,
                    train_b: TrainingData, *, bootstrap: int = 1000, seed: int = 0,
                    ratio_threshold: float = 1 / 3) -> CompareResult:
    """The two-model test on paired samples (row ``i`` of each drawn from the same noise)."""
    ca, cb = as_centres(train_a), as_centres(train_b)
    if ca.data_shape != cb.data_shape:
        raise fail("--train-b", f"items of the shape of --train-a's, {ca.data_shape}",
                   f"shape {cb.data_shape}")
    for name, s in (("samples_a", samples_a), ("samples_b", samples_b)):
        if not isinstance(s, Tensor) or tuple(s.shape[1:]) != ca.data_shape:
            raise fail(name, f"samples of shape (n, *{ca.data_shape})",
                       tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__)
    if samples_a.shape[0] != samples_b.shape[0] or samples_a.shape[0] == 0:
        raise fail("samples_b", f"{samples_a.shape[0]} samples, paired with samples_a",
                   samples_b.shape[0])
    if ca.n_total < 2 or cb.n_total < 2:
        raise fail("train", "at least 2 items in each training set",
                   f"{ca.n_total} and {cb.n_total}")
    xa, xb = samples_a.to(torch.float64), samples_b.to(torch.float64)
    dist_a, idx_a = knn(xa, ca, 2)
    dist_b, idx_b = knn(xb, cb, 2)
    d_ab = (xa - xb).flatten(1).norm(dim=1)
    agree = d_ab < torch.minimum(dist_a[:, 0], dist_b[:, 0])
    return CompareResult(
        d_ab=d_ab, d_a=dist_a[:, 0], d_b=dist_b[:, 0], agree=agree,
        copy_a=distance_ratios(dist_a[:, 0], dist_a[:, 1]) < ratio_threshold,
        copy_b=distance_ratios(dist_b[:, 0], dist_b[:, 1]) < ratio_threshold,
        nearest_a=idx_a[:, 0], nearest_b=idx_b[:, 0],
        interval=bootstrap_interval(agree, bootstrap, seed=seed))


def plan_pair(model_a: str, model_b: str, train_a: Any, train_b: Any, *,
              n_samples: int = 200, device: str = "cpu", **options: Any) -> dict[str, Any]:
    """Load both models and check every option against both (``options`` are those of
    :func:`diffmem.audit.model.plan_draw`: ``sampler``, ``steps``, ``seed``, ``kind``,
    ``schedule``, ``scheduler``, ``prompts``: text-to-image pipelines sample the same
    prompts in the same order); nothing is written."""
    from diffmem.audit.model import plan_draw, training_shape

    shape_a, shape_b = training_shape(train_a), training_shape(train_b)
    if shape_a != shape_b:
        raise fail("--train-b", f"items of the shape of --train-a's, {shape_a}",
                   f"shape {shape_b}")
    plans = {side: plan_draw(spec, shape_a, n_samples=n_samples, device=device, **options)
             for side, spec in (("a", model_a), ("b", model_b))}
    if any(p.model.conditional and p.prompts is None for p in plans.values()):
        raise fail("--model-a", "unconditional models or text-to-image pipelines with "
                   "--prompts (audit other conditional ones per condition with diffmem "
                   "audit)", "a conditional model")
    return plans


def compare(plans: dict[str, Any], train_a: Any, train_b: Any, out: Any, *,
            bootstrap: int = 1000, progress: bool = False, device: str = "cpu",
            team: Any = None) -> CompareResult:
    """Draw each planned model's samples from the same initial noise (recorded in
    ``out/initial_noise.npy``; samples in ``out/a/samples.npy`` and ``out/b/samples.npy``,
    resumable; the batches split over ``team``'s processes, process 0 writing) and compare
    them (:func:`compare_samples`, on every process)."""
    import shutil
    from pathlib import Path

    import numpy as np

    from diffmem.audit.model import draw

    folder = Path(out)
    samples = {}
    for side, plan in plans.items():
        sub = folder / side
        sub.mkdir(parents=True, exist_ok=True)
        samples[side] = torch.from_numpy(np.array(np.load(draw(
            plan, sub, device=device, progress=progress, team=team))))
    noise_a, noise_b = (np.load(folder / s / "initial_noise.npy") for s in ("a", "b"))
    if not np.array_equal(noise_a, noise_b):  # same seed, batch and shape: cannot happen
        raise fail("--seed", "the same initial noise for both models", "different noise")
    if team is None or team.leader:
        shutil.copyfile(folder / "a" / "initial_noise.npy", folder / "initial_noise.npy")
    return compare_samples(samples["a"], samples["b"], train_a, train_b, bootstrap=bootstrap,
                           seed=plans["a"].seed)
