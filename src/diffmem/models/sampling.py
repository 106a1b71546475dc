"""Sampling a loaded model in resumable batches (:func:`sample_model`), with the
probability-flow ODE, EDM's sampler or the model's own diffusers scheduler, split over the
processes of a team."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffmem._checks import fail, positive_int
from diffmem.edm import edm_sample, karras_sigmas
from diffmem.io import atomic_write_json
from diffmem.models.discrete import DiscreteFlow, DiscreteVP
from diffmem.models.score import ModelScore
from diffmem.parallel import SOLO, Team
from diffmem.samplers import sample_ode
from diffmem.schedules import (
    expand_as_batch,
)

SAMPLERS = ("ode", "edm", "pipeline")


def sample_model(model: ModelScore, n: int, out: Path, *, sampler: str = "ode",
                 steps: int = 18, seed: int = 0, batch: int = 64, t_end: float | None = None,
                 device: str | torch.device = "cpu", progress: bool = True,
                 cond: Tensor | None = None, scheduler_class: str | None = None,
                 eta: float | None = None, noise_out: Path | None = None,
                 team: Team | None = None) -> np.ndarray:
    """``n`` samples of ``model`` written to ``out`` (a ``.npy`` file) batch by batch, the
    standard normal noise each started from to ``noise_out`` (default: ``out``'s name with
    ``_initial_noise`` added), and a
    progress record (``out.progress.json``): a run interrupted and started again with the
    same arguments continues from the finished batches, drawing nothing twice (the
    noise of batch ``i``, draws ``i * batch`` to ``(i + 1) * batch``, comes from a generator
    seeded ``seed + i``).

    With a :class:`diffmem.parallel.Team` of several processes the batches are dealt out
    round-robin and gathered on process 0, which writes them: the files are byte-identical
    to one process's, for any number of processes (a rerun with another number goes on from
    the finished batches); the record keeps ``draws_per_process``. Every process returns
    the samples (read from ``out``: a file system every process sees).

    ``sampler`` is ``'ode'`` (probability-flow ODE, adaptive, to ``t_end``, then one
    denoising step ``x_0 = D(x, t_end) / m(t_end)``, as a DDIM sampler's last step),
    ``'edm'`` (EDM's Heun with ``steps`` levels in the variance-exploding parameterization
    ``x / m``, to noise 0) or ``'pipeline'`` (a diffusers model's own scheduler, its saved
    class or ``scheduler_class``, with ``steps`` steps and ``eta``, exactly the loop of
    diffusers' pipelines: :func:`diffmem.pipeline.pipeline_sample`). Samples are in the
    model's data space, as the sampler returns them. A conditional model takes ``cond``,
    one condition per sample ``(n, *cond_shape)``. A latent model (a text-to-image pipeline,
    :mod:`diffmem.text`) samples its latents and writes the images its VAE decodes them to;
    ``noise_out`` holds the latents' initial noise."""
    n, batch, steps = positive_int("n_samples", n), positive_int("batch", batch), \
        positive_int("steps", steps)
    scheduler = _scheduler(model, sampler, steps, scheduler_class, eta)
    _check_conditions(model, n, cond)
    sch = model.schedule
    key = {"model": model.name, "schedule": repr(sch), "sampler": sampler, "steps": steps,
           "seed": seed, "batch": batch, "n": n, "shape": list(model.data_shape),
           "t_end": t_end, "scheduler": None if scheduler is None else type(scheduler).__name__,
           "eta": eta, "guidance": model.guidance,
           "cond": None if cond is None else _digest(cond),
           "null": None if model.null is None else _digest(model.null)}
    team = team or SOLO
    team.agree(key)
    noise_out = out.with_name(f"{out.stem}_initial_noise.npy") if noise_out is None \
        else noise_out
    record = Path(str(out) + ".progress.json")
    done = team.broadcast(_finished_batches(record, key, batch, out, noise_out)
                          if team.leader else None)
    writer = _Writer(out, noise_out, record, key, batch, n, done) if team.leader else None
    if writer is not None:
        writer.open(model)
    end = (1 / sch.K if isinstance(sch, DiscreteVP | DiscreteFlow) else 1e-3 * sch.T) \
        if t_end is None else t_end
    one = _BatchDraw(model, sampler, scheduler, steps, seed, batch, n, cond, device, end, eta)
    todo = [b for b in range(-(-n // batch)) if b not in done]
    started = time.perf_counter()
    _, per_process = team.map(one, todo, to_all=False, on_round=writer, progress=progress,
                              weight=lambda b: min(batch, n - b * batch),
                              desc=f"sampling {model.name}")
    if writer is not None:
        atomic_write_json(record, {"key": key, "batches": sorted(done), "done": n,
                                   "draws_per_process": per_process,
                                   "seconds": time.perf_counter() - started})
    team.barrier()
    return writer.arr if writer is not None else np.load(out, mmap_mode="r")


def _scheduler(model: ModelScore, sampler: str, steps: int, scheduler_class: str | None,
               eta: float | None) -> Any:
    """The diffusers scheduler of the ``pipeline`` sampler (``None`` for the others), the
    sampler and its options checked."""
    from diffmem.pipeline import make_scheduler, sampling_grid

    if sampler not in SAMPLERS:
        raise fail("--sampler", f"one of {SAMPLERS}", repr(sampler))
    if sampler == "pipeline":
        if model.network is None:
            raise fail("--sampler", "'ode' or 'edm' for a model that is not a diffusers one "
                       "('pipeline' runs a diffusers scheduler)", repr(sampler))
        return make_scheduler(model.network["scheduler_config"], scheduler_class, steps,
                              eta, **sampling_grid(model.network))
    if scheduler_class is not None or eta is not None:
        raise fail("--scheduler-class" if scheduler_class is not None else "--eta",
                   "--sampler pipeline", f"--sampler {sampler}")
    return None


def _check_conditions(model: ModelScore, n: int, cond: Tensor | None) -> None:
    """One condition per sample for a conditional model, none for another."""
    if model.conditional and (cond is None or cond.shape[0] != n):
        raise fail("conditions", f"one condition per sample ({n}) for the conditional model "
                   f"{model.name}", None if cond is None else tuple(cond.shape))
    if not model.conditional and cond is not None:
        raise fail("conditions", f"none: {model.name} is not conditional", tuple(cond.shape))


class _BatchDraw:
    """One batch ``b`` of :func:`sample_model`: draws ``b * batch`` to ``(b + 1) * batch``
    from noise seeded ``seed + b``, as images (a latent model's decoded) and the noise."""

    def __init__(self, model: ModelScore, sampler: str, scheduler: Any, steps: int,
                 seed: int, batch: int, n: int, cond: Tensor | None,
                 device: str | torch.device, end: float, eta: float | None) -> None:
        self.model, self.sampler, self.scheduler, self.steps = model, sampler, scheduler, steps
        self.seed, self.batch, self.n, self.cond = seed, batch, n, cond
        self.device, self.end, self.eta = device, end, eta

    def __call__(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        from diffmem.pipeline import pipeline_sample, sampling_grid

        model, device = self.model, self.device
        lo, hi = b * self.batch, min(self.n, (b + 1) * self.batch)
        gen = torch.Generator().manual_seed(self.seed + b)
        z = torch.randn(hi - lo, *model.data_shape, generator=gen, dtype=torch.float32)
        y = None if self.cond is None else self.cond[lo:hi].to(device)
        if self.sampler == "ode":
            x = ode_draw(model, z.to(device), self.end, y)
        elif self.sampler == "edm":
            x = _edm_in_ve(model, z.to(device), self.steps, self.end, y)
        else:
            assert self.scheduler is not None and model.network is not None
            x = pipeline_sample(model.network["net"], z.to(device), self.scheduler, self.steps,
                                cond=y, guidance=model.guidance, null=model.null,
                                eta=self.eta, generator=gen, post=model.network.get("post"),
                                **sampling_grid(model.network))
        decode = None if model.network is None else model.network.get("decode")
        if decode is not None:  # a latent model: the images its decoder makes
            x = decode(x)
        return x.detach().cpu().numpy().astype(np.float32, copy=False), z.numpy()


class _Writer:
    """Process 0's files of :func:`sample_model`: the samples and noise (memory-mapped) and
    the progress record, written after each round of batches."""

    def __init__(self, out: Path, noise_out: Path, record: Path, key: dict[str, Any],
                 batch: int, n: int, done: set[int]) -> None:
        self.out, self.noise_out, self.record, self.key = out, noise_out, record, key
        self.batch, self.n, self.done = batch, n, done
        self.arr: np.ndarray | None = None
        self.noise: np.ndarray | None = None

    def open(self, model: ModelScore) -> None:
        """New files (nothing done yet), or the ones a killed run left."""
        if not self.done:
            self.arr = _new_map(self.out, (self.n, *output_shape(model)))
            self.noise = _new_map(self.noise_out, (self.n, *model.data_shape))
        else:
            self.arr = np.load(self.out, mmap_mode="r+")
            self.noise = np.load(self.noise_out, mmap_mode="r+")

    def __call__(self, pairs: list[tuple[int, tuple[np.ndarray, np.ndarray]]]) -> None:
        assert self.arr is not None and self.noise is not None
        batch = self.batch
        for b, (x, z) in pairs:
            self.arr[b * batch: b * batch + x.shape[0]] = x
            self.noise[b * batch: b * batch + z.shape[0]] = z
            self.done.add(b)
        self.arr.flush()
        self.noise.flush()
        atomic_write_json(self.record, {"key": self.key, "batches": sorted(self.done),
                                        "done": sum(min(batch, self.n - b * batch)
                                                    for b in self.done)})


def _finished_batches(record: Path, key: dict[str, Any], batch: int, out: Path,
                      noise_out: Path) -> set[int]:
    """The batches an earlier run with the same ``key`` finished (its progress record)."""
    if not (out.is_file() and noise_out.is_file() and record.is_file()):
        return set()
    try:
        saved = json.loads(record.read_text())
    except ValueError:
        return set()
    if saved.get("key") != key:
        return set()
    if "batches" in saved:
        return {int(b) for b in saved["batches"]}
    return set(range(int(saved.get("done", 0)) // batch))


def draws_per_process(out: Path) -> list[int] | None:
    """How many draws each process made in the latest run of :func:`sample_model` into
    ``out`` (``None`` when not recorded)."""
    record = Path(str(out) + ".progress.json")
    try:
        return json.loads(record.read_text()).get("draws_per_process")
    except (OSError, ValueError):
        return None


def output_shape(model: ModelScore) -> tuple[int, ...]:
    """The shape of one sample as written: the decoded image of a latent model, else the
    model's data shape."""
    shape = None if model.network is None else model.network.get("image_shape")
    return tuple(model.data_shape if shape is None else shape)


def ode_draw(model: Any, z: Tensor, t_end: float, cond: Tensor | None = None) -> Tensor:
    """Samples from standard normal ``z``: the probability-flow ODE from ``sigma(T) z`` to
    ``t_end`` (adaptive, ``rtol = atol = 1e-4``), then one denoising step
    ``x_0 = D(x, t_end) / m(t_end)``, as a DDIM sampler's last step. ``model`` is any score
    carrying its schedule."""
    from diffmem.audit.gap import model_denoiser

    sch = model.schedule
    x = sample_ode(sch, model, float(sch.sigma(sch.T)) * z, t_end=t_end, rtol=1e-4,
                   atol=1e-4, cond=cond).samples
    tt = torch.full((x.shape[0],), t_end, dtype=x.dtype, device=x.device)
    extra = () if cond is None else (cond,)
    return model_denoiser(model, x, tt, *extra) / sch.m(t_end).to(x)


def _new_map(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A new float32 ``.npy`` memory-map at ``path`` with its space reserved up front: on a
    full disk a :class:`diffmem.io.DiskFullError` now (the file removed), not a crash when
    a page is written."""
    from diffmem.io import FULL, DiskFullError, disk_full, preallocate

    try:
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
        preallocate(path, arr.offset + arr.nbytes)
    except DiskFullError:
        Path(path).unlink(missing_ok=True)
        raise
    except OSError as err:
        Path(path).unlink(missing_ok=True)
        if err.errno in FULL:
            raise disk_full(path, err) from err
        raise
    return arr


def _digest(v: Tensor) -> str:
    """A short hash of a tensor's values (what identifies conditions in a progress record)."""
    import hashlib

    data = np.ascontiguousarray(v.detach().cpu().numpy())
    return hashlib.sha256(data.tobytes() + str(data.dtype).encode()).hexdigest()[:16]


def _edm_in_ve(model: ModelScore, z: Tensor, steps: int, t_end: float,
               y: Tensor | None = None) -> Tensor:
    """EDM's Heun sampler for any schedule, in the variance-exploding coordinates
    ``y = x / m`` with noise level ``sigma_ve = sigma / m``: ``D_ve(y, sigma_ve) =
    D(m y, t) / m`` at ``t = schedule.t_of_ratio(sigma_ve)``, the ``t`` with
    ``sigma(t) / m(t) = sigma_ve``."""
    sch = model.schedule

    def den(v: Tensor, sigma_ve: Tensor) -> Tensor:
        t = sch.t_of_ratio(sigma_ve.to(torch.float64)).clamp(max=sch.T)
        m = expand_as_batch(sch.m(t).to(v.dtype), v)
        return model.denoiser(m * v, t.to(v.dtype), y) / m

    lo = float(sch.sigma(t_end) / sch.m(t_end))
    hi = float(sch.sigma(sch.T) / sch.m(sch.T))
    return edm_sample(den, hi * z.to(torch.float64), karras_sigmas(steps, lo, hi))
