"""``mitigate-captions``: the text-to-image half of the mitigation study. Does detect find
the prompts a small text-to-image model copies, and which sampling-time cure stops the copies
at what cost?

Data (:func:`caption_data`): 16 x 16 pictures of a coloured shape on the left or right,
captioned "a red square on the left" (3 shapes x 5 colours x 2 sides = 30 captions; the
first ``colours`` colours: the example ``examples/memorize_captions.py`` takes 4, 24
captions), each caption with ``variants`` pictures (the shape shifted by up to 1.5 pixels,
scaled by 0.8 to 1.15, its colour shaded by 0.75 to 1), so that a model that learns the
caption need not copy any one of them; and three captions in words of their own
(:data:`DUPLICATED`: "the flag of zorbia", ...), each naming one picture unlike the shapes
(:func:`emblem`), held ``copies`` times in the training set: the usual cause of
memorization, a duplicated image with its own caption. The 30 shape captions are the clean
cases on which an FPR of 0.05 can be judged (at least 20).

Model: the tiny Stable Diffusion layout of :mod:`diffmem.tiny` (a character-level CLIP
tokenizer and text encoder, a UNet on 8 x 8 x 4 latents, a two-level VAE), its VAE fitted to
the pictures and its UNet trained on the captions (:func:`diffmem.finetune.fit_vae`,
:func:`diffmem.finetune.train_text_unet`; checkpointed, ``--resume`` continues).

Then, through the functions ``diffmem detect --prompts`` and ``diffmem mitigate --prompts``
run: detect ranks the prompts without the training set (each measure's AUC against the
duplicated prompts, and against those the uncured audit finds copied) and gives verdicts,
judged against the audit: without a reference, and with one (each prompt against the
prompts known not to be memorized, those the audit finds clean, other than itself, as
``detect --reference`` would judge it given prompts like them:
:func:`diffmem.verdicts.held_out`; against the other unduplicated prompts too, recorded: on
this model a caption without a duplicated picture can copy another's); the sweep
samples the model uncured and with the sampling-time cures of ``grids`` from the same seeded
noise with its own scheduler, against the training pictures as its VAE renders them (a
latent model that copies a training latent can only draw that picture's reconstruction),
with each picture's prompt, so that "condition kept" says whether a cure keeps the prompt.
``cures`` lists the runs, ``NAME=STRENGTH`` each. The second claim is ``mitigate-digits``'
claim on this model.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from diffmem import plots
from diffmem._checks import fail
from diffmem.experiments.base import Claim, Context, Experiment, Recorded, Verdict, status_of
from diffmem.experiments.mitigation import cure_claim, run_name, shown_run
from diffmem.verdicts import fpr_bound, reference_needed

COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.2), "blue": (0.1, 0.2, 1.0),
           "yellow": (1.0, 0.9, 0.1), "white": (0.95, 0.95, 0.95)}
SHAPES = ("square", "circle", "cross")
SIDES = ("left", "right")
#: The duplicated captions: each names one picture unlike the shapes (three stripes, a ring
#: round a dot, a diagonal cross: :func:`emblem`) in words no other caption uses, as a
#: duplicated web image comes with its own caption.
DUPLICATED = ("the flag of zorbia", "the emblem of quell", "the crest of vardo")
SIZE = 16

DETECT_CLAIM = ("Without the training set, detect's verdict measure (consistency: how close "
                "a prompt's own generations fall together) ranks the prompts of a "
                "text-to-image model that the audit finds copied (>= 0.75 of their samples) "
                "above the clean ones (<= 0.25): AUC >= 0.9.")
#: The measure the detection claim judges: the one detect's verdicts read. The one-step
#: screen's ``collapse`` is reported beside it; on this model the prompt barely moves the
#: unguided denoiser, and collapse ranked the copied prompts at AUC 0.27 to 0.56 in every run
#: of 2026-12-04 to 12-07 (docs/mitigate.md).
DETECT_MEASURE = "consistency"
CURE_CLAIM = ("A sampling-time cure brings the copies of a text-to-image model's memorized "
              "prompts from >= 0.75 to <= 0.1 while the prompts that did not copy keep their "
              "prompt and their distance to the data within 1.25x, and the cured copies are "
              "no further from the data than 1.25x a generalizing sample (not noise).")
VERDICT_CLAIM = ("With a reference of prompts known not to be memorized (those the audit "
                 "finds clean, each prompt judged against the others), detect's verdicts "
                 "(consistency_ratio below the reference's threshold at --fpr 0.05) find "
                 "the prompts the audit finds copied (>= 0.75 of their samples) at TPR >= "
                 "0.9 and FPR <= 0.05 on the clean ones (<= 0.25).")
TARGET_AUC = 0.9
TARGET_TPR, TARGET_FPR = 0.9, 0.05
#: Clear prompts: copied in at least ``COPIED`` of their audited samples, clean in at most
#: ``CLEAN``.
COPIED, CLEAN = 0.75, 0.25
#: Samples of each duplicated prompt shown, uncured and cured.
SHOWN = 4


def picture(shape: str, colour: str, side: str, shift: tuple[float, float] = (0.0, 0.0),
            scale: float = 1.0, shade: float = 1.0) -> np.ndarray:
    """A ``3 x 16 x 16`` picture in ``[0, 1]``: the shape, about ``7 scale`` pixels across,
    centred at column 5 (left) or 11 (right) and row 8, moved by ``shift`` (columns, rows),
    in its colour times ``shade``, on a dark background (0.05)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    cx, cy = (5.0 if side == "left" else 11.0) + shift[0], 8.0 + shift[1]
    if shape == "square":
        mask = (abs(xx - cx) < 3.5 * scale) & (abs(yy - cy) < 3.5 * scale)
    elif shape == "circle":
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < (3.8 * scale) ** 2
    else:
        mask = ((abs(xx - cx) < 1.2 * scale) & (abs(yy - cy) < 4.5 * scale)) | \
            ((abs(yy - cy) < 1.2 * scale) & (abs(xx - cx) < 4.5 * scale))
    img = np.full((SIZE, SIZE, 3), 0.05)
    img[mask] = np.array(COLOURS[colour]) * shade
    return img.transpose(2, 0, 1).astype(np.float32)


def emblem(name: str) -> np.ndarray:
    """The ``3 x 16 x 16`` picture of a duplicated caption (:data:`DUPLICATED`): red, white
    and blue stripes; a yellow ring round a green dot; a magenta diagonal cross; on the dark
    background (0.05)."""
    if name not in DUPLICATED:
        raise fail("name", f"one of {DUPLICATED}", repr(name))
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    img = np.full((SIZE, SIZE, 3), 0.05)
    if name == DUPLICATED[0]:
        img[:5], img[5:11], img[11:] = COLOURS["red"], COLOURS["white"], COLOURS["blue"]
    elif name == DUPLICATED[1]:
        r = np.hypot(xx - 8, yy - 8)
        img[(r > 4.5) & (r < 7)] = COLOURS["yellow"]
        img[r < 2] = COLOURS["green"]
    else:
        img[(abs(xx - yy) < 1.5) | (abs(xx + yy - SIZE) < 1.5)] = (0.95, 0.2, 0.95)
    return img.transpose(2, 0, 1).astype(np.float32)


@dataclass
class CaptionData:
    """The pictures (``(M, 3, 16, 16)`` in ``[0, 1]``, quantized to 8 bits as a PNG holds
    them), the captions (one per prompt), each picture's prompt, each training row's picture
    (duplicates repeated) and each prompt's label (1: its picture is duplicated)."""

    pictures: np.ndarray
    prompts: list[str]
    picture_prompt: np.ndarray
    rows: np.ndarray
    labels: np.ndarray

    @property
    def row_prompt(self) -> np.ndarray:
        """Each training row's prompt."""
        return self.picture_prompt[self.rows]

    @property
    def first_picture(self) -> list[int]:
        """Each prompt's first picture."""
        return [int(np.nonzero(self.picture_prompt == p)[0][0]) for p in range(len(self.prompts))]


def caption_data(copies: int, variants: int, seed: int = 0, colours: int = 5) -> CaptionData:
    """The data of the module docstring: the ``3 x colours x 2`` shape captions with the first
    ``colours`` of :data:`COLOURS`, each with ``variants`` pictures held once (the first
    unchanged, the others jittered, drawn from ``seed``), then the captions of
    :data:`DUPLICATED`, each with its one picture held ``copies`` times."""
    if isinstance(colours, bool) or not isinstance(colours, int) or \
            not 3 <= colours <= len(COLOURS):
        raise fail("colours", f"a number of colours from 3 to {len(COLOURS)}", colours)
    rng = np.random.default_rng(seed)
    pictures, prompts, owner, rows = [], [], [], []

    def add(prompt: str, image: np.ndarray, held: int) -> None:
        if not prompts or prompts[-1] != prompt:
            prompts.append(prompt)
        rows.extend([len(pictures)] * held)
        owner.append(len(prompts) - 1)
        pictures.append(np.round(image * 255) / 255)

    for shape in SHAPES:
        for colour in list(COLOURS)[:colours]:
            for side in SIDES:
                for v in range(variants):
                    jitter = {} if v == 0 else {"shift": tuple(rng.uniform(-1.5, 1.5, 2)),
                                                "scale": rng.uniform(0.8, 1.15),
                                                "shade": rng.uniform(0.75, 1.0)}
                    add(f"a {colour} {shape} on the {side}",
                        picture(shape, colour, side, **jitter), 1)
    for name in DUPLICATED:
        add(name, emblem(name), copies)
    labels = np.array([int(p in DUPLICATED) for p in prompts])
    return CaptionData(np.stack(pictures).astype(np.float32), prompts, np.array(owner),
                       np.array(rows), labels)


def write_prompts(path: Any, data: CaptionData) -> None:
    """The prompts as JSON lines with their labels (1: duplicated), the file that
    ``--prompts`` reads."""
    path.write_text("\n".join(json.dumps({"prompt": p, "label": int(lab)}) for p, lab in
                              zip(data.prompts, data.labels, strict=True)) + "\n")


def _train(ctx: Context, data: CaptionData) -> dict[str, Any]:
    """The tiny pipeline built, its VAE fitted and its UNet trained on the captions
    (checkpointed), saved in ``OUT/pipeline``; the training pictures as its VAE renders
    them, per training row."""
    from diffmem.finetune import fit_vae, train_text_unet
    from diffmem.prompts import read_prompts
    from diffmem.text import load_text_model
    from diffmem.tiny import sd_pipeline
    from diffmem.training import Checkpoints, fingerprint

    p = ctx.params
    base = sd_pipeline(ctx.out / "base", max_length=32, channels=tuple(p["channels"]),
                       seed=ctx.seed, timesteps=1000)
    pipe = load_text_model(base, read_prompts(ctx.out / "prompts.jsonl")).pipe
    pixels = torch.from_numpy(data.pictures) * 2 - 1
    config = {k: p[k] for k in ("copies", "variants", "colours", "vae_steps", "vae_batch",
                                "channels")} | \
        {"seed": ctx.seed}
    vae_ckpt = Checkpoints(ctx.out / "checkpoints_vae", fingerprint(config, pixels), keep=1)
    state = vae_ckpt.load_latest() if ctx.resume else None
    if state is not None:
        pipe.vae.load_state_dict(state["model"])
        pipe.vae.register_to_config(scaling_factor=float(state["scaling"]))
        pipe.vae.eval()
    else:
        fit_vae(pipe.vae, pixels, p["vae_steps"], ctx.seed, batch_size=p["vae_batch"])
        vae_ckpt.save(p["vae_steps"], {"model": pipe.vae.state_dict(),
                                       "scaling": pipe.vae.config.scaling_factor})
    with torch.no_grad():
        means = pipe.vae.encode(pixels).latent_dist.mode()
        rendered = (pipe.vae.decode(means).sample / 2 + 0.5).clamp(0, 1)
        emb = pipe.encode_prompt(data.prompts + [""], "cpu", 1, False)[0]
    rows = torch.from_numpy(data.rows)
    latents = means[rows] * pipe.vae.config.scaling_factor
    table = torch.cat([emb[torch.from_numpy(data.row_prompt)], emb[-1:]])
    config |= {k: p[k] for k in ("steps", "batch_size", "lr", "drop", "every")}
    ckpt = Checkpoints(ctx.out / "checkpoints_unet", fingerprint(config, latents), keep=2)
    run = train_text_unet(pipe.unet, pipe.scheduler, latents, table, steps=p["steps"],
                          batch_size=p["batch_size"], lr=p["lr"], drop=p["drop"],
                          seed=ctx.seed, checkpoints=ckpt, every=p["every"],
                          resume=ctx.resume, bar=ctx.bar)
    pipe.save_pretrained(str(ctx.out / "pipeline"))
    return {"rendered": rendered[rows], "pictures": rendered, "steps": run["steps"],
            "train_s": run["train_s"]}


def compute(ctx: Context) -> dict[str, Any]:
    from diffmem.audit.model import plan_draw
    from diffmem.detect import detect
    from diffmem.mitigate import cure_context, parse_cure
    from diffmem.mitigate.search import search
    from diffmem.mitigate.sweep import plan_cures, sweep
    from diffmem.prompts import read_prompts
    from diffmem.text import load_text_model
    from diffmem.verdicts import judge as give_verdicts

    p = ctx.params
    data = caption_data(p["copies"], p["variants"], ctx.seed, p["colours"])
    ctx.out.mkdir(parents=True, exist_ok=True)
    prompts = ctx.out / "prompts.jsonl"
    write_prompts(prompts, data)
    trained = _train(ctx, data)
    folder = str(ctx.out / "pipeline")
    train, train_cond = trained["rendered"], torch.from_numpy(data.row_prompt)
    n = len(data.prompts)
    plan = plan_draw(folder, tuple(train.shape[1:]), n_samples=n * p["per_prompt"],
                     train_cond=train_cond, per_condition=p["per_prompt"], sampler="pipeline",
                     steps=p["sample_steps"], seed=ctx.seed, prompts=prompts)
    cure_ctx = cure_context(plan.model, plan.null, train, train_cond)
    grids: dict[str, list[float]] = {}
    for item in p["cures"]:
        cure = parse_cure(item)
        grids.setdefault(cure.name, []).append(cure.strength)
    runs, skipped = plan_cures(plan.model, cure_ctx, list(grids), grids)
    summary = (sweep if p["exhaustive"] else search)(
        plan, runs, ctx.out / "sweep", train=train, train_cond=train_cond, ctx=cure_ctx,
        progress=ctx.progress)
    summary["not_applicable"] = skipped
    text = load_text_model(folder, read_prompts(prompts))
    found = detect(text.model, torch.arange(n), torch.tensor(n), n_noise=p["n_noise"],
                   steps=p["sample_steps"], confirm_steps=p["confirm_steps"], seed=ctx.seed,
                   labels=torch.from_numpy(data.labels), guidance=text.guidance_applied,
                   progress=ctx.progress)
    give_verdicts(found)
    return {"summary": summary, "detect": found, "data": data, "trained": trained,
            "folder": ctx.out / "sweep"}


def _copied_by_prompt(folder: Any, summary: Mapping[str, Any], n: int) -> list[float]:
    """Per prompt, the fraction of its uncured samples the audit finds copied."""
    base = summary["baseline"]
    copy = np.load(folder / "baseline" / "measure.npz")["copy"]
    cond = np.load(folder / base["sample_conditions"])
    return [float(copy[cond == c].mean()) for c in range(n)]


def _rates(flags: list[bool], copied: list[float]) -> dict[str, Any]:
    """TPR of ``flags`` over the prompts the audit finds copied (>= :data:`COPIED` of their
    samples), FPR over the clean ones (<= :data:`CLEAN`), and their counts."""
    pos = [f for f, c in zip(flags, copied, strict=True) if c >= COPIED]
    neg = [f for f, c in zip(flags, copied, strict=True) if c <= CLEAN]
    return {"tpr": float(np.mean(pos)) if pos else None,
            "fpr": float(np.mean(neg)) if neg else None, "n_copied": len(pos),
            "n_clean": len(neg)}


def _auc(scores: list[float], marks: list[bool]) -> float | None:
    """The ROC AUC of ``scores`` against ``marks`` (``None`` unless both kinds occur)."""
    from diffmem.detect import roc

    if not any(marks) or all(marks):
        return None
    return roc(torch.tensor(scores, dtype=torch.float64), torch.tensor(marks))["auc"]


def record(ctx: Context, raw: dict[str, Any]) -> Recorded:
    from diffmem.verdicts import FPR, held_out

    summary, found, data = raw["summary"], raw["detect"], raw["data"]
    folder = raw["folder"]
    n = len(data.prompts)
    copied = _copied_by_prompt(folder, summary, n)
    entries = sorted(found.entries, key=lambda e: e["condition"])
    clear = [i for i, c in enumerate(copied) if c >= COPIED or c <= CLEAN]
    measures: dict[str, Any] = {}
    for name in found.measures:
        scores = [e.get(name) for e in entries]
        if any(s is None for s in scores):
            continue
        measures[name] = {"auc": (found.roc.get(name) or {}).get("auc"),
                          "auc_copied": _auc(scores, [c >= 0.5 for c in copied]),
                          "auc_clear": _auc([scores[i] for i in clear],
                                            [copied[i] >= COPIED for i in clear])}
    flags = [bool(e.get("memorized")) for e in entries]

    def against(clean: list[int]) -> dict[str, Any]:
        """Each prompt judged with the prompts ``clean`` (indices into ``found.entries``)
        other than itself as the reference (none when fewer than two: no reference)."""
        if len(clean) < 2:
            return {"flagged": [None] * len(entries), "tpr": None, "fpr": None,
                    "n_copied": 0, "n_clean": 0, "n_reference": 0, "fpr_target": FPR}
        by = dict(zip([e["condition"] for e in found.entries], held_out(found, clean, FPR),
                      strict=True))
        flagged = [bool(by[e["condition"]]) for e in entries]
        return {"flagged": flagged, **_rates(flagged, copied), "n_reference": len(clean) - 1,
                "fpr_target": FPR}

    conditions = [e["condition"] for e in found.entries]
    audit_clean = [j for j, c in enumerate(conditions) if copied[c] <= CLEAN]
    unduplicated = [j for j, c in enumerate(conditions) if data.labels[c] == 0]
    ranked = sorted(entries, key=lambda e: -(e.get(found.primary) or -np.inf))
    metrics = {**summary, "prompts": data.prompts, "labels": data.labels.tolist(),
               "copied_by_prompt": copied, "detect": {
                   "primary": found.primary, "measures": measures,
                   "duplicated_ranks": [i + 1 for i, e in enumerate(ranked)
                                        if data.labels[e["condition"]] == 1],
                   "flagged": flags, **_rates(flags, copied),
                   "consistency_ratio": [e.get("consistency_ratio") for e in entries],
                   "rule": (found.verdict or {}).get("rule"),
                   "reference": against(audit_clean),
                   "reference_unduplicated": against(unduplicated),
                   "seconds": found.settings.get("seconds")},
               "training_steps": raw["trained"]["steps"], "train_s": raw["trained"]["train_s"],
               "items": int(len(data.rows)), "pictures": int(len(data.pictures))}
    shown = shown_run(summary)
    metrics["shown"] = run_name(shown)
    base = np.load(folder / summary["baseline"]["samples"])
    cured = np.load(folder / shown["samples"])
    cond = np.load(folder / summary["baseline"]["sample_conditions"])
    dup = [int(c) for c in np.nonzero(data.labels)[0]]
    clean = [int(c) for c in np.nonzero(data.labels == 0)[0][:2]]
    per = min(SHOWN, ctx.params["per_prompt"])
    picks = [int(i) for c in dup + clean for i in np.nonzero(cond == c)[0][:per]]
    first = data.first_picture
    pictures = raw["trained"]["pictures"]
    metrics["shown_prompts"] = [data.prompts[c] for c in dup + clean]
    arrays = {"uncured": base[picks], "cured": cured[picks], "per_prompt": per,
              "pictures": pictures[[first[c] for c in dup + clean]].numpy()}
    return Recorded(metrics, arrays)


def judge(metrics: Mapping[str, Any], params: Mapping[str, Any]) -> Verdict:
    found = metrics["detect"]
    measures = found["measures"]
    auc = (measures.get(DETECT_MEASURE) or {}).get("auc_clear")
    others = ", ".join(f"{k} {v['auc_clear']:.2f}" for k, v in measures.items()
                       if k != DETECT_MEASURE and v.get("auc_clear") is not None)
    labels = (measures.get(DETECT_MEASURE) or {}).get("auc")
    against = "" if labels is None else \
        f"; against the duplicated prompts (labels): {labels:.2f}"
    verdicts = f"verdicts without a reference ({found['rule']}): {_rated(found)}"
    n_pos = sum(c >= COPIED for c in metrics["copied_by_prompt"])
    n_neg = sum(c <= CLEAN for c in metrics["copied_by_prompt"])
    if auc is None:
        detected = Claim(DETECT_CLAIM, status_of(False, False),
                         f"{DETECT_MEASURE} was not computed for every prompt or the audit "
                         f"found not both kinds ({n_pos} copied, {n_neg} clean prompts)")
    else:
        detected = Claim(DETECT_CLAIM, status_of(auc >= TARGET_AUC),
                         f"{DETECT_MEASURE} AUC {auc:.2f} on {n_pos} copied and {n_neg} clean "
                         f"prompts (others: {others}){against}; the duplicated prompts rank "
                         f"{found['duplicated_ranks']} of {len(metrics['prompts'])} by the "
                         f"primary {found['primary']}")
    ref = found.get("reference")
    other = found.get("reference_unduplicated")
    undup = "" if other is None else \
        f"; against the other unduplicated prompts as the reference: {_rated(other)}"
    if ref is None:
        referenced = Claim(VERDICT_CLAIM, status_of(False, False), "not recorded")
    else:
        judgeable, few = _judgeable(ref)
        referenced = Claim(VERDICT_CLAIM, status_of(
            judgeable and ref["tpr"] >= TARGET_TPR and ref["fpr"] <= TARGET_FPR, judgeable),
            f"each prompt against the {ref['n_reference']} or more others the audit finds "
            f"clean at --fpr {ref['fpr_target']:g}: {_rated(ref)}{few}; {verdicts}{undup}")
    return Verdict((detected, referenced, cure_claim(metrics, CURE_CLAIM)))


def _judgeable(ref: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether the verdicts against the audit's clean prompts can judge the claim, and why
    not. A clean prompt is judged against the ``m - 1`` others, and below
    :func:`~diffmem.verdicts.reference_needed` of them (19 at 0.05) the rule's own bound
    ``1 / m`` (:func:`~diffmem.verdicts.fpr_bound`) is above the target: the lowest clean
    prompt is flagged whatever the model, so an FPR within that bound with the TPR met says
    the run had too few clean prompts, not that the verdicts fail."""
    if ref["tpr"] is None or ref["fpr"] is None:
        return False, ""
    n, target = ref["n_reference"], ref["fpr_target"]
    bound = fpr_bound(n, target)
    if (n < reference_needed(target) and ref["tpr"] >= TARGET_TPR
            and TARGET_FPR < ref["fpr"] <= bound):
        return False, (f" (too few clean prompts to judge: against {n} others the rule's "
                       f"bound is {bound:.3g}, above {TARGET_FPR:g})")
    return True, ""


def _rated(found: Mapping[str, Any]) -> str:
    """TPR and FPR with the counts behind them (one prompt of 19 is 0.053, above 0.05)."""
    if found["tpr"] is None or found["fpr"] is None:
        return "not both kinds of prompt"
    pos, neg = found["n_copied"], found["n_clean"]
    return (f"TPR {found['tpr']:.3g} ({round(found['tpr'] * pos)} of {pos} copied prompts), "
            f"FPR {found['fpr']:.3g} ({round(found['fpr'] * neg)} of {neg} clean ones)")


def draw(rec: Recorded, params: Mapping[str, Any]) -> dict[str, Any]:
    fig, ax = plots.figure(1, 1, size=6.5)
    plots.mitigation_plane(ax[0, 0], rec.metrics, title="text-to-image model")
    fig.tight_layout()
    per = int(rec.array("per_prompt"))
    pics = rec.array("pictures")
    uncured, cured = rec.array("uncured"), rec.array("cured")
    rows = []
    for k, prompt in enumerate(rec.metrics["shown_prompts"]):
        part = slice(k * per, (k + 1) * per)
        short = prompt.removeprefix("a ").replace(" on the ", " ")
        rows.append((textwrap.fill(f"{short} uncured", 12),
                     np.concatenate([pics[k:k + 1], uncured[part]])))
        rows.append((textwrap.fill(rec.metrics["shown"].replace("=", " "), 12),
                     np.concatenate([pics[k:k + 1], cured[part]])))
    return {"plane": fig, "samples": plots.image_rows(rows, per + 1, size=0.9)}


EXPERIMENT = Experiment(
    name="mitigate-captions",
    cost=300,
    summary="A tiny text-to-image model (Stable Diffusion's layout) trained on 33 captions, "
            "three of them one duplicated picture: detect ranks the prompts it copies "
            "without the training set, and the sampling-time cures of diffmem.mitigate on "
            "the plane of copies against cost. Needs diffusers and transformers.",
    claim=f"{DETECT_CLAIM} {VERDICT_CLAIM} {CURE_CLAIM}",
    defaults={"copies": 20, "variants": 20, "colours": 5, "channels": [32, 64], "steps": 3000,
              "vae_steps": 300, "vae_batch": 256,
              "batch_size": 16, "lr": 1e-3, "drop": 0.1, "every": 500, "per_prompt": 32,
              "sample_steps": 25, "confirm_steps": 10, "n_noise": 4, "exhaustive": False,
              "cures": ["tikhonov=0.05", "tikhonov=0.2", "guidance=1.5", "guidance=0.5",
                        "guidance-schedule=0.4", "guidance-schedule=0.8", "nn-guidance=3",
                        "nn-guidance=3.1", "nn-guidance=3.2", "amg=1", "amg=4",
                        "prompt-opt=1", "prompt-opt=0.5", "random-tokens=2",
                        "random-tokens=8", "embedding-noise=0.5", "embedding-noise=1",
                        "attention-rescale=1.25"]},
    quick={"variants": 10, "steps": 2400, "vae_steps": 200, "every": 400, "per_prompt": 16,
           "cures": ["tikhonov=0.2", "guidance-schedule=0.8", "nn-guidance=3",
                     "nn-guidance=3.2", "random-tokens=8", "attention-rescale=1.25"]},
    compute=compute, record=record, judge=judge, draw=draw,
    requires=("diffusers", "transformers"),
)
