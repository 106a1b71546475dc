"""``losing-dimensions``: geometric memorization (Achilli et al., arXiv 2410.08727) in closed
form. How many dimensions does a score keep, against the training-set size, the time and the
regularization?

Data (:func:`sphere_data`): ``d = 30`` coordinates in three blocks, 5 of standard deviation 1,
10 of 0.3 and 15 of 0.01 (the *large*, *medium* and *small* subspaces), each point then
projected onto the unit sphere: a manifold of 5 + 10 - 1 = 14 salient dimensions with 15 of
near-zero thickness. The schedule is EDM's ``sigma = t``, ``m = 1``, up to ``sigma = 50``.

1. **Spectra over time, per N**: for each training-set size, the exact Jacobian of the
   empirical score (:func:`diffmem.geometry.jacobian`) at ``n_test`` fresh points of the
   data, noised at each level ``sigma`` of a log grid: its spectrum, the dimension estimates
   (:func:`diffmem.geometry.dimensions`: ``relative``, ``cliff``, ``gap``) and, per subspace,
   how much it is lost: the mean of ``-sigma^2 J_ii`` over its coordinates, clipped to
   ``[0, 1]`` (0: the score does not pull back along it, kept; 1: it pulls back as on pure
   noise, lost).
2. **Regularized scores** on the smallest training set: Tikhonov (``c``), the kernel density
   estimate (``h``: smoothing), the threshold (``tau``) and networks stopped early or kept
   small (VP MLPs; probed Jacobians at the same noise-to-signal level), each with the cost
   of its samples: the fraction that copy a training point and their median distance to the
   data's manifold over the data's own.
3. **Pham et al.'s classes against N**: samples of the empirical score (probability-flow
   ODE from ``sigma = 50`` to ``class_sigma``, then its denoiser, the posterior mean) are
   *memorized* (nearer a training point than a third of the training set's median
   nearest-neighbour distance), *generalized* (else within three times the data's 95th
   percentile of the distance to the manifold) or *spurious* (neither).

Claims: the dimension kept at the small level grows with N from about 0; as the level
falls, the subspaces are lost in order of their spread, smallest first; regularization keeps
dimensions the empirical score loses, at a cost in distance to the data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from diffmem import plots
from diffmem.experiments.base import (
    Claim,
    Context,
    Experiment,
    Recorded,
    Verdict,
    status_of,
)

SUBSPACES = ("large", "medium", "small")
DIM_CLAIM = ("The dimension the empirical score keeps at a small noise level grows with the "
             "training-set size (by at least one from the smallest N to the largest, never "
             "falling by more than 0.3), from about 0 (at most 1.5: every direction pulls "
             "back, memorized) towards the data's salient dimensions.")
ORDER_CLAIM = ("As the noise level falls at a fixed training-set size, the subspaces are "
               "lost one at a time in order of their spread: the smallest first, the largest "
               "last.")
REG_CLAIM = ("A regularization keeps dimensions the empirical score loses at the small "
             "noise level (at least 3 more), and its samples pay for it in distance to the "
             "data.")
#: A subspace counts as lost when the mean of ``-sigma^2 J_ii`` over it is at least this.
LOST = 0.5
#: Seed offsets of the test points and of the samples' noise.
TEST_SEED, NOISE_SEED = 101, 202


def sphere_data(n: int, blocks: list[int], stds: list[float], gen: torch.Generator) -> Tensor:
    """``n`` points: coordinates in ``blocks`` of the given standard deviations, projected
    onto the unit sphere, float64."""
    scale = torch.cat([torch.full((b,), s, dtype=torch.float64)
                       for b, s in zip(blocks, stds, strict=True)])
    x = torch.randn(n, int(sum(blocks)), generator=gen, dtype=torch.float64) * scale
    return x / x.norm(dim=1, keepdim=True)


def off_manifold(x: Tensor, blocks: list[int]) -> Tensor:
    """Each point's distance to the data's manifold, the unit sphere within the salient
    subspaces: ``sqrt(|x_small|^2 + (|x_salient| - 1)^2)``."""
    salient = int(sum(blocks[:-1]))
    return torch.sqrt(x[:, salient:].pow(2).sum(1) + (x[:, :salient].norm(dim=1) - 1) ** 2)


def _slices(blocks: list[int]) -> list[slice]:
    edges = [0, *torch.tensor(blocks).cumsum(0).tolist()]
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def _profile(score: Any, points: Tensor, sigmas: list[float], gen: torch.Generator,
             blocks: list[int], level_time: Any = None) -> dict[str, Any]:
    """At each level: the spectrum (median over points), the dimension estimates (mean) and
    each subspace's loss, for ``score`` at the noised ``points``."""
    from diffmem import geometry

    out: dict[str, Any] = {"spectra": [], "absolute": [], "relative": [], "cliff": [],
                           "gap": [], "loss": []}
    for sigma in sigmas:
        z = torch.randn(points.shape, generator=gen, dtype=torch.float64)
        if level_time is None:  # m = 1, sigma = t
            x, t, s2 = points + sigma * z, sigma, sigma ** 2
            jac = geometry.jacobian(score, x, t)
        else:  # a network on its own schedule, at the same noise-to-signal level
            t, m, s = level_time(sigma)
            x, s2 = m * points + s * z, s * s
            jac = geometry.probed_jacobian(score, x, t)
        values = torch.linalg.eigvalsh(jac).flip(-1)
        dims = geometry.dimensions(values, torch.full((x.shape[0],), s2))
        diag = (-s2 * torch.diagonal(jac, dim1=1, dim2=2)).clamp(0, 1)
        out["spectra"].append((s2 * values).median(0).values.tolist())
        for name in ("absolute", "relative", "cliff", "gap"):
            out[name].append(float(dims[name].to(torch.float64).mean()))
        out["loss"].append([float(diag[:, sl].mean()) for sl in _slices(blocks)])
    return out


def _classes(samples: Tensor, train: Tensor, blocks: list[int], scale: float,
             data_off: float) -> dict[str, float]:
    """Pham et al.'s fractions of ``samples``: memorized, generalized, spurious."""
    d1 = torch.cdist(samples, train).min(1).values
    memorized = d1 < scale / 3
    generalized = ~memorized & (off_manifold(samples, blocks) < 3 * data_off)
    n = samples.shape[0]
    return {"memorized": float(memorized.sum()) / n, "generalized": float(generalized.sum()) / n,
            "spurious": float((~memorized & ~generalized).sum()) / n}


def _sample(score: Any, sch: Any, n: int, d: int, sigma_max: float, end: float,
            gen: torch.Generator) -> Tensor:
    """Samples of a closed-form score: the ODE from ``sigma_max`` to ``end`` in
    transformed time, then the denoiser there."""
    from diffmem.samplers import sample_ode

    x_T = sigma_max * torch.randn(n, d, generator=gen, dtype=torch.float64)
    x = sample_ode(sch, score, x_T, t_end=end, rtol=1e-4, atol=1e-4).samples
    return score.denoiser(x, end)


def _train_scale(train: Tensor) -> float:
    """The training set's median nearest-neighbour distance."""
    dist = torch.cdist(train, train)
    dist.fill_diagonal_(math.inf)
    return float(dist.min(1).values.median())


def _regularized(ctx: Context, train: Tensor, sch: Any) -> dict[str, Any]:
    """The scores of step 2 on ``train``: closed forms, then the two networks (``(score,
    level_time)``: a network's levels on its own VP schedule)."""
    from diffmem.experiments.common import train_networks
    from diffmem.nn import NetworkScore
    from diffmem.schedules import VP
    from diffmem.scores import (
        EmpiricalScore,
        GaussianScore,
        KDEScore,
        ThresholdScore,
        TikhonovScore,
    )

    p = ctx.params
    found: dict[str, Any] = {"empirical": (EmpiricalScore(train, sch), None),
                             "gaussian (linear score)": (GaussianScore(train, sch), None)}
    found |= {f"tikhonov c={c:g}": (TikhonovScore(train, sch, c), None) for c in p["tikhonov"]}
    found |= {f"smoothing h={h:g}": (KDEScore(train, sch, h), None) for h in p["smoothing"]}
    found |= {f"threshold tau={t:g}": (ThresholdScore(train, sch, t), None)
              for t in p["threshold"]}
    vp = VP()

    def level_time(sigma: float) -> tuple[float, float, float]:
        t = vp.t_of_ratio(torch.tensor(sigma, dtype=torch.float64)).clamp(max=vp.T)
        m, s = float(vp.m(t)), float(vp.sigma(t))
        return float(t), m, s

    for name, width, steps in (("network, stopped early", p["net_width"], p["net_early"]),
                               ("network, small", p["net_small"], p["net_steps"])):
        trained = train_networks(ctx, train, lambdas=[0.0], parameterizations=["score"],
                                 steps=steps, width=width, ema_half_life=steps / 20,
                                 tag=f"checkpoints_{width}_{steps}", quiet_ema=True)
        found[f"{name} (width {width}, {steps} steps)"] = (
            NetworkScore(trained.ema, vp, 0), level_time)
    return found


def _cost(score: Any, level_time: Any, train: Tensor, p: Mapping[str, Any], d: int,
          gen: torch.Generator, scale: float, data_off: float, sch: Any) -> dict[str, float]:
    """A score's samples: the fraction within a third of the training set's scale of a
    training point, and their median distance to the manifold over the data's."""
    from diffmem.samplers import sample_ode

    if level_time is None:
        samples = _sample(score, sch, p["n_samples"], d, p["sigma_max"], p["small_sigma"], gen)
    else:  # a VP network: its ODE to the small level, then its denoiser over m
        t, m, s = level_time(p["small_sigma"])
        x_T = float(score.schedule.sigma(score.schedule.T)) * torch.randn(
            p["n_samples"], d, generator=gen, dtype=torch.float64)
        x = sample_ode(score.schedule, score, x_T.float(), t_end=t, rtol=1e-4,
                       atol=1e-4).samples.to(torch.float64)
        samples = (x + score.sigma2_score(x.float(), t).to(torch.float64)) / m
    d1 = torch.cdist(samples, train).min(1).values
    return {"copies": float((d1 < scale / 3).to(torch.float64).mean()),
            "distance_ratio": float(off_manifold(samples, p["blocks"]).median()) / data_off}


def compute(ctx: Context) -> dict[str, Any]:
    from diffmem.schedules import EDM
    from diffmem.scores import EmpiricalScore

    p = ctx.params
    blocks, stds, d = list(p["blocks"]), list(p["stds"]), int(sum(p["blocks"]))
    sch = EDM(sigma_max=p["sigma_max"])
    sigmas = torch.logspace(math.log10(p["sigma_max"]), math.log10(p["sigma_min"]),
                            p["n_sigma"], dtype=torch.float64).tolist()
    test = sphere_data(p["n_test"], blocks, stds, ctx.generator(TEST_SEED))
    data_off = float(off_manifold(sphere_data(2000, blocks, stds, ctx.generator(TEST_SEED + 1)),
                                  blocks).median())
    sizes: dict[int, Any] = {}
    for i, n in enumerate(p["sizes"]):
        train = sphere_data(n, blocks, stds, ctx.generator(i))
        score = EmpiricalScore(train, sch)
        samples = _sample(score, sch, p["n_samples"], d, p["sigma_max"], p["class_sigma"],
                          ctx.generator(NOISE_SEED))
        sizes[n] = {"profile": _profile(score, test, sigmas, ctx.generator(1000 + i), blocks),
                    "classes": _classes(samples, train, blocks, _train_scale(train), data_off)}
    train = sphere_data(p["sizes"][0], blocks, stds, ctx.generator(0))
    scale = _train_scale(train)
    regs = {}
    for k, (name, (score, level_time)) in enumerate(_regularized(ctx, train, sch).items()):
        regs[name] = {"profile": _profile(score, test, [p["small_sigma"]],
                                          ctx.generator(2000 + k), blocks, level_time),
                      **_cost(score, level_time, train, p, d, ctx.generator(NOISE_SEED), scale,
                              data_off, sch)}
    return {"sigmas": sigmas, "sizes": sizes, "regularized": regs, "data_off": data_off}


def _lost_below(loss: list[list[float]], sigmas: list[float], k: int) -> float:
    """The level below which subspace ``k`` stays lost as the level falls: the smallest
    level where it is kept (its loss below :data:`LOST`), or the largest level when it is
    never kept."""
    kept = [s for s, row in zip(sigmas, loss, strict=True) if row[k] < LOST]
    return min(kept) if kept else sigmas[0]


def record(ctx: Context, raw: dict[str, Any]) -> Recorded:
    p = ctx.params
    sigmas = raw["sigmas"]
    at = min(range(len(sigmas)), key=lambda i: abs(math.log(sigmas[i] / p["small_sigma"])))
    sizes = {}
    for n, res in raw["sizes"].items():
        prof = res["profile"]
        sizes[str(n)] = {
            "dimension_small": {e: prof[e][at] for e in ("absolute", "relative", "cliff", "gap")},
            "lost_below": {name: _lost_below(prof["loss"], sigmas, k)
                           for k, name in enumerate(SUBSPACES)},
            "classes": res["classes"], "profile": prof}
    estimates = ("absolute", "relative", "cliff", "gap")
    regs = {name: {"dimension_small": {e: r["profile"][e][0] for e in estimates},
                   "loss": r["profile"]["loss"][0], "copies": r["copies"],
                   "distance_ratio": r["distance_ratio"], "spectrum": r["profile"]["spectra"][0]}
            for name, r in raw["regularized"].items()}
    metrics = {"sigmas": sigmas, "small_sigma": sigmas[at], "sizes": sizes,
               "regularized": regs, "data_off_manifold": raw["data_off"],
               "units": {"dimension": "directions pulling back at less than half the strongest "
                                      "pull (relative: the claims'), at less than half pure "
                                      "noise's (absolute), or the cliff and gap estimates, "
                                      "mean over points",
                         "loss": "mean of -sigma^2 J_ii over the subspace, in [0, 1]",
                         "distance_ratio": "median distance of the samples to the data's "
                                           "manifold over the data's own (dimensionless)",
                         "copies": "fraction of samples within a third of the training "
                                   "set's median nearest-neighbour distance of a point"}}
    return Recorded(metrics)


def judge(metrics: Mapping[str, Any], params: Mapping[str, Any]) -> Verdict:
    sizes = metrics["sizes"]
    ns = sorted(sizes, key=int)
    dims = [sizes[n]["dimension_small"]["relative"] for n in ns]
    grows = all(b >= a - 0.3 for a, b in zip(dims, dims[1:], strict=False)) and \
        dims[0] <= 1.5 and dims[-1] >= dims[0] + 1
    dim_text = ", ".join(f"N = {n}: {v:.1f}" for n, v in zip(ns, dims, strict=True))
    claims = [Claim(DIM_CLAIM, status_of(grows), f"dimension kept at sigma = "
                    f"{metrics['small_sigma']:.3g} (relative estimate): {dim_text}")]
    orders = {n: [sizes[n]["lost_below"][s] for s in SUBSPACES] for n in ns}
    ordered = all(v[2] >= v[1] >= v[0] for v in orders.values())
    top = max(metrics["sigmas"])
    claims.append(Claim(ORDER_CLAIM, status_of(ordered), "; ".join(
        f"N = {n}: lost below sigma " + ", ".join(
            f"{s} {'(never kept)' if v >= top else format(v, '.3g')}"
            for s, v in zip(SUBSPACES, orders[n], strict=True)) for n in ns)))
    regs = metrics["regularized"]
    base = regs["empirical"]["dimension_small"]["relative"]
    kept = {k: r for k, r in regs.items() if k != "empirical"
            and r["dimension_small"]["relative"] >= base + 3}
    text = "; ".join(f"{k}: {r['dimension_small']['relative']:.1f} dimensions, copies "
                     f"{r['copies']:.2f}, distance to the manifold x{r['distance_ratio']:.2f}"
                     for k, r in regs.items())
    claims.append(Claim(REG_CLAIM, status_of(bool(kept)), text))
    return Verdict(tuple(claims))


def draw(rec: Recorded, params: Mapping[str, Any]) -> dict[str, Any]:
    m = rec.metrics
    sigmas = m["sigmas"]
    ns = sorted(m["sizes"], key=int)
    fig, ax = plots.figure(2, len(ns), size=3.3)
    for j, n in enumerate(ns):
        prof = m["sizes"][n]["profile"]
        for k, name in enumerate(SUBSPACES):
            ax[0, j].plot(sigmas, [row[k] for row in prof["loss"]], label=name)
        ax[0, j].axhline(LOST, color="0.6", ls=":", lw=0.8)
        ax[0, j].set(xscale="log", xlabel="sigma", ylabel="lost (mean -sigma^2 J_ii)",
                     title=f"N = {n}", ylim=(-0.03, 1.03))
        for est in ("relative", "cliff", "gap"):
            ax[1, j].plot(sigmas, prof[est], label=est)
        ax[1, j].axvline(m["small_sigma"], color="0.6", ls=":", lw=0.8)
        ax[1, j].set(xscale="log", xlabel="sigma", ylabel="dimension kept")
        ax[0, j].legend(fontsize=7)
        ax[1, j].legend(fontsize=7)
    fig.tight_layout()
    fig2, ax2 = plots.figure(1, 2, size=4.2)
    regs = m["regularized"]
    names = list(regs)
    ax2[0, 0].scatter([regs[k]["distance_ratio"] for k in names],
                      [regs[k]["dimension_small"]["relative"] for k in names])
    for k in names:
        ax2[0, 0].annotate(k, (regs[k]["distance_ratio"], regs[k]["dimension_small"]["relative"]),
                           fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax2[0, 0].set(xlabel="samples' distance to the manifold / the data's",
                  ylabel=f"dimensions kept at sigma = {m['small_sigma']:.3g}",
                  title=f"N = {ns[0]}: regularization")
    bottom = [0.0] * len(ns)
    for name in ("memorized", "generalized", "spurious"):
        vals = [m["sizes"][n]["classes"][name] for n in ns]
        ax2[0, 1].bar(ns, vals, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax2[0, 1].set(xlabel="training-set size N", ylabel="fraction of samples",
                  title="Pham et al.'s classes")
    ax2[0, 1].legend(fontsize=7)
    fig2.tight_layout()
    return {"dimensions": fig, "regularization": fig2}


EXPERIMENT = Experiment(
    name="losing-dimensions",
    cost=9,
    summary="Geometric memorization (Achilli et al.): the exact Jacobian spectrum of the "
            "empirical score on a 30-d sphere with 5 + 10 + 15 directions of spread 1, 0.3, "
            "0.01, against N and the noise level; which dimensions the regularized scores and "
            "small or early-stopped networks keep, at what cost; Pham et al.'s memorized, "
            "generalized and spurious samples against N.",
    claim=DIM_CLAIM,
    defaults={"blocks": [5, 10, 15], "stds": [1.0, 0.3, 0.01], "sizes": [250, 500, 20000],
              "n_test": 64, "sigma_max": 50.0, "sigma_min": 0.01, "n_sigma": 25,
              "small_sigma": 0.1, "class_sigma": 0.2, "n_samples": 200,
              "tikhonov": [0.01, 0.1],
              "smoothing": [0.1, 0.3], "threshold": [1.0], "schedule": "VP",
              "net_width": 256, "net_early": 2000, "net_small": 16, "net_steps": 20000},
    quick={"sizes": [50, 400, 3000], "n_test": 32, "n_sigma": 13, "n_samples": 100,
           "net_early": 500, "net_steps": 3000},
    compute=compute, record=record, judge=judge, draw=draw,
)
