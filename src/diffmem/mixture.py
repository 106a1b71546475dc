"""The one Gaussian-mixture kernel behind every closed-form score, and exact nearest neighbours.

For queries ``x_b`` (rows of ``x``, shape ``(B, d)``), centres ``y_n`` (shape ``(N, d)``), a
per-query mean scale ``m_b`` and variance ``sigma_b^2``, the kernel evaluates the logits

    l_bn = log_prior_bn - |x_b - m_b y_n|^2 / (2 sigma_b^2)

and returns ``log_norm_b = log sum_n exp(l_bn)``, the weighted centre
``mean_b = sum_n w_bn y_n`` with ``w_bn = softmax_n(l_bn)``, and on request the weights.

Numerics:

* The centres are streamed in chunks with a running-max log-sum-exp, so memory beyond the
  inputs is ``O(B x chunk)`` whatever ``N`` is, and results do not depend on the chunk size
  (up to round-off).
* Small problems use exact differences ``x - m y``. Large ones use matrix products
  ``|x|^2 - 2 m x.y + m^2 |y|^2``, whose absolute error ``e`` (about ``eps (|x| + m|y|)^2``) turns
  into a logit error ``e / (2 sigma^2)``. Rows where that exceeds ``10 sqrt(eps)`` and is well
  above the error of exact differences (``eps |x - m y|^2``) are refined: the centres whose
  approximate logit lies within ``40 + 2 e/(2 sigma^2)`` of the maximum (every centre with a
  relative weight above ``e^-40``) get exact distances and the row's result is computed from
  those alone. They come from a shortlist of the 16 best centres kept during the first pass
  when it covers that window (the usual case at small ``sigma``), else from a second
  streamed pass.
* ``sigma = 0`` rows (the ``t = 0`` limit) get the one-hot weight of the exactly nearest centre
  among those with a finite prior; their ``log_norm`` is reported as 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

#: Elements of a ``(rows, centres, d)`` difference tensor above which matrix products are used.
DIRECT_BUDGET = 2**22
#: Relative weight below which a centre is dropped from a refined row (``exp(-40)``).
LOGIT_WINDOW = 40.0
#: Candidates kept per row during the first pass, to refine rows without a second pass.
SHORTLIST = 16


@dataclass
class Mixture:
    """Result of :func:`gaussian_mixture`: ``log_norm`` ``(B,)``, ``mean`` ``(B, d)`` and,
    when asked for, ``weights`` ``(B, N)`` (rows sum to 1)."""

    log_norm: Tensor
    mean: Tensor
    weights: Tensor | None = None


def _approx_sqdist(x: Tensor, xx: Tensor, y: Tensor, yy: Tensor, m: Tensor) -> Tensor:
    """``|x_b - m_b y_n|^2`` by one matrix product (absolute error ~ eps (|x| + m|y|)^2)."""
    d = xx[:, None] - (2 * m)[:, None] * (x @ y.T) + (m * m)[:, None] * yy[None, :]
    return d.clamp_min_(0)


def _direct_sqdist(x: Tensor, y: Tensor, m: Tensor) -> Tensor:
    """``|x_b - m_b y_n|^2`` from exact differences, shape ``(B, N)``. For a few dimensions
    the differences are laid out ``(d, N, B)`` and summed over the leading axis (a reduction
    over a trailing axis of length 2 is several times slower); the result is then a
    transposed view."""
    if x.shape[1] <= 8:
        diff = x.T.contiguous()[:, None, :] - y.T.contiguous()[:, :, None] * m
        return diff.square_().sum(0).T
    return (x[:, None, :] - m[:, None, None] * y[None, :, :]).square_().sum(-1)


def _pair_sqdist(x: Tensor, y: Tensor, m: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Exact ``|x_r - m_r y_c|^2`` for index pairs ``(rows[i], cols[i])``, in bounded blocks."""
    out = torch.empty(rows.shape[0], dtype=x.dtype, device=x.device)
    block = max(1, DIRECT_BUDGET // max(1, x.shape[1]))
    for i in range(0, rows.shape[0], block):
        r, c = rows[i : i + block], cols[i : i + block]
        out[i : i + block] = (x[r] - m[r, None] * y[c]).pow(2).sum(-1)
    return out


def _matmul_error(x: Tensor, y_norm_max: Tensor, m: Tensor) -> Tensor:
    """Bound on the absolute error of :func:`_approx_sqdist` for each query row."""
    eps = torch.finfo(x.dtype).eps
    # Measured maxima are 1.4-3.8 eps (|x| + |y|)^2 for d = 2..784 (blocked BLAS sums grow
    # slowly with d); the bound keeps a margin of about 3.
    scale = 4 * eps * math.sqrt(1 + math.log2(max(1, x.shape[1])))
    return scale * (x.norm(dim=1) + m.abs() * y_norm_max) ** 2


def refine_tolerance(dtype: torch.dtype) -> float:
    """Logit error above which a row is refined: ``10 sqrt(eps)`` (3.5e-3 in float32, 1.5e-7
    in float64), i.e. weights accurate to that relative precision or better."""
    return 10 * math.sqrt(torch.finfo(dtype).eps)


def _exp(z: Tensor) -> Tensor:
    """``exp(z)`` for ``z <= 0``, set to exactly 0 below ``log(tiny) + 8`` (relative weights
    under 1e-34 in float32, 1e-304 in float64, far below round-off). CPU ``exp`` leaves its
    vector path for arguments that underflow (~7x slower), and the denormal results would
    slow the following matrix product far more, so the argument is clamped first."""
    floor = math.log(torch.finfo(z.dtype).tiny) + 8.0
    return torch.nn.functional.threshold_(torch.exp(z.clamp_min(floor)),
                                          math.exp(floor) * 1.001, 0.0)


def _finite_or_zero(v: Tensor) -> Tensor:
    """``v`` with non-finite entries (rows without any admissible centre) set to 0."""
    return torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)


class _LogSumExp:
    """Streaming ``max``, ``sum exp(l - max)`` and ``sum exp(l - max) y`` per row."""

    def __init__(self, rows: int, d: int, like: Tensor) -> None:
        self.rows, self.d, self.like = rows, d, like
        self.empty = True

    def _start(self) -> None:
        like = self.like
        self.max = torch.full((self.rows,), -math.inf, dtype=like.dtype, device=like.device)
        self.sum = torch.zeros(self.rows, dtype=like.dtype, device=like.device)
        self.vec = torch.zeros(self.rows, self.d, dtype=like.dtype, device=like.device)
        self.empty = False

    def _rescale(self, new_max: Tensor) -> Tensor:
        shift = _finite_or_zero(new_max)
        factor = torch.exp(self.max - shift)
        self.sum.mul_(factor)
        self.vec.mul_(factor[:, None])
        self.max = new_max
        return shift

    def add_dense(self, logits: Tensor, centres: Tensor) -> None:
        chunk_max = logits.amax(dim=1)
        if self.empty:  # first chunk: nothing to rescale
            self.empty = False
            self.max = chunk_max
            shift = _finite_or_zero(chunk_max)
            p = _exp(logits - shift[:, None])
            self.sum = p.sum(dim=1)
            self.vec = p @ centres
            return
        shift = self._rescale(torch.maximum(self.max, chunk_max))
        p = _exp(logits - shift[:, None])
        self.sum.add_(p.sum(dim=1))
        self.vec.add_(p @ centres)

    def add_pairs(self, rows: Tensor, logits: Tensor, centres: Tensor) -> None:
        if self.empty:
            self._start()
        chunk_max = torch.full_like(self.max, -math.inf).scatter_reduce(
            0, rows, logits, reduce="amax"
        )
        shift = self._rescale(torch.maximum(self.max, chunk_max))
        p = torch.exp(logits - shift[rows])
        self.sum.index_add_(0, rows, p)
        self.vec.index_add_(0, rows, p[:, None] * centres)

    def result(self) -> tuple[Tensor, Tensor]:
        if self.empty:
            self._start()
        return self.max + torch.log(self.sum), self.vec / self.sum[:, None]


class _ArgMin:
    """Streaming exact nearest centre (first index on ties) for the ``sigma = 0`` rows."""

    def __init__(self, rows: int, like: Tensor) -> None:
        self.best = torch.full((rows,), math.inf, dtype=like.dtype, device=like.device)
        self.index = torch.zeros(rows, dtype=torch.long, device=like.device)

    def add_dense(self, dist: Tensor, offset: int) -> None:
        value, idx = dist.min(dim=1)
        better = value < self.best
        self.best = torch.where(better, value, self.best)
        self.index = torch.where(better, idx + offset, self.index)

    def add_pairs(self, rows: Tensor, dist: Tensor, cols: Tensor) -> None:
        # Process pairs in column order so that ties keep the first index.
        order = torch.argsort(cols, stable=True)
        for r, dd, c in zip(rows[order].tolist(), dist[order].tolist(), cols[order].tolist(),
                            strict=True):
            if dd < float(self.best[r]):
                self.best[r] = dd
                self.index[r] = c


def _prior_chunk(log_prior: Tensor | None, lo: int, hi: int, rows: Tensor | None) -> Tensor | None:
    if log_prior is None:
        return None
    part = log_prior[..., lo:hi]
    if part.dim() == 2 and rows is not None:
        part = part[rows]
    return part


@dataclass
class _Queries:
    """Per-query constants: ``x`` (shifted by ``m c`` when the centres are centred), ``m``,
    ``1 / (2 sigma^2)`` (1/2 on ``sigma = 0`` rows) and the ``sigma = 0`` mask."""

    x: Tensor
    m: Tensor
    inv2s2: Tensor
    zero: Tensor
    any_zero: bool

    @classmethod
    def build(cls, x: Tensor, m: Tensor, sigma2: Tensor, offset: Tensor | None) -> _Queries:
        if offset is not None:
            x = x - m[:, None] * offset[None, :]
        zero = sigma2 == 0
        return cls(x=x, m=m, inv2s2=0.5 / sigma2.masked_fill(zero, 1.0), zero=zero,
                   any_zero=bool(zero.any()))


@dataclass
class _Plan:
    """How the centres are streamed: ``direct`` (exact differences) or by matrix products,
    ``step`` centres at a time. On the matrix-product path, ``err`` bounds each row's
    distance error, ``maybe`` marks rows that may need exact distances and ``keep_top``
    says whether a shortlist is kept for them."""

    direct: bool
    step: int
    sqnorm: Tensor
    keep_top: bool = False
    xx: Tensor | None = None
    r_max: Tensor | None = None
    err: Tensor | None = None
    maybe: Tensor | None = None

    @classmethod
    def build(cls, q: _Queries, centres: Tensor, sqnorm: Tensor | None, chunk_size: int,
              force_matmul: bool) -> _Plan:
        B, d = q.x.shape
        N = centres.shape[0]
        if sqnorm is None:
            sqnorm = centres.pow(2).sum(1)
        direct = not force_matmul and B * min(N, chunk_size) * d <= DIRECT_BUDGET
        step = chunk_size if not direct else max(1, min(chunk_size,
                                                        DIRECT_BUDGET // max(1, B * d)))
        plan = cls(direct=direct, step=step, sqnorm=sqnorm)
        if not direct:
            plan.xx = q.x.pow(2).sum(1)
            plan.r_max = sqnorm.max().sqrt()
            plan.err = _matmul_error(q.x, plan.r_max, q.m)
            plan.maybe = q.zero | (plan.err * q.inv2s2 > refine_tolerance(q.x.dtype))
            plan.keep_top = bool(plan.maybe.any())
        return plan


@dataclass
class _FirstPass:
    """What the first streamed pass leaves: the running log-sum-exp, the nearest centre of
    ``sigma = 0`` rows (direct path), each row's smallest admissible squared distance
    ``dmin`` (when needed), the shortlist of the ``k`` largest logits and the raw logits
    when the weights were asked for."""

    acc: _LogSumExp
    nearest: _ArgMin | None
    dmin: Tensor | None
    top_logit: Tensor | None
    top_index: Tensor | None
    logits: Tensor | None


def _stream_first_pass(q: _Queries, centres: Tensor, plan: _Plan, log_prior: Tensor | None,
                       return_weights: bool) -> _FirstPass:
    """One pass over the centres in chunks of ``plan.step``: accumulate ``max``,
    ``sum exp`` and ``sum exp y`` of the logits per row, and (as needed) ``dmin``, the
    nearest centre of ``sigma = 0`` rows, a running shortlist and the logits themselves."""
    x, m, inv2s2 = q.x, q.m, q.inv2s2
    B, d = x.shape
    N = centres.shape[0]
    neg_inv2s2 = -inv2s2
    acc = _LogSumExp(B, d, x)
    nearest = _ArgMin(B, x) if q.any_zero else None
    logits_all = torch.empty(B, N, dtype=x.dtype, device=x.device) if return_weights else None
    need_dmin = plan.keep_top or (plan.direct and q.any_zero)
    dmin = torch.full((B,), math.inf, dtype=x.dtype, device=x.device) if need_dmin else None
    k = min(SHORTLIST, N)
    top_logit = top_index = None
    if plan.keep_top:
        top_logit = torch.empty(B, 0, dtype=x.dtype, device=x.device)
        top_index = torch.empty(B, 0, dtype=torch.long, device=x.device)
    if not plan.direct:  # logits = (2 m / 2s^2) x.y - |x|^2 / 2s^2 - m^2 |y|^2 / 2s^2, fused
        assert plan.xx is not None
        x_scaled = x * (2 * m * inv2s2)[:, None]
        row_term = (plan.xx * inv2s2)[:, None]
        col_scale = m * m * inv2s2
    for lo in range(0, N, plan.step):
        hi = min(N, lo + plan.step)
        y = centres[lo:hi]
        if plan.direct:
            dist = _direct_sqdist(x, y, m)
            logits = dist * neg_inv2s2[:, None]
        else:
            logits = torch.addr(x_scaled @ y.T, col_scale, plan.sqnorm[lo:hi], alpha=-1)
            logits.sub_(row_term).clamp_max_(0.0)
            dist = None
        prior = _prior_chunk(log_prior, lo, hi, None)
        if dmin is not None:
            if dist is None:
                dist = -logits / inv2s2[:, None]
            if prior is not None:
                dist = torch.where(torch.isfinite(prior), dist, torch.full_like(dist, math.inf))
            dmin = torch.minimum(dmin, dist.min(dim=1).values)
            if nearest is not None and plan.direct:
                nearest.add_dense(dist, lo)
        if prior is not None:
            logits = logits + prior
        acc.add_dense(logits, y)
        if top_logit is not None and top_index is not None:  # the k largest logits so far
            idx = torch.arange(lo, hi, device=x.device).expand(B, -1)
            cat_l, cat_i = torch.cat([top_logit, logits], 1), torch.cat([top_index, idx], 1)
            top = torch.topk(cat_l, min(k, cat_l.shape[1]), dim=1)
            top_logit, top_index = top.values, torch.gather(cat_i, 1, top.indices)
        if logits_all is not None:
            logits_all[:, lo:hi] = logits
    return _FirstPass(acc=acc, nearest=nearest, dmin=dmin, top_logit=top_logit,
                      top_index=top_index, logits=logits_all)


def _rows_to_refine(q: _Queries, plan: _Plan, first: _FirstPass) -> tuple[Tensor, Tensor]:
    """Rows whose matrix-product logit error exceeds the tolerance and is well above what
    exact differences in this dtype would give (``eps |x - m y|^2``), plus every
    ``sigma = 0`` row; and each row's logit floor ``lim = max - 40 - 2 err / (2 sigma^2)``
    (centres below it carry a relative weight under ``e^-40``)."""
    assert plan.err is not None and plan.maybe is not None and plan.r_max is not None
    assert first.dmin is not None
    err = plan.err
    intrinsic = err / (q.x.norm(dim=1) + q.m.abs() * plan.r_max).pow(2) * first.dmin
    refine = q.zero | (plan.maybe & (err > 16 * intrinsic))
    lim = first.acc.max - LOGIT_WINDOW - 2 * err * q.inv2s2
    return refine, lim


def _refine_from_shortlist(q: _Queries, centres: Tensor, first: _FirstPass, refine: Tensor,
                           lim: Tensor, log_prior: Tensor | None, log_norm: Tensor,
                           mean: Tensor) -> Tensor:
    """Finish, from the shortlist alone, the refined rows whose whole window lies in it
    (the usual case at small ``sigma``): exact logits of the ``k`` candidates replace the
    row's ``log_norm``, ``mean`` and logits in place. Returns the rows still to refine."""
    assert first.top_logit is not None and first.top_index is not None
    x, m, inv2s2 = q.x, q.m, q.inv2s2
    d = x.shape[1]
    N = centres.shape[0]
    k = min(SHORTLIST, N)
    short = refine & ~q.zero & ((k == N) | (first.top_logit[:, -1] < lim))
    if bool(short.any()):
        rows = torch.nonzero(short).squeeze(1)
        block = max(1, DIRECT_BUDGET // (k * d))
        for i in range(0, rows.shape[0], block):
            r = rows[i : i + block]
            cand = first.top_index[r]
            diff = x[r, None, :] - m[r, None, None] * centres[cand]
            exact_logit = -torch.einsum("bkd,bkd->bk", diff, diff) * inv2s2[r, None]
            if log_prior is not None:
                exact_logit = exact_logit + (torch.gather(log_prior[r], 1, cand)
                                             if log_prior.dim() == 2 else log_prior[cand])
            log_norm[r] = torch.logsumexp(exact_logit, dim=1)
            w = torch.exp(exact_logit - log_norm[r, None])
            mean[r] = torch.einsum("bk,bkd->bd", w, centres[cand])
            if first.logits is not None:
                first.logits[r] = -math.inf
                first.logits[r[:, None], cand] = exact_logit
    return refine & ~short


def _refine_by_second_pass(q: _Queries, centres: Tensor, plan: _Plan, first: _FirstPass,
                           refine: Tensor, lim: Tensor, log_prior: Tensor | None,
                           log_norm: Tensor, mean: Tensor) -> None:
    """A second streamed pass for the remaining refined rows: the centres inside each row's
    window (``logit >= lim``; for ``sigma = 0`` rows, squared distance within ``2 err`` of
    ``dmin``) get exact distances, and the row's ``log_norm``, ``mean``, logits and (for
    ``sigma = 0``) nearest centre are recomputed from them alone, in place."""
    assert plan.err is not None and plan.xx is not None and first.dmin is not None
    x, m, inv2s2 = q.x, q.m, q.inv2s2
    d = x.shape[1]
    N = centres.shape[0]
    rows_all = torch.nonzero(refine).squeeze(1)
    xr, mr = x[rows_all], m[rows_all]
    zr = q.zero[rows_all]
    lim_r = torch.where(zr, first.dmin[rows_all] + 2 * plan.err[rows_all], lim[rows_all])
    sub = _LogSumExp(rows_all.shape[0], d, x)
    sub_near = _ArgMin(rows_all.shape[0], x) if q.any_zero else None
    if first.logits is not None:
        first.logits[rows_all] = -math.inf
    for lo in range(0, N, plan.step):
        hi = min(N, lo + plan.step)
        y = centres[lo:hi]
        dist = _approx_sqdist(xr, plan.xx[rows_all], y, plan.sqnorm[lo:hi], mr)
        logit = -dist * inv2s2[rows_all, None]
        prior = _prior_chunk(log_prior, lo, hi, rows_all)
        if prior is not None:
            logit = logit + prior
        keep = torch.where(zr[:, None], dist <= lim_r[:, None], logit >= lim_r[:, None])
        if prior is not None:
            keep &= torch.isfinite(prior)
        r, c = torch.nonzero(keep, as_tuple=True)
        if r.numel() == 0:
            continue
        exact = _pair_sqdist(xr, y, mr, r, c)
        pos = ~zr[r]
        exact_logit = -exact * inv2s2[rows_all][r]
        if prior is not None:
            exact_logit = exact_logit + (prior[r, c] if prior.dim() == 2 else prior[c])
        sub.add_pairs(r[pos], exact_logit[pos], y[c[pos]])
        if sub_near is not None:
            sub_near.add_pairs(r[~pos], exact[~pos], c[~pos] + lo)
        if first.logits is not None:
            first.logits[rows_all[r], c + lo] = exact_logit
    sub_log_norm, sub_mean = sub.result()
    pos_rows = ~zr
    log_norm[rows_all[pos_rows]] = sub_log_norm[pos_rows]
    mean[rows_all[pos_rows]] = sub_mean[pos_rows]
    if sub_near is not None and first.nearest is not None:
        first.nearest.index[rows_all] = sub_near.index


def _finish(q: _Queries, centres: Tensor, first: _FirstPass, log_norm: Tensor, mean: Tensor,
            offset: Tensor | None) -> Mixture:
    """Normalise the logits into weights, give ``sigma = 0`` rows their one-hot nearest
    centre (``log_norm`` 0) and undo the centring of the centres."""
    weights = None
    if first.logits is not None:
        weights = _exp(first.logits - log_norm[:, None])
    if first.nearest is not None:
        zero = q.zero
        mean[zero] = centres[first.nearest.index[zero]]
        log_norm[zero] = 0.0
        if weights is not None:
            weights[zero] = 0.0
            weights[zero, first.nearest.index[zero]] = 1.0
    if offset is not None:
        mean = mean + offset[None, :]
    return Mixture(log_norm=log_norm, mean=mean, weights=weights)


def gaussian_mixture(
    x: Tensor,
    centres: Tensor,
    m: Tensor,
    sigma2: Tensor,
    *,
    log_prior: Tensor | None = None,
    centres_sqnorm: Tensor | None = None,
    offset: Tensor | None = None,
    chunk_size: int = 4096,
    return_weights: bool = False,
    force_matmul: bool = False,
) -> Mixture:
    """Evaluate ``l_bn = log_prior_bn - |x_b - m_b y_n|^2 / (2 sigma_b^2)`` and return
    ``log sum_n exp(l_bn)``, ``sum_n softmax_n(l_bn) y_n`` and optionally the weights.

    The phases: :func:`_stream_first_pass` (streamed log-sum-exp, shortlist), then on the
    matrix-product path :func:`_rows_to_refine`, :func:`_refine_from_shortlist` and
    :func:`_refine_by_second_pass`, and :func:`_finish`.

    Args:
        x: queries, ``(B, d)``.
        centres: training points ``y_n``, ``(N, d)``, same dtype and device as ``x``.
        m: mean scale per query, ``(B,)``.
        sigma2: variance per query, ``(B,)``, ``>= 0``.
        log_prior: optional log prior weights, ``(N,)`` or ``(B, N)`` (``-inf`` excludes).
        centres_sqnorm: optional cached ``|y_n|^2``.
        offset: optional ``(d,)`` vector ``c`` when ``centres`` holds ``y_n - c`` (centring
            the training set shrinks ``|y|`` and so the matrix-product round-off); the
            queries are shifted by ``m c`` and ``mean`` is returned for the true ``y_n``.
        chunk_size: centres processed at once.
        return_weights: also return the ``(B, N)`` weights.
        force_matmul: use the matrix-product path even for small problems (for tests).
    """
    q = _Queries.build(x, m, sigma2, offset)
    plan = _Plan.build(q, centres, centres_sqnorm, chunk_size, force_matmul)
    first = _stream_first_pass(q, centres, plan, log_prior, return_weights)
    log_norm, mean = first.acc.result()
    if plan.keep_top:
        refine, lim = _rows_to_refine(q, plan, first)
        refine = _refine_from_shortlist(q, centres, first, refine, lim, log_prior, log_norm,
                                         mean)
        if bool(refine.any()):
            _refine_by_second_pass(q, centres, plan, first, refine, lim, log_prior, log_norm,
                                   mean)
    return _finish(q, centres, first, log_norm, mean, offset)


def knn(x: Tensor, y: Tensor, k: int = 1, chunk_size: int = 4096) -> tuple[Tensor, Tensor]:
    """Exact ``k`` nearest rows of ``y`` (``(N, d)``) for each row of ``x`` (``(B, d)``).

    Returns ``(squared_distances, indices)``, both ``(B, k)``, sorted ascending. Large problems
    shortlist candidates with matrix products and recompute their distances exactly; a row
    whose shortlist cannot be certified is recomputed from exact differences.
    """
    B, d = x.shape
    N = y.shape[0]
    k = min(k, N)
    centre = y.mean(0, keepdim=True)  # distances are translation invariant; centring cuts
    x, y = x - centre, y - centre  # the round-off of the matrix-product shortlist
    ones = torch.ones(B, dtype=x.dtype, device=x.device)
    direct = B * min(N, chunk_size) * d <= DIRECT_BUDGET

    def stream(xq: Tensor, exact: bool, kk: int) -> tuple[Tensor, Tensor]:
        rows = xq.shape[0]
        best_d = torch.empty(rows, 0, dtype=x.dtype, device=x.device)
        best_i = torch.empty(rows, 0, dtype=torch.long, device=x.device)
        step = max(1, min(chunk_size, DIRECT_BUDGET // max(1, rows * d))) if exact else chunk_size
        xq2 = xq.pow(2).sum(1)
        for lo in range(0, N, step):
            yc = y[lo : lo + step]
            one = ones[:rows]
            dist = _direct_sqdist(xq, yc, one) if exact else _approx_sqdist(
                xq, xq2, yc, yc.pow(2).sum(1), one
            )
            idx = torch.arange(lo, lo + yc.shape[0], device=x.device).expand(rows, -1)
            cat_d, cat_i = torch.cat([best_d, dist], 1), torch.cat([best_i, idx], 1)
            top = torch.topk(cat_d, min(kk, cat_d.shape[1]), dim=1, largest=False, sorted=True)
            best_d, best_i = top.values, torch.gather(cat_i, 1, top.indices)
        return best_d, best_i

    if direct:
        return stream(x, True, k)
    extra = min(N, k + 8)
    approx_d, cand = stream(x, False, extra)
    exact = (x[:, None, :] - y[cand]).pow(2).sum(-1)
    order = torch.argsort(exact, dim=1, stable=True)[:, :k]
    best_d, best_i = torch.gather(exact, 1, order), torch.gather(cand, 1, order)
    if extra < N:
        err = _matmul_error(x, y.pow(2).sum(1).max().sqrt(), ones)
        unsure = best_d[:, -1] + 2 * err > approx_d[:, -1]
        if bool(unsure.any()):
            rows = torch.nonzero(unsure).squeeze(1)
            best_d[rows], best_i[rows] = stream(x[rows], True, k)
    return best_d, best_i
