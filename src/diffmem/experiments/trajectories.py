"""Experiment 1: the empirical score memorizes (VE and VP).

30 trajectories over the Voronoi diagram of the paper's 20 points, the weights ``w_n(t)``,
``|x(t) - x(t_end)|`` against ``sigma(t)`` with the ``O(sigma)`` line, and 1000 samples with
their memorized fraction and hit counts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffmem import data, plots
from diffmem.experiments.base import Context, Experiment, Recorded, Verdict
from diffmem.experiments.common import (
    slope_window,
    trace,
    traced_arrays,
    traced_figure,
    traced_slopes,
)
from diffmem.metrics import delta_key, fractions, hit_counts, nearest
from diffmem.samplers import sample_ode
from diffmem.schedules import get_schedule
from diffmem.scores import EmpiricalScore

#: Seed offsets (schedule ``i`` adds ``i``): the samples and the traced trajectories draw
#: from separate streams, so changing one count leaves the other's noise unchanged.
SAMPLES_SEED, TRAJECTORIES_SEED = 0, 100
#: O(sigma) means a fitted exponent of 1; a finite fit window biases it by a few percent.
SLOPE_TOLERANCE = 0.1
#: Memorization means every sample ends within the first tolerance of a training point.
MEMORIZED = 1.0

CLAIM = ("Sampling with the exact empirical score returns the training points: weights go "
         "one-hot and |x(t) - x(t_end)| = O(sigma(t)).")


def compute(ctx: Context) -> dict[str, Any]:
    p = ctx.params
    train = data.paper_points().to(ctx.device)
    out: dict[str, Any] = {"train": train}
    for i, name in enumerate(ctx.bar(p["schedules"], "schedules")):
        sch = get_schedule(name)
        score = ctx.closed_form(EmpiricalScore, train, sch)
        sigma_T = float(sch.sigma(sch.T))
        x_traj = ctx.noise(p["n_trajectories"], (2,), sigma_T, offset=TRAJECTORIES_SEED + i)
        traced = trace(sch, score, x_traj, p["t_end"], p["rtol"], p["atol"], p["n_record"])
        x_T = ctx.noise(p["n_samples"], (2,), sigma_T, offset=SAMPLES_SEED + i)
        res = sample_ode(sch, score, x_T, t_end=p["t_end"], rtol=p["rtol"], atol=p["atol"])
        out[name] = {"schedule": sch, "traced": traced, "samples": res}
    return out


def record(ctx: Context, raw: dict[str, Any]) -> Recorded:
    p = ctx.params
    train = raw["train"]
    metrics: dict[str, Any] = {"deltas": p["deltas"]}
    arrays: dict[str, Any] = {"train": train.cpu()}
    for name in p["schedules"]:
        sch, traced, res = raw[name]["schedule"], raw[name]["traced"], raw[name]["samples"]
        window = slope_window(sch, p["t_end"], p["fit_sigma_max"])
        slopes = traced_slopes(traced, window)
        _, dist = nearest(res.samples, train)
        metrics[name] = {
            "fraction_within": fractions(res.samples, train, p["deltas"]),
            "convergence_slope": float(slopes.median()),
            "convergence_slope_range": [float(slopes.min()), float(slopes.max())],
            "fit_window_sigma": list(window),
            "hit_counts": hit_counts(res.samples, train, p["deltas"][0]).tolist(),
            "max_distance_to_training": float(dist.max()),
            "n_samples": p["n_samples"],
            "score_evals": res.stats["score_evals"],
        }
        arrays.update(traced_arrays(traced, f"{name}_"))
        arrays[f"{name}_samples"] = res.samples.cpu()
    return Recorded(metrics, arrays)


def judge(metrics: Mapping[str, Any], params: Mapping[str, Any]) -> Verdict:
    key = delta_key(params["deltas"][0])
    ok, notes = True, []
    for name in params["schedules"]:
        m = metrics[name]
        first, slope = m["fraction_within"][key], m["convergence_slope"]
        ok &= first >= MEMORIZED and abs(slope - 1) <= SLOPE_TOLERANCE
        notes.append(f"{name}: {first:.3f} of samples within {params['deltas'][0]}, "
                     f"slope {slope:.3f}")
    lead = "the empirical score returns training points at rate O(sigma). " if ok else ""
    return Verdict.of(CLAIM, ok, lead + "; ".join(notes))


def draw(rec: Recorded, params: Mapping[str, Any]) -> dict[str, Any]:
    figs: dict[str, Any] = {}
    train = rec.array("train")
    key = delta_key(params["deltas"][0])
    for name in params["schedules"]:
        m = rec.metrics[name]
        figs[f"trajectories_{name}"] = traced_figure(
            rec, f"{name}_", train, f"{name}, empirical score", m["fit_window_sigma"],
            m["convergence_slope"])
        figs[f"samples_{name}"] = plots.voronoi_grid(
            train, [rec.array(f"{name}_samples")],
            [f"{name}: {params['n_samples']} samples, {m['fraction_within'][key]:.3f} within "
             f"{params['deltas'][0]}"], size=4.5)
    return figs


EXPERIMENT = Experiment(
    name="trajectories",
    cost=1,
    summary="Empirical score, VE and VP: trajectories, weights, O(sigma) convergence, "
            "memorized fraction of 1000 samples.",
    claim=CLAIM,
    defaults={"schedules": ["VE", "VP"], "n_trajectories": 30, "n_samples": 1000,
              "t_end": 1e-6, "rtol": 1e-5, "atol": 1e-5, "n_record": 200,
              "fit_sigma_max": 0.1, "deltas": [1e-2]},
    quick={"n_trajectories": 8, "n_samples": 200, "n_record": 120},
    compute=compute, record=record, judge=judge, draw=draw, distributed=True,
)
