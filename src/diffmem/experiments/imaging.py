"""Closed-form and learned scores on images.

* ``squares-closed-form``: the paper's two squares; the empirical denoiser (exact copies)
  and the Tikhonov one with ``c = 0.05`` (the squares plus pixel noise), sampled with the
  40-step EDM sampler.
* ``digits``: scikit-learn's 8x8 digits; empirical, Tikhonov and an MLP score; memorized
  fraction by the nearest-neighbour ratio and by tolerance, samples beside their nearest
  training digits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from diffmem import images, plots
from diffmem.edm import closed_form_denoiser, edm_sample, karras_sigmas
from diffmem.experiments.base import Context, Experiment, Outcome
from diffmem.experiments.common import train_network_score
from diffmem.metrics import nearest, nn_ratio
from diffmem.samplers import sample_ode
from diffmem.schedules import EDM, get_schedule
from diffmem.scores import EmpiricalScore, TikhonovScore


def _image_row(ax: Any, imgs: Tensor, label: str) -> None:
    for j, a in enumerate(ax):
        a.imshow(imgs[j, 0].cpu().numpy(), cmap="gray_r", vmin=0, vmax=1)
        a.set_xticks([])
        a.set_yticks([])
        if j == 0:
            a.set_ylabel(label, fontsize=7)


def run_squares(ctx: Context) -> Outcome:
    p = ctx.params
    train = images.two_squares(p["resolution"]).to(ctx.device)
    sch = EDM(sigma_max=p["sigma_max"])
    sigmas = karras_sigmas(p["steps"], p["sigma_min"], p["sigma_max"], p["rho"])
    x_T = ctx.noise(p["n_samples"], tuple(train.shape[1:]), p["sigma_max"], offset=700)
    methods = {"empirical": EmpiricalScore(train, sch),
               f"Tikhonov c = {p['c']:g}": TikhonovScore(train, sch, p["c"])}
    metrics: dict[str, Any] = {"resolution": p["resolution"], "n_samples": p["n_samples"],
                               "methods": {}}
    show = min(p["show"], p["n_samples"])
    fig, ax = plots.figure(len(methods) + 1, show, size=1.1)
    _image_row(ax[0, :2], train, "training")
    for a in ax[0, 2:]:
        a.axis("off")
    gen = torch.Generator().manual_seed(ctx.seed)
    for r, (name, score) in enumerate(ctx.bar(methods.items(), "denoisers")):
        out = edm_sample(closed_form_denoiser(score), x_T, sigmas, s_churn=p["churn"],
                         generator=gen)
        idx, dist = nearest(out, train)
        rms = dist / float(train[0].numel()) ** 0.5
        metrics["methods"][name] = {
            "exact_match_fraction": images.exact_match_fraction(out, train),
            "nearest_counts": torch.bincount(idx.cpu(), minlength=2).tolist(),
            "rms_pixel_residual_mean": float(rms.mean()),
            "copy_fraction_nn_ratio": nn_ratio(out, train, bootstrap=200).fraction,
        }
        _image_row(ax[r + 1], out[:show].clamp(0, 1), name)
    ctx.save(fig, "square_samples")
    emp = metrics["methods"]["empirical"]
    tik = metrics["methods"][f"Tikhonov c = {p['c']:g}"]
    # Tikhonov with small c behaves like a Gaussian KDE of bandwidth sqrt(c): each pixel
    # carries noise of standard deviation about sqrt(c) around the nearest square.
    metrics["kde_bandwidth_sqrt_c"] = p["c"] ** 0.5
    ok = (emp["exact_match_fraction"] == 1.0 and emp["rms_pixel_residual_mean"] < 1e-6
          and abs(tik["rms_pixel_residual_mean"] / p["c"] ** 0.5 - 1) < 0.2)
    finding = (f"the empirical denoiser returns exact copies (exact-match fraction "
               f"{emp['exact_match_fraction']:.2f}, RMS residual "
               f"{emp['rms_pixel_residual_mean']:.1e}); Tikhonov c = {p['c']:g} returns the "
               f"squares plus pixel noise (RMS residual {tik['rms_pixel_residual_mean']:.3f}"
               f" per pixel against sqrt(c) = {p['c'] ** 0.5:.3f}; exact matches after "
               f"thresholding {tik['exact_match_fraction']:.2f})")
    return Outcome.judged(metrics, ok, finding)


def run_digits(ctx: Context) -> Outcome:
    p = ctx.params
    sch = get_schedule(p["schedule"])
    train = images.digit_split(p["n_train"])[0].to(ctx.device)
    methods: dict[str, Callable[..., Tensor]] = {
        "empirical": EmpiricalScore(train, sch),
        f"Tikhonov c = {p['c']:g}": TikhonovScore(train, sch, p["c"]),
        "MLP": train_network_score(ctx, train),
    }
    x_T = ctx.noise(p["n_samples"], (64,), float(sch.sigma(sch.T)), offset=800)
    metrics: dict[str, Any] = {"n_train": p["n_train"], "n_samples": p["n_samples"],
                               "delta": p["delta"], "network_steps": p["network_steps"],
                               "methods": {}}
    show = p["show"]
    fig, ax = plots.figure(2 * len(methods), show, size=0.9)
    for r, (name, score) in enumerate(ctx.bar(methods.items(), "scores")):
        s = sample_ode(sch, score, x_T, t_end=p["t_end"]).samples
        ratio = nn_ratio(s, train, bootstrap=500, seed=ctx.seed)
        idx, dist = nearest(s, train)
        metrics["methods"][name] = {
            "copy_fraction_nn_ratio": ratio.fraction,
            "copy_fraction_nn_ratio_ci": [ratio.ci_low, ratio.ci_high],
            "copy_fraction_within_delta": float((dist < p["delta"]).double().mean()),
            "nearest_distance_median": float(dist.median()),
        }
        _image_row(ax[2 * r], s[:show].reshape(show, 1, 8, 8), f"{name}")
        _image_row(ax[2 * r + 1], train[idx[:show]].reshape(show, 1, 8, 8), "nearest train")
    ctx.save(fig, "digit_samples")
    m = metrics["methods"]
    emp, tik = m["empirical"], m[f"Tikhonov c = {p['c']:g}"]
    ok = emp["copy_fraction_nn_ratio"] > 0.9 and tik["copy_fraction_nn_ratio"] < emp[
        "copy_fraction_nn_ratio"]
    finding = ("copies by nearest-neighbour "
               "ratio < 1/3: " + ", ".join(f"{n} {v['copy_fraction_nn_ratio']:.2f}"
                                            for n, v in m.items())
               + f" (MLP after {p['network_steps']} steps)")
    return Outcome.judged(metrics, ok, finding)


SQUARES_CLOSED_FORM = Experiment(
    name="squares-closed-form",
    summary="The paper's two 64x64 squares: empirical and Tikhonov (c = 0.05) denoisers "
            "sampled with the 40-step EDM sampler; exact-match fraction and pixel residuals.",
    claim="The empirical score returns exact copies of the training images; the Tikhonov "
          "score with c = 0.05 returns the squares plus pixel noise.",
    defaults={"resolution": 64, "n_samples": 100, "c": 0.05, "steps": 40,
              "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0, "churn": 0.0, "show": 8},
    quick={"resolution": 32, "n_samples": 20},
    run=run_squares,
)

DIGITS = Experiment(
    name="digits",
    summary="scikit-learn's 8x8 digits (1500 for training): empirical, Tikhonov and MLP "
            "scores (VP); memorized fraction by nearest-neighbour ratio and tolerance; "
            "samples beside their nearest training digits.",
    claim="The empirical score copies training images; regularization (Tikhonov, a network "
          "trained for a finite budget) generates new ones.",
    defaults={"schedule": "VP", "n_train": 1500, "n_samples": 200, "c": 0.05, "delta": 0.5,
              "t_end": 1e-3, "network_steps": 20_000, "width": 512, "ema_decay": 0.999,
              "show": 10},
    quick={"n_samples": 40, "network_steps": 300, "width": 64, "ema_decay": 0.99, "show": 6},
    run=run_digits,
)


def run_squares_unet(ctx: Context) -> Outcome:
    p = ctx.params
    import time

    from diffmem.unet import EDMDenoiser, UNet, train_edm

    train = images.two_squares(p["resolution"]).to(ctx.device)
    marks = list(range(p["every"], p["steps"] + 1, p["every"]))
    sigmas = karras_sigmas(p["sample_steps"])
    x_T = ctx.noise(p["n_samples"], tuple(train.shape[1:]), 80.0, offset=900).float()
    metrics: dict[str, Any] = {"parameter": "steps", "values": marks,
                               "resolution": p["resolution"], "n_samples": p["n_samples"],
                               "batch_size": p["batch_size"], "sizes": {}}
    snapshots: list[Tensor] = []
    for c in ctx.bar(p["channels"], "model sizes"):
        den = EDMDenoiser(UNet(c, seed=ctx.seed)).to(ctx.device)
        fracs: list[float] = []
        sample_time: list[float] = []

        def evaluate(step: int, d: EDMDenoiser, c: int = c, fracs: list[float] = fracs,
                     sample_time: list[float] = sample_time) -> None:
            start = time.perf_counter()
            with torch.no_grad():
                out = edm_sample(d, x_T, sigmas)
            sample_time.append(time.perf_counter() - start)
            fracs.append(images.exact_match_fraction(out, train))
            if c == p["channels"][-1]:
                snapshots.append(out[: p["show"]].cpu())

        start = time.perf_counter()
        losses = train_edm(den, train, p["steps"], batch_size=p["batch_size"], lr=p["lr"],
                           seed=ctx.seed, checkpoints=marks, callback=evaluate,
                           progress=ctx.progress, ema_decay=p["ema_decay"] or None)
        total = time.perf_counter() - start - sum(sample_time)
        first = next((s for s, f in zip(marks, fracs, strict=True) if f >= 0.5), None)
        metrics["sizes"][str(c)] = {
            "n_parameters": den.net.n_parameters(), "exact_match": fracs,
            "first_step_half_memorized": first, "final_loss_mean_100": sum(losses[-100:])
            / min(100, len(losses)), "train_steps_per_s": p["steps"] / total,
            "sampling_s_per_eval": sum(sample_time) / len(sample_time)}
    fig, ax = plots.figure(1, 1, size=4.5)
    for c, m in metrics["sizes"].items():
        ax[0, 0].plot(marks, m["exact_match"], "o-", label=f"{c} channels "
                      f"({m['n_parameters'] / 1e3:.0f}k params)")
    ax[0, 0].set_xlabel("training steps")
    ax[0, 0].set_ylabel("exact-match fraction")
    ax[0, 0].set_ylim(-0.03, 1.03)
    ax[0, 0].legend(fontsize=7)
    ctx.save(fig, "exact_match_vs_steps")
    fig, ax = plots.figure(len(snapshots), p["show"], size=0.9)
    for r, snap in enumerate(snapshots):
        _image_row(ax[r], snap.clamp(0, 1).double(), f"step {marks[r]}")
    ctx.save(fig, "samples_over_training")
    finals = {c: m["exact_match"][-1] for c, m in metrics["sizes"].items()}
    firsts = [m["first_step_half_memorized"] for m in metrics["sizes"].values()]
    all_memorize = all(f >= 0.9 for f in finals.values())
    known = [f for f in firsts if f is not None]
    larger_sooner = len(known) == len(firsts) and all(
        b <= a for a, b in zip(known, known[1:], strict=False))
    finding = (f"final exact-match fractions by channel count {finals}; first step with "
               f"half the samples copies: {dict(zip(metrics['sizes'], firsts, strict=True))} "
               + ("(no larger model later than a smaller one)" if larger_sooner
                  else "(not ordered by size)"))
    return Outcome.judged(metrics, all_memorize and larger_sooner, finding)


SQUARES_UNET = Experiment(
    name="squares-unet",
    summary="EDM-preconditioned U-Nets of several first-block widths trained on the two "
            "squares (batch 2); every K steps 100 samples with the 40-step EDM sampler and "
            "their exact-match fraction (sampled with an EMA of the weights, half-life 69 "
            "steps; ema_decay=0 samples the raw weights). CPU defaults: 32x32, widths 4-16, "
            "3000 steps; the "
            "paper's: --set resolution=64 --set steps=50000 --set every=1000 --set "
            "n_samples=100 --set channels=4,8,16,32,64,128.",
    claim="All model sizes eventually memorize the training images, larger ones sooner.",
    defaults={"resolution": 32, "channels": [4, 8, 16], "steps": 3000, "every": 500,
              "n_samples": 50, "batch_size": 2, "lr": 1e-3, "ema_decay": 0.99,
              "sample_steps": 40, "show": 8},
    quick={"resolution": 16, "channels": [4, 8], "steps": 300, "every": 150,
           "n_samples": 10, "show": 4},
    run=run_squares_unet,
)
