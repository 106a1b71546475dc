"""EDM (Karras et al., 2022) preconditioning, training noise levels and the Heun sampler.

A denoiser is a callable ``D(x, sigma)`` with ``x`` ``(B, ...)`` and ``sigma`` ``(B,)``. The
sampler integrates ``dx/dsigma = (x - D(x, sigma)) / sigma`` over the Karras levels

    sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,

``sigma_n = 0``, with Heun's correction on every step but the last, and optionally the
stochastic churn (``S_churn > 0``). Closed-form scores on the :class:`diffmem.schedules.EDM`
schedule (``sigma(t) = t``) plug in through :func:`closed_form_denoiser`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from diffmem._checks import fail, finite_tensor, positive, positive_int
from diffmem.schedules import EDM
from diffmem.scores.base import HasDenoiser, HasSchedule

Denoiser = Callable[[Tensor, Tensor], Tensor]


def karras_sigmas(n: int = 40, sigma_min: float = 0.002, sigma_max: float = 80.0,
                  rho: float = 7.0) -> Tensor:
    """The ``n`` Karras noise levels from ``sigma_max`` down to ``sigma_min``, then 0
    (``n + 1`` values, float64)."""
    n = positive_int("n", n)
    sigma_min, sigma_max = positive("sigma_min", sigma_min), positive("sigma_max", sigma_max)
    if sigma_min >= sigma_max:
        raise fail("sigma_min", f"a value below sigma_max = {sigma_max}", sigma_min)
    i = torch.arange(n, dtype=torch.float64)
    frac = i / max(n - 1, 1)
    s = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


@dataclass(frozen=True)
class Precond:
    """EDM preconditioning for ``sigma_data``: ``D(x, sigma) = c_skip x + c_out F(c_in x,
    c_noise)`` with ``c_skip = s_d^2 / (sigma^2 + s_d^2)``, ``c_out = sigma s_d /
    sqrt(sigma^2 + s_d^2)``, ``c_in = 1 / sqrt(sigma^2 + s_d^2)``, ``c_noise = log(sigma) / 4``;
    the loss weight is ``(sigma^2 + s_d^2) / (sigma s_d)^2``."""

    sigma_data: float = 0.5

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        sd2 = self.sigma_data**2
        total = sigma * sigma + sd2
        return (sd2 / total, sigma * self.sigma_data / total.sqrt(), 1 / total.sqrt(),
                torch.log(sigma) / 4)

    def weight(self, sigma: Tensor) -> Tensor:
        return (sigma * sigma + self.sigma_data**2) / (sigma * self.sigma_data) ** 2


def training_sigmas(n: int, p_mean: float = -1.2, p_std: float = 1.2,
                    generator: torch.Generator | None = None,
                    device: torch.device | str | None = None) -> Tensor:
    """``sigma = exp(P_mean + P_std * N(0, 1))``, the EDM training distribution."""
    z = torch.randn(n, generator=generator, device=device)
    return torch.exp(p_mean + p_std * z)


def edm_sample(
    denoiser: Denoiser,
    x_T: Tensor,
    sigmas: Tensor | None = None,
    s_churn: float = 0.0,
    s_min: float = 0.05,
    s_max: float = 50.0,
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """EDM's Heun sampler (deterministic for ``s_churn = 0``): ``x_T`` is ``sigma_0 z``.

    Each step optionally raises the level to ``hat_sigma = sigma_i (1 + gamma)`` with
    ``gamma = min(s_churn / n, sqrt(2) - 1)`` inside ``[s_min, s_max]`` (EDM's defaults 0.05
    and 50, which also keep ``hat_sigma`` below ``sigma_max``) (adding noise of
    variance ``hat_sigma^2 - sigma_i^2``), takes an Euler step with
    ``d = (x - D(x, hat_sigma)) / hat_sigma`` to ``sigma_{i+1}``, and, unless
    ``sigma_{i+1} = 0``, corrects with the slope at the new point (Heun).
    """
    finite_tensor("x_T", x_T)
    sig = karras_sigmas() if sigmas is None else sigmas.to(torch.float64)
    n = sig.shape[0] - 1
    x = x_T
    B = x.shape[0]
    if B == 0:
        return x_T.clone()

    def den(v: Tensor, s: float) -> Tensor:
        out = denoiser(v, torch.full((B,), s, dtype=v.dtype, device=v.device))
        if not isinstance(out, Tensor) or out.shape != v.shape:
            raise fail("denoiser", f"a tensor of the shape of x, {tuple(v.shape)}",
                       f"shape {tuple(out.shape)}" if isinstance(out, Tensor)
                       else type(out).__name__)
        if not bool(torch.isfinite(out).all()):
            bad = int((~torch.isfinite(out.reshape(B, -1)).all(1)).sum())
            raise fail("denoiser", "finite values",
                       f"non-finite values for {bad} of {B} samples at sigma = {s:.6g}")
        return out

    with torch.no_grad():
        for i in range(n):
            s_cur, s_next = float(sig[i]), float(sig[i + 1])
            gamma = min(s_churn / n, math.sqrt(2) - 1) if s_min <= s_cur <= s_max else 0.0
            s_hat = s_cur * (1 + gamma)
            if gamma > 0:
                eps = torch.randn(x.shape, generator=generator, dtype=x.dtype,
                                  device=generator.device if generator else x.device)
                x = x + math.sqrt(s_hat**2 - s_cur**2) * s_noise * eps.to(x)
            d = (x - den(x, s_hat)) / s_hat
            x_next = x + (s_next - s_hat) * d
            if s_next > 0:
                d2 = (x_next - den(x_next, s_next)) / s_next
                x_next = x + (s_next - s_hat) * (0.5 * d + 0.5 * d2)
            x = x_next
    return x


def closed_form_denoiser(score: Callable[..., Tensor]) -> Denoiser:
    """``D(x, sigma)`` from a closed-form score built on the EDM schedule (``t = sigma``),
    via its ``denoiser`` method: ``D = x + sigma^2 s(x, sigma)``."""
    if not isinstance(score, HasDenoiser):
        raise fail("score", "a closed-form score with a denoiser method",
                   type(score).__name__)
    if isinstance(score, HasSchedule) and not isinstance(score.schedule, EDM):
        raise fail("score", "a score on the EDM schedule (sigma(t) = t)",
                   f"a score on {score.schedule!r}")
    den = score.denoiser
    return lambda x, sigma: den(x, sigma.to(x.dtype))
