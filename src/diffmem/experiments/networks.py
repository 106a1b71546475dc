"""Experiments 6-8: learned scores on the paper's 20 points (VP).

* ``nn-tikhonov``: one MLP per ``lambda`` trained together, penalty ``lambda E|s|^2``;
  memorized fraction against ``lambda``.
* ``nn-early-stopping``: both parameterizations, evaluated at checkpoints during training.
* ``nn-width``: networks of several widths at one training budget.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from diffmem import data, plots
from diffmem._checks import fail
from diffmem.audit import denoiser_gap, follows_down_to
from diffmem.experiments.base import Context, Experiment, Recorded, Verdict
from diffmem.experiments.common import by_value, decreasing, gap_text, train_networks
from diffmem.metrics import delta_key, fraction_sweep
from diffmem.nn import NetworkScore, ScoreMLP, checkpoint_steps
from diffmem.samplers import sample_ode
from diffmem.schedules import get_schedule
from diffmem.scores import EmpiricalScore, ThresholdScore, TikhonovScore
from diffmem.training import half_life_from_decay

DELTAS = [1e-2, 5e-2, 1e-1, 5e-1]
COMMON = {"schedule": "VP", "width": 256, "depth": 2, "lr": 1e-3,
          "ema_half_life": half_life_from_decay(0.9999), "n_samples": 1000, "t_end": 1e-3,
          "deltas": DELTAS, "rtol": 1e-5, "atol": 1e-5, "verdict_delta": 1e-2,
          "gap_points": 256}
#: Quick runs are too short to memorize at 1e-2; their verdict reads the 0.1 tolerance.
QUICK = {"n_samples": 200, "verdict_delta": 0.1}
#: Seed offset of the initial noise shared by every network's samples.
SAMPLES_SEED = 400
#: Slack of "the fraction falls as lambda grows": 5% absorbs the run-to-run noise of
#: trained networks between neighbouring lambdas.
MONOTONE_SLACK = 0.05
#: Below this largest memorized fraction nothing has memorized yet: no ordering to judge.
MIN_SIGNAL = 0.02

TIKHONOV_CLAIM = ("A Tikhonov penalty on a learned score prevents memorization, as the closed "
                  "form predicts: the memorized fraction falls as lambda grows.")
EARLY_CLAIM = ("Early stopping regularizes: memorization grows with training, faster for the "
               "noise parameterization (built-in singularity).")
WIDTH_CLAIM = ("Under-parameterization regularizes: at a fixed budget narrower networks "
               "memorize less.")


def _sample(ctx: Context, model: ScoreMLP, k: int, x_T: Tensor) -> Tensor:
    p = ctx.params
    sch = get_schedule(p["schedule"])
    return sample_ode(sch, NetworkScore(model, sch, k), x_T, t_end=p["t_end"], rtol=p["rtol"],
                      atol=p["atol"]).samples


def _noise(ctx: Context) -> Tensor:
    sch = get_schedule(ctx.params["schedule"])
    return ctx.noise(ctx.params["n_samples"], (2,), float(sch.sigma(sch.T)),
                     offset=SAMPLES_SEED)


def _train(ctx: Context, lambdas: Sequence[float], parameterizations: Sequence[str],
           width: int, **kw: Any) -> Any:
    p = ctx.params
    return train_networks(ctx, data.paper_points(), lambdas=lambdas,
                          parameterizations=parameterizations, steps=p["steps"], width=width,
                          depth=p["depth"], lr=p["lr"], ema_half_life=p["ema_half_life"],
                          batch_size=None, quiet_ema=not p["use_ema"], **kw)


#: Seed offset of the held-out draws of the truth N(0, I) for the denoiser comparison.
HELD_SEED = 450
#: Closed forms a network's denoiser is compared with (besides the empirical one).
REFERENCE_C, REFERENCE_TAU = (1e-3, 1e-2, 1e-1), (1e-2, 1e-1, 1.0)


def _gap(ctx: Context, score: Any) -> dict[str, Any]:
    """How far a network's denoiser is from the empirical, Tikhonov and threshold ones at
    each noise level (:func:`diffmem.audit.denoiser_gap`), on noisy training points and on
    noisy fresh draws of the truth N(0, I)."""
    sch = get_schedule(ctx.params["schedule"])
    train = data.paper_points()
    held = ctx.generator(HELD_SEED)
    references = {**{f"tikhonov c={c:g}": TikhonovScore(train, sch, c) for c in REFERENCE_C},
                  **{f"threshold tau={t:g}": ThresholdScore(train, sch, t)
                     for t in REFERENCE_TAU}}
    return denoiser_gap(score, train, held=torch.randn(200, 2, generator=held,
                                                        dtype=torch.float64),
                        references=references, n_points=ctx.params["gap_points"],
                        seed=ctx.seed)


def _gap_summary(gaps: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Per model: the noise level down to which its denoiser stays within 0.1 of the
    empirical one on training points, and the closed form it is nearest at the smallest
    and the largest level."""
    return {label: {"follows_empirical_down_to_sigma": follows_down_to(g),
                    "closest_at_smallest_sigma": g["closest"]["train"][0],
                    "closest_at_largest_sigma": g["closest"]["train"][-1]}
            for label, g in gaps.items()}


def _verdict_key(params: Mapping[str, Any]) -> str:
    key = delta_key(params["verdict_delta"])
    if key not in {delta_key(d) for d in params["deltas"]}:
        raise fail("verdict_delta", f"one of deltas {params['deltas']}",
                   params["verdict_delta"])
    return key


# --- nn-tikhonov ----------------------------------------------------------------------------
def compute_tikhonov(ctx: Context) -> dict[str, Any]:
    p = ctx.params
    _verdict_key(p)
    lambdas = p["values"]
    trained = _train(ctx, lambdas, ["score"] * len(lambdas), p["width"],
                     marks=checkpoint_steps(p["steps"], every=p["checkpoint_every"]))
    model = trained.ema if p["use_ema"] else trained.model
    x_T = _noise(ctx)
    samples = [_sample(ctx, model, k, x_T) for k in ctx.bar(range(len(lambdas)), "sampling")]
    sch = get_schedule(p["schedule"])
    gaps = {f"lambda={lam:g}": _gap(ctx, NetworkScore(model, sch, k))
            for k, lam in enumerate(lambdas)}
    return {"trained": trained, "model": model, "samples": samples,
            "score_norm": _score_norms(ctx, model, lambdas), "gaps": gaps}


def _score_norms(ctx: Context, model: ScoreMLP, lambdas: Sequence[float]) -> dict[str, Any]:
    """``|s(x_probe, t)|`` against ``t`` for every learned model, the empirical score and the
    closed-form Tikhonov scores, at a point ``probe_offset`` from the first training point."""
    p = ctx.params
    sch = get_schedule(p["schedule"])
    train = data.paper_points()
    probe = (train[0] + torch.tensor([p["probe_offset"], 0.0], dtype=torch.float64))[None]
    ts = torch.logspace(-4, 0, 60, dtype=torch.float64)
    x = probe.expand(len(ts), 2).contiguous()
    out: dict[str, Any] = {"t": ts.tolist(), "probe": probe[0].tolist(),
                           "empirical": EmpiricalScore(train, sch)(x, ts).norm(dim=1).tolist()}
    for k, lam in enumerate(lambdas):
        out[f"lambda={lam:g}"] = NetworkScore(model, sch, k)(x, ts).norm(dim=1).tolist()
        if lam > 0:
            out[f"tikhonov_c={lam:g}"] = TikhonovScore(train, sch, lam)(x, ts).norm(
                dim=1).tolist()
    return out


def record_tikhonov(ctx: Context, raw: dict[str, Any]) -> Recorded:
    p = ctx.params
    trained = raw["trained"]
    train = data.paper_points().to(ctx.device)
    metrics = {"parameter": "lambda", "values": p["values"], "n_samples": p["n_samples"],
               "fraction_within": fraction_sweep(raw["samples"], train, p["deltas"]),
               "steps": p["steps"], "weights": "ema" if p["use_ema"] else "raw",
               "final_losses": trained.history[-1][1] if trained.history else [],
               "score_norm": raw["score_norm"], "denoiser_gap": raw["gaps"],
               "denoiser_gap_summary": _gap_summary(raw["gaps"])}
    arrays = {f"samples_{k}": s.cpu() for k, s in enumerate(raw["samples"])}
    return Recorded(metrics, {"train": train.cpu(), **arrays})


def judge_tikhonov(metrics: Mapping[str, Any], params: Mapping[str, Any]) -> Verdict:
    key = _verdict_key(params)
    values, fracs = by_value(metrics["values"], metrics["fraction_within"][key])
    ok = decreasing(fracs, slack=MONOTONE_SLACK) and fracs[0] > fracs[-1]
    finding = (f"fraction within {params['verdict_delta']} is {fracs[0]:.3f} at lambda = "
               f"{values[0]:g} and {fracs[-1]:.3f} at lambda = {values[-1]:g} after "
               f"{params['steps']} steps")
    finding += "; " + gap_text({k: v["follows_empirical_down_to_sigma"]
                                 for k, v in metrics["denoiser_gap_summary"].items()})
    return Verdict.of(TIKHONOV_CLAIM, ok, finding, judgeable=max(fracs) >= MIN_SIGNAL)


def draw_tikhonov(rec: Recorded, params: Mapping[str, Any]) -> dict[str, Any]:
    m = rec.metrics
    lambdas = m["values"]
    norms = m["score_norm"]
    fig, ax = plots.figure(1, 1, size=5)
    a = ax[0, 0]
    a.plot(norms["t"], norms["empirical"], "k-", lw=2, label="empirical")
    for lam in lambdas:
        line = a.plot(norms["t"], norms[f"lambda={lam:g}"], lw=1.2,
                      label=f"learned, lambda = {lam:g}")[0]
        if lam > 0:
            a.plot(norms["t"], norms[f"tikhonov_c={lam:g}"], "--", color=line.get_color(),
                   lw=1)
    a.set_xscale("log")
    a.set_yscale("log")
    a.set_xlabel("t")
    a.set_ylabel("|s(x, t)|")
    a.set_title(f"score norm {params['probe_offset']} from a training point "
                "(dashed: closed-form Tikhonov)", fontsize=9)
    a.legend(fontsize=7)
    return {
        "fraction_vs_lambda": plots.fraction_figure(
            [max(v, 1e-5) for v in lambdas], {"learned score": m["fraction_within"]},
            "lambda (0 drawn at 1e-5)"),
        "samples_lambda": plots.voronoi_grid(
            rec.array("train"), [rec.array(f"samples_{k}") for k in range(len(lambdas))],
            [f"lambda = {v:g}" for v in lambdas]),
        "score_norm_vs_t": fig,
        "denoiser_gap": plots.denoiser_gap_figure(
            m["denoiser_gap"], "learned denoisers against the empirical one"),
    }


# --- nn-early-stopping ----------------------------------------------------------------------
EARLY_PARAMS = ("score", "noise")


def compute_early(ctx: Context) -> dict[str, Any]:
    p = ctx.params
    _verdict_key(p)
    train = data.paper_points().to(ctx.device)
    x_T = _noise(ctx)

    sch = get_schedule(p["schedule"])

    def evaluate(step: int, model: ScoreMLP, ema: ScoreMLP) -> dict[str, Any]:
        """Samples of both parameterizations at this checkpoint, as fractions per delta,
        and their denoisers' gap to the empirical one."""
        net = ema if p["use_ema"] else model
        out: dict[str, Any] = {name: fraction_sweep([_sample(ctx, net, k, x_T)], train,
                                                    p["deltas"])
                               for k, name in enumerate(EARLY_PARAMS)}
        out["gap"] = {name: _gap(ctx, NetworkScore(net, sch, k))
                      for k, name in enumerate(EARLY_PARAMS)}
        return out

    trained = _train(ctx, [0.0, 0.0], EARLY_PARAMS, p["width"],
                     marks=checkpoint_steps(p["steps"], every=p["every"]), callback=evaluate)
    return {"evaluations": trained.evaluations}


def record_early(ctx: Context, raw: dict[str, Any]) -> Recorded:
    p = ctx.params
    steps = sorted(raw["evaluations"])
    curves = {name: {key: [raw["evaluations"][s][name][key][0] for s in steps]
                     for key in map(delta_key, p["deltas"])} for name in EARLY_PARAMS}
    gaps = {f"{name}, step {s}": raw["evaluations"][s]["gap"][name]
            for name in EARLY_PARAMS for s in steps}
    metrics = {"parameter": "steps", "values": steps, "n_samples": p["n_samples"],
               "weights": "ema" if p["use_ema"] else "raw",
               **{n: {"fraction_within": curves[n]} for n in EARLY_PARAMS},
               "denoiser_gap": gaps, "denoiser_gap_summary": _gap_summary(gaps)}
    return Recorded(metrics)


def judge_early(metrics: Mapping[str, Any], params: Mapping[str, Any]) -> Verdict:
    key = _verdict_key(params)
    curves = {n: metrics[n]["fraction_within"][key] for n in EARLY_PARAMS}
    steps = metrics["values"]
    grew = all(c[-1] >= c[0] for c in curves.values())
    faster = sum(curves["noise"]) >= sum(curves["score"])
    finding = ("; ".join(f"{n}: fraction within {key} goes {c[0]:.3f} -> {c[-1]:.3f}"
                         for n, c in curves.items())
               + f" over {steps[0]}..{steps[-1]} steps; the noise parameterization "
               + ("memorizes at least as fast" if faster else "memorizes more slowly"))
    signal = max(max(c) for c in curves.values()) >= MIN_SIGNAL
    ends = {k: v["follows_empirical_down_to_sigma"]
            for k, v in metrics["denoiser_gap_summary"].items()
            if k.endswith((f"step {steps[0]}", f"step {steps[-1]}"))}
    return Verdict.of(EARLY_CLAIM, grew and faster, finding + "; " + gap_text(ends),
                      judgeable=signal)


def draw_early(rec: Recorded, params: Mapping[str, Any]) -> dict[str, Any]:
    m = rec.metrics
    return {"fraction_vs_steps": plots.fraction_figure(
        m["values"], {f"{n} parameterization": m[n]["fraction_within"] for n in EARLY_PARAMS},
        "training steps", logx=False),
        "denoiser_gap": plots.denoiser_gap_figure(
            {k: v for k, v in m["denoiser_gap"].items() if k.startswith("score")},
            "score parameterization: denoiser against the empirical one, per checkpoint")}


# --- nn-width -------------------------------------------------------------------------------
def compute_width(ctx: Context) -> dict[str, Any]:
    p = ctx.params
    _verdict_key(p)
    x_T = _noise(ctx)
    samples, n_params = [], []
    for width in ctx.bar(p["values"], "widths"):
        trained = _train(ctx, [0.0], ["score"], width, tag=f"checkpoints_w{width}")
        model = trained.ema if p["use_ema"] else trained.model
        n_params.append(model.n_parameters())
        samples.append(_sample(ctx, model, 0, x_T))
    return {"samples": samples, "n_parameters": n_params}


def record_width(ctx: Context, raw: dict[str, Any]) -> Recorded:
    p = ctx.params
    train = data.paper_points().to(ctx.device)
    metrics = {"parameter": "width", "values": p["values"],
               "n_parameters": raw["n_parameters"], "n_samples": p["n_samples"],
               "steps": p["steps"],
               "fraction_within": fraction_sweep(raw["samples"], train, p["deltas"]),
               "weights": "ema" if p["use_ema"] else "raw"}
    return Recorded(metrics)


def judge_width(metrics: Mapping[str, Any], params: Mapping[str, Any]) -> Verdict:
    fracs = metrics["fraction_within"][_verdict_key(params)]
    ok = fracs[-1] >= fracs[0] and fracs[-1] > 0
    finding = (f"at {params['steps']} steps the fraction within {params['verdict_delta']} "
               f"goes from {fracs[0]:.3f} (width {params['values'][0]}) to {fracs[-1]:.3f} "
               f"(width {params['values'][-1]}): narrower networks memorize "
               + ("less" if ok else "as much or more"))
    return Verdict.of(WIDTH_CLAIM, ok, finding, judgeable=max(fracs) >= MIN_SIGNAL)


def draw_width(rec: Recorded, params: Mapping[str, Any]) -> dict[str, Any]:
    m = rec.metrics
    return {"fraction_vs_width": plots.fraction_figure(
        m["values"], {f"{m['steps']} steps": m["fraction_within"]}, "width")}


NN_TIKHONOV = Experiment(
    name="nn-tikhonov",
    cost=23,
    summary="MLP score (VP), one network per lambda in {0, 1e-4, 1e-3, 1e-2, 1e-1} trained "
            "together with penalty lambda E|s|^2 for 500k steps; fraction of 1000 samples "
            "within {1e-2, 5e-2, 1e-1, 5e-1} against lambda; score norms near a training point.",
    claim=TIKHONOV_CLAIM,
    defaults={**COMMON, "values": [0.0, 1e-4, 1e-3, 1e-2, 1e-1], "steps": 500_000,
              "checkpoint_every": 50_000, "use_ema": True, "probe_offset": 0.05},
    quick={**QUICK, "steps": 6000, "ema_half_life": half_life_from_decay(0.99),
           "checkpoint_every": 3000, "values": [0.0, 1e-2, 1e-1]},
    compute=compute_tikhonov, record=record_tikhonov, judge=judge_tikhonov,
    draw=draw_tikhonov,
)

NN_EARLY_STOPPING = Experiment(
    name="nn-early-stopping",
    cost=19,
    summary="MLP score (VP, lambda = 0), both parameterizations (score and noise): fraction "
            "of samples memorized at checkpoints every 10k steps up to 100k.",
    claim=EARLY_CLAIM,
    defaults={**COMMON, "steps": 100_000, "every": 10_000, "use_ema": False},
    quick={**QUICK, "steps": 6000, "every": 2000},
    compute=compute_early, record=record_early, judge=judge_early, draw=draw_early,
)

NN_WIDTH = Experiment(
    name="nn-width",
    cost=12,
    summary="MLP score (VP, lambda = 0) of widths 4 to 1024 at a fixed budget of steps: "
            "fraction memorized against width.",
    claim=WIDTH_CLAIM,
    defaults={**COMMON, "values": [4, 16, 64, 256, 1024], "steps": 20_000, "use_ema": False},
    quick={**QUICK, "values": [4, 256], "steps": 5000},
    compute=compute_width, record=record_width, judge=judge_width, draw=draw_width,
)
