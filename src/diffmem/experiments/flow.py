"""``flow-matching``: the paper's central claims under flow matching (rectified flow).

The linear path ``x_t = (1 - t) x_0 + t z`` is a Gaussian path with ``m = 1 - t`` and
``sigma = t`` (:class:`diffmem.schedules.RectifiedFlow`), and the exact minimizer of the
empirical flow-matching loss ``E |u(x_t, t) - (z - x_0)|^2`` is the velocity
``u(x, t) = (x - D_e(x, t)) / t`` of the same Gaussian mixture as the score (Bertrand et al.,
2025), which is the probability-flow drift ``f - g^2 s / 2`` of the empirical score on that
path. So the paper's three closed-form experiments run unchanged on the path, composed here on
the paper's 20 points:

* ``velocity`` (``trajectories``): sampling the exact velocity returns the training points,
  ``|x(t) - x(t_end)| = O(sigma(t))``;
* ``tikhonov`` (``tikhonov-sweep``): the Tikhonov score ``(m D_e - x) / (sigma^2 + c)``, ODE to
  ``t = 0``: the memorized fraction falls as ``c`` grows;
* ``threshold`` (``threshold-sweep``): the empirical-Bayes threshold ``min(1, p~/tau) s_N``:
  the memorized fraction falls as ``tau`` grows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from diffmem.experiments import sweeps, trajectories
from diffmem.experiments.base import Context, Experiment, Recorded, Verdict

SCHEDULE = "RF"
#: The composed experiments, and which of this experiment's parameters each takes (by its
#: own name).
PARTS: dict[str, tuple[Experiment, dict[str, str]]] = {
    "velocity": (trajectories.EXPERIMENT, {"n_trajectories": "n_trajectories",
                                           "n_samples": "n_samples", "n_record": "n_record"}),
    "tikhonov": (sweeps.TIKHONOV, {"values": "tikhonov_values", "n_samples": "n_samples"}),
    "threshold": (sweeps.THRESHOLD, {"values": "threshold_values", "n_samples": "n_samples",
                                     "n_trajectories": "n_trajectories",
                                     "n_record": "n_record"}),
}


def part_params(params: Mapping[str, Any], part: str) -> dict[str, Any]:
    """The parameters of one composed experiment: its own defaults on the rectified-flow
    schedule, with the values this experiment sets."""
    exp, taken = PARTS[part]
    own = {**exp.defaults, **{mine: params[ours] for mine, ours in taken.items()}}
    own["schedules" if "schedules" in own else "schedule"] = \
        [SCHEDULE] if "schedules" in own else SCHEDULE
    return own


def _ctx(ctx: Context, part: str) -> Context:
    return dataclasses.replace(ctx, params=part_params(ctx.params, part))


def compute(ctx: Context) -> dict[str, Any]:
    return {part: PARTS[part][0].compute(_ctx(ctx, part)) for part in ctx.bar(PARTS, "parts")}


def record(ctx: Context, raw: dict[str, Any]) -> Recorded:
    metrics: dict[str, Any] = {"schedule": SCHEDULE}
    arrays: dict[str, Any] = {}
    for part, (exp, _) in PARTS.items():
        rec = exp.record(_ctx(ctx, part), raw[part])
        metrics[part] = rec.metrics
        arrays.update({f"{part}/{k}": v for k, v in rec.arrays.items()})
    return Recorded(metrics, arrays)


def _part(rec: Recorded, part: str) -> Recorded:
    prefix = f"{part}/"
    return Recorded(rec.metrics[part], {k[len(prefix):]: v for k, v in rec.arrays.items()
                                        if k.startswith(prefix)})


def judge(metrics: Mapping[str, Any], params: Mapping[str, Any]) -> Verdict:
    claims = []
    for part, (exp, _) in PARTS.items():
        for c in exp.judge(metrics[part], part_params(params, part)).claims:
            claims.append(dataclasses.replace(c, claim=f"Flow matching: {c.claim}"))
    return Verdict(tuple(claims))


def draw(rec: Recorded, params: Mapping[str, Any]) -> dict[str, Any]:
    figs: dict[str, Any] = {}
    for part, (exp, _) in PARTS.items():
        figs.update({f"{part}_{k}": v for k, v in
                     exp.draw(_part(rec, part), part_params(params, part)).items()})
    return figs


EXPERIMENT = Experiment(
    name="flow-matching",
    cost=10,
    summary="Flow matching's linear path (m = 1 - t, sigma = t) on the paper's 20 points: the "
            "exact velocity of the empirical flow-matching loss returns training points at "
            "rate O(sigma); the Tikhonov and threshold regularizers prevent it.",
    claim="Flow matching: the exact velocity memorizes; Tikhonov and the threshold prevent it.",
    defaults={"n_samples": 1000, "n_trajectories": 30, "n_record": 200,
              "tikhonov_values": list(sweeps.TIKHONOV.defaults["values"]),
              "threshold_values": list(sweeps.THRESHOLD.defaults["values"])},
    quick={"n_samples": 200, "n_trajectories": 8, "n_record": 120,
           "tikhonov_values": [1e-1, 1e-3, 1e-5], "threshold_values": [1e-2, 1.0, 10.0]},
    compute=compute, record=record, judge=judge, draw=draw, distributed=True,
)
