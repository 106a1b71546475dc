"""Watch a model memorize while it trains, and stop in time (the paper's early stopping).

:class:`MemorizationMonitor` measures, at each update, how far down in noise the model's
denoiser follows the empirical (memorizing) one, ``D_e(x, t) = E_emp[x_0 | x]``:

    gap(sigma) = E |D_model(x) - D_e(x)|^2 / E |D_e(x) - x|^2,   x = m y + sigma z,

on noisy training points ``y`` (and held-out points), with the same points and noise draws
at every update (:func:`diffmem.audit.gap.denoiser_gap` with a fixed seed). At large noise
every good denoiser agrees with ``D_e``; a model that follows it down to small ``sigma``
returns training points. ``follows_down_to`` is the smallest level down to which the gap
stays ``<= threshold`` from the top of the grid; training should stop once it falls below
``stop_sigma`` (for ``patience`` updates in a row).

The default ``stop_sigma`` is data-derived, from ``D``, the median distance from a training
point to its nearest other one, and the dimension ``d``: the level at which

    sigma / m = min(D / 2, D / (2 sqrt(threshold d)))

(``sigma`` itself on VE and EDM schedules, ``sigma = a / sqrt(1 + a^2)`` for ``sigma / m = a``
on VP ones). Two reasons, both from ``x = m y_1 + sigma z``. (1) Below ``sigma / m = D / 2``
the empirical posterior over training points is one-hot: a point ``D`` from the nearest has
relative weight ``exp(-(m D)^2 / (2 sigma^2) - (m D / sigma) xi)``, ``xi ~ N(0, 1)``, ``e^-2``
there. (2) A model that generalizes misses the nearest training point by about ``D``, so its
relative gap is about ``D^2 / (d (sigma / m)^2)`` (the denominator is dominated by the noise,
``E |D_e - x|^2 ~ d sigma^2 / m^2`` in data units): four times the threshold at
``sigma / m = D / (2 sqrt(threshold d))``. Following ``D_e`` within the threshold below both
levels means reproducing training points.

Each record also holds the train/held-out denoising loss gap at equal noise draws
(``E |D(m y + sigma z) - y|^2``, held-out minus training: positive once the model fits its
training points better than new ones; per level) and, with ``n_samples > 0``, the copied
fraction (the audit's nn-ratio test) of a few samples. Records go to ``out/monitor.jsonl``
with a figure (``out/monitor.png``), and to TensorBoard with ``tensorboard=True`` (``pip install
tensorboard``); :func:`lightning_callback` adapts the monitor to a Lightning ``Trainer``.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffmem._checks import fail, positive, positive_int
from diffmem.audit.gap import denoiser_gap, follows_down_to, model_denoiser
from diffmem.audit.inputs import Rows
from diffmem.centres import Centres, TrainingData, as_centres
from diffmem.schedules import Schedule
from diffmem.scores.base import check_schedule


def nearest_neighbour_median(train: TrainingData, limit: int = 2048) -> float:
    """The median distance from a training point to its nearest other one (data units; on at
    most ``limit`` points of the set, against the whole set)."""
    from diffmem.metrics import knn

    centres = as_centres(train)
    if centres.n_total < 2:
        raise fail("train", "at least 2 training points", centres.n_total)
    rows = Rows(centres, "train")
    pick = np.linspace(0, centres.n_total - 1, min(limit, centres.n_total)).astype(int)
    x = rows.take(pick.tolist()).to(torch.float64)
    dist, _ = knn(x, centres, 2)
    return float(dist[:, 1].median())


def collapse_sigma(schedule: Schedule, distance: float) -> float:
    """The noise level ``sigma(t)`` at which ``sigma(t) / m(t) = distance / 2``
    (:meth:`~diffmem.schedules.Schedule.t_of_ratio`), or ``sigma(T)`` when it is never
    reached."""
    t = schedule.t_of_ratio(0.5 * float(distance)).clamp(max=schedule.T)
    return float(schedule.sigma(t))


def as_monitored(model: Any) -> Any:
    """What the monitor evaluates: a score carrying its schedule, a ``(unet, scheduler)``
    pair of diffusers objects, or anything ``diffmem audit --model`` loads (a path)."""
    from diffmem.models import load_model, wrap_diffusers

    if isinstance(model, tuple) and len(model) == 2:
        return wrap_diffusers(*model, name=type(model[0]).__name__)
    if isinstance(model, str | Path):
        return load_model(str(model))
    if not callable(model) or not isinstance(getattr(model, "schedule", None), Schedule):
        raise fail("model", "a score carrying its schedule, a (unet, scheduler) pair or a "
                   "model path", type(model).__name__)
    return model


class MemorizationMonitor:
    """See the module docstring. ``schedule`` is the model's (a diffmem schedule, or a
    diffusers scheduler: its ``alphas_cumprod``, or the linear path of a flow-matching
    one); ``sigmas`` the noise grid (default 8 levels log-spaced from ``stop_sigma / 4`` to
    ``sigma(T)``); ``every`` the steps between updates of :meth:`maybe_update`."""

    def __init__(self, train: TrainingData, schedule: Any, held_out: Any = None,
                 sigmas: Sequence[float] | None = None, threshold: float = 0.1,
                 stop_sigma: float | None = None, patience: int = 1,
                 out: str | Path | None = None, seed: int = 0, *, n_points: int = 64,
                 n_samples: int = 0, every: int = 500, tensorboard: bool = False) -> None:
        if not isinstance(schedule, Schedule):
            from diffmem.models import is_flow_scheduler, scheduler_config, scheduler_schedule

            config = scheduler_config(schedule) if hasattr(schedule, "config") else {}
            if not (isinstance(getattr(schedule, "alphas_cumprod", None), Tensor)
                    or is_flow_scheduler(config)):
                raise fail("schedule", "a diffmem schedule or a diffusers scheduler",
                           type(schedule).__name__)
            schedule = scheduler_schedule(config)
        self.schedule = schedule
        self.train = Centres(train) if not isinstance(train, Centres) else train
        self.held = held_out
        self.threshold = positive("threshold", threshold)
        self.stop_sigma = (positive("stop_sigma", stop_sigma) if stop_sigma is not None
                           else collapse_sigma(schedule, nearest_neighbour_median(self.train)
                                               * min(1.0, 1 / math.sqrt(self.threshold
                                                                        * self.train.d))))
        top = float(schedule.sigma(schedule.T))
        if sigmas is None:
            low = min(self.stop_sigma / 4, top / 10)
            sigmas = [float(v) for v in np.logspace(math.log10(low), math.log10(top), 8)]
        self.sigmas = sorted(positive("sigmas", float(s)) for s in sigmas)
        self.patience = positive_int("patience", patience)
        self.n_points = positive_int("n_points", n_points)
        self.n_samples = int(n_samples)
        if self.n_samples < 0:
            raise fail("n_samples", "an integer >= 0", n_samples)
        self.every = positive_int("every", every)
        self.seed = seed
        self.out = None if out is None else Path(out)
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
        self.records: list[dict[str, Any]] = []
        self._below = 0
        self.should_stop = False
        self.stopped_at: int | None = None
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise fail("tensorboard", "the tensorboard package (pip install "
                           "'diffmem[monitor]')", True) from err
            self._writer = SummaryWriter(str(self.out or Path("runs")))

    def restore(self, records: list[dict[str, Any]]) -> None:
        """Continue from saved ``records`` (a resumed training run): the stop state is
        replayed from them, and ``out/monitor.jsonl`` is rewritten to hold exactly them (a run
        killed after an update but before its checkpoint would otherwise log that update
        twice)."""
        self.records, self._below = [], 0
        self.should_stop, self.stopped_at = False, None
        for r in records:
            level = r["follows_down_to"]
            self._below = self._below + 1 if level is not None and level <= self.stop_sigma \
                else 0
            if self._below >= self.patience and not self.should_stop:
                self.should_stop, self.stopped_at = True, int(r["step"])
            self.records.append(r)
        if self.out is not None:  # the log holds what the checkpoint holds, no more
            from diffmem.io import atomic_save_figure, atomic_write_bytes

            atomic_write_bytes(self.out / "monitor.jsonl",
                               "".join(json.dumps(r) + "\n" for r in self.records).encode())
            if self.records:
                atomic_save_figure(self.figure(), self.out / "monitor.png")

    def due(self, step: int) -> bool:
        """Whether :meth:`maybe_update` measures at ``step`` (every ``every`` steps)."""
        return step % self.every == 0

    def maybe_update(self, step: int, model: Any) -> dict[str, Any] | None:
        """:meth:`update` when :meth:`due`, else ``None``."""
        return self.update(step, model) if self.due(step) else None

    def update(self, step: int, model: Any) -> dict[str, Any]:
        """Measure ``model`` at training ``step`` and return the record (module docstring)."""
        model = as_monitored(model)
        check_schedule(self.schedule, model, "model")
        gap = denoiser_gap(model, self.train, held=self.held, sigmas=self.sigmas,
                           n_points=self.n_points, seed=self.seed)
        level = follows_down_to(gap, self.threshold)
        record: dict[str, Any] = {
            "step": int(step), "sigma": self.sigmas,
            "gap": dict(zip(map(str, self.sigmas), gap["train"]["empirical"], strict=True)),
            "follows_down_to": level, "stop_sigma": self.stop_sigma}
        if self.held is not None:
            record["gap_held"] = dict(zip(map(str, self.sigmas), gap["held"]["empirical"],
                                          strict=True))
            record["loss_gap"] = self._loss_gap(model)
        if self.n_samples > 0:
            record["copied"] = self._copied(model)
        below = level is not None and level <= self.stop_sigma
        self._below = self._below + 1 if below else 0
        if self._below >= self.patience and not self.should_stop:
            self.should_stop, self.stopped_at = True, int(step)
        record["should_stop"] = self.should_stop
        self.records.append(record)
        self._write(record)
        return record

    def _loss_gap(self, model: Any) -> dict[str, float]:
        """Per level, held-out minus training denoising loss ``E |D(m y + sigma z) - y|^2``
        with the same noise draws for both sets (the memorization regime is the low levels:
        at large noise the gap is dominated by which points were drawn)."""
        gen = torch.Generator().manual_seed(self.seed + 1)
        sets = {"train": Rows(self.train, "train"), "held": Rows(self.held, "held_out")}
        points = {k: v.take(torch.randint(0, v.n, (self.n_points,), generator=gen).tolist())
                  .to(torch.float64) for k, v in sets.items()}
        out = {}
        for sigma in self.sigmas:
            t = self.schedule.t_of_s(torch.tensor(-math.log(sigma), dtype=torch.float64))
            tt = t.expand(self.n_points).contiguous()
            z = torch.randn(points["train"].shape, generator=gen, dtype=torch.float64)
            loss = {}
            for k, y in points.items():
                x = float(self.schedule.m(t)) * y + sigma * z
                d = model_denoiser(model, x, tt).to(torch.float64)
                loss[k] = float((d - y).flatten(1).pow(2).sum(1).mean())
            out[str(sigma)] = loss["held"] - loss["train"]
        return out

    def _copied(self, model: Any) -> float:
        """nn-ratio copy fraction of ``n_samples`` probability-flow samples (seeded)."""
        from diffmem.metrics import distance_ratios, knn
        from diffmem.models import ode_draw

        gen = torch.Generator().manual_seed(self.seed + 2)
        z = torch.randn(self.n_samples, *self.train.data_shape, generator=gen)
        x = ode_draw(model, z, 1e-3 * float(self.schedule.T))
        dist, _ = knn(x.to(torch.float64), self.train, 2)
        return float((distance_ratios(dist[:, 0], dist[:, 1]) < 1 / 3).to(torch.float64).mean())

    def _write(self, record: dict[str, Any]) -> None:
        if self._writer is not None:
            step = record["step"]
            for sigma, g in record["gap"].items():
                self._writer.add_scalar(f"memorization/gap_sigma_{float(sigma):.3g}", g, step)
            if record["follows_down_to"] is not None:
                self._writer.add_scalar("memorization/follows_down_to",
                                        record["follows_down_to"], step)
            if "loss_gap" in record:
                low = str(self.sigmas[0])
                self._writer.add_scalar("memorization/loss_gap_lowest_sigma",
                                        record["loss_gap"][low], step)
            if "copied" in record:
                self._writer.add_scalar("memorization/copied", record["copied"], step)
            self._writer.flush()
        if self.out is None:
            return
        from diffmem.io import append_line, atomic_save_figure

        append_line(self.out / "monitor.jsonl", json.dumps(record))
        atomic_save_figure(self.figure(), self.out / "monitor.png")

    def figure(self) -> Any:
        """The gap curves of every update (darker: later), the ``threshold`` and
        ``stop_sigma``; beside it, ``follows_down_to`` against the step."""
        from diffmem.plots import figure

        fig, ax = figure(1, 2, size=4.2)
        left, right = ax[0, 0], ax[0, 1]
        n = len(self.records)
        for i, r in enumerate(self.records):
            shade = 0.85 - 0.75 * (i + 1) / max(1, n)
            left.plot(r["sigma"], [max(v, 1e-6) for v in r["gap"].values()],
                      color=str(shade), lw=1, label=f"step {r['step']}" if i in (0, n - 1)
                      else None)
        left.axhline(self.threshold, color="C3", lw=0.8, ls=":", label="threshold")
        left.axvline(self.stop_sigma, color="C0", lw=0.8, ls="--", label="stop sigma")
        left.set(xscale="log", yscale="log", xlabel=r"noise level $\sigma$",
                 ylabel=r"$E|D - D_e|^2 / E|D_e - x|^2$", title="gap to the memorizing denoiser")
        left.legend(fontsize=6)
        steps = [r["step"] for r in self.records]
        levels = [r["follows_down_to"] if r["follows_down_to"] is not None else np.nan
                  for r in self.records]
        right.plot(steps, levels, "o-", ms=3)
        right.axhline(self.stop_sigma, color="C0", lw=0.8, ls="--")
        right.set(yscale="log", xlabel="training step", ylabel="follows D_e down to sigma",
                  title="memorization front (lower: more memorized)")
        fig.tight_layout()
        return fig

    def summary(self) -> dict[str, Any]:
        """The last record's level, when the monitor asked to stop, and the median level."""
        levels = [r["follows_down_to"] for r in self.records if r["follows_down_to"]]
        return {"updates": len(self.records), "stopped_at": self.stopped_at,
                "stop_sigma": self.stop_sigma,
                "last_follows_down_to": self.records[-1]["follows_down_to"] if self.records
                else None, "median_follows_down_to": statistics.median(levels) if levels
                else None}


def lightning_callback(monitor: MemorizationMonitor,
                       to_model: Callable[[Any], Any]) -> Any:
    """A Lightning ``Callback`` that calls ``monitor.maybe_update(global_step,
    to_model(pl_module))`` after each training batch, logs ``follows_down_to`` and sets
    ``trainer.should_stop`` when the monitor says so. Needs ``lightning``."""
    try:
        import lightning.pytorch as pl
    except ImportError as err:
        raise fail("lightning_callback", "the lightning package (pip install lightning)",
                   "not installed") from err

    class MemorizationCallback(pl.Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            record = monitor.maybe_update(trainer.global_step, to_model(pl_module))
            if record is None:
                return
            if record["follows_down_to"] is not None:
                pl_module.log("memorization/follows_down_to", record["follows_down_to"])
            if monitor.should_stop:
                trainer.should_stop = True

    return MemorizationCallback()
