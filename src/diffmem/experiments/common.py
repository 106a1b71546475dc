"""Building blocks shared by the 2-D experiments: traced trajectories with their weights, and
closed-form regularization sweeps."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from diffmem import plots
from diffmem.experiments.base import Context
from diffmem.metrics import convergence_slopes, fraction_within
from diffmem.nn import NetworkScore, TrainConfig, train_dsm
from diffmem.samplers import SampleResult, sample_ode
from diffmem.schedules import Schedule, get_schedule
from diffmem.scores import ClosedFormScore


def delta_key(delta: float) -> str:
    """JSON key of a tolerance: ``0.01 -> "0.01"``."""
    return repr(float(delta))


def fractions(samples: Tensor, train: Tensor, deltas: Sequence[float]) -> dict[str, float]:
    """:func:`fraction_within` keyed by :func:`delta_key`."""
    return {delta_key(d): f for d, f in fraction_within(samples, train, deltas).items()}


@dataclass
class Traced:
    """Trajectories of a closed-form score with the mixture weights along them."""

    result: SampleResult
    weights: Tensor  # (B, n_times, N)
    sigma: Tensor  # (n_times,)


def trace(ctx: Context, schedule: Schedule, score: ClosedFormScore, x_T: Tensor, t_end: float,
          rtol: float, atol: float, n_record: int) -> Traced:
    """Integrate the PF-ODE from ``x_T`` recording ``n_record`` log-spaced times and evaluate
    the weights ``w_n(x(t), t)`` at every recorded point."""
    res = sample_ode(schedule, score, x_T, t_end=t_end, rtol=rtol, atol=atol,
                     return_trajectory=True, n_record=n_record)
    assert res.trajectory is not None and res.times is not None
    B, n = res.trajectory.shape[:2]
    times = res.times.to(x_T).repeat(B)
    w = score.weights(res.trajectory.reshape(B * n, -1), times).reshape(B, n, -1)
    return Traced(result=res, weights=w, sigma=schedule.sigma(res.times))


def slope_window(schedule: Schedule, t_end: float, sigma_max: float) -> tuple[float, float]:
    """Fit window in ``sigma`` for the O(sigma) rate: from ``10 sigma(t_end)`` (where
    ``x(t) - x(t_end)`` is no longer dominated by the end point) up to ``sigma_max``."""
    return 10 * float(schedule.sigma(t_end)), sigma_max


def traced_figure(ctx: Context, train: Tensor, traced: Traced, title: str, name: str,
                  window: tuple[float, float] | None, lim: float = 3.0) -> Tensor | None:
    """Three panels: trajectories over the Voronoi diagram, weights of three trajectories
    against ``t``, and ``|x(t) - x(t_end)|`` against ``sigma(t)`` with the ``O(sigma)`` line.
    Returns the per-trajectory slopes fitted in ``window`` (``None`` without a window)."""
    res = traced.result
    assert res.trajectory is not None and res.times is not None
    fig, ax = plots.figure(1, 3, size=4.2)
    plots.voronoi(ax[0, 0], train, lim=lim)
    plots.trajectories(ax[0, 0], res.trajectory)
    ax[0, 0].set_title(f"{title}: trajectories")
    for i in range(min(3, traced.weights.shape[0])):
        plots.weights_vs_time(ax[0, 1], res.times, traced.weights[i])
    ax[0, 1].set_title("weights $w_n(x(t), t)$ (3 trajectories)")
    dist = (res.trajectory - res.samples[:, None]).flatten(2).norm(dim=-1)
    keep = res.times > res.times[-1]
    sig = traced.sigma[keep]
    ref = sig * float(dist[:, keep].median() / sig.median())
    plots.distance_decay(ax[0, 2], sig, dist[:, keep], ref, r"$\sigma(t)$", r"$O(\sigma)$")
    slopes = None
    if window is not None:
        slopes = convergence_slopes(res.trajectory, res.samples, traced.sigma, window)
        ax[0, 2].axvspan(*window, color="0.9", zorder=0, label="fit window")
        ax[0, 2].set_title(f"median slope {float(slopes.median()):.3f}")
    ctx.save(fig, name)
    return slopes


def closed_form_sweep(
    ctx: Context,
    train: Tensor,
    schedule: Schedule,
    parameter: str,
    values: Sequence[float],
    make_score: Callable[[float], ClosedFormScore],
    t_end: float,
    deltas: Sequence[float],
) -> dict[str, Any]:
    """Sample ``n_samples`` points (the same noise for every value) with the score built by
    ``make_score(value)``; return the sweep's metrics and draw the fraction curve and a
    scatter grid over the Voronoi diagram."""
    p = ctx.params
    n = int(p["n_samples"])
    x_T = ctx.noise(n, (train.shape[1],), float(schedule.sigma(schedule.T)))
    per_delta: dict[str, list[float]] = {delta_key(d): [] for d in deltas}
    samples = []
    for value in ctx.bar(values, f"{parameter} sweep"):
        res = sample_ode(schedule, make_score(value), x_T, t_end=t_end, rtol=p["rtol"],
                         atol=p["atol"])
        samples.append(res.samples.cpu())
        for key, frac in fractions(res.samples, train, deltas).items():
            per_delta[key].append(frac)
    fig, ax = plots.figure(1, 1, size=4.5)
    plots.fraction_curve(ax[0, 0], list(values), per_delta, parameter)
    ax[0, 0].set_title(f"{schedule.name}: memorized fraction vs {parameter}")
    ctx.save(fig, f"fraction_vs_{parameter}")
    cols = math.ceil(math.sqrt(len(values)))
    rows = math.ceil(len(values) / cols)
    fig, ax = plots.figure(rows, cols, size=3.2)
    first = delta_key(deltas[0])
    for i, (value, s) in enumerate(zip(values, samples, strict=True)):
        a = ax[i // cols, i % cols]
        plots.voronoi(a, train.cpu())
        plots.scatter(a, s)
        a.set_title(f"{parameter} = {value:.2g}: {per_delta[first][i]:.3f}", fontsize=9)
    for j in range(len(values), rows * cols):
        ax[j // cols, j % cols].axis("off")
    ctx.save(fig, f"samples_{parameter}")
    return {"parameter": parameter, "values": list(values), "n_samples": n,
            "schedule": schedule.name, "t_end": t_end, "fraction_within": per_delta}


def train_network_score(ctx: Context, x: Tensor, y: Tensor | None = None,
                        lam: float = 0.0, tag: str = "checkpoints") -> NetworkScore:
    """Train one (optionally conditional) score MLP on ``x`` with the context's
    ``network_steps``, ``ema_decay``, ``width`` and ``schedule`` (mini-batches of 256,
    checkpoints under ``OUT/NAME/tag``) and return its EMA weights as a score."""
    p = ctx.params
    sch = get_schedule(p["schedule"])
    cfg = TrainConfig(lambdas=[lam], parameterizations=["score"], steps=p["network_steps"],
                      ema_decay=p["ema_decay"], batch_size=256, seed=ctx.seed,
                      schedule=p["schedule"], mlp={"width": p["width"]})
    trained = train_dsm(x, sch, cfg, train_y=y, checkpoint_dir=ctx.out / tag,
                        resume=ctx.resume, device=ctx.device, progress=ctx.progress)
    return NetworkScore(trained.ema, sch)


def decreasing(values: Sequence[float], slack: float = 0.0) -> bool:
    """True when each value is at most the previous one plus ``slack``."""
    return all(b <= a + slack for a, b in zip(values, values[1:], strict=False))
