"""A fixed set of mixture-kernel inputs covering every phase, the kernel's outputs on them,
and an independent reference: the definition evaluated in extended precision, with the
kernel's error bound for each row (the tolerance of ``tests/test_mixture.py``).

The bound comes from the computation, not from one machine's bits: the logit error of exact
differences (their rounding, computed here: IEEE products and differences round alike on
every CPU; the sum of squares in any order: ``(d + 5) eps |x - m y|^2``), or of matrix
products (the kernel's own ``_matmul_error``), divided by ``2 sigma^2``; then how a logit
error ``delta`` moves a softmax (relative weights by ``exp(2 delta) - 1``), its normaliser and
its mean, plus the sums' round-off (``N eps``)."""

from __future__ import annotations

import math

import numpy as np
import torch

from diffmem.mixture import DIRECT_BUDGET, LOGIT_WINDOW, _matmul_error, refine_tolerance


def cases() -> list[dict]:
    """Inputs covering every phase: direct and matrix-product streaming, shortlist refinement,
    the second streamed pass, ``sigma = 0`` rows, priors of both shapes, float32/float64."""
    gen = torch.Generator().manual_seed(123)
    out = []

    def add(name, x, y, m, s2, **kw):
        out.append({"name": name, "x": x, "centres": y, "m": m, "sigma2": s2, **kw})

    for dtype in (torch.float64, torch.float32):
        y = torch.randn(20, 2, generator=gen, dtype=torch.float64).to(dtype)
        x = torch.randn(7, 2, generator=gen, dtype=torch.float64).to(dtype)
        m = torch.full((7,), 0.8, dtype=dtype)
        s2 = torch.tensor([1.0, 0.1, 1e-3, 1e-6, 0.0, 0.5, 0.0], dtype=dtype)
        add(f"direct-2d-{dtype}", x, y, m, s2, return_weights=True)
        add(f"direct-2d-chunked-{dtype}", x, y, m, s2, chunk_size=3, return_weights=True)
        prior = torch.zeros(20, dtype=dtype)
        prior[::3] = -math.inf
        add(f"direct-prior1d-{dtype}", x, y, m, s2, log_prior=prior, return_weights=True)
        prior2 = -torch.rand(7, 20, generator=gen, dtype=torch.float64).to(dtype) * 5
        prior2[:, :10] = -math.inf
        add(f"direct-prior2d-{dtype}", x, y, m, s2, log_prior=prior2)
        yb = 100 + torch.randn(300, 16, generator=gen, dtype=torch.float64)
        xb = yb[:12] + 1e-3 * torch.randn(12, 16, generator=gen, dtype=torch.float64)
        xb[0] = 0.5 * (yb[0] + yb[1])
        mb = torch.ones(12, dtype=torch.float64)
        s2b = torch.tensor([1e-6] * 6 + [1e-2, 1.0, 0.0, 10.0, 1e-4, 0.0], dtype=torch.float64)
        add(f"matmul-shortlist-{dtype}", xb.to(dtype), yb.to(dtype), mb.to(dtype),
            s2b.to(dtype), force_matmul=True, chunk_size=64, return_weights=True)
        # many near-equidistant centres: windows wider than the 16-candidate shortlist
        yc = 50 + 1e-3 * torch.randn(200, 8, generator=gen, dtype=torch.float64)
        xc = 50 + 1e-3 * torch.randn(9, 8, generator=gen, dtype=torch.float64)
        s2c = torch.tensor([1e-4, 1e-5, 1e-6, 0.0, 1e-3, 1e-2, 1e-7, 0.0, 1e-5],
                           dtype=torch.float64)
        add(f"matmul-second-pass-{dtype}", xc.to(dtype), yc.to(dtype),
            torch.ones(9, dtype=dtype), s2c.to(dtype), force_matmul=True, chunk_size=50,
            return_weights=True)
        priorc = torch.zeros(200, dtype=dtype)
        priorc[1::2] = -math.inf
        add(f"matmul-second-pass-prior-{dtype}", xc.to(dtype), yc.to(dtype),
            torch.ones(9, dtype=dtype), s2c.to(dtype), force_matmul=True, chunk_size=50,
            log_prior=priorc)
        priorc2 = -3 * torch.rand(9, 200, generator=gen, dtype=torch.float64).to(dtype)
        priorc2[:, :100] = -math.inf
        add(f"matmul-second-pass-prior2d-{dtype}", xc.to(dtype), yc.to(dtype),
            torch.ones(9, dtype=dtype), s2c.to(dtype), force_matmul=True, chunk_size=50,
            log_prior=priorc2, return_weights=True)
        priorb2 = -torch.rand(12, 300, generator=gen, dtype=torch.float64).to(dtype)
        add(f"matmul-shortlist-prior2d-{dtype}", xb.to(dtype), yb.to(dtype), mb.to(dtype),
            s2b.to(dtype), force_matmul=True, chunk_size=64, log_prior=priorb2)
        yd = torch.rand(400, 256, generator=gen, dtype=torch.float64)
        xd = yd[:16] + 1e-6 * torch.randn(16, 256, generator=gen, dtype=torch.float64)
        add(f"matmul-images-{dtype}", xd.to(dtype), yd.to(dtype),
            torch.ones(16, dtype=dtype), torch.full((16,), 1e-8, dtype=dtype),
            chunk_size=128)
        off = yd.mean(0)
        add(f"matmul-offset-{dtype}", (xd - off).to(dtype), (yd - off).to(dtype),
            torch.full((16,), 0.9, dtype=dtype), torch.logspace(-8, 0, 16).to(dtype),
            offset=off.to(dtype), chunk_size=256)
    return out


def outputs(case: dict) -> dict:
    from diffmem.mixture import gaussian_mixture

    kw = {k: v for k, v in case.items() if k not in {"name", "x", "centres", "m", "sigma2"}}
    mix = gaussian_mixture(case["x"], case["centres"], case["m"], case["sigma2"], **kw)
    res = {"log_norm": mix.log_norm, "mean": mix.mean}
    if mix.weights is not None:
        res["weights"] = mix.weights
    return res


#: The reference's float type: x87 extended precision on x86 (eps 1.1e-19), quadruple on
#: aarch64 Linux, float64 where ``long double`` is double (its error is bounded too).
REF = np.longdouble


def _np(t: torch.Tensor, dtype: type = REF) -> np.ndarray:
    return t.detach().numpy().astype(dtype)


def reference(case: dict) -> dict:
    """The definition in extended precision: ``l_bn = log_prior_bn - |x_b - m_b y_n|^2 /
    (2 sigma_b^2)`` with the true centres ``y_n (+ offset)``, ``log_norm = logsumexp_n l``,
    ``weights = softmax_n l``, ``mean = sum_n w_n y_n``; rows with ``sigma^2`` below the
    dtype's smallest normal number take the ``sigma -> 0`` limit (equal prior-weighted
    weights on the nearest centres; ``log_norm = log sum pi`` over centres at distance 0,
    else ``-inf``)."""
    x, y, m, s2 = (_np(case[k]) for k in ("x", "centres", "m", "sigma2"))
    if case.get("offset") is not None:
        y = y + _np(case["offset"])
    B, N = x.shape[0], y.shape[0]
    dist = ((x[:, None, :] - m[:, None, None] * y[None]) ** 2).sum(-1)
    prior = np.zeros((B, N), dtype=REF)
    if case.get("log_prior") is not None:
        prior = prior + _np(case["log_prior"])
    limit = _np(case["sigma2"], np.float64) < torch.finfo(case["x"].dtype).tiny
    with np.errstate(divide="ignore", invalid="ignore"):
        logits = prior - dist / (2 * np.where(limit, 1, s2))[:, None]
        admissible = np.isfinite(prior)
        nearest = np.where(admissible, dist, np.inf).min(1)
        tied = admissible & (dist == nearest[:, None])
        logits[limit] = np.where(tied[limit], prior[limit], -np.inf)
        top = logits.max(1)
        p = np.exp(logits - top[:, None])
        total = p.sum(1)
        log_norm = top + np.log(total)
        log_norm[limit & (nearest > 0)] = -np.inf
    w = p / total[:, None]
    return {"log_norm": log_norm, "mean": w @ y, "weights": w, "logits": logits}


def _logit_error(case: dict, eps: float, rounded: np.ndarray | None) -> np.ndarray:
    """``(B, N)`` bound on the logit error of exact differences ``x - m y`` whose computed
    values are ``rounded`` (``None``: the reference's own arithmetic)."""
    x, y, m, s2 = (_np(case[k]) for k in ("x", "centres", "m", "sigma2"))
    if case.get("offset") is not None:
        y = y + _np(case["offset"])
    exact = x[:, None, :] - m[:, None, None] * y[None]
    diff = exact if rounded is None else rounded
    rho = np.zeros(diff.shape[:2], dtype=REF) if rounded is None else \
        np.sqrt(((rounded - exact) ** 2).sum(-1))
    if rounded is None:  # the reference's own products and differences: 2 eps each
        rho = 2 * eps * np.sqrt(((np.abs(x)[:, None, :] + np.abs(m)[:, None, None]
                                  * np.abs(y)[None]) ** 2).sum(-1))
    sq = (diff ** 2).sum(-1)
    d = x.shape[1]
    denom = 2 * np.maximum(s2, np.finfo(REF).tiny)[:, None]
    err = ((d + 5) * eps * sq + 2 * np.sqrt(sq) * rho + rho ** 2) / denom
    if case.get("log_prior") is not None:
        err = err + eps * np.abs(np.nan_to_num(_np(case["log_prior"]), neginf=0))
    return err


def _kernel_differences(case: dict) -> np.ndarray:
    """``x - m y`` exactly as the kernel rounds it, in the case's dtype: ``x - m c`` first
    when the centres are centred by an offset ``c``."""
    dt = np.float64 if case["x"].dtype == torch.float64 else np.float32
    x, y, m = (_np(case[k], dt) for k in ("x", "centres", "m"))
    if case.get("offset") is not None:
        x = x - m[:, None] * _np(case["offset"], dt)[None, :]
    return (x[:, None, :] - (m[:, None, None] * y[None])).astype(REF)


def tolerances(case: dict, ref: dict) -> dict:
    """Per-entry tolerances of the kernel's outputs around :func:`reference`.

    With a logit error of at most ``delta_bn`` (the kernel's bound plus the reference's), a
    weight ``w_n = 1 / sum_k exp(l_k - l_n)`` lies between ``1 / sum_k exp(l_k - l_n +- (delta_k
    + delta_n))`` (the ``k = n`` term is exactly 1: a dominant centre's own error cancels),
    ``log_norm`` between ``logsumexp(l -+ delta)``, and the mean moves by at most ``sum_n
    |dw_n| |y_n - mean|``; the sums' round-off adds ``N eps`` relative, and centres dropped
    below the refinement window (relative weight under ``e^-40``) an absolute ``e^-40``."""
    x, y = case["x"], case["centres"]
    B, d = x.shape
    N = y.shape[0]
    eps = torch.finfo(x.dtype).eps
    limit = _np(case["sigma2"], np.float64) < torch.finfo(x.dtype).tiny
    exact_err = _logit_error(case, eps, _kernel_differences(case))
    s2 = np.maximum(_np(case["sigma2"]), np.finfo(REF).tiny)
    direct = not case.get("force_matmul") and \
        B * min(N, case.get("chunk_size", 4096)) * d <= DIRECT_BUDGET
    err = exact_err
    if not direct:  # matrix products, unless the row is certainly refined to exact differences
        xq = x if case.get("offset") is None else \
            x - case["m"][:, None] * case["offset"][None, :]
        r_max = y.pow(2).sum(1).max().sqrt()
        mm = _np(_matmul_error(xq, r_max, case["m"]))
        mm_logit = mm / (2 * s2)
        dmin = ((_kernel_differences(case)) ** 2).sum(-1).min(1)
        intrinsic = mm / _np((xq.norm(dim=1) + case["m"].abs() * r_max) ** 2) * dmin
        refined = (mm_logit > 2 * refine_tolerance(x.dtype)) & (mm > 32 * intrinsic)
        err = np.where(refined[:, None], exact_err, np.maximum(exact_err, mm_logit[:, None]))
    delta = err + _logit_error(case, float(np.finfo(REF).eps), None)
    delta[limit] = 0
    logits, w, mean = ref["logits"], ref["weights"], ref["mean"]
    live = np.isfinite(logits)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        gap = np.where(live[:, None, :], logits[:, None, :] - logits[:, :, None], -np.inf)
        pair = delta[:, None, :] + delta[:, :, None]
        pair[:, np.arange(N), np.arange(N)] = 0
        upper = np.where(live, 1 / np.exp(gap - pair).sum(2), 0)
        lower = np.where(live, 1 / np.exp(gap + pair).sum(2), 0)
        top = np.where(live, logits, -np.inf).max(1, keepdims=True)
        ln_hi = np.log(np.exp(np.where(live, logits + delta - top, -np.inf)).sum(1)) + top[:, 0]
        ln_lo = np.log(np.exp(np.where(live, logits - delta - top, -np.inf)).sum(1)) + top[:, 0]
    floor = math.exp(-LOGIT_WINDOW) + 1e4 * torch.finfo(x.dtype).tiny
    dw = np.maximum(upper - w, w - lower) + (2 * N + d + 60) * eps * w + floor
    y_true = _np(y) if case.get("offset") is None else _np(y) + _np(case["offset"])
    spread = np.abs(y_true[None, :, :] - mean[:, None, :])  # (B, N, d)
    log_norm = ref["log_norm"]
    finite_ln = np.nan_to_num(log_norm, neginf=0)
    return {
        "weights": dw,
        "log_norm": np.nan_to_num(np.maximum(ln_hi - finite_ln, finite_ln - ln_lo), nan=0)
        + (N + 4) * eps * (1 + np.abs(finite_ln)),
        "mean": (dw[:, :, None] * spread).sum(1)
        + (N + 4) * eps * (w @ np.abs(_np(y))) + 2 * eps * np.abs(mean),
    }
