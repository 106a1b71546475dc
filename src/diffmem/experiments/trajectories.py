"""Experiment 1: the empirical score memorizes (VE and VP).

30 trajectories over the Voronoi diagram of the paper's 20 points, the weights ``w_n(t)``,
``|x(t) - x(t_end)|`` against ``sigma(t)`` with the ``O(sigma)`` line, and 1000 samples with
their memorized fraction and hit counts.
"""

from __future__ import annotations

from typing import Any

from diffmem import data, plots
from diffmem.experiments.base import Context, Experiment, Outcome
from diffmem.experiments.common import fractions, slope_window, trace, traced_figure
from diffmem.metrics import hit_counts, nearest
from diffmem.samplers import sample_ode
from diffmem.schedules import get_schedule
from diffmem.scores import EmpiricalScore


def run(ctx: Context) -> Outcome:
    p = ctx.params
    train = data.paper_points().to(ctx.device)
    metrics: dict[str, Any] = {"deltas": p["deltas"]}
    ok = True
    notes = []
    for i, name in enumerate(ctx.bar(p["schedules"], "schedules")):
        sch = get_schedule(name)
        score = EmpiricalScore(train, sch)
        sigma_T = float(sch.sigma(sch.T))
        x_traj = ctx.noise(p["n_trajectories"], (2,), sigma_T, offset=100 + i)
        traced = trace(ctx, sch, score, x_traj, p["t_end"], p["rtol"], p["atol"],
                       p["n_record"])
        window = slope_window(sch, p["t_end"], p["fit_sigma_max"])
        slopes = traced_figure(ctx, train.cpu(), traced, f"{name}, empirical score",
                               f"trajectories_{name}", window)
        assert slopes is not None
        x_T = ctx.noise(p["n_samples"], (2,), sigma_T, offset=i)
        res = sample_ode(sch, score, x_T, t_end=p["t_end"], rtol=p["rtol"], atol=p["atol"])
        frac = fractions(res.samples, train, p["deltas"])
        _, dist = nearest(res.samples, train)
        hits = hit_counts(res.samples, train, p["deltas"][0])
        fig, ax = plots.figure(1, 1, size=4.5)
        plots.voronoi(ax[0, 0], train.cpu())
        plots.scatter(ax[0, 0], res.samples)
        ax[0, 0].set_title(f"{name}: {p['n_samples']} samples, "
                           f"{frac[repr(float(p['deltas'][0]))]:.3f} within {p['deltas'][0]}")
        ctx.save(fig, f"samples_{name}")
        slope = float(slopes.median())
        metrics[name] = {
            "fraction_within": frac,
            "convergence_slope": slope,
            "convergence_slope_range": [float(slopes.min()), float(slopes.max())],
            "fit_window_sigma": list(window),
            "hit_counts": hits.tolist(),
            "max_distance_to_training": float(dist.max()),
            "n_samples": p["n_samples"],
            "score_evals": res.stats["score_evals"],
        }
        first = frac[repr(float(p["deltas"][0]))]
        ok &= first == 1.0 and abs(slope - 1) <= 0.1
        notes.append(f"{name}: {first:.3f} of samples within {p['deltas'][0]}, slope {slope:.3f}")
    claim = "the empirical score returns training points at rate O(sigma). " if ok else ""
    return Outcome.judged(metrics, ok, claim + "; ".join(notes))


EXPERIMENT = Experiment(
    name="trajectories",
    summary="Empirical score, VE and VP: trajectories, weights, O(sigma) convergence, "
            "memorized fraction of 1000 samples.",
    claim="Sampling with the exact empirical score returns the training points: weights go "
          "one-hot and |x(t) - x(t_end)| = O(sigma(t)).",
    defaults={"schedules": ["VE", "VP"], "n_trajectories": 30, "n_samples": 1000,
              "t_end": 1e-6, "rtol": 1e-5, "atol": 1e-5, "n_record": 200,
              "fit_sigma_max": 0.1, "deltas": [1e-2]},
    quick={"n_trajectories": 8, "n_samples": 200, "n_record": 120},
    run=run,
)
