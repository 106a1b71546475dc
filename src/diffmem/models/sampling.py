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
    from diffmem.pipeline import make_scheduler, pipeline_sample, sampling_grid

    n, batch, steps = positive_int("n_samples", n), positive_int("batch", batch), \
        positive_int("steps", steps)
    if sampler not in SAMPLERS:
        raise fail("--sampler", f"one of {SAMPLERS}", repr(sampler))
    scheduler = None
    if sampler == "pipeline":
        if model.network is None:
            raise fail("--sampler", "'ode' or 'edm' for a model that is not a diffusers one "
                       "('pipeline' runs a diffusers scheduler)", repr(sampler))
        scheduler = make_scheduler(model.network["scheduler_config"], scheduler_class, steps,
                                   eta, **sampling_grid(model.network))
    elif scheduler_class is not None or eta is not None:
        raise fail("--scheduler-class" if scheduler_class is not None else "--eta",
                   "--sampler pipeline", f"--sampler {sampler}")
    if model.conditional and (cond is None or cond.shape[0] != n):
        raise fail("conditions", f"one condition per sample ({n}) for the conditional model "
                   f"{model.name}", None if cond is None else tuple(cond.shape))
    if not model.conditional and cond is not None:
        raise fail("conditions", f"none: {model.name} is not conditional", tuple(cond.shape))
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
    n_batches = -(-n // batch)
    done = team.broadcast(_finished_batches(record, key, batch, out, noise_out)
                          if team.leader else None)
    decode = None if model.network is None else model.network.get("decode")
    arr = noise = None
    if team.leader:
        if not done:
            arr = _new_map(out, (n, *output_shape(model)))
            noise = _new_map(noise_out, (n, *model.data_shape))
        else:
            arr, noise = np.load(out, mmap_mode="r+"), np.load(noise_out, mmap_mode="r+")
    end = (1 / sch.K if isinstance(sch, DiscreteVP | DiscreteFlow) else 1e-3 * sch.T) \
        if t_end is None else t_end

    def one(b: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch ``b``: draws ``b * batch`` to ``(b + 1) * batch``, noise seeded ``seed + b``."""
        lo, hi = b * batch, min(n, (b + 1) * batch)
        gen = torch.Generator().manual_seed(seed + b)
        z = torch.randn(hi - lo, *model.data_shape, generator=gen, dtype=torch.float32)
        y = None if cond is None else cond[lo:hi].to(device)
        if sampler == "ode":
            x = ode_draw(model, z.to(device), end, y)
        elif sampler == "edm":
            x = _edm_in_ve(model, z.to(device), steps, end, y)
        else:
            assert scheduler is not None and model.network is not None
            x = pipeline_sample(model.network["net"], z.to(device), scheduler, steps,
                                cond=y, guidance=model.guidance, null=model.null, eta=eta,
                                generator=gen, post=model.network.get("post"),
                                **sampling_grid(model.network))
        if decode is not None:  # a latent model: the images its decoder makes
            x = decode(x)
        return x.detach().cpu().numpy().astype(np.float32, copy=False), z.numpy()

    def write(pairs: list[tuple[int, tuple[np.ndarray, np.ndarray]]]) -> None:
        assert arr is not None and noise is not None
        for b, (x, z) in pairs:
            arr[b * batch: b * batch + x.shape[0]] = x
            noise[b * batch: b * batch + z.shape[0]] = z
            done.add(b)
        arr.flush()
        noise.flush()
        atomic_write_json(record, {"key": key, "batches": sorted(done),
                                   "done": sum(min(batch, n - b * batch) for b in done)})

    todo = [b for b in range(n_batches) if b not in done]
    started = time.perf_counter()
    _, per_process = team.map(one, todo, to_all=False, on_round=write, progress=progress,
                              weight=lambda b: min(batch, n - b * batch),
                              desc=f"sampling {model.name}")
    if team.leader:
        atomic_write_json(record, {"key": key, "batches": sorted(done), "done": n,
                                   "draws_per_process": per_process,
                                   "seconds": time.perf_counter() - started})
    team.barrier()
    return arr if arr is not None else np.load(out, mmap_mode="r")


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
