"""Sequential confirmation of a condition's verdict by full generations: draw a few, stop as
soon as the verdict is settled, draw more only while it is in doubt.

A condition's confirmation generations ``g_1 .. g_k`` (the model's deterministic sampler from
noise ``z_1 .. z_k`` shared by every condition and by the null one; a latent model's decoded,
so pictures are compared) give its consistency ratio

    rho = median_{i<j} |g_i - g_j| / median_{i<j} |n_i - n_j|

(RMS distances per coordinate; ``n`` the null condition's generations from the same noise):
near 1 when the condition leaves the generations as varied as no condition does, near 0
when they all land on one image. The rule: a condition is **memorized** when ``rho`` lies
below :data:`LINE`, and its verdict is **settled** once an interval for ``rho`` lies wholly on
one side of the line.

Rounds (:func:`looks`): ``first`` generations, then twice as many, up to ``cap`` (8, 16, 32 by
default). After each round the interval is the percentile bootstrap interval of ``rho``
(:func:`interval`: the condition's and the null's generations resampled with replacement,
pairs of one generation with itself left out; the null's replicates drawn once) at
one-sided level ``alpha / L`` on each side, ``L`` the number of looks. A condition stops
with

* ``below``: the upper end below the line: memorized;
* ``above``: the lower end at or above the line: not memorized;
* ``cap``: ``cap`` generations drawn and the interval still across the line: not memorized
  (a memorized verdict needs the evidence), its interval kept.

Error bound (Bonferroni over the looks, each interval approximate as a bootstrap one is): a
condition whose ratio is at least the line is called memorized with probability at most
``alpha``, and one whose ratio is below it stops ``above`` with probability at most
``alpha``; near the line a memorized condition may also end at ``cap``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffmem._checks import fail, positive_int

#: ``consistency_ratio`` below which a condition is memorized (measured on detect-digits'
#: models at full settings: memorized conditions at 0.38 or below, clean ones at 0.49 or
#: above; docs/detect.md).
LINE = 0.45
#: Error of a settled verdict, split over the looks.
ALPHA = 0.05
#: Generations in the first round, and the default cap.
FIRST = 8
CAP = 32
#: Bootstrap resamples of each interval.
RESAMPLES = 1000
#: Why a condition's confirmation stopped.
STOPS = ("below", "above", "cap")


def looks(first: int, cap: int) -> list[int]:
    """The generations drawn by the end of each round: ``first``, doubled, up to ``cap``
    (``cap`` itself the last)."""
    first, cap = positive_int("--generations", first), positive_int("--generations", cap)
    if first < 2:
        raise fail("first", "at least 2 generations in the first round (their spread)", first)
    if cap < first:
        raise fail("--generations", f"a cap of at least the first round's {first} "
                   "generations", cap)
    out = [first]
    while out[-1] < cap:
        out.append(min(cap, 2 * out[-1]))
    return out


def check_alpha(alpha: float) -> float:
    """``alpha`` if it is an error rate in (0, 1), else the ``--alpha`` error."""
    if not (isinstance(alpha, int | float) and 0 < alpha < 1):
        raise fail("--alpha", "an error rate in (0, 1)", alpha)
    return float(alpha)


def distances(gens: Tensor) -> Tensor:
    """RMS distances per coordinate between the rows of ``gens`` ``(k, d)``: ``(k, k)``,
    float64."""
    g = gens.to(torch.float64)
    return torch.cdist(g, g) / math.sqrt(g.shape[1])


def pair_median(d: Tensor) -> float:
    """The median of the off-diagonal upper entries of a distance matrix (torch's lower
    median for an even count)."""
    k = d.shape[0]
    iu = torch.triu_indices(k, k, 1)
    return float(d[iu[0], iu[1]].median())


def nearest_median(d: Tensor) -> float:
    """The median over rows of the distance to the nearest other row (Carlini et al.'s
    consistency, before its sign)."""
    k = d.shape[0]
    return float((d + torch.diag(torch.full((k,), math.inf, dtype=d.dtype))).min(1)
                 .values.median())


def _resampled_medians(d: Tensor, n: int, gen: torch.Generator) -> Tensor:
    """``n`` bootstrap replicates of :func:`pair_median`: rows drawn with replacement,
    pairs of a row with a copy of itself left out."""
    k = d.shape[0]
    pick = torch.randint(0, k, (n, k), generator=gen)
    vals = d[pick[:, :, None], pick[:, None, :]]
    keep = torch.triu(torch.ones(k, k, dtype=torch.bool), 1)[None] & \
        (pick[:, :, None] != pick[:, None, :])
    vals = torch.where(keep, vals, torch.full_like(vals, math.nan))
    return vals.flatten(1).nanmedian(1).values


def null_resamples(d_null: Tensor, seed: int) -> Tensor:
    """The null condition's bootstrap replicates of :func:`pair_median`, drawn once and
    shared by every condition's interval (resampled independently of each condition's)."""
    return _resampled_medians(d_null, RESAMPLES, torch.Generator().manual_seed(
        _stream(seed, -1, 0)))


def interval(d: Tensor, null_medians: Tensor, level: float,
             gen: torch.Generator) -> tuple[float, float]:
    """The percentile bootstrap interval ``[q_level, q_(1 - level)]`` of ``rho`` =
    :func:`pair_median` of ``d`` over that of the null's distances, the condition's
    generations resampled (``null_medians``: the null's replicates, :func:`null_resamples`)."""
    num = _resampled_medians(d, null_medians.shape[0], gen)
    ratio = num / null_medians.clamp_min(1e-300)
    ratio = ratio[torch.isfinite(ratio)]
    if ratio.numel() == 0:
        return math.nan, math.nan
    q = torch.quantile(ratio, torch.tensor([level, 1 - level], dtype=ratio.dtype))
    return float(q[0]), float(q[1])


def decide(lo: float, hi: float, line: float, last: bool) -> str | None:
    """Why the confirmation stops (one of :data:`STOPS`), or ``None`` to draw more."""
    if hi < line:
        return "below"
    if lo >= line:
        return "above"
    return "cap" if last else None


@dataclass
class Outcome:
    """A condition's confirmation: the generations drawn, its ratio and interval, Carlini's
    consistency (minus the median distance to the nearest other generation, data units)
    and why it stopped."""

    generations: int
    ratio: float | None
    low: float | None
    high: float | None
    consistency: float
    stopped: str

    @property
    def memorized(self) -> bool:
        return self.stopped == "below"

    def as_entry(self) -> dict[str, Any]:
        """The fields detect writes into the condition's entry."""
        return {"consistency": self.consistency, "consistency_ratio": self.ratio,
                "ratio_interval": [self.low, self.high], "generations": self.generations,
                "stopped": self.stopped}


def outcome(d: Tensor, null: float, null_medians: Tensor, n_looks: int, line: float,
            alpha: float, gen: torch.Generator, last: bool) -> Outcome | None:
    """The condition's outcome after one of ``n_looks`` looks on its distances ``d``
    (``null``: the null's pair median; ``null_medians`` its replicates), or ``None`` while the
    verdict is in doubt and more may be drawn."""
    ratio = pair_median(d) / null if null > 0 else None
    if ratio is None:
        lo = hi = math.nan
    else:
        lo, hi = interval(d, null_medians, alpha / n_looks, gen)
    stopped = decide(lo, hi, line, last) if ratio is not None else "cap"
    if stopped is None:
        return None
    return Outcome(d.shape[0], ratio, lo, hi, -nearest_median(d), stopped)


def confirm(draw: Callable[[list[int], int, int], Tensor], conditions: Sequence[int],
            d_null: Tensor, *, first: int = FIRST, cap: int = CAP, line: float = LINE,
            alpha: float = ALPHA, seed: int = 0) -> dict[int, Outcome]:
    """Confirm ``conditions`` (ids) in rounds: ``draw(ids, lo, hi)`` returns the generations
    ``lo`` to ``hi`` of each condition of ``ids``, ``(len(ids) (hi - lo), d)`` in that order;
    the conditions still in doubt after a round are drawn together in the next. ``d_null``:
    the null condition's distances. Each interval's resamples are seeded by ``(seed,
    condition id, look)``, so a condition's outcome does not depend on the others."""
    sizes = looks(first, cap)
    null, null_medians = pair_median(d_null), null_resamples(d_null, seed)
    gens: dict[int, Tensor] = {}
    done: dict[int, Outcome] = {}
    pending = list(conditions)
    drawn = 0
    for look, size in enumerate(sizes):
        if not pending:
            break
        new = draw(pending, drawn, size).reshape(len(pending), size - drawn, -1)
        for row, j in enumerate(pending):
            gens[j] = new[row] if j not in gens else torch.cat([gens[j], new[row]])
        drawn = size
        still = []
        for j in pending:
            gen = torch.Generator().manual_seed(_stream(seed, j, look))
            found = outcome(distances(gens[j]), null, null_medians, len(sizes), line, alpha,
                            gen, look == len(sizes) - 1)
            if found is None:
                still.append(j)
            else:
                done[j] = found
        pending = still
    return done


def _stream(seed: int, condition: int, look: int) -> int:
    """A generator seed for one condition's interval at one look."""
    return (int(seed) * 1_000_003 + int(condition) * 1_009 + look) % (2 ** 63)
