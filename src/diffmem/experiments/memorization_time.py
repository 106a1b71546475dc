"""``memorization-time``: when does a network start to memorize, as the training set grows?

For each training-set size ``N`` (``sizes``) and seed (``seeds``: a fresh training set of
``N`` points of ``N(0, I_dim)`` and a fresh network each), the paper's score MLP (VP, batches
of ``batch_size`` drawn with replacement) is trained for ``steps_per_item * N`` steps (at
least ``min_steps``) and evaluated at ``n_log`` log-spaced steps from ``first_step`` on, all
samples drawn from the same noise (the evaluation steps are one log-spaced grid for every
size):

* ``copied``: the fraction of ``n_samples`` probability-flow samples that are nn-ratio copies
  of the training set (``d1 / d2 < 1/3``);
* ``population``: their energy distance to ``n_fresh`` fresh draws of the truth (data units;
  the distance to the population the training set came from);
* the memorization monitor's record (:class:`diffmem.monitor.MemorizationMonitor`: the
  denoiser gap to the empirical denoiser and ``follows_down_to``) and its stop step.

From the records, per ``N`` and seed (Bonnaire, Urfin, Biroli & Mezard, NeurIPS 2025):

* ``tau_gen``: the step at which ``population`` first comes down to within
  ``gen_fraction`` of its drop from the untrained network to its best value (a fixed factor
  of the best would not do: the best is lower, and reached later, the larger ``N``),
  interpolated in ``log steps`` between the two evaluations around it;
* ``tau_mem``: the step at which ``copied`` first exceeds one half, interpolated linearly in
  ``log steps`` between the two evaluations around it.

The fitted slope of ``log tau_mem`` against ``log N`` (least squares over every size and
seed) with a bootstrap interval (resampling the sizes, each with all its seeds): the claim is
that memorization time grows linearly with ``N`` (interval within ``[0.75, 1.25]``) while
the generalization time does not (``tau_gen`` varies less than 2x across ``N``). The monitor
is judged by whether its stop step lies in ``[tau_gen, tau_mem]`` for each ``N``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from diffmem import data, plots
from diffmem._checks import fail
from diffmem.experiments.base import Context, Experiment, Recorded, Verdict
from diffmem.experiments.common import train_networks
from diffmem.experiments.transition import crossing
from diffmem.metrics import energy_distance, nn_ratio, within_mean_distance
from diffmem.monitor import MemorizationMonitor
from diffmem.nn import NetworkScore
from diffmem.samplers import sample_ode
from diffmem.schedules import get_schedule

CLAIM = ("Memorization time grows linearly with the training-set size N while generalization "
         "time does not (Bonnaire et al., 2025): the slope of log tau_mem against log N has "
         "a bootstrap interval within [0.75, 1.25], and tau_gen varies less than 2x across N.")
SLOPE_RANGE = (0.75, 1.25)
#: tau_gen may vary by less than this factor across N.
GEN_SPREAD = 2.0
#: Copies above this fraction: memorized (tau_mem).
MEMORIZED = 0.5
SAMPLES_SEED, FRESH_SEED, DATA_SEED = 9_500, 9_600, 9_700


def run_steps(p: Mapping[str, Any], n: int) -> int:
    """Training steps for ``n`` items: ``steps_per_item * n``, at least ``min_steps``."""
    return max(int(p["min_steps"]), int(p["steps_per_item"]) * n)


def marks(p: Mapping[str, Any], n: int) -> list[int]:
    """The evaluation steps of a run on ``n`` items: one grid for every size (``n_log``
    log-spaced steps from ``first_step`` to the longest run, so that the times of different
    sizes are read on the same steps), up to :func:`run_steps` (which is always included)."""
    longest = max(run_steps(p, m) for m in p["sizes"])
    grid = np.geomspace(p["first_step"], longest, p["n_log"])
    last = run_steps(p, n)
    return sorted({int(round(v)) for v in grid if v <= last} | {last})


def first_memorized(steps: Sequence[int], copied: Sequence[float]) -> float | None:
    """The step at which ``copied`` first exceeds :data:`MEMORIZED`, interpolated in log
    steps (``None``: never within the run; the first step when it starts above)."""
    if copied and copied[0] > MEMORIZED:
        return float(steps[0])
    return crossing(list(steps), [1 - c for c in copied], 1 - MEMORIZED)


def first_general(steps: Sequence[int], population: Sequence[float],
                  fraction: float) -> float:
    """The step at which ``population`` first comes down to within ``fraction`` of its drop
    from the first evaluation to its best, ``v <= best + fraction (v_0 - best)``,
    interpolated in log steps between the two evaluations around it."""
    best = min(population)
    level = best + fraction * (population[0] - best)
    if population[0] <= level:
        return float(steps[0])
    found = crossing(list(steps), list(population), level)
    if found is None:  # reached exactly at an evaluation
        return float(next(s for s, v in zip(steps, population, strict=True) if v <= level))
    return found


def fit_slope(sizes: Sequence[float], times: Sequence[float]) -> float:
    """Least-squares slope of ``log times`` against ``log sizes``."""
    x, y = np.log(np.asarray(sizes, float)), np.log(np.asarray(times, float))
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum())


def bootstrap_slope(points: Mapping[int, Sequence[float]], resamples: int, seed: int,
                    level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of :func:`fit_slope` when the sizes (keys of ``points``, each with
    its ``tau_mem`` per seed) are resampled with replacement; resamples with one distinct
    size are drawn again."""
    rng = np.random.default_rng(seed)
    sizes = sorted(points)
    slopes = []
    while len(slopes) < resamples:
        pick = rng.choice(len(sizes), len(sizes))
        if len(set(pick.tolist())) < 2:
            continue
        xs = [sizes[i] for i in pick for _ in points[sizes[i]]]
        ys = [t for i in pick for t in points[sizes[i]]]
        slopes.append(fit_slope(xs, ys))
    lo, hi = np.quantile(slopes, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def check_params(p: Mapping[str, Any]) -> None:
    """Refuse, before any training, what the records could not be read from: sizes below 2
    (a copy is judged by ``d1 / d2``), a ``gen_fraction`` outside ``(0, 1)``, a first
    evaluation at or after the end of the shortest run."""
    if min(p["sizes"]) < 2:
        raise fail("sizes", "training-set sizes >= 2 (copies are judged by d1/d2)",
                   p["sizes"])
    if not 0 < p["gen_fraction"] < 1:  # NaN fails too
        raise fail("gen_fraction", "a number in (0, 1)", p["gen_fraction"])
    shortest = min(run_steps(p, n) for n in p["sizes"])
    if p["first_step"] >= shortest:
        raise fail("first_step", f"a step before the end of the shortest run ({shortest})",
                   p["first_step"])


def compute(ctx: Context) -> dict[str, Any]:
    p = ctx.params
    check_params(p)
    sch = get_schedule(p["schedule"])
    truth = data.GaussianTruth(p["dim"])
    noise = ctx.noise(p["n_samples"], (p["dim"],), float(sch.sigma(sch.T)), offset=SAMPLES_SEED)
    fresh = truth.sample(p["n_fresh"], ctx.generator(FRESH_SEED))
    fresh_within = within_mean_distance(fresh)
    runs: dict[str, Any] = {}
    for seed in range(p["seeds"]):
        for n in ctx.bar(p["sizes"], f"sizes (seed {seed})"):
            x = truth.sample(n, ctx.generator(DATA_SEED + 1000 * seed + n))
            monitor = MemorizationMonitor(x, sch, n_points=p["monitor_points"], seed=ctx.seed,
                                          every=1)

            def evaluate(step: int, model: Any, ema: Any, x: torch.Tensor = x,
                         monitor: MemorizationMonitor = monitor) -> dict[str, Any]:
                score = NetworkScore(ema, sch)
                s = sample_ode(sch, score, noise, t_end=p["t_end"]).samples.cpu()
                record = monitor.update(step, score)
                return {"copied": nn_ratio(s, x, bootstrap=1).fraction,
                        "population": energy_distance(s, fresh, y_within=fresh_within),
                        "follows_down_to": record["follows_down_to"]}

            run_ctx = dataclasses.replace(ctx, seed=ctx.seed + seed)
            trained = train_networks(run_ctx, x, lambdas=[0.0], parameterizations=["score"],
                                     steps=run_steps(p, n), width=p["width"],
                                     ema_half_life=p["ema_half_life"], lr=p["lr"],
                                     batch_size=p["batch_size"], marks=marks(p, n),
                                     tag=f"checkpoints_s{seed}_N{n}", callback=evaluate,
                                     quiet_ema=True)
            # the stop step by the monitor's own rule, replayed from every evaluation (a
            # resumed run did not call ``evaluate`` for the steps before its checkpoint)
            monitor.restore([{"step": s, **e} for s, e in sorted(trained.evaluations.items())])
            runs[f"{seed}/{n}"] = {"seed": seed, "n": n, "evaluations": trained.evaluations,
                                   "monitor_stop": monitor.stopped_at}
    return {"runs": runs}


def record(ctx: Context, raw: dict[str, Any]) -> Recorded:
    p = ctx.params
    rows = []
    for run in raw["runs"].values():
        steps = sorted(run["evaluations"])
        evals = [run["evaluations"][s] for s in steps]
        copied = [float(e["copied"]) for e in evals]
        population = [float(e["population"]) for e in evals]
        rows.append({"n": run["n"], "seed": run["seed"], "steps": steps, "copied": copied,
                     "population": population,
                     "follows_down_to": [e["follows_down_to"] for e in evals],
                     "tau_gen": first_general(steps, population, p["gen_fraction"]),
                     "tau_mem": first_memorized(steps, copied),
                     "monitor_stop": run["monitor_stop"]})
    sizes = sorted({r["n"] for r in rows})
    per_n: dict[str, Any] = {}
    for n in sizes:
        mine = [r for r in rows if r["n"] == n]
        mems = [r["tau_mem"] for r in mine if r["tau_mem"] is not None]
        gens = [r["tau_gen"] for r in mine]
        stops = [r["monitor_stop"] for r in mine]
        inside = [s is not None and r["tau_mem"] is not None and r["tau_gen"] <= s <=
                  r["tau_mem"] for r, s in zip(mine, stops, strict=True)]
        per_n[str(n)] = {"tau_mem": float(np.exp(np.mean(np.log(mems)))) if mems else None,
                         "tau_gen": float(np.exp(np.mean(np.log(gens)))),
                         "monitor_stop": stops, "monitor_inside_window": inside,
                         "memorized_in_run": len(mems), "runs": len(mine)}
    points = {n: [r["tau_mem"] for r in rows if r["n"] == n and r["tau_mem"] is not None]
              for n in sizes}
    points = {n: v for n, v in points.items() if v}
    slope, interval = None, None
    if len(points) >= 2:
        slope = fit_slope([n for n, v in points.items() for _ in v],
                          [t for v in points.values() for t in v])
        interval = bootstrap_slope(points, p["bootstrap"], ctx.seed)
    gens = [per_n[str(n)]["tau_gen"] for n in sizes]
    metrics = {"sizes": sizes, "runs": rows, "per_size": per_n, "slope": slope,
               "slope_interval": interval, "gen_spread": max(gens) / min(gens),
               "steps": {str(n): run_steps(p, n) for n in sizes},
               "units": {"copied": "fraction of samples that are nn-ratio copies (d1/d2 < 1/3)",
                         "population": "energy distance to fresh draws of the truth (data "
                                       "units)",
                         "tau_gen": "training steps: first step with the population distance "
                                    f"within {p['gen_fraction']} of its drop to its best",
                         "tau_mem": "training steps: copies first above one half (log "
                                    "interpolation)",
                         "slope": "d log tau_mem / d log N"}}
    return Recorded(metrics)


def judge(metrics: Mapping[str, Any], params: Mapping[str, Any]) -> Verdict:
    per = metrics["per_size"]
    missing = [n for n, v in per.items() if v["tau_mem"] is None]
    inside = [all(v["monitor_inside_window"]) for v in per.values()]
    text = ", ".join(f"N = {n}: tau_gen {v['tau_gen']:.0f}, tau_mem "
                     + ("never" if v["tau_mem"] is None else f"{v['tau_mem']:.0f}")
                     for n, v in per.items())
    monitor = (f"the monitor stopped inside [tau_gen, tau_mem] for {sum(inside)} of "
               f"{len(inside)} sizes")
    if metrics["slope"] is None or missing:
        return Verdict.of(CLAIM, False, f"no memorization within the run for N = "
                          f"{', '.join(missing)} (train longer): {text}", judgeable=False)
    lo, hi = metrics["slope_interval"]
    holds = SLOPE_RANGE[0] <= lo and hi <= SLOPE_RANGE[1] and metrics["gen_spread"] < GEN_SPREAD
    finding = (f"slope of log tau_mem on log N {metrics['slope']:.2f} (95% bootstrap "
               f"{lo:.2f}-{hi:.2f}); tau_gen varies {metrics['gen_spread']:.2f}x; {text}; "
               f"{monitor}")
    return Verdict.of(CLAIM, holds, finding)


def draw(rec: Recorded, params: Mapping[str, Any]) -> dict[str, Any]:
    m = rec.metrics
    fig, ax = plots.figure(1, 3, size=4.2)
    plane = ax[0, 0]
    for r in m["runs"]:
        dots = plane.scatter([r["n"] * (1.06 ** r["seed"])] * len(r["steps"]), r["steps"],
                             c=r["copied"], cmap="viridis", vmin=0, vmax=1, marker="s", s=42)
    fig.colorbar(dots, ax=plane, label="copied fraction")
    sizes = m["sizes"]
    per = [m["per_size"][str(n)] for n in sizes]
    plane.plot(sizes, [v["tau_gen"] for v in per], "o-", color="C1", label="tau_gen")
    mem = [(n, v["tau_mem"]) for n, v in zip(sizes, per, strict=True) if v["tau_mem"]]
    if mem:
        plane.plot(*zip(*mem, strict=True), "o-", color="C3", label="tau_mem")
    if m["slope"] is not None and mem:
        n0, t0 = mem[0]
        fit = [t0 * (n / n0) ** m["slope"] for n in sizes]
        plane.plot(sizes, fit, ":", color="C3", lw=1, label=f"N^{m['slope']:.2f}")
    stops = [(r["n"] * (1.06 ** r["seed"]), r["monitor_stop"]) for r in m["runs"]
             if r["monitor_stop"] is not None]
    if stops:
        plane.scatter(*zip(*stops, strict=True), marker="x", color="w", s=30, zorder=5,
                      label="monitor stop")
    plane.set(xscale="log", yscale="log", xlabel="training-set size N",
              ylabel="training steps", title="copied fraction over (N, steps)")
    plane.legend(fontsize=7, loc="upper left")
    for r in m["runs"]:
        color = f"C{sizes.index(r['n']) % 10}"
        label = f"N = {r['n']}" if r["seed"] == 0 else None
        ax[0, 1].plot(r["steps"], r["copied"], color=color, label=label)
        ax[0, 2].plot(r["steps"], r["population"], color=color, label=label)
    ax[0, 1].axhline(MEMORIZED, color="0.6", lw=0.8, ls=":")
    ax[0, 1].set(xscale="log", xlabel="training steps", ylabel="copied fraction",
                 title="copies while training")
    ax[0, 2].set_yscale("symlog", linthresh=1e-2)  # the unbiased estimate may dip below 0
    ax[0, 2].set(xscale="log", xlabel="training steps",
                 ylabel="energy distance to the truth", title="distance to the population")
    ax[0, 1].legend(fontsize=7)
    fig.tight_layout()
    return {"memorization_time": fig}


EXPERIMENT = Experiment(
    name="memorization-time",
    cost=160,
    summary="The paper's score MLP on N points of N(0, I_8) for N over a factor of 32 or more: "
            "copies, distance to the population and the monitor's record against training "
            "steps; the generalization time tau_gen, the memorization time tau_mem, the slope "
            "of log tau_mem on log N with a bootstrap interval, and whether the monitor stops "
            "inside [tau_gen, tau_mem].",
    claim=CLAIM,
    defaults={"dim": 8, "schedule": "VP", "sizes": [2, 4, 8, 16, 32, 64], "seeds": 5,
              "steps_per_item": 500, "min_steps": 2000, "n_log": 16, "first_step": 20,
              "width": 256, "batch_size": 64, "lr": 1e-3, "ema_half_life": 50.0,
              "n_samples": 100, "n_fresh": 2000, "gen_fraction": 0.1, "t_end": 1e-3,
              "monitor_points": 32, "bootstrap": 2000},
    quick={"sizes": [2, 3, 4, 6, 8, 16, 32], "seeds": 4, "steps_per_item": 250,
           "min_steps": 1000, "n_log": 12, "n_samples": 64, "n_fresh": 1000,
           "monitor_points": 16},
    compute=compute, record=record, judge=judge, draw=draw,
)
