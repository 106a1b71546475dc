"""``mitigate-digits``: which sampling-time cure stops a trained model from copying, and at
what cost?

A class-conditional diffusers ``UNet2DModel`` (the ``detect-digits`` data, training and seed
of the model of the same name, so that ``reproduce`` trains it once for both: label dropout
to a null class) is trained on 8x8 digits whose conditions are ``n_classes`` whole
classes and ``n_single`` conditions that each name one training image repeated 5, 15 or 50
times; the single-image conditions are memorized. :func:`diffmem.mitigate.sweep.sweep` then
samples the model uncured and with every sampling-time cure of :mod:`diffmem.mitigate` over
its grid (``per_cure > 0``: its strongest ``per_cure`` strengths), and the chains of
``combine`` (a fixed cure, then one swept), all from the same
seeded noise with the model's DDIM scheduler, and measures each run's copies (the audit's
verdict: nn-ratio copy or reproduction, on the memorized conditions' samples) against its
cost on the clean conditions (energy distance to the uncured samples, distance to the data
and condition kept). The claim is the issue's: some cure brings the copies from at least 0.75
to at most 0.1 while the clean conditions keep their class and their distance to the data
within 1.25x. The training-time cures of ``retrain`` (:data:`RETRAIN`: deduplication,
label randomization, the loss filter) each train the model again, and their samples, drawn
from the same noise, are measured against the same uncured baseline, on the same plane; the
claim is judged on the sampling-time cures. The text-to-image half of the study is
``mitigate-captions`` (:mod:`diffmem.experiments.captions`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from diffmem import plots
from diffmem._checks import fail
from diffmem.experiments.base import (
    Claim,
    Context,
    Experiment,
    Recorded,
    Verdict,
    status_of,
)
from diffmem.experiments.detection import MODELS, _conditional_data, _dedupe, model_seed
from diffmem.experiments.regularize import train_run

CLAIM = ("A sampling-time cure brings the copies of a trained model's memorized conditions "
         "from >= 0.75 to <= 0.1 while the conditions that did not copy keep their class and "
         "their distance to the data within 1.25x, and the cured copies are no further from "
         "the data than 1.25x a generalizing sample (not noise).")
SHOWN = 6


#: The training-time cures ``retrain`` may name: how each trains the model again.
RETRAIN = {
    "dedupe": "the distinct images only, each with its first condition (the audit's exact "
              "duplicate search)",
    "label-randomization": "each item's label replaced with probability p by a random label "
                           "(Somepalli et al.'s caption randomization, for labels)",
    "loss-filter": "items whose |out(y) - out(null)| per coordinate exceeds tau left out of "
                   "the loss (Wen et al.'s training filter)"}


def _retrain_specs(specs: list[str]) -> list[tuple[str, float]]:
    """``NAME=VALUE`` items of ``retrain`` as ``(name, value)``; ``ValueError`` naming
    ``retrain`` on an unknown name or a value that is not a finite number."""
    parsed = []
    for spec in specs:
        name, _, text = str(spec).partition("=")
        try:
            value = float(text or 1)
        except ValueError:
            value = math.nan
        if name not in RETRAIN or not math.isfinite(value) or value < 0:
            raise fail("retrain", f"NAME=VALUE with NAME one of {tuple(RETRAIN)} and VALUE a "
                       "finite number >= 0", repr(spec))
        parsed.append((name, value))
    return parsed


def _retrain(ctx: Context, specs: list[tuple[str, float]], train: torch.Tensor,
             labels: torch.Tensor, distinct: tuple[torch.Tensor, torch.Tensor]
             ) -> tuple[list[Any], dict[str, Any]]:
    """The model trained again with each training-time cure of ``specs`` (``(name, value)``,
    a name of :data:`RETRAIN`), as ``(name, value, model)`` for the sweep, and each one's
    training figures."""
    from diffmem.models import wrap_diffusers

    p = ctx.params
    models, info = [], {}
    for name, value in specs:
        data, conds, cure = train, labels, {}
        if name == "dedupe":
            data, conds = distinct
        else:
            cure = {name.replace("-", "_"): value}
        run = train_run(ctx, f"{p['model']}-{name}={value:g}", data, 0.0, labels=conds,
                        p_uncond=p["p_uncond"], scheduler=MODELS[p["model"]],
                        seed=model_seed(ctx, p["model"]), cure=cure)
        model = wrap_diffusers(run["model"], run["scheduler"],
                               name=f"{p['model']} retrained: {name}={value:g}")
        models.append((name, value, model))
        info[f"{name}={value:g}"] = {"train_s": run["train_s"], "filtered": run["filtered"],
                                     "items": int(data.shape[0])}
    return models, info


def compute(ctx: Context) -> dict[str, Any]:
    from diffmem.audit.model import DrawPlan
    from diffmem.centres import Centres
    from diffmem.conditions import per_sample
    from diffmem.mitigate import CURES, CureContext
    from diffmem.mitigate.search import search
    from diffmem.mitigate.sweep import plan_cures, sweep
    from diffmem.models import wrap_diffusers

    p = ctx.params
    specs = _retrain_specs(list(p["retrain"]))  # checked before anything is trained
    train, labels, repeats = _conditional_data(p)
    run = train_run(ctx, p["model"], train, 0.0, labels=labels, p_uncond=p["p_uncond"],
                    scheduler=MODELS[p["model"]], seed=model_seed(ctx, p["model"]))
    model = wrap_diffusers(run["model"], run["scheduler"], name=p["model"])
    distinct_train, distinct_labels = _dedupe(train, labels)
    table = torch.arange(int(labels.max()) + 1)
    null = torch.tensor(run["null"])
    plan = DrawPlan(model=model, n=len(table) * p["per_condition"],
                    cond=per_sample(table, p["per_condition"]), conditions=table,
                    sampler="pipeline", steps=p["sample_steps"], seed=ctx.seed,
                    scheduler_class="DDIMScheduler", eta=None, null=null)
    cure_ctx = CureContext(null=null, train=Centres(distinct_train), train_cond=distinct_labels)
    grids = None if p["per_cure"] == 0 else {
        name: cls.grid[-p["per_cure"]:] for name, cls in CURES.items()}
    runs, skipped = plan_cures(model, cure_ctx, grids=grids, combine=p["combine"])
    retrained, info = _retrain(ctx, specs, train, labels,
                               (distinct_train, distinct_labels))
    summary = (sweep if p["exhaustive"] else search)(
        plan, runs, ctx.out / "sweep", train=distinct_train, train_cond=distinct_labels,
        ctx=cure_ctx, progress=ctx.progress, retrained=retrained)
    summary["not_applicable"] = skipped
    summary["retraining"] = info
    return {"summary": summary, "repeats": repeats, "train": distinct_train,
            "steps": run["steps"], "train_s": run["train_s"], "folder": ctx.out / "sweep"}


def record(ctx: Context, raw: dict[str, Any]) -> Recorded:
    import numpy as np

    summary = raw["summary"]
    folder = raw["folder"]
    metrics = {**summary, "training_steps": raw["steps"], "train_s": raw["train_s"],
               "repeats": raw["repeats"], "n_classes": ctx.params["n_classes"]}
    shown = shown_run(summary)
    metrics["shown"] = run_name(shown)
    base = np.load(folder / summary["baseline"]["samples"])
    cured = np.load(folder / shown["samples"])
    cond = np.load(folder / summary["baseline"]["sample_conditions"])
    per = int((cond == 0).sum())
    first = [int(np.nonzero(cond == c)[0][0]) for c in range(int(cond.max()) + 1)]
    single = first[ctx.params["n_classes"]:][:SHOWN]
    classes = first[: ctx.params["n_classes"]][:2]
    arrays = {"uncured": (base[single + classes] + 1) / 2,
              "cured": (cured[single + classes] + 1) / 2, "per_condition": per}
    return Recorded(metrics, arrays)


def shown_run(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The run a figure shows beside the uncured samples: the recommended one, else the
    full-size run with the fewest copies (the uncured run when there is none)."""
    return summary["recommended"] or min(
        summary["runs"], key=lambda r: (r["copy_fraction"], r["cost"] or 0.0),
        default=summary["baseline"])


def run_name(run: Mapping[str, Any]) -> str:
    """``NAME=STRENGTH`` of a run, ``uncured`` for the baseline."""
    return "uncured" if run["strength"] is None else f"{run['cure']}={run['strength']:g}"


def judge(metrics: Mapping[str, Any], params: Mapping[str, Any]) -> Verdict:
    return Verdict((cure_claim(metrics, CLAIM),))


def cure_claim(metrics: Mapping[str, Any], claim: str) -> Claim:
    """``claim`` judged on a sweep's summary (``metrics``): confirmed by the cheapest
    sampling-time run that brings the memorized conditions' copies from at least 0.75 to
    the target while keeping the samples; otherwise the frontier and the closest runs."""
    base = metrics["baseline"]["copy_fraction"]
    sampling = [r for r in metrics["runs"] if r.get("when") != "training"]
    retrained = "; retrained: " + ", ".join(
        f"{r['cure']}={r['strength']:g} copies {r['copy_fraction']:.2f} (distance "
        f"x{r.get('distance_ratio') or 0:.2f}, kept {r.get('condition_kept') or 0:.2f})"
        for r in metrics["runs"] if r.get("when") == "training")
    retrained = "" if retrained == "; retrained: " else retrained
    front = ", ".join(metrics["frontier"])
    if metrics["memorized"] == 0 or base < 0.75:
        return _claim(claim, False, f"the uncured model copies {base:.2f} of its memorized "
                          "conditions' samples: nothing to cure", judgeable=False)
    ok = [r for r in sampling if r["copy_fraction"] <= metrics["target"]
          and r.get("keeps_samples") and r["cost"] is not None]
    if ok:
        best = min(ok, key=lambda r: r["cost"])
        return _claim(claim, True, f"{best['cure']}={best['strength']:g}: copies {base:.2f} "
                          f"-> {best['copy_fraction']:.2f}, clean conditions' distance to the "
                          f"data x{best['distance_ratio']:.2f}, condition kept "
                          f"{best['condition_kept']:.2f} (uncured "
                          f"{metrics['baseline']['condition_kept']:.2f}), cured copies "
                          f"x{best.get('noise_ratio') or 0:.2f} a clean sample's distance"
                          + retrained)
    lowest = min((r for r in sampling if r.get("keeps_samples")),
                 key=lambda r: r["copy_fraction"], default=None)
    keeps = ("none keeps the samples" if lowest is None else
             f"the fewest copies while keeping the samples: {lowest['cure']}="
             f"{lowest['strength']:g} at {lowest['copy_fraction']:.2f}")
    clean_only = [r for r in sampling if r["copy_fraction"] <= metrics["target"]
                  and (r.get("distance_ratio") or 9) <= 1.25
                  and (r.get("noise_ratio") or 0) > 1.25]
    if clean_only:
        r = min(clean_only, key=lambda r: r["cost"] or 0.0)
        keeps += (f"; {r['cure']}={r['strength']:g} reaches {r['copy_fraction']:.2f} with the "
                  f"clean conditions kept (distance x{r['distance_ratio']:.2f}) but its cured "
                  f"copies lie x{r['noise_ratio']:.2f} a clean sample's distance from the "
                  "data: noise")
    front = front or ("no run drawn at full size: the search's screen ruled every cure out "
                      "(its estimates under \"screen\")")
    return _claim(claim, False, f"no run brings the copies ({base:.2f} uncured) to "
                      f"{metrics['target']:g} while keeping the samples; {keeps}; frontier: "
                      f"{front}" + retrained)


def _claim(claim: str, holds: bool, finding: str, judgeable: bool = True) -> Claim:
    return Claim(claim, status_of(holds, judgeable), finding)


def draw(rec: Recorded, params: Mapping[str, Any]) -> dict[str, Any]:
    fig, ax = plots.figure(1, 1, size=6.5)
    plots.mitigation_plane(ax[0, 0], rec.metrics)
    fig.tight_layout()
    rows = [("uncured", rec.array("uncured")), (rec.metrics["shown"], rec.array("cured"))]
    return {"plane": fig, "samples": plots.image_rows(rows, len(rec.array("uncured")),
                                                       size=0.8)}


EXPERIMENT = Experiment(
    name="mitigate-digits",
    cost=60,
    summary="Which sampling-time cure stops a trained class-conditional diffusers UNet "
            "copying its single-image conditions, and at what cost: every cure of "
            "diffmem.mitigate and two chains on the plane of copies against cost. Needs "
            "diffusers.",
    claim=CLAIM,
    defaults={"n_classes": 10, "per_class": 40, "n_single": 12, "steps": 3000, "every": 1000,
              "p_uncond": 0.1, "lr": 2e-3, "batch_size": 32, "width": 16,
              "per_condition": 16, "sample_steps": 25, "model": "scaled-linear-v",
              "combine": ["guidance-schedule=0.6+nn-guidance", "tikhonov=0.05+nn-guidance"],
              "per_cure": 0, "exhaustive": False,
              "retrain": ["dedupe=1", "label-randomization=0.3", "loss-filter=0.3"]},
    # Quick: detect-digits' quick data and training, so that under reproduce its
    # linear-eps model is trained once for both; no retraining (the claim is judged on the
    # sampling-time cures; each retraining costs a training). Its scaled-linear-v model,
    # trained in batches of 64, copies so firmly that no cure reached 0.1 on 2026-12-07 (amg
    # 4 left 0.17 to 0.22), where linear-eps gave amg 2: copies 0.02 (docs/mitigate.md).
    quick={"n_classes": 8, "per_class": 30, "n_single": 6, "steps": 1200, "every": 400,
           "batch_size": 64, "per_condition": 8, "sample_steps": 20, "retrain": [],
           "model": "linear-eps"},
    compute=compute, record=record, judge=judge, draw=draw, requires=("diffusers",),
)
