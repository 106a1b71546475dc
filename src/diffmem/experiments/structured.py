"""Experiment 3: structured training sets (2 and 4 points) and starts on a square boundary.

Starts on a bisector between equidistant training points stay on it and converge to the
average of those points; every other start converges to a training point.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from diffmem import data, plots
from diffmem.experiments.base import Context, Experiment, Outcome
from diffmem.mixture import knn
from diffmem.samplers import sample_ode_transformed
from diffmem.schedules import get_schedule
from diffmem.scores import EmpiricalScore


def predicted_limits(starts: Tensor, train: Tensor) -> tuple[Tensor, Tensor]:
    """The limit the theory predicts for each start: the average of its two nearest training
    points when they are exactly equidistant (a bisector start), otherwise ``nan`` (any
    training point). Returns ``(limits, on_bisector)``."""
    d2, idx = knn(starts, train, k=2)
    on = d2[:, 0] == d2[:, 1]
    avg = train[idx].mean(1)
    return torch.where(on[:, None], avg, torch.full_like(avg, float("nan"))), on


def run(ctx: Context) -> Outcome:
    p = ctx.params
    sch = get_schedule(p["schedule"])
    sets = {"two": data.two_points(), "four": data.four_points()}
    starts = data.square_boundary(p["half_width"], p["per_side"])
    metrics: dict[str, Any] = {"n_starts": starts.shape[0], "s_end": p["s_end"]}
    ok = True
    notes = []
    fig, ax = plots.figure(1, 2, size=4.8)
    for i, (name, train) in enumerate(ctx.bar(sets.items(), "point sets")):
        res = sample_ode_transformed(sch, EmpiricalScore(train.to(ctx.device), sch),
                                     starts.to(ctx.device), s_end=p["s_end"], rtol=p["rtol"],
                                     atol=p["atol"], return_trajectory=True,
                                     n_record=p["n_record"])
        assert res.trajectory is not None
        limits = res.samples.cpu()
        expected, on = predicted_limits(starts, train)
        d_train, _ = knn(limits, train, k=1)
        generic = d_train[~on, 0].sqrt()
        bisector_err = (limits[on] - expected[on]).norm(dim=1)
        a = ax[0, i]
        plots.voronoi(a, train, lim=p["half_width"] + 0.2)
        plots.trajectories(a, res.trajectory.cpu()[~on], color="C0", lw=0.5)
        plots.trajectories(a, res.trajectory.cpu()[on], color="C3", lw=1.2)
        a.scatter(limits[on, 0], limits[on, 1], color="C3", s=40, marker="o", zorder=6,
                  label="bisector limits")
        a.set_title(f"{name} points: {int(on.sum())} bisector starts")
        a.legend(fontsize=7, loc="lower left")
        max_generic = float(generic.max()) if generic.numel() else 0.0
        max_bisector = float(bisector_err.max()) if bisector_err.numel() else 0.0
        metrics[name] = {
            "training_points": train.tolist(),
            "limits": limits.tolist(),
            "bisector_starts": starts[on].tolist(),
            "bisector_limits": limits[on].tolist(),
            "bisector_expected": expected[on].tolist(),
            "max_bisector_error": max_bisector,
            "max_generic_distance": max_generic,
        }
        ok &= max_generic < p["tolerance"] and max_bisector < p["tolerance"]
        notes.append(f"{name}: {int(on.sum())} bisector starts end within {max_bisector:.1e} "
                     f"of the averages, the other starts within {max_generic:.1e} of a "
                     "training point")
    ctx.save(fig, "structured_points")
    return Outcome.judged(metrics, ok, "; ".join(notes))


EXPERIMENT = Experiment(
    name="structured-points",
    summary="Two points (+-1,0) and four points (+-1,0),(0,+-1); 80 starts on the boundary of "
            "[-2.1, 2.1]^2 integrated to s = 100.",
    claim="Starts on a bisector converge to the average of the equidistant points (origin; "
          "(+-1/2, +-1/2)); all others converge to a training point.",
    defaults={"schedule": "VE", "s_end": 100.0, "rtol": 1e-7, "atol": 1e-7, "half_width": 2.1,
              "per_side": 21, "n_record": 300, "tolerance": 1e-4},
    quick={"s_end": 40.0, "n_record": 100},
    run=run,
)
