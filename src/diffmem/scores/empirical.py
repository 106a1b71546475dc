"""Closed-form scores of the empirical Gaussian mixture and its regularizations.

The closed-form scores below share one kernel
(:func:`diffmem.mixture.gaussian_mixture`) over the training set ``x_0^1..x_0^N``:

    w_n(x, t) = softmax_n( -|x - m(t) x_0^n|^2 / (2 sigma(t)^2) )
    D_e(x, t) = m(t) sum_n w_n x_0^n                       (empirical denoiser)
    s_N(x, t) = (D_e(x, t) - x) / sigma(t)^2               (empirical score)

Each also exposes ``sigma2_score(x, t) = sigma(t)^2 s(x, t)`` (finite as ``sigma -> 0``, used
by the transformed-time sampler), ``denoiser(x, t) = x + sigma^2 s`` and ``weights(x, t)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from diffmem._checks import (
    batch_like,
    fail,
    nonnegative,
    positive_int,
    training_set,
)
from diffmem.mixture import Mixture, gaussian_mixture
from diffmem.schedules import Schedule, TimeLike


class ClosedFormScore:
    """Base class: holds the training set and evaluates the shared mixture kernel."""

    singular_at_zero = True

    def __init__(self, train: Tensor, schedule: Schedule, chunk_size: int = 4096) -> None:
        self.train = training_set("train", train)
        if not isinstance(schedule, Schedule):
            raise fail("schedule", "a diffmem.schedules.Schedule", type(schedule).__name__)
        self.schedule = schedule
        self.chunk_size = positive_int("chunk_size", chunk_size)
        self.data_shape = tuple(train.shape[1:])
        self._centres: dict[tuple[torch.dtype, torch.device],
                            tuple[Tensor, Tensor, Tensor]] = {}

    @property
    def n_train(self) -> int:
        return self.train.shape[0]

    def _centres_like(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Centred training set ``x_0^n - c`` (``c`` the training mean), its squared norms and
        ``c``, cached per dtype and device."""
        key = (x.dtype, x.device)
        if key not in self._centres:
            flat = self.train.reshape(self.n_train, -1).to(device=x.device)
            offset = flat.mean(0, dtype=torch.float64)
            centred = (flat.to(x.dtype) - offset.to(x.dtype))
            self._centres[key] = (centred, centred.pow(2).sum(1),
                                  offset.to(dtype=x.dtype, device=x.device))
        return self._centres[key]

    def _kernel(self, xf: Tensor, m: Tensor, sigma2: Tensor, return_weights: bool,
                log_prior: Tensor | None = None) -> Mixture:
        centres, sqnorm, offset = self._centres_like(xf)
        if log_prior is not None:
            log_prior = log_prior.to(dtype=xf.dtype, device=xf.device)
        return gaussian_mixture(xf, centres, m, sigma2, centres_sqnorm=sqnorm, offset=offset,
                                log_prior=log_prior, chunk_size=self.chunk_size,
                                return_weights=return_weights)

    def _prepare(self, x: Tensor, t: TimeLike) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Validate and flatten: returns ``x`` as ``(B, d)``, ``t``, ``m`` and ``sigma^2`` as
        ``(B,)`` tensors in ``x``'s dtype and device."""
        batch_like("x", x, self.data_shape)
        B = x.shape[0]
        if isinstance(t, Tensor):
            if t.dim() > 1 or (t.dim() == 1 and t.shape[0] != B):
                raise fail("t", f"a float or a tensor of shape () or ({B},)",
                           f"shape {tuple(t.shape)}")
        m, sigma2 = self.schedule.m_sigma2(t)
        tt = t if isinstance(t, Tensor) else torch.tensor(float(t), dtype=torch.float64)

        def to_batch(v: Tensor) -> Tensor:
            return v.to(dtype=x.dtype, device=x.device).expand(B).contiguous()

        return x.reshape(B, -1), to_batch(tt), to_batch(m), to_batch(sigma2)

    def _check_sigma(self, sigma2: Tensor) -> None:
        if self.singular_at_zero and bool((sigma2 == 0).any()):
            raise fail(
                "t", "t > 0 (this score is singular at t = 0, where sigma(t) = 0; integrate "
                "in transformed time with sample_ode(..., variable='s') or stop at t_end > 0)",
                "t = 0"
            )

    def mixture(self, x: Tensor, t: TimeLike, return_weights: bool = False, *,
                log_prior: Tensor | None = None) -> Mixture:
        """Evaluate the shared kernel at ``(x, t)`` (``x`` flattened to ``(B, d)``), with
        optional log prior weights ``(N,)`` or ``(B, N)`` on the training points."""
        xf, _, m, sigma2 = self._prepare(x, t)
        return self._kernel(xf, m, sigma2, return_weights, log_prior)

    # --- what subclasses define ---------------------------------------------------------
    def _sigma2_score(self, xf: Tensor, tt: Tensor, m: Tensor, sigma2: Tensor,
                      mix: Mixture) -> Tensor:
        """``sigma^2 s`` on flattened inputs."""
        raise NotImplementedError

    def _score(self, xf: Tensor, tt: Tensor, m: Tensor, sigma2: Tensor, mix: Mixture) -> Tensor:
        """``s`` on flattened inputs (default: ``sigma^2 s / sigma^2``)."""
        return self._sigma2_score(xf, tt, m, sigma2, mix) / sigma2[:, None]

    def _weight_factor(self, mix: Mixture) -> Tensor | None:
        return None

    # --- public API -----------------------------------------------------------------------
    def _evaluate(self, x: Tensor, t: TimeLike, scaled: bool,
                  log_prior: Tensor | None = None) -> Tensor:
        xf, tt, m, sigma2 = self._prepare(x, t)
        if not scaled:
            self._check_sigma(sigma2)
        mix = self._kernel(xf, m, sigma2, False, log_prior)
        out = (self._sigma2_score if scaled else self._score)(xf, tt, m, sigma2, mix)
        return out.reshape(x.shape)

    def __call__(self, x: Tensor, t: TimeLike, *, log_prior: Tensor | None = None) -> Tensor:
        """The score ``s(x, t)``, shape of ``x``. ``log_prior`` (``(N,)`` or ``(B, N)``, each
        row's maximum 0) reweights the training points: ``w_n ∝ pi_n exp(...)``."""
        return self._evaluate(x, t, False, log_prior)

    def sigma2_score(self, x: Tensor, t: TimeLike, *,
                     log_prior: Tensor | None = None) -> Tensor:
        """``sigma(t)^2 s(x, t)``, finite at every ``t`` (0 at ``t = 0``)."""
        return self._evaluate(x, t, True, log_prior)

    def denoiser(self, x: Tensor, t: TimeLike, *, log_prior: Tensor | None = None) -> Tensor:
        """Tweedie denoiser ``D(x, t) = x + sigma(t)^2 s(x, t)``."""
        return x + self.sigma2_score(x, t, log_prior=log_prior)

    def weights(self, x: Tensor, t: TimeLike, *, log_prior: Tensor | None = None) -> Tensor:
        """Mixture weights ``w_n(x, t)``, shape ``(batch, N)``."""
        mix = self.mixture(x, t, return_weights=True, log_prior=log_prior)
        assert mix.weights is not None
        factor = self._weight_factor(mix)
        return mix.weights if factor is None else mix.weights * factor[:, None]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(N={self.n_train}, data_shape={self.data_shape}, " \
               f"schedule={self.schedule!r})"


def _residual(xf: Tensor, m: Tensor, mix: Mixture) -> Tensor:
    """``D_e - x = m sum_n w_n x_0^n - x``."""
    return m[:, None] * mix.mean - xf


class EmpiricalScore(ClosedFormScore):
    """Exact DSM minimizer for the empirical measure:
    ``s_N(x, t) = (m(t) sum_n w_n x_0^n - x) / sigma(t)^2``. Singular at ``t = 0``."""

    def _sigma2_score(self, xf: Tensor, tt: Tensor, m: Tensor, sigma2: Tensor,
                      mix: Mixture) -> Tensor:
        return _residual(xf, m, mix)


class TikhonovScore(ClosedFormScore):
    """Minimizer of DSM plus ``E <s, Gamma(t) s>``: ``s = (I + Gamma(t))^-1 grad log p_t^N``.

    Forms (weights always use ``sigma^2``):

    * isotropic, ``Gamma = (c / sigma^2) I``: ``s_c = (D_e - x) / (sigma^2 + c)``;
    * precision-weighted, ``Gamma = (c / sigma^2) P`` with ``precision`` ``P`` a vector
      (diagonal) or a symmetric positive definite matrix: ``s = (sigma^2 I + c P)^-1 (D_e - x)``
      (see :meth:`covariance_weighted` for ``P = Sigma^-1``);
    * general: ``gamma(t)`` returns ``Gamma`` per sample, shape ``(B, d)`` (diagonal) or
      ``(B, d, d)``: ``s = (I + Gamma)^-1 (D_e - x) / sigma^2`` (requires ``t > 0``).

    With ``c > 0`` the first two are finite at ``t = 0``.
    """

    def __init__(
        self,
        train: Tensor,
        schedule: Schedule,
        c: float | None = None,
        *,
        precision: Tensor | None = None,
        gamma: Callable[[Tensor], Tensor] | None = None,
        chunk_size: int = 4096,
    ) -> None:
        super().__init__(train, schedule, chunk_size)
        if gamma is not None and (c is not None or precision is not None):
            raise fail("gamma", "gamma alone, or c (with optional precision)",
                       "gamma together with c or precision")
        if gamma is None and c is None:
            raise fail("c", "a number >= 0 (or a gamma callable)", None)
        self.gamma = gamma
        self.c = None if c is None else nonnegative("c", c)
        self.precision = None
        self._eig: tuple[Tensor, Tensor] | None = None
        if precision is not None:
            d = int(self.train[0].numel())
            p = precision.to(torch.float64)
            if p.shape not in {(d,), (d, d)}:
                raise fail("precision", f"shape ({d},) or ({d}, {d})", tuple(precision.shape))
            if p.dim() == 2:
                if not torch.allclose(p, p.T, rtol=1e-6, atol=1e-12):
                    raise fail("precision", "a symmetric matrix", "a non-symmetric matrix")
                evals, evecs = torch.linalg.eigh(p)
                self._eig = (evals, evecs)
                lowest = float(evals.min())
            else:
                lowest = float(p.min())
            if lowest <= 0:
                raise fail("precision", "positive definite", f"smallest eigenvalue {lowest}")
            self.precision = p
        self.singular_at_zero = self.gamma is not None or self.c == 0

    @classmethod
    def covariance_weighted(cls, train: Tensor, schedule: Schedule, c: float,
                            ridge: float = 1e-8, chunk_size: int = 4096) -> TikhonovScore:
        """``Gamma = (c / sigma^2) Sigma^-1`` with ``Sigma`` the empirical covariance of the
        training set (plus ``ridge * trace/d`` on the diagonal for invertibility)."""
        flat = training_set("train", train).reshape(train.shape[0], -1).to(torch.float64)
        if flat.shape[0] < 2:
            raise fail("train", "at least 2 points to estimate a covariance", flat.shape[0])
        cov = torch.cov(flat.T).reshape(flat.shape[1], flat.shape[1])
        cov = cov + ridge * torch.trace(cov) / cov.shape[0] * torch.eye(cov.shape[0],
                                                                           dtype=cov.dtype)
        return cls(train, schedule, c, precision=torch.linalg.inv(cov), chunk_size=chunk_size)

    def _score(self, xf: Tensor, tt: Tensor, m: Tensor, sigma2: Tensor, mix: Mixture) -> Tensor:
        r = _residual(xf, m, mix)
        if self.gamma is not None:
            gam = self.gamma(tt).to(r)
            if gam.shape == r.shape:
                return r / (1 + gam) / sigma2[:, None]
            if gam.shape != (*r.shape, r.shape[1]):
                raise fail("gamma(t)", f"shape {tuple(r.shape)} or {(*r.shape, r.shape[1])}",
                           tuple(gam.shape))
            eye = torch.eye(r.shape[1], dtype=r.dtype, device=r.device)
            return torch.linalg.solve(eye + gam, r) / sigma2[:, None]
        assert self.c is not None
        if self.precision is None:
            return r / (sigma2 + self.c)[:, None]
        if self._eig is None:
            return r / (sigma2[:, None] + self.c * self.precision.to(r))
        evals, evecs = (v.to(r) for v in self._eig)
        return ((r @ evecs) / (sigma2[:, None] + self.c * evals[None, :])) @ evecs.T

    def _sigma2_score(self, xf: Tensor, tt: Tensor, m: Tensor, sigma2: Tensor,
                      mix: Mixture) -> Tensor:
        return sigma2[:, None] * self._score(xf, tt, m, sigma2, mix)


class ThresholdScore(ClosedFormScore):
    """Empirical-Bayes threshold: with ``p~ = sum_n exp(-|x - m x_0^n|^2 / 2 sigma^2)``,
    ``w_n^tau = exp(-|x - m x_0^n|^2 / 2 sigma^2) / max(p~, tau)`` and

        s_tau = sum_n w_n^tau (m x_0^n - x) / sigma^2 = min(1, p~ / tau) s_N,

    equal to the empirical score where the mixture is dense (``p~ >= tau``) and damped where
    it is thin. Computed in log space; ``tau = 0`` is the empirical score."""

    def __init__(self, train: Tensor, schedule: Schedule, tau: float,
                 chunk_size: int = 4096) -> None:
        super().__init__(train, schedule, chunk_size)
        self.tau = nonnegative("tau", tau)

    def _weight_factor(self, mix: Mixture) -> Tensor:
        if self.tau == 0:
            return torch.ones_like(mix.log_norm)
        log_tau = torch.log(torch.tensor(self.tau, dtype=mix.log_norm.dtype))
        return torch.exp(torch.clamp(mix.log_norm - log_tau, max=0.0))

    def _sigma2_score(self, xf: Tensor, tt: Tensor, m: Tensor, sigma2: Tensor,
                      mix: Mixture) -> Tensor:
        return self._weight_factor(mix)[:, None] * _residual(xf, m, mix)
