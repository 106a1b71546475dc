"""Experiments 4 and 5: closed-form regularization sweeps on the paper's 20 points (VE).

* Tikhonov: ``s_c = (D_e - x) / (sigma^2 + c)``, ``c`` in ``logspace(-1, -5, 9)``, ODE to
  ``t = 0``.
* Threshold: ``s_tau = min(1, p~/tau) s_N``, ``tau`` in ``logspace(-2, 1, 7)``,
  ``t_end = 1e-6``, with trajectories and weights at ``tau = 0.1``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from diffmem import data, plots
from diffmem.experiments.base import Context, Experiment, Recorded, Verdict
from diffmem.experiments.common import (
    by_value,
    decreasing,
    sweep_samples,
    trace,
    traced_arrays,
    traced_figure,
)
from diffmem.metrics import delta_key, fraction_sweep
from diffmem.schedules import get_schedule
from diffmem.scores import ClosedFormScore, ThresholdScore, TikhonovScore

#: Seed offset of the traced trajectories at ``trace_tau`` (the samples use offset 0).
TRAJECTORIES_SEED = 300
#: Slack of "the fraction falls as the strength grows": 2% absorbs sampling noise between
#: neighbouring strengths (4 samples in 200 at quick sizes).
MONOTONE_SLACK = 0.02

TIKHONOV_CLAIM = ("Tikhonov regularization prevents memorization: the memorized fraction "
                  "falls as c grows.")
THRESHOLD_CLAIM = ("The threshold regularizer damps the score where the mixture is thin: the "
                   "memorized fraction falls as tau grows.")


def _compute(ctx: Context, parameter: str,
             make: Callable[..., ClosedFormScore]) -> dict[str, Any]:
    p = ctx.params
    train = data.paper_points().to(ctx.device)
    sch = get_schedule(p["schedule"])
    x_T = ctx.noise(p["n_samples"], (2,), float(sch.sigma(sch.T)))
    samples = sweep_samples(ctx, sch, p["values"],
                            lambda v: ctx.closed_form(make, train, sch, v), x_T, p["t_end"],
                            f"{parameter} sweep")
    return {"train": train, "schedule": sch, "samples": samples}


def _record(ctx: Context, raw: dict[str, Any], parameter: str) -> Recorded:
    p = ctx.params
    metrics = {"parameter": parameter, "values": list(p["values"]),
               "n_samples": p["n_samples"], "schedule": raw["schedule"].name,
               "t_end": p["t_end"],
               "fraction_within": fraction_sweep(raw["samples"], raw["train"], p["deltas"])}
    arrays = {"train": raw["train"].cpu(),
              **{f"samples_{i}": s.cpu() for i, s in enumerate(raw["samples"])}}
    return Recorded(metrics, arrays)


def _judge(claim: str, metrics: Mapping[str, Any], params: Mapping[str, Any]) -> Verdict:
    name = metrics["parameter"]
    values, fracs = by_value(metrics["values"],
                             metrics["fraction_within"][delta_key(params["deltas"][0])])
    ok = decreasing(fracs, slack=MONOTONE_SLACK) and fracs[0] > fracs[-1]
    text = (f"fraction within 1e-2 goes from {fracs[0]:.3f} at {name} = {values[0]:.2g} to "
            f"{fracs[-1]:.3f} at {name} = {values[-1]:.2g}")
    return Verdict.of(claim, ok, ("regularization stops memorization; " if ok else "") + text)


def _draw(rec: Recorded, params: Mapping[str, Any]) -> dict[str, Any]:
    m = rec.metrics
    parameter, values = m["parameter"], m["values"]
    curve = plots.fraction_figure(values, {"": m["fraction_within"]}, parameter,
                                  title=f"{m['schedule']}: memorized fraction vs {parameter}")
    first = m["fraction_within"][delta_key(params["deltas"][0])]
    grid = plots.voronoi_grid(
        rec.array("train"), [rec.array(f"samples_{i}") for i in range(len(values))],
        [f"{parameter} = {v:.2g}: {f:.3f}" for v, f in zip(values, first, strict=True)],
        cols=math.ceil(math.sqrt(len(values))))
    return {f"fraction_vs_{parameter}": curve, f"samples_{parameter}": grid}


def compute_tikhonov(ctx: Context) -> dict[str, Any]:
    return _compute(ctx, "c", TikhonovScore)


def compute_threshold(ctx: Context) -> dict[str, Any]:
    p = ctx.params
    raw = _compute(ctx, "tau", ThresholdScore)
    sch, train = raw["schedule"], raw["train"]
    x_T = ctx.noise(p["n_trajectories"], (2,), float(sch.sigma(sch.T)),
                    offset=TRAJECTORIES_SEED)
    raw["traced"] = trace(sch, ctx.closed_form(ThresholdScore, train, sch, p["trace_tau"]),
                          x_T, p["t_end"],
                          p["rtol"], p["atol"], p["n_record"])
    return raw


def record_threshold(ctx: Context, raw: dict[str, Any]) -> Recorded:
    rec = _record(ctx, raw, "tau")
    rec.metrics["trace_tau"] = ctx.params["trace_tau"]
    rec.metrics["trace_final_weight_sum"] = raw["traced"].weights[:, -1].sum(-1).tolist()
    rec.arrays.update(traced_arrays(raw["traced"], "traced_"))
    return rec


def draw_threshold(rec: Recorded, params: Mapping[str, Any]) -> dict[str, Any]:
    figs = _draw(rec, params)
    tau = params["trace_tau"]
    figs[f"trajectories_tau_{tau}"] = traced_figure(rec, "traced_", rec.array("train"),
                                                    f"tau = {tau}")
    return figs


TIKHONOV = Experiment(
    name="tikhonov-sweep",
    cost=1,
    summary="Closed-form Tikhonov score, VE, c in logspace(-1, -5, 9): 1000 samples integrated "
            "to t = 0; fraction within 1e-2 against c; samples over the Voronoi diagram.",
    claim=TIKHONOV_CLAIM,
    defaults={"schedule": "VE", "values": [float(v) for v in np.logspace(-1, -5, 9)],
              "n_samples": 1000, "t_end": 0.0, "rtol": 1e-5, "atol": 1e-5, "deltas": [1e-2]},
    quick={"values": [1e-1, 1e-3, 1e-5], "n_samples": 200},
    compute=compute_tikhonov,
    record=lambda ctx, raw: _record(ctx, raw, "c"),
    judge=lambda metrics, params: _judge(TIKHONOV_CLAIM, metrics, params),
    draw=_draw,
    distributed=True,
)

THRESHOLD = Experiment(
    name="threshold-sweep",
    cost=1,
    summary="Empirical-Bayes threshold score, VE, tau in logspace(-2, 1, 7): 1000 samples to "
            "t_end = 1e-6; fraction against tau; trajectories and weights at tau = 0.1.",
    claim=THRESHOLD_CLAIM,
    defaults={"schedule": "VE", "values": [float(v) for v in np.logspace(-2, 1, 7)],
              "n_samples": 1000, "t_end": 1e-6, "rtol": 1e-5, "atol": 1e-5, "deltas": [1e-2],
              "trace_tau": 0.1, "n_trajectories": 30, "n_record": 200},
    quick={"values": [1e-2, 1.0, 10.0], "n_samples": 200, "n_trajectories": 8,
           "n_record": 100},
    compute=compute_threshold,
    record=record_threshold,
    judge=lambda metrics, params: _judge(THRESHOLD_CLAIM, metrics, params),
    draw=draw_threshold,
    distributed=True,
)
