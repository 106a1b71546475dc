"""Building blocks shared by the experiments: traced trajectories with their weights, closed-form
sweeps, the one network-training helper, and the orderings the verdicts test."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffmem import plots
from diffmem.experiments.base import Context, Recorded
from diffmem.metrics import convergence_slopes, decay_reference
from diffmem.nn import NetworkScore, TrainConfig, Trained, train_dsm
from diffmem.samplers import SampleResult, sample_ode
from diffmem.schedules import Schedule, get_schedule
from diffmem.scores import ClosedFormScore

#: Training points in a mini-batch of the score MLPs trained beside closed forms.
NETWORK_BATCH = 256


@dataclass
class Traced:
    """Trajectories of a closed-form score with the mixture weights along them."""

    result: SampleResult
    weights: Tensor  # (B, n_times, N)
    sigma: Tensor  # (n_times,)


def trace(schedule: Schedule, score: ClosedFormScore, x_T: Tensor, t_end: float, rtol: float,
          atol: float, n_record: int) -> Traced:
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


def traced_slopes(traced: Traced, window: tuple[float, float]) -> Tensor:
    """Per-trajectory slope of ``log |x(t) - x(t_end)|`` against ``log sigma(t)``."""
    res = traced.result
    assert res.trajectory is not None
    return convergence_slopes(res.trajectory, res.samples, traced.sigma, window)


def traced_arrays(traced: Traced, prefix: str) -> dict[str, Tensor]:
    """The arrays a traced figure is drawn from: trajectories, recorded times and ``sigma``,
    the weights of the first three trajectories, and each trajectory's distance to its end
    point (before the end) with the ``O(sigma)`` reference line."""
    res = traced.result
    assert res.trajectory is not None and res.times is not None
    dist = (res.trajectory - res.samples[:, None]).flatten(2).norm(dim=-1)
    keep = res.times > res.times[-1]
    sig = traced.sigma[keep]
    return {f"{prefix}trajectory": res.trajectory.cpu(), f"{prefix}times": res.times,
            f"{prefix}sigma": traced.sigma, f"{prefix}weights": traced.weights[:3].cpu(),
            f"{prefix}decay_sigma": sig, f"{prefix}decay_distance": dist[:, keep].cpu(),
            f"{prefix}decay_reference": decay_reference(sig, dist[:, keep].cpu())}


def traced_figure(rec: Recorded, prefix: str, train: Any, title: str,
                  window: Sequence[float] | None = None, slope: float | None = None,
                  lim: float = 3.0) -> Any:
    """The three panels of :func:`diffmem.plots.traced_panels` from recorded arrays."""
    fig, ax = plots.figure(1, 3, size=4.2)
    plots.traced_panels(ax[0], train, rec.array(f"{prefix}trajectory"),
                        rec.array(f"{prefix}times"), rec.array(f"{prefix}decay_sigma"),
                        rec.array(f"{prefix}weights"), rec.array(f"{prefix}decay_distance"),
                        rec.array(f"{prefix}decay_reference"), title, window, slope, lim)
    return fig


def sweep_samples(ctx: Context, schedule: Schedule, values: Sequence[float],
                  make_score: Callable[[float], Any], x_T: Tensor, t_end: float,
                  desc: str) -> list[Tensor]:
    """Samples of the PF-ODE from the same noise ``x_T`` for the score built by
    ``make_score(value)``, for every value of a sweep."""
    p = ctx.params
    return [sample_ode(schedule, make_score(v), x_T, t_end=t_end, rtol=p["rtol"],
                       atol=p["atol"]).samples
            for v in ctx.bar(values, desc)]


def train_networks(ctx: Context, x: Tensor, *, lambdas: Sequence[float],
                   parameterizations: Sequence[str], steps: int, width: int,
                   ema_half_life: float, depth: int = 2, lr: float = 1e-3,
                   batch_size: int | None = NETWORK_BATCH, y: Tensor | None = None,
                   marks: Sequence[int] = (), tag: str = "checkpoints",
                   callback: Callable[..., Any] | None = None,
                   quiet_ema: bool = False) -> Trained:
    """Train a stack of score MLPs (one per ``lambdas``/``parameterizations`` entry) on ``x``
    (conditional on ``y`` when given) with the context's seed and schedule, checkpoints under
    ``OUT/NAME/tag`` and ``--resume``. ``quiet_ema`` silences the EMA-initialisation warning
    when the EMA is not what is evaluated."""
    p = ctx.params
    cfg = TrainConfig(lambdas=list(lambdas), parameterizations=list(parameterizations),
                      steps=steps, lr=lr, ema_half_life=ema_half_life, batch_size=batch_size,
                      seed=ctx.seed, schedule=p["schedule"],
                      mlp={"width": width, "depth": depth})
    with warnings.catch_warnings():
        if quiet_ema:
            warnings.simplefilter("ignore")
        return train_dsm(x, get_schedule(p["schedule"]), cfg, train_y=y,
                         checkpoint_dir=ctx.out / tag, checkpoints=marks, resume=ctx.resume,
                         device=ctx.device, progress=ctx.progress, callback=callback)


def network_score(ctx: Context, x: Tensor, y: Tensor | None = None,
                  lam: float = 0.0) -> NetworkScore:
    """One (optionally conditional) score MLP trained on ``x`` with the context's
    ``network_steps``, ``ema_half_life`` and ``width``, as a score (its EMA weights)."""
    p = ctx.params
    trained = train_networks(ctx, x, lambdas=[lam], parameterizations=["score"],
                             steps=p["network_steps"], width=p["width"],
                             ema_half_life=p["ema_half_life"], y=y)
    return NetworkScore(trained.ema, get_schedule(p["schedule"]))


def decreasing(values: Sequence[float], slack: float = 0.0) -> bool:
    """True when each value is at most the previous one plus ``slack``."""
    return all(b <= a + slack for a, b in zip(values, values[1:], strict=False))


def by_value(values: Sequence[float], fracs: Sequence[float]) -> tuple[list[float], list[float]]:
    """``values`` and ``fracs`` sorted by value."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    return [values[i] for i in order], [fracs[i] for i in order]


def cpu(t: Tensor) -> Tensor:
    """A tensor on the CPU (for recorded arrays)."""
    return t.detach().cpu() if isinstance(t, torch.Tensor) else t


def gap_text(levels: Mapping[str, float | None]) -> str:
    """The noise levels down to which each denoiser follows the empirical one."""
    return "denoisers within 0.1 of the empirical one from sigma(T) down to " + ", ".join(
        f"{label}: {'none of the grid' if v is None else f'sigma = {v:.3g}'}"
        for label, v in levels.items())
