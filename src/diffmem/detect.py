"""Which conditions, or which samples, does a model memorize? Detection without the training
set.

Everything is computed from the model's denoiser ``D(x, t[, c])`` (any parameterization:
noise, ``v``, sample or score outputs all give it) on its schedule ``x_t = m(t) x_0 +
sigma(t) z``. Noise levels are named by the noise-to-signal ratio ``lambda = sigma / m`` (the
noise of ``u = x / m``), so one level means the same noise on any schedule (linear or
scaled-linear DDPM, cosine, EDM), and the Jacobian ``J = m dD/dx = dD/du`` is dimensionless
(for an exact denoiser ``J = Cov[x_0 | u] / lambda^2``: its trace per dimension is near 1 for
data spread in every direction at that scale, and 0 for one fixed image).

Per condition ``c`` (``null``: the condition meaning "no condition"), over ``K`` seeded noise
draws ``z`` shared by every condition:

* ``wen`` (Wen et al., ICLR 2024): ``|eps(x_T, c) - eps(x_T, null)|_2`` at the first step of
  the model's deterministic sampler, ``x_T = sigma(t_0) z``, in noise units, as its authors
  compute it (it depends on the schedule: on a linear DDPM schedule ``eps ~ x`` there).
* ``sharpness`` (Jeon et al., ICML 2025): ``|H_delta s_delta|^2`` at ``t_0`` with ``s_delta =
  s(x, c) - s(x, null)`` and ``H_delta`` its Jacobian; the Hessian-vector product by a
  central difference along ``s_delta`` (forward-mode derivatives fail through attention on
  the CPU).
* ``anisotropy`` (Asthana et al., ICLR 2026): the norm at ``t_0`` per coordinate plus
  ``gamma`` times the cosine between ``eps(x_T, null)`` and ``eps(x_T, c) - eps(x_T, null)``
  on the same pure noise queried at the sampler's last (lowest) time.
* ``gap``: ``|D(x, c) - D(x, null)| / sqrt(d)`` on pure noise ``x = sigma z`` at each level
  ``lambda``, averaged over levels and draws: the scale-free form of Wen's gap (data units).
* ``collapse`` (the paper's view): ``1 - sum tr J(c) / sum tr J(null)`` over levels and draws,
  traces by Hutchinson's estimator ``v^T (D(x + h v) - D(x - h v)) m / 2h`` with Rademacher
  ``v`` (the same ``v`` for both conditions): near 1 when the conditional denoiser is a
  constant map (one memorized image), near 0 when it varies as the unconditional one does.
* ``consistency`` (Carlini et al., USENIX Security 2023, as a confirmation): full
  generations per condition (DDIM, ``eta = 0``, at :data:`CONFIRM_STEPS` steps; a latent
  model's decoded by its VAE, so pictures are compared), minus the median over them of the
  RMS distance to the nearest other generation (near-duplicate generations: larger).
* ``consistency_ratio``: the median RMS distance between two of those generations divided
  by the same for the null condition's, generated from the same noise (dimensionless; near 1
  when the condition leaves the generations as varied as no condition does, near 0 when they
  all land on one image). The generations are drawn in rounds of 8, 16 then 32
  (:mod:`diffmem.confirm`) until a bootstrap interval for the ratio lies wholly on one side
  of :data:`diffmem.confirm.LINE` (``stopped``: ``below``, ``above`` or ``cap``; the entry
  records the ``generations`` drawn and the ``ratio_interval``); the verdicts of
  :mod:`diffmem.verdicts` read it. Costly, so computed only for the conditions ranked
  highest by the screen: ``confirm`` of them, or by default all of them up to
  :data:`CONFIRM_ALL` distinct conditions and beyond that down the ranking, a tenth of them
  first and then each batch half the one before (at least :data:`WALK_MIN`), until a batch
  holds no memorized condition (:func:`walk_batches`).

Identical conditions (the same label or vector, or a prompt given twice) are screened and
confirmed once; their entries share the result (``same_as``: the first row holding it).

The primary measure (``PRIMARY``) was chosen on the benchmark of the ``detect-digits``
experiment (``docs/detect.md`` has the numbers).

Per sample ``x_0`` of an unconditional model (given, or drawn by the model):

* ``jacobian``: ``1 - tr J / d`` at ``x = m x_0 + sigma z`` (level ``lambda``, ``K`` draws):
  a memorized sample sits where the denoiser is a constant map.
* ``flipd`` (FLIPD, Kamkari et al., 2024, as Ross et al., ICLR 2025 use it): the local
  intrinsic dimension ``LID = tr J + |D(m x_0) - x_0|^2 / lambda^2`` at the clean point
  ``x = m x_0`` (``d + sigma^2 [tr grad s + |s|^2]`` in the denoiser's terms), reported as
  ``1 - LID / d``.
* ``reconstruction``: ``-|D(m x_0 + sigma z) - x_0| / sqrt(d)``: a memorized sample comes
  back from noise that hides a generalized one.
* ``spectral`` (geometric memorization, Achilli et al., 2024): ``1 - k / d`` with ``k`` the
  dimensions the model's score keeps at the clean point ``m x_0``: the directions of the
  spectrum of its Jacobian (central differences along ``min(d, SPECTRAL_PROBES)`` random
  orthonormal probes, :func:`diffmem.geometry.probed_jacobian`) that pull back at less than
  half the rate of pure noise (:func:`diffmem.geometry.absolute_dimension`), scaled to
  ``d``; the
  entry keeps ``spectral_dim`` (``k``) and the ``spectrum`` times ``sigma^2``. A copy is a
  point: ``k = 0``.

With ``labels`` (1: memorized) each measure's ROC curve, AUC and TPR at 1% FPR. Every measure
is oriented so that larger means more likely memorized.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffmem._checks import fail, positive_int
from diffmem.conditions import describe
from diffmem.parallel import SOLO, Team
from diffmem.schedules import Schedule, expand_as_batch

MEASURES = ("wen", "sharpness", "anisotropy", "gap", "collapse", "consistency")
SAMPLE_MEASURES = ("jacobian", "flipd", "reconstruction", "spectral")
#: What ``diffmem detect`` computes per condition by default: the primary screen, the gap
#: from the same calls, and the confirmation behind the verdicts (``wen``, ``sharpness`` and
#: ``anisotropy`` on request: see docs/detect.md for their benchmark figures).
DEFAULT_MEASURES = ("gap", "collapse", "consistency")
#: The primary measure per condition and per sample (see docs/detect.md for the benchmark).
PRIMARY = "collapse"
SAMPLE_PRIMARY = "flipd"
#: Default noise-to-signal levels ``lambda = sigma / m`` of the scale-free measures.
LEVELS = (0.25,)
SAMPLE_LEVEL = 0.3
#: Estimated local intrinsic dimension below which a sample is a point of the model (0
#: dimensions, to rounding): the per-sample verdict without a reference set is ``flipd > 1 -
#: LID_POINT / d`` (measured on ``detect-digits``, see docs/detect.md).
LID_POINT = 0.5
#: Fraction of the distinct conditions in the walk's first batch beyond :data:`CONFIRM_ALL`
#: (then each batch half the one before, until one holds no memorized condition).
CONFIRM = 0.1
#: Up to this many distinct conditions, all are confirmed by default (the verdict does not
#: hang on the screen's ranking: on a small text model the screen ranked the memorized
#: prompts last).
CONFIRM_ALL = 64
#: The smallest batch of the walk down the ranking beyond :data:`CONFIRM_ALL`.
WALK_MIN = 10
#: DDIM steps of the confirmation generations by default: the fewest whose consistency
#: ratios agree with 50 steps' (docs/detect.md).
CONFIRM_STEPS = 10
#: Probe directions of the ``spectral`` sample measure (all of them up to this many).
SPECTRAL_PROBES = 32
#: Weight of the cosine in ``anisotropy`` (Asthana et al. use 0.1 to 2 by model).
GAMMA = 1.0
#: Central-difference step, relative to the noise ``sigma`` (Jacobian) or to ``sigma
#: sqrt(d)`` (Hessian-vector product).
STEP = 1e-2
UNITS = {
    "wen": "noise units: |eps(c) - eps(null)|_2 at the first sampler step",
    "sharpness": "score units squared: |H_delta s_delta|^2 at the first sampler step",
    "anisotropy": "noise units per coordinate + gamma x cosine (dimensionless)",
    "gap": "data units: RMS per coordinate of D(c) - D(null) on pure noise",
    "collapse": "dimensionless: 1 - tr J(c) / tr J(null)",
    "consistency": "data units (a latent model's: its decoded images'): minus the median RMS "
                   "distance to the nearest other generation",
    "jacobian": "dimensionless: 1 - tr J / d",
    "flipd": "dimensionless: 1 - LID / d",
    "reconstruction": "data units: minus the RMS of D(m x0 + sigma z) - x0",
    "spectral": "dimensionless: 1 - k / d, k the dimensions the score keeps at the clean "
                "point (directions pulling back at less than half the rate of pure noise)",
}


@dataclass
class DetectResult:
    """Per condition (or per sample, ``kind='samples'``, in the order given): its measures;
    with labels, each measure's ROC."""

    entries: list[dict[str, Any]]
    settings: dict[str, Any]
    kind: str = "conditions"
    primary: str = PRIMARY
    roc: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The verdict rule and its figures (:func:`diffmem.verdicts.judge`).
    verdict: dict[str, Any] | None = None
    #: How many of the entries each process screened (one number per process).
    per_process: list[int] | None = None

    @property
    def conditions(self) -> list[dict[str, Any]]:
        return self.entries

    @property
    def measures(self) -> list[str]:
        names = MEASURES if self.kind == "conditions" else SAMPLE_MEASURES
        return [n for n in names if any(e.get(n) is not None for e in self.entries)]

    def ranking(self) -> list[dict[str, Any]]:
        """The entries by decreasing primary measure."""
        return sorted(self.entries, key=lambda e: -_value(e.get(self.primary)))

    def to_json(self) -> dict[str, Any]:
        from diffmem.io import versions

        return {self.kind: self.entries, "settings": self.settings,
                "units": {n: UNITS[n] for n in self.measures}, "primary": self.primary,
                "roc": self.roc or None, "verdict": self.verdict, "versions": versions(),
                f"{self.kind}_per_process": self.per_process}


def _value(v: float | None) -> float:
    return -math.inf if v is None else v


def sampler_times(model: Any, steps: int) -> Tensor:
    """The deterministic sampler's times, from the top down: a diffusers model's DDIM
    timesteps (``t = (k + 1) / K``) or, for a flow-matching model, its own scheduler's
    (``t = sigma = timestep / K``, at most ``T``), else log-spaced in ``sigma`` over three
    decades."""
    sch = model.schedule
    network = getattr(model, "network", None)
    if network is not None:
        from diffmem.models import is_flow_scheduler
        from diffmem.pipeline import make_scheduler, sampling_grid

        config = network["scheduler_config"]
        if is_flow_scheduler(config):
            timesteps = make_scheduler(config, None, steps, **sampling_grid(network))
            return (timesteps.timesteps.to(torch.float64) / sch.K).clamp(max=sch.T)
        timesteps = make_scheduler(config, "DDIMScheduler", steps).timesteps
        return (timesteps.to(torch.float64) + 1) / sch.K
    top = float(sch.sigma(sch.T))
    sigmas = torch.logspace(math.log10(top), math.log10(top * 1e-3), steps,
                            dtype=torch.float64)
    return sch.t_of_s(-torch.log(sigmas))


def time_at_level(schedule: Schedule, level: float) -> float:
    """The time ``t`` at which ``sigma(t) / m(t) = level``
    (:meth:`~diffmem.schedules.Schedule.t_of_ratio`), clipped to the schedule's ``[0, T]``."""
    return float(schedule.t_of_ratio(float(level)).clamp(max=schedule.T))


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


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(v: Sequence[float]) -> Tensor:
        x = torch.tensor(list(v), dtype=torch.float64)
        return (x[:, None] > x[None, :]).sum(1) + 0.5 * ((x[:, None] == x[None, :]).sum(1) - 1)

    ra, rb = ranks(a).to(torch.float64), ranks(b).to(torch.float64)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else 0.0


def _rows(v: Tensor) -> Tensor:
    """Per-row Euclidean norm of a batch."""
    return v.flatten(1).norm(dim=1)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a.flatten(1) * b.flatten(1)).sum(1)


class _Probe:
    """The model's denoiser at one time on a batch of rows, with the schedule's ``m`` and
    ``sigma`` there: ``D = E[x_0 | x] = (x + sigma^2 s) / m`` (Tweedie; the model's
    ``denoiser`` is ``x + sigma^2 s = m E[x_0 | x]``), ``eps = (x - m D) / sigma``, ``s = (m D
    - x) / sigma^2`` and Hutchinson's ``v^T J v`` by central differences."""

    def __init__(self, model: Any, t: float, rows: int) -> None:
        self.model = model
        self.t = torch.full((rows,), t, dtype=torch.float64)
        sch = model.schedule
        self.m = float(sch.m(self.t[:1]))
        self.sigma = float(sch.sigma(self.t[:1]))

    def D(self, x: Tensor, y: Tensor | None) -> Tensor:  # noqa: N802
        return self.model.denoiser(x, self.t[: x.shape[0]], y) / self.m

    def D_pair(self, x: Tensor, c: Tensor, null: Tensor) -> tuple[Tensor, Tensor]:  # noqa: N802
        both = self.D(torch.cat([x, x]), torch.cat([c, null]))
        return both[: x.shape[0]], both[x.shape[0]:]

    def eps(self, x: Tensor, d: Tensor) -> Tensor:
        return (x - self.m * d) / self.sigma

    def vjv(self, x: Tensor, v: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        """``v^T J v`` per row, ``J = m dD/dx``, by a central difference with step ``h = STEP
        sigma``, and ``D(x)`` itself to second order, ``(D(x + h v) + D(x - h v)) / 2``."""
        h = STEP * self.sigma
        both = self.D(torch.cat([x + h * v, x - h * v]),
                      None if y is None else torch.cat([y, y]))
        plus, minus = both[: x.shape[0]], both[x.shape[0]:]
        return self.m * _dot(v, plus - minus) / (2 * h), 0.5 * (plus + minus)


def _rademacher(shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    return torch.randint(0, 2, shape, generator=gen).to(torch.float64) * 2 - 1


def ddim(model: Any, x: Tensor, times: Tensor, y: Tensor | None = None) -> Tensor:
    """The deterministic DDIM sampler on the model's schedule: ``x_{i+1} = m_{i+1} D_i +
    sigma_{i+1} eps_i`` through ``times``; returns the last denoised ``D`` (the sample)."""
    d = x
    for i in range(times.shape[0]):
        probe = _Probe(model, float(times[i]), x.shape[0])
        d = probe.D(x, y)
        if i + 1 < times.shape[0]:
            nxt = _Probe(model, float(times[i + 1]), x.shape[0])
            x = nxt.m * d + nxt.sigma * probe.eps(x, d)
    return d


def _images(model: Any, gens: Tensor, batch: int = 16) -> Tensor:
    """Generations as the images they stand for, flattened ``(n, d)``: a latent model's
    decoded by its VAE (``model.network['decode']``, ``batch`` at a time), so that
    consistency compares pictures as Carlini et al. do, not latents a lossy decoder maps to
    the same picture; other models' as drawn."""
    network = getattr(model, "network", None)
    decode = None if network is None else network.get("decode")
    if decode is not None:
        lat = gens.reshape(-1, *model.data_shape)
        gens = torch.cat([decode(lat[i:i + batch]).to(gens) for i in range(0, len(lat), batch)])
    return gens.reshape(gens.shape[0], -1)


def _check_measures(measures: Sequence[str], allowed: Sequence[str]) -> list[str]:
    names = list(measures)
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise fail("--measures", f"names among {', '.join(allowed)}", ", ".join(bad) or "none")
    return names


def _check_levels(levels: Sequence[float]) -> list[float]:
    out = [float(v) for v in levels]
    if not out or not all(math.isfinite(v) and v > 0 for v in out):
        raise fail("--levels", "positive noise-to-signal ratios sigma/m", list(levels))
    return out


def _check_labels(labels: Tensor | None, n: int, what: str) -> None:
    """One label per entry: 1 memorized, 0 not (-1: unlabelled, left out of the ROC)."""
    if labels is not None and (labels.dim() != 1 or labels.shape[0] != n
                               or bool(((labels != 0) & (labels != 1) & (labels != -1)).any())):
        raise fail("--labels", f"{n} labels of 0 or 1, one per {what}",
                   f"shape {tuple(labels.shape)}")


def _add_roc(result: DetectResult, labels: Tensor | None) -> DetectResult:
    if labels is None:
        return result
    for e, lab in zip(result.entries, labels.tolist(), strict=True):
        if lab in (0, 1):
            e["label"] = int(lab)
    for name in result.measures:
        keep = [i for i, e in enumerate(result.entries) if e.get(name) is not None
                and e.get("label") is not None]
        values = torch.tensor([result.entries[i][name] for i in keep])
        marks = labels[keep]
        if 0 < int(marks.sum()) < len(keep):
            result.roc[name] = roc(values, marks)
    return result


def _in_chunks(team: Team, fn: Any, entries: list[dict[str, Any]], chunk: int,
               progress: bool, desc: str) -> list[int]:
    """``fn(lo)`` (measure name -> one value per entry from ``lo``) over the chunks of
    ``entries``, split over ``team``'s processes; the values written into the entries.
    Returns how many entries each process measured."""
    n = len(entries)
    starts = list(range(0, n, chunk))
    found, per_process = team.map(fn, starts, progress=progress, desc=desc,
                                  weight=lambda lo: min(chunk, n - lo))
    assert found is not None
    for lo, values in zip(starts, found, strict=True):
        for name, column in values.items():
            for i, value in enumerate(column):
                entries[lo + i][name] = value
    return per_process


@dataclass
class _Screen:
    """What the screen of :func:`detect` evaluates, fixed once: the model, the seeded noise
    ``z`` and Rademacher probes, and the probes at the sampler's first and last times and
    at each level."""

    model: Any
    names: list[str]
    z: Tensor
    probes: Tensor
    top: _Probe
    low: _Probe
    at: list[_Probe]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.model.data_shape)

    def first_step(self, x: Tensor, c: Tensor, nul: Tensor) -> dict[str, Tensor]:
        """``wen``, ``sharpness`` and ``anisotropy`` (those asked for) at pure noise ``x``."""
        top, low, names = self.top, self.low, self.names
        d = math.prod(self.shape)
        dc, dn = top.D_pair(x, c, nul)
        found = {"wen": _rows(top.eps(x, dc) - top.eps(x, dn))}
        if "sharpness" in names:
            s_delta = top.m * (dc - dn) / top.sigma ** 2
            h = expand_as_batch(STEP * top.sigma * math.sqrt(d) / _rows(s_delta).clamp_min(
                1e-30), x)
            pc, pn = top.D_pair(x + h * s_delta, c, nul)
            mc, mn = top.D_pair(x - h * s_delta, c, nul)
            hvp = top.m * ((pc - pn) - (mc - mn)) / top.sigma ** 2 / (2 * h)
            found["sharpness"] = _rows(hvp) ** 2
        if "anisotropy" in names:
            lc, ln = low.D_pair(x, c, nul)
            e_null = low.eps(x, ln)
            guide = low.eps(x, lc) - e_null
            cos = _dot(e_null, guide) / (_rows(e_null) * _rows(guide)).clamp_min(1e-30)
            found["anisotropy"] = found["wen"] / math.sqrt(d) + GAMMA * cos
        return found

    def levels(self, zz: Tensor, c: Tensor, nul: Tensor, k: int) -> dict[str, Tensor]:
        """``gap`` and the traces behind ``collapse`` at each level, on noise ``zz``."""
        gaps, tr_c, tr_n = [], [], []
        d = math.prod(self.shape)
        for j, probe in enumerate(self.at):
            x = probe.sigma * zz
            if "collapse" in self.names:  # the gap from the same calls, D(x) to O(h^2)
                v = self.probes[j].repeat(k, *[1] * len(self.shape))
                tr, mid = probe.vjv(torch.cat([x, x]), torch.cat([v, v]), torch.cat([c, nul]))
                tr_c.append(tr[: x.shape[0]])
                tr_n.append(tr[x.shape[0]:])
                dc, dn = mid[: x.shape[0]], mid[x.shape[0]:]
            else:
                dc, dn = probe.D_pair(x, c, nul)
            gaps.append(_rows(dc - dn) / math.sqrt(d))
        found = {"gap": torch.stack(gaps).mean(0)}
        if tr_c:
            found["trace_c"] = torch.stack(tr_c).sum(0) / (len(self.at) * d)
            found["trace_null"] = torch.stack(tr_n).sum(0) / (len(self.at) * d)
        return found

    def __call__(self, table: Tensor, null: Tensor, lo: int, chunk: int) -> dict[str, list[float]]:
        """The screen's measures of conditions ``lo`` to ``lo + chunk`` of ``table``, each the
        mean over the noise draws."""
        n_noise = self.z.shape[0]
        idx = torch.arange(lo, min(table.shape[0], lo + chunk))
        k = idx.numel()
        c = table[idx].repeat_interleave(n_noise, 0)
        nul = null[None].expand(c.shape[0], *null.shape)
        zz = self.z.repeat(k, *[1] * len(self.shape))
        found: dict[str, Tensor] = {}
        if {"wen", "sharpness", "anisotropy"} & set(self.names):
            found |= self.first_step(self.top.sigma * zz, c, nul)
        if {"gap", "collapse"} & set(self.names):
            found |= self.levels(zz, c, nul, k)
        return {name: value.reshape(k, n_noise).mean(1).tolist()
                for name, value in found.items() if name in self.names or
                name.startswith("trace")}


def _distinct(conditions: Tensor, keys: Sequence[Any] | None) -> tuple[list[int], list[int]]:
    """The first row of each distinct condition (by ``keys``, one per row, when given: a
    prompt's text; else by value) and, for every row, the position of its own among them."""
    if keys is not None and len(keys) != conditions.shape[0]:
        raise fail("keys", f"one key per condition ({conditions.shape[0]})", len(keys))
    flat = conditions.reshape(conditions.shape[0], -1)
    seen: dict[Any, int] = {}
    firsts: list[int] = []
    which: list[int] = []
    for j in range(conditions.shape[0]):
        key = keys[j] if keys is not None else (str(flat[j].dtype), flat[j].numpy().tobytes())
        if key not in seen:
            seen[key] = len(firsts)
            firsts.append(j)
        which.append(seen[key])
    return firsts, which


def _generate(generator: Any, model: Any, cond: Tensor, z: Tensor, times: Tensor,
              batch: int) -> Tensor:
    """DDIM generations of ``generator`` from ``sigma(t_0) z`` under ``cond`` (one row
    each), ``batch`` rows at a time, as the images they stand for (:func:`_images`)."""
    sigma0 = float(model.schedule.sigma(times[:1]))
    out = [_images(model, ddim(generator, sigma0 * z[i:i + batch], times, cond[i:i + batch]))
           for i in range(0, z.shape[0], batch)]
    return torch.cat(out)


@dataclass
class _Confirmation:
    """How :func:`detect` confirms: the generating model (guided as the pipeline samples),
    the sampler's times, the shared noise, the sequential rule's settings and where its
    finished batches are kept (``store``: resumable)."""

    generator: Any
    model: Any
    times: Tensor
    z: Tensor
    null: Tensor
    batch: int
    line: float
    alpha: float
    first: int
    seed: int
    store: Any = None

    def null_distances(self) -> Tensor:
        """The null condition's distances between its ``cap`` generations."""
        from diffmem.confirm import distances

        cap = self.z.shape[0]
        cond = self.null[None].expand(cap, *self.null.shape)
        return distances(_generate(self.generator, self.model, cond, self.z, self.times,
                                   self.batch))

    def run(self, table: Tensor, ids: list[int], d_null: Tensor) -> dict[int, dict[str, Any]]:
        """:func:`diffmem.confirm.confirm` of the distinct conditions ``ids``."""
        from diffmem.confirm import confirm

        def draw(which: list[int], lo: int, hi: int) -> Tensor:
            cond = table[torch.tensor(which)].repeat_interleave(hi - lo, 0)
            zz = self.z[lo:hi].repeat(len(which), *[1] * (self.z.dim() - 1))
            return _generate(self.generator, self.model, cond, zz, self.times, self.batch)

        found = confirm(draw, ids, d_null, first=self.first, cap=self.z.shape[0],
                        line=self.line, alpha=self.alpha, seed=self.seed)
        return {j: o.as_entry() for j, o in found.items()}


def walk_batches(n: int, limit: int, width: int, walk: bool) -> list[tuple[int, int]]:
    """The confirmation's batches ``(lo, hi)`` down the ranking: ``width`` conditions each,
    up to ``limit``; with ``walk``, a tenth of the ``n`` conditions first, then each batch
    half the one before, at least :data:`WALK_MIN` (the confirmation spends where the screen
    ranks high)."""
    out, lo = [], 0
    size = max(WALK_MIN, math.ceil(CONFIRM * n)) if walk else width
    while lo < limit:
        out.append((lo, min(limit, lo + size)))
        lo += size
        if walk:
            size = max(WALK_MIN, size // 2)
    return out


def _confirm_all(conf: _Confirmation, table: Tensor, order: list[int],
                 batches: list[tuple[int, int]], walk: bool, team: Team,
                 progress: bool) -> tuple[dict[int, dict[str, Any]], float]:
    """Confirm the distinct conditions in ``order`` (the screen's ranking) batch by batch,
    the batches split over ``team``'s processes; with ``walk``, until a batch holds no
    memorized condition. Batches a killed run finished are read from ``conf.store``.
    Returns the outcomes by condition and the null's spread."""
    from diffmem.confirm import pair_median

    store = conf.store
    d_null = team.broadcast(store.null() if store is not None and team.leader else None)
    if d_null is None:
        d_null = conf.null_distances()
        if store is not None and team.leader:
            store.save_null(d_null)
    done: dict[int, dict[str, Any]] = {}
    bar = tqdm(total=batches[-1][1] if batches else 0,
               disable=not (progress and team.leader), desc="confirming")
    for k in range(0, len(batches), team.size):
        group = batches[k:k + team.size]
        saved = team.broadcast({lo: store.batch(lo, order[lo:hi]) for lo, hi in group}
                               if store is not None and team.leader
                               else {lo: None for lo, _ in group})
        todo = [(lo, hi) for lo, hi in group if saved[lo] is None]
        found, _ = team.map(lambda b: conf.run(table, order[b[0]:b[1]], d_null), todo)
        assert found is not None
        fresh = {lo: f for (lo, _), f in zip(todo, found, strict=True)}
        for lo, _ in group:
            batch = saved[lo] if saved[lo] is not None else fresh[lo]
            if store is not None and team.leader and saved[lo] is None:
                store.save_batch(lo, batch)
            done |= batch
            bar.update(len(batch))
            if walk and not any(o["stopped"] == "below" for o in batch.values()):
                bar.close()  # a whole batch down the ranking confirmed nothing: stop
                return done, pair_median(d_null)
    bar.close()
    return done, pair_median(d_null)


class ConfirmStore:
    """A folder keeping the confirmation's finished batches (``batch_LO.json``: each
    condition's outcome) and the null's distances (``null.json``), under ``key.json``: a
    rerun with the same key reads them instead of drawing again; another key empties it."""

    def __init__(self, folder: Any, key: dict[str, Any]) -> None:
        import json
        from pathlib import Path

        from diffmem.io import atomic_write_json, jsonable

        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        mark = self.folder / "key.json"
        key = json.loads(json.dumps(jsonable(key)))
        if not mark.is_file() or json.loads(mark.read_text()) != key:
            for old in self.folder.glob("*.json"):
                old.unlink()
            atomic_write_json(mark, key)

    def _read(self, name: str) -> Any:
        import json

        path = self.folder / name
        try:
            return json.loads(path.read_text()) if path.is_file() else None
        except ValueError:
            return None

    def null(self) -> Tensor | None:
        found = self._read("null.json")
        return None if found is None else torch.tensor(found, dtype=torch.float64)

    def save_null(self, d: Tensor) -> None:
        from diffmem.io import atomic_write_json

        atomic_write_json(self.folder / "null.json", d.tolist())

    def batch(self, lo: int, ids: list[int]) -> dict[int, dict[str, Any]] | None:
        """The batch at rank ``lo`` when it was kept for exactly the conditions ``ids``."""
        found = self._read(f"batch_{lo:07d}.json")
        if found is None or sorted(int(j) for j in found) != sorted(ids):
            return None
        return {int(j): v for j, v in found.items()}

    def save_batch(self, lo: int, batch: dict[int, dict[str, Any]]) -> None:
        from diffmem.io import atomic_write_json

        atomic_write_json(self.folder / f"batch_{lo:07d}.json",
                          {str(j): v for j, v in batch.items()})


def detect(model: Any, conditions: Tensor, null: Tensor, *, n_noise: int = 4,
           steps: int = 50, levels: Sequence[float] = LEVELS,
           measures: Sequence[str] = DEFAULT_MEASURES,
           confirm: int | None = None, seed: int = 0, labels: Tensor | None = None,
           chunk: int = 64, guidance: float | None = None, generations: int | None = None,
           confirm_steps: int | None = None, alpha: float | None = None,
           line: float | None = None, keys: Sequence[Any] | None = None, store: Any = None,
           progress: bool = False, team: Team | None = None) -> DetectResult:
    """The measures of the module docstring for each of ``conditions`` (``(n,
    *cond_shape)``; integer labels or vectors) of a conditional ``model`` whose null
    condition is ``null``. Identical conditions (equal rows, or equal ``keys``: a prompt's
    text) are measured once and share the result (``same_as``: the first row holding
    them). The screen evaluates ``chunk`` distinct conditions at a time, all ``n_noise``
    draws in one batch, at the first time of a ``steps``-step sampler. The confirmation
    (:mod:`diffmem.confirm`) generates by DDIM at ``confirm_steps`` steps (default
    :data:`CONFIRM_STEPS`) in rounds of 8, 16 then 32 generations (``generations``: the cap)
    until each condition's verdict is settled at error ``alpha`` against ``line``; it
    covers the ``confirm`` distinct conditions the screen ranks highest, or by default all
    of them up to :data:`CONFIRM_ALL` and beyond that the walk of :func:`walk_batches` down
    the ranking until a batch holds no memorized condition. ``labels`` (``(n,)``, 1
    memorized) add each measure's ROC; ``guidance`` (a text pipeline's weight) guides the
    generations against ``null`` as the pipeline does. ``store`` (a folder) keeps the
    finished confirmation batches so that a rerun after a kill draws only the rest. With a
    :class:`diffmem.parallel.Team` the screen's chunks and the confirmation's batches are
    split over its processes, with the numbers of one process."""
    team = team or SOLO
    rule = _Rule.checked(model, measures, n_noise, steps, confirm_steps, generations, alpha,
                         line, levels)
    _check_labels(labels, conditions.shape[0], "condition")
    model.check_condition(conditions[:2], "--conditions")
    model.check_condition(null[None], "--null-cond")
    firsts, which = _distinct(conditions, keys)
    table = conditions[torch.tensor(firsts)]
    times = sampler_times(model, rule.steps)
    gen = torch.Generator().manual_seed(seed)
    shape = tuple(model.data_shape)
    z = torch.randn(rule.n_noise, *shape, generator=gen, dtype=torch.float64)
    probes = _rademacher((len(rule.levels), rule.n_noise, *shape), gen)
    z_gen = torch.randn(rule.cap, *shape, generator=gen, dtype=torch.float64)
    start = time.perf_counter()
    found, per_process = _screen_all(model, table, null, rule, z, probes, times, chunk, team,
                                     progress)
    screen_s = time.perf_counter() - start
    confirmed: dict[int, dict[str, Any]] = {}
    null_spread = None
    limit = len(firsts) if confirm is None else min(len(firsts), max(0, int(confirm)))
    if "consistency" in rule.names and limit > 0:
        conf = _Confirmation(model if guidance is None else _guided(model, guidance, null),
                             model, sampler_times(model, rule.confirm_steps), z_gen, null,
                             max(1, chunk * rule.n_noise), rule.line, rule.alpha, rule.first,
                             seed, None if store is None or not team.leader else ConfirmStore(
                                 store, rule.key(model, seed, guidance, table, null)))
        walk = confirm is None and len(firsts) > CONFIRM_ALL
        batches = walk_batches(len(firsts), limit, max(1, chunk * rule.n_noise // rule.first),
                               walk)
        confirmed, null_spread = _confirm_all(conf, table, _order(found, rule), batches, walk,
                                              team, progress)
        for j, outcome in confirmed.items():
            found[j] |= outcome
    total = time.perf_counter() - start
    settings = rule.settings() | {
        "confirm": len(confirmed), "distinct": len(firsts), "null_spread": null_spread,
        "seed": seed, "model": getattr(model, "name", None), "t_first": float(times[0]),
        "generation_guidance": guidance, "t_last": float(times[-1]),
        "screen_seconds": screen_s, "seconds": total,
        "generations_drawn": sum(o["generations"] for o in confirmed.values())}
    primary = PRIMARY if PRIMARY in rule.names else next(m for m in MEASURES
                                                         if m in rule.names)
    return _add_roc(DetectResult(_spread_to_rows(conditions, firsts, which, found, total),
                                 settings, "conditions", primary, per_process=per_process),
                    labels)


@dataclass
class _Rule:
    """:func:`detect`'s settings, checked (each error names its option)."""

    names: list[str]
    n_noise: int
    steps: int
    confirm_steps: int
    cap: int
    first: int
    alpha: float
    line: float
    levels: list[float]

    @classmethod
    def checked(cls, model: Any, measures: Sequence[str], n_noise: int, steps: int,
                confirm_steps: int | None, generations: int | None, alpha: float | None,
                line: float | None, levels: Sequence[float]) -> _Rule:
        from diffmem import confirm as cf

        if not getattr(model, "conditional", False):
            raise fail("--model", "a conditional model (its condition and a null one)",
                       getattr(model, "name", type(model).__name__))
        names = _check_measures(measures, MEASURES)
        n_noise, steps = positive_int("--n-noise", n_noise), positive_int("--steps", steps)
        c_steps = positive_int("--confirm-steps", CONFIRM_STEPS if confirm_steps is None
                               else confirm_steps)
        cap = cf.CAP if generations is None else positive_int("--generations", generations)
        cf.looks(cf.FIRST, cap)
        return cls(names, n_noise, steps, c_steps, cap, cf.FIRST,
                   cf.check_alpha(cf.ALPHA if alpha is None else alpha),
                   cf.LINE if line is None else float(line), _check_levels(levels))

    def key(self, model: Any, seed: int, guidance: float | None, table: Tensor,
            null: Tensor) -> dict[str, Any]:
        """What the kept confirmation batches must have been drawn with."""
        return {"model": getattr(model, "name", None), "seed": seed, "cap": self.cap,
                "first": self.first, "alpha": self.alpha, "line": self.line,
                "steps": self.confirm_steps, "guidance": guidance, "n": table.shape[0],
                "conditions": _digest(table), "null": _digest(null)}

    def settings(self) -> dict[str, Any]:
        """The settings ``detect.json`` records."""
        return {"n_noise": self.n_noise, "generations": self.cap, "first_round": self.first,
                "steps": self.steps, "confirm_steps": self.confirm_steps,
                "levels": self.levels, "measures": self.names, "line": self.line,
                "alpha": self.alpha, "sampler": "DDIM (eta 0) on the model's schedule",
                "gamma": GAMMA}


def _screen_all(model: Any, table: Tensor, null: Tensor, rule: _Rule, z: Tensor,
                probes: Tensor, times: Tensor, chunk: int, team: Team,
                progress: bool) -> tuple[list[dict[str, Any]], list[int]]:
    """The screen's measures of every distinct condition (``collapse`` from its traces),
    ``chunk`` at a time split over ``team``'s processes; how many each process screened."""
    n = table.shape[0]
    found: list[dict[str, Any]] = [{} for _ in range(n)]
    names = [m for m in rule.names if m != "consistency"]
    if not names:
        return found, [n] + [0] * (team.size - 1)
    screen = _Screen(model, names, z, probes, _Probe(model, float(times[0]), 1),
                     _Probe(model, float(times[-1]), 1),
                     [_Probe(model, time_at_level(model.schedule, v), 1) for v in rule.levels])
    per_process = _in_chunks(team, lambda lo: screen(table, null, lo, chunk), found, chunk,
                             progress, "conditions")
    _collapse(found)
    return found, per_process


def _order(found: list[dict[str, Any]], rule: _Rule) -> list[int]:
    """The distinct conditions by decreasing screen measure (the primary when computed;
    their order when nothing was screened)."""
    key = next((m for m in (PRIMARY, "collapse", "gap", "anisotropy", "wen", "sharpness")
                if m in rule.names), None)
    return sorted(range(len(found)), key=lambda j: -_value(found[j].get(key))) if key \
        else list(range(len(found)))


def _guided(model: Any, guidance: float, null: Tensor) -> Any:
    """A copy of ``model`` guided by ``guidance`` against ``null``, as a pipeline samples."""
    import copy

    return copy.copy(model).guided(guidance, null)


def _digest(t: Tensor) -> str:
    """A short digest of a tensor's dtype, shape and bytes."""
    import hashlib

    c = t.detach().cpu().contiguous()
    return hashlib.blake2b(f"{c.dtype}{tuple(c.shape)}".encode() + c.numpy().tobytes(),
                           digest_size=12).hexdigest()


def _collapse(found: list[dict[str, Any]]) -> None:
    """``collapse = 1 - trace_c / trace_null`` from the screen's traces, in place."""
    for e in found:
        if "trace_c" in e:
            e["collapse"] = 1 - e["trace_c"] / e["trace_null"] if e["trace_null"] > 0 \
                else None


def _spread_to_rows(conditions: Tensor, firsts: list[int], which: list[int],
                    found: list[dict[str, Any]], total: float) -> list[dict[str, Any]]:
    """One entry per row of ``conditions``: its distinct condition's measures, and
    ``same_as`` (the first row holding it) for a repeat."""
    entries = []
    for j in range(conditions.shape[0]):
        first = firsts[which[j]]
        entry = {"condition": describe(conditions[j], j), "index": j,
                 **found[which[j]], "seconds": total / max(1, conditions.shape[0])}
        if first != j:
            entry["same_as"] = first
        entries.append(entry)
    return entries


def detect_samples(model: Any, samples: Tensor, *, n_noise: int = 4,
                   level: float = SAMPLE_LEVEL,
                   measures: Sequence[str] = SAMPLE_MEASURES, seed: int = 0,
                   labels: Tensor | None = None, chunk: int = 128,
                   progress: bool = False, team: Team | None = None) -> DetectResult:
    """Per-sample measures of the module docstring for ``samples`` (``(n, *data_shape)``)
    of an unconditional ``model``: which of them are copies, from the model alone; the
    chunks split over ``team``'s processes."""
    if getattr(model, "conditional", False):
        raise fail("--model", "an unconditional model for per-sample detection (a "
                   "conditional one takes --conditions)", getattr(model, "name", "model"))
    names = _check_measures(measures, SAMPLE_MEASURES)
    n_noise = positive_int("--n-noise", n_noise)
    (level,) = _check_levels([level])
    shape = tuple(model.data_shape)
    if samples.dim() < 2 or tuple(samples.shape[1:]) != shape:
        raise fail("--samples", f"samples of the model's shape (n, {', '.join(map(str, shape))})",
                   f"shape {tuple(samples.shape)}")
    if not bool(torch.isfinite(samples).all()):
        raise fail("--samples", "finite values", "NaN or inf")
    _check_labels(labels, samples.shape[0], "sample")
    d = math.prod(shape)
    gen = torch.Generator().manual_seed(seed)
    n = samples.shape[0]
    x0_all = samples.to(torch.float64)
    z = torch.randn(n, n_noise, *shape, generator=gen, dtype=torch.float64)
    v = _rademacher((n, n_noise, *shape), gen)
    probe = _Probe(model, time_at_level(model.schedule, level), 1)
    entries: list[dict[str, Any]] = [{"index": j} for j in range(n)]
    start = time.perf_counter()

    def measure(lo: int) -> dict[str, list[float]]:
        """The measures of samples ``lo`` to ``lo + chunk``."""
        hi = min(n, lo + chunk)
        x0 = x0_all[lo:hi].repeat_interleave(n_noise, 0)
        zz, vv = z[lo:hi].flatten(0, 1), v[lo:hi].flatten(0, 1)
        found: dict[str, Tensor] = {}
        x = probe.m * x0 + probe.sigma * zz
        if {"jacobian", "reconstruction"} & set(names):
            tr, mid = probe.vjv(x, vv, None)
            found["jacobian"] = 1 - tr / d
            found["reconstruction"] = -_rows(mid - x0) / math.sqrt(d)
        if "flipd" in names:
            xc = probe.m * x0
            tr, mid = probe.vjv(xc, vv, None)
            found["flipd"] = 1 - (tr + _rows(mid - x0) ** 2 / level ** 2) / d
        out = {name: found[name].reshape(hi - lo, n_noise).mean(1).tolist()
               for name in names if name != "spectral"}
        if "spectral" in names:
            out |= _spectral(model, probe, x0_all[lo:hi], seed)
        return out

    per_process = _in_chunks(team or SOLO, measure, entries, chunk, progress, "samples")
    total = time.perf_counter() - start
    settings = {"n_noise": n_noise, "level": level, "dim": d,
                "measures": names, "seed": seed, "model": getattr(model, "name", None),
                "seconds": total}
    primary = SAMPLE_PRIMARY if SAMPLE_PRIMARY in names else names[0]
    return _add_roc(DetectResult(entries, settings, "samples", primary,
                                 per_process=per_process), labels)


def _spectral(model: Any, probe: _Probe, x0: Tensor, seed: int) -> dict[str, list[Any]]:
    """Per sample: the dimensions the model's score keeps at the clean point ``m x0``
    (:func:`diffmem.geometry.absolute_dimension` on the spectrum of the probed Jacobian,
    ``min(d, SPECTRAL_PROBES)`` directions, scaled to ``d``) as ``1 - k/d``, and the
    spectrum itself times ``sigma^2`` (for the page)."""
    from diffmem import geometry

    d = math.prod(x0.shape[1:])
    k = min(d, SPECTRAL_PROBES)
    jac = geometry.probed_jacobian(model, probe.m * x0, float(probe.t[0]), probes=k,
                                   seed=seed, schedule=model.schedule)
    values = torch.linalg.eigvalsh(jac).flip(-1)
    kept = geometry.absolute_dimension(values, torch.full((values.shape[0],),
                                                          probe.sigma ** 2)).to(
        torch.float64) * d / k
    return {"spectral": (1 - kept / d).tolist(), "spectral_dim": kept.tolist(),
            "spectrum": (probe.sigma ** 2 * values).tolist()}


def draw_samples(model: Any, n: int, *, steps: int = 50, seed: int = 0,
                 batch: int = 256, team: Team | None = None) -> Tensor:
    """``n`` samples of an unconditional model by :func:`ddim` from ``sigma(t_0) z``, the
    batches split over ``team``'s processes (every one returns them all)."""
    n, steps = positive_int("--n-samples", n), positive_int("--steps", steps)
    times = sampler_times(model, steps)
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, *model.data_shape, generator=gen, dtype=torch.float64)
    sigma0 = float(model.schedule.sigma(times[:1]))
    drawn, _ = (team or SOLO).map(lambda lo: ddim(model, sigma0 * z[lo: lo + batch], times),
                                  list(range(0, n, batch)))
    assert drawn is not None
    return torch.cat(drawn)


