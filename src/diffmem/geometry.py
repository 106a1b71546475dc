"""Geometric memorization: how many dimensions a score keeps (Achilli et al., "Losing
dimensions", arXiv 2410.08727).

At a point ``x`` and time ``t`` the Jacobian of the score ``J = ds/dx`` says in which
directions the model's density varies: across the data (normal directions) the score pulls
back at ``-1/sigma^2``, along it (tangent directions of variance ``v``) only at ``-1/(sigma^2
+ v)``. A memorized training point is a point: every direction is normal. The spectrum of the
symmetrized Jacobian, sorted descending, shows which dimensions survive.

**Closed forms, exact** (:func:`jacobian`), through the one mixture kernel: the weights
``w_n`` of :func:`diffmem.mixture.gaussian_mixture` and the weighted covariance of the
training points ``C = Cov_w[y] = sum_n w_n (y_n - mu)(y_n - mu)^T`` (``mu = sum_n w_n y_n``;
streamed over the training set in chunks, centred, each process its block of a split one).
Differentiating the softmax, ``d mu/dx = (m / sigma^2) C``, so

* :class:`~diffmem.scores.EmpiricalScore`: ``J = -I/sigma^2 + (m^2/sigma^4) C``;
* :class:`~diffmem.scores.TikhonovScore` (``c``, precision ``P``): ``J = (sigma^2 I + c
  P)^-1 (-I + (m^2/sigma^2) C)``;
* :class:`~diffmem.scores.ThresholdScore`: the empirical ``J`` where ``p~ >= tau``, else
  ``(p~/tau) (-I/sigma^2 + (m^2 C + r r^T)/sigma^4)`` with ``r = m mu - x``;
* :class:`~diffmem.scores.KDEScore`: with ``v = sigma^2 + m^2 h^2``, ``J = -I/v + (m^2/v^2)
  C`` (weights at variance ``v``);
* :class:`~diffmem.scores.SmoothedScore`: ``-I/sigma^2 + (m^2/sigma^4) mean_k C(x + lam
  z_k)``;
* :class:`~diffmem.scores.GaussianScore`: ``J = -U diag(1 / (m^2 lam + sigma^2)) U^T``;
* :class:`~diffmem.scores.ConditionalEmpiricalScore`: its base score's with the
  condition's weights.

**Any other score** (networks, loaded models, callables): central differences along ``k``
orthonormal probe directions ``V`` (random, seeded; ``k = d``: all of them), ``J v_i ~ (s(x +
h v_i) - s(x - h v_i)) / 2h`` with ``h = STEP sigma``, and the eigenvalues of the symmetrized
``V^T J V`` (Rayleigh-Ritz: the whole spectrum, to ``O(h^2)``, when ``k = d``). Cost: ``2k``
score evaluations a point, batched ``chunk`` rows at a time.

**Dimension estimators**, on the pull-back rates ``q_i = max(-lambda_i, 0)`` sorted
descending (normal directions first; a positive eigenvalue, a direction in which the density
is convex, between two training points, pulls back at 0; :func:`dimensions`):

* ``absolute``: the number of directions pulling back at less than half the rate of pure
  noise (``sigma^2 q_i < 1/2``: the data's spread along them exceeds the noise's), the
  yardstick of a true denoising score (a trained model's); a point keeps none;
* ``relative``: the number pulling back at less than half the strongest (``q_i < q_1 /
  2``): scale-free, for scores whose scale a regularization changes (Tikhonov's ``1 /
  (sigma^2 + c)``); 0 for an isotropic pull, whatever its strength;
* ``cliff`` (Achilli et al.): drop the first :data:`CLIFF_DROP` rates, take the absolute
  second difference of the rates normalized by the largest and put the cliff at the first
  index where it exceeds :data:`CLIFF_FACTOR` times its median and :data:`CLIFF_FLOOR` (so
  that round-off in a flat spectrum makes no cliff); the dimension is the number of rates
  past it (no cliff: 0 when every rate is within a factor 2 of the largest, else the count
  below half of it);
* ``gap``: the number of rates below the largest ratio between consecutive ones (at least
  2; else 0);
* ``flipd`` (FLIPD, Kamkari et al.): ``d + sigma^2 (tr J + |s|^2)`` at the clean point, from
  the trace and the score (``None`` without the score).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from diffmem._checks import fail, positive_int
from diffmem.centres import all_reduce
from diffmem.mixture import gaussian_mixture
from diffmem.schedules import TimeLike, time_tensor

#: Central-difference step relative to ``sigma``.
STEP = 1e-2
#: Leading values the cliff rule drops, its factor over the median second difference and
#: the smallest second difference (of rates normalized by the largest) it calls a cliff.
CLIFF_DROP = 5
CLIFF_FACTOR = 10.0
CLIFF_FLOOR = 0.05
#: Values of the ``(points, centres, d)`` differences the weighted covariance holds at once.
COVARIANCE_BUDGET = 2**22


def _check(x: Tensor, t: TimeLike) -> Tensor:
    """``x`` finite, batched; ``t`` a positive time per row (``(B,)`` float64)."""
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise fail("x", "a tensor (batch, *data_shape)",
                   f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__)
    if not bool(torch.isfinite(x).all()):
        raise fail("x", "finite values", "NaN or inf")
    tt = time_tensor(t).to(torch.float64)
    if tt.dim() > 1 or (tt.dim() == 1 and tt.shape[0] != x.shape[0]):
        raise fail("t", f"a number or a tensor of shape ({x.shape[0]},)",
                   f"shape {tuple(tt.shape)}")
    tt = tt.expand(x.shape[0])
    if not bool(torch.isfinite(tt).all()) or bool((tt <= 0).any()):
        raise fail("t", "a time t > 0 (the score's Jacobian is -I/sigma^2 at t = 0)",
                   float(tt.min()))
    return tt


def weighted_covariance(centres: Any, weights: Tensor, mean: Tensor,
                        chunk: int = 4096) -> Tensor:
    """``sum_n w_bn (y_n - mu_b)(y_n - mu_b)^T`` per row ``b`` (``(B, d, d)``) over the
    training points of ``centres`` (:class:`diffmem.centres.Centres`, streamed centred in
    chunks; ``weights`` ``(B, N_total)`` over every process's points, each process summing
    its block), in the centred form that stays positive semidefinite."""
    like = weights
    mu = mean.to(like) - centres.offset.to(like)
    cov = torch.zeros(weights.shape[0], centres.d, centres.d, dtype=like.dtype,
                      device=like.device)
    for lo, y, _ in centres.chunks(chunk, like):
        w = weights[:, centres.start + lo: centres.start + lo + y.shape[0]]
        rows = max(1, COVARIANCE_BUDGET // max(1, y.shape[0] * centres.d))
        for q in range(0, weights.shape[0], rows):  # (rows, chunk, d) values at a time
            a = y[None, :, :] - mu[q:q + rows, None, :]
            cov[q:q + rows] += torch.einsum("bn,bni,bnj->bij", w[q:q + rows], a, a)
    return all_reduce(cov, centres.group)


def _mixture_cov(base: Any, xf: Tensor, m: Tensor, var: Tensor,
                 log_prior: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """The kernel at variance ``var``: its weighted mean, covariance and log-normalizer."""
    mix = gaussian_mixture(xf, base.centres, m, var, log_prior=log_prior,
                           chunk_size=base.chunk_size, return_weights=True)
    assert mix.weights is not None
    return mix.mean, weighted_covariance(base.centres, mix.weights, mix.mean,
                                         base.chunk_size), mix.log_norm


def jacobian(score: Any, x: Tensor, t: TimeLike, y: Tensor | None = None) -> Tensor:
    """The exact symmetrized Jacobian ``(B, d, d)`` of a closed-form score at ``(x, t)``
    (module docstring; ``y``: a conditional score's conditions). ``ValueError`` for a
    score without a closed form (:func:`jacobian_spectrum` takes any)."""
    from diffmem.scores import ConditionalEmpiricalScore

    tt = _check(x, t)
    log_prior = None
    if isinstance(score, ConditionalEmpiricalScore):
        if y is None:
            raise fail("y", "the conditions of a conditional score", None)
        log_prior = score.log_prior(y, x.shape[0])
        score = score.base
    kind = _closed_form(score)
    if kind is None:
        raise fail("score", "a closed-form score (EmpiricalScore, TikhonovScore, "
                   "ThresholdScore, KDEScore, SmoothedScore, GaussianScore or a "
                   "conditional one)", type(score).__name__)
    xf = x.reshape(x.shape[0], -1).to(torch.float64)
    m, sigma2 = (v.to(xf) for v in score.schedule.m_sigma2(tt))
    jac = kind(score, xf, tt.to(xf), m, sigma2, log_prior)
    return 0.5 * (jac + jac.mT)


def _closed_form(score: Any) -> Callable[..., Tensor] | None:
    """The exact Jacobian of a closed-form score's class, or ``None``."""
    from diffmem.scores import (
        EmpiricalScore,
        GaussianScore,
        KDEScore,
        SmoothedScore,
        ThresholdScore,
        TikhonovScore,
    )

    for cls, fn in ((SmoothedScore, _smoothed), (EmpiricalScore, _empirical),
                    (TikhonovScore, _tikhonov), (ThresholdScore, _threshold),
                    (KDEScore, _kde), (GaussianScore, _gaussian)):
        if isinstance(score, cls):
            return fn
    return None


def _eye(xf: Tensor) -> Tensor:
    return torch.eye(xf.shape[1], dtype=xf.dtype, device=xf.device)[None]


def _empirical(score: Any, xf: Tensor, tt: Tensor, m: Tensor, sigma2: Tensor,
               log_prior: Tensor | None) -> Tensor:
    """``-I/sigma^2 + (m^2/sigma^4) C``."""
    _, cov, _ = _mixture_cov(score, xf, m, sigma2, log_prior)
    s2 = sigma2[:, None, None]
    return -_eye(xf) / s2 + (m * m)[:, None, None] * cov / (s2 * s2)


def _tikhonov(score: Any, xf: Tensor, tt: Tensor, m: Tensor, sigma2: Tensor,
              log_prior: Tensor | None) -> Tensor:
    """``(sigma^2 I + c P)^-1 (-I + (m^2/sigma^2) C)`` (``gamma(t)``: ``(I + Gamma)^-1``
    times the empirical Jacobian's ``sigma^2`` multiple)."""
    _, cov, _ = _mixture_cov(score, xf, m, sigma2, log_prior)
    inner = -_eye(xf) + (m * m / sigma2)[:, None, None] * cov
    if score.gamma is not None:
        gam = score._gamma(tt, xf)
        full = torch.diag_embed(1 + gam) if gam.dim() == 2 else _eye(xf) + gam
        return torch.linalg.solve(full, inner) / sigma2[:, None, None]
    if score.precision is None:
        return inner / (sigma2 + score.c)[:, None, None]
    p = score.precision.to(xf)
    shift = torch.diag_embed(score.c * p.expand(xf.shape[0], -1)) if p.dim() == 1 else \
        score.c * p[None]
    return torch.linalg.solve(sigma2[:, None, None] * _eye(xf) + shift, inner)


def _threshold(score: Any, xf: Tensor, tt: Tensor, m: Tensor, sigma2: Tensor,
               log_prior: Tensor | None) -> Tensor:
    """The empirical Jacobian where ``p~ >= tau``; below, ``(p~/tau) (-I/sigma^2 + (m^2 C +
    r r^T)/sigma^4)``."""
    mean, cov, log_norm = _mixture_cov(score, xf, m, sigma2, log_prior)
    s2 = sigma2[:, None, None]
    jac = -_eye(xf) / s2 + (m * m)[:, None, None] * cov / (s2 * s2)
    if score.tau == 0:
        return jac
    r = m[:, None] * mean - xf
    factor = torch.exp(torch.clamp(log_norm - math.log(score.tau), max=0.0))
    thin = factor < 1
    damped = factor[:, None, None] * (jac + r[:, :, None] * r[:, None, :] / (s2 * s2))
    return torch.where(thin[:, None, None], damped, jac)


def _kde(score: Any, xf: Tensor, tt: Tensor, m: Tensor, sigma2: Tensor,
         log_prior: Tensor | None) -> Tensor:
    """``-I/v + (m^2/v^2) C`` at ``v = sigma^2 + m^2 h^2``."""
    v = sigma2 + (m * score.h) ** 2
    _, cov, _ = _mixture_cov(score, xf, m, v, log_prior)
    vv = v[:, None, None]
    return -_eye(xf) / vv + (m * m)[:, None, None] * cov / (vv * vv)


def _smoothed(score: Any, xf: Tensor, tt: Tensor, m: Tensor, sigma2: Tensor,
              log_prior: Tensor | None) -> Tensor:
    """``-I/sigma^2 + (m^2/sigma^4) mean_k C(x + lam z_k)``."""
    if score.lam == 0:
        return _empirical(score, xf, tt, m, sigma2, log_prior)
    B, K = xf.shape[0], score.n_draws
    z = score._z.to(xf)
    shifted = (xf[:, None, :] + score.lam * z[None]).reshape(B * K, -1)
    prior = None if log_prior is None else (
        log_prior if log_prior.dim() == 1 else log_prior.repeat_interleave(K, 0))
    _, cov, _ = _mixture_cov(score, shifted, m.repeat_interleave(K),
                             sigma2.repeat_interleave(K), prior)
    s2 = sigma2[:, None, None]
    return -_eye(xf) / s2 + (m * m)[:, None, None] * cov.reshape(B, K, *cov.shape[1:]).mean(1) \
        / (s2 * s2)


def _gaussian(score: Any, xf: Tensor, tt: Tensor, m: Tensor, sigma2: Tensor,
              log_prior: Tensor | None) -> Tensor:
    """``-U diag(1 / (m^2 lam + sigma^2)) U^T``."""
    u = score.eigenvectors.to(xf)
    denom = (m * m)[:, None] * score.eigenvalues.to(xf)[None, :] + sigma2[:, None]
    return -(u[None] / denom[:, None, :]) @ u.T[None]


def probed_jacobian(score: Callable[..., Tensor], x: Tensor, t: TimeLike, *,
                    y: Tensor | None = None, probes: int | None = None, step: float = STEP,
                    seed: int = 0, chunk: int = 256, schedule: Any = None) -> Tensor:
    """The symmetrized ``V^T J V`` ``(B, k, k)`` of any score ``s(x, t[, y])`` by central
    differences along ``k = probes`` orthonormal directions (default every one: ``V = I``
    in a random basis) with step ``STEP sigma(t)``; ``2 k`` score evaluations a point,
    ``chunk`` rows at a time."""
    tt = _check(x, t)
    B = x.shape[0]
    d = math.prod(x.shape[1:])
    k = d if probes is None else positive_int("probes", probes)
    if k > d:
        raise fail("probes", f"at most the dimension {d}", k)
    sch = schedule if schedule is not None else getattr(score, "schedule", None)
    if sch is None:
        raise fail("score", "a score that carries its schedule (or schedule=)",
                   type(score).__name__)
    gen = torch.Generator().manual_seed(int(seed))
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    v = basis[:, :k]
    h = STEP * sch.sigma(tt) if step == STEP else step * sch.sigma(tt)
    xs = x.reshape(B, d).to(torch.float64)
    # rows: each point with each probe, + then -
    plus = xs[:, None, :] + h[:, None, None] * v.T[None]
    minus = xs[:, None, :] - h[:, None, None] * v.T[None]
    rows = torch.cat([plus.reshape(B * k, d), minus.reshape(B * k, d)])
    times = torch.cat([tt.repeat_interleave(k), tt.repeat_interleave(k)])
    cond = None if y is None else torch.cat([y.repeat_interleave(k, 0)] * 2)
    out = []
    for lo in range(0, rows.shape[0], chunk):
        args = (rows[lo:lo + chunk].reshape(-1, *x.shape[1:]).to(x.dtype), times[lo:lo + chunk])
        got = score(*args) if cond is None else score(*args, cond[lo:lo + chunk])
        out.append(got.reshape(-1, d).to(torch.float64))
    diff = torch.cat(out)
    jv = (diff[: B * k] - diff[B * k:]).reshape(B, k, d) / (2 * h[:, None, None])
    small = jv @ v  # (B, k, k): row i is (J v_i)^T V
    return 0.5 * (small + small.mT)


def jacobian_spectrum(score: Any, x: Tensor, t: TimeLike, *, y: Tensor | None = None,
                      top_k: int | None = None, probes: int | None = None,
                      method: str = "auto", seed: int = 0, chunk: int = 256) -> Tensor:
    """The eigenvalues of the symmetrized Jacobian of ``score`` at ``(x, t)``, descending,
    ``(B, d)`` (``(B, k)`` with ``probes``, ``(B, top_k)`` with ``top_k``: the largest).
    ``method``: ``'exact'`` for a closed form (:func:`jacobian`), ``'differences'``
    (:func:`probed_jacobian`: any score, ``probes`` directions), ``'auto'``: exact where
    there is a closed form and ``probes`` is not given."""
    if method not in ("auto", "exact", "differences"):
        raise fail("method", "'auto', 'exact' or 'differences'", repr(method))
    if top_k is not None:
        top_k = positive_int("top_k", top_k)
    from diffmem.scores import ConditionalEmpiricalScore

    closed = isinstance(score, ConditionalEmpiricalScore) or _closed_form(score) is not None
    if method == "exact" or (method == "auto" and closed and probes is None):
        mat = jacobian(score, x, t, y)
    else:
        mat = probed_jacobian(score, x, t, y=y, probes=probes, seed=seed, chunk=chunk)
    values = torch.linalg.eigvalsh(mat).flip(-1)
    return values if top_k is None else values[:, :top_k]


def pull_rates(spectrum: Tensor) -> Tensor:
    """``max(-lambda, 0)`` per value, sorted descending (module docstring)."""
    return (-spectrum).clamp_min(0).sort(dim=1, descending=True).values


def absolute_dimension(spectrum: Tensor, sigma2: Tensor) -> Tensor:
    """The number of directions pulling back at less than half the rate of pure noise:
    ``sigma^2 max(-lambda, 0) < 1/2``, per row (``sigma2``: one value a row)."""
    q = pull_rates(spectrum)
    return (sigma2.to(q).reshape(-1, 1) * q < 0.5).sum(1)


def relative_dimension(spectrum: Tensor) -> Tensor:
    """The number of directions pulling back at less than half the strongest pull."""
    q = pull_rates(spectrum)
    return (q < 0.5 * q[:, :1]).sum(1)


def cliff_dimension(spectrum: Tensor, drop: int = CLIFF_DROP,
                    factor: float = CLIFF_FACTOR, floor: float = CLIFF_FLOOR) -> Tensor:
    """Achilli et al.'s estimate per row (module docstring): on the pull-back rates
    normalized by the largest, the first index past ``drop`` where the absolute second
    difference exceeds ``factor`` times its median and ``floor``; the dimension is the
    number of rates after it."""
    q = pull_rates(spectrum)
    q = q / q[:, :1].clamp_min(torch.finfo(q.dtype).tiny)
    d = q.shape[1]
    fallback = torch.where(q[:, -1] >= 0.5, torch.zeros_like(q[:, 0], dtype=torch.long),
                           (q < 0.5).sum(1))
    out = fallback.clone()
    for b in range(q.shape[0]):
        row = q[b, drop:]
        if row.numel() < 3:
            continue
        second = (row[2:] - 2 * row[1:-1] + row[:-2]).abs()
        big = torch.nonzero((second > factor * second.median()) & (second > floor)).squeeze(1)
        if big.numel():  # the second difference at i peaks where the rates drop after i + 1
            out[b] = d - (drop + int(big[0]) + 2)
    return out


def gap_dimension(spectrum: Tensor) -> Tensor:
    """The number of pull-back rates below the largest ratio between consecutive ones (0
    when every ratio is below 2)."""
    q = pull_rates(spectrum)
    tiny = torch.finfo(q.dtype).tiny
    ratio = q[:, :-1].clamp_min(tiny) / q[:, 1:].clamp_min(tiny)
    dim = q.shape[1] - (ratio.argmax(1) + 1)
    return torch.where(ratio.max(1).values >= 2, dim, torch.zeros_like(dim))


def dimensions(spectrum: Tensor, sigma2: Tensor, score_sq: Tensor | None = None
               ) -> dict[str, Tensor | None]:
    """The estimators of the module docstring side by side, per row: ``absolute``,
    ``relative``, ``cliff``, ``gap`` and, given ``|s|^2`` at the clean point, ``flipd``."""
    flipd = None if score_sq is None else spectrum.shape[1] + sigma2.to(spectrum) * (
        spectrum.sum(1) + score_sq.to(spectrum))
    return {"absolute": absolute_dimension(spectrum, sigma2),
            "relative": relative_dimension(spectrum), "cliff": cliff_dimension(spectrum),
            "gap": gap_dimension(spectrum), "flipd": flipd}
