"""Which conditions does a model memorize? Detection without the training set.

Two measures per condition ``c``, from the model alone (a conditional
:class:`diffmem.models.ModelScore` and its null condition):

* ``score`` (primary; Wen et al., ICLR 2024): the conditional/unconditional gap of the noise
  prediction along the model's own deterministic sampler, over its first ``S`` steps and ``K``
  seeded noise draws,

      score(c) = mean_{k, i < S} |eps(x_i, t_i, c) - eps(x_i, t_i, null)| / sqrt(d),

  in noise units (per-coordinate RMS; ``eps = -sigma(t) s(x, t)``). A memorized condition
  pulls every trajectory towards one image from the first steps, far from the unconditional
  prediction.
* ``collapse`` (the paper's view): ``1 - sensitivity``, with the conditional denoiser's
  sensitivity at the smallest noise level of the sampler, on the end points of the same
  trajectories,

      sensitivity(c) = mean_k |D(x + delta, t, c) - D(x, t, c)| / |delta|,
      |delta| = 0.1 sigma(t) sqrt(d),

  near 0 for a memorized condition (its denoiser returns one fixed image whatever the input)
  and near 1 for one that generalizes (a denoiser at small noise is nearly the identity).

The sampler is DDIM with ``eta = 0`` written on the model's schedule: ``N`` times ``t_i``
(for a diffusers model its scheduler's timesteps, ``t = (k + 1) / K``; else log-spaced in
``sigma``), ``x_{i+1} = m_{i+1} D_i + sigma_{i+1} eps_i`` from ``x_0 = sigma(t_0) z``.
With ``labels`` (1: memorized), each measure's ROC curve, AUC and TPR at 1% FPR.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffmem._checks import fail, positive_int
from diffmem.conditions import describe
from diffmem.schedules import expand_as_batch

MEASURES = ("score", "collapse")
UNITS = {"score": "noise units: RMS per coordinate of eps(c) - eps(null)",
         "collapse": "dimensionless: 1 - |D(x + delta) - D(x)| / |delta| at the smallest level",
         "sensitivity": "dimensionless"}


@dataclass
class DetectResult:
    """Per condition (in the order given): its measures; with labels, each measure's ROC."""

    conditions: list[dict[str, Any]]
    settings: dict[str, Any]
    roc: dict[str, dict[str, Any]] = field(default_factory=dict)

    def ranking(self) -> list[dict[str, Any]]:
        """The conditions by decreasing primary score."""
        return sorted(self.conditions, key=lambda e: -e["score"])

    def to_json(self) -> dict[str, Any]:
        from diffmem.io import versions

        return {"conditions": self.conditions, "settings": self.settings, "units": UNITS,
                "primary": "score", "roc": self.roc or None, "versions": versions()}


def sampler_times(model: Any, steps: int) -> Tensor:
    """The deterministic sampler's times, from the top down (module docstring)."""
    sch = model.schedule
    network = getattr(model, "network", None)
    if network is not None:
        from diffmem.pipeline import make_scheduler

        timesteps = make_scheduler(network["scheduler_config"], "DDIMScheduler", steps).timesteps
        return (timesteps.to(torch.float64) + 1) / sch.K
    top = float(sch.sigma(sch.T))
    sigmas = torch.logspace(math.log10(top), math.log10(top * 1e-3), steps,
                            dtype=torch.float64)
    return sch.t_of_s(-torch.log(sigmas))


def roc(scores: Tensor, labels: Tensor) -> dict[str, Any]:
    """ROC of ``scores`` (larger: positive) against binary ``labels``: the curve (FPR, TPR
    at every threshold), the AUC (the Mann-Whitney probability that a positive outscores a
    negative, ties counted half) and the TPR at 1% FPR (fractions)."""
    s, y = scores.to(torch.float64), labels.to(torch.bool)
    pos, neg = s[y], s[~y]
    if pos.numel() == 0 or neg.numel() == 0:
        raise fail("labels", "both memorized (1) and not memorized (0) conditions",
                   f"{int(pos.numel())} and {int(neg.numel())}")
    greater = (pos[:, None] > neg[None, :]).to(torch.float64).mean()
    ties = (pos[:, None] == neg[None, :]).to(torch.float64).mean()
    thresholds = torch.cat([torch.tensor([math.inf], dtype=torch.float64),
                            torch.sort(torch.unique(s), descending=True).values])
    tpr = [float((pos >= th).to(torch.float64).mean()) for th in thresholds]
    fpr = [float((neg >= th).to(torch.float64).mean()) for th in thresholds]
    at1 = max(t for t, f in zip(tpr, fpr, strict=True) if f <= 0.01)
    return {"fpr": fpr, "tpr": tpr, "auc": float(greater + 0.5 * ties), "tpr_at_1pct_fpr": at1,
            "n_positive": int(pos.numel()), "n_negative": int(neg.numel())}


def detect(model: Any, conditions: Tensor, null: Tensor, *, n_noise: int = 4,
           first_steps: int = 5, steps: int = 50, seed: int = 0,
           labels: Tensor | None = None, batch: int = 64,
           progress: bool = False) -> DetectResult:
    """The measures of the module docstring for each of ``conditions`` (``(n, *cond_shape)``;
    integer labels or vectors) of a conditional ``model`` whose null condition is ``null``.
    ``labels`` (``(n,)``, 1 for a memorized condition) adds the ROC of each measure."""
    if not getattr(model, "conditional", False):
        raise fail("--model", "a conditional model (its condition and a null one)",
                   getattr(model, "name", type(model).__name__))
    n_noise, steps = positive_int("--n-noise", n_noise), positive_int("--steps", steps)
    first_steps = positive_int("--first-steps", first_steps)
    if first_steps > steps:
        raise fail("--first-steps", f"at most the sampler's {steps} steps", first_steps)
    if labels is not None and (labels.dim() != 1 or labels.shape[0] != conditions.shape[0]
                               or bool(((labels != 0) & (labels != 1)).any())):
        raise fail("--labels", f"{conditions.shape[0]} labels of 0 or 1, one per condition",
                   f"shape {tuple(labels.shape)}")
    model.check_condition(conditions[:2], "--conditions")
    model.check_condition(null[None], "--null-cond")
    times = sampler_times(model, steps)
    sch = model.schedule
    shape = tuple(model.data_shape)
    d = math.prod(shape)
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n_noise, *shape, generator=gen)
    entries = []
    for j in tqdm(range(conditions.shape[0]), disable=not progress, desc="conditions"):
        start = time.perf_counter()
        c = conditions[j : j + 1].expand(n_noise, *conditions.shape[1:])
        nulls = null[None].expand(n_noise, *null.shape)
        x = float(sch.sigma(times[0])) * z.to(torch.float64)
        gaps = []
        for i in range(steps):
            t = times[i].expand(n_noise)
            sigma = expand_as_batch(sch.sigma(t), x)
            d_c = model.denoiser(x, t, c)
            eps_c = (x - expand_as_batch(sch.m(t), x) * d_c) / sigma
            if i < first_steps:
                d_null = model.denoiser(x, t, nulls)
                eps_null = (x - expand_as_batch(sch.m(t), x) * d_null) / sigma
                gaps.append((eps_c - eps_null).flatten(1).norm(dim=1) / math.sqrt(d))
            if i + 1 < steps:
                nxt = times[i + 1].expand(n_noise)
                x = expand_as_batch(sch.m(nxt), x) * d_c + expand_as_batch(sch.sigma(nxt),
                                                                          x) * eps_c
        t = times[-1].expand(n_noise)  # x and d_c are the last step's
        delta = torch.randn(x.shape, generator=gen, dtype=x.dtype)
        delta = delta / delta.flatten(1).norm(dim=1).reshape(-1, *[1] * len(shape)) * (
            0.1 * float(sch.sigma(times[-1])) * math.sqrt(d))
        moved = (model.denoiser(x + delta, t, c) - d_c).flatten(1).norm(
            dim=1) / delta.flatten(1).norm(dim=1)
        sensitivity = float(moved.mean())
        entries.append({"condition": describe(conditions[j], j), "index": j,
                        "score": float(torch.stack(gaps).mean()),
                        "collapse": 1 - sensitivity, "sensitivity": sensitivity,
                        "seconds": time.perf_counter() - start})
    settings = {"n_noise": n_noise, "first_steps": first_steps, "steps": steps, "seed": seed,
                "model": getattr(model, "name", None), "sampler": "DDIM (eta 0) on the "
                "model's schedule", "sigma_last": float(sch.sigma(times[-1]))}
    result = DetectResult(entries, settings)
    if labels is not None:
        for e, lab in zip(entries, labels.tolist(), strict=True):
            e["label"] = int(lab)
        for name in MEASURES:
            result.roc[name] = roc(torch.tensor([e[name] for e in entries]), labels)
    return result
