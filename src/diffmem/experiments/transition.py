"""``size-transition``: from memorization to generalization as the training set grows.

At each size ``N`` (a geometric range) two disjoint training sets ``A`` and ``B`` of ``N``
points are drawn from a known truth (by default the standard normal in ``dim = 8``: in 2-D the
training points of a few hundred draws lie so close together that no two models' samples are
closer to each other than to them), and the paper's score MLP is trained on each (same
architecture, seed and training length: ``steps`` in batches of ``batch_size`` drawn with
replacement, the same for every ``N``). Both are sampled from the same noise, and recorded
per ``N``:

* ``memorized``: the copied fraction (the audit's nn-ratio test, each model against its own
  set; the mean of the two);
* ``agreement``: the two-model test (Kadkhodaie et al.), the fraction of pairs closer to each
  other than to either training set (:func:`diffmem.audit.compare.compare_samples`);
* ``follows_down_to``: how far down in noise model A follows its empirical denoiser;

with the closed forms on the same axes (empirical: always copies, never agrees; Gaussian fit:
never copies; KDE of bandwidth ``kde_h``). The effective model memorization (Gu et al.) is the
``N`` at which the copied fraction crosses 0.9 (and 0.5), interpolated in ``log N``.

The training length is fixed and the transition is where it meets the memorization time:
a network trained on ``N`` items first copies them after about ``tau_mem ~ 90-140 N``
steps at batch 64 (``memorization-time``), so ``steps = 4000`` copies the sets up to
``N ~ 30-45`` and generalizes beyond (past ``tau_gen ~ 100`` steps). Trained longer, the
transition moves to larger ``N`` (20,000 steps still copied 31% at ``N = 256``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from diffmem import data, plots
from diffmem.audit import denoiser_gap, follows_down_to
from diffmem.audit.compare import compare_samples
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
from diffmem.experiments.common import train_networks
from diffmem.nn import NetworkScore
from diffmem.samplers import sample_ode
from diffmem.schedules import get_schedule
from diffmem.scores import EmpiricalScore, GaussianScore, KDEScore

CLAIM = ("As the training set grows, a network's samples stop copying it and two networks "
         "trained on disjoint halves start to agree: at a fixed training length the smallest "
         "sets are copied, and at the largest copies fall below 0.1 while the halves agree "
         ">= 0.5.")
#: Copied fractions whose crossing sizes are the effective model memorization.
EMM_LEVELS = (0.9, 0.5)
#: The claim is judged when the smallest size copies at least this much...
MEMORIZED_SMALL = 0.5
#: ...and holds when, at the largest size, copies are below this fraction...
COPIES_LARGE = 0.1
#: ...and the two halves' models agree at least this much.
AGREEMENT_LARGE = 0.5
SAMPLES_SEED, DATA_SEED = 9_000, 9_100


def crossing(sizes: Sequence[int], values: Sequence[float], level: float) -> float | None:
    """The size at which ``values`` first falls below ``level`` from above, interpolated
    linearly in ``log N`` between the two sizes around it (``None``: it never does, or it
    starts below)."""
    if not values or values[0] < level:
        return None
    for (n0, v0), (n1, v1) in zip(zip(sizes, values, strict=True),
                                  zip(sizes[1:], values[1:], strict=True), strict=False):
        if v0 >= level > v1:
            frac = (v0 - level) / (v0 - v1)
            return float(math.exp(math.log(n0) + frac * (math.log(n1) - math.log(n0))))
    return None


def compute(ctx: Context) -> dict[str, Any]:
    p = ctx.params
    sch = get_schedule(p["schedule"])
    truth = data.GaussianTruth(p["dim"]) if p["truth"] == "gaussian" else data.truth(p["truth"])
    dim = p["dim"] if p["truth"] == "gaussian" else 2
    noise = ctx.noise(p["n_samples"], (dim,), float(sch.sigma(sch.T)), offset=SAMPLES_SEED)
    refs = {"empirical": EmpiricalScore, "gaussian": GaussianScore,
            "kde": lambda x, s: KDEScore(x, s, p["kde_h"])}
    out: dict[str, Any] = {"sizes": {}}
    for n in ctx.bar(p["sizes"], "training-set sizes"):
        both = truth.sample(2 * n, ctx.generator(DATA_SEED + n))
        halves = {"a": both[:n], "b": both[n:]}
        entry: dict[str, Any] = {"train": halves, "samples": {}, "refs": {}}
        for side, x in halves.items():
            trained = train_networks(ctx, x, lambdas=[0.0], parameterizations=["score"],
                                     steps=p["steps"], width=p["width"],
                                     batch_size=p["batch_size"],
                                     ema_half_life=p["ema_half_life"],
                                     tag=f"checkpoints_N{n}_{side}", quiet_ema=True)
            model = NetworkScore(trained.ema.to(ctx.device), sch)
            entry["samples"][side] = sample_ode(sch, model, noise, t_end=p["t_end"]).samples
            if side == "a":
                entry["gap"] = denoiser_gap(model, x, n_points=p["gap_points"], seed=ctx.seed)
        for name, make in refs.items():
            entry["refs"][name] = {side: sample_ode(sch, make(x.to(ctx.device), sch), noise,
                                                    t_end=p["t_end"]).samples
                                   for side, x in halves.items()}
        out["sizes"][n] = entry
    return out


def _two_model(samples: Mapping[str, torch.Tensor], halves: Mapping[str, torch.Tensor],
               seed: int) -> dict[str, float]:
    r = compare_samples(samples["a"].cpu(), samples["b"].cpu(), halves["a"], halves["b"],
                        bootstrap=200, seed=seed)
    s = r.to_json()
    return {"memorized": 0.5 * (s["copied_a"] + s["copied_b"]), "agreement": s["agreement"],
            "agreement_ci": s["agreement_ci"], "median_d_ab": s["median_d_ab"]}


def record(ctx: Context, raw: dict[str, Any]) -> Recorded:
    p = ctx.params
    sizes = list(raw["sizes"])
    per = {n: _two_model(e["samples"], e["train"], ctx.seed) for n, e in raw["sizes"].items()}
    refs = {name: [_two_model(e["refs"][name], e["train"], ctx.seed)
                   for e in raw["sizes"].values()] for name in ("empirical", "gaussian", "kde")}
    memorized = [per[n]["memorized"] for n in sizes]
    metrics: dict[str, Any] = {
        "truth": p["truth"], "sizes": sizes, "memorized": memorized,
        "agreement": [per[n]["agreement"] for n in sizes],
        "agreement_ci": [per[n]["agreement_ci"] for n in sizes],
        "median_d_ab": [per[n]["median_d_ab"] for n in sizes],
        "follows_down_to": [follows_down_to(e["gap"]) for e in raw["sizes"].values()],
        "emm": {str(level): crossing(sizes, memorized, level) for level in EMM_LEVELS},
        "references": {name: {"memorized": [r["memorized"] for r in rows],
                              "agreement": [r["agreement"] for r in rows]}
                       for name, rows in refs.items()},
        "units": {"memorized": "fraction of samples that are nn-ratio copies of their "
                               "model's own training set (mean of the two halves)",
                  "agreement": "fraction of pairs with d_ab < min(d_a, d_b)",
                  "emm": "training-set size N (points per half)",
                  "follows_down_to": "noise level sigma"}}
    arrays = {f"samples_{n}_{s}": e["samples"][s] for n, e in raw["sizes"].items()
              for s in ("a", "b")}
    arrays.update({f"train_{n}_{s}": e["train"][s] for n, e in raw["sizes"].items()
                   for s in ("a", "b")})
    return Recorded(metrics, arrays)


def _size(n: float | None) -> str:
    """A crossing size for the verdict: three significant digits, or 'none'."""
    return "none" if n is None else f"{n:.3g}"


def judge(metrics: Mapping[str, Any], params: Mapping[str, Any]) -> Verdict:
    mem, agree, sizes = metrics["memorized"], metrics["agreement"], metrics["sizes"]
    text = (f"copied fraction {mem[0]:.2f} at N = {sizes[0]} -> {mem[-1]:.2f} at N = "
            f"{sizes[-1]}, agreement {agree[0]:.2f} -> {agree[-1]:.2f}; effective model "
            f"memorization (90%): {_size(metrics['emm']['0.9'])}, (50%): "
            f"{_size(metrics['emm']['0.5'])}")
    if mem[0] < MEMORIZED_SMALL:
        return Verdict((Claim(CLAIM, INCONCLUSIVE, "the smallest training set is not "
                              f"memorized (too little training to judge): {text}"),))
    holds = mem[-1] < COPIES_LARGE and agree[-1] >= AGREEMENT_LARGE
    return Verdict((Claim(CLAIM, CONFIRMED if holds else NOT_REPRODUCED, text),))


def draw(rec: Recorded, params: Mapping[str, Any]) -> dict[str, Any]:
    m = rec.metrics
    sizes = m["sizes"]
    fig, ax = plots.figure(1, 2, size=4.2)
    for k, key in enumerate(("memorized", "agreement")):
        a = ax[0, k]
        a.plot(sizes, m[key], "o-", color="C0", lw=2, label="score MLP")
        for i, (name, ref) in enumerate(m["references"].items()):
            a.plot(sizes, ref[key], "--", color=f"C{i + 1}", lw=1, label=name)
        a.set(xscale="log", xlabel="training points per half N", ylim=(-0.03, 1.03),
              ylabel="copied fraction (nn-ratio)" if key == "memorized" else
              "agreement of the two halves' models", title=key)
        a.legend(fontsize=7)
    for level, n in m["emm"].items():
        if n is not None:
            ax[0, 0].axvline(n, color="0.6", lw=0.8, ls=":")
            ax[0, 0].text(n, float(level), f" EMM{float(level):.0%}", fontsize=7)
    fig.tight_layout()
    cols = len(sizes)
    grid, axes = plots.figure(1, cols, size=2.6)
    for j, n in enumerate(sizes):
        a = axes[0, j]
        for s, color in (("a", "C0"), ("b", "C3")):  # the first two coordinates
            pts = rec.array(f"samples_{n}_{s}")
            a.scatter(pts[:, 0], pts[:, 1], s=3, color=color, alpha=0.5)
            tr = rec.array(f"train_{n}_{s}")
            a.scatter(tr[:, 0], tr[:, 1], s=14, color=color, marker="x")
        a.set_title(f"N = {n}", fontsize=8)
        a.set_aspect("equal")
    return {"transition": fig, "samples": grid}


SIZE_TRANSITION = Experiment(
    name="size-transition",
    cost=36,
    summary="The paper's score MLP (VP) trained on N points of N(0, I_8), two disjoint "
            "halves per N, for the same number of steps (batches of 64) at every N: copied "
            "fraction, two-model agreement and the denoiser gap against N, with the "
            "empirical, Gaussian and KDE closed forms; the effective model memorization.",
    claim=CLAIM,
    defaults={"truth": "gaussian", "dim": 8, "sizes": [2, 4, 8, 16, 32, 64, 128, 256],
              "steps": 4000, "batch_size": 64, "width": 256, "ema_half_life": 200.0,
              "schedule": "VP",
              "n_samples": 200,
              "t_end": 1e-3, "kde_h": 0.1, "gap_points": 64},
    quick={"sizes": [2, 8, 32, 128], "steps": 2000, "width": 256, "n_samples": 100,
           "gap_points": 32},
    compute=compute, record=record, judge=judge, draw=draw,
)
