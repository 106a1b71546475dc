"""The paper's Tikhonov regularization in your own training loop, for any parameterization.

With ``x_t = m x_0 + sigma eps`` the denoising score-matching loss plus the Tikhonov penalty,

    E |sigma s(x_t) + eps|^2 + lam |s(x_t)|^2,

is minimized by ``s = -sigma E[eps | x] / (sigma^2 + lam) = (m D_e(x) - x) / (sigma^2 + lam)``
(the paper's regularized score; ``D_e = E[x_0 | x]``, the empirical denoiser for a finite
training set). A network trained with a plain mean-squared loss predicts ``eps``, ``v`` or
``x_0``; each loss is the score-matching loss times a weight ``w(t)``, so the penalty to add is
``w lam |s|^2`` written in the network's output (``a = m^2 + sigma^2``, 1 on VP schedules):

* ``epsilon``: ``eps_hat = -sigma s`` and ``|eps_hat - eps|^2 = |sigma s + eps|^2`` (w = 1):

      P = lam |eps_hat|^2 / sigma^2;

* ``v_prediction`` (``v = m eps - sigma x_0``): ``eps_hat = (m v_hat + sigma x) / a`` and
  ``|v_hat - v|^2 = (a / m)^2 |sigma s + eps|^2``:

      P = lam |m v_hat + sigma x|^2 / (m^2 sigma^2);

* ``sample`` (``x0_hat``): ``x0_hat = (x + sigma^2 s) / m`` and
  ``|x0_hat - x_0|^2 = (sigma / m)^2 |sigma s + eps|^2``:

      P = lam |m x0_hat - x|^2 / (m^2 sigma^2);

* ``flow`` (flow matching's velocity ``u = z - x_0`` on the linear path ``m = 1 - sigma``,
  ``x = m x_0 + sigma z``): ``z_hat = m u_hat + x``, and ``u_hat - u = (z_hat - z) / m``, so
  ``|u_hat - u|^2 = |sigma s + eps|^2 / m^2``:

      P = lam |m u_hat + x|^2 / (m^2 sigma^2)

  (and ``P = 0`` at ``m = 0``, ``sigma = 1``: there ``x = z`` and the score ``-x`` is fixed,
  whatever the velocity);

* ``edm`` (EDM's denoiser loss ``lambda(sigma) |D - x_0|^2``, ``m = 1``, weight
  ``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2``): ``D = x + sigma^2 s``
  and ``|D - x_0|^2 = sigma^2 |sigma s + eps|^2``:

      P = lambda(sigma) lam |D - x|^2 / sigma^2.

In each case the minimizer of ``E[loss + P | x]`` over the output is the output of the
Tikhonov score. ``lam`` may be a number, a tensor of per-coordinate weights (the diagonal
``Lambda``: ``s_i = (m D_e - x)_i / (sigma^2 + Lambda_i)``), or a function of ``sigma``
returning either (``Lambda(t)``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from diffmem._checks import fail, positive

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow", "edm")
Lam = float | Tensor | Callable[[Tensor], float | Tensor]


def _per_item(v: Tensor, like: Tensor, name: str, zero: bool = False) -> Tensor:
    """A per-sample value ``(B,)`` (or a number) as a tensor broadcastable to ``like``,
    finite and ``> 0`` (``>= 0`` with ``zero``)."""
    v = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    B = like.shape[0]
    if v.dim() > 1 or (v.dim() == 1 and v.shape[0] not in (1, B)):
        raise fail(name, f"a number or a tensor of shape ({B},)", f"shape {tuple(v.shape)}")
    if not bool(torch.isfinite(v).all()) or bool((v < 0).any()) or \
            (not zero and bool((v == 0).any())):
        raise fail(name, f"finite values {'>=' if zero else '>'} 0",
                   f"range [{float(v.min()):g}, {float(v.max()):g}]")
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def _weights(lam: Lam, sigma: Tensor, like: Tensor) -> Tensor:
    """``lam`` (or ``lam(sigma)``) as non-negative finite weights broadcastable to ``like``."""
    if callable(lam):
        lam = lam(sigma.reshape(-1))
    w = torch.as_tensor(lam, dtype=like.dtype, device=like.device)
    if w.dim() == 1 and w.shape[0] == like.shape[0] and like.dim() > 1 and \
            tuple(like.shape[1:]) != (like.shape[0],):
        w = w.reshape(-1, *([1] * (like.dim() - 1)))  # one weight per batch item
    try:
        torch.broadcast_shapes(w.shape, like.shape)
    except RuntimeError as err:
        raise fail("lam", f"a number or weights broadcastable to {tuple(like.shape)}",
                   f"shape {tuple(w.shape)}") from err
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise fail("lam", "finite weights >= 0", f"range [{float(w.min()):g}, "
                   f"{float(w.max()):g}]")
    return w


def tikhonov_penalty(output: Tensor, x_t: Tensor, *, m: Tensor | float, sigma: Tensor | float,
                     prediction_type: str, lam: Lam, sigma_data: float = 0.5,
                     reduction: str = "sum") -> Tensor:
    """The Tikhonov penalty ``P`` (one value per batch item, module docstring) to add to the
    plain squared loss of ``prediction_type`` so that the minimizer is the paper's Tikhonov
    score. ``m`` and ``sigma`` are per item (``(B,)``) or numbers; ``reduction='sum'`` sums
    over each item's coordinates (to add to ``|out - target|^2``), ``'mean'`` averages them
    (to add to ``mse_loss(out, target, reduction='none')`` averaged per item)."""
    if prediction_type not in PREDICTION_TYPES:
        raise fail("prediction_type", f"one of {PREDICTION_TYPES}", repr(prediction_type))
    if reduction not in ("sum", "mean"):
        raise fail("reduction", "'sum' or 'mean'", repr(reduction))
    if not isinstance(output, Tensor) or not isinstance(x_t, Tensor) or \
            output.shape != x_t.shape or output.dim() < 1:
        raise fail("output", "a tensor (batch, ...) of the shape of x_t",
                   f"{tuple(output.shape) if isinstance(output, Tensor) else type(output)} and "
                   f"{tuple(x_t.shape) if isinstance(x_t, Tensor) else type(x_t)}")
    s = _per_item(sigma, x_t, "sigma")
    m = _per_item(1.0 if prediction_type == "edm" else m, x_t, "m",
                  zero=prediction_type == "flow")
    w = _weights(lam, s, x_t)
    if prediction_type == "epsilon":
        term = w * output.pow(2) / s.pow(2)
    elif prediction_type == "v_prediction":
        term = w * (m * output + s * x_t).pow(2) / (m * s).pow(2)
    elif prediction_type == "sample":
        term = w * (m * output - x_t).pow(2) / (m * s).pow(2)
    elif prediction_type == "flow":  # no penalty at m = 0: x = z, the score is -x there
        pure = m == 0
        term = torch.where(pure, 0.0, w * (m * output + x_t).pow(2)
                           / (torch.where(pure, 1.0, m) * s).pow(2))
    else:
        sigma_data = positive("sigma_data", sigma_data)
        edm_weight = (s.pow(2) + sigma_data**2) / (s * sigma_data).pow(2)
        term = edm_weight * w * (output - x_t).pow(2) / s.pow(2)
    per_item = term.flatten(1)
    return per_item.sum(1) if reduction == "sum" else per_item.mean(1)


def diffusers_m_sigma(timesteps: Tensor, scheduler: Any) -> tuple[Tensor, Tensor]:
    """``m = sqrt(abar_k)`` and ``sigma = sqrt(1 - abar_k)`` at a batch of integer
    ``timesteps`` of a diffusers scheduler (its ``alphas_cumprod``); for a flow-matching
    scheduler, whose timesteps are ``K sigma`` (floats), ``sigma = timesteps / K`` and
    ``m = 1 - sigma``."""
    from diffmem.models.discrete import is_flow_scheduler, scheduler_config

    config = scheduler_config(scheduler) if hasattr(scheduler, "config") else {}
    if is_flow_scheduler(config):
        K = int(config.get("num_train_timesteps", 1000))
        if not isinstance(timesteps, Tensor) or bool((timesteps <= 0).any()) or \
                bool((timesteps > K).any()) or not bool(torch.isfinite(timesteps).all()):
            raise fail("timesteps", f"timesteps K sigma in (0, {K}]",
                       timesteps if not isinstance(timesteps, Tensor) else
                       f"range [{timesteps.min()}, {timesteps.max()}]")
        sigma = timesteps.to(torch.float64) / K
        return 1 - sigma, sigma
    abar = getattr(scheduler, "alphas_cumprod", None)
    if not isinstance(abar, Tensor):
        raise fail("scheduler", "a diffusers scheduler with alphas_cumprod (DDPM, DDIM, ...)",
                   type(scheduler).__name__)
    if not isinstance(timesteps, Tensor) or timesteps.is_floating_point() or \
            bool((timesteps < 0).any()) or bool((timesteps >= abar.shape[0]).any()):
        raise fail("timesteps", f"integer timesteps in [0, {abar.shape[0]})",
                   timesteps if not isinstance(timesteps, Tensor) else
                   f"dtype {timesteps.dtype}, range [{timesteps.min()}, {timesteps.max()}]")
    a = abar.to(device=timesteps.device)[timesteps].to(torch.float64)
    return a.sqrt(), (1 - a).sqrt()


def diffusers_tikhonov_penalty(output: Tensor, noisy: Tensor, timesteps: Tensor,
                               scheduler: Any, lam: Lam, reduction: str = "mean") -> Tensor:
    """:func:`tikhonov_penalty` for a diffusers training loop: ``m`` and ``sigma`` at
    ``timesteps`` (:func:`diffusers_m_sigma`), the prediction type from the scheduler
    (``flow`` for a flow-matching one, else its config's ``prediction_type``);
    ``reduction='mean'`` by default, to match ``F.mse_loss``."""
    from diffmem.models.discrete import prediction_of, scheduler_config

    m, sigma = diffusers_m_sigma(timesteps, scheduler)
    prediction = prediction_of(scheduler_config(scheduler) if hasattr(scheduler, "config")
                               else {})
    return tikhonov_penalty(output, noisy, m=m.to(noisy.dtype), sigma=sigma.to(noisy.dtype),
                            prediction_type=prediction, lam=lam, reduction=reduction)
