"""Batched adaptive Dormand--Prince 5(4) with a step size per sample.

Every sample of the batch carries its own time, step size and error control: a stiff
trajectory shrinks only its own step, finished samples leave the batch, and all work is
vectorized over the samples still running (on whatever device the tensors live). torchode
does the same; this implementation has far less per-step overhead, which dominates for the
small, cheap right-hand sides of the paper's experiments (measured in
``benchmarks/bench_core.py``; torchode stays available as ``method='rk45-torchode'``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Rhs = Callable[[Tensor, Tensor, Tensor], Tensor]

# Dormand & Prince (1980) tableau; B5 is the propagated 5th-order solution (FSAL), E = B5 - B4.
_A = (
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
)
_C = (1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)


@dataclass
class OdeSolution:
    """Final states ``y`` ``(B, d)``, recorded states ``(B, n, d)`` (or ``None``), and per-sample
    counts of attempted and accepted steps."""

    y: Tensor
    recorded: Tensor | None
    steps: Tensor
    accepted: Tensor


def _norm(v: Tensor, scale: Tensor) -> Tensor:
    """RMS norm of ``v / scale`` over the state dimension (one value per sample)."""
    return torch.sqrt(torch.mean((v / scale) ** 2, dim=1))


def _hermite(y0: Tensor, f0: Tensor, y1: Tensor, f1: Tensor, h: Tensor, theta: Tensor) -> Tensor:
    """Cubic Hermite interpolation on a step (4th-order accurate dense output)."""
    th = theta[:, None]
    h = h[:, None]
    h00 = (1 + 2 * th) * (1 - th) ** 2
    h10 = th * (1 - th) ** 2
    h01 = th * th * (3 - 2 * th)
    h11 = th * th * (th - 1)
    return h00 * y0 + h10 * h * f0 + h01 * y1 + h11 * h * f1


def dopri5(
    fn: Rhs,
    y0: Tensor,
    start: float,
    end: float,
    rtol: float,
    atol: float,
    record: Tensor | None = None,
    max_steps: int = 100_000,
) -> OdeSolution:
    """Integrate ``dy/dtau = fn(tau, y, rows)`` from ``start`` to ``end`` for each row of
    ``y0`` (``(B, d)``; ``fn`` receives ``tau`` of shape ``(b,)``, the ``(b, d)`` states still
    running and their indices ``rows`` in the batch, for per-sample data such as a
    conditioning). Local error control per sample: a step is accepted when the RMS over the
    components of ``err / (atol + rtol max(|y_n|, |y_n+1|))`` is at most 1, and the next step
    is ``h * clip(0.9 err^-1/5, 0.2, 10)`` (at most ``h`` after a rejection). ``record``
    (``(n,)``, between ``start`` and ``end``) returns the states there by cubic Hermite
    interpolation.
    """
    B = y0.shape[0]
    dev, dt = y0.device, y0.dtype
    direction = 1.0 if end > start else -1.0
    t = torch.full((B,), float(start), dtype=torch.float64, device=dev)
    y = y0.clone()
    everyone = torch.arange(B, device=dev)
    f = fn(t.to(dt), y, everyone)
    h = _initial_step(fn, t, y, f, everyone, direction, abs(end - start), rtol, atol)
    rec, recorded = _recording(record, y0, start)
    tableau = _Tableau(dt, dev)
    end_t = torch.tensor(float(end), dtype=torch.float64, device=dev)
    steps = torch.zeros(B, dtype=torch.long, device=dev)
    accepted = torch.zeros(B, dtype=torch.long, device=dev)
    # The samples still running, kept compact: their rows ``active`` in the batch and their
    # time, state, derivative, next step, last-step-rejected flag and step counts.
    active, ta, ya, fa, ha = everyone, t, y, f, h
    rej = torch.zeros(B, dtype=torch.bool, device=dev)
    n_steps = torch.zeros(B, dtype=torch.long, device=dev)
    n_acc = torch.zeros(B, dtype=torch.long, device=dev)
    iteration = 0
    while active.numel():
        iteration += 1
        remaining = (end - ta) * direction
        last = ha >= remaining
        hstep = torch.where(last, remaining, ha)
        y_new, f_new, t_new, err = tableau.step(fn, ta, ya, fa, hstep, last, active,
                                                direction, end_t)
        err_norm = _norm(err, atol + rtol * torch.maximum(ya.abs(), y_new.abs()))
        err_norm = err_norm.to(torch.float64)
        ok = err_norm <= 1.0
        factor = (0.9 * err_norm.clamp_min(1e-300) ** -0.2).clamp(0.2, 10.0)
        factor = torch.where(ok & rej, factor.clamp(max=1.0), factor)
        n_steps += 1
        if rec is not None and bool(ok.any()):
            assert recorded is not None
            _record(recorded, rec, active, ok, ta, t_new, ya, fa, y_new, f_new, hstep,
                    direction)
        ok_col = ok[:, None]
        ta = torch.where(ok, t_new, ta)
        ya = torch.where(ok_col, y_new, ya)
        fa = torch.where(ok_col, f_new, fa)
        n_acc += ok
        ha = hstep * factor
        rej = ~ok
        done = ok & last
        if bool(done.any()):
            fin = active[done]
            y[fin], steps[fin], accepted[fin] = ya[done], n_steps[done], n_acc[done]
            keep = ~done
            active, ta, ya, fa, ha = active[keep], ta[keep], ya[keep], fa[keep], ha[keep]
            rej, n_steps, n_acc = rej[keep], n_steps[keep], n_acc[keep]
        # Every running sample has taken exactly ``iteration`` steps.
        if active.numel() and iteration >= max_steps:
            raise RuntimeError(f"rk45: {active.numel()} of {B} trajectories did not reach "
                               f"the end after max_steps = {max_steps} steps; raise max_steps "
                               "or loosen rtol/atol")
    return OdeSolution(y=y, recorded=recorded, steps=steps, accepted=accepted)


def _recording(record: Tensor | None, y0: Tensor, start: float) -> tuple[Tensor | None,
                                                                         Tensor | None]:
    """The recording points (float64) and the states there, NaN until reached (the
    starting states at a point at ``start``)."""
    if record is None:
        return None, None
    rec = record.to(device=y0.device, dtype=torch.float64)
    recorded = torch.full((y0.shape[0], rec.shape[0], y0.shape[1]), float("nan"),
                          dtype=y0.dtype, device=y0.device)
    recorded[:, rec == start] = y0[:, None, :]
    return rec, recorded


def _initial_step(fn: Rhs, t: Tensor, y: Tensor, f: Tensor, everyone: Tensor,
                  direction: float, span: float, rtol: float, atol: float) -> Tensor:
    """The first step of each sample (Hairer, Norsett & Wanner, II.4), at most ``span``."""
    dt = y.dtype
    scale = atol + rtol * y.abs()
    d0, d1 = _norm(y, scale), _norm(f, scale)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
    h0 = torch.clamp(h0.to(torch.float64), max=span)
    f1 = fn((t + direction * h0).to(dt), y + (direction * h0).to(dt)[:, None] * f, everyone)
    d2 = _norm(f1 - f, scale).to(torch.float64) / h0
    big = torch.maximum(d1.to(torch.float64), d2)
    h1 = torch.where(big <= 1e-15, torch.clamp(h0 * 1e-3, min=1e-6), (0.01 / big) ** 0.2)
    return torch.clamp(torch.minimum(100 * h0, h1), max=span)


class _Tableau:
    """Dormand-Prince's coefficients on a device and dtype, and one step with them."""

    def __init__(self, dt: torch.dtype, dev: torch.device) -> None:
        self.dt = dt
        self.b5 = torch.tensor(_B5, dtype=dt, device=dev)
        self.e = torch.tensor(_E, dtype=dt, device=dev)
        self.rows = [torch.tensor(row, dtype=dt, device=dev) for row in _A]

    def step(self, fn: Rhs, ta: Tensor, ya: Tensor, fa: Tensor, hstep: Tensor, last: Tensor,
             active: Tensor, direction: float,
             end_t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The fifth-order state, its derivative (the FSAL stage), its time and the error
        estimate of one step ``hstep`` from ``(ta, ya)``."""
        dt = self.dt
        hs = (direction * hstep).to(dt)[:, None]
        # Stages k_1..k_7 in one buffer; each stage state is y + h sum_j a_ij k_j.
        ks = torch.empty(7, *ya.shape, dtype=dt, device=ya.device)
        ks[0] = fa
        for i, (c, row) in enumerate(zip(_C, self.rows, strict=True), start=1):
            yi = torch.addcmul(ya, hs, torch.tensordot(row, ks[:i], dims=1))
            ks[i] = fn((ta + direction * c * hstep).to(dt), yi, active)
        y_new = torch.addcmul(ya, hs, torch.tensordot(self.b5, ks[:6], dims=1))
        t_new = torch.where(last, end_t, ta + direction * hstep)
        ks[6] = fn(t_new.to(dt), y_new, active)
        return y_new, ks[6], t_new, hs * torch.tensordot(self.e, ks, dims=1)


def _record(recorded: Tensor, rec: Tensor, active: Tensor, ok: Tensor, ta: Tensor,
            t_new: Tensor, ya: Tensor, fa: Tensor, y_new: Tensor, f_new: Tensor,
            hstep: Tensor, direction: float) -> None:
    """The states at the recording points each accepted step crossed, by cubic Hermite
    interpolation, written into ``recorded``."""
    lo, hi = direction * ta[ok], direction * t_new[ok]
    r = direction * rec
    inside = (r[None, :] > lo[:, None]) & (r[None, :] <= hi[:, None])
    rows, cols = torch.nonzero(inside, as_tuple=True)
    if rows.numel():
        theta = (r[cols] - lo[rows]) / (hi[rows] - lo[rows])
        sub = ok.nonzero().squeeze(1)[rows]
        dt = ya.dtype
        recorded[active[ok][rows], cols] = _hermite(
            ya[sub], fa[sub], y_new[sub], f_new[sub], (direction * hstep[sub]).to(dt),
            theta.to(dt))
