"""``detect-digits``: detecting memorized conditions without the training set, on a model
trained here.

A class-conditional diffusers ``UNet2DModel`` (``DDPMScheduler``, label dropout to a null class
with probability ``p_uncond``) is trained on 8x8 digits under two kinds of conditions, as in web
data where duplicated captions name one image: ``n_classes`` whole digit classes of
``per_class`` images each, and ``n_single`` conditions that each name a single training image,
repeated ``duplicates`` times in the training set (duplicated captions come with duplicated
images).
Ground truth: the audit's per-condition copy fraction (nn-ratio) of ``per_condition`` DDIM
samples (memorized when at least half are copies). The detectors of :mod:`diffmem.detect`
never see the training set; their AUC against that ground truth is judged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from diffmem import images, plots
from diffmem.audit import audit
from diffmem.experiments.base import (
    CONFIRMED,
    INCONCLUSIVE,
    NOT_REPRODUCED,
    Claim,
    Context,
    Experiment,
    Recorded,
    Verdict,
)
from diffmem.experiments.regularize import train_run

CLAIM = ("Without the training set, the gap between a model's conditional and unconditional "
         "noise predictions over the first sampling steps tells memorized conditions from "
         "generalizing ones (Wen et al.'s detector; target AUC >= 0.95).")
TARGET_AUC = 0.95
#: A condition whose samples are at least this often copies is memorized (ground truth).
MEMORIZED = 0.5
SAMPLES_SEED = 8_000


def _data(p: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Training images in [-1, 1] ``(N, 1, 8, 8)`` and their conditions: ``per_class``
    digits of each class ``0..n_classes-1`` (condition = class), then ``n_single`` further
    digits, each its own condition ``n_classes + i``."""
    (flat, _), (digit_labels, _) = images.digit_split(1500, labels=True)
    chosen, conds = [], []
    for c in range(p["n_classes"]):
        rows = torch.nonzero(digit_labels == c).squeeze(1)[: p["per_class"]]
        chosen.append(rows)
        conds.append(torch.full((rows.numel(),), c))
    used = torch.cat(chosen)
    rest = torch.tensor([i for i in range(flat.shape[0]) if i not in set(used.tolist())])
    singles = rest[: p["n_single"]].repeat_interleave(p["duplicates"])
    chosen.append(singles)
    conds.append(torch.arange(p["n_classes"], p["n_classes"] + p["n_single"])
                 .repeat_interleave(p["duplicates"]))
    index = torch.cat(chosen)
    return (flat[index].reshape(-1, 1, 8, 8) * 2 - 1).float(), torch.cat(conds)


def compute(ctx: Context) -> dict[str, Any]:
    from diffusers import DDIMScheduler

    from diffmem.detect import detect
    from diffmem.models import wrap_diffusers
    from diffmem.pipeline import pipeline_sample

    p = ctx.params
    train, labels = _data(p)
    run = train_run(ctx, "conditional", train, 0.0, labels=labels, p_uncond=p["p_uncond"])
    model = wrap_diffusers(run["model"], run["scheduler"], name="class-conditional UNet")
    n_cond = int(labels.max()) + 1
    table = torch.arange(n_cond)
    cond = table.repeat_interleave(p["per_condition"])
    z = torch.randn(cond.shape[0], 1, 8, 8, generator=ctx.generator(SAMPLES_SEED))
    ddim = DDIMScheduler.from_config(run["scheduler"].config)
    assert model.network is not None
    samples = pipeline_sample(model.network["net"], z, ddim, p["sample_steps"], cond=cond,
                              eta=0.0)
    found = detect(model, table, torch.tensor(run["null"]), n_noise=p["n_noise"],
                   first_steps=p["first_steps"], steps=p["sample_steps"], seed=ctx.seed,
                   progress=ctx.progress)
    return {"train": train, "labels": labels, "samples": samples.clamp(-1, 1), "cond": cond,
            "detect": found, "steps": run["steps"], "train_s": run["train_s"]}


def record(ctx: Context, raw: dict[str, Any]) -> Recorded:
    from diffmem.detect import MEASURES, roc

    p = ctx.params
    to01 = lambda v: ((v + 1) / 2).reshape(v.shape[0], -1).to(torch.float64)  # noqa: E731
    # the duplicates counted once: a copy's second-nearest item must be another image
    _, inverse = torch.unique(raw["train"].flatten(1), dim=0, return_inverse=True)
    keep = torch.stack([torch.nonzero(inverse == j)[0, 0]
                        for j in range(int(inverse.max()) + 1)])
    result = audit(to01(raw["samples"]), to01(raw["train"][keep]), sample_cond=raw["cond"],
                   train_cond=raw["labels"][keep], bootstrap=100, seed=ctx.seed)
    copied = {e["condition"]: e["nn_ratio"]["fraction"] for e in result.conditions}
    entries = raw["detect"].conditions
    truth = torch.tensor([int(copied[e["condition"]] >= MEMORIZED) for e in entries])
    metrics: dict[str, Any] = {
        "n_classes": p["n_classes"], "per_class": p["per_class"], "n_single": p["n_single"],
        "training_steps": raw["steps"], "train_s": raw["train_s"],
        "conditions": [{**e, "kind": "single image" if e["condition"] >= p["n_classes"]
                        else "digit class", "copied": copied[e["condition"]],
                        "memorized": int(t)} for e, t in zip(entries, truth, strict=True)],
        "seconds_per_condition": sum(e["seconds"] for e in entries) / len(entries),
        "units": {"copied": "fraction of the condition's samples that are nn-ratio copies",
                  "score": "noise units (RMS per coordinate)", "collapse": "dimensionless"},
        "auc": {}, "tpr_at_1pct_fpr": {}, "roc": {}}
    if 0 < int(truth.sum()) < truth.numel():
        for name in MEASURES:
            r = roc(torch.tensor([e[name] for e in entries]), truth)
            metrics["auc"][name] = r["auc"]
            metrics["tpr_at_1pct_fpr"][name] = r["tpr_at_1pct_fpr"]
            metrics["roc"][name] = {"fpr": r["fpr"], "tpr": r["tpr"]}
    show = [raw["cond"] == c for c in range(int(raw["labels"].max()) + 1)]
    arrays = {f"samples_{c}": (raw["samples"][m][: p["show"]] + 1) / 2
              for c, m in enumerate(show)}
    return Recorded(metrics, arrays)


def judge(metrics: Mapping[str, Any], params: Mapping[str, Any]) -> Verdict:
    conds = metrics["conditions"]
    n_mem = sum(c["memorized"] for c in conds)
    if not metrics["auc"]:
        return Verdict((Claim(CLAIM, INCONCLUSIVE, f"{n_mem} of {len(conds)} conditions "
                              "memorized by the audit's ground truth: both kinds are needed "
                              "to measure an AUC"),))
    auc = metrics["auc"]
    finding = (f"{n_mem} of {len(conds)} conditions memorized (audit ground truth); AUC: "
               f"score {auc['score']:.3f}, collapse {auc['collapse']:.3f}; TPR at 1% FPR: "
               f"score {metrics['tpr_at_1pct_fpr']['score']:.3f}; "
               f"{metrics['seconds_per_condition']:.2f} s per condition")
    status = CONFIRMED if auc["score"] >= TARGET_AUC else NOT_REPRODUCED
    return Verdict((Claim(CLAIM, status, finding),))


def draw(rec: Recorded, params: Mapping[str, Any]) -> dict[str, Any]:
    m = rec.metrics
    fig, ax = plots.figure(1, 2, size=4.2)
    conds = m["conditions"]
    for kind, color in (("digit class", "C0"), ("single image", "C3")):
        pts = [c for c in conds if c["kind"] == kind]
        ax[0, 0].scatter([c["copied"] for c in pts], [c["score"] for c in pts], color=color,
                         label=kind)
    ax[0, 0].set(xlabel="copied fraction of its samples (audit)",
                 ylabel="detection score |eps(c) - eps(null)|", title="per condition")
    ax[0, 0].legend(fontsize=7)
    for name, r in m["roc"].items():
        ax[0, 1].plot(r["fpr"], r["tpr"], label=f"{name}: AUC {m['auc'][name]:.3f}")
    ax[0, 1].plot([0, 1], [0, 1], color="0.6", lw=0.8, ls=":")
    ax[0, 1].set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    if m["roc"]:
        ax[0, 1].legend(fontsize=7)
    fig.tight_layout()
    rows = [(f"cond {c['condition']} ({c['kind']})", rec.array(f"samples_{c['condition']}"))
            for c in conds]
    return {"detection": fig, "samples": plots.image_rows(rows, params["show"], size=0.8)}


DETECT_DIGITS = Experiment(
    name="detect-digits",
    summary="A class-conditional diffusers UNet2DModel trained with label dropout on 8x8 "
            "digits, some conditions whole digit classes and some single images; the "
            "training-set-free detectors' AUC against the audit's per-condition copy "
            "fraction. Needs diffusers.",
    claim=CLAIM,
    defaults={"n_classes": 10, "per_class": 60, "n_single": 10, "duplicates": 10,
              "steps": 8000, "every": 1000,
              "p_uncond": 0.1, "lr": 2e-3, "batch_size": 64, "width": 32,
              "per_condition": 16, "sample_steps": 50, "n_noise": 4, "first_steps": 5,
              "show": 8},
    quick={"n_classes": 4, "per_class": 30, "n_single": 6, "steps": 2000, "every": 500,
           "batch_size": 32, "width": 16, "per_condition": 8, "sample_steps": 25, "show": 6},
    compute=compute, record=record, judge=judge, draw=draw, requires=("diffusers",),
)
