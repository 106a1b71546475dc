"""Closed-form scores that regularize the empirical one by smoothing it, from a little to
completely:

* :class:`KDEScore`: the score of the training set's Gaussian kernel density estimate of
  bandwidth ``h`` pushed through the forward process;
* :class:`SmoothedScore`: the empirical denoiser averaged over Gaussian perturbations of its
  input (Scarvelis, Borde & Solomon, *Closed-form diffusion models*, TMLR 2025);
* :class:`GaussianScore`: the score of the maximum-likelihood Gaussian, the linear
  denoiser: it never memorizes and keeps no detail.

The first two evaluate the one mixture kernel (:mod:`diffmem.mixture`); the Gaussian has a
single component with a full covariance and is computed from its eigendecomposition.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from diffmem._checks import fail, nonnegative, positive_int
from diffmem.centres import TrainingData, all_reduce, scan_rows
from diffmem.mixture import Mixture
from diffmem.schedules import Schedule
from diffmem.scores.empirical import ClosedFormScore, EmpiricalScore, _residual


class KDEScore(ClosedFormScore):
    """The score of the kernel density estimate ``(1/N) sum_n N(y_n, h^2 I)`` at time ``t``:

        p_t = (1/N) sum_n N(m y_n, (sigma^2 + m^2 h^2) I),
        w_n = softmax_n(-|x - m y_n|^2 / (2 (sigma^2 + m^2 h^2))),
        s = (m sum_n w_n y_n - x) / (sigma^2 + m^2 h^2).

    Finite at ``t = 0`` for ``h > 0`` (variance ``h^2``): its probability-flow ODE carries
    the exact marginal at ``T`` onto training points plus ``N(0, h^2 I)``. ``h = 0`` is the
    empirical score."""

    def __init__(self, train: TrainingData, schedule: Schedule, h: float,
                 chunk_size: int = 4096, **source: Any) -> None:
        super().__init__(train, schedule, chunk_size, **source)
        self.h = nonnegative("h", h)
        self.singular_at_zero = self.h == 0

    def _variance(self, m: Tensor, sigma2: Tensor) -> Tensor:
        return sigma2 + (m * self.h) ** 2

    def _score(self, xf: Tensor, tt: Tensor, m: Tensor, sigma2: Tensor, mix: Mixture) -> Tensor:
        return _residual(xf, m, mix) / self._variance(m, sigma2)[:, None]

    def _sigma2_score(self, xf: Tensor, tt: Tensor, m: Tensor, sigma2: Tensor,
                      mix: Mixture) -> Tensor:
        var = self._variance(m, sigma2)
        ratio = torch.where(var > 0, sigma2 / var.clamp_min(torch.finfo(var.dtype).tiny),
                            torch.ones_like(var))
        return ratio[:, None] * _residual(xf, m, mix)


class SmoothedScore(EmpiricalScore):
    """The empirical denoiser averaged over perturbations of its input,

        D_lam(x, t) = E_{z ~ N(0, I)} D_e(x + lam z, t),   s = (D_lam - x) / sigma^2,

    estimated with ``n_draws`` draws ``z_k`` fixed at construction (``seed``): the same
    draws at every call (common random numbers), so ``s`` is a deterministic, smooth
    function and an ODE through it is deterministic. ``lam = 0`` is the empirical score.
    Its samples tend to barycentres of nearby training points. Each evaluation costs
    ``n_draws`` empirical ones."""

    def __init__(self, train: TrainingData, schedule: Schedule, lam: float,
                 n_draws: int = 32, seed: int = 0, chunk_size: int = 4096,
                 **source: Any) -> None:
        super().__init__(train, schedule, chunk_size, **source)
        self.lam = nonnegative("lam", lam)
        self.n_draws = positive_int("n_draws", n_draws)
        gen = torch.Generator().manual_seed(int(seed))
        self._z = torch.randn(self.n_draws, self.centres.d, generator=gen, dtype=torch.float64)

    def _kernel(self, xf: Tensor, m: Tensor, sigma2: Tensor, return_weights: bool,
                log_prior: Tensor | None = None) -> Mixture:
        if self.lam == 0:
            return super()._kernel(xf, m, sigma2, return_weights, log_prior)
        B, K = xf.shape[0], self.n_draws
        z = self._z.to(dtype=xf.dtype, device=xf.device)
        shifted = (xf[:, None, :] + self.lam * z[None]).reshape(B * K, -1)
        prior = None if log_prior is None else (
            log_prior if log_prior.dim() == 1 else log_prior.repeat_interleave(K, 0))
        mix = super()._kernel(shifted, m.repeat_interleave(K), sigma2.repeat_interleave(K),
                              return_weights, prior)
        log_norm = torch.logsumexp(mix.log_norm.reshape(B, K), 1) - math.log(K)
        weights = None if mix.weights is None else mix.weights.reshape(B, K, -1).mean(1)
        return Mixture(log_norm=log_norm, mean=mix.mean.reshape(B, K, -1).mean(1),
                       weights=weights)


class GaussianScore(ClosedFormScore):
    """The score of the maximum-likelihood Gaussian ``N(mu, Sigma)`` of the training set
    (``Sigma`` with ``1/N``) pushed through the forward process, ``p_t = N(m mu, m^2 Sigma +
    sigma^2 I)``: with ``Sigma = U diag(lam) U^T``,

        s = -U diag(1 / (m^2 lam + sigma^2)) U^T (x - m mu),
        E[x_0 | x] = mu + U diag(m lam / (m^2 lam + sigma^2)) U^T (x - m mu),

    the linear denoiser. The score is computed in the eigenbasis as written, never as
    ``(m E[x_0 | x] - x) / sigma^2`` (which cancels as ``sigma -> 0``): it is finite wherever
    every ``m^2 lam_i + sigma^2 > 0``, so at ``t = 0`` for a full-rank covariance (there
    ``s = -Sigma^-1 (x - mu)``). Eigenvalues below ``d eps lam_max`` (round-off) count as 0;
    with one of them the covariance is singular and ``t = 0`` is refused, saying so
    (``sigma2_score`` is finite there: ``-(x - m mu)`` along the null directions)."""

    def __init__(self, train: TrainingData, schedule: Schedule, chunk_size: int = 4096,
                 **source: Any) -> None:
        super().__init__(train, schedule, chunk_size, **source)
        centres = self.centres
        like = torch.empty(0, dtype=torch.float64)
        cov = torch.zeros(centres.d, centres.d, dtype=torch.float64)
        for _, y, _ in centres.chunks(scan_rows(centres.d), like):
            cov += y.T @ y
        cov = all_reduce(cov, centres.group) / centres.n_total
        self.mean = centres.offset.clone()
        self.eigenvalues, self.eigenvectors = torch.linalg.eigh(cov)
        floor = centres.d * torch.finfo(torch.float64).eps * float(self.eigenvalues.max())
        self.eigenvalues[self.eigenvalues <= floor] = 0
        self.singular_at_zero = bool((self.eigenvalues == 0).any())

    def _check_sigma(self, sigma2: Tensor, t: Tensor) -> None:
        if self.singular_at_zero and bool((sigma2 < torch.finfo(sigma2.dtype).tiny).any()):
            at = float(t[sigma2 < torch.finfo(sigma2.dtype).tiny][0])
            rank = int((self.eigenvalues > 0).sum())
            raise fail("t", "t > 0: the training set's covariance is singular (rank "
                       f"{rank} of {self.centres.d}), so the Gaussian score is infinite at "
                       "sigma(t) = 0 off its support", f"t = {at:g}")

    def _whitened(self, xf: Tensor, m: Tensor, sigma2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``U^T (x - m mu)`` (B, d), ``m^2 lam + sigma^2`` (B, d) and ``U``."""
        u = self.eigenvectors.to(xf)
        r = (xf - m[:, None] * self.mean.to(xf)) @ u
        return r, (m * m)[:, None] * self.eigenvalues.to(xf)[None, :] + sigma2[:, None], u

    def _score(self, xf: Tensor, tt: Tensor, m: Tensor, sigma2: Tensor, mix: Mixture) -> Tensor:
        r, denom, u = self._whitened(xf, m, sigma2)
        return -(r / denom) @ u.T

    def _kernel(self, xf: Tensor, m: Tensor, sigma2: Tensor, return_weights: bool,
                log_prior: Tensor | None = None) -> Mixture:
        if return_weights or log_prior is not None:
            raise fail("GaussianScore", "no mixture weights or priors (one Gaussian "
                       "component)", "a request for them")
        lam = self.eigenvalues.to(xf)
        u = self.eigenvectors.to(xf)
        mu = self.mean.to(xf)
        denom = (m * m)[:, None] * lam[None, :] + sigma2[:, None]
        gain = torch.where(denom > 0, m[:, None] * lam[None, :] / denom.clamp_min(
            torch.finfo(xf.dtype).tiny), torch.zeros_like(denom))
        posterior = mu + ((xf - m[:, None] * mu) @ u * gain) @ u.T
        return Mixture(log_norm=torch.zeros(xf.shape[0], dtype=xf.dtype, device=xf.device),
                       mean=posterior)

    def _sigma2_score(self, xf: Tensor, tt: Tensor, m: Tensor, sigma2: Tensor,
                      mix: Mixture) -> Tensor:
        r, denom, u = self._whitened(xf, m, sigma2)
        ratio = torch.where(denom > 0, sigma2[:, None] / denom.clamp_min(
            torch.finfo(xf.dtype).tiny), torch.ones_like(denom))
        return -(r * ratio) @ u.T
