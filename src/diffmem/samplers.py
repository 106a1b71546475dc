"""Samplers: pure functions of a schedule, a score and initial noise.

* :func:`sample_ode` integrates the probability-flow ODE ``dx/dt = f(x, t) - g(t)^2 s(x, t) / 2``
  from ``T`` down to ``t_end`` (or to ``s_end`` in transformed time), either in ``t`` or in the
  transformed time ``s = -log sigma(t)``:
  ``dx/ds = (dt/ds) (f - g^2 s / 2)`` with ``dt/ds = -2 sigma^2 / (d sigma^2/dt)``, written with
  ``sigma^2 s`` so that it stays finite as ``sigma -> 0`` (for VE and the empirical score,
  ``dx/ds = D_e(x, t) - x``). :func:`sample_ode_transformed` is the same function with
  ``variable='s'``.
* :func:`sample_sde` runs Euler--Maruyama on the reverse SDE ``dx = [f - g^2 s] dt + g dW``.

The adaptive method (``'rk45'``: Dormand--Prince 5(4), :func:`diffmem.ode.dopri5`) controls
the step of every sample separately, so one stiff trajectory does not set the step of the
batch, and runs wherever the tensors live; torchode's implementation of the same scheme is
``'rk45-torchode'``. ``'heun'`` and ``'euler'`` use a fixed grid.

A score that carries its schedule (every closed-form and network score does) must carry the
one the sampler integrates; every score evaluation is checked for its shape and for
non-finite values, and a sampler stops with a ``ValueError`` that says at which time and for
how many samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torchode
from torch import Tensor

from diffmem._checks import fail, finite_tensor, positive, positive_int
from diffmem.ode import dopri5
from diffmem.schedules import Schedule, expand_as_batch
from diffmem.scores.base import HasSigma2Score, check_schedule

Drift = Callable[[Tensor, Tensor, Tensor], Tensor]
METHODS = ("rk45", "heun", "euler", "rk45-torchode")


@dataclass
class SampleResult:
    """Final ``samples`` ``(B, *shape)``; with ``return_trajectory``, the recorded ``times``
    ``(n,)`` (always ``t``), ``s_times`` (the same points in ``s = -log sigma(t)`` when the ODE
    was integrated in ``s``) and ``trajectory`` ``(B, n, *shape)``; and ``stats`` (score
    evaluations, steps, integration variable)."""

    samples: Tensor
    times: Tensor | None = None
    trajectory: Tensor | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    s_times: Tensor | None = None


class _Counted:
    """Wrap a drift so that the number of batched evaluations is counted."""

    def __init__(self, fn: Drift) -> None:
        self.fn = fn
        self.calls = 0

    def __call__(self, time: Tensor, y: Tensor, rows: Tensor) -> Tensor:
        self.calls += 1
        return self.fn(time, y, rows)


def _check_x(x_T: Tensor) -> Tensor:
    finite_tensor("x_T", x_T)
    if x_T.dim() < 2 or not x_T.is_floating_point():
        raise fail("x_T", "a floating tensor of shape (batch, *data_shape)",
                   f"{x_T.dtype} of shape {tuple(x_T.shape)}")
    return x_T


def _empty(x_T: Tensor, method: str) -> SampleResult:
    """The result for an empty batch: no samples, no score evaluations."""
    return SampleResult(samples=x_T.clone(), stats={"method": method, "score_evals": 0,
                                                    "steps_max": 0})


def _check_t_end(schedule: Schedule, t_end: float) -> float:
    t_end = float(t_end)
    if not math.isfinite(t_end) or not 0 <= t_end < schedule.T:
        raise fail("t_end", f"a time with 0 <= t_end < T = {schedule.T}", t_end)
    return t_end


def _integrate(
    fn: Drift,
    y0: Tensor,
    start: float,
    end: float,
    method: str,
    rtol: float,
    atol: float,
    steps: int | None,
    record: Tensor | None,
    max_steps: int,
) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
    """Integrate ``dy/dtau = fn(tau, y)`` for ``y0`` of shape ``(B, d)`` from ``start`` to
    ``end``, recording the states at the points ``record`` (``(n,)``) if given."""
    if method not in METHODS:
        raise fail("method", f"one of {METHODS}", repr(method))
    counted = _Counted(fn)
    if method == "rk45":
        rtol, atol = positive("rtol", rtol), positive("atol", atol)
        with torch.no_grad():
            sol = dopri5(counted, y0, start, end, rtol, atol, record, max_steps)
        steps_f, acc_f = sol.steps.to(torch.float64), sol.accepted.to(torch.float64)
        stats = {
            "method": "rk45",
            "score_evals": counted.calls,
            "steps_max": int(sol.steps.max()),
            "steps_mean": float(steps_f.mean()),
            "accepted_mean": float(acc_f.mean()),
            "rejected_mean": float((steps_f - acc_f).mean()),
            "steps_per_sample": sol.steps.tolist(),
        }
        return sol.y, sol.recorded, stats
    if method == "rk45-torchode":
        return _torchode(counted, y0, start, end, positive("rtol", rtol),
                         positive("atol", atol), record, max_steps)
    return _fixed_steps(counted, y0, start, end, method,
                        positive_int("steps", 100 if steps is None else steps), record)


def _torchode(counted: _Counted, y0: Tensor, start: float, end: float, rtol: float,
              atol: float, record: Tensor | None,
              max_steps: int) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
    """:func:`_integrate` by torchode's adaptive Dormand-Prince (``rk45-torchode``)."""
    B = y0.shape[0]
    everyone = torch.arange(B, device=y0.device)
    term = torchode.ODETerm(lambda t, y: counted(t, y, everyone))
    solver = torchode.AutoDiffAdjoint(
        torchode.Dopri5(term=term),
        torchode.IntegralController(atol=atol, rtol=rtol, term=term),
        max_steps=max_steps,
    )
    full = lambda v: torch.full((B,), v, dtype=y0.dtype, device=y0.device)  # noqa: E731
    t_eval = None if record is None else record.to(y0).expand(B, -1).contiguous()
    with torch.no_grad():
        tsol = solver.solve(torchode.InitialValueProblem(
            y0=y0, t_start=full(start), t_end=full(end), t_eval=t_eval))
    if bool((tsol.status != 0).any()):
        bad = int((tsol.status != 0).sum())
        raise RuntimeError(f"rk45-torchode: {bad} of {B} trajectories did not reach the "
                           "end time; raise max_steps or loosen rtol/atol")
    n_steps = tsol.stats["n_steps"]
    stats = {"method": "rk45-torchode", "score_evals": counted.calls,
             "steps_max": int(n_steps.max()), "steps_per_sample": n_steps.tolist()}
    return tsol.ys[:, -1], (None if record is None else tsol.ys), stats


def _fixed_steps(counted: _Counted, y0: Tensor, start: float, end: float, method: str,
                 n: int, record: Tensor | None) -> tuple[Tensor, Tensor | None,
                                                        dict[str, Any]]:
    """:func:`_integrate` by ``n`` uniform Euler or Heun steps (and the recording points
    added to the grid)."""
    B = y0.shape[0]
    grid = torch.linspace(start, end, n + 1, dtype=torch.float64)
    if record is not None:
        grid = torch.unique(torch.cat([grid, record.to(torch.float64)]))
        grid = grid.flip(0) if start > end else grid
    y = y0
    everyone = torch.arange(B, device=y0.device)
    saved: list[Tensor] = []
    record_set = set() if record is None else {float(v) for v in record}
    if float(grid[0]) in record_set:
        saved.append(y)
    with torch.no_grad():
        for a, b in zip(grid[:-1].tolist(), grid[1:].tolist(), strict=True):
            h = b - a
            ta = torch.full((B,), a, dtype=y.dtype, device=y.device)
            k1 = counted(ta, y, everyone)
            if method == "euler":
                y = y + h * k1
            else:
                tb = torch.full((B,), b, dtype=y.dtype, device=y.device)
                k2 = counted(tb, y + h * k1, everyone)
                y = y + 0.5 * h * (k1 + k2)
            if b in record_set:
                saved.append(y)
    stats = {"method": method, "score_evals": counted.calls, "steps_max": len(grid) - 1}
    return y, (torch.stack(saved, 1) if record is not None else None), stats


def _record_points(start: float, end: float, n: int, log: bool) -> Tensor:
    """``n`` recording points from ``start`` to ``end`` (log-spaced in distance to ``end``'s
    side when ``log`` and both are positive)."""
    if log and start > 0 and end > 0:
        pts = torch.logspace(math.log10(start), math.log10(end), n, dtype=torch.float64)
    else:
        pts = torch.linspace(start, end, n, dtype=torch.float64)
    pts[0], pts[-1] = start, end
    return pts


def _checked(fn: Callable[..., Tensor], name: str) -> Callable[..., Tensor]:
    """``fn(x, t, ...)`` with its output checked: the shape of ``x`` and finite values, else a
    ``ValueError`` naming ``name``, the time and how many samples are affected."""

    def call(x: Tensor, t: Tensor, *args: Any) -> Tensor:
        out = fn(x, t, *args)
        if not isinstance(out, Tensor) or out.shape != x.shape:
            raise fail(name, f"a tensor of the shape of x, {tuple(x.shape)}",
                       f"shape {tuple(out.shape)}" if isinstance(out, Tensor)
                       else type(out).__name__)
        if not bool(torch.isfinite(out).all()):
            bad = ~torch.isfinite(out.reshape(out.shape[0], -1)).all(1)
            tt = t.reshape(-1)
            at = float(tt[bad][0] if tt.numel() == bad.numel() else tt[0])
            raise fail(name, "finite values",
                       f"non-finite values for {int(bad.sum())} of {out.shape[0]} samples at "
                       f"t = {at:.6g}")
        return out

    return call


def _conditioned(fn: Callable[..., Tensor] | None, cond: Tensor | None,
                 batch: int, name: str = "score") -> Callable[[Tensor, Tensor, Tensor],
                                                          Tensor] | None:
    """``fn(x, t)``, or ``fn(x, t, cond[rows])`` when a conditioning is given: ``cond`` has one
    row per sample (first dimension ``batch``) or is a single condition (broadcast). The
    output is checked (:func:`_checked`)."""
    if fn is None:
        return None
    fn = _checked(fn, name)
    if cond is None:
        return lambda x, t, rows: fn(x, t)
    if not isinstance(cond, Tensor):
        raise fail("cond", "a tensor of conditions", type(cond).__name__)
    per_sample = cond.dim() >= 1 and cond.shape[0] == batch and batch > 1
    if per_sample:
        return lambda x, t, rows: fn(x, t, cond[rows])
    single = cond[0] if cond.dim() >= 1 and cond.shape[0] == 1 else cond
    return lambda x, t, rows: fn(x, t, single.expand(rows.shape[0], *single.shape))


def probability_flow_drift(schedule: Schedule, score: Callable[..., Tensor],
                           shape: tuple[int, ...], cond: Tensor | None = None,
                           batch: int = 0) -> Drift:
    """``dx/dt = f(x, t) - g(t)^2 s(x, t) / 2`` on flattened states (``s(x, t, y)`` with a
    conditioning)."""
    s = _conditioned(score, cond, batch)
    assert s is not None

    def drift(t: Tensor, y: Tensor, rows: Tensor) -> Tensor:
        x = y.reshape(y.shape[0], *shape)
        out = schedule.f(x, t) - 0.5 * expand_as_batch(schedule.g2(t).to(x), x) * s(x, t, rows)
        return out.reshape(y.shape)

    return drift


def transformed_drift(schedule: Schedule, score: Callable[..., Tensor],
                      shape: tuple[int, ...], cond: Tensor | None = None,
                      batch: int = 0) -> Drift:
    """``dx/ds = [-2 sigma^2 (d log m/dt) x + g^2 (sigma^2 s(x, t))] / (d sigma^2/dt)`` at
    ``t = t(s)``, on flattened states; ``sigma^2 s`` comes from ``score.sigma2_score`` when the
    score has it (finite as ``sigma -> 0``). With ``g^2 = d sigma^2/dt - 2 (d log m/dt)
    sigma^2`` this is ``dx/ds = sigma^2 s - r (x + sigma^2 s)``, ``r = 2 sigma^2 (d log m/dt)
    / (d sigma^2/dt)`` (``r = 0`` for VE: ``dx/ds = D - x``)."""
    scaled = _conditioned(score.sigma2_score if isinstance(score, HasSigma2Score) else None,
                          cond, batch, "score.sigma2_score")
    plain = _conditioned(score, cond, batch)
    assert plain is not None

    def drift(s: Tensor, y: Tensor, rows: Tensor) -> Tensor:
        t = schedule.t_of_s(s)
        x = y.reshape(y.shape[0], *shape)
        co = schedule.coefficients(t)
        if scaled is not None:
            s2s = scaled(x, t, rows).reshape(y.shape)
        else:
            s2s = co["sigma2"].to(y)[:, None] * plain(x, t, rows).reshape(y.shape)
        r = (2 * co["sigma2"] * co["dlog_m"] / co["dsigma2"]).to(y)[:, None]
        return s2s - r * (y + s2s)

    return drift


def sample_ode(
    schedule: Schedule,
    score: Callable[..., Tensor],
    x_T: Tensor,
    t_end: float | None = None,
    method: str = "rk45",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    steps: int | None = None,
    return_trajectory: bool = False,
    t_eval: Tensor | None = None,
    n_record: int = 200,
    max_steps: int = 100_000,
    variable: str = "auto",
    cond: Tensor | None = None,
    *,
    s_end: float | None = None,
    s_eval: Tensor | None = None,
) -> SampleResult:
    """Integrate the probability-flow ODE ``dx/dt = f - g^2 s / 2`` from ``T`` to ``t_end``,
    or, in transformed time ``s = -log sigma(t)``,

        dx/ds = [-2 sigma^2 (d log m/dt) x + g^2 (sigma^2 s(x, t))] / (d sigma^2/dt)

    at ``t = t(s)`` from ``s(T)`` to ``s(t_end)`` or ``s_end`` (``score.sigma2_score`` keeps
    the right-hand side finite as ``sigma -> 0``; use float64 for large ``s``: ``sigma = e^-s``
    underflows float32 near ``s = 44``).

    Args:
        schedule: the forward SDE (the score's own, when it carries one).
        score: ``score(x, t)``, ``t`` a ``(batch,)`` tensor.
        x_T: initial states at ``t = T``, ``(batch, *data_shape)`` (an empty batch returns
            an empty result without evaluating the score).
        t_end: final time, ``0 <= t_end < T`` (0 only for scores finite there; default
            1e-6 unless ``s_end`` is given).
        method: ``'rk45'`` (adaptive, per-sample step control; ``rtol``, ``atol``: its
            tolerances), ``'heun'`` or ``'euler'`` (``steps`` uniform steps, default 100).
        return_trajectory: record the states at ``t_eval`` or ``s_eval`` (default:
            ``n_record`` points, log-spaced in ``t`` from ``T`` to ``t_end``, or evenly spaced
            in ``s`` up to ``s_end``).
        max_steps: step limit per trajectory of ``'rk45'``.
        variable: the integration variable. ``'t'``; ``'s'``, the transformed time (the same
            ODE reparametrized: smooth where the flow in ``t`` is stiff, ``dx/dt ~ 1/t`` near
            0, so far fewer steps; needs an end with ``t > 0``); or ``'auto'``: ``'s'`` when
            the end has ``t > 0``, else ``'t'``. Fixed-step methods step uniformly in the
            chosen variable.
        cond: a conditioning for scores ``s(x, t, y)``: one ``y`` per sample (first
            dimension = batch) or a single ``y`` for all (a leading dimension of 1 forces
            broadcasting).
        s_end: the end in transformed time instead of ``t_end`` (implies
            ``variable='s'``).
        s_eval: the recording points in transformed time instead of ``t_eval``.
    """
    _check_x(x_T)
    check_schedule(schedule, score)
    if return_trajectory and t_eval is None and s_eval is None:
        positive_int("n_record", n_record)
    if method.startswith("rk45"):
        positive_int("max_steps", max_steps)
    t_end, s_end, use_s = _ends(schedule, t_end, s_end, variable)
    if t_eval is not None and s_eval is not None:
        raise fail("s_eval", "at most one of t_eval or s_eval", "both")
    rec_t, rec_s = _recording(schedule, t_end, s_end, t_eval, s_eval, n_record, use_s) \
        if return_trajectory else (None, None)
    shape, B = tuple(x_T.shape[1:]), x_T.shape[0]
    if B == 0:
        return _empty(x_T, method)
    drift = (transformed_drift if use_s else probability_flow_drift)(schedule, score, shape,
                                                                      cond, B)
    start, end, rec = (schedule.s_T, s_end if s_end is not None else float(
        schedule.s(t_end)), rec_s) if use_s else (schedule.T, t_end, rec_t)
    y, traj, stats = _integrate(drift, x_T.reshape(B, -1), start, end, method, rtol, atol,
                                steps, rec, max_steps)
    stats["variable"] = "s" if use_s else "t"
    result = SampleResult(samples=y.reshape(x_T.shape), stats=stats)
    if traj is not None and rec is not None:
        result.times, result.s_times = rec_t, rec_s if use_s else None
        result.trajectory = traj.reshape(B, -1, *shape)
    return result


def _ends(schedule: Schedule, t_end: float | None, s_end: float | None,
          variable: str) -> tuple[float | None, float | None, bool]:
    """The end of :func:`sample_ode` in ``t`` or in ``s`` (exactly one), checked, and
    whether to integrate in ``s``."""
    if variable not in ("auto", "t", "s"):
        raise fail("variable", "'auto', 't' or 's'", repr(variable))
    if s_end is not None:
        if t_end is not None:
            raise fail("s_end", "exactly one of s_end or t_end", f"s_end={s_end}, t_end={t_end}")
        if variable == "t":
            raise fail("variable", "'s' or 'auto' with s_end", repr(variable))
        s_end = float(s_end)
        if not math.isfinite(s_end) or s_end <= schedule.s_T:
            raise fail("s_end", f"a finite value > s(T) = {schedule.s_T}", s_end)
        return None, s_end, True
    t_end = _check_t_end(schedule, 1e-6 if t_end is None else t_end)
    if variable == "s" and t_end == 0:
        raise fail("t_end", "t_end > 0 with variable='s' (s is infinite at t = 0)", t_end)
    return t_end, None, variable == "s" or (variable == "auto" and t_end > 0)


def _recording(schedule: Schedule, t_end: float | None, s_end: float | None,
               t_eval: Tensor | None, s_eval: Tensor | None, n_record: int,
               use_s: bool) -> tuple[Tensor | None, Tensor | None]:
    """The points a trajectory is recorded at, in ``t`` and, integrating in ``s``, in
    ``s``: those given, else ``n_record`` log-spaced in ``t`` (evenly in ``s`` to
    ``s_end``)."""
    if s_eval is not None:
        rec_t, rec_s = None, s_eval.to(torch.float64)
    elif t_eval is not None:
        rec_t, rec_s = t_eval, None
    elif s_end is not None:
        rec_t, rec_s = None, _record_points(schedule.s_T, s_end, n_record, log=False)
    else:
        assert t_end is not None
        rec_t, rec_s = _record_points(schedule.T, t_end, n_record, log=True), None
    if not use_s:
        if rec_s is not None:
            raise fail("s_eval", "recording points in t (t_eval) when integrating in t",
                       "s_eval")
        return rec_t, None
    if rec_s is None and rec_t is not None:
        rec_s = schedule.s(rec_t.to(torch.float64))
    if rec_s is not None and rec_t is None:
        rec_t = schedule.t_of_s(rec_s)
    return rec_t, rec_s


def sample_ode_transformed(schedule: Schedule, score: Callable[..., Tensor], x_T: Tensor,
                           **kwargs: Any) -> SampleResult:
    """:func:`sample_ode` integrated in transformed time: ``sample_ode(..., variable='s')``,
    with exactly one of ``s_end`` or ``t_end``."""
    if (kwargs.get("s_end") is None) == (kwargs.get("t_end") is None):
        raise fail("s_end", "exactly one of s_end or t_end",
                   f"s_end={kwargs.get('s_end')}, t_end={kwargs.get('t_end')}")
    return sample_ode(schedule, score, x_T, variable="s", **kwargs)


def sample_sde(
    schedule: Schedule,
    score: Callable[..., Tensor],
    x_T: Tensor,
    steps: int = 100,
    t_end: float = 1e-3,
    generator: torch.Generator | None = None,
    grid: str = "uniform",
    return_trajectory: bool = False,
    cond: Tensor | None = None,
) -> SampleResult:
    """Euler--Maruyama for the reverse SDE ``dx = [f - g^2 s] dt + g dW_bar`` from ``T`` to
    ``t_end``: with ``h = t_k - t_{k+1} > 0``,

        x_{k+1} = x_k - h [f(x_k, t_k) - g(t_k)^2 s(x_k, t_k)] + g(t_k) sqrt(h) z_k.

    ``grid`` is ``'uniform'`` in ``t`` (the paper's) or ``'geometric'`` (log-spaced, finer
    near ``t_end > 0``).
    """
    _check_x(x_T)
    check_schedule(schedule, score)
    t_end = _check_t_end(schedule, t_end)
    steps = positive_int("steps", steps)
    if grid == "uniform":
        times = torch.linspace(schedule.T, t_end, steps + 1, dtype=torch.float64)
    elif grid == "geometric":
        if t_end <= 0:
            raise fail("t_end", "t_end > 0 for the geometric grid", t_end)
        times = _record_points(schedule.T, t_end, steps + 1, log=True)
    else:
        raise fail("grid", "'uniform' or 'geometric'", repr(grid))
    x = x_T
    B = x.shape[0]
    if B == 0:
        return _empty(x_T, "euler-maruyama")
    s = _conditioned(score, cond, B)
    assert s is not None
    rows = torch.arange(B, device=x.device)
    saved = [x] if return_trajectory else []
    evals = 0
    with torch.no_grad():
        for a, b in zip(times[:-1].tolist(), times[1:].tolist(), strict=True):
            h = a - b
            t = torch.full((B,), a, dtype=x.dtype, device=x.device)
            g2 = expand_as_batch(schedule.g2(t).to(x), x)
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype,
                                device=generator.device if generator is not None else x.device)
            x = x - h * (schedule.f(x, t) - g2 * s(x, t, rows)) + torch.sqrt(g2 * h) * noise.to(x)
            evals += 1
            if return_trajectory:
                saved.append(x)
    result = SampleResult(samples=x, stats={"method": "euler-maruyama", "score_evals": evals,
                                            "steps_max": steps})
    if return_trajectory:
        result.times = times
        result.trajectory = torch.stack(saved, 1)
    return result
