"""Closed-form and learned scores on images.

* ``squares-closed-form``: the paper's two squares; the empirical denoiser (exact copies)
  and the Tikhonov one with ``c = 0.05`` (the squares plus pixel noise), sampled with the
  40-step EDM sampler.
* ``squares-unet``: EDM U-Nets of several widths trained on the squares; exact-match fraction
  of their samples during training.
* ``digits``: scikit-learn's 8x8 digits; empirical, Tikhonov and an MLP score; memorized
  fraction by the nearest-neighbour ratio and by tolerance, samples beside their nearest
  training digits.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from diffmem import images, plots
from diffmem.audit import denoiser_gap, follows_down_to
from diffmem.edm import closed_form_denoiser, edm_sample, karras_sigmas
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
from diffmem.experiments.common import gap_text, network_score
from diffmem.metrics import fraction_within, nearest, nn_ratio, rms_per_coordinate
from diffmem.models import ModelScore
from diffmem.samplers import sample_ode
from diffmem.schedules import EDM, get_schedule
from diffmem.scores import EmpiricalScore, TikhonovScore
from diffmem.training import half_life_from_decay

#: Seed offsets of the initial noise: closed-form squares, digits, U-Net samples.
SQUARES_SEED, DIGITS_SEED, UNET_SEED = 700, 800, 900
#: Bootstrap resamples of the nn-ratio fraction (squares: only the fraction is reported).
SQUARES_BOOTSTRAP, DIGITS_BOOTSTRAP = 200, 500
#: Exact copies: every sample matches a training square and sits on it to round-off.
EXACT_RESIDUAL = 1e-6
#: Tikhonov with small c acts like a Gaussian KDE of bandwidth sqrt(c): the per-pixel RMS
#: residual should be sqrt(c) within this relative margin.
KDE_MARGIN = 0.2
#: "Copies training digits": more than this fraction of samples pass the nn-ratio test.
COPIES = 0.9
#: A U-Net "memorizes" once at least half of its samples are exact copies.
MEMORIZED = 0.5

SQUARES_CLAIM = ("The empirical score returns exact copies of the training images; the "
                 "Tikhonov score with c = 0.05 returns the squares plus pixel noise.")
DIGITS_CLAIM = ("The empirical score copies training images; regularization (Tikhonov, a "
                "network trained for a finite budget) generates new ones.")
EVENTUAL_CLAIM = "All model sizes eventually memorize the training images."
SOONER_CLAIM = "Larger models memorize sooner."


# --- squares-closed-form --------------------------------------------------------------------
def compute_squares(ctx: Context) -> dict[str, Any]:
    p = ctx.params
    train = images.two_squares(p["resolution"]).to(ctx.device)
    sch = EDM(sigma_max=p["sigma_max"])
    sigmas = karras_sigmas(p["steps"], p["sigma_min"], p["sigma_max"], p["rho"])
    x_T = ctx.noise(p["n_samples"], tuple(train.shape[1:]), p["sigma_max"],
                    offset=SQUARES_SEED)
    methods = {"empirical": ctx.closed_form(EmpiricalScore, train, sch),
               f"Tikhonov c = {p['c']:g}": ctx.closed_form(TikhonovScore, train, sch, p["c"])}
    gen = ctx.generator()
    samples = {name: edm_sample(closed_form_denoiser(score), x_T, sigmas, s_churn=p["churn"],
                                generator=gen)
               for name, score in ctx.bar(methods.items(), "denoisers")}
    return {"train": train, "samples": samples}


def record_squares(ctx: Context, raw: dict[str, Any]) -> Recorded:
    p = ctx.params
    train = raw["train"]
    metrics: dict[str, Any] = {"resolution": p["resolution"], "n_samples": p["n_samples"],
                               "methods": {}, "kde_bandwidth_sqrt_c": p["c"] ** 0.5}
    show = min(p["show"], p["n_samples"])
    arrays: dict[str, Any] = {"train": train.cpu()}
    for m, (name, out) in enumerate(raw["samples"].items()):
        idx, dist = nearest(out, train)
        metrics["methods"][name] = {
            "exact_match_fraction": images.exact_match_fraction(out, train),
            "nearest_counts": torch.bincount(idx.cpu(), minlength=2).tolist(),
            "rms_pixel_residual_mean": float(rms_per_coordinate(dist, train[0].numel()).mean()),
            "copy_fraction_nn_ratio": nn_ratio(out, train, bootstrap=SQUARES_BOOTSTRAP).fraction,
        }
        arrays[f"shown_{m}"] = out[:show].clamp(0, 1).cpu()
    return Recorded(metrics, arrays)


def judge_squares(metrics: Mapping[str, Any], params: Mapping[str, Any]) -> Verdict:
    c = params["c"]
    emp = metrics["methods"]["empirical"]
    tik = metrics["methods"][f"Tikhonov c = {c:g}"]
    ok = (emp["exact_match_fraction"] == 1.0 and emp["rms_pixel_residual_mean"] < EXACT_RESIDUAL
          and abs(tik["rms_pixel_residual_mean"] / c**0.5 - 1) < KDE_MARGIN)
    finding = (f"the empirical denoiser returns exact copies (exact-match fraction "
               f"{emp['exact_match_fraction']:.2f}, RMS residual "
               f"{emp['rms_pixel_residual_mean']:.1e}); Tikhonov c = {c:g} returns the "
               f"squares plus pixel noise (RMS residual {tik['rms_pixel_residual_mean']:.3f}"
               f" per pixel against sqrt(c) = {c**0.5:.3f}; exact matches after "
               f"thresholding {tik['exact_match_fraction']:.2f})")
    return Verdict.of(SQUARES_CLAIM, ok, finding)


def draw_squares(rec: Recorded, params: Mapping[str, Any]) -> dict[str, Any]:
    show = min(params["show"], params["n_samples"])
    rows = [("training", rec.array("train"))]
    rows += [(name, rec.array(f"shown_{m}")) for m, name in enumerate(rec.metrics["methods"])]
    return {"square_samples": plots.image_rows(rows, show, size=1.1)}


# --- digits ---------------------------------------------------------------------------------
def compute_digits(ctx: Context) -> dict[str, Any]:
    p = ctx.params
    sch = get_schedule(p["schedule"])
    train = images.digit_split(p["n_train"])[0].to(ctx.device)
    methods: dict[str, Callable[..., Tensor]] = {
        "empirical": EmpiricalScore(train, sch),
        f"Tikhonov c = {p['c']:g}": TikhonovScore(train, sch, p["c"]),
        "MLP": network_score(ctx, train),
    }
    x_T = ctx.noise(p["n_samples"], (64,), float(sch.sigma(sch.T)), offset=DIGITS_SEED)
    samples = {name: sample_ode(sch, score, x_T, t_end=p["t_end"]).samples
               for name, score in ctx.bar(methods.items(), "scores")}
    return {"train": train, "samples": samples}


def record_digits(ctx: Context, raw: dict[str, Any]) -> Recorded:
    p = ctx.params
    train = raw["train"]
    metrics: dict[str, Any] = {"n_train": p["n_train"], "n_samples": p["n_samples"],
                               "delta": p["delta"], "network_steps": p["network_steps"],
                               "methods": {}}
    arrays: dict[str, Any] = {}
    for m, (name, s) in enumerate(raw["samples"].items()):
        ratio = nn_ratio(s, train, bootstrap=DIGITS_BOOTSTRAP, seed=ctx.seed)
        idx, dist = nearest(s, train)
        metrics["methods"][name] = {
            "copy_fraction_nn_ratio": ratio.fraction,
            "copy_fraction_nn_ratio_ci": [ratio.ci_low, ratio.ci_high],
            "copy_fraction_within_delta": fraction_within(s, train, p["delta"])[p["delta"]],
            "nearest_distance_median": float(dist.median()),
        }
        arrays[f"shown_{m}"] = s[: p["show"]].reshape(-1, 8, 8).cpu()
        arrays[f"nearest_{m}"] = train[idx[: p["show"]]].reshape(-1, 8, 8).cpu()
    return Recorded(metrics, arrays)


def judge_digits(metrics: Mapping[str, Any], params: Mapping[str, Any]) -> Verdict:
    m = metrics["methods"]
    emp, tik = m["empirical"], m[f"Tikhonov c = {params['c']:g}"]
    ok = emp["copy_fraction_nn_ratio"] > COPIES and tik["copy_fraction_nn_ratio"] < emp[
        "copy_fraction_nn_ratio"]
    finding = ("copies by nearest-neighbour ratio < 1/3: "
               + ", ".join(f"{n} {v['copy_fraction_nn_ratio']:.2f}" for n, v in m.items())
               + f" (MLP after {params['network_steps']} steps)")
    return Verdict.of(DIGITS_CLAIM, ok, finding)


def draw_digits(rec: Recorded, params: Mapping[str, Any]) -> dict[str, Any]:
    rows = []
    for m, name in enumerate(rec.metrics["methods"]):
        rows += [(name, rec.array(f"shown_{m}")), ("nearest train", rec.array(f"nearest_{m}"))]
    return {"digit_samples": plots.image_rows(rows, params["show"], size=0.9)}


# --- squares-unet ---------------------------------------------------------------------------
def compute_squares_unet(ctx: Context) -> dict[str, Any]:
    from diffmem.unet import EDMDenoiser, UNet, train_edm

    p = ctx.params
    train = images.two_squares(p["resolution"]).to(ctx.device)
    marks = list(range(p["every"], p["steps"] + 1, p["every"]))
    sigmas = karras_sigmas(p["sample_steps"])
    x_T = ctx.noise(p["n_samples"], tuple(train.shape[1:]), 80.0, offset=UNET_SEED).float()
    runs: dict[str, Any] = {}
    for c in ctx.bar(p["channels"], "model sizes"):
        den = EDMDenoiser(UNet(c, seed=ctx.seed)).to(ctx.device)
        sampling: list[float] = []

        def evaluate(step: int, d: EDMDenoiser, c: int = c,
                     sampling: list[float] = sampling) -> dict[str, Any]:
            """Exact-match fraction of samples of the current (EMA) weights."""
            start = time.perf_counter()
            with torch.no_grad():
                out = edm_sample(d, x_T, sigmas)
            sampling.append(time.perf_counter() - start)
            result: dict[str, Any] = {"exact_match": images.exact_match_fraction(out, train)}
            if c == p["channels"][-1]:
                result["shown"] = out[: p["show"]].cpu()
            return result

        start = time.perf_counter()
        trained = train_edm(den, train, p["steps"], batch_size=p["batch_size"], lr=p["lr"],
                            seed=ctx.seed, checkpoints=marks, callback=evaluate,
                            progress=ctx.progress, ema_half_life=p["ema_half_life"] or None,
                            checkpoint_dir=ctx.out / f"checkpoints_c{c}", resume=ctx.resume)
        train_s = time.perf_counter() - start - sum(sampling)
        model = ModelScore(lambda x, t, den=den: den(x, t), EDM(), tuple(train.shape[1:]),
                           "denoiser", name=f"U-Net {c}")
        runs[str(c)] = {"trained": trained, "n_parameters": den.net.n_parameters(),
                        "steps_per_s": trained.steps_run / train_s if train_s > 0 else None,
                        "sampling_s": sum(sampling) / len(sampling) if sampling else None,
                        "gap": denoiser_gap(model, train.cpu(), n_points=p["gap_points"],
                                            seed=ctx.seed)}
    return {"marks": marks, "runs": runs}


def record_squares_unet(ctx: Context, raw: dict[str, Any]) -> Recorded:
    p = ctx.params
    marks = raw["marks"]
    metrics: dict[str, Any] = {"parameter": "steps", "values": marks,
                               "resolution": p["resolution"], "n_samples": p["n_samples"],
                               "batch_size": p["batch_size"], "sizes": {}}
    for c, run in raw["runs"].items():
        trained = run["trained"]
        fracs = [trained.evaluations[s]["exact_match"] for s in marks]
        losses = trained.losses
        metrics["sizes"][c] = {
            "n_parameters": run["n_parameters"], "exact_match": fracs,
            "first_step_half_memorized": next(
                (s for s, f in zip(marks, fracs, strict=True) if f >= MEMORIZED), None),
            "final_loss_mean_100": sum(losses[-100:]) / min(100, len(losses)),
            "train_steps_per_s": run["steps_per_s"], "sampling_s_per_eval": run["sampling_s"],
            "denoiser_gap": run["gap"],
            "follows_empirical_down_to_sigma": follows_down_to(run["gap"])}
    largest = raw["runs"][str(p["channels"][-1])]["trained"].evaluations
    arrays = {f"shown_{s}": largest[s]["shown"] for s in marks}
    return Recorded(metrics, arrays)


def judge_squares_unet(metrics: Mapping[str, Any], params: Mapping[str, Any]) -> Verdict:
    sizes = metrics["sizes"]
    finals = {c: m["exact_match"][-1] for c, m in sizes.items()}
    firsts = {c: m["first_step_half_memorized"] for c, m in sizes.items()}
    steps = metrics["values"][-1]
    reached = [c for c, f in firsts.items() if f is not None]
    lost = [c for c in reached if finals[c] < MEMORIZED]
    if len(reached) < len(sizes):
        eventual = (INCONCLUSIVE, f"within {steps} steps widths {reached or 'none'} reached "
                    f"{MEMORIZED:.0%} exact copies and "
                    f"{[c for c in sizes if c not in reached]} did not (final fractions "
                    f"{finals}); a longer run is needed to judge 'eventually'")
    elif lost:
        eventual = (NOT_REPRODUCED, f"every width reached {MEMORIZED:.0%} exact copies but "
                    f"widths {lost} fell back below it by step {steps} (final fractions "
                    f"{finals})")
    else:
        eventual = (CONFIRMED, f"every width memorizes: final exact-match fractions {finals}")
    eventual = (eventual[0], eventual[1] + "; final " + gap_text(
        {f"width {c}": m["follows_empirical_down_to_sigma"] for c, m in sizes.items()}))
    if len(reached) < len(sizes):
        sooner = (INCONCLUSIVE, f"first step with half the samples copies: {firsts}; not "
                  "every width memorized, so the order cannot be judged")
    else:
        ordered = [firsts[c] for c in sizes]
        ok = all(b <= a for a, b in zip(ordered, ordered[1:], strict=False))
        sooner = (CONFIRMED if ok else NOT_REPRODUCED,
                  f"first step with half the samples copies, by width: {firsts} "
                  + ("(no larger model later than a smaller one)" if ok
                     else "(not ordered by size)"))
    return Verdict((Claim(EVENTUAL_CLAIM, *eventual), Claim(SOONER_CLAIM, *sooner)))


def draw_squares_unet(rec: Recorded, params: Mapping[str, Any]) -> dict[str, Any]:
    m = rec.metrics
    marks = m["values"]
    fig, ax = plots.figure(1, 1, size=4.5)
    for c, size in m["sizes"].items():
        ax[0, 0].plot(marks, size["exact_match"], "o-", label=f"{c} channels "
                      f"({size['n_parameters'] / 1e3:.0f}k params)")
    ax[0, 0].axhline(MEMORIZED, color="0.6", lw=0.8, ls="--")
    ax[0, 0].set_xlabel("training steps")
    ax[0, 0].set_ylabel("exact-match fraction")
    ax[0, 0].set_ylim(-0.03, 1.03)
    ax[0, 0].legend(fontsize=7)
    rows = [(f"step {s}", rec.array(f"shown_{s}").clip(0, 1)) for s in marks]
    return {"exact_match_vs_steps": fig,
            "samples_over_training": plots.image_rows(rows, params["show"], size=0.9),
            "denoiser_gap": plots.denoiser_gap_figure(
                {f"{c} channels": sz["denoiser_gap"] for c, sz in m["sizes"].items()},
                "final U-Net denoisers against the empirical one")}


SQUARES_CLOSED_FORM = Experiment(
    name="squares-closed-form",
    cost=1,
    summary="The paper's two 64x64 squares: empirical and Tikhonov (c = 0.05) denoisers "
            "sampled with the 40-step EDM sampler; exact-match fraction and pixel residuals.",
    claim=SQUARES_CLAIM,
    defaults={"resolution": 64, "n_samples": 100, "c": 0.05, "steps": 40,
              "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0, "churn": 0.0, "show": 8},
    quick={"resolution": 32, "n_samples": 20},
    compute=compute_squares, record=record_squares, judge=judge_squares, draw=draw_squares,
    distributed=True,
)

DIGITS = Experiment(
    name="digits",
    cost=3,
    summary="scikit-learn's 8x8 digits (1500 for training): empirical, Tikhonov and MLP "
            "scores (VP); memorized fraction by nearest-neighbour ratio and tolerance; "
            "samples beside their nearest training digits.",
    claim=DIGITS_CLAIM,
    defaults={"schedule": "VP", "n_train": 1500, "n_samples": 200, "c": 0.05, "delta": 0.5,
              "t_end": 1e-3, "network_steps": 20_000, "width": 512,
              "ema_half_life": half_life_from_decay(0.999), "show": 10},
    quick={"n_samples": 40, "network_steps": 300, "width": 64,
           "ema_half_life": half_life_from_decay(0.99), "show": 6},
    compute=compute_digits, record=record_digits, judge=judge_digits, draw=draw_digits,
)

SQUARES_UNET = Experiment(
    name="squares-unet",
    cost=37,
    summary="EDM-preconditioned U-Nets of several first-block widths trained on the two "
            "squares (batch 2); every K steps 100 samples with the 40-step EDM sampler and "
            "their exact-match fraction (sampled with an EMA of the weights, half-life 69 "
            "steps; ema_half_life=0 samples the raw weights). CPU defaults: 32x32, widths "
            "4-16, 3000 steps; the paper's: --set resolution=64 --set steps=50000 --set "
            "every=1000 --set n_samples=100 --set channels=4,8,16,32,64,128.",
    claim=f"{EVENTUAL_CLAIM} {SOONER_CLAIM}",
    defaults={"resolution": 32, "channels": [4, 8, 16], "steps": 3000, "every": 500,
              "n_samples": 50, "batch_size": 2, "lr": 1e-3,
              "ema_half_life": half_life_from_decay(0.99), "sample_steps": 40, "show": 8,
              "gap_points": 64},
    # Quick: every width memorizes in about a minute on 2 CPU cores (measured at 16x16 with
    # lr 3e-3 and a 40-step EMA half-life: >= 0.6 exact copies at step 800 for seeds 0-3).
    quick={"resolution": 16, "channels": [4, 8], "steps": 800, "every": 200, "lr": 3e-3,
           "ema_half_life": 40.0, "n_samples": 10, "show": 4},
    compute=compute_squares_unet, record=record_squares_unet, judge=judge_squares_unet,
    draw=draw_squares_unet,
)
