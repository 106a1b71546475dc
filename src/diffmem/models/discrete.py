"""diffusers schedulers as diffmem schedules, and the networks' parameterizations.

A scheduler's ``K = num_train_timesteps`` betas (``beta_schedule`` ``linear``,
``scaled_linear`` or ``squaredcos_cap_v2``, or ``trained_betas``) give
``abar_k = prod_{i <= k} (1 - beta_i)``, and :class:`DiscreteVP` makes them a VP schedule on
``t in [0, 1]``: ``t = (k + 1) / K`` is timestep ``k`` (``m^2 = abar_k``, ``sigma^2 = 1 -
abar_k``), ``log abar`` interpolated linearly in between (``abar = 1`` at ``t = 0``); a
flow-matching scheduler is the linear path ``x = (1 - sigma) x_0 + sigma z``
(:class:`DiscreteFlow`, ``t = sigma``). A network's output becomes a score by its
``prediction_type`` (:func:`network_output_to_score`, and back:
:func:`score_to_network_output`):

* ``epsilon``: ``eps = net``, ``s = -eps / sigma``;
* ``v_prediction``: ``v = m eps - sigma x_0``, so ``s = -(m v + sigma x) / sigma``;
* ``sample``: ``x_0 = net``, ``s = (m x_0 - x) / sigma^2``;
* ``flow``: the velocity ``u = z - x_0``, ``s = -((1 - sigma) u + x) / sigma``.

This module sits below :mod:`diffmem.regularize` (which reads the parameterizations) and
every other model module.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from diffmem._checks import fail, positive_int
from diffmem.schedules import (
    RectifiedFlow,
    Schedule,
    TimeLike,
    expand_as_batch,
    variance_preserving_t_of_ratio,
)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


# --- the discrete schedules of diffusers, as a VP schedule --------------------------------
def discrete_alphas_cumprod(config: dict[str, Any]) -> Tensor:
    """``abar_k = prod_{i <= k} (1 - beta_i)`` (float64, ``(K,)``) from a diffusers scheduler
    config, as diffusers computes its betas."""
    try:
        K = positive_int("num_train_timesteps", config.get("num_train_timesteps", 1000))
    except ValueError as err:
        raise fail("scheduler", "a positive num_train_timesteps",
                   config.get("num_train_timesteps")) from err
    trained = config.get("trained_betas")
    if trained is not None:
        betas = torch.tensor(trained, dtype=torch.float64)
    else:
        kind = config.get("beta_schedule", "linear")
        start, end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
        if kind == "linear":
            betas = torch.linspace(start, end, K, dtype=torch.float64)
        elif kind == "scaled_linear":
            betas = torch.linspace(start**0.5, end**0.5, K, dtype=torch.float64) ** 2
        elif kind == "squaredcos_cap_v2":
            def abar(u: float) -> float:
                return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

            betas = torch.tensor([min(1 - abar((i + 1) / K) / abar(i / K), 0.999)
                                  for i in range(K)], dtype=torch.float64)
        else:
            raise fail("scheduler", f"beta_schedule one of {BETA_SCHEDULES} (or trained_betas)",
                       repr(kind))
    if config.get("rescale_betas_zero_snr"):
        raise fail("scheduler", "rescale_betas_zero_snr false (a zero final signal has no "
                   "finite noise level to start from)", "true")
    if not bool(((betas > 0) & (betas < 1)).all()):
        raise fail("scheduler", "betas in (0, 1)", f"range [{float(betas.min())}, "
                   f"{float(betas.max())}]")
    return torch.cumprod(1 - betas, 0)


class DiscreteVP(Schedule):
    """A diffusers noise schedule as a diffmem VP schedule on ``[0, 1]``: ``log m^2 =
    log abar`` piecewise linear through ``(0, 0)`` and ``((k + 1)/K, log abar_k)``,
    ``sigma^2 = 1 - m^2``; ``timestep(t) = K t - 1`` is the network's timestep."""

    name = "VP"

    def __init__(self, alphas_cumprod: Tensor) -> None:
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.K = int(abar.shape[0])
        self._grid = torch.linspace(0, 1, self.K + 1, dtype=torch.float64)
        self._log = torch.cat([torch.zeros(1, dtype=torch.float64), torch.log(abar)])
        self._slope = torch.diff(self._log) * self.K

    def params(self) -> dict[str, Any]:
        return {"K": self.K, "abar_last": float(torch.exp(self._log[-1]))}

    def _segment(self, t: Tensor) -> Tensor:
        return (t * self.K).floor().clamp(0, self.K - 1).long()

    def _log_abar(self, t: Tensor) -> Tensor:
        k = self._segment(t)
        log, slope = self._log.to(t.device), self._slope.to(t.device)
        return (log[k] + slope[k] * (t.to(torch.float64) - self._grid.to(t.device)[k])).to(t.dtype)

    def _log_m(self, t: Tensor) -> Tensor:
        return 0.5 * self._log_abar(t)

    def _dlog_m(self, t: Tensor) -> Tensor:
        return (0.5 * self._slope.to(t.device)[self._segment(t)]).to(t.dtype)

    def _sigma2(self, t: Tensor) -> Tensor:
        return -torch.expm1(self._log_abar(t))

    def _dsigma2(self, t: Tensor) -> Tensor:
        return -torch.exp(self._log_abar(t)) * 2 * self._dlog_m(t)

    def _t_of_sigma2(self, sigma2: Tensor) -> Tensor:
        target = torch.log1p(-sigma2.to(torch.float64))
        log = self._log.to(sigma2.device)
        k = (torch.searchsorted(-log, -target, right=True) - 1).clamp(0, self.K - 1)
        slope = self._slope.to(sigma2.device)[k]
        t = self._grid.to(sigma2.device)[k] + (target - log[k]) / slope
        return t.to(sigma2.dtype)

    def t_of_ratio(self, r: TimeLike) -> Tensor:
        """``sigma^2 = 1 - m^2``: ``sigma^2 = r^2 / (1 + r^2)``."""
        return variance_preserving_t_of_ratio(self, r)

    def timestep(self, t: Tensor) -> Tensor:
        """The network's (fractional) timestep at ``t``: ``K t - 1``."""
        return self.K * t - 1

    def time_of_timestep(self, k: Tensor) -> Tensor:
        """The inverse of :meth:`timestep`: ``t = (k + 1) / K``."""
        return (k + 1) / self.K


class DiscreteFlow(RectifiedFlow):
    """diffusers' flow-matching schedulers (``FlowMatchEulerDiscreteScheduler``,
    ``FlowMatchHeunDiscreteScheduler``, ...) as a diffmem schedule: the linear path
    ``x = (1 - sigma) x_0 + sigma z`` (:class:`~diffmem.schedules.RectifiedFlow`, ``t =
    sigma``), on which the network receives ``timestep = K sigma`` (``K =
    num_train_timesteps``), whatever the scheduler's ``shift``, dynamic shifting or sigma
    spacing (those choose which ``sigma`` are visited, not what the network is given). ``T =
    1 - 1/K``: at ``sigma = 1`` the drift is infinite."""

    def __init__(self, K: int) -> None:
        self.K = positive_int("num_train_timesteps", K)
        if self.K < 2:
            raise fail("num_train_timesteps", "at least 2", K)
        super().__init__(1 - 1 / self.K)

    def timestep(self, t: Tensor) -> Tensor:
        """The network's timestep at ``t``: ``K t`` (``K sigma``)."""
        return self.K * t

    def time_of_timestep(self, k: Tensor) -> Tensor:
        """The inverse of :meth:`timestep`: ``t = k / K``."""
        return k / self.K


def scheduler_config(scheduler: Any) -> dict[str, Any]:
    """A diffusers scheduler's config as a plain dict, with ``_class_name`` (the instance's
    class when ``scheduler`` is a scheduler rather than a config)."""
    config = getattr(scheduler, "config", None)
    if config is None:
        return dict(scheduler)
    return {"_class_name": type(scheduler).__name__, **dict(config)}


def is_flow_scheduler(config: dict[str, Any]) -> bool:
    """Whether a diffusers scheduler config is a flow-matching one (``_class_name``
    ``FlowMatch*``)."""
    return str(config.get("_class_name", "")).startswith("FlowMatch")


def scheduler_schedule(config: dict[str, Any]) -> DiscreteVP | DiscreteFlow:
    """The diffmem schedule of a diffusers scheduler config: :class:`DiscreteFlow` for the
    flow-matching schedulers, :class:`DiscreteVP` (its betas) for the others."""
    if is_flow_scheduler(config):
        try:
            return DiscreteFlow(int(config.get("num_train_timesteps", 1000)))
        except (TypeError, ValueError) as err:
            raise fail("scheduler", "a positive num_train_timesteps",
                       config.get("num_train_timesteps")) from err
    return DiscreteVP(discrete_alphas_cumprod(config))


def prediction_of(config: dict[str, Any]) -> str:
    """What the network predicts under a diffusers scheduler config: ``'flow'`` (the
    velocity ``z - x_0``) for the flow-matching schedulers, else the config's
    ``prediction_type`` (default ``'epsilon'``), checked."""
    if is_flow_scheduler(config):
        return "flow"
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES[:3]:
        raise fail("prediction_type", f"one of {PREDICTION_TYPES[:3]}", repr(prediction))
    return str(prediction)


def network_output_to_score(out: Tensor, x: Tensor, m: Tensor, sigma: Tensor,
                            prediction_type: str) -> Tensor:
    """A diffusers network's output as a score (``m``, ``sigma`` per sample): ``epsilon``
    ``s = -out / sigma``; ``v_prediction`` ``s = -(m out + sigma x) / sigma``; ``sample``
    ``s = (m out - x) / sigma^2``; ``flow`` (the velocity ``u = z - x_0`` on the linear path
    ``m = 1 - sigma``, so ``z = m u + x``) ``s = -(m out + x) / sigma``."""
    m, sigma = expand_as_batch(m.to(x), x), expand_as_batch(sigma.to(x), x)
    if prediction_type == "epsilon":
        return -out / sigma
    if prediction_type == "flow":
        return -(m * out + x) / sigma
    if prediction_type == "v_prediction":
        return -(m * out + sigma * x) / sigma
    if prediction_type == "sample":
        return (m * out - x) / (sigma * sigma)
    raise fail("prediction_type", f"one of {PREDICTION_TYPES}", repr(prediction_type))


def score_to_network_output(score: Tensor, x: Tensor, m: Tensor, sigma: Tensor,
                            prediction_type: str) -> Tensor:
    """The inverse of :func:`network_output_to_score`: the output a network of
    ``prediction_type`` gives for ``score`` at ``x``: ``epsilon`` ``-sigma s``;
    ``v_prediction`` ``-sigma (s + x) / m``; ``sample`` ``(sigma^2 s + x) / m``; ``flow``
    ``-(sigma s + x) / m``."""
    m, sigma = expand_as_batch(m.to(x), x), expand_as_batch(sigma.to(x), x)
    if prediction_type == "epsilon":
        return -sigma * score
    if prediction_type == "flow":
        return -(sigma * score + x) / m
    if prediction_type == "v_prediction":
        return -sigma * (score + x) / m
    if prediction_type == "sample":
        return (sigma * sigma * score + x) / m
    raise fail("prediction_type", f"one of {PREDICTION_TYPES}", repr(prediction_type))
