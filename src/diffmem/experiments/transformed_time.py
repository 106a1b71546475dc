"""Experiment 2: transformed time ``s = -log sigma`` (VE and VP).

The PF-ODE written in ``s`` has no singularity; distances to the limit decay as ``O(e^-s)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from diffmem import data, plots
from diffmem.experiments.base import Context, Experiment, Recorded, Verdict
from diffmem.metrics import convergence_slopes, decay_reference, nearest
from diffmem.samplers import sample_ode
from diffmem.schedules import get_schedule
from diffmem.scores import EmpiricalScore

#: Seed offset of the trajectories (schedule ``i`` adds ``i``), apart from the other
#: experiments' streams.
TRAJECTORIES_SEED = 200
#: O(e^-s) means a fitted rate of 1; the fit window's finite length biases it slightly.
RATE_TOLERANCE = 0.1

CLAIM = "In transformed time the dynamics are regular and converge at rate O(e^-s)."


def compute(ctx: Context) -> dict[str, Any]:
    p = ctx.params
    train = data.paper_points().to(ctx.device)
    out: dict[str, Any] = {"train": train}
    for i, name in enumerate(ctx.bar(p["schedules"], "schedules")):
        sch = get_schedule(name)
        x_T = ctx.noise(p["n_trajectories"], (2,), float(sch.sigma(sch.T)),
                        offset=TRAJECTORIES_SEED + i)
        score = ctx.closed_form(EmpiricalScore, train, sch)
        out[name] = sample_ode(sch, score, x_T, s_end=p["s_end"], rtol=p["rtol"],
                               atol=p["atol"], return_trajectory=True, n_record=p["n_record"])
    return out


def record(ctx: Context, raw: dict[str, Any]) -> Recorded:
    p = ctx.params
    metrics: dict[str, Any] = {}
    arrays: dict[str, Any] = {}
    window = (p["fit_s_min"], p["s_end"] - p["fit_s_margin"])
    for name in p["schedules"]:
        res = raw[name]
        assert res.trajectory is not None and res.s_times is not None
        slopes = convergence_slopes(res.trajectory, res.samples, res.s_times, window,
                                    log_abscissa=False)
        _, dist_end = nearest(res.samples, raw["train"])
        metrics[name] = {
            "rate": -float(slopes.median()),
            "rate_range": [-float(slopes.max()), -float(slopes.min())],
            "fit_window_s": list(window),
            "s_end": p["s_end"],
            "max_final_distance_to_training": float(dist_end.max()),
        }
        s = res.s_times
        keep = s < s[-1]
        dist = (res.trajectory - res.samples[:, None]).norm(dim=-1)[:, keep].cpu()
        arrays[f"{name}_s"] = s[keep]
        arrays[f"{name}_distance"] = dist
        arrays[f"{name}_reference"] = decay_reference(torch.exp(-s[keep]), dist)
    return Recorded(metrics, arrays)


def judge(metrics: Mapping[str, Any], params: Mapping[str, Any]) -> Verdict:
    rates = {name: metrics[name]["rate"] for name in params["schedules"]}
    ok = all(abs(r - 1) <= RATE_TOLERANCE for r in rates.values())
    lead = "in s = -log sigma trajectories converge as O(e^-s). " if ok else ""
    return Verdict.of(CLAIM, ok, lead + "; ".join(f"{n}: rate {r:.3f}"
                                                  for n, r in rates.items()))


def draw(rec: Recorded, params: Mapping[str, Any]) -> dict[str, Any]:
    names = params["schedules"]
    fig, ax = plots.figure(1, len(names), size=4.5)
    for i, name in enumerate(names):
        m = rec.metrics[name]
        plots.distance_decay(ax[0, i], rec.array(f"{name}_s"), rec.array(f"{name}_distance"),
                             rec.array(f"{name}_reference"), "s = -log sigma", "$O(e^{-s})$",
                             logx=False)
        ax[0, i].axvspan(*m["fit_window_s"], color="0.9", zorder=0)
        ax[0, i].set_title(f"{name}: fitted rate {m['rate']:.3f}")
    return {"distance_vs_s": fig}


EXPERIMENT = Experiment(
    name="transformed-time",
    cost=1,
    summary="Empirical score in transformed time s = -log sigma, VE and VP: distance against "
            "s with the O(e^-s) line.",
    claim=CLAIM,
    defaults={"schedules": ["VE", "VP"], "n_trajectories": 30, "s_end": 25.0, "rtol": 1e-8,
              "atol": 1e-10, "n_record": 250, "fit_s_min": 3.0, "fit_s_margin": 10.0},
    quick={"n_trajectories": 8, "n_record": 120},
    compute=compute, record=record, judge=judge, draw=draw, distributed=True,
)
