"""Noise schedules: the forward SDE ``dX = f(X, t) dt + g(t) dW`` with Gaussian transitions
``X_t | X_0 = x_0 ~ N(m(t) x_0, sigma(t)^2 I)``.

Every formula for ``m``, ``sigma``, ``f``, ``g`` and the transformed time ``s = -log sigma`` lives
here and nowhere else. Times may be Python floats or tensors of any shape (typically
``(batch,)``); results have the shape of ``t``. A time outside ``[0, T]`` raises ``ValueError``
(a relative slack of two float32 units above ``T``, :data:`T_SLACK`, absorbs round-off from
time transformations and from ``T`` rounded to float32).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np
import torch
from torch import Tensor

from diffmem._checks import fail, finite_tensor, nonnegative_int, positive

TimeLike = float | Tensor
#: Relative slack above ``T``: two units of float32 round-off.
T_SLACK = 2 * float(np.finfo(np.float32).eps)


def time_tensor(t: TimeLike, name: str = "t") -> Tensor:
    """``t`` as a tensor: a Python or numpy number becomes a float64 scalar, an integer or
    boolean tensor float64; anything else raises ``ValueError`` naming ``name``."""
    if isinstance(t, Tensor):
        if t.is_complex():
            raise fail(name, "real times", f"a {t.dtype} tensor")
        return t if t.is_floating_point() else t.to(torch.float64)
    if isinstance(t, bool) or not isinstance(t, int | float | np.integer | np.floating):
        raise fail(name, "a number or a tensor of times", type(t).__name__)
    return torch.tensor(float(t), dtype=torch.float64)


def _time(t: TimeLike, T: float, name: str = "t") -> Tensor:
    """Convert ``t`` to a tensor (float64 for Python numbers) and check ``0 <= t <= T``."""
    t = time_tensor(t, name)
    # One fused test (NaN fails both comparisons); the details only on failure. ``T``
    # rounded to float32 (T = 0.99 becomes 0.9900000095), even when converted back to
    # float64, is inside.
    if not bool(((t >= 0) & (t <= T * (1 + T_SLACK))).all()):
        finite_tensor(name, t)
        lo, hi = float(t.min()), float(t.max())
        raise fail(name, f"times in [0, T] = [0, {T}]", f"values in [{lo}, {hi}]")
    return t


def variance_preserving_t_of_ratio(schedule: Schedule, r: TimeLike) -> Tensor:
    """The ``t`` with ``sigma(t) / m(t) = r`` on a schedule with ``sigma^2 = 1 - m^2``:
    ``sigma^2 = r^2 / (1 + r^2)``."""
    r2 = time_tensor(r, "r") ** 2
    # below 1 (a ratio past 1e8 rounds to sigma^2 = 1, whose time would be infinite)
    return schedule._t_of_sigma2((r2 / (1 + r2)).clamp(max=1 - 2.0**-53))


def expand_as_batch(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample quantity ``v`` of shape ``(batch,)`` (or a scalar) so that it
    broadcasts against ``x`` of shape ``(batch, *data_shape)``."""
    if v.dim() == 0:
        return v
    return v.reshape(v.shape[0], *([1] * (x.dim() - 1)))


class Schedule(ABC):
    """A forward SDE with Gaussian transition kernel; subclasses supply ``m``, ``sigma^2``,
    their time derivatives and the inverse of ``s = -log sigma``.

    Derived relations (identical for every schedule):
    ``f(x, t) = (d log m / dt) x`` and ``g(t)^2 = d sigma^2/dt - 2 (d log m/dt) sigma^2``.
    """

    T: float = 1.0
    name: str = "schedule"

    # --- primitives supplied by each schedule -------------------------------------------
    @abstractmethod
    def _log_m(self, t: Tensor) -> Tensor: ...

    @abstractmethod
    def _dlog_m(self, t: Tensor) -> Tensor: ...

    @abstractmethod
    def _sigma2(self, t: Tensor) -> Tensor: ...

    @abstractmethod
    def _dsigma2(self, t: Tensor) -> Tensor: ...

    @abstractmethod
    def _t_of_sigma2(self, sigma2: Tensor) -> Tensor: ...

    # --- public API -----------------------------------------------------------------------
    def m(self, t: TimeLike) -> Tensor:
        """Mean scaling ``m(t)`` of the transition ``X_t | X_0 ~ N(m(t) X_0, sigma(t)^2 I)``."""
        return torch.exp(self._log_m(_time(t, self.T)))

    def sigma2(self, t: TimeLike) -> Tensor:
        """Transition variance ``sigma(t)^2``."""
        return self._sigma2(_time(t, self.T))

    def sigma(self, t: TimeLike) -> Tensor:
        """Transition standard deviation ``sigma(t)``."""
        return torch.sqrt(self.sigma2(t))

    def dlog_m(self, t: TimeLike) -> Tensor:
        """``d log m / dt``: the linear drift coefficient, ``f(x, t) = (d log m/dt) x``."""
        return self._dlog_m(_time(t, self.T))

    def dsigma2(self, t: TimeLike) -> Tensor:
        """``d sigma^2 / dt``."""
        return self._dsigma2(_time(t, self.T))

    def g2(self, t: TimeLike) -> Tensor:
        """Squared diffusion ``g(t)^2 = d sigma^2/dt - 2 (d log m/dt) sigma^2``."""
        t = _time(t, self.T)
        return self._dsigma2(t) - 2 * self._dlog_m(t) * self._sigma2(t)

    def coefficients(self, t: TimeLike) -> dict[str, Tensor]:
        """``m``, ``sigma2``, ``dlog_m``, ``dsigma2`` and ``g2`` at ``t``, checking ``t`` once."""
        t = _time(t, self.T)
        sigma2, dlog_m, dsigma2 = self._sigma2(t), self._dlog_m(t), self._dsigma2(t)
        return {"m": torch.exp(self._log_m(t)), "sigma2": sigma2, "dlog_m": dlog_m,
                "dsigma2": dsigma2, "g2": dsigma2 - 2 * dlog_m * sigma2}

    def m_sigma2(self, t: TimeLike) -> tuple[Tensor, Tensor]:
        """``m(t)`` and ``sigma(t)^2``, checking ``t`` once."""
        t = _time(t, self.T)
        return torch.exp(self._log_m(t)), self._sigma2(t)

    def g(self, t: TimeLike) -> Tensor:
        """Diffusion coefficient ``g(t)``."""
        return torch.sqrt(self.g2(t))

    def f(self, x: Tensor, t: TimeLike) -> Tensor:
        """Drift ``f(x, t) = (d log m / dt) x``; ``t`` is a scalar or has shape ``(batch,)``."""
        return expand_as_batch(self.dlog_m(t).to(x), x) * x

    def s(self, t: TimeLike) -> Tensor:
        """Transformed time ``s = -log sigma(t)`` (``+inf`` at ``t = 0``)."""
        return -0.5 * torch.log(self.sigma2(t))

    @property
    def s_T(self) -> float:
        """``s(T) = -log sigma(T)``, the start of the transformed time (computed once)."""
        key = (self.T, *self.params().values())
        if getattr(self, "_s_T_cache", (None,))[0] != key:
            self._s_T_cache = (key, float(self.s(self.T)))
        return self._s_T_cache[1]

    def t_of_s(self, s: TimeLike) -> Tensor:
        """Inverse of the transformed time: the ``t`` with ``-log sigma(t) = s``."""
        s = s if isinstance(s, Tensor) else torch.tensor(float(s), dtype=torch.float64)
        s_T = self.s_T
        if not bool((s >= s_T - 1e-9 * max(1.0, abs(s_T))).all()):  # NaN fails too
            raise fail("s", f"values >= s(T) = {s_T}", f"min {float(s.min())}")
        return self._t_of_sigma2(torch.exp(-2 * s)).clamp(max=self.T)

    def t_of_ratio(self, r: TimeLike) -> Tensor:
        """The ``t`` with ``sigma(t) / m(t) = r`` (the noise level in the variance-exploding
        coordinates ``x / m``), by bisection on ``log(sigma / m)``, increasing in ``t``
        (schedules with a closed form override it)."""
        r = time_tensor(r, "r").to(torch.float64)
        lo, hi = torch.zeros_like(r), torch.full_like(r, float(self.T))
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            below = torch.sqrt(self._sigma2(mid)) < r * torch.exp(self._log_m(mid))
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return 0.5 * (lo + hi)

    def prior_sample(
        self,
        n: int,
        shape: tuple[int, ...] | int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Initial noise ``x(T) = sigma(T) z`` with ``z ~ N(0, I)``, shape ``(n, *shape)``
        (``n = 0`` gives an empty batch)."""
        n = nonnegative_int("n", n)
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if not shape or any(isinstance(v, bool) or not isinstance(v, int) or v < 1
                            for v in shape):
            raise fail("shape", "a data shape of integers >= 1", shape)
        if generator is not None and device is not None and str(generator.device) != str(
            torch.device(device)
        ):
            z = torch.randn((n, *shape), generator=generator, dtype=dtype).to(device)
        else:
            z = torch.randn((n, *shape), generator=generator, dtype=dtype, device=device)
        return float(self.sigma(self.T)) * z

    def params(self) -> dict[str, float]:
        """The schedule's parameters (what its formulas depend on)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __eq__(self, other: object) -> bool:
        """Two schedules are equal when they are of one kind with equal parameters."""
        return type(self) is type(other) and self.params() == other.params()  # type: ignore[union-attr]

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(sorted(self.params().items()))))

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.params().items())
        return f"{type(self).__name__}({params})"


class VE(Schedule):
    """Variance exploding: ``f = 0``, ``g = a^t``, ``m = 1``,
    ``sigma^2 = (a^(2t) - 1) / (2 ln a)`` (computed with ``expm1``)."""

    name = "VE"

    def __init__(self, a: float = 10.0) -> None:
        self.a = positive("a", a)
        if self.a == 1.0:
            raise fail("a", "a base a > 0 with a != 1", a)

    def _log_m(self, t: Tensor) -> Tensor:
        return 0 * t

    def _dlog_m(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def _sigma2(self, t: Tensor) -> Tensor:
        la = math.log(self.a)
        return torch.expm1(2 * la * t) / (2 * la)

    def _dsigma2(self, t: Tensor) -> Tensor:
        return torch.exp(2 * math.log(self.a) * t)

    def _t_of_sigma2(self, sigma2: Tensor) -> Tensor:
        la = math.log(self.a)
        return torch.log1p(2 * la * sigma2) / (2 * la)

    def t_of_ratio(self, r: TimeLike) -> Tensor:
        """``m = 1``: the ``t`` with ``sigma(t) = r``."""
        return self._t_of_sigma2(time_tensor(r, "r") ** 2)


class VP(Schedule):
    """Variance preserving: ``beta(t) = beta_min + t (beta_max - beta_min)``,
    ``alpha(t) = beta_min t + t^2 (beta_max - beta_min) / 2``, ``f = -beta x / 2``,
    ``g = sqrt(beta)``, ``m = exp(-alpha/2)``, ``sigma^2 = -expm1(-alpha)``."""

    name = "VP"

    def __init__(self, beta_min: float = 0.001, beta_max: float = 3.0) -> None:
        self.beta_min = positive("beta_min", beta_min)
        self.beta_max = positive("beta_max", beta_max)
        if self.beta_max < self.beta_min:
            raise fail("beta_max", f"a value >= beta_min = {beta_min}", beta_max)

    def alpha(self, t: Tensor) -> Tensor:
        """Integrated rate ``alpha(t) = beta_min t + t^2 (beta_max - beta_min) / 2``."""
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t

    def beta(self, t: Tensor) -> Tensor:
        """Rate ``beta(t) = beta_min + t (beta_max - beta_min)``."""
        return self.beta_min + (self.beta_max - self.beta_min) * t

    def _log_m(self, t: Tensor) -> Tensor:
        return -0.5 * self.alpha(t)

    def _dlog_m(self, t: Tensor) -> Tensor:
        return -0.5 * self.beta(t)

    def _sigma2(self, t: Tensor) -> Tensor:
        return -torch.expm1(-self.alpha(t))

    def _dsigma2(self, t: Tensor) -> Tensor:
        return self.beta(t) * torch.exp(-self.alpha(t))

    def _t_of_sigma2(self, sigma2: Tensor) -> Tensor:
        alpha = -torch.log1p(-sigma2)
        delta = self.beta_max - self.beta_min
        # Root of delta/2 t^2 + beta_min t - alpha = 0 in the cancellation-free form.
        return 2 * alpha / (self.beta_min + torch.sqrt(self.beta_min**2 + 2 * delta * alpha))

    def t_of_ratio(self, r: TimeLike) -> Tensor:
        """``sigma^2 = 1 - m^2``: ``sigma^2 = r^2 / (1 + r^2)``."""
        return variance_preserving_t_of_ratio(self, r)


class _SigmaIsT(Schedule):
    """Schedules whose noise level is the time: ``sigma = t``, ``sigma^2 = t^2``."""

    def _sigma2(self, t: Tensor) -> Tensor:
        return t * t

    def _dsigma2(self, t: Tensor) -> Tensor:
        return 2 * t

    def _t_of_sigma2(self, sigma2: Tensor) -> Tensor:
        return torch.sqrt(sigma2)


class EDM(_SigmaIsT):
    """EDM-style (Karras et al.): ``sigma(t) = t``, ``m = 1``, ``f = 0``, ``g = sqrt(2 t)``,
    on ``t in [0, sigma_max]``."""

    name = "EDM"

    def __init__(self, sigma_max: float = 80.0) -> None:
        self.sigma_max = positive("sigma_max", sigma_max)
        self.T = self.sigma_max

    def _log_m(self, t: Tensor) -> Tensor:
        return 0 * t

    def _dlog_m(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def t_of_ratio(self, r: TimeLike) -> Tensor:
        """``m = 1``: ``t = sigma = r``."""
        return time_tensor(r, "r")


class RectifiedFlow(_SigmaIsT):
    """Flow matching's linear path (rectified flow): ``x_t = (1 - t) x_0 + t z``, a Gaussian
    path with ``m = 1 - t`` and ``sigma = t`` on ``[0, t_max]`` (``t_max < 1``: at ``t = 1``
    the drift ``f = -x / (1 - t)`` and ``g^2 = 2 t / (1 - t)`` are infinite, while the
    probability-flow velocity ``f - g^2 s / 2 = (x - D) / t`` stays finite).

    Its velocity ``u = dx_t/dt = z - x_0`` is what flow-matching networks predict; the
    exact minimizer of the empirical flow-matching loss is ``u(x, t) = (x - D_e(x, t)) / t``
    with ``D_e`` the empirical (Gaussian-mixture) denoiser, the same mixture as for the
    score (``s = (m D - x) / sigma^2``)."""

    name = "RF"

    def __init__(self, t_max: float = 0.999) -> None:
        self.t_max = positive("t_max", t_max)
        if not self.t_max < 1:
            raise fail("t_max", "a time in (0, 1) (m = 1 - t vanishes at 1)", t_max)
        self.T = self.t_max

    def _log_m(self, t: Tensor) -> Tensor:
        return torch.log1p(-t)

    def _dlog_m(self, t: Tensor) -> Tensor:
        return -1 / (1 - t)

    def t_of_ratio(self, r: TimeLike) -> Tensor:
        """``sigma / m = t / (1 - t) = r``: ``t = r / (1 + r)``."""
        r = time_tensor(r, "r")
        return r / (1 + r)


SCHEDULES: dict[str, type[Schedule]] = {"VE": VE, "VP": VP, "EDM": EDM, "RF": RectifiedFlow}


def get_schedule(name: str) -> Schedule:
    """Build a schedule with its default (paper) parameters from its name."""
    if name not in SCHEDULES:
        raise fail("schedule", f"one of {sorted(SCHEDULES)}", repr(name))
    return SCHEDULES[name]()
