"""Which regularization stops memorization at the least cost? Every regularizer on one plane:
memorized fraction against the distance of the samples to the true distribution.

* ``tradeoff-2d``: the paper's 20 points are draws from ``N(0, I_2)`` (the truth is known),
  and a second truth with structure (8 Gaussians on a circle, 50 points). Tikhonov ``c``,
  threshold ``tau``, kernel density ``h`` and smoothed ``lam`` over strength grids, plus the
  empirical and Gaussian end points and the score MLPs of ``nn-tikhonov``; energy distance
  and MMD to 10^5 fresh draws of the truth. References: the training set itself and fresh
  draws of its size.
* ``tradeoff-digits``: the same on scikit-learn's 8x8 digits with a held-out split: copies by
  the nn-ratio test against the pixel MMD to the held-out digits, the nearest-test over
  nearest-train distance ratio and a Fréchet distance in the features of a small classifier
  trained on the training split (a digits-only stand-in for FID).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffmem import data, images, plots
from diffmem.experiments.base import Context, Experiment, Recorded, Verdict
from diffmem.experiments.common import train_networks
from diffmem.metrics import (
    delta_key,
    energy_distance,
    fraction_within,
    frechet_distance,
    mean_log_density,
    median_bandwidth,
    mmd,
    nn_ratio,
    test_train_ratio,
    within_mean_distance,
    within_mean_kernel,
)
from diffmem.nn import MLPConfig, NetworkScore, ScoreMLP
from diffmem.samplers import sample_ode
from diffmem.schedules import get_schedule
from diffmem.scores import (
    EmpiricalScore,
    GaussianScore,
    KDEScore,
    SmoothedScore,
    ThresholdScore,
    TikhonovScore,
)
from diffmem.training import Checkpoints, half_life_from_decay, load_checkpoint

#: "Memorization is gone": a memorized fraction below this.
GONE = 0.05
#: Seed offsets: the samples' initial noise, the truth's reference draws, the fresh
#: training-size draws, the ring's training points.
SAMPLES_SEED, REFERENCE_SEED, FRESH_SEED, RING_SEED = 1000, 1100, 1200, 1300
#: Fresh training-size draws of the truth behind the "as good as a new sample" reference.
FRESH_DRAWS = 30
#: Points of the ring truth's training set.
RING_POINTS = 50
#: Reference draws the MMD uses (the energy distance uses all ``reference_n``).
MMD_REFERENCE = 20_000

CLAIM = ("Every regularizer, strong enough, stops memorization (memorized fraction below 5%); "
         "they differ in how far their samples then are from the true distribution.")

#: The closed-form regularizers: (name, parameter, score factory(train, schedule, value)).
Factory = Callable[[Tensor, Any, float], Any]


def _regularizers(params: Mapping[str, Any]) -> dict[str, tuple[str, list[float], Factory]]:
    draws = params["smoothed_draws"]
    return {
        "tikhonov": ("c", params["c_values"], lambda tr, s, v: TikhonovScore(tr, s, v)),
        "threshold": ("tau", params["tau_values"], lambda tr, s, v: ThresholdScore(tr, s, v)),
        "kde": ("h", params["h_values"], lambda tr, s, v: KDEScore(tr, s, v)),
        "smoothed": ("lam", params["lam_values"],
                     lambda tr, s, v: SmoothedScore(tr, s, v, n_draws=draws)),
    }


def _sample(ctx: Context, sch: Any, score: Any, x_T: Tensor) -> Tensor:
    p = ctx.params
    return sample_ode(sch, score, x_T, t_end=p["t_end"], rtol=p["rtol"],
                      atol=p["atol"]).samples


def _grid_samples(ctx: Context, train: Tensor, sch: Any, x_T: Tensor,
                  desc: str) -> dict[str, dict[str, Any]]:
    """Samples of every regularizer at every strength, and of the two end points."""
    out: dict[str, dict[str, Any]] = {}
    for name, (param, values, make) in _regularizers(ctx.params).items():
        out[name] = {"parameter": param, "values": list(values), "samples": [
            _sample(ctx, sch, make(train, sch, v), x_T)
            for v in ctx.bar(values, f"{desc}: {name}")]}
    out["empirical"] = {"parameter": None, "values": [None],
                        "samples": [_sample(ctx, sch, EmpiricalScore(train, sch), x_T)]}
    out["gaussian"] = {"parameter": None, "values": [None],
                       "samples": [_sample(ctx, sch, GaussianScore(train, sch), x_T)]}
    return out


def _best(regs: Mapping[str, Mapping[str, Any]], distance: str,
          key: str) -> dict[str, Any] | None:
    """The regularizer and strength whose memorized fraction (at ``key``) is below
    :data:`GONE` at the smallest ``distance``."""
    best = None
    for name, r in regs.items():
        for i, (value, frac, dist) in enumerate(zip(r["values"], r["memorized"][key],
                                                    r[distance], strict=True)):
            if frac < GONE and (best is None or dist < best["distance"]):
                best = {"regularizer": name, "parameter": r["parameter"], "value": value,
                        "index": i, "memorized": frac, "distance": dist}
    return best


def _pareto(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (smaller is better)."""
    return [i for i, (a, b) in enumerate(points)
            if not any((c <= a and d <= b) and (c < a or d < b) for c, d in points)]


# --- tradeoff-2d ------------------------------------------------------------------------------
def _truth_sets(seed: int) -> dict[str, tuple[Any, Tensor]]:
    ring = data.truth("ring")
    return {"gaussian": (data.truth("gaussian"), data.paper_points()),
            "ring": (ring, ring.sample(RING_POINTS, torch.Generator().manual_seed(
                seed + RING_SEED)))}


def _network_samples(ctx: Context) -> dict[str, Any]:
    """The score MLPs of ``nn-tikhonov`` (its latest checkpoint in the same output folder),
    else a shorter training of the same sweep here; their samples (VP)."""
    p = ctx.params
    lambdas = p["network_lambdas"]
    folder = ctx.out.parent / "nn-tikhonov" / "checkpoints"
    latest = Checkpoints(folder, "").latest()
    source = None
    model = None
    if latest is not None:
        state = load_checkpoint(latest)
        cfg = state.get("config", {})
        if list(cfg.get("lambdas", [])) == list(lambdas):
            model = ScoreMLP(MLPConfig(dim=2, **cfg.get("mlp", {})), cfg["parameterizations"])
            model.load_state_dict(state["ema"])
            source = f"nn-tikhonov checkpoint {latest.name} ({int(state['step'])} steps)"
            steps = int(state["step"])
    if model is None:
        trained = train_networks(ctx, data.paper_points(), lambdas=lambdas,
                                 parameterizations=["score"] * len(lambdas),
                                 steps=p["network_steps"], width=256, batch_size=None,
                                 ema_half_life=p["network_ema_half_life"],
                                 tag="checkpoints_networks")
        model, steps = trained.ema, p["network_steps"]
        source = f"trained here for {steps} steps (no nn-tikhonov checkpoint in the folder)"
    sch = get_schedule("VP")  # nn-tikhonov's schedule
    noise = ctx.noise(p["n_samples"], (2,), float(sch.sigma(sch.T)), offset=SAMPLES_SEED)
    samples = [sample_ode(sch, NetworkScore(model.to(ctx.device), sch, k), noise,
                          t_end=1e-3).samples for k in range(len(lambdas))]
    return {"parameter": "lambda", "values": list(lambdas), "samples": samples,
            "source": source, "steps": steps}


def compute_2d(ctx: Context) -> dict[str, Any]:
    p = ctx.params
    sch = get_schedule(p["schedule"])
    out: dict[str, Any] = {}
    for t_name, (law, train) in _truth_sets(ctx.seed).items():
        if t_name not in p["truths"]:
            continue
        x_T = ctx.noise(p["n_samples"], (2,), float(sch.sigma(sch.T)), offset=SAMPLES_SEED)
        regs = _grid_samples(ctx, train.to(ctx.device), sch, x_T, t_name)
        if t_name == "gaussian" and p["network"]:
            regs["network"] = _network_samples(ctx)
        reference = law.sample(p["reference_n"], ctx.generator(REFERENCE_SEED))
        fresh = [law.sample(train.shape[0], ctx.generator(FRESH_SEED + i))
                 for i in range(FRESH_DRAWS)]
        out[t_name] = {"law": law, "train": train, "regs": regs, "reference": reference,
                       "fresh": fresh}
    return out


def record_2d(ctx: Context, raw: dict[str, Any]) -> Recorded:
    p = ctx.params
    metrics: dict[str, Any] = {"n_samples": p["n_samples"], "reference_n": p["reference_n"],
                               "mmd_reference_n": min(p["reference_n"], MMD_REFERENCE),
                               "deltas": p["deltas"], "units": {
                                   "energy_distance": "data units",
                                   "mmd": "squared MMD, Gaussian kernel, dimensionless",
                                   "mean_log_density": "nats"}, "truths": {}}
    arrays: dict[str, Any] = {}
    for t_name, r in raw.items():
        ref, train = r["reference"], r["train"]
        mmd_ref = ref[:MMD_REFERENCE]
        within = within_mean_distance(ref)
        bw = median_bandwidth(train, ref)
        k_within = within_mean_kernel(mmd_ref, bw)

        def scores(s: Tensor, ref: Tensor = ref, within: float = within, bw: float = bw,
                   mmd_ref: Tensor = mmd_ref, k_within: float = k_within,
                   empirical: bool = False) -> tuple[float, float]:
            """Energy distance and MMD of the samples' law to the truth; ``empirical``: the
            points are the law itself (a training set reproduced exactly)."""
            return (energy_distance(s.cpu(), ref, y_within=within, x_empirical=empirical),
                    mmd(s.cpu(), mmd_ref, bandwidth=bw, x_empirical=empirical,
                        y_within=k_within))

        regs_out = {}
        for name, reg in r["regs"].items():
            entry: dict[str, Any] = {"parameter": reg["parameter"], "values": reg["values"],
                                     "memorized": {delta_key(d): [] for d in p["deltas"]},
                                     "energy_distance": [], "mmd": [], "mean_log_density": []}
            for i, s in enumerate(reg["samples"]):
                for d, f in fraction_within(s, train.to(s), p["deltas"]).items():
                    entry["memorized"][delta_key(d)].append(f)
                e, m = scores(s)
                entry["energy_distance"].append(e)
                entry["mmd"].append(m)
                entry["mean_log_density"].append(mean_log_density(s.cpu(), r["law"].log_density))
                arrays[f"{t_name}_{name}_{i}"] = s.cpu()
            if "source" in reg:
                entry["source"], entry["steps"] = reg["source"], reg["steps"]
            regs_out[name] = entry
        fresh = [scores(f, empirical=True) for f in r["fresh"]]
        e_fresh = [e for e, _ in fresh]
        e_train, m_train = scores(train, empirical=True)
        metrics["truths"][t_name] = {
            "n_train": int(train.shape[0]), "mmd_bandwidth": bw, "regularizers": regs_out,
            "references": {
                "training_set": {"energy_distance": e_train, "mmd": m_train,
                                 "memorized": 1.0},
                "fresh_draws": {"n_draws": len(fresh), "energy_distance_mean":
                                float(np.mean(e_fresh)), "energy_distance_sd":
                                float(np.std(e_fresh)), "mmd_mean":
                                float(np.mean([m for _, m in fresh]))}},
            "best": _best(regs_out, "energy_distance", delta_key(p["deltas"][0]))}
        arrays[f"{t_name}_train"] = train
    return Recorded(metrics, arrays)


def _judge(groups: Mapping[str, Any], distance: str, key: str, unit: str = "",
           extra: str = "") -> Verdict:
    """Confirmed when every closed-form regularizer brings the memorized fraction (at
    ``key``) below 5% somewhere in its grid (inconclusive when a grid stops short); the
    finding names, per group, the regularizer that gets there at the smallest distance."""
    notes, reached_all = [], True
    for group, m in groups.items():
        regs = m["regularizers"]
        closed = [n for n in ("tikhonov", "threshold", "kde", "smoothed") if n in regs]
        reached = {n: min(regs[n]["memorized"][key]) < GONE for n in closed}
        reached_all &= all(reached.values())
        best = m["best"]
        label = distance.replace("_", " ")
        where = "none" if best is None else (
            f"{best['regularizer']}" + (f" ({best['parameter']} = {best['value']:.3g})"
                                        if best["parameter"] else "")
            + f": memorized {best['memorized']:.3f} at {label} {best['distance']:.4g}")
        ranked = sorted(
            (min(d for f, d in zip(r["memorized"][key], r[distance], strict=True) if f < GONE),
             n) for n, r in regs.items() if any(f < GONE for f in r["memorized"][key]))
        order = ", ".join(f"{n} {d:.4g}" for d, n in ranked)
        missing = [n for n, ok in reached.items() if not ok]
        notes.append(f"{group}: best {where}{unit}; smallest {label} once below 5%: {order}"
                     + (f"; not below 5% in its grid: {missing}" if missing else ""))
    return Verdict.of(CLAIM, reached_all, "; ".join(notes) + extra, judgeable=reached_all)


def judge_2d(metrics: Mapping[str, Any], params: Mapping[str, Any]) -> Verdict:
    extra = "; references (energy distance): " + ", ".join(
        f"{t}: training set {m['references']['training_set']['energy_distance']:.4g}, fresh "
        f"draws {m['references']['fresh_draws']['energy_distance_mean']:.4g} +- "
        f"{m['references']['fresh_draws']['energy_distance_sd']:.2g}"
        for t, m in metrics["truths"].items())
    return _judge(metrics["truths"], "energy_distance", delta_key(params["deltas"][0]),
                  extra=extra)


def _plane(ax: Any, regs: Mapping[str, Mapping[str, Any]], distance: str, key: str,
           refs: Mapping[str, float], title: str, xlabel: str) -> None:
    """One curve per regularizer (strengths labelled), the Pareto front, the references."""
    points: list[tuple[float, float]] = []
    for i, (name, r) in enumerate(regs.items()):
        xs, ys = r[distance], r["memorized"][key]
        ax.plot(xs, ys, "o-" if len(xs) > 1 else "s", color=f"C{i}", label=name, ms=5)
        if r["parameter"]:
            for v, x, y in zip(r["values"], xs, ys, strict=True):
                ax.annotate(f"{v:.2g}", (x, y), fontsize=6, xytext=(3, 3),
                            textcoords="offset points", color=f"C{i}")
        points += list(zip(xs, ys, strict=True))
    front = sorted(points[i] for i in _pareto(points))
    if front:
        ax.plot(*zip(*front, strict=True), "k--", lw=1, zorder=0)
        ax.scatter(*zip(*front, strict=True), s=110, facecolors="none", edgecolors="k",
                   linewidths=1.2, label="Pareto front", zorder=5)
    positive = all(x > 0 for x, _ in points)  # unbiased estimates may dip below 0
    for label, x in refs.items():
        if x > 0 or not positive:  # a reference at or below 0 has no place on a log axis
            ax.axvline(x, color="0.5", ls=":", lw=1)
            ax.text(x, 0.5, label, rotation=90, fontsize=6, va="center", ha="right",
                    color="0.3", transform=ax.get_xaxis_transform(), clip_on=True)
    ax.axhline(GONE, color="C3", lw=0.8, ls=":")
    ax.set_xscale("log" if positive else "linear")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"memorized fraction (delta = {key})")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="center right")


def _first_gone(r: Mapping[str, Any], key: str) -> int | None:
    """The first strength (in grid order) whose memorized fraction is below 5%."""
    return next((i for i, f in enumerate(r["memorized"][key]) if f < GONE), None)


def draw_2d(rec: Recorded, params: Mapping[str, Any]) -> dict[str, Any]:
    figs = {}
    key = delta_key(params["deltas"][0])
    for t_name, m in rec.metrics["truths"].items():
        refs = m["references"]
        fig, ax = plots.figure(1, 1, size=6.0)
        _plane(ax[0, 0], m["regularizers"], "energy_distance", key,
               {"training set": refs["training_set"]["energy_distance"],
                "fresh draws": refs["fresh_draws"]["energy_distance_mean"]},
               f"{t_name}: memorization against distance to the truth", "energy distance")
        figs[f"tradeoff_{t_name}"] = fig
        regs = m["regularizers"]
        shown = [(n, _first_gone(r, key)) for n, r in regs.items()]
        shown = [(n, i) for n, i in shown if i is not None]
        titles = [f"{n}" + (f" {regs[n]['parameter']} = {regs[n]['values'][i]:.2g}"
                            if regs[n]["parameter"] else "") for n, i in shown]
        train = rec.array(f"{t_name}_train")
        sets = [rec.array(f"{t_name}_{n}_{i}") for n, i in shown]
        if sets:
            figs[f"samples_{t_name}"] = plots.voronoi_grid(train, sets, titles,
                                                           cols=min(4, len(sets)), size=3.0)
    return figs


# --- tradeoff-digits --------------------------------------------------------------------------
class DigitFeatures:
    """The hidden-layer activations of a small scikit-learn MLP classifier trained on the
    training digits: a feature space for a Fréchet distance on 8x8 digits (a digits-only
    stand-in for FID, whose Inception features do not apply to 8x8 images)."""

    def __init__(self, train: Tensor, labels: Tensor, seed: int = 0) -> None:
        from sklearn.neural_network import MLPClassifier

        self.model = MLPClassifier(hidden_layer_sizes=(64,), max_iter=400, random_state=seed)
        self.model.fit(train.numpy(), labels.numpy())
        self.accuracy = float(self.model.score(train.numpy(), labels.numpy()))

    def __call__(self, x: Tensor) -> Tensor:
        w, b = self.model.coefs_[0], self.model.intercepts_[0]
        return torch.from_numpy(np.maximum(x.cpu().numpy() @ w + b, 0))


def compute_digits(ctx: Context) -> dict[str, Any]:
    p = ctx.params
    sch = get_schedule(p["schedule"])
    (train, held), (labels, _) = images.digit_split(p["n_train"], labels=True)
    x_T = ctx.noise(p["n_samples"], (64,), float(sch.sigma(sch.T)), offset=SAMPLES_SEED)
    regs = _grid_samples(ctx, train.to(ctx.device), sch, x_T, "digits")
    return {"train": train, "held": held, "labels": labels, "regs": regs}


def record_digits(ctx: Context, raw: dict[str, Any]) -> Recorded:
    p = ctx.params
    train, held = raw["train"], raw["held"]
    features = DigitFeatures(train, raw["labels"], ctx.seed)
    held_features = features(held)
    bw = median_bandwidth(train, held)
    regs_out = {}
    arrays: dict[str, Any] = {}
    for name, reg in raw["regs"].items():
        entry: dict[str, Any] = {"parameter": reg["parameter"], "values": reg["values"],
                                 "memorized": {delta_key(d): [] for d in p["deltas"]},
                                 "copies_nn_ratio": [], "mmd_to_test": [],
                                 "test_train_ratio_median": [], "frechet_features": [],
                                 "energy_distance_to_test": []}
        for i, s in enumerate(reg["samples"]):
            s = s.cpu()
            for d, f in fraction_within(s, train, p["deltas"]).items():
                entry["memorized"][delta_key(d)].append(f)
            entry["copies_nn_ratio"].append(nn_ratio(s, train, bootstrap=100).fraction)
            entry["mmd_to_test"].append(mmd(s, held, bandwidth=bw))
            entry["test_train_ratio_median"].append(float(test_train_ratio(s, train,
                                                                           held).median()))
            entry["frechet_features"].append(frechet_distance(features(s), held_features))
            entry["energy_distance_to_test"].append(energy_distance(s, held))
            arrays[f"{name}_{i}"] = s[: p["show"]].reshape(-1, 8, 8)
        regs_out[name] = entry
    refs = {"training_set": {"mmd_to_test": mmd(train, held, bandwidth=bw, x_empirical=True),
                             "frechet_features": frechet_distance(features(train),
                                                                  held_features),
                             "energy_distance_to_test": energy_distance(
                                 train, held, x_empirical=True)}}
    metrics = {"n_train": int(train.shape[0]), "n_test": int(held.shape[0]),
               "n_samples": p["n_samples"], "deltas": p["deltas"],
               "classifier_train_accuracy": features.accuracy, "mmd_bandwidth": bw,
               "units": {"mmd_to_test": "squared MMD, Gaussian kernel, dimensionless",
                         "frechet_features": "squared feature units (classifier ReLU)",
                         "test_train_ratio_median": "dimensionless",
                         "energy_distance_to_test": "pixel units"},
               "regularizers": regs_out, "references": refs}
    for r in regs_out.values():  # nn-ratio copies as the memorization axis
        r["memorized"]["nn_ratio"] = r["copies_nn_ratio"]
    metrics["best"] = _best(regs_out, "frechet_features", "nn_ratio")
    return Recorded(metrics, arrays)


def judge_digits(metrics: Mapping[str, Any], params: Mapping[str, Any]) -> Verdict:
    return _judge({"digits": metrics}, "frechet_features", "nn_ratio",
                  " (Fréchet distance in classifier features)")


def draw_digits(rec: Recorded, params: Mapping[str, Any]) -> dict[str, Any]:
    m = rec.metrics
    fig, ax = plots.figure(1, 2, size=5.5)
    refs = m["references"]["training_set"]
    _plane(ax[0, 0], m["regularizers"], "frechet_features", "nn_ratio",
           {"training set": refs["frechet_features"]},
           "digits: copies against Fréchet distance (classifier features)",
           "Fréchet distance to held-out digits")
    _plane(ax[0, 1], m["regularizers"], "mmd_to_test", "nn_ratio",
           {"training set": refs["mmd_to_test"]}, "digits: copies against pixel MMD",
           "MMD^2 to held-out digits")
    for a in ax[0]:
        a.set_ylabel("copies (nn ratio < 1/3)")
    rows = []
    for name, r in m["regularizers"].items():
        i = _first_gone(r, "nn_ratio")
        if i is not None:
            label = name + (f"\n{r['parameter']}={r['values'][i]:.2g}"
                            if r["parameter"] else "")
            rows.append((label, rec.array(f"{name}_{i}")))
    figs = {"tradeoff_digits": fig}
    if rows:
        figs["samples_digits"] = plots.image_rows(rows, params["show"], size=0.9)
    return figs


COMMON = {"schedule": "VE", "t_end": 1e-6, "rtol": 1e-5, "atol": 1e-5, "deltas": [1e-2, 1e-1],
          "smoothed_draws": 32}

TRADEOFF_2D = Experiment(
    name="tradeoff-2d",
    cost=19,
    summary="Every regularizer on one plane (2-D, known truths N(0, I) and 8 Gaussians on a "
            "circle): memorized fraction against energy distance to 10^5 fresh draws of the "
            "truth, for Tikhonov c, threshold tau, KDE h, smoothed lam, the empirical and "
            "Gaussian end points and the nn-tikhonov MLPs.",
    claim=CLAIM,
    defaults={**COMMON, "truths": ["gaussian", "ring"], "n_samples": 1000,
              "reference_n": 100_000,
              "c_values": [float(v) for v in np.logspace(-4, 0, 9)],
              "tau_values": [float(v) for v in np.logspace(-3, 1, 9)],
              "h_values": [float(v) for v in np.logspace(-2.5, 0, 9)],
              "lam_values": [float(v) for v in np.logspace(-2, 0, 7)],
              "network": True, "network_lambdas": [0.0, 1e-4, 1e-3, 1e-2, 1e-1],
              "network_steps": 20_000,
              "network_ema_half_life": half_life_from_decay(0.999)},
    quick={"n_samples": 200, "reference_n": 20_000, "c_values": [1e-3, 1e-2, 1e-1, 1.0],
           "tau_values": [1e-2, 1e-1, 1.0, 10.0], "h_values": [0.01, 0.1, 0.3, 1.0],
           "lam_values": [0.03, 0.1, 0.3, 1.0], "smoothed_draws": 16,
           "network_steps": 1000, "network_ema_half_life": 69.0},
    compute=compute_2d, record=record_2d, judge=judge_2d, draw=draw_2d,
)

TRADEOFF_DIGITS = Experiment(
    name="tradeoff-digits",
    cost=8,
    summary="Every regularizer on one plane for scikit-learn's 8x8 digits with a held-out "
            "split: copies by the nn-ratio test against the Fréchet distance in a small "
            "classifier's features (a digits-only stand-in for FID) and the pixel MMD to the "
            "held-out digits.",
    claim=CLAIM,
    defaults={**COMMON, "schedule": "VP", "t_end": 1e-3, "n_train": 1500, "n_samples": 300,
              "deltas": [0.5, 1.0], "show": 8,
              "c_values": [float(v) for v in np.logspace(-3, 0, 7)],
              "tau_values": [float(v) for v in np.logspace(-24, -6, 7)],
              "h_values": [float(v) for v in np.logspace(-1.5, 0, 7)],
              "lam_values": [float(v) for v in np.logspace(-1.5, 0, 5)],
              "smoothed_draws": 8},
    quick={"n_samples": 60, "c_values": [1e-2, 1e-1, 1.0], "tau_values": [1e-20, 1e-12, 1e-6],
           "h_values": [0.1, 0.3, 1.0], "lam_values": [0.1, 0.5, 1.0], "smoothed_draws": 4,
           "show": 6},
    compute=compute_digits, record=record_digits, judge=judge_digits, draw=draw_digits,
)

__all__ = ["DigitFeatures", "TRADEOFF_2D", "TRADEOFF_DIGITS"]
