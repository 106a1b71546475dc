"""The conditioned setting: conditional generation returns the paired training samples too.

* ``conditional-2d``: pairs ``(x^n, y^n)`` with ``x^n`` the paper's 20 points and
  ``y^n = x^n_1 + 0.1 xi``; samples for training and new ``y`` from the (near-)exact
  conditional empirical score, a kernel in ``y``, its Tikhonov variant and a conditional MLP.
* ``inverse-digits``: inpainting 8x8 digits (scikit-learn's, no download) from their top
  half; the conditional empirical score (Bayes' posterior over the training digits), its
  Tikhonov and threshold variants and a conditional MLP, on held-out observations.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffmem import data, images, plots
from diffmem.experiments.base import Context, Experiment, Recorded, Verdict
from diffmem.experiments.common import network_score
from diffmem.metrics import diversity, fraction_within, nearest, nn_ratio, paired_fraction
from diffmem.samplers import sample_ode
from diffmem.schedules import get_schedule
from diffmem.scores import ConditionalEmpiricalScore
from diffmem.training import half_life_from_decay

#: Seed offsets: the conditions' noise, the samples' initial noise (2-D); the observation
#: noise and the samples' initial noise (digits).
Y_SEED, SAMPLES_2D_SEED, OBS_SEED, SAMPLES_DIGITS_SEED = 7, 500, 11, 600
#: "Returns the paired sample": at least this fraction of samples at every training y.
PAIRED = 0.95
#: "Copies training digits": more than this fraction of samples pass the nn-ratio test.
COPIES = 0.9
#: Bootstrap resamples of the nn-ratio interval.
BOOTSTRAP = 500

CLAIM_2D = ("Conditional generation with the empirical minimizer returns the paired training "
            "sample; smoothing in y or Tikhonov regularization prevents it.")
CLAIM_DIGITS = ("For inverse problems the conditional empirical score returns training digits "
                "(memorization); regularization yields new digits.")


# --- conditional-2d -------------------------------------------------------------------------
def _pairs(ctx: Context) -> tuple[Tensor, Tensor]:
    x = data.paper_points().to(ctx.device)
    gen = ctx.generator(Y_SEED)
    y = x[:, :1] + ctx.params["y_noise"] * torch.randn(20, 1, generator=gen,
                                                        dtype=torch.float64)
    return x, y


def compute_2d(ctx: Context) -> dict[str, Any]:
    p = ctx.params
    sch = get_schedule(p["schedule"])
    x, y = _pairs(ctx)
    queries = [float(y[i, 0]) for i in p["train_queries"]] + list(p["new_queries"])
    scores: dict[str, Callable[..., Tensor]] = {
        f"empirical (h = {p['h_exact']:g})": ConditionalEmpiricalScore(
            x, y, sch, mode="kernel", bandwidth=p["h_exact"]),
        f"kernel (h = {p['h']:g})": ConditionalEmpiricalScore(
            x, y, sch, mode="kernel", bandwidth=p["h"]),
        f"Tikhonov (h = {p['h']:g}, c = {p['c']:g})": ConditionalEmpiricalScore(
            x, y, sch, mode="kernel", bandwidth=p["h"], c=p["c"]),
        "conditional MLP": network_score(ctx, x, y, p["network_lambda"]),
    }
    x_T = ctx.noise(p["n_per_query"], (2,), float(sch.sigma(sch.T)), offset=SAMPLES_2D_SEED)
    samples = {name: [sample_ode(sch, score, x_T, t_end=p["t_end"], cond=torch.tensor(
        [[q]], dtype=torch.float64, device=ctx.device)).samples for q in queries]
        for name, score in ctx.bar(scores.items(), "scores")}
    return {"x": x, "y": y, "queries": queries, "samples": samples}


def record_2d(ctx: Context, raw: dict[str, Any]) -> Recorded:
    p = ctx.params
    x, delta = raw["x"], p["delta"]
    n_train_q = len(p["train_queries"])
    metrics: dict[str, Any] = {"queries": raw["queries"], "n_train_queries": n_train_q,
                               "y_train": raw["y"][:, 0].tolist(), "n_per_query": p["n_per_query"],
                               "delta": delta, "methods": {}}
    arrays: dict[str, Any] = {"train": x.cpu()}
    for m, (name, per_query) in enumerate(raw["samples"].items()):
        metrics["methods"][name] = {
            "fraction_within": [fraction_within(s, x, delta)[delta] for s in per_query],
            "fraction_paired_at_training_y": [
                paired_fraction(s, x[i], delta)
                for i, s in zip(p["train_queries"], per_query[:n_train_q], strict=True)]}
        for c, s in enumerate(per_query):
            arrays[f"samples_{m}_{c}"] = s.cpu()
    return Recorded(metrics, arrays)


def judge_2d(metrics: Mapping[str, Any], params: Mapping[str, Any]) -> Verdict:
    names = list(metrics["methods"])
    exact, kernel, tik = (metrics["methods"][names[i]] for i in range(3))
    ok = (min(exact["fraction_paired_at_training_y"]) > PAIRED
          and np.mean(tik["fraction_within"]) < np.mean(exact["fraction_within"]))
    finding = ("at training y the near-exact conditional score returns the paired sample "
               f"(fractions {[round(v, 3) for v in exact['fraction_paired_at_training_y']]}); "
               f"memorized fraction over all queries: near-exact "
               f"{np.mean(exact['fraction_within']):.3f}, kernel in y "
               f"{np.mean(kernel['fraction_within']):.3f} (smoothing in y alone still returns "
               f"training x), Tikhonov {np.mean(tik['fraction_within']):.3f}")
    return Verdict.of(CLAIM_2D, ok, finding)


def draw_2d(rec: Recorded, params: Mapping[str, Any]) -> dict[str, Any]:
    m = rec.metrics
    queries, names = m["queries"], list(m["methods"])
    train = torch.as_tensor(rec.array("train"))
    fig, ax = plots.figure(len(names), len(queries), size=2.6)
    for r, name in enumerate(names):
        for c, q in enumerate(queries):
            a = ax[r, c]
            plots.voronoi(a, train)
            a.axvline(q, color="C2", lw=1)
            plots.scatter(a, rec.array(f"samples_{r}_{c}"), size=2)
            a.set_title(f"y = {q:.2f}: {m['methods'][name]['fraction_within'][c]:.2f}",
                        fontsize=8)
            if c == 0:
                a.set_ylabel(name, fontsize=8)
    return {"conditional_samples": fig}


# --- inverse-digits -------------------------------------------------------------------------
def top_half(v: Tensor) -> Tensor:
    """The inpainting operator: the top 4 rows (32 pixels) of 8x8 images ``(N, 64)``."""
    return v.reshape(v.shape[0], 8, 8)[:, :4, :].reshape(v.shape[0], 32)


def compute_digits(ctx: Context) -> dict[str, Any]:
    p = ctx.params
    sch = get_schedule(p["schedule"])
    train, held = (v.to(ctx.device) for v in images.digit_split(p["n_train"]))
    gen = ctx.generator(OBS_SEED)
    truth = held[: p["n_obs"]]
    obs = top_half(truth) + p["noise_std"] * torch.randn(
        truth.shape[0], 32, generator=gen, dtype=torch.float64).to(truth)
    kw = {"mode": "inverse", "operator": top_half, "noise_std": p["noise_std"]}
    train_obs = top_half(train) + p["noise_std"] * torch.randn(
        train.shape[0], 32, generator=gen, dtype=torch.float64).to(train)
    methods: dict[str, Callable[..., Tensor]] = {
        "empirical": ConditionalEmpiricalScore(train, None, sch, **kw),
        f"Tikhonov c = {p['c']:g}": ConditionalEmpiricalScore(train, None, sch, c=p["c"], **kw),
        f"threshold tau = {p['tau']:g}": ConditionalEmpiricalScore(train, None, sch,
                                                                   tau=p["tau"], **kw),
        "conditional MLP": network_score(ctx, train, train_obs, p["network_lambda"]),
    }
    k = p["samples_per_obs"]
    x_T = ctx.noise(truth.shape[0] * k, (64,), float(sch.sigma(sch.T)),
                    offset=SAMPLES_DIGITS_SEED)
    cond = obs.repeat_interleave(k, dim=0)
    samples = {name: sample_ode(sch, score, x_T, t_end=p["t_end"], cond=cond).samples
               for name, score in ctx.bar(methods.items(), "methods")}
    return {"train": train, "held": held, "truth": truth, "obs": obs, "samples": samples}


def record_digits(ctx: Context, raw: dict[str, Any]) -> Recorded:
    p = ctx.params
    train, truth, k = raw["train"], raw["truth"], p["samples_per_obs"]
    metrics: dict[str, Any] = {"n_train": train.shape[0], "n_held_out": raw["held"].shape[0],
                               "n_obs": truth.shape[0], "samples_per_obs": k,
                               "delta": p["delta"], "noise_std": p["noise_std"],
                               "methods": {}}
    arrays: dict[str, Any] = {"obs": raw["obs"].cpu(), "truth": truth.cpu()}
    for m, (name, s) in enumerate(raw["samples"].items()):
        ratio = nn_ratio(s, train, bootstrap=BOOTSTRAP, seed=ctx.seed)
        groups = s.reshape(truth.shape[0], k, 64)
        metrics["methods"][name] = {
            "copy_fraction_nn_ratio": ratio.fraction,
            "copy_fraction_nn_ratio_ci": [ratio.ci_low, ratio.ci_high],
            "copy_fraction_within_delta": fraction_within(s, train, p["delta"])[p["delta"]],
            "error_to_truth_mean": float(
                (s - truth.repeat_interleave(k, dim=0)).norm(dim=1).mean()),
            "diversity_mean_pairwise": float(diversity(groups).mean()),
        }
        shown = groups[:, : p["show"]].cpu()
        arrays[f"shown_{m}"] = shown
        idx, _ = nearest(shown[:, 0], train.cpu())
        arrays[f"nearest_{m}"] = train.cpu()[idx]
    return Recorded(metrics, arrays)


def judge_digits(metrics: Mapping[str, Any], params: Mapping[str, Any]) -> Verdict:
    m = metrics["methods"]
    emp, tik = m["empirical"], m[list(m)[1]]
    ok = emp["copy_fraction_nn_ratio"] > COPIES and tik["copy_fraction_nn_ratio"] < emp[
        "copy_fraction_nn_ratio"]
    finding = (f"the conditional empirical score copies a training digit in "
               f"{emp['copy_fraction_nn_ratio']:.2f} of samples (nearest-neighbour ratio "
               f"< 1/3), Tikhonov in {tik['copy_fraction_nn_ratio']:.2f}; errors to the "
               "held-out truth " + ", ".join(f"{n}: {v['error_to_truth_mean']:.2f}"
                                              for n, v in m.items()))
    return Verdict.of(CLAIM_DIGITS, ok, finding)


def draw_digits(rec: Recorded, params: Mapping[str, Any]) -> dict[str, Any]:
    """Rows: observations; columns: observed top half, truth, then samples of each method
    with the nearest training digit of its first sample."""
    obs, truth = rec.array("obs"), rec.array("truth")
    names = list(rec.metrics["methods"])
    rows = []
    for i in range(obs.shape[0]):
        masked = np.full((8, 8), np.nan)
        masked[:4] = obs[i].reshape(4, 8)
        row = [("observed", masked), ("truth", truth[i].reshape(8, 8))]
        for m, name in enumerate(names):
            shown = rec.array(f"shown_{m}")[i]
            row += [(name if j == 0 else "", shown[j].reshape(8, 8))
                    for j in range(shown.shape[0])]
            row.append(("nearest train", rec.array(f"nearest_{m}")[i].reshape(8, 8)))
        rows.append(row)
    return {"digit_samples": plots.image_table(rows)}


CONDITIONAL_2D = Experiment(
    name="conditional-2d",
    cost=5,
    summary="Pairs (x, y = x_1 + 0.1 xi) on the paper's 20 points: conditional samples at "
            "training and new y for the near-exact empirical, kernel, Tikhonov and network "
            "scores.",
    claim=CLAIM_2D,
    defaults={"schedule": "VP", "y_noise": 0.1, "train_queries": [0, 5, 10],
              "new_queries": [-1.5, 0.3], "h_exact": 1e-3, "h": 0.2, "c": 1e-2,
              "n_per_query": 200, "t_end": 1e-3, "delta": 1e-2, "network_steps": 20_000,
              "network_lambda": 0.0, "width": 256, "ema_half_life": half_life_from_decay(0.999)},
    quick={"n_per_query": 60, "network_steps": 500, "ema_half_life": half_life_from_decay(0.99),
           "width": 64},
    compute=compute_2d, record=record_2d, judge=judge_2d, draw=draw_2d,
)

INVERSE_DIGITS = Experiment(
    name="inverse-digits",
    cost=6,
    summary="Inpainting scikit-learn's 8x8 digits from their noisy top half: held-out "
            "observations sampled with the conditional empirical score, Tikhonov, threshold "
            "and a conditional MLP; copy fraction, error to the truth, diversity.",
    claim=CLAIM_DIGITS,
    defaults={"schedule": "VP", "n_train": 1500, "n_obs": 8, "samples_per_obs": 16,
              "noise_std": 0.05, "c": 0.05, "tau": 1e-12, "t_end": 1e-3, "delta": 0.5,
              "show": 3, "network_steps": 20_000, "network_lambda": 0.0, "width": 256,
              "ema_half_life": half_life_from_decay(0.999)},
    quick={"n_obs": 4, "samples_per_obs": 8, "network_steps": 300,
           "ema_half_life": half_life_from_decay(0.99), "width": 64, "show": 2},
    compute=compute_digits, record=record_digits, judge=judge_digits, draw=draw_digits,
)

__all__ = ["CONDITIONAL_2D", "INVERSE_DIGITS"]
