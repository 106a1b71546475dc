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
* ``consistency`` (Carlini et al., USENIX Security 2023, as a confirmation): ``K`` full
  generations per condition (DDIM, ``eta = 0``; a latent model's decoded by its VAE, so
  pictures are compared), the median over them of the RMS distance to
  the nearest other generation, negated (near-duplicate generations: larger). Costly, so
  computed only for the conditions ranked highest by the screen: ``confirm`` of them, or by
  default all of them up to :data:`CONFIRM_ALL` conditions and beyond that down the ranking
  a chunk at a time until a chunk holds no condition whose ``consistency_ratio`` is below
  :data:`CONSISTENCY_RATIO`.
* ``consistency_ratio``: the median RMS distance between two of those generations divided
  by the same for the null condition's, generated from the same noise (dimensionless; near 1
  when the condition leaves the generations as varied as no condition does, near 0 when they
  all land on one image). The verdicts of :mod:`diffmem.verdicts` read it.

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
SAMPLE_MEASURES = ("jacobian", "flipd", "reconstruction")
#: What ``diffmem detect`` computes per condition by default (``sharpness`` and
#: ``anisotropy`` on request: see docs/detect.md for their benchmark figures).
DEFAULT_MEASURES = ("wen", "gap", "collapse", "consistency")
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
#: Fraction of the conditions confirmed by full generations at a time (by default down the
#: ranking until a chunk confirms none).
CONFIRM = 0.1
#: Confirmation generations per condition by default (at least ``n_noise``): the verdict's
#: ratio is a median over their pairs, and with 4 a memorized digit condition sat at 0.52 on
#: ``detect-digits``' quick linear-eps model, at 0.47 with 16 (docs/detect.md).
GENERATIONS = 16
#: Up to this many conditions, all are confirmed by default (the verdict does not hang on the
#: screen's ranking: on a small text model the screen ranked the memorized prompts last).
CONFIRM_ALL = 64
#: ``consistency_ratio`` below which a condition's generations count as one image (the
#: verdict without a reference set; measured on ``detect-digits``, see docs/detect.md).
CONSISTENCY_RATIO = 0.5
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


def _spread(gens: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per group of ``k`` consecutive generations ``(n k, d)``: the median over them of the
    RMS distance (``/ sqrt(d)``) to the nearest other generation of the group (Carlini et
    al.'s), and the median RMS distance over the group's ``k (k - 1) / 2`` pairs (steadier
    with few generations: what the ratios use)."""
    d = gens.shape[1]
    g = gens.reshape(-1, k, d)
    dist = torch.cdist(g, g) / math.sqrt(d)
    pairs = torch.triu_indices(k, k, 1)
    median_pair = dist[:, pairs[0], pairs[1]].median(1).values
    dist = dist + torch.diag(torch.full((k,), math.inf, dtype=dist.dtype))
    return dist.min(2).values.median(1).values, median_pair


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


def detect(model: Any, conditions: Tensor, null: Tensor, *, n_noise: int = 4,
           steps: int = 50, levels: Sequence[float] = LEVELS,
           measures: Sequence[str] = DEFAULT_MEASURES,
           confirm: int | None = None, seed: int = 0, labels: Tensor | None = None,
           chunk: int = 64, guidance: float | None = None, generations: int | None = None,
           progress: bool = False, team: Team | None = None) -> DetectResult:
    """The measures of the module docstring for each of ``conditions`` (``(n, *cond_shape)``;
    integer labels or vectors) of a conditional ``model`` whose null condition is ``null``.
    Conditions are evaluated ``chunk`` at a time, all ``n_noise`` draws in one batch; the
    confirmation generates ``generations`` per condition (default the larger of
    ``GENERATIONS`` and ``n_noise``; from the screen's noise when equal to ``n_noise``,
    otherwise from their own, drawn after it, the same for every condition and the null).
    ``consistency`` is computed for the ``confirm`` conditions ranked highest by the other
    measures (the primary when computed); by default (``confirm=None``) for all of them when
    there are at most ``CONFIRM_ALL``, otherwise for chunks of ``CONFIRM`` of them down that
    ranking until a chunk holds no condition with a ``consistency_ratio`` below
    ``CONSISTENCY_RATIO``.
    ``labels`` (``(n,)``, 1 for a memorized condition) adds the ROC of each measure.
    ``guidance`` (a text pipeline's weight) guides the confirmation generations against
    ``null`` as the pipeline samples; the screen's measures compare the unguided outputs.

    With a :class:`diffmem.parallel.Team`, the chunks of the screen and of the confirmation
    (as many chunks at once as processes; those past the stopping chunk are dropped) are
    split over its processes, with the numbers of one process."""
    team = team or SOLO
    if not getattr(model, "conditional", False):
        raise fail("--model", "a conditional model (its condition and a null one)",
                   getattr(model, "name", type(model).__name__))
    names = _check_measures(measures, MEASURES)
    n_noise, steps = positive_int("--n-noise", n_noise), positive_int("--steps", steps)
    k_gen = max(GENERATIONS, n_noise) if generations is None else \
        positive_int("--generations", generations)
    if k_gen < 2:
        raise fail("--generations", "at least 2 generations per condition (their spread)",
                   k_gen)
    lv = _check_levels(levels)
    n = conditions.shape[0]
    step = max(1, math.ceil(CONFIRM * n))
    limit = n if confirm is None else max(0, int(confirm))
    _check_labels(labels, conditions.shape[0], "condition")
    model.check_condition(conditions[:2], "--conditions")
    model.check_condition(null[None], "--null-cond")
    times = sampler_times(model, steps)
    shape = tuple(model.data_shape)
    d = math.prod(shape)
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n_noise, *shape, generator=gen, dtype=torch.float64)
    probes = _rademacher((len(lv), n_noise, *shape), gen)
    z_gen = z if k_gen == n_noise else torch.randn(k_gen, *shape, generator=gen,
                                                   dtype=torch.float64)
    entries: list[dict[str, Any]] = [{"condition": describe(conditions[j], j), "index": j}
                                     for j in range(n)]
    start = time.perf_counter()
    top = _Probe(model, float(times[0]), 1)
    low = _Probe(model, float(times[-1]), 1)
    at = [_Probe(model, time_at_level(model.schedule, v), 1) for v in lv]

    def screen(lo: int) -> dict[str, list[float]]:
        """The screen's measures of conditions ``lo`` to ``lo + chunk``, per condition."""
        idx = torch.arange(lo, min(n, lo + chunk))
        k = idx.numel()
        c = conditions[idx].repeat_interleave(n_noise, 0)
        nul = null[None].expand(c.shape[0], *null.shape)
        zz = z.repeat(k, *[1] * len(shape))
        found: dict[str, Tensor] = {}
        if {"wen", "sharpness", "anisotropy"} & set(names):
            x = top.sigma * zz
            dc, dn = top.D_pair(x, c, nul)
            delta_eps = top.eps(x, dc) - top.eps(x, dn)
            found["wen"] = _rows(delta_eps)
            if "sharpness" in names:
                s_delta = top.m * (dc - dn) / top.sigma ** 2
                h = STEP * top.sigma * math.sqrt(d) / _rows(s_delta).clamp_min(1e-30)
                hv = expand_as_batch(h, x) * s_delta
                pc, pn = top.D_pair(x + hv, c, nul)
                mc, mn = top.D_pair(x - hv, c, nul)
                hvp = top.m * ((pc - pn) - (mc - mn)) / top.sigma ** 2 / (2 * expand_as_batch(
                    h, x))
                found["sharpness"] = _rows(hvp) ** 2
            if "anisotropy" in names:
                lc, ln = low.D_pair(x, c, nul)
                e_null = low.eps(x, ln)
                guide = low.eps(x, lc) - e_null
                cos = _dot(e_null, guide) / (_rows(e_null) * _rows(guide)).clamp_min(1e-30)
                found["anisotropy"] = found["wen"] / math.sqrt(d) + GAMMA * cos
        if {"gap", "collapse"} & set(names):
            gaps, tr_c, tr_n = [], [], []
            for j, probe in enumerate(at):
                x = probe.sigma * zz
                if "collapse" in names:  # the gap from the same calls, D(x) to O(h^2)
                    v = probes[j].repeat(k, *[1] * len(shape))
                    tr, mid = probe.vjv(torch.cat([x, x]), torch.cat([v, v]),
                                        torch.cat([c, nul]))
                    tr_c.append(tr[: x.shape[0]])
                    tr_n.append(tr[x.shape[0]:])
                    dc, dn = mid[: x.shape[0]], mid[x.shape[0]:]
                else:
                    dc, dn = probe.D_pair(x, c, nul)
                gaps.append(_rows(dc - dn) / math.sqrt(d))
            if gaps:
                found["gap"] = torch.stack(gaps).mean(0)
            if tr_c:
                found["trace_c"] = torch.stack(tr_c).sum(0) / (len(at) * d)
                found["trace_null"] = torch.stack(tr_n).sum(0) / (len(at) * d)
        return {name: value.reshape(k, n_noise).mean(1).tolist()
                for name, value in found.items()}

    per_process = _in_chunks(team, screen, entries, chunk, progress, "conditions")
    for e in entries:
        if "trace_c" in e:
            e["collapse"] = 1 - e["trace_c"] / e["trace_null"] if e["trace_null"] > 0 \
                else None
        if "wen" not in names:
            e.pop("wen", None)
    screen_s = time.perf_counter() - start
    confirmed = 0
    null_spread = None
    if "consistency" in names and limit > 0:
        screen = [m for m in (PRIMARY, "collapse", "gap", "anisotropy", "wen", "sharpness")
                  if m in names and m != "consistency"]
        order = sorted(range(n), key=lambda j: -_value(entries[j].get(screen[0]))) \
            if screen else list(range(n))
        generator = model
        if guidance is not None:  # generate as the pipeline does: a guided copy of the model
            import copy

            generator = copy.copy(model).guided(guidance, null)
        null_spread = float(_spread(_images(model, ddim(
            generator, top.sigma * z_gen, times, null[None].expand(k_gen, *null.shape))),
            k_gen)[1][0])
        bar = tqdm(total=limit, disable=not (progress and team.leader), desc="confirming")
        width = step if confirm is None else chunk

        def generate(lo: int) -> tuple[list[float], list[float]]:
            """Confirmation generations of the conditions ranked ``lo`` to ``lo + width``."""
            pick = torch.tensor(order[lo: min(limit, lo + width)])
            c = conditions[pick].repeat_interleave(k_gen, 0)
            zz = z_gen.repeat(pick.numel(), *[1] * len(shape))
            near, spread = _spread(_images(model, ddim(generator, top.sigma * zz, times, c)),
                                   k_gen)
            return near.tolist(), spread.tolist()

        stop = False
        while confirmed < limit and not stop:  # one chunk a process at a time, in order
            starts = list(range(confirmed, limit, width))[:team.size]
            found, _ = team.map(generate, starts)
            assert found is not None
            for lo, (near, spread) in zip(starts, found, strict=True):
                pick = order[lo: min(limit, lo + width)]
                for j, v, w in zip(pick, near, spread, strict=True):
                    entries[j]["consistency"] = -v
                    entries[j]["consistency_ratio"] = w / null_spread if null_spread > 0 \
                        else None
                confirmed += len(pick)
                bar.update(len(pick))
                ratios = [entries[j]["consistency_ratio"] for j in pick]
                if confirm is None and n > CONFIRM_ALL and not any(
                        r is not None and r < CONSISTENCY_RATIO for r in ratios):
                    stop = True  # a whole chunk down the ranking confirmed nothing: stop
                    break
        bar.close()
    total = time.perf_counter() - start
    for e in entries:
        e["seconds"] = total / max(1, n)
    settings = {"n_noise": n_noise, "generations": k_gen, "steps": steps, "levels": lv,
                "measures": names,
                "confirm": confirmed, "null_spread": null_spread, "seed": seed,
                "model": getattr(model, "name", None), "t_first": float(times[0]),
                "generation_guidance": guidance,
                "t_last": float(times[-1]), "screen_seconds": screen_s, "seconds": total,
                "sampler": "DDIM (eta 0) on the model's schedule", "gamma": GAMMA}
    primary = PRIMARY if PRIMARY in names else next(m for m in MEASURES if m in names)
    return _add_roc(DetectResult(entries, settings, "conditions", primary,
                                 per_process=per_process), labels)


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
        return {name: found[name].reshape(hi - lo, n_noise).mean(1).tolist()
                for name in names}

    per_process = _in_chunks(team or SOLO, measure, entries, chunk, progress, "samples")
    total = time.perf_counter() - start
    settings = {"n_noise": n_noise, "level": level, "dim": d,
                "measures": names, "seed": seed, "model": getattr(model, "name", None),
                "seconds": total}
    primary = SAMPLE_PRIMARY if SAMPLE_PRIMARY in names else names[0]
    return _add_roc(DetectResult(entries, settings, "samples", primary,
                                 per_process=per_process), labels)


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


