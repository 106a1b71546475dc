"""The one Gaussian-mixture kernel behind every closed-form score, and exact nearest neighbours.

For queries ``x_b`` (rows of ``x``, shape ``(B, d)``), centres ``y_n`` (shape ``(N, d)``), a
per-query mean scale ``m_b`` and variance ``sigma_b^2``, the kernel evaluates the logits

    l_bn = log_prior_bn - |x_b - m_b y_n|^2 / (2 sigma_b^2)

and returns ``log_norm_b = log sum_n exp(l_bn)``, the weighted centre
``mean_b = sum_n w_bn y_n`` with ``w_bn = softmax_n(l_bn)``, and on request the weights.

Numerics:

* The centres are streamed in chunks with a running-max log-sum-exp: per row the running
  maximum ``M``, ``S = sum exp(l - M)`` and ``V = sum exp(l - M) y``. Memory beyond the inputs
  is ``O(B x chunk)`` whatever ``N`` is, and results do not depend on the chunk size (up to
  round-off). Weights are ``exp(l - M) / S`` (not ``exp(l - log_norm)``, which loses the
  ``log S`` of equal far-away centres to round-off).
* Small problems use exact differences ``x - m y``. Large ones use matrix products
  ``|x|^2 - 2 m x.y + m^2 |y|^2``, whose absolute error ``e`` (about ``eps (|x| + m|y|)^2``) turns
  into a logit error ``e / (2 sigma^2)``. Rows where that exceeds ``10 sqrt(eps)`` and is well
  above the error of exact differences (``eps |x - m y|^2``) are refined: the centres whose
  approximate logit lies within ``40 + 2 e/(2 sigma^2)`` of the maximum (every centre with a
  relative weight above ``e^-40``) get exact distances and the row's result is computed from
  those alone. They come from a shortlist of the 16 best centres kept during the first pass
  when it covers that window (the usual case at small ``sigma``), else from a second
  streamed pass.
* The ``sigma -> 0`` limit: rows with ``sigma^2`` below the dtype's smallest normal number
  (``t = 0``, or a ``sigma^2`` that underflowed) and rows whose every logit underflows to
  ``-inf`` get the limit of the softmax: equal (prior-weighted) weights on the centres at
  exactly the smallest distance, 0 elsewhere. Their ``log_norm`` is the limit of
  ``log sum_n pi_n exp(-|x - m y_n|^2 / 2 sigma^2)``: ``log sum pi_n`` over centres at
  distance 0, else ``-inf``.
* Each row needs at least one centre with a finite prior (callers check ``log_prior``).

The centres come from a :class:`diffmem.centres.Centres` (in memory, memory-mapped, shards,
half-precision storage) or a plain tensor. With a ``torch.distributed`` process group each
process holds a block of the centres; the per-block ``(M, S, V)`` merge exactly
(``M = max_p M_p``, ``S = sum_p S_p e^(M_p - M)``, ``V`` likewise), the ``sigma -> 0``
nearest centres by a minimum, the weights by gathering, and every process returns the full
result. Every decision that leads to a collective is taken from merged values, so all
processes run the same collectives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffmem.centres import Centres, all_gather, all_reduce

#: Elements of a ``(rows, centres, d)`` difference tensor above which matrix products are used.
DIRECT_BUDGET = 2**22
#: Relative weight below which a centre is dropped from a refined row (``exp(-40)``).
LOGIT_WINDOW = 40.0
#: Candidates kept per row during the first pass, to refine rows without a second pass.
SHORTLIST = 16
#: Values per chunk of converted centres (half-precision storage, another dtype) on the
#: matrix-product path on a CPU: a converted chunk (24 MiB in float32) is read by the products while
#: it is still in a 32 MiB last-level cache (measured in ``benchmarks/bench_scale.py``: at
#: d = 3,072, 2,048-row chunks of float16 storage sample at 0.98x float32's time,
#: 4,096-row chunks at 1.25x).
CONVERTED_VALUES = 6 * 2**20


@dataclass
class Mixture:
    """Result of :func:`gaussian_mixture`: ``log_norm`` ``(B,)``, ``mean`` ``(B, d)`` and,
    when asked for, ``weights`` ``(B, N)`` (rows sum to 1)."""

    log_norm: Tensor
    mean: Tensor
    weights: Tensor | None = None


class _TensorCentres:
    """A plain tensor of centres as the kernel's source: used as given (already centred by
    ``offset`` when one is given), in one process."""

    group = None
    start = 0

    def __init__(self, y: Tensor, sqnorm: Tensor | None, offset: Tensor | None) -> None:
        self.y = y
        self.yy = y.pow(2).sum(1) if sqnorm is None else sqnorm
        self.n = self.n_total = y.shape[0]
        self.offset = offset

    def chunk(self, lo: int, hi: int, like: Tensor) -> tuple[Tensor, Tensor]:
        return self.y[lo:hi], self.yy[lo:hi]

    def chunks(self, step: int, like: Tensor) -> Any:
        for lo in range(0, self.n, step):
            yield (lo, *self.chunk(lo, min(self.n, lo + step), like))

    def take(self, index: Tensor, like: Tensor) -> Tensor:
        return self.y[index]

    def converts(self, like: Tensor) -> bool:
        return False

    def float32_rows(self) -> np.ndarray | None:
        y = self.y
        ok = y.dtype == torch.float32 and y.device.type == "cpu" and y.is_contiguous()
        return y.numpy() if ok else None

    def r_max(self, like: Tensor) -> Tensor:
        return self.yy.max().sqrt()

    raw_shift = None
    raw_chunk = chunk
    raw_chunks = chunks
    take_raw = take
    raw_norm_max = r_max


Source = Any  # Centres | _TensorCentres


def _approx_sqdist(x: Tensor, xx: Tensor, y: Tensor, yy: Tensor, m: Tensor,
                   xs: Tensor | None = None) -> Tensor:
    """``|x_b - m_b y_n|^2`` by one matrix product (absolute error ~ eps (|x| + m|y|)^2).
    With ``xs = x s`` the rows ``y`` are ``y_c + s`` and ``yy = |y_c|^2``: the distance to
    ``y_c`` is ``|x|^2 - 2 m (x.y - x.s) + m^2 |y_c|^2``."""
    cross = x @ y.T
    if xs is not None:
        cross.sub_(xs[:, None])
    d = xx[:, None] - (2 * m)[:, None] * cross + (m * m)[:, None] * yy[None, :]
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


def _pair_sqdist(x: Tensor, y: Tensor, m: Tensor, rows: Tensor, cols: Tensor,
                 shift: Tensor | None = None) -> Tensor:
    """Exact ``|x_r - m_r (y_c - shift)|^2`` for index pairs ``(rows[i], cols[i])``, in
    bounded blocks."""
    out = torch.empty(rows.shape[0], dtype=x.dtype, device=x.device)
    block = max(1, DIRECT_BUDGET // max(1, x.shape[1]))
    for i in range(0, rows.shape[0], block):
        r, c = rows[i : i + block], cols[i : i + block]
        yc = y[c] if shift is None else y[c] - shift
        out[i : i + block] = (x[r] - m[r, None] * yc).pow(2).sum(-1)
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
        """Add every row's logits ``(rows, n)`` with the centres ``(n, d)``."""
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
        """Add one logit per pair (``rows[i]``, ``logits[i]``, ``centres[i]``)."""
        if self.empty:
            self._start()
        chunk_max = torch.full_like(self.max, -math.inf).scatter_reduce(
            0, rows, logits, reduce="amax"
        )
        shift = self._rescale(torch.maximum(self.max, chunk_max))
        p = torch.exp(logits - shift[rows])
        self.sum.index_add_(0, rows, p)
        self.vec.index_add_(0, rows, p[:, None] * centres)

    def state(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(max, sum, vec)`` (the empty accumulator: ``-inf``, 0, 0)."""
        if self.empty:
            self._start()
        return self.max, self.sum, self.vec

    def merge(self, group: Any) -> None:
        """Merge the per-process accumulators of a group exactly: every process ends with
        ``max = max_p max_p``, ``sum = sum_p sum_p e^(max_p - max)``, ``vec`` likewise."""
        if group is None:
            return
        mx, sm, vec = self.state()
        glob = all_reduce(mx.clone(), group, "max")
        factor = torch.exp(mx - _finite_or_zero(glob))
        self.sum = all_reduce(sm * factor, group)
        self.vec = all_reduce(vec * factor[:, None], group)
        self.max = glob


def _prior_chunk(log_prior: Tensor | None, lo: int, hi: int, rows: Tensor | None) -> Tensor | None:
    if log_prior is None:
        return None
    part = log_prior[..., lo:hi]
    if part.dim() == 2 and rows is not None:
        part = part[rows]
    return part


def _prior_at(prior: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """A prior chunk (``(n,)`` or ``(rows, n)``) at (row, column) pairs."""
    return prior[rows, cols] if prior.dim() == 2 else prior[cols]


@dataclass
class _Queries:
    """Per-query constants: ``x`` (shifted by ``m c`` when the centres are centred), ``m``,
    ``1 / (2 sigma^2)`` (1/2 on limit rows) and the rows in the ``sigma -> 0`` limit
    (``sigma^2`` below the smallest normal number of the dtype, 0 included)."""

    x: Tensor
    m: Tensor
    inv2s2: Tensor
    limit: Tensor
    any_limit: bool

    @classmethod
    def build(cls, x: Tensor, m: Tensor, sigma2: Tensor, offset: Tensor | None) -> _Queries:
        if offset is not None:
            x = x - m[:, None] * offset.to(dtype=x.dtype, device=x.device)[None, :]
        limit = sigma2 < torch.finfo(sigma2.dtype).tiny
        return cls(x=x, m=m, inv2s2=0.5 / sigma2.masked_fill(limit, 1.0), limit=limit,
                   any_limit=bool(limit.any()))


@dataclass
class _Plan:
    """How the centres are streamed: ``direct`` (exact differences) or by matrix products,
    ``step`` centres at a time. On the matrix-product path, ``err`` bounds each row's
    distance error, ``maybe`` marks rows that may need exact distances and ``keep_top``
    says whether a shortlist is kept for them. Decided from global sizes, so every process
    of a group decides alike."""

    direct: bool
    step: int
    keep_top: bool = False
    xx: Tensor | None = None
    err: Tensor | None = None
    maybe: Tensor | None = None
    r_max: Tensor | None = None
    shift: Tensor | None = None
    xs: Tensor | None = None

    @classmethod
    def build(cls, q: _Queries, src: Source, chunk_size: int, force_matmul: bool) -> _Plan:
        B, d = q.x.shape
        direct = not force_matmul and B * min(src.n_total, chunk_size) * d <= DIRECT_BUDGET
        step = chunk_size if not direct else max(1, min(chunk_size,
                                                        DIRECT_BUDGET // max(1, B * d)))
        if not direct and q.x.device.type == "cpu" and src.converts(q.x):
            step = max(1, min(step, CONVERTED_VALUES // max(1, d)))
        plan = cls(direct=direct, step=step)
        if not direct:
            plan.xx = q.x.pow(2).sum(1)
            if src.raw_shift is not None:  # stream the rows uncentred: no pass to centre them
                plan.shift = src.raw_shift.to(dtype=q.x.dtype, device=q.x.device)
                plan.xs = q.x @ plan.shift
            plan.r_max = src.raw_norm_max(q.x)
            plan.err = _matmul_error(q.x, plan.r_max, q.m)
            plan.maybe = ~q.limit & (plan.err * q.inv2s2 > refine_tolerance(q.x.dtype))
            plan.keep_top = bool(plan.maybe.any())
        return plan

    def chunks(self, src: Source, like: Tensor) -> Any:
        """``(lo, rows, centred squared norms)``, ``step`` rows at a time, as this path
        streams them: centred on the direct path; uncentred, ``y_c + shift``, on the
        matrix-product path, where converted rows share one buffer (a chunk is valid until
        the next is drawn)."""
        return src.chunks(self.step, like) if self.direct else src.raw_chunks(self.step, like)

    def take(self, src: Source, index: Tensor, like: Tensor) -> Tensor:
        """Rows at ``index`` as this path streams them."""
        return src.take(index, like) if self.direct else src.take_raw(index, like)

    def centred(self, rows: Tensor) -> Tensor:
        """Streamed rows as centred rows ``y_c``."""
        return rows if self.shift is None else rows - self.shift

    def sqdist(self, q: _Queries, rows: Tensor, y: Tensor, yy: Tensor) -> Tensor:
        """Squared distances of query ``rows`` to streamed rows: exact on the direct path,
        by matrix products otherwise."""
        x, m = q.x[rows], q.m[rows]
        if self.direct:
            return _direct_sqdist(x, y, m)
        assert self.xx is not None
        return _approx_sqdist(x, self.xx[rows], y, yy, m,
                              None if self.xs is None else self.xs[rows])


@dataclass
class _FirstPass:
    """What the first streamed pass leaves: the running log-sum-exp, each row's smallest
    admissible squared distance ``dmin`` (when refinement may need it), the shortlist of the
    ``k`` largest logits and the raw logits when the weights were asked for."""

    acc: _LogSumExp
    dmin: Tensor | None
    top_logit: Tensor | None
    top_index: Tensor | None
    logits: Tensor | None


def _stream_first_pass(q: _Queries, src: Source, plan: _Plan, log_prior: Tensor | None,
                       return_weights: bool) -> _FirstPass:
    """One pass over the centres in chunks of ``plan.step``: accumulate ``max``,
    ``sum exp`` and ``sum exp y`` of the logits per row, and (as needed) ``dmin``, a running
    shortlist and the logits themselves."""
    x, m, inv2s2 = q.x, q.m, q.inv2s2
    B, d = x.shape
    N = src.n
    neg_inv2s2 = -inv2s2
    acc = _LogSumExp(B, d, x)
    logits_all = torch.empty(B, N, dtype=x.dtype, device=x.device) if return_weights else None
    dmin = torch.full((B,), math.inf, dtype=x.dtype, device=x.device) if plan.keep_top else None
    k = min(SHORTLIST, N)
    top_logit = top_index = None
    if plan.keep_top:
        top_logit = torch.empty(B, 0, dtype=x.dtype, device=x.device)
        top_index = torch.empty(B, 0, dtype=torch.long, device=x.device)
    if not plan.direct:  # logits = (2 m / 2s^2) x.y - |x|^2 / 2s^2 - m^2 |y|^2 / 2s^2, fused
        assert plan.xx is not None
        x_scaled = x * (2 * m * inv2s2)[:, None]
        row_term = (plan.xx * inv2s2)[:, None]
        if plan.shift is not None:  # x.y_c = x.(y_c + s) - x.s
            row_term = row_term + (x_scaled @ plan.shift)[:, None]
        col_scale = m * m * inv2s2
    for lo, y, yy in plan.chunks(src, x):
        hi = lo + y.shape[0]
        if plan.direct:
            logits = _direct_sqdist(x, y, m) * neg_inv2s2[:, None]
        else:
            logits = torch.addr(x_scaled @ y.T, col_scale, yy, alpha=-1)
            logits.sub_(row_term).clamp_max_(0.0)
        prior = _prior_chunk(log_prior, lo, hi, None)
        if dmin is not None:
            dist = -logits / inv2s2[:, None]
            if prior is not None:
                dist = torch.where(torch.isfinite(prior), dist, torch.full_like(dist, math.inf))
            dmin = torch.minimum(dmin, dist.min(dim=1).values)
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
    acc.merge(src.group)
    if dmin is not None:
        all_reduce(dmin, src.group, "min")
    return _FirstPass(acc=acc, dmin=dmin, top_logit=top_logit, top_index=top_index,
                      logits=logits_all)


def _rows_to_refine(q: _Queries, plan: _Plan, first: _FirstPass) -> tuple[Tensor, Tensor]:
    """Rows whose matrix-product logit error exceeds the tolerance and is well above what
    exact differences in this dtype would give (``eps |x - m y|^2``), and each row's logit
    floor ``lim = max - 40 - 2 err / (2 sigma^2)`` (centres below it carry a relative weight
    under ``e^-40``)."""
    assert plan.err is not None and plan.maybe is not None and plan.r_max is not None
    assert first.dmin is not None
    err = plan.err
    intrinsic = err / (q.x.norm(dim=1) + q.m.abs() * plan.r_max).pow(2) * first.dmin
    refine = plan.maybe & (err > 16 * intrinsic) & ~q.limit
    lim = first.acc.max - LOGIT_WINDOW - 2 * err * q.inv2s2
    return refine, lim


def _refine_rows(q: _Queries, src: Source, plan: _Plan, first: _FirstPass, rows: Tensor,
                 lim: Tensor, log_prior: Tensor | None) -> _LogSumExp:
    """Exact log-sum-exp of the refined ``rows`` over this process's centres inside each
    row's window (``logit >= lim``): from the shortlist where it covers the window (the
    usual case at small ``sigma``), else from a second streamed pass. The logits of those
    rows are replaced by the exact ones (``-inf`` outside the window)."""
    assert first.top_logit is not None and first.top_index is not None
    assert plan.err is not None
    x, m, inv2s2 = q.x, q.m, q.inv2s2
    d = x.shape[1]
    N = src.n
    k = min(SHORTLIST, N)
    sub = _LogSumExp(rows.shape[0], d, x)
    if first.logits is not None:
        first.logits[rows] = -math.inf
    covered = (k == N) | (first.top_logit[rows, -1] < lim[rows]) if k else \
        torch.ones_like(rows, dtype=torch.bool)
    pos = torch.arange(rows.shape[0], device=x.device)
    short = pos[covered]
    block = max(1, DIRECT_BUDGET // max(1, k * d))
    for i in range(0, short.shape[0] if k else 0, block):
        s = short[i : i + block]
        r = rows[s]
        cand = first.top_index[r]
        yc = plan.take(src, cand, x)
        diff = x[r, None, :] - m[r, None, None] * plan.centred(yc)
        exact_logit = -torch.einsum("bkd,bkd->bk", diff, diff) * inv2s2[r, None]
        if log_prior is not None:
            exact_logit = exact_logit + (torch.gather(log_prior[r], 1, cand)
                                         if log_prior.dim() == 2 else log_prior[cand])
        sub.add_pairs(s.repeat_interleave(k), exact_logit.reshape(-1), yc.reshape(-1, d))
        if first.logits is not None:
            first.logits[r[:, None], cand] = exact_logit
    rest = pos[~covered]
    if rest.numel():
        _second_pass(q, src, plan, first, rows, rest, lim, log_prior, sub)
    return sub


def _second_pass(q: _Queries, src: Source, plan: _Plan, first: _FirstPass, rows: Tensor,
                 which: Tensor, lim: Tensor, log_prior: Tensor | None, sub: _LogSumExp) -> None:
    """A second streamed pass for ``rows[which]``: the centres inside each row's window
    (approximate ``logit >= lim``) get exact distances and enter the accumulator ``sub``."""
    assert plan.xx is not None
    r_all = rows[which]
    xr, mr, inv = q.x[r_all], q.m[r_all], q.inv2s2[r_all]
    for lo, y, yy in plan.chunks(src, q.x):
        dist = plan.sqdist(q, r_all, y, yy)
        logit = -dist * inv[:, None]
        prior = _prior_chunk(log_prior, lo, lo + y.shape[0], r_all)
        if prior is not None:
            logit = logit + prior
        keep = logit >= lim[r_all][:, None]
        if prior is not None:
            keep &= torch.isfinite(prior)
        r, c = torch.nonzero(keep, as_tuple=True)
        if r.numel() == 0:
            continue
        exact_logit = -_pair_sqdist(xr, y, mr, r, c, plan.shift) * inv[r]
        if prior is not None:
            exact_logit = exact_logit + _prior_at(prior, r, c)
        sub.add_pairs(which[r], exact_logit, y[c])
        if first.logits is not None:
            first.logits[r_all[r], c + lo] = exact_logit


def _nearest_limit(q: _Queries, src: Source, plan: _Plan, rows: Tensor,
                   log_prior: Tensor | None) -> tuple[_LogSumExp, Tensor, list[tuple]]:
    """The ``sigma -> 0`` limit for ``rows``: the exact smallest admissible distance of each
    row (over every process) and a log-sum-exp of the priors (0 without) of the centres at
    exactly that distance. Returns the accumulator, the exact minimum squared distances and
    the tied ``(row position, local centre, prior logit)`` triples (for the weights)."""
    x, m = q.x[rows], q.m[rows]
    R, d = x.shape
    err = torch.zeros(R, dtype=x.dtype, device=x.device)
    if not plan.direct:
        err = _matmul_error(x, src.raw_norm_max(q.x), m)

    def distances(lo: int, y: Tensor, yy: Tensor) -> tuple[Tensor, Tensor | None]:
        prior = _prior_chunk(log_prior, lo, lo + y.shape[0], rows)
        dist = plan.sqdist(q, rows, y, yy)
        if prior is not None:
            dist = torch.where(torch.isfinite(prior), dist, torch.full_like(dist, math.inf))
        return dist, prior

    approx_min = torch.full((R,), math.inf, dtype=x.dtype, device=x.device)
    for lo, y, yy in plan.chunks(src, q.x):
        approx_min = torch.minimum(approx_min, distances(lo, y, yy)[0].min(dim=1).values)
    all_reduce(approx_min, src.group, "min")
    window = approx_min + 2 * err
    found: list[tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]] = []
    exact_min = torch.full((R,), math.inf, dtype=x.dtype, device=x.device)
    for lo, y, yy in plan.chunks(src, q.x):
        dist, prior = distances(lo, y, yy)
        r, c = torch.nonzero(dist <= window[:, None], as_tuple=True)
        if r.numel() == 0:
            continue
        exact = dist[r, c] if plan.direct else _pair_sqdist(x, y, m, r, c, plan.shift)
        exact_min.scatter_reduce_(0, r, exact, reduce="amin")
        found.append((r, c + lo, exact, y[c], _prior_at(prior, r, c) if prior is not None
                      else None))
    all_reduce(exact_min, src.group, "min")
    acc = _LogSumExp(R, d, x)
    ties: list[tuple] = []
    for r, c, exact, yc, prior in found:
        tie = exact == exact_min[r]
        logit = torch.zeros_like(exact) if prior is None else prior
        acc.add_pairs(r[tie], logit[tie], yc[tie])
        ties.append((r[tie], c[tie], logit[tie]))
    acc.merge(src.group)
    return acc, exact_min, ties


def _weights(first: _FirstPass, mx: Tensor, sm: Tensor, group: Any) -> Tensor:
    """Normalised weights ``exp(l - max) / sum`` of every centre, gathered over the group."""
    assert first.logits is not None
    w = _exp(first.logits - _finite_or_zero(mx)[:, None]) / sm[:, None]
    return all_gather(w, group, dim=1)


def gaussian_mixture(
    x: Tensor,
    centres: Tensor | Centres,
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

    The phases: :func:`_stream_first_pass` (streamed log-sum-exp, shortlist, merged over the
    process group), on the matrix-product path :func:`_rows_to_refine` and
    :func:`_refine_rows` (shortlist or :func:`_second_pass`), the ``sigma -> 0`` limit rows
    by :func:`_nearest_limit`, and the weights.

    Args:
        x: queries, ``(B, d)``.
        centres: a :class:`diffmem.centres.Centres` (centred, streamed, possibly split over
            processes), or the training points ``y_n`` as a ``(N, d)`` tensor of ``x``'s
            dtype and device.
        m: mean scale per query, ``(B,)``.
        sigma2: variance per query, ``(B,)``, ``>= 0``.
        log_prior: optional log prior weights over this process's centres, ``(N,)`` or
            ``(B, N)`` (``-inf`` excludes; each row needs a finite entry).
        centres_sqnorm: optional cached ``|y_n|^2`` (tensor centres).
        offset: optional ``(d,)`` vector ``c`` when tensor ``centres`` hold ``y_n - c``
            (a :class:`Centres` carries its own); the queries are shifted by ``m c`` and
            ``mean`` is returned for the true ``y_n``.
        chunk_size: centres processed at once.
        return_weights: also return the ``(B, N)`` weights (every process's centres).
        force_matmul: use the matrix-product path even for small problems (for tests).
    """
    src = centres if isinstance(centres, Centres) else _TensorCentres(centres, centres_sqnorm,
                                                                      offset)
    q = _Queries.build(x, m, sigma2, src.offset)
    plan = _Plan.build(q, src, chunk_size, force_matmul)
    first = _stream_first_pass(q, src, plan, log_prior, return_weights)
    mx, sm, vec = first.acc.state()
    # rows in the sigma -> 0 limit, and rows whose every logit underflowed
    underflow = torch.isneginf(mx)
    any_limit = q.any_limit or bool(underflow.any())
    limit = q.limit | underflow if any_limit else q.limit
    if plan.keep_top:
        refine, lim = _rows_to_refine(q, plan, first)
        refine &= ~limit
        if bool(refine.any()):
            rows = torch.nonzero(refine).squeeze(1)
            sub = _refine_rows(q, src, plan, first, rows, lim, log_prior)
            sub.merge(src.group)
            s_max, s_sum, s_vec = sub.state()
            mx[rows], sm[rows], vec[rows] = s_max, s_sum, s_vec
    log_norm = mx + torch.log(sm)
    if any_limit:
        rows = torch.nonzero(limit).squeeze(1)
        near, dist0, ties = _nearest_limit(q, src, plan, rows, log_prior)
        n_max, n_sum, n_vec = near.state()
        mx[rows], sm[rows], vec[rows] = n_max, n_sum, n_vec
        log_norm[rows] = torch.where(dist0 == 0, n_max + torch.log(n_sum),
                                     torch.full_like(n_max, -math.inf))
        if first.logits is not None:
            first.logits[rows] = -math.inf
            for r, c, logit in ties:
                first.logits[rows[r], c] = logit
    mean = vec / sm[:, None]
    if src.offset is not None and plan.shift is None:  # centred rows: add the centre back
        mean = mean + src.offset.to(dtype=mean.dtype, device=mean.device)[None, :]
    weights = _weights(first, mx, sm, src.group) if return_weights else None
    return Mixture(log_norm=log_norm, mean=mean, weights=weights)


def knn(x: Tensor, y: Tensor | Centres, k: int = 1, chunk_size: int = 4096,
        exact: int | None = None, shortlist: str = "torch") -> tuple[Tensor, Tensor]:
    """Exact ``k`` nearest rows of ``y`` (``(N, d)``, or a :class:`Centres`, possibly split
    over processes) for each row of ``x`` (``(B, d)``).

    Returns ``(squared_distances, indices)``, both ``(B, k)`` (global indices), sorted
    ascending (ties by index). Large problems shortlist candidates with matrix products and
    recompute their distances exactly; a row whose shortlist cannot be certified is
    recomputed from exact differences. With ``exact = m < k`` only the first ``m`` are
    certified exact and the rest keep matrix-product distances (cheaper for large ``k``).
    With a process group each process finds its block's ``k`` nearest, and the blocks'
    candidates are merged. ``shortlist='faiss'`` finds the candidates with faiss's float32
    matrix-product kernel (``faiss.knn`` on centred chunks; CPU only) instead of torch's:
    the certification against the float32 error bound, and so the result, is the same.
    """
    if shortlist not in ("torch", "faiss"):
        raise ValueError(f"shortlist: expected 'torch' or 'faiss', received {shortlist!r}")
    if isinstance(y, Centres):
        src: Source = y
        xs = x - y.offset.to(dtype=x.dtype, device=x.device)[None, :]
    else:
        centre = y.mean(0, keepdim=True)  # distances are translation invariant; centring
        src = _TensorCentres(y - centre, None, None)  # cuts the matrix-product round-off
        xs = x - centre
    B, d = xs.shape
    k_total = min(k, src.n_total)
    best_d, best_i = _knn_block(xs, src, min(k_total, src.n), chunk_size, exact, shortlist)
    best_i = best_i + src.start
    if src.group is not None:
        best_d = all_gather(best_d, src.group, dim=1)
        best_i = all_gather(best_i, src.group, dim=1)
        by_index = torch.argsort(best_i, dim=1, stable=True)
        best_d, best_i = torch.gather(best_d, 1, by_index), torch.gather(best_i, 1, by_index)
        order = torch.argsort(best_d, dim=1, stable=True)[:, :k_total]
        best_d, best_i = torch.gather(best_d, 1, order), torch.gather(best_i, 1, order)
    return best_d, best_i


def _knn_block(x: Tensor, src: Source, k: int, chunk_size: int,
               exact: int | None = None, shortlist: str = "torch") -> tuple[Tensor, Tensor]:
    """The ``k`` nearest of this process's centres (local indices), the first ``exact``
    (all by default) certified exact; ``x`` is centred like the source's centred rows.

    Small problems stream exact differences. Large ones keep, per row, the
    ``max(k, exact + 8)`` best candidates by matrix-product distance (torch's, or faiss's
    float32 kernel); those whose distance lies within ``3 err`` of the ``exact``-th (at
    most ``exact + 8``, the same number for every row) get exact distances (gathered once
    at the end) and the ``exact`` best exact ones are certified against the
    matrix-product error bound (a row that cannot be certified is recomputed from exact
    differences). Positions beyond
    ``exact`` keep their matrix-product distances (absolute error below the bound of
    :func:`_matmul_error`)."""
    B, d = x.shape
    N = src.n
    exact = k if exact is None else min(exact, k)
    if k == 0 or B == 0:
        return (torch.empty(B, k, dtype=x.dtype, device=x.device),
                torch.empty(B, k, dtype=torch.long, device=x.device))
    ones = torch.ones(B, dtype=x.dtype, device=x.device)
    if B * min(N, chunk_size) * d <= DIRECT_BUDGET:
        return _knn_exact(x, src, k, chunk_size)
    keep = min(N, max(k, exact + 8))  # the exact + 8 re-ranked, the rest up to k as they are
    if shortlist == "faiss" and x.device.type == "cpu":
        best_a, best_i = _faiss_shortlist(x, src, keep, chunk_size)
        bound_x = x.to(torch.float32)  # faiss's products are float32
    else:
        best_a, best_i = _torch_shortlist(x, src, keep, chunk_size)
        bound_x = x
    err = _matmul_error(bound_x, src.raw_norm_max(bound_x), ones.to(bound_x)).to(x)
    # re-rank the candidates that can still be among the exact nearest (approximate
    # distance within 3 err of the exact-th: usually exact + 1), at most exact + 8
    near = (best_a <= best_a[:, exact - 1 : exact] + 3 * err[:, None]).sum(1)
    window = min(keep, exact + 8, int(near.max()) + 1)
    cand = torch.sort(best_i[:, :window], dim=1).values  # by index: ties keep index order
    exact_d = torch.empty(B, window, dtype=x.dtype, device=x.device)
    block = max(1, DIRECT_BUDGET // (window * d))  # bounded (rows, candidates, d)
    for lo in range(0, B, block):
        rows = slice(lo, lo + block)
        exact_d[rows] = (x[rows, None, :] - src.take(cand[rows], x)).pow(2).sum(-1)
    order = torch.argsort(exact_d, dim=1, stable=True)
    best_d = torch.cat([torch.gather(exact_d, 1, order), best_a[:, window:]], 1)[:, :k]
    best_idx = torch.cat([torch.gather(cand, 1, order), best_i[:, window:]], 1)[:, :k]
    if window < N:
        unsure = best_d[:, exact - 1] + 2 * err > best_a[:, window - 1]
        if bool(unsure.any()):
            rows = torch.nonzero(unsure).squeeze(1)
            best_d[rows], best_idx[rows] = _knn_exact(x[rows], src, k, chunk_size)
    return best_d, best_idx


def _torch_shortlist(x: Tensor, src: Source, keep: int,
                     chunk_size: int) -> tuple[Tensor, Tensor]:
    """The ``keep`` smallest matrix-product squared distances ``|x - y_n|^2`` of each row
    (ascending) and their local indices, streamed over the source's chunks."""
    B = x.shape[0]
    shift = None if src.raw_shift is None else src.raw_shift.to(dtype=x.dtype, device=x.device)
    # rank by |y_c|^2 - 2 x.y (one fused matrix product per chunk); the row constant
    # |x|^2 + 2 x.s (s the rows' shift) is added to the kept values only
    row = x.pow(2).sum(1) if shift is None else x.pow(2).sum(1) + 2 * (x @ shift)
    best_a = torch.empty(B, 0, dtype=x.dtype, device=x.device)
    best_i = torch.empty(B, 0, dtype=torch.long, device=x.device)
    for lo, y, yy in src.raw_chunks(chunk_size, x):  # uncentred rows
        partial = torch.addmm(yy[None, :], x, y.T, alpha=-2)
        best_a, best_i = _merge_smallest(best_a, best_i, partial, lo, keep)
    return (best_a + row[:, None]).clamp_min_(0), best_i


def _faiss_shortlist(x: Tensor, src: Source, keep: int,
                     chunk_size: int) -> tuple[Tensor, Tensor]:
    """As :func:`_torch_shortlist`, by ``faiss.knn`` (float32 ``|x|^2 + |y|^2 - 2 x.y``):
    in one call on the stored rows when the source holds them as one float32 array (an
    in-memory tensor, a float32 memory-map: no copy, the queries uncentred), else on centred
    chunks of at least ``2^24`` values. The matrix-product error bound of :func:`_knn_block`
    (``|x_c| + max |y_n| + |c|``) covers both. Distances returned in ``x``'s dtype."""
    import faiss

    B, d = x.shape
    like = x.to(torch.float32)
    whole = src.float32_rows()
    if whole is not None:
        xq = like if src.raw_shift is None else like + src.raw_shift.to(like)
        dist, idx = faiss.knn(np.ascontiguousarray(xq.numpy()), whole, min(keep, src.n))
        return (torch.from_numpy(dist).to(x.dtype).clamp_min_(0),
                torch.from_numpy(idx.astype(np.int64)))
    xq = np.ascontiguousarray(like.numpy())
    step = max(chunk_size, (1 << 24) // max(1, d))
    best_a = torch.empty(B, 0, dtype=torch.float32)
    best_i = torch.empty(B, 0, dtype=torch.long)
    shift = None if src.raw_shift is None else src.raw_shift.to(like)
    centred = None if shift is None else torch.empty(min(step, src.n), d)
    for lo, y, _ in src.raw_chunks(step, like):  # uncentred, then centred once (no norms)
        hi = lo + y.shape[0]
        yc = y if centred is None else torch.sub(y, shift, out=centred[: hi - lo])
        dist, idx = faiss.knn(xq, np.ascontiguousarray(yc.numpy()), min(keep, hi - lo))
        part = torch.from_numpy(dist)
        best_a, best_i = _merge_smallest(best_a, best_i, part, lo, keep,
                                         torch.from_numpy(idx.astype(np.int64)))
    return best_a.to(x.dtype).clamp_min_(0), best_i


def _merge_smallest(best_a: Tensor, best_i: Tensor, values: Tensor, lo: int, keep: int,
                    index: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Merge a chunk's ``values`` (all its columns, or, with ``index``, its own shortlist
    with local column ``index``) into the running ``keep`` smallest, indices offset by
    ``lo``."""
    if index is None:
        part = torch.topk(values, min(keep, values.shape[1]), dim=1, largest=False, sorted=True)
        values, index = part.values, part.indices
    cat_a = torch.cat([best_a, values], 1)
    cat_i = torch.cat([best_i, index + lo], 1)
    top = torch.topk(cat_a, min(keep, cat_a.shape[1]), dim=1, largest=False, sorted=True)
    return top.values, torch.gather(cat_i, 1, top.indices)


def _knn_exact(x: Tensor, src: Source, k: int, chunk_size: int) -> tuple[Tensor, Tensor]:
    """The ``k`` nearest from exact differences, streamed in bounded chunks."""
    rows, d = x.shape
    best_d = torch.empty(rows, 0, dtype=x.dtype, device=x.device)
    best_i = torch.empty(rows, 0, dtype=torch.long, device=x.device)
    step = max(1, min(chunk_size, DIRECT_BUDGET // max(1, rows * d)))
    one = torch.ones(rows, dtype=x.dtype, device=x.device)
    for lo in range(0, src.n, step):
        hi = min(src.n, lo + step)
        yc, _ = src.chunk(lo, hi, x)
        dist = _direct_sqdist(x, yc, one)
        idx = torch.arange(lo, hi, device=x.device).expand(rows, -1)
        cat_d, cat_i = torch.cat([best_d, dist], 1), torch.cat([best_i, idx], 1)
        top = torch.topk(cat_d, min(k, cat_d.shape[1]), dim=1, largest=False, sorted=True)
        best_d, best_i = top.values, torch.gather(cat_i, 1, top.indices)
    return best_d, best_i
