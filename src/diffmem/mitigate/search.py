"""``diffmem mitigate``'s default: search for the cheapest cure that meets the target, at the
cost of a few audits, instead of drawing the whole grid at full size (``--exhaustive``:
:func:`diffmem.mitigate.sweep.sweep`).

1. **Baseline**: the uncured model drawn and audited at full size; it decides which
   conditions are memorized and which clean (:mod:`diffmem.mitigate.sweep`).
2. **Screen**: a small plan, every memorized condition and up to :data:`SCREEN_CLEAN` clean
   ones (for the cost), each with a quarter of ``--per-condition`` samples (at least 2, and
   :data:`SCREEN_MEMORIZED` memorized samples in all, up to the full plan's), from their own
   seeded noise (an unconditional model: a quarter of the samples, at least
   :data:`SCREEN_MEMORIZED`), drawn uncured and, for each cure (a *family*: a cure, or a
   chain's swept cure, its strengths ordered weak to strong by the cure's ``direction``), at
   its strongest strength. A cure cannot win when the copies its strongest strength leaves
   exceed the target with confidence :data:`PRUNE_CONFIDENCE` (the one-sided Clopper-Pearson
   lower bound of the copy rate above the target).
3. **Refine**: for each cure that can, the weakest strength of its grid whose screen copies
   meet the target, by bisection over the grid, assuming copies do not grow as the cure
   strengthens (evaluated points that break this are reported: ``non_monotone``); a cure
   whose strongest strength misses the target on the screen without being ruled out is
   confirmed at that strength.
4. **Confirm**: the candidates (each cure's weakest passing strength that keeps the
   samples on the screen), cheapest screen cost first, drawn at full size on every
   condition: the best :data:`CONFIRM` of them, and for a candidate that misses the target
   at full size, the next stronger strength of its grid.

The recommendation and every figure under ``"runs"`` come from the full-size draws; the
screen's points are kept under ``"screen"``, each marked ``"estimate": "screen"``. Every
draw is resumable and split over the processes of a team, as the exhaustive sweep's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffmem.audit.model import DrawPlan
from diffmem.mitigate.base import Cure, CureContext, cure_model
from diffmem.mitigate.sweep import (
    TARGET,
    Runner,
    Space,
    _groups,
    _label,
    embed_train,
    entry,
    keeps_samples,
    summarize,
)
from diffmem.parallel import SOLO, Team

#: Share of ``--per-condition`` (of the samples, for an unconditional model) the screen draws.
SCREEN_SHARE = 0.25
#: Memorized samples (samples, for an unconditional model) the screen draws at least, up to
#: the full plan's.
SCREEN_MEMORIZED = 16
#: A cure is dropped when the screen's copies at its strongest strength exceed the target
#: with this confidence (one-sided Clopper-Pearson lower bound).
PRUNE_CONFIDENCE = 0.9
#: Clean conditions the screen draws for the cost, at most.
SCREEN_CLEAN = 4
#: The screen's noise: the plan's seed plus this.
SCREEN_SEED = 7919
#: Candidates confirmed at full size (cheapest screen cost first).
CONFIRM = 2


@dataclasses.dataclass
class Family:
    """One cure (or chain) over its strengths, ordered weak to strong, and its screen
    points by grid index."""

    name: str
    runs: list[list[Cure]]
    points: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)
    status: str = ""
    weakest: int | None = None

    def report(self, tolerance: float) -> dict[str, Any]:
        """What ``mitigate.json`` says of the family's search."""
        done = sorted(self.points)
        copies = [self.points[i]["copy_fraction"] for i in done]
        rising = [(self.runs[a][-1].strength, self.runs[b][-1].strength)
                  for (a, ca), (b, cb) in zip(zip(done, copies, strict=True),
                                              zip(done[1:], copies[1:], strict=True),
                                              strict=False)
                  if cb > ca + tolerance]
        return {"evaluated": [self.runs[i][-1].strength for i in done],
                "copies": copies, "status": self.status,
                "weakest": None if self.weakest is None else
                self.runs[self.weakest][-1].strength,
                "non_monotone": [list(p) for p in rising]}


def families(cures: Sequence[list[Cure]]) -> list[Family]:
    """The runs grouped by family (:func:`diffmem.mitigate.sweep._label`), each ordered weak
    to strong."""
    found: dict[str, list[list[Cure]]] = {}
    for run in cures:
        found.setdefault(_label(run)[0], []).append(run)
    return [Family(name, sorted(runs, key=lambda r: r[-1].direction * r[-1].strength))
            for name, runs in found.items()]


def _status(plan: DrawPlan, copy: Tensor) -> tuple[Tensor | None, list[int], list[int]]:
    """The plan's distinct conditions (``None`` for an unconditional model) and the indices
    of the memorized and clean ones among them, by the baseline's copies."""
    if plan.cond is None:
        return None, [], []
    from diffmem.conditions import distinct

    table, which = distinct(plan.cond)
    memorized, clean = [], []
    from diffmem.mitigate.sweep import CLEAR_HIGH, CLEAR_LOW

    for g in range(table.shape[0]):
        frac = float(copy[which == g].to(torch.float64).mean())
        if frac >= CLEAR_HIGH:
            memorized.append(g)
        elif frac <= CLEAR_LOW:
            clean.append(g)
    return table, memorized, clean


def screen_plan(plan: DrawPlan, copy: Tensor) -> DrawPlan:
    """The screen's plan (module docstring) from the baseline's copies."""
    from diffmem.conditions import per_sample

    seed = plan.seed + SCREEN_SEED
    table, memorized, clean = _status(plan, copy)
    if table is None:
        return dataclasses.replace(plan, n=min(plan.n, max(SCREEN_MEMORIZED, math.ceil(
            plan.n * SCREEN_SHARE))), seed=seed)
    assert plan.conditions is not None
    per = plan.n // table.shape[0]
    k = min(per, max(2, round(per * SCREEN_SHARE),
                     math.ceil(SCREEN_MEMORIZED / max(1, len(memorized)))))
    pick = table[torch.tensor(memorized + clean[:SCREEN_CLEAN])]
    return dataclasses.replace(plan, n=pick.shape[0] * k, cond=per_sample(pick, k),
                               conditions=pick, seed=seed)


def _screen_groups(splan: DrawPlan, full: DrawPlan, base_copy: Tensor,
                   screen_copy: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
    """The screen's memorized and clean rows (by the full baseline's verdict on their
    condition; an unconditional model: by the screen's own baseline) and its clean rows
    grouped by condition."""
    if splan.cond is None:
        return _groups(splan, screen_copy)
    from diffmem.conditions import same

    table, memorized, clean = _status(full, base_copy)
    assert table is not None
    mem = torch.zeros(splan.n, dtype=torch.bool)
    cln = torch.zeros(splan.n, dtype=torch.bool)
    groups = []
    for g in memorized:
        mem |= same(splan.cond, table[g:g + 1].expand_as(splan.cond))
    for g in clean:
        rows = same(splan.cond, table[g:g + 1].expand_as(splan.cond))
        if bool(rows.any()):
            cln |= rows
            groups.append(torch.nonzero(rows).squeeze(1))
    return mem, cln, groups


class _Screen:
    """The screen's runner, its baseline and groups; evaluates a family's strength once."""

    def __init__(self, runner: Runner, full: DrawPlan, base_copy: Tensor,
                 ctx: CureContext) -> None:
        self.runner, self.ctx = runner, ctx
        self.base = runner.measure("baseline", runner.plan.model)
        self.mem, self.clean, self.groups = _screen_groups(runner.plan, full, base_copy,
                                                           self.base["copy"])
        self.base_points = runner.points("baseline", self.base)
        self.baseline = entry(runner, "baseline", None, "", self.base, self.base,
                              self.base_points, self.mem, self.clean, self.groups)

    def point(self, fam: Family, i: int) -> dict[str, Any]:
        """``fam``'s screen point at grid index ``i`` (drawn once)."""
        if i not in fam.points:
            run = fam.runs[i]
            sub = "runs/" + "+".join(map(str, run))
            m = self.runner.measure(sub, cure_model(self.runner.plan.model, run, self.ctx))
            e = entry(self.runner, sub, _label(run), "sampling", m, self.base,
                      self.base_points, self.mem, self.clean, self.groups)
            e["keeps_samples"] = keeps_samples(e, self.baseline)
            fam.points[i] = {**e, "estimate": "screen", "samples": f"screen/{e['samples']}",
                             "sample_conditions": None if e["sample_conditions"] is None
                             else f"screen/{e['sample_conditions']}"}
        return fam.points[i]


def _refine(screen: _Screen, fam: Family, target: float) -> None:
    """The weakest strength of ``fam`` meeting ``target`` on the screen, by bisection; its
    status."""
    n = len(fam.runs)
    strongest = screen.point(fam, n - 1)["copy_fraction"]
    rows = int(screen.mem.sum())
    if copies_lower_bound(round(strongest * rows), rows, PRUNE_CONFIDENCE) > target:
        fam.status = "cannot reach the target (its strongest strength leaves more copies)"
        return
    lo, hi = (-1, n - 1) if strongest <= target else (n - 2, n - 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if screen.point(fam, mid)["copy_fraction"] <= target:
            hi = mid
        else:
            lo = mid
    fam.weakest = hi
    point = screen.point(fam, hi)
    keeps = point.get("keeps_samples") is not False
    met = point["copy_fraction"] <= target
    fam.status = ("candidate" if met else "candidate (the screen cannot rule out its "
                  "strongest strength)") if keeps else (
        "meets the target only where it does not keep the samples" if met else
        "does not keep the samples at its strongest strength")


def copies_lower_bound(k: int, n: int, confidence: float) -> float:
    """The one-sided Clopper-Pearson lower bound of a rate seen ``k`` times in ``n``: the
    ``p`` at which ``P(X >= k | n, p) = 1 - confidence`` (0 for ``k = 0``)."""
    if k <= 0 or n <= 0:
        return 0.0

    def tail(p: float) -> float:
        return sum(math.comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(k, n + 1))

    lo, hi = 0.0, 1.0
    for _ in range(60):  # tail(p) grows with p
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tail(mid) < 1 - confidence else (lo, mid)
    return lo


def _confirm(full: Runner, fams: list[Family], ctx: CureContext, target: float,
             entry_of: Any) -> list[dict[str, Any]]:
    """Full-size runs of the best candidates (module docstring), in order."""
    cands = sorted((f for f in fams if f.status.startswith("candidate")),
                   key=lambda f: (f.points[f.weakest]["cost"]
                                  if f.points[f.weakest]["cost"] is not None else math.inf))
    runs: list[dict[str, Any]] = []
    for fam in cands[:CONFIRM]:
        assert fam.weakest is not None
        for i in range(fam.weakest, min(fam.weakest + 2, len(fam.runs))):
            run = fam.runs[i]
            sub = "runs/" + "+".join(map(str, run))
            e = entry_of(sub, _label(run), "sampling",
                         full.measure(sub, cure_model(full.plan.model, run, ctx)))
            runs.append(e)
            if e["copy_fraction"] <= target:
                break  # met at full size: no stronger strength needed
    return runs


def search(plan: DrawPlan, cures: list[list[Cure]], folder: Path, *, train: Any = None,
           train_cond: Tensor | None = None, ctx: CureContext | None = None,
           target: float = TARGET, detect_steps: int = 50, device: str = "cpu",
           progress: bool = True, team: Team | None = None,
           retrained: Sequence[tuple[str, float, Any]] = (),
           space: Space | None = None) -> dict[str, Any]:
    """The search of the module docstring over the runs of ``cures`` (as
    :func:`diffmem.mitigate.sweep.plan_cures` lists them) into ``folder`` (the full-size
    runs where the exhaustive sweep puts them, the screen's under ``folder/screen``), then
    each model of ``retrained`` at full size (as :func:`~diffmem.mitigate.sweep.sweep`);
    returns what ``mitigate.json`` holds (``mode``: ``search``)."""
    import time

    team = team or SOLO
    ctx = ctx or CureContext(null=plan.null)
    space = space or Space()
    train = embed_train(train, space, plan, folder, device, progress, team)
    full = Runner(plan, folder, train, train_cond, detect_steps, device, team, space)
    start = time.perf_counter()
    base = full.measure("baseline", plan.model)
    memorized, clean, groups = _groups(plan, base["copy"])
    base_points = full.points("baseline", base)

    def entry_of(sub: str, label: Any, when: str, m: dict[str, Any]) -> dict[str, Any]:
        return entry(full, sub, label, when, m, base, base_points, memorized, clean, groups)

    baseline = entry_of("baseline", None, "", base)
    baseline["cost"] = 0.0
    fams = families(cures)
    screen_s = 0.0
    if bool(memorized.any()):
        splan = screen_plan(plan, base["copy"])
        sub = Runner(splan, folder / "screen", train, train_cond, detect_steps, device, team,
                     space)
        began = time.perf_counter()
        screen = _Screen(sub, plan, base["copy"], ctx)
        for fam in fams:  # the strongest of every cure first, then the survivors refined
            screen.point(fam, len(fam.runs) - 1)
        for fam in fams:
            _refine(screen, fam, target)
        screen_s = time.perf_counter() - began
        tolerance = 1 / max(1, int(screen.mem.sum()))
    else:
        tolerance = 0.0
        for fam in fams:
            fam.status = "not searched: the uncured model copies no condition"
    runs = _confirm(full, fams, ctx, target, entry_of)
    runs += [entry_of(f"retrained/{name}={strength:g}", (name, strength), "training",
                      full.measure(f"retrained/{name}={strength:g}", m))
             for name, strength, m in retrained]
    total = time.perf_counter() - start
    summary = summarize(baseline, runs, memorized, clean, target, space, train, {
        "baseline": base["seconds"], "screen": screen_s,
        "confirm": float(sum(r["seconds"] for r in runs)), "all": total})
    if not bool(memorized.any()):
        summary["rule"] = (f"nothing to cure: no condition of the uncured model is memorized "
                           f"(copies {baseline['copy_fraction']:.3g} of the samples), so no "
                           "cure is searched")
    screen_points = [p for fam in fams for _, p in sorted(fam.points.items())]
    return {**summary, "mode": "search", "screen": screen_points,
            "search": {fam.name: fam.report(tolerance) for fam in fams}}
