"""Experiment 3: structured training sets (2 and 4 points) and starts on a square boundary.

Starts on a bisector between equidistant training points stay on it and converge to the
average of those points; every other start converges to a training point.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from diffmem import data, plots
from diffmem.experiments.base import Context, Experiment, Recorded, Verdict
from diffmem.mixture import knn
from diffmem.samplers import sample_ode
from diffmem.schedules import get_schedule
from diffmem.scores import EmpiricalScore

CLAIM = ("Starts on a bisector converge to the average of the equidistant points (origin; "
         "(+-1/2, +-1/2)); all others converge to a training point.")


def predicted_limits(starts: Tensor, train: Tensor) -> tuple[Tensor, Tensor]:
    """The limit the theory predicts for each start: the average of its two nearest training
    points when they are exactly equidistant (a bisector start), otherwise ``nan`` (any
    training point). Returns ``(limits, on_bisector)``."""
    d2, idx = knn(starts, train, k=2)
    on = d2[:, 0] == d2[:, 1]
    avg = train[idx].mean(1)
    return torch.where(on[:, None], avg, torch.full_like(avg, float("nan"))), on


def _sets() -> dict[str, Tensor]:
    return {"two": data.two_points(), "four": data.four_points()}


def compute(ctx: Context) -> dict[str, Any]:
    p = ctx.params
    sch = get_schedule(p["schedule"])
    starts = data.square_boundary(p["half_width"], p["per_side"])
    out: dict[str, Any] = {"starts": starts}
    for name, train in ctx.bar(_sets().items(), "point sets"):
        out[name] = sample_ode(sch, ctx.closed_form(EmpiricalScore, train.to(ctx.device), sch),
                               starts.to(ctx.device), s_end=p["s_end"], rtol=p["rtol"],
                               atol=p["atol"], return_trajectory=True, n_record=p["n_record"])
    return out


def record(ctx: Context, raw: dict[str, Any]) -> Recorded:
    starts = raw["starts"]
    metrics: dict[str, Any] = {"n_starts": starts.shape[0], "s_end": ctx.params["s_end"]}
    arrays: dict[str, Any] = {}
    for name, train in _sets().items():
        res = raw[name]
        assert res.trajectory is not None
        limits = res.samples.cpu()
        expected, on = predicted_limits(starts, train)
        d_train, _ = knn(limits, train, k=1)
        generic = d_train[~on, 0].sqrt()
        bisector_err = (limits[on] - expected[on]).norm(dim=1)
        metrics[name] = {
            "training_points": train.tolist(),
            "limits": limits.tolist(),
            "bisector_starts": starts[on].tolist(),
            "bisector_limits": limits[on].tolist(),
            "bisector_expected": expected[on].tolist(),
            "max_bisector_error": float(bisector_err.max()) if bisector_err.numel() else 0.0,
            "max_generic_distance": float(generic.max()) if generic.numel() else 0.0,
        }
        arrays[f"{name}_trajectory"] = res.trajectory.cpu()
        arrays[f"{name}_on_bisector"] = on
    return Recorded(metrics, arrays)


def judge(metrics: Mapping[str, Any], params: Mapping[str, Any]) -> Verdict:
    ok, notes = True, []
    for name in _sets():
        m = metrics[name]
        ok &= m["max_generic_distance"] < params["tolerance"] and m[
            "max_bisector_error"] < params["tolerance"]
        notes.append(f"{name}: {len(m['bisector_starts'])} bisector starts end within "
                     f"{m['max_bisector_error']:.1e} of the averages, the other starts within "
                     f"{m['max_generic_distance']:.1e} of a training point")
    return Verdict.of(CLAIM, ok, "; ".join(notes))


def draw(rec: Recorded, params: Mapping[str, Any]) -> dict[str, Any]:
    fig, ax = plots.figure(1, 2, size=4.8)
    for i, name in enumerate(_sets()):
        m = rec.metrics[name]
        traj, on = rec.array(f"{name}_trajectory"), rec.array(f"{name}_on_bisector")
        lim = torch.tensor(m["bisector_limits"]).reshape(-1, 2)
        a = ax[0, i]
        plots.voronoi(a, torch.tensor(m["training_points"]), lim=params["half_width"] + 0.2)
        plots.trajectories(a, traj[~on], color="C0", lw=0.5)
        plots.trajectories(a, traj[on], color="C3", lw=1.2)
        a.scatter(lim[:, 0], lim[:, 1], color="C3", s=40, marker="o", zorder=6,
                  label="bisector limits")
        a.set_title(f"{name} points: {int(on.sum())} bisector starts")
        a.legend(fontsize=7, loc="lower left")
    return {"structured_points": fig}


EXPERIMENT = Experiment(
    name="structured-points",
    cost=1,
    summary="Two points (+-1,0) and four points (+-1,0),(0,+-1); 80 starts on the boundary of "
            "[-2.1, 2.1]^2 integrated to s = 100.",
    claim=CLAIM,
    defaults={"schedule": "VE", "s_end": 100.0, "rtol": 1e-7, "atol": 1e-7, "half_width": 2.1,
              "per_side": 21, "n_record": 300, "tolerance": 1e-4},
    quick={"s_end": 40.0, "n_record": 100},
    compute=compute, record=record, judge=judge, draw=draw, distributed=True,
)
