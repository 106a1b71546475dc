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

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from diffmem._checks import (
    batch_like,
    fail,
    finite_tensor,
    nonnegative,
    positive_int,
    training_set,
)
from diffmem.centres import Centres, TrainingData, all_reduce, scan_rows
from diffmem.mixture import Mixture, gaussian_mixture
from diffmem.schedules import Schedule, TimeLike, time_tensor


class ClosedFormScore:
    """Base class: holds the training set (a :class:`diffmem.centres.Centres`: in memory,
    memory-mapped, sharded, half-precision storage, or split over a process group) and
    evaluates the shared mixture kernel.

    Inputs are checked (``ValueError`` naming the argument): ``x`` finite of shape
    ``(batch, *data_shape)`` (an empty batch gives an empty result), ``t`` a number or a
    ``()``/``(batch,)`` tensor in ``[0, T]``, ``log_prior`` finite or ``-inf`` with an admissible
    training point in every row. Below the smallest normal ``sigma^2`` of the dtype (``t = 0``
    included) the weights take their ``sigma -> 0`` limit; ``sigma2_score`` is finite there,
    while a score singular at ``t = 0`` raises, and a score too large for the dtype raises
    instead of returning ``inf``."""

    singular_at_zero = True

    def __init__(self, train: TrainingData, schedule: Schedule, chunk_size: int = 4096, *,
                 process_group: Any = None, storage: str | None = None) -> None:
        if not isinstance(schedule, Schedule):
            raise fail("schedule", "a diffmem.schedules.Schedule", type(schedule).__name__)
        if isinstance(train, Centres):
            self.centres = train
        else:
            if isinstance(train, Tensor):
                training_set("train", train, allow_empty=process_group is not None)
            self.centres = Centres(train, storage=storage, process_group=process_group)
        self.schedule = schedule
        self.chunk_size = positive_int("chunk_size", chunk_size)
        self.data_shape = self.centres.data_shape

    @property
    def n_train(self) -> int:
        """Training points held by this process."""
        return self.centres.n

    @property
    def train(self) -> Tensor:
        """This process's training points as one tensor ``(N, *data_shape)`` (loaded whole
        for a streamed training set)."""
        return self.centres.to_tensor(self.centres.source_dtype)

    def _variance(self, m: Tensor, sigma2: Tensor) -> Tensor:
        """The variance of each mixture component at ``(m, sigma^2)`` (``sigma^2`` here;
        a kernel density estimate adds ``m^2 h^2``)."""
        return sigma2

    def _kernel(self, xf: Tensor, m: Tensor, sigma2: Tensor, return_weights: bool,
                log_prior: Tensor | None = None) -> Mixture:
        if log_prior is not None:
            log_prior = log_prior.to(dtype=xf.dtype, device=xf.device)
        return gaussian_mixture(xf, self.centres, m, self._variance(m, sigma2),
                                log_prior=log_prior, chunk_size=self.chunk_size,
                                return_weights=return_weights)

    def _prepare(self, x: Tensor, t: TimeLike) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Validate and flatten: returns ``x`` as ``(B, d)``, ``t``, ``m`` and ``sigma^2`` as
        ``(B,)`` tensors in ``x``'s dtype and device."""
        batch_like("x", x, self.data_shape)
        B = x.shape[0]
        tt = time_tensor(t)
        if tt.dim() > 1 or (tt.dim() == 1 and tt.shape[0] != B):
            raise fail("t", f"a float or a tensor of shape () or ({B},)",
                       f"shape {tuple(tt.shape)}")
        m, sigma2 = self.schedule.m_sigma2(tt)

        def to_batch(v: Tensor) -> Tensor:
            return v.to(dtype=x.dtype, device=x.device).expand(B).contiguous()

        return x.reshape(B, self.centres.d), to_batch(tt), to_batch(m), to_batch(sigma2)

    def _check_log_prior(self, log_prior: Tensor | None, B: int) -> None:
        """``log_prior``: a tensor ``(N,)`` or ``(B, N)`` over this process's training points,
        no NaN or ``+inf``, and an admissible (finite) entry in every row over all
        processes."""
        if log_prior is None:
            return
        N = self.n_train
        if not isinstance(log_prior, Tensor):
            raise fail("log_prior", f"a tensor of shape ({N},) or ({B}, {N})",
                       type(log_prior).__name__)
        if tuple(log_prior.shape) not in {(N,), (B, N)}:
            raise fail("log_prior", f"shape ({N},) or ({B}, {N})",
                       f"shape {tuple(log_prior.shape)}")
        if bool(torch.isnan(log_prior).any()) or bool((log_prior == math.inf).any()):
            raise fail("log_prior", "finite values or -inf (no NaN, no +inf)", "NaN or +inf")
        finite = torch.isfinite(log_prior).to(torch.float64).sum(-1)
        rows = all_reduce(finite.expand(B).clone() if finite.dim() == 0 else finite,
                          self.centres.group)
        if bool((rows == 0).any()):
            raise fail("log_prior", "at least one finite entry per row (a training point to "
                       "weight)", f"{int((rows == 0).sum())} rows that exclude every point")

    def _check_sigma(self, sigma2: Tensor, t: Tensor) -> None:
        if self.singular_at_zero and bool((sigma2 < torch.finfo(sigma2.dtype).tiny).any()):
            at = float(t[sigma2 < torch.finfo(sigma2.dtype).tiny][0])
            raise fail(
                "t", "t > 0 with sigma(t)^2 a normal number (this score is singular at t = 0, "
                "where sigma(t) = 0; integrate in transformed time with sample_ode(..., "
                "variable='s') or stop at t_end > 0)", f"t = {at:g}")

    def mixture(self, x: Tensor, t: TimeLike, return_weights: bool = False, *,
                log_prior: Tensor | None = None) -> Mixture:
        """Evaluate the shared kernel at ``(x, t)`` (``x`` flattened to ``(B, d)``), with
        optional log prior weights ``(N,)`` or ``(B, N)`` on the training points."""
        xf, _, m, sigma2 = self._prepare(x, t)
        self._check_log_prior(log_prior, xf.shape[0])
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
        if xf.shape[0] == 0:
            return torch.empty_like(x)
        self._check_log_prior(log_prior, xf.shape[0])
        if not scaled:
            self._check_sigma(sigma2, tt)
        mix = self._kernel(xf, m, sigma2, False, log_prior)
        out = (self._sigma2_score if scaled else self._score)(xf, tt, m, sigma2, mix)
        if not bool(torch.isfinite(out).all()):
            bad = ~torch.isfinite(out).all(1)
            i = int(torch.nonzero(bad)[0])
            what = "sigma(t)^2 s" if scaled else "the score"
            raise fail("t", f"a time at which {what} is representable in {x.dtype}",
                       f"t = {float(tt[i]):g} with sigma^2 = {float(sigma2[i]):.3g}, where it "
                       f"overflows for {int(bad.sum())} of {xf.shape[0]} points (use float64 "
                       "or a larger t)")
        return out.reshape(x.shape)

    def __call__(self, x: Tensor, t: TimeLike, *, log_prior: Tensor | None = None) -> Tensor:
        """The score ``s(x, t)``, shape of ``x``. ``log_prior`` (``(N,)`` or ``(B, N)``, each
        row's maximum 0) reweights the training points: ``w_n ∝ pi_n exp(...)``."""
        return self._evaluate(x, t, False, log_prior)

    def sigma2_score(self, x: Tensor, t: TimeLike, *,
                     log_prior: Tensor | None = None) -> Tensor:
        """``sigma(t)^2 s(x, t)``, finite at every ``t``: at ``t = 0`` it is the limit of
        ``sigma^2 s`` as ``sigma -> 0`` (0 for the Tikhonov score with ``c > 0``)."""
        return self._evaluate(x, t, True, log_prior)

    def denoiser(self, x: Tensor, t: TimeLike, *, log_prior: Tensor | None = None) -> Tensor:
        """Tweedie denoiser ``D(x, t) = x + sigma(t)^2 s(x, t)``."""
        return x + self.sigma2_score(x, t, log_prior=log_prior)

    def weights(self, x: Tensor, t: TimeLike, *, log_prior: Tensor | None = None) -> Tensor:
        """Mixture weights ``w_n(x, t)``, shape ``(batch, N)`` (every process's points)."""
        xf, _, m, sigma2 = self._prepare(x, t)
        if xf.shape[0] == 0:
            return torch.empty(0, self.centres.n_total, dtype=x.dtype, device=x.device)
        self._check_log_prior(log_prior, xf.shape[0])
        mix = self._kernel(xf, m, sigma2, True, log_prior)
        assert mix.weights is not None
        factor = self._weight_factor(mix)
        return mix.weights if factor is None else mix.weights * factor[:, None]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(N={self.centres.n_total}, data_shape={self.data_shape}, " \
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
        train: TrainingData,
        schedule: Schedule,
        c: float | None = None,
        *,
        precision: Tensor | None = None,
        gamma: Callable[[Tensor], Tensor] | None = None,
        chunk_size: int = 4096,
        **source: Any,
    ) -> None:
        super().__init__(train, schedule, chunk_size, **source)
        if gamma is not None and (c is not None or precision is not None):
            raise fail("gamma", "gamma alone, or c (with optional precision)",
                       "gamma together with c or precision")
        if gamma is None and c is None:
            raise fail("c", "a number >= 0 (or a gamma callable)", None)
        if gamma is not None and not callable(gamma):
            raise fail("gamma", "a callable gamma(t)", type(gamma).__name__)
        self.gamma = gamma
        self.c = None if c is None else nonnegative("c", c)
        self.precision = None
        self._eig: tuple[Tensor, Tensor] | None = None
        if precision is not None:
            d = self.centres.d
            if not isinstance(precision, Tensor):
                raise fail("precision", f"a torch.Tensor of shape ({d},) or ({d}, {d})",
                           type(precision).__name__)
            p = finite_tensor("precision", precision.to(torch.float64))
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
    def covariance_weighted(cls, train: TrainingData, schedule: Schedule, c: float,
                            ridge: float = 1e-8, chunk_size: int = 4096,
                            **source: Any) -> TikhonovScore:
        """``Gamma = (c / sigma^2) Sigma^-1`` with ``Sigma`` the empirical covariance of the
        training set, ``sum_n (y_n - mean)(y_n - mean)^T / (N - 1)`` (streamed), plus
        ``ridge * trace/d`` on the diagonal for invertibility."""
        if isinstance(train, Tensor):
            training_set("train", train)
        centres = train if isinstance(train, Centres) else Centres(train, **source)
        if centres.n_total < 2:
            raise fail("train", "at least 2 points to estimate a covariance", centres.n_total)
        like = torch.empty(0, dtype=torch.float64)
        cov = torch.zeros(centres.d, centres.d, dtype=torch.float64)
        for _, y, _ in centres.chunks(scan_rows(centres.d), like):
            cov += y.T @ y
        cov = all_reduce(cov, centres.group) / (centres.n_total - 1)
        cov = cov + ridge * torch.trace(cov) / cov.shape[0] * torch.eye(cov.shape[0],
                                                                           dtype=cov.dtype)
        return cls(centres, schedule, c, precision=torch.linalg.inv(cov), chunk_size=chunk_size)

    def _gamma(self, tt: Tensor, r: Tensor) -> Tensor:
        """``gamma(t)``, checked: finite, of shape ``(B, d)`` or ``(B, d, d)``, with
        ``I + Gamma`` positive definite (the penalty keeps ``(I + Gamma)^-1`` bounded)."""
        assert self.gamma is not None
        gam = self.gamma(tt)
        shapes = (tuple(r.shape), (*r.shape, r.shape[1]))
        if not isinstance(gam, Tensor) or tuple(gam.shape) not in shapes:
            raise fail("gamma(t)", f"a tensor of shape {shapes[0]} or {shapes[1]}",
                       tuple(gam.shape) if isinstance(gam, Tensor) else type(gam).__name__)
        gam = finite_tensor("gamma(t)", gam.to(r))
        if gam.shape == r.shape:
            if bool((1 + gam <= 0).any()):
                raise fail("gamma(t)", "1 + Gamma > 0 (I + Gamma positive definite)",
                           f"smallest entry {float(gam.min()):g}")
        return gam

    def _shrink(self, tt: Tensor, sigma2: Tensor, r: Tensor) -> Tensor:
        """``sigma^2 s``: ``(I + Gamma)^-1 r`` or ``sigma^2 (sigma^2 I + c P)^-1 r``."""
        if self.gamma is not None:
            gam = self._gamma(tt, r)
            if gam.shape == r.shape:
                return r / (1 + gam)
            eye = torch.eye(r.shape[1], dtype=r.dtype, device=r.device)
            chol, info = torch.linalg.cholesky_ex(eye + gam)
            if bool((info != 0).any()) or not torch.allclose(gam, gam.mT, rtol=1e-6,
                                                             atol=1e-12):
                raise fail("gamma(t)", "a symmetric Gamma with I + Gamma positive definite",
                           "a matrix that is not")
            return torch.cholesky_solve(r[..., None], chol)[..., 0]
        return sigma2[:, None] * self._score_c(sigma2, r)

    def _score_c(self, sigma2: Tensor, r: Tensor) -> Tensor:
        """``(sigma^2 I + c P)^-1 r`` (``P = I`` without a precision)."""
        assert self.c is not None
        if self.precision is None:
            return r / (sigma2 + self.c)[:, None]
        if self._eig is None:
            return r / (sigma2[:, None] + self.c * self.precision.to(r))
        evals, evecs = (v.to(r) for v in self._eig)
        return ((r @ evecs) / (sigma2[:, None] + self.c * evals[None, :])) @ evecs.T

    def _score(self, xf: Tensor, tt: Tensor, m: Tensor, sigma2: Tensor, mix: Mixture) -> Tensor:
        r = _residual(xf, m, mix)
        if self.gamma is not None:
            return self._shrink(tt, sigma2, r) / sigma2[:, None]
        return self._score_c(sigma2, r)

    def _sigma2_score(self, xf: Tensor, tt: Tensor, m: Tensor, sigma2: Tensor,
                      mix: Mixture) -> Tensor:
        return self._shrink(tt, sigma2, _residual(xf, m, mix))


class ThresholdScore(ClosedFormScore):
    """Empirical-Bayes threshold: with ``p~ = sum_n exp(-|x - m x_0^n|^2 / 2 sigma^2)``,
    ``w_n^tau = exp(-|x - m x_0^n|^2 / 2 sigma^2) / max(p~, tau)`` and

        s_tau = sum_n w_n^tau (m x_0^n - x) / sigma^2 = min(1, p~ / tau) s_N,

    equal to the empirical score where the mixture is dense (``p~ >= tau``) and damped where
    it is thin. Computed in log space; ``tau = 0`` is the empirical score."""

    def __init__(self, train: TrainingData, schedule: Schedule, tau: float,
                 chunk_size: int = 4096, **source: Any) -> None:
        super().__init__(train, schedule, chunk_size, **source)
        self.tau = nonnegative("tau", tau)

    def _weight_factor(self, mix: Mixture) -> Tensor:
        if self.tau == 0:
            return torch.ones_like(mix.log_norm)
        log_tau = torch.log(torch.tensor(self.tau, dtype=mix.log_norm.dtype))
        return torch.exp(torch.clamp(mix.log_norm - log_tau, max=0.0))

    def _sigma2_score(self, xf: Tensor, tt: Tensor, m: Tensor, sigma2: Tensor,
                      mix: Mixture) -> Tensor:
        return self._weight_factor(mix)[:, None] * _residual(xf, m, mix)
