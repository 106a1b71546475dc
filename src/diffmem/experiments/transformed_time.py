"""Experiment 2: transformed time ``s = -log sigma`` (VE and VP).

The PF-ODE written in ``s`` has no singularity; distances to the limit decay as ``O(e^-s)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from diffmem import data, plots
from diffmem.experiments.base import Context, Experiment, Outcome
from diffmem.metrics import convergence_slopes, nearest
from diffmem.samplers import sample_ode_transformed
from diffmem.schedules import get_schedule
from diffmem.scores import EmpiricalScore


def run(ctx: Context) -> Outcome:
    p = ctx.params
    train = data.paper_points().to(ctx.device)
    metrics: dict[str, Any] = {}
    ok = True
    notes = []
    fig, ax = plots.figure(1, len(p["schedules"]), size=4.5)
    for i, name in enumerate(ctx.bar(p["schedules"], "schedules")):
        sch = get_schedule(name)
        score = EmpiricalScore(train, sch)
        x_T = ctx.noise(p["n_trajectories"], (2,), float(sch.sigma(sch.T)), offset=200 + i)
        res = sample_ode_transformed(sch, score, x_T, s_end=p["s_end"], rtol=p["rtol"],
                                     atol=p["atol"], return_trajectory=True,
                                     n_record=p["n_record"])
        assert res.trajectory is not None and res.times is not None
        window = (p["fit_s_min"], p["s_end"] - p["fit_s_margin"])
        slopes = convergence_slopes(res.trajectory, res.samples, res.times, window,
                                    log_abscissa=False)
        rate = -float(slopes.median())
        _, dist_end = nearest(res.samples, train)
        dist = (res.trajectory - res.samples[:, None]).norm(dim=-1)
        s = res.times
        keep = s < s[-1]
        ref = torch.exp(-s[keep]) * float(dist[:, keep][:, 0].median() / math.exp(-float(s[0])))
        plots.distance_decay(ax[0, i], s[keep], dist[:, keep], ref, "s = -log sigma",
                             "$O(e^{-s})$", logx=False)
        ax[0, i].axvspan(*window, color="0.9", zorder=0)
        ax[0, i].set_title(f"{name}: fitted rate {rate:.3f}")
        metrics[name] = {
            "rate": rate,
            "rate_range": [-float(slopes.max()), -float(slopes.min())],
            "fit_window_s": list(window),
            "s_end": p["s_end"],
            "max_final_distance_to_training": float(dist_end.max()),
        }
        ok &= abs(rate - 1) <= 0.1
        notes.append(f"{name}: rate {rate:.3f}")
    ctx.save(fig, "distance_vs_s")
    claim = "in s = -log sigma trajectories converge as O(e^-s). " if ok else ""
    return Outcome.judged(metrics, ok, claim + "; ".join(notes))


EXPERIMENT = Experiment(
    name="transformed-time",
    summary="Empirical score in transformed time s = -log sigma, VE and VP: distance against "
            "s with the O(e^-s) line.",
    claim="In transformed time the dynamics are regular and converge at rate O(e^-s).",
    defaults={"schedules": ["VE", "VP"], "n_trajectories": 30, "s_end": 25.0, "rtol": 1e-8,
              "atol": 1e-10, "n_record": 250, "fit_s_min": 3.0, "fit_s_margin": 10.0},
    quick={"n_trajectories": 8, "n_record": 120},
    run=run,
)
