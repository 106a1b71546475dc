"""``diffmem mitigate``: every applicable cure over a grid of strengths, sampled from the same
seeded noise as the uncured model, on one plane of copies against cost.

Each run (the uncured ``baseline``, then one per cure and strength) draws into its own
folder (``OUT/baseline``, ``OUT/runs/NAME=STRENGTH``: ``samples.npy``,
``initial_noise.npy``, ``sample_conditions.npy``; resumable batch by batch) and is measured
once (``measure.json``, ``measure.npz``: kept, so a rerun after a kill measures only what is
left). The baseline decides which conditions are **memorized** (copied fraction at least
:data:`CLEAR_HIGH`) and which are **clean** (at most :data:`CLEAR_LOW`); per sample of an
unconditional model, whether it is a copy.

* **copies** (fraction of samples): with a training set, the audit's copy verdict per sample
  (nn-ratio copy, or a reproduction of its condition's training item: the reproduction
  measure catches copies of typical-looking images) over the memorized conditions' samples
  (all samples when none is memorized); without one, the fraction of the baseline's
  memorized conditions (samples) that detect's verdict still calls memorized.
* **cost**, on the clean conditions' samples (the baseline's non-copies): the energy distance
  between the cured and the uncured samples, per condition and averaged (data units, or the
  feature units of ``--features``; ``metrics.energy_distance`` with every pair counted: 0
  when nothing moves); with a training set the median distance to the nearest training item
  relative to the baseline's (``distance_ratio``, dimensionless) and, with training
  conditions, the fraction whose nearest item carries their condition (``condition_kept``);
  with a CLIP model's text tower as ``--features`` and prompts, the mean CLIP score
  ``cos(f(image), g(prompt))`` (``clip_score``: whether the prompt still steers).

With ``--features`` every distance (the audit's copies included) is measured between the
feature module's vectors of the samples and of the training set (:class:`Space`).

A cure that trades copies for noise is not a cure, so the memorized conditions' cured samples
are measured too: ``noise_ratio``, their median distance to the nearest training item over
the uncured clean samples' (dimensionless; about 1 for a new sample as far from the data as a
generalizing one, well above 1 for noise). A run **keeps the samples** when
``distance_ratio`` and ``noise_ratio`` are at most ``COST_FACTOR`` and ``condition_kept`` and
``clip_score`` are at least the baseline's divided by ``COST_FACTOR``. The recommended run:
the lowest energy distance among those that keep the samples and bring the copies to at most
``target``; when none does, none is recommended and the page says so, with the frontier (the
runs no other run beats on both copies and cost).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffmem._checks import fail
from diffmem.audit.model import DrawPlan, draw
from diffmem.io import atomic_write_bytes, atomic_write_json
from diffmem.metrics import energy_distance, within_mean_distance
from diffmem.mitigate import CURES, Cure, CureContext, cure_model, parse_cure
from diffmem.parallel import SOLO, Team

CLEAR_HIGH, CLEAR_LOW = 0.75, 0.25
COST_FACTOR = 1.25
TARGET = 0.1
#: The version of the measures a run's ``measure.json`` key carries: a saved run measured by
#: an earlier version is measured again (2: an image held several times is one item of the
#: audit's reproduction).
MEASURE_VERSION = 2
#: Per-sample measures kept in a run's ``measure.npz``.
MEASURES = ("copy", "d1", "nearest", "same", "vectors", "clip")


@dataclasses.dataclass
class Space:
    """Where a sweep measures: the data itself (``module`` ``None``) or the vectors of a
    feature module (``--features``: a copy descriptor or a CLIP model; ``name`` says which,
    ``digest`` identifies its files), and with a CLIP model's text tower the unit text
    embedding of each prompt (``texts``, one row per condition index): the CLIP score of a
    sample is the cosine ``<f(image), g(prompt)>`` of its features with its prompt's."""

    module: Any = None
    name: str | None = None
    digest: str = ""
    texts: Tensor | None = None

    @property
    def units(self) -> str:
        """The units distances are measured in."""
        return "data units" if self.module is None else f"feature units of {self.name}"


def measure_space(features: Any, prompts: Sequence[str] | None,
                  device: str = "cpu") -> Space:
    """The :class:`Space` of ``--features`` (a TorchScript file, a CLIP model folder or a
    callable; ``None``: the data), with the prompts' CLIP text embeddings when ``features``
    is a CLIP model with its text tower and ``prompts`` are given."""
    from diffmem.audit.features import (
        file_digest,
        load_clip_model,
        load_clip_text,
        load_clip_vision,
        load_features,
    )

    if features is None:
        return Space()
    if not isinstance(features, str | Path):
        if not callable(features):
            raise fail("--features", "a callable or a TorchScript file",
                       type(features).__name__)
        return Space(features, type(features).__name__)
    path = Path(features)
    if not path.is_dir():
        return Space(load_features(path, device), str(path), file_digest(path))
    model = load_clip_model(path, device)
    text = None if prompts is None else load_clip_text(path, device, model)
    return Space(load_clip_vision(path, device, model), str(path), file_digest(path),
                 None if text is None else text(list(prompts)))


def plan_cures(model: Any, ctx: CureContext, names: Sequence[str] | None = None,
               grids: dict[str, Sequence[float]] | None = None,
               combine: Sequence[str] = ()) -> tuple[list[list[Cure]], dict[str, str]]:
    """The runs of the sweep, each a list of cures applied in order: each cure of ``names``
    (default: every cure that applies to ``model``) at each strength of its grid (``grids``
    overrides a cure's default), checked to apply; then each chain of ``combine``
    (``A=a+B=b+C``: the cures before the last at their strength, the last over its grid);
    and, by name, why the cures left out do not apply. A cure named explicitly that does not
    apply raises its ``ValueError``."""
    grids = dict(grids or {})
    chosen = list(CURES) if names is None else list(names)
    unknown = [n for n in chosen + list(grids) if n not in CURES]
    if unknown:
        raise fail("--cures", f"names among {tuple(CURES)}", ", ".join(unknown))
    runs: list[list[Cure]] = []
    skipped: dict[str, str] = {}
    for name in chosen:
        cls = CURES[name]
        strengths = [float(v) for v in grids.get(name, cls.grid)]
        probe = cls(strengths[0] if strengths else 0.0)
        try:
            probe.check(model, ctx)
        except ValueError as err:
            if names is not None:
                raise
            skipped[name] = str(err)
            continue
        runs += [[cls(v)] for v in strengths]
    for chain in combine:
        *fixed_text, last = [part.strip() for part in chain.split("+")]
        if not fixed_text or last not in CURES:
            raise fail("--combine", "A=a+B: cures at their strength, then a cure name swept "
                       "over its grid", repr(chain))
        fixed = [parse_cure(part) for part in fixed_text]
        for cure in fixed:
            cure.check(model, ctx)
        runs += [[*fixed, CURES[last](float(v))] for v in grids.get(last, CURES[last].grid)]
    if not runs:
        raise fail("--cures", "at least one cure that applies to this model",
                   "; ".join(f"{k}: {v}" for k, v in skipped.items()) or "none")
    return runs, skipped


def _copies(samples: Tensor, plan: DrawPlan, train: Any, train_cond: Tensor | None,
            seed: int) -> dict[str, Any]:
    """Per sample: the audit's copy verdict (nn-ratio or reproduction), the distance to the
    nearest training item and whether that item carries the sample's condition."""
    from diffmem.audit import audit

    result = audit(samples, train, sample_cond=plan.cond, train_cond=train_cond,
                   bootstrap=50, seed=seed)
    copy = result.copies["nn_ratio"].clone()
    if "reproduction" in result.copies:
        copy |= result.copies["reproduction"]
    same = None
    if train_cond is not None and plan.cond is not None:
        from diffmem.conditions import same as same_rows

        same = same_rows(plan.cond, train_cond[result.nearest])
    return {"copy": copy, "d1": result.d1, "nearest": result.nearest, "same": same}


def _detected(model: Any, samples: Tensor, plan: DrawPlan, seed: int, steps: int,
              team: Team) -> dict[str, Any]:
    """Without a training set: detect's verdict, per condition (repeated for each of its
    samples) or per sample (split over ``team``'s processes)."""
    from diffmem.detect import detect, detect_samples
    from diffmem.verdicts import judge

    if plan.cond is not None:
        assert plan.conditions is not None and plan.null is not None
        found = detect(model, plan.conditions, plan.null, steps=steps, seed=seed, team=team)
        judge(found)
        flags = torch.tensor([bool(e.get("memorized")) for e in found.entries])
        from diffmem.conditions import distinct

        _, which = distinct(plan.cond)
        return {"copy": flags[which], "d1": None, "nearest": None, "same": None}
    found = detect_samples(model, samples.to(torch.float64), seed=seed, team=team)
    judge(found)
    return {"copy": torch.tensor([bool(e.get("memorized")) for e in found.entries]),
            "d1": None, "nearest": None, "same": None}


def _vectors(samples: Tensor, plan: DrawPlan, space: Space,
             device: str) -> dict[str, Tensor | None]:
    """The samples' feature vectors in ``space`` (``None`` in the data itself) and, with
    the prompts' CLIP text embeddings, each sample's CLIP score (cosine)."""
    if space.module is None:
        return {"vectors": None, "clip": None}
    from diffmem.audit.features import embed
    from diffmem.audit.inputs import Rows

    vec = embed(Rows(samples, "samples"), space.module, plan.batch, torch.device(device),
                False)
    clip = None
    if space.texts is not None and plan.cond is not None:
        which = plan.cond.reshape(plan.cond.shape[0], -1)[:, 0].long()
        clip = (vec * space.texts[which]).sum(dim=1)
    return {"vectors": vec, "clip": clip}


def _measure(folder: Path, plan: DrawPlan, train: Any, train_cond: Tensor | None,
             key: dict[str, Any], steps: int, start: float, team: Team,
             space: Space, device: str) -> dict[str, Any]:
    """A run's per-sample measures, from ``folder/measure.npz`` when a finished earlier
    run with the same ``key`` left them (as process 0 finds it), and its seconds (drawing and
    measuring, since ``start``, as first measured). Process 0 audits (in ``space``: ``train``
    is then the training set's vectors) and sends the verdicts to the others; without a
    training set detect splits over them; process 0 writes."""
    saved = _saved_measure(folder, key) if team.leader else None
    saved = team.broadcast(saved)
    if saved is not None:
        return saved
    # read once: by process 0, and by every process when detect splits over them
    drawn = torch.from_numpy(np.load(folder / "samples.npy")) \
        if team.leader or train is None else None
    extra = team.broadcast(_vectors(drawn, plan, space, device) if team.leader else None)
    if train is not None:  # the audit, on process 0 alone: the others get its verdicts
        found = team.broadcast(_copies(
            drawn if extra["vectors"] is None else extra["vectors"], plan, train,
            train_cond, plan.seed) if team.leader else None)
    else:  # detect splits its work over the processes
        found = _detected(plan.model, drawn, plan, plan.seed, steps, team)
    found |= extra
    found["seconds"] = time.perf_counter() - start
    if team.leader:
        import io

        buf = io.BytesIO()
        np.savez(buf, **{k: np.zeros(0) if v is None else v.numpy() for k, v in found.items()
                         if k != "seconds"})
        atomic_write_bytes(folder / "measure.npz", buf.getvalue())
        atomic_write_json(folder / "measure.json", {"key": key, "seconds": found["seconds"]})
    return found


def _saved_measure(folder: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The measures an earlier run with the same ``key`` left in ``folder`` (or ``None``)."""
    done = folder / "measure.json"
    if not (done.is_file() and (folder / "measure.npz").is_file()):
        return None
    try:
        saved = json.loads(done.read_text())
    except ValueError:
        return None
    if saved.get("key") != key:
        return None
    with np.load(folder / "measure.npz") as arrays:
        return {k: None if k not in arrays or arrays[k].size == 0 else
                torch.from_numpy(arrays[k]) for k in MEASURES} | {"seconds": saved.get("seconds")}


def _groups(plan: DrawPlan, copy: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
    """From the baseline's copy verdicts: the memorized samples (of memorized conditions, or
    the copies), the clean ones, and the clean samples grouped by condition."""
    if plan.cond is None:
        return copy, ~copy, [torch.nonzero(~copy).squeeze(1)]
    from diffmem.conditions import distinct

    _, which = distinct(plan.cond)
    memorized = torch.zeros_like(copy)
    clean = torch.zeros_like(copy)
    groups = []
    for g in range(int(which.max()) + 1):
        rows = which == g
        frac = float(copy[rows].to(torch.float64).mean())
        if frac >= CLEAR_HIGH:
            memorized |= rows
        elif frac <= CLEAR_LOW:
            clean |= rows
            groups.append(torch.nonzero(rows).squeeze(1))
    return memorized, clean, groups


def _energy(x: Tensor, y: Tensor) -> float:
    """The energy distance with every pair counted, ``i = j`` included (the V-statistic):
    0 for identical sets, never negative (the unbiased form swings below 0 with the dozen
    paired samples of a condition; the round-off below 0 is cut); data units."""
    n = y.shape[0]
    return max(0.0, energy_distance(x, y, x_empirical=True,
                                    y_within=within_mean_distance(y) * (n - 1) / n))


def _figures(run: dict[str, Any], base: dict[str, Any], samples: Tensor, base_samples: Tensor,
             memorized: Tensor, clean: Tensor, groups: list[Tensor]) -> dict[str, Any]:
    """A run's copies and costs against the baseline (module docstring)."""
    rows = memorized if bool(memorized.any()) else torch.ones_like(memorized)
    out: dict[str, Any] = {
        "copy_fraction": float(run["copy"][rows].to(torch.float64).mean()),
        "copy_fraction_all": float(run["copy"].to(torch.float64).mean())}
    dists = [_energy(samples[g], base_samples[g]) for g in groups if g.numel() >= 2]
    out["cost"] = float(np.mean(dists)) if dists else None
    out["distance_ratio"] = out["median_distance"] = out["noise_ratio"] = None
    if run.get("d1") is not None and bool(clean.any()):
        typical = float(base["d1"][clean].median())
        out["median_distance"] = float(run["d1"][clean].median())
        if typical > 0:
            out["distance_ratio"] = out["median_distance"] / typical
            if bool(memorized.any()):  # the cured copies: new samples, or noise?
                out["noise_ratio"] = float(run["d1"][memorized].median()) / typical
    out["condition_kept"] = None if run.get("same") is None or not bool(clean.any()) else \
        float(run["same"][clean].to(torch.float64).mean())
    out["clip_score"] = None if run.get("clip") is None or not bool(clean.any()) else \
        float(run["clip"][clean].to(torch.float64).mean())
    return out


def keeps_samples(fig: dict[str, Any], base: dict[str, Any]) -> bool | None:
    """Whether a run keeps the clean samples (module docstring); ``None`` when nothing
    measures it (no training set)."""
    checks = []
    for ratio in ("distance_ratio", "noise_ratio"):
        if fig.get(ratio) is not None:
            checks.append(fig[ratio] <= COST_FACTOR)
    for kept in ("condition_kept", "clip_score"):
        if fig.get(kept) is not None and base.get(kept) is not None:
            checks.append(fig[kept] >= base[kept] / COST_FACTOR)
    return all(checks) if checks else None


def frontier(runs: list[dict[str, Any]]) -> list[int]:
    """Indices of the runs no other run beats on both copies and cost (both no worse, one
    better)."""
    pts = [(r["copy_fraction"], r["cost"] if r["cost"] is not None else math.inf)
           for r in runs]
    keep = []
    for i, (c, k) in enumerate(pts):
        if not any((c2 <= c and k2 <= k) and (c2 < c or k2 < k) for c2, k2 in pts):
            keep.append(i)
    return keep


def recommend(runs: list[dict[str, Any]], target: float) -> tuple[int | None, str]:
    """The recommended run (index) and the rule that chose it (module docstring)."""
    rule = (f"the lowest cost (energy distance to the uncured samples of the clean "
            f"conditions) among the runs that bring the copies to at most {target:g} and keep "
            f"the samples (the clean samples' distance to the data, condition kept and CLIP "
            f"score, when measured, within "
            f"{COST_FACTOR:g}x of the uncured model's, and the cured copies no further from "
            f"the data than {COST_FACTOR:g}x a clean sample: not noise)")
    ok = [i for i, r in enumerate(runs) if r["copy_fraction"] <= target
          and r["cost"] is not None and r.get("keeps_samples") is not False]
    if all(r["cost"] is None for r in runs):
        return None, rule + ": the cost is not measured (the uncured model copies every " \
            "condition: none is clean), so none is recommended"
    if not ok:
        return None, rule + ": no run does"
    return min(ok, key=lambda i: (runs[i]["cost"] if runs[i]["cost"] is not None
                                  else math.inf, runs[i]["copy_fraction"])), rule


def _label(cures: list[Cure]) -> tuple[str, float]:
    """A run's cure name (a chain: the fixed cures with their strengths, then the swept
    one's name) and its swept strength."""
    head = "".join(f"{c}+" for c in cures[:-1])
    return head + cures[-1].name, cures[-1].strength


@dataclasses.dataclass
class Runner:
    """Draws runs of one plan into ``folder`` (``baseline``, ``runs/NAME=STRENGTH``, ...:
    resumable batch by batch) and measures each once (kept beside its samples); where the
    distances are measured (``space``: the data, or the training set's feature vectors,
    cached in ``folder/features``)."""

    plan: DrawPlan
    folder: Path
    train: Any = None
    train_cond: Tensor | None = None
    detect_steps: int = 50
    device: str = "cpu"
    team: Team = SOLO
    space: Space = dataclasses.field(default_factory=Space)

    def __post_init__(self) -> None:
        p, space = self.plan, self.space
        self.key = {"version": MEASURE_VERSION, "n": p.n, "seed": p.seed, "sampler": p.sampler,
                    "steps": p.steps, "model": p.model.name,
                    "train": None if self.train is None else "given",
                    "detect_steps": self.detect_steps, "features": space.digest or space.name,
                    "clip": space.texts is not None,
                    "cond": None if p.cond is None else _digest(p.cond)}

    def measure(self, sub: str, model: Any) -> dict[str, Any]:
        """Draw the plan with ``model`` into ``folder/sub`` and measure it (or read both)."""
        start = time.perf_counter()
        where = self.folder / sub
        where.mkdir(parents=True, exist_ok=True)
        p = dataclasses.replace(self.plan, model=model)
        draw(p, where, device=self.device, progress=False, team=self.team)
        return _measure(where, p, self.train, self.train_cond, {**self.key, "cure": sub},
                        self.detect_steps, start, self.team, self.space, self.device)

    def points(self, sub: str, m: dict[str, Any]) -> Tensor:
        """A run's samples where distances are measured: their vectors, or the data."""
        return m["vectors"] if m.get("vectors") is not None else \
            torch.from_numpy(np.load(self.folder / sub / "samples.npy"))


def _digest(t: Tensor) -> str:
    """A short digest of a tensor (a plan's conditions)."""
    import hashlib

    return hashlib.blake2b(t.contiguous().numpy().tobytes(), digest_size=8).hexdigest()


def embed_train(train: Any, space: Space, plan: DrawPlan, folder: Path, device: str,
                progress: bool, team: Team) -> Any:
    """The training set where distances are measured: itself, or (``--features``) its
    vectors, cached in ``folder/features`` (process 0 alone; the others keep ``train``)."""
    if space.module is None or train is None or not team.leader:
        return train
    from diffmem.audit.features import data_identity, embed
    from diffmem.audit.inputs import Rows
    from diffmem.centres import Centres

    return embed(Rows(Centres(train), "train"), space.module, plan.batch,
                 torch.device(device), progress, folder / "features" / "train.npy",
                 f"{space.digest}:{data_identity(train)}")


def entry(runner: Runner, sub: str, label: tuple[str, float] | None, when: str,
          m: dict[str, Any], base: dict[str, Any], base_points: Tensor, memorized: Tensor,
          clean: Tensor, groups: list[Tensor]) -> dict[str, Any]:
    """A run's line of ``mitigate.json``: its copies and costs against the baseline."""
    fig = _figures(m, base, runner.points(sub, m), base_points, memorized, clean, groups)
    name, strength = ("uncured", None) if label is None else label
    plan = runner.plan
    return {"cure": name, "strength": strength, **({"when": when} if when else {}),
            **fig, "samples": f"{sub}/samples.npy",
            "sample_conditions": None if plan.cond is None
            else f"{sub}/sample_conditions.npy", "seconds": m["seconds"]}


def summarize(baseline: dict[str, Any], runs: list[dict[str, Any]], memorized: Tensor,
              clean: Tensor, target: float, space: Space, train: Any,
              seconds: dict[str, float]) -> dict[str, Any]:
    """What ``mitigate.json`` holds: the baseline, the runs measured at full size, the
    recommendation with its rule, the frontier, counts and units."""
    for r in runs:
        r["keeps_samples"] = keeps_samples(r, baseline)
    best, rule = recommend(runs, target)
    front = frontier(runs)
    return {
        "baseline": baseline, "runs": runs,
        "recommended": None if best is None else runs[best], "rule": rule,
        "frontier": [f"{runs[i]['cure']}={runs[i]['strength']:g}" for i in front],
        "target": target, "cost_factor": COST_FACTOR,
        "memorized": int(memorized.sum()), "clean": int(clean.sum()),
        "features": space.name,
        "copy_measure": ("the audit's copy verdict per sample (nn-ratio copy or reproduction "
                         "of the condition's training item)" if train is not None else
                         "detect's verdict (no training set given): the fraction of the "
                         "baseline's memorized conditions or samples still called memorized"),
        "units": {"distance": space.units,
                  "copy_fraction": "fraction of the memorized conditions' samples (the "
                                   "baseline's copies for an unconditional model)",
                  "cost": "energy distance to the uncured samples of the clean conditions, "
                          f"per condition and averaged ({space.units})",
                  "distance_ratio": "median distance to the nearest training item of the "
                                    "clean samples, over the baseline's (dimensionless)",
                  "noise_ratio": "median distance to the nearest training item of the "
                                 "memorized conditions' samples, over the baseline's clean "
                                 "samples' (dimensionless)",
                  "condition_kept": "fraction of the clean samples whose nearest training "
                                    "item carries their condition",
                  "clip_score": "mean cosine between the CLIP image embedding of a clean "
                                "sample and its prompt's text embedding (dimensionless)"},
        "seconds": seconds}


def sweep(plan: DrawPlan, cures: list[list[Cure]], folder: Path, *, train: Any = None,
          train_cond: Tensor | None = None, ctx: CureContext | None = None,
          target: float = TARGET, detect_steps: int = 50, device: str = "cpu",
          progress: bool = True, team: Team | None = None,
          retrained: Sequence[tuple[str, float, Any]] = (),
          space: Space | None = None) -> dict[str, Any]:
    """Draw and measure the baseline and every run of ``cures`` (module docstring) into
    ``folder``, then each model of ``retrained`` (``(cure name, strength, model)``: the
    model trained again with a training-time cure, drawn from the same noise into
    ``folder/retrained/NAME=STRENGTH`` and measured against the same baseline; its entry's
    ``"when"`` is ``"training"``, the others' ``"sampling"``); returns what
    ``mitigate.json`` holds (``mode``: ``exhaustive``). ``space`` (:func:`measure_space`):
    where distances are measured (default the data; the training set's vectors are cached
    in ``folder/features``). With a :class:`diffmem.parallel.Team` each run's draws (and
    detect's work) split over its processes; process 0 writes, and every process returns
    the same summary."""
    from tqdm.auto import tqdm

    team = team or SOLO
    ctx = ctx or CureContext(null=plan.null)
    space = space or Space()
    runner = Runner(plan, folder, embed_train(train, space, plan, folder, device, progress,
                                              team), train_cond, detect_steps, device, team,
                    space)
    # (folder, the model to draw from, (name, strength) or None for the baseline, when)
    runs_info: list[tuple[str, Any, tuple[str, float] | None, str]] = [
        ("baseline", lambda: plan.model, None, "")]
    runs_info += [("runs/" + "+".join(map(str, c)),
                   lambda c=c: cure_model(plan.model, c, ctx), _label(c), "sampling")
                  for c in cures]
    runs_info += [(f"retrained/{name}={strength:g}", lambda m=m: m, (name, strength),
                   "training") for name, strength, m in retrained]
    measured: list[dict[str, Any]] = []
    bar = tqdm(total=len(runs_info), desc="mitigate", unit="run",
               disable=not (progress and team.leader))
    for sub, model, _, _ in runs_info:
        measured.append(runner.measure(sub, model()))
        bar.update()
    bar.close()
    base = measured[0]
    memorized, clean, groups = _groups(plan, base["copy"])
    base_points = runner.points("baseline", base)
    baseline = entry(runner, "baseline", None, "", base, base, base_points, memorized, clean,
                     groups)
    baseline["cost"] = 0.0
    runs = [entry(runner, sub, label, when, m, base, base_points, memorized, clean, groups)
            for (sub, _, label, when), m in zip(runs_info[1:], measured[1:], strict=True)]
    return {**summarize(baseline, runs, memorized, clean, target, space, train, {
        "baseline": base["seconds"], "all": float(sum(m["seconds"] for m in measured))}),
        "mode": "exhaustive"}
