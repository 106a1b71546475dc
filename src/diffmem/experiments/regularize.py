"""``regularize-digits``: the paper's cures applied in a plain diffusers training loop.

A diffusers ``UNet2DModel`` with ``DDPMScheduler`` (epsilon prediction) is trained on a few of
scikit-learn's 8x8 digits three ways, as ``examples/train_diffusers.py`` does:

* ``plain``: the mean-squared noise loss, for ``steps`` steps;
* ``penalty``: plus :func:`diffmem.regularize.diffusers_tikhonov_penalty` with ``lam``;
* ``early_stop``: plain, stopped by :class:`diffmem.monitor.MemorizationMonitor` (updates every
  ``every`` steps; its default data-derived stop level).

Each is sampled from the same noise with DDIM (``sample_steps``), and judged on the trade-off
plane: the copied fraction (the audit's nn-ratio test, :func:`diffmem.audit.audit`) against the
Fréchet distance to held-out digits in a small classifier's features (as ``tradeoff-digits``).
Training is checkpointed every ``every`` steps; ``--resume`` continues each run, monitor
records included.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from diffmem import images, plots
from diffmem.audit import audit
from diffmem.experiments.base import (
    CONFIRMED,
    INCONCLUSIVE,
    NOT_REPRODUCED,
    Claim,
    Context,
    Experiment,
    FolderLock,
    Recorded,
    Verdict,
)
from diffmem.experiments.tradeoff import DigitFeatures
from diffmem.metrics import frechet_distance
from diffmem.training import Checkpoints, check_losses, fingerprint, restore_rng

CLAIM = ("Regularization prevents memorization in a user's own training loop: the Tikhonov "
         "penalty and early stopping by the memorization monitor each copy fewer training "
         "digits than plain training, which memorizes.")
#: The plain run must copy at least this fraction for the comparison to be judged.
MEMORIZED = 0.5
RUNS = ("plain", "penalty", "early_stop")
SAMPLES_SEED = 7_000  # the sampling noise's seed offset, shared by the three runs


def make_unet(width: int, seed: int, num_classes: int | None = None) -> Any:
    """A small ``UNet2DModel`` for 1x8x8 images (class-conditional with ``num_classes``
    embeddings), initialised from ``seed`` (the global random state is left as it was)."""
    from diffusers import UNet2DModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                           block_out_channels=(width, 2 * width), norm_num_groups=8,
                           down_block_types=("DownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "UpBlock2D"),
                           num_class_embeds=num_classes)


def train_target(scheduler: Any, batch: torch.Tensor, noise: torch.Tensor,
                 timesteps: torch.Tensor) -> torch.Tensor:
    """What a diffusers network is trained to output under its scheduler's
    ``prediction_type``: the noise (``epsilon``), ``v = sqrt(abar) eps - sqrt(1 - abar) x0``
    (``v_prediction``) or the clean sample (``sample``)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(batch, noise, timesteps)
    if kind == "sample":
        return batch
    raise ValueError(f"prediction_type: expected epsilon, v_prediction or sample, received "
                     f"{kind!r}")


def train_run(ctx: Context, name: str, train: torch.Tensor, lam: float,
              monitor: Any = None, labels: torch.Tensor | None = None,
              p_uncond: float = 0.1, scheduler: dict[str, Any] | None = None,
              seed: int | None = None, cure: Mapping[str, float] | None = None
              ) -> dict[str, Any]:
    """One training run (module docstring), checkpointed every ``every`` steps. With
    ``labels`` the UNet is class-conditional: ``labels.max() + 2`` embeddings, the last the
    null class, given instead of the label with probability ``p_uncond`` (label dropout for
    classifier-free guidance). ``scheduler`` is a ``DDPMScheduler`` config (default: linear
    betas, epsilon prediction); the loss is the mean squared error to its prediction type's
    target (:func:`train_target`). ``seed`` (default the context's) seeds the network and the
    batches. ``cure`` (class-conditional only) adds training-time cures:
    ``label_randomization: p``, each item's label replaced with probability ``p`` by a label
    drawn uniformly (Somepalli et al.'s caption randomization, for labels), and
    ``loss_filter: tau``, the items whose ``|out(y) - out(null)| / sqrt(d)`` (the network's
    output units per coordinate) exceeds ``tau`` left out of the loss (Wen et al.'s filter).
    Without a monitor and under ``reproduce`` (:attr:`Context.shared`), the run is kept in the
    shared folder under its fingerprint, so another experiment that trains the same network
    on the same data loads it (``reused`` true in what it returns) instead of training again.
    Returns the model, its scheduler, the steps run, the training and monitoring seconds and
    the items the filter left out."""
    from diffusers import DDPMScheduler

    p = ctx.params
    seed = ctx.seed if seed is None else seed
    null = None if labels is None else int(labels.max()) + 1
    model = make_unet(p["width"], seed, None if null is None else null + 1)
    scheduler = DDPMScheduler(**{"num_train_timesteps": 1000, **(scheduler or {})})
    config = {k: p[k] for k in ("width", "lr", "batch_size", "steps", "every")}
    key = fingerprint({**config, "lam": lam, "monitor": monitor is not None, "seed": seed,
                       "p_uncond": p_uncond, **({"cure": dict(cure)} if cure else {}),
                       "scheduler": {k: v for k, v in scheduler.config.items()
                                     if not k.startswith("_")}}, train,
                      None if labels is None else labels.double())
    folder, resume, lock = ctx.out / f"checkpoints_{name}", ctx.resume, nullcontext()
    if ctx.shared is not None and monitor is None:
        folder, resume = ctx.shared / f"unet-{key[:24]}", True  # emptied by a fresh run
        folder.mkdir(parents=True, exist_ok=True)
        lock = FolderLock(folder, wait=True)
    with lock:
        run = _train_loop(ctx, name, model, scheduler, train, labels, null, lam, monitor,
                          p_uncond, dict(cure or {}), seed, Checkpoints(folder, key, keep=2),
                          resume)
    return {"model": model.eval(), "scheduler": scheduler, "null": null, **run}


def _train_loop(ctx: Context, name: str, model: Any, scheduler: Any, train: torch.Tensor,
                labels: torch.Tensor | None, null: int | None, lam: float, monitor: Any,
                p_uncond: float, cure: dict[str, float], seed: int, ckpt: Checkpoints,
                resume: bool) -> dict[str, Any]:
    """:func:`train_run`'s loop from the latest checkpoint of ``ckpt`` (with ``resume``) to
    ``steps``, the last step always saved; the steps run, the seconds (those of the
    checkpoint's earlier steps included) and whether nothing was left to train (``reused``)."""
    from diffmem.regularize import diffusers_tikhonov_penalty

    p = ctx.params
    opt = torch.optim.AdamW(model.parameters(), lr=p["lr"])
    gen = torch.Generator().manual_seed(seed)
    start, losses, monitor_s, filtered, before = 0, [], 0.0, 0, 0.0
    if resume and (state := ckpt.load_latest()) is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        restore_rng(gen, state["rng"])
        start, losses = int(state["step"]), list(state["losses"])
        filtered, before = int(state.get("filtered", 0)), float(state.get("train_s", 0.0))
        if monitor is not None:
            monitor.restore(json.loads(state["monitor"]))
    began = time.perf_counter()
    steps_run = start
    for step in ctx.bar(range(start + 1, p["steps"] + 1), f"{name} training"):
        if monitor is not None and monitor.should_stop:
            break
        loss, pred, noisy, k, dropped = _class_loss(model, scheduler, train, labels, null,
                                                     p["batch_size"], p_uncond, cure, gen)
        filtered += dropped
        if lam > 0:
            loss = loss + diffusers_tikhonov_penalty(pred, noisy, k, scheduler, lam).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        check_losses(losses[-1], step, p["lr"], ckpt.latest())
        steps_run = step
        if step % p["every"] == 0 and monitor is not None:
            tick = time.perf_counter()
            monitor.update(step, (model, scheduler))
            monitor_s += time.perf_counter() - tick
        if step % p["every"] == 0 or step == p["steps"]:
            ckpt.save(step, {"model": model.state_dict(), "opt": opt.state_dict(),
                             "rng": gen.get_state(), "losses": losses, "filtered": filtered,
                             "train_s": before + time.perf_counter() - began - monitor_s,
                             "monitor": json.dumps(monitor.records if monitor else [])})
    total = time.perf_counter() - began
    return {"steps": steps_run, "train_s": before + total - monitor_s, "monitor_s": monitor_s,
            "losses": losses, "filtered": filtered, "reused": steps_run == start > 0}


def _class_loss(model: Any, scheduler: Any, train: torch.Tensor, labels: torch.Tensor | None,
                null: int | None, batch_size: int, p_uncond: float, cure: dict[str, float],
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                               torch.Tensor, int]:
    """One step's loss of :func:`train_run` on a batch drawn from ``gen`` (the label dropped
    to ``null`` with probability ``p_uncond``, and the training-time cures of ``cure``); the
    prediction, noisy batch and timesteps (for the penalty) and the items the filter left
    out."""
    rows = torch.randint(0, train.shape[0], (batch_size,), generator=gen)
    batch = train[rows]
    noise = torch.randn(batch.shape, generator=gen)
    k = torch.randint(0, 1000, (batch.shape[0],), generator=gen)
    noisy = scheduler.add_noise(batch, noise, k)
    if labels is None:
        pred = model(noisy, k).sample
    else:
        assert null is not None
        drop = torch.rand(batch.shape[0], generator=gen) < p_uncond
        y = labels[rows]
        if cure.get("label_randomization", 0) > 0:  # a random label instead
            swap = torch.rand(batch.shape[0], generator=gen) < cure["label_randomization"]
            y = torch.where(swap, torch.randint(0, null, y.shape, generator=gen), y)
        y = torch.where(drop, torch.full_like(y, null), y)
        pred = model(noisy, k, class_labels=y).sample
    target = train_target(scheduler, batch, noise, k)
    if labels is not None and cure.get("loss_filter") is not None:
        with torch.no_grad():
            empty = model(noisy, k, class_labels=torch.full_like(y, null)).sample
        gap = (pred.detach() - empty).flatten(1).norm(dim=1) / math.sqrt(batch[0].numel())
        kept = (gap <= cure["loss_filter"]) | (y == null)
        return (((pred - target) ** 2).flatten(1).mean(1) * kept).mean(), pred, noisy, k, \
            int((~kept).sum())
    return F.mse_loss(pred, target), pred, noisy, k, 0


def compute(ctx: Context) -> dict[str, Any]:
    from diffusers import DDIMScheduler

    from diffmem.monitor import MemorizationMonitor
    from diffmem.pipeline import pipeline_sample

    p = ctx.params
    (train01, held01), (_, held_labels) = images.digit_split(p["n_train"], labels=True)
    train = (train01.reshape(-1, 1, 8, 8) * 2 - 1).float()
    z = torch.randn(p["n_samples"], 1, 8, 8, generator=ctx.generator(SAMPLES_SEED))
    runs: dict[str, Any] = {}
    monitor = None
    for name in RUNS:
        if name == "early_stop":
            monitor = MemorizationMonitor(train, _scheduler(), seed=ctx.seed,
                                          n_points=p["monitor_points"], every=p["every"],
                                          out=ctx.out / "monitor")
        run = train_run(ctx, name, train, p["lam"] if name == "penalty" else 0.0,
                        monitor if name == "early_stop" else None)
        ddim = DDIMScheduler.from_config(run["scheduler"].config)
        net = run["model"]
        samples = pipeline_sample(lambda x, k, y, net=net: net(x, k).sample, z, ddim,
                                  p["sample_steps"], eta=0.0)
        run["samples"] = ((samples.clamp(-1, 1) + 1) / 2).to(torch.float64)
        runs[name] = run
    return {"train": train01, "held": held01, "held_labels": held_labels, "runs": runs,
            "monitor": monitor}


def _scheduler() -> Any:
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000)


def record(ctx: Context, raw: dict[str, Any]) -> Recorded:
    p = ctx.params
    train, held = raw["train"], raw["held"]
    features = DigitFeatures(held, raw["held_labels"], ctx.seed)
    held_features = features(held)
    metrics: dict[str, Any] = {"n_train": p["n_train"], "n_samples": p["n_samples"],
                               "lam": p["lam"], "units": {
                                   "memorized": "fraction of samples that are nn-ratio copies "
                                                "(d1/d2 < 1/3)",
                                   "distance": "Fréchet distance to held-out digits in a "
                                               "classifier's features (squared feature units)"},
                               "runs": {}}
    arrays: dict[str, Any] = {}
    for name, run in raw["runs"].items():
        flat = run["samples"].reshape(run["samples"].shape[0], -1)
        result = audit(flat, train, bootstrap=200, seed=ctx.seed)
        metrics["runs"][name] = {
            "memorized": result.nn_ratio["fraction"],
            "memorized_ci": [result.nn_ratio["ci_low"], result.nn_ratio["ci_high"]],
            "distance": frechet_distance(features(flat), held_features),
            "stopped_at": raw["monitor"].stopped_at if name == "early_stop" else None,
            "steps": run["steps"], "train_s": run["train_s"], "monitor_s": run["monitor_s"],
            "final_loss_mean_100": sum(run["losses"][-100:]) / max(1, min(100, len(
                run["losses"])))}
        arrays[f"samples_{name}"] = run["samples"][: p["show"]]
    early = metrics["runs"]["early_stop"]
    metrics["monitor"] = {**raw["monitor"].summary(),
                          "overhead": early["monitor_s"] / early["train_s"]
                          if early["train_s"] > 0 else None}
    metrics["reference_distance_train"] = frechet_distance(features(train), held_features)
    arrays["train"] = train[: p["show"]].reshape(-1, 1, 8, 8)
    return Recorded(metrics, arrays)


def judge(metrics: Mapping[str, Any], params: Mapping[str, Any]) -> Verdict:
    runs = metrics["runs"]
    mem = {name: r["memorized"] for name, r in runs.items()}
    text = ", ".join(f"{n} {v:.2f} (distance {runs[n]['distance']:.2f})" for n, v in mem.items())
    stopped = runs["early_stop"]["stopped_at"]
    stop_text = (f"; the monitor stopped training at step {stopped}" if stopped
                 else "; the monitor never asked to stop")
    if mem["plain"] < MEMORIZED:
        status = INCONCLUSIVE
        finding = (f"plain training copied {mem['plain']:.2f} < {MEMORIZED} of its samples: "
                   f"too short to memorize, so the cures cannot be judged ({text})")
    elif mem["penalty"] < mem["plain"] and mem["early_stop"] < mem["plain"]:
        status, finding = CONFIRMED, f"copied fractions: {text}"
    else:
        status, finding = NOT_REPRODUCED, f"not every cure copies less: {text}"
    return Verdict((Claim(CLAIM, status, finding + stop_text),))


def draw(rec: Recorded, params: Mapping[str, Any]) -> dict[str, Any]:
    m = rec.metrics
    fig, ax = plots.figure(1, 1, size=4.5)
    a = ax[0, 0]
    for i, (name, r) in enumerate(m["runs"].items()):
        a.errorbar([r["distance"]], [r["memorized"]],
                   yerr=[[r["memorized"] - r["memorized_ci"][0]],
                         [r["memorized_ci"][1] - r["memorized"]]],
                   fmt="o", color=f"C{i}", label=f"{name} ({r['steps']} steps)")
    a.axvline(m["reference_distance_train"], color="0.6", lw=0.8, ls=":",
              label="training set itself")
    a.set(xscale="log", xlabel="Fréchet distance to held-out digits (classifier features)",
          ylabel="copied fraction (nn-ratio)", ylim=(-0.03, 1.03),
          title="plain, penalized and early-stopped training")
    a.legend(fontsize=7)
    rows = [("training", rec.array("train"))] + [
        (name, rec.array(f"samples_{name}")) for name in m["runs"]]
    return {"tradeoff": fig, "samples": plots.image_rows(rows, params["show"], size=0.9)}


REGULARIZE_DIGITS = Experiment(
    name="regularize-digits",
    cost=145,
    summary="A diffusers UNet2DModel + DDPMScheduler trained in a plain loop on a few 8x8 "
            "digits: plain, with the Tikhonov penalty (diffmem.regularize), and stopped by "
            "the memorization monitor (diffmem.monitor); copied fraction against the "
            "Fréchet distance to held-out digits. Needs diffusers.",
    claim=CLAIM,
    defaults={"n_train": 32, "steps": 8000, "every": 500, "lam": 0.05, "lr": 2e-3,
              "batch_size": 32, "width": 32, "n_samples": 100, "sample_steps": 50,
              "monitor_points": 64, "show": 8},
    quick={"n_train": 16, "steps": 2000, "every": 500, "width": 16, "n_samples": 40,
           "sample_steps": 25, "monitor_points": 32, "show": 6},
    compute=compute, record=record, judge=judge, draw=draw, requires=("diffusers",),
)
