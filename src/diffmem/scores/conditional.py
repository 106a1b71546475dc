"""Conditional closed-form scores ``score(x, t, y)``: the empirical mixture with each training
point weighted by a prior ``pi_n(y)`` (labels, a kernel in ``y``, or the likelihood of an
inverse problem), through the same mixture kernel as the unconditional scores."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from diffmem._checks import fail, finite_tensor, positive
from diffmem.centres import TrainingData, all_reduce
from diffmem.schedules import Schedule, TimeLike
from diffmem.scores.empirical import ClosedFormScore, EmpiricalScore, ThresholdScore, TikhonovScore

CONDITIONAL_MODES = ("labels", "kernel", "inverse")


class ConditionalEmpiricalScore:
    """Conditional closed-form scores ``score(x, t, y)`` for pairs ``(x_0^n, y^n)``: the
    mixture of :class:`EmpiricalScore` with each training point weighted by ``pi_n(y)``,

        w_n(x, t | y) ∝ pi_n(y) exp(-|x - m x_0^n|^2 / (2 sigma^2)),

    in three modes:

    * ``'labels'``: ``pi_n = 1`` where ``y^n == y`` (every component), else 0 — the exact
      empirical minimizer at a training label;
    * ``'kernel'``: ``pi_n = exp(-|y - y^n|^2 / (2 h^2))`` (Gaussian kernel of bandwidth
      ``h``); ``h -> 0`` recovers the exact minimizer at the training ``y``;
    * ``'inverse'``: ``y = A x + eta``, ``eta ~ N(0, diag(noise_std^2))``: ``pi_n`` is the
      likelihood ``exp(-|(y - A x_0^n) / noise_std|^2 / 2)``, so the weights are Bayes'
      posterior over the empirical prior. ``operator`` is a ``(p, d)`` matrix or a callable
      mapping a batch ``(N, *data_shape)`` to observations ``(N, ...)`` (a mask, a blur).

    ``c`` gives the Tikhonov variant ``(D - x) / (sigma^2 + c)`` and ``tau`` the threshold
    variant ``min(1, p~/tau) s`` with ``p~ = sum_n pi_n exp(...)`` (``pi`` scaled to a maximum
    of 1), all through the same mixture kernel. ``y`` is ``(B, *y_shape)`` (one per sample) or
    a single ``y`` (broadcast).
    """

    def __init__(
        self,
        train_x: TrainingData,
        train_y: Tensor | None,
        schedule: Schedule,
        *,
        mode: str = "labels",
        bandwidth: float | None = None,
        operator: Tensor | Callable[[Tensor], Tensor] | None = None,
        noise_std: float | Tensor | None = None,
        c: float | None = None,
        tau: float | None = None,
        chunk_size: int = 4096,
        **source: Any,
    ) -> None:
        if mode not in CONDITIONAL_MODES:
            raise fail("mode", f"one of {CONDITIONAL_MODES}", repr(mode))
        if c is not None and tau is not None:
            raise fail("tau", "c or tau, not both", f"c={c}, tau={tau}")
        if c is not None:
            self.base: ClosedFormScore = TikhonovScore(train_x, schedule, c,
                                                       chunk_size=chunk_size, **source)
        elif tau is not None:
            self.base = ThresholdScore(train_x, schedule, tau, chunk_size=chunk_size, **source)
        else:
            self.base = EmpiricalScore(train_x, schedule, chunk_size=chunk_size, **source)
        self.mode, self.schedule = mode, schedule
        centres = self.base.centres
        N, d = centres.n, centres.d
        self.scale: Tensor | None = None
        if mode == "inverse":
            if operator is None:
                raise fail("operator", "a (p, d) matrix or a callable for mode='inverse'", None)
            if isinstance(operator, Tensor):
                if operator.dim() != 2 or operator.shape[1] != d:
                    raise fail("operator", f"a matrix with {d} columns "
                               "(the data dimension)", f"shape {tuple(operator.shape)}")
                self.operator: Callable[[Tensor], Tensor] = lambda v: (
                    v.flatten(1) @ operator.to(v).T)
            elif callable(operator):
                self.operator = operator
            else:
                raise fail("operator", "a matrix or a callable", type(operator).__name__)
            blocks = list(centres.stored_chunks(dtype=centres.source_dtype)) or [
                torch.zeros(0, *centres.data_shape, dtype=centres.source_dtype)]
            anchors = torch.cat([self.operator(rows).flatten(1)
                                 for rows in blocks])
            if noise_std is None:
                raise fail("noise_std", "the observation noise standard deviation (> 0)", None)
            try:
                std = torch.as_tensor(noise_std, dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError) as err:
                raise fail("noise_std", "a positive number or a vector of them",
                           repr(noise_std)) from err
            if (std.dim() > 1 or (std.dim() == 1 and std.shape[0] != anchors.shape[1])
                    or not bool(torch.isfinite(std).all()) or bool((std <= 0).any())):
                raise fail("noise_std", f"a finite positive number or {anchors.shape[1]} "
                           "finite positive values", noise_std)
            self.scale = std
            self.y_shape: tuple[int, ...] | None = None
        else:
            if train_y is None:
                raise fail("train_y", f"the training conditions for mode={mode!r}", None)
            if not isinstance(train_y, Tensor) or train_y.shape[0] != N:
                raise fail("train_y", f"a tensor with one condition per training point ({N})",
                           tuple(train_y.shape) if isinstance(train_y, Tensor) else train_y)
            anchors = train_y.reshape(N, math.prod(train_y.shape[1:]))
            self.y_shape = tuple(train_y.shape[1:])
            if mode == "kernel":
                if bandwidth is None:
                    raise fail("bandwidth", "a bandwidth h > 0 for mode='kernel'", None)
                self.scale = torch.tensor(positive("bandwidth", bandwidth), dtype=torch.float64)
                anchors = anchors.to(torch.float64)
        if mode != "labels" or anchors.is_floating_point():
            finite_tensor("train_y" if mode != "inverse" else "operator(train_x)", anchors)
        self.anchors = anchors
        self.bandwidth = bandwidth

    def _rows(self, y: Tensor, B: int) -> Tensor:
        """``y`` as ``(B, q)``: per-sample rows, or one ``y`` broadcast."""
        if not isinstance(y, Tensor):
            raise fail("y", "a tensor of conditions", type(y).__name__)
        q = self.anchors.shape[1]
        if y.dim() >= 1 and y.shape[0] == B and y[0].numel() == q:
            return y.reshape(B, q)
        if y.numel() == q:
            return y.reshape(1, q).expand(B, q)
        expected = f"({B}, *{self.y_shape})" if self.y_shape is not None else f"({B}, {q})"
        raise fail("y", f"shape {expected} or a single condition of {q} values",
                   f"shape {tuple(y.shape)}")

    def log_prior(self, y: Tensor, B: int) -> Tensor:
        """``log pi_n(y_b)`` over this process's training points, shifted so that each row's
        maximum over every process is 0, ``(B, N)``."""
        rows = self._rows(y, B)
        group = self.base.centres.group
        if rows.is_floating_point() and not bool(torch.isfinite(rows).all()):
            raise fail("y", "finite conditions", "NaN or inf")
        anchors = self.anchors.to(rows.device)
        if self.mode == "labels":
            match = (rows[:, None, :] == anchors[None, :, :].to(rows.dtype)).all(-1)
            found = all_reduce(match.any(1).to(torch.float64), group)
            missing = found == 0
            if bool(missing.any()):
                raise fail("y", "labels present in the training set",
                           f"{int(missing.sum())} unseen labels, e.g. {rows[missing][0].tolist()}")
            return torch.where(match, 0.0, -math.inf).to(torch.float64)
        assert self.scale is not None
        scale = self.scale.to(rows.device)
        d = torch.cdist(rows.to(torch.float64) / scale, anchors.to(torch.float64) / scale,
                        compute_mode="donot_use_mm_for_euclid_dist")
        lp = -0.5 * d * d
        top = lp.max(1).values if lp.shape[1] else torch.full((B,), -math.inf,
                                                               dtype=torch.float64)
        return lp - all_reduce(top, group, "max")[:, None]

    def __call__(self, x: Tensor, t: TimeLike, y: Tensor) -> Tensor:
        """The conditional score ``s(x, t | y)``."""
        return self.base(x, t, log_prior=self.log_prior(y, x.shape[0]))

    def sigma2_score(self, x: Tensor, t: TimeLike, y: Tensor) -> Tensor:
        """``sigma^2 s(x, t | y)``."""
        return self.base.sigma2_score(x, t, log_prior=self.log_prior(y, x.shape[0]))

    def denoiser(self, x: Tensor, t: TimeLike, y: Tensor) -> Tensor:
        """``D(x, t | y) = x + sigma^2 s(x, t | y)``."""
        return self.base.denoiser(x, t, log_prior=self.log_prior(y, x.shape[0]))

    def weights(self, x: Tensor, t: TimeLike, y: Tensor) -> Tensor:
        """Posterior weights ``w_n(x, t | y)``, ``(B, N)``."""
        return self.base.weights(x, t, log_prior=self.log_prior(y, x.shape[0]))
