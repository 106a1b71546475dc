"""Auditing a model rather than its samples: load it, check every option against it before
anything is written (:func:`plan_draw`), draw its samples in resumable batches
(:func:`draw`), and measure its denoiser against the memorizing one (:func:`model_gap`).
Shared by ``diffmem audit --model`` and the commands that sample models."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor

from diffmem._checks import fail, positive_int
from diffmem.centres import Centres, TrainingData
from diffmem.conditions import as_conditions, distinct, parse_null, per_sample
from diffmem.models import SAMPLERS, ModelScore, load_model
from diffmem.parallel import SOLO, Team

if TYPE_CHECKING:
    from diffmem.text import TextOptions


@dataclass
class DrawPlan:
    """A model and how to sample it, every option checked: ``cond`` holds one condition
    per sample (``None`` for an unconditional model), ``conditions`` the distinct ones."""

    model: ModelScore
    n: int
    cond: Tensor | None
    conditions: Tensor | None
    sampler: str
    steps: int
    seed: int
    scheduler_class: str | None
    eta: float | None
    #: A text-to-image pipeline's prompts (the conditions are their indices).
    prompts: list[str] | None = None
    #: Samples drawn at once (each batch is written and recorded before the next).
    batch: int = 64
    truncated: list[int] | None = None
    #: The prompts' labels, where the prompts file gave them.
    prompt_labels: list[str | None] | None = None
    #: The null condition (``--null-cond``, a pipeline's negative prompt), where there is one.
    null: Tensor | None = None


def plan_draw(spec: str, data_shape: tuple[int, ...] | None, *, n_samples: int,
              train_cond: Tensor | None = None, conditions: Any = None,
              per_condition: int | None = None, guidance: float | None = None,
              null_cond: str | None = None, sampler: str = "ode", steps: int = 18,
              seed: int = 0, scheduler_class: str | None = None, eta: float | None = None,
              scheduler: str | None = None, schedule: str = "VP", kind: str = "score",
              index: int = 0, device: str = "cpu", prompts: str | Path | None = None,
              text_options: TextOptions | None = None, batch_size: int = 64) -> DrawPlan:
    """Load ``spec`` (as :func:`diffmem.models.load_model`) and check the sampling options
    against it (and its data shape against ``data_shape``, when given: a callable needs
    it). A conditional model samples ``per_condition`` times each of ``conditions``
    (default: each distinct training condition of ``train_cond``; ``per_condition``
    defaults to ``n_samples`` shared out); the model must take the conditions and, with
    ``guidance``, the ``null_cond``. A text-to-image pipeline with ``prompts`` is loaded
    with ``text_options``. Raises ``ValueError`` naming the option at fault."""
    n_samples = positive_int("--n-samples", n_samples)
    batch = positive_int("--batch-size", batch_size)
    if sampler not in SAMPLERS:
        raise fail("--sampler", f"one of {SAMPLERS}", repr(sampler))
    if prompts is not None:
        text = _plan_prompts(spec, data_shape, prompts, n_samples=n_samples,
                             per_condition=per_condition, guidance=guidance,
                             text_options=text_options, sampler=sampler,
                             steps=steps, seed=seed, scheduler_class=scheduler_class,
                             eta=eta, device=device, train_cond=train_cond, rejected={
                                 "--conditions": conditions, "--null-cond": null_cond,
                                 "--scheduler": scheduler})
        return dataclasses.replace(text, batch=batch)
    wants_cond = train_cond is not None or conditions is not None
    model = load_model(spec, scheduler=scheduler, schedule=schedule, kind=kind,
                       data_shape=data_shape, index=index, device=device,
                       conditional=wants_cond)
    if data_shape is not None and tuple(model.data_shape) != tuple(data_shape):
        raise fail("--model", f"a model of the training data's shape {tuple(data_shape)}",
                   f"one of shape {tuple(model.data_shape)}")
    if sampler == "pipeline" and model.network is None:
        raise fail("--sampler", "'ode' or 'edm' for a model that is not a diffusers one "
                   "('pipeline' runs a diffusers scheduler)", repr(sampler))
    table = cond = null = None
    if model.conditional:
        if conditions is not None:
            table = as_conditions(conditions, "--conditions")
        elif train_cond is not None:
            table, _ = distinct(train_cond)
        else:
            raise fail("--conditions", f"the conditions to sample {model.name} at (or "
                       "--train-cond, whose distinct conditions are the default)", None)
        if train_cond is not None and (table.is_floating_point() != train_cond.is_floating_point()
                                       or table.shape[1:] != train_cond.shape[1:]):
            raise fail("--conditions", f"conditions like --train-cond's (dtype "
                       f"{train_cond.dtype}, shape (n, *{tuple(train_cond.shape[1:])}))",
                       f"dtype {table.dtype}, shape {tuple(table.shape)}")
        model.check_condition(table[:2], "--conditions")
        k = per_condition if per_condition is not None else max(1, n_samples // len(table))
        cond = per_sample(table, k)
        null = None if null_cond is None else parse_null(null_cond, table)
        model.guided(guidance, null)
    elif conditions is not None or per_condition is not None or guidance is not None:
        raise fail("--conditions" if conditions is not None else "--per-condition"
                   if per_condition is not None else "--guidance",
                   f"a conditional model ({model.name} takes no condition)", "an option for one")
    _check_sampler(model, sampler, steps, scheduler_class, eta)
    return DrawPlan(model=model, n=n_samples if cond is None else int(cond.shape[0]),
                    cond=cond, conditions=table, sampler=sampler,
                    steps=positive_int("--steps", steps), seed=seed,
                    scheduler_class=scheduler_class, eta=eta, batch=batch, null=null)


def _check_sampler(model: ModelScore, sampler: str, steps: int, scheduler_class: str | None,
                   eta: float | None) -> None:
    """``--scheduler-class`` and ``--eta`` only with the pipeline sampler, which must build."""
    if sampler != "pipeline" and (scheduler_class is not None or eta is not None):
        raise fail("--scheduler-class" if scheduler_class is not None else "--eta",
                   "--sampler pipeline", f"--sampler {sampler}")
    if sampler == "pipeline":
        from diffmem.pipeline import make_scheduler, sampling_grid

        assert model.network is not None
        make_scheduler(model.network["scheduler_config"], scheduler_class,
                       positive_int("--steps", steps), eta, **sampling_grid(model.network))


def _plan_prompts(spec: str, data_shape: tuple[int, ...] | None, prompts: str | Path,
                  *,
                  n_samples: int, per_condition: int | None, guidance: float | None,
                  text_options: TextOptions | None, sampler: str, steps: int, seed: int,
                  scheduler_class: str | None, eta: float | None, device: str,
                  rejected: dict[str, Any], train_cond: Tensor | None = None) -> DrawPlan:
    """A text-to-image pipeline sampled ``per_condition`` times per prompt (default
    ``n_samples`` shared out), guided by ``guidance`` (default the pipeline's; none at
    ``w <= 1``, as the pipelines do) against the negative prompt. ``train_cond``, when
    given, is each training item's prompt: its 0-based line in the prompts file."""
    import torch

    from diffmem.models import output_shape
    from diffmem.prompts import read_prompts
    from diffmem.text import load_text_model, refuse_with_prompts

    refuse_with_prompts(rejected)
    text = read_prompts(prompts)
    if train_cond is not None and (train_cond.dim() != 1 or train_cond.is_floating_point()
                                   or int(train_cond.min()) < 0
                                   or int(train_cond.max()) >= len(text.texts)):
        raise fail("--train-cond", f"with --prompts, one prompt index per training item "
                   f"(integers 0 to {len(text.texts) - 1}: lines of the prompts file)",
                   f"{train_cond.dtype}, shape {tuple(train_cond.shape)}, values "
                   f"{int(train_cond.min())} to {int(train_cond.max())}")
    tm = load_text_model(spec, text, text_options, device=device)
    model = tm.model
    if data_shape is not None and tuple(output_shape(model)) != tuple(data_shape):
        raise fail("--train", f"images of the model's size {output_shape(model)} (a PNG/JPEG "
                   "folder is resized to it)", f"items of shape {tuple(data_shape)}")
    table = torch.arange(len(text.texts))
    k = per_condition if per_condition is not None else max(1, n_samples // len(table))
    w = tm.guidance_applied if guidance is None else guidance if guidance > 1 else None
    model.guided(w, torch.tensor(len(text.texts)) if w is not None else None)
    _check_sampler(model, sampler, steps, scheduler_class, eta)
    cond = per_sample(table, positive_int("--per-condition", k))
    return DrawPlan(model=model, n=int(cond.shape[0]), cond=cond, conditions=table,
                    sampler=sampler, steps=positive_int("--steps", steps), seed=seed,
                    scheduler_class=scheduler_class, eta=eta, prompts=text.texts,
                    truncated=tm.truncated, prompt_labels=text.labels,
                    null=torch.tensor(len(text.texts)))


def draw(plan: DrawPlan, folder: Path, *, device: str = "cpu", progress: bool = True,
         team: Team | None = None) -> Path:
    """Sample ``plan`` into ``folder/samples.npy`` (with ``initial_noise.npy`` and, for a
    conditional model, ``sample_conditions.npy``); resumable; split over ``team``'s
    processes (process 0 writes)."""
    team = team or SOLO
    from diffmem.io import atomic_write_bytes
    from diffmem.models import sample_model

    out = folder / "samples.npy"
    if plan.cond is not None and team.leader:
        import io

        buf = io.BytesIO()
        np.save(buf, plan.cond.numpy())
        atomic_write_bytes(folder / "sample_conditions.npy", buf.getvalue())
    sample_model(plan.model, plan.n, out, sampler=plan.sampler, steps=plan.steps,
                 batch=plan.batch,
                 seed=plan.seed, device=device, progress=progress, cond=plan.cond,
                 scheduler_class=plan.scheduler_class, eta=plan.eta,
                 noise_out=folder / "initial_noise.npy", team=team)
    return out


def model_gap(plan: DrawPlan, train: TrainingData, *, train_cond: Tensor | None = None,
              held: Any = None, bandwidth: float | None = None,
              seed: int = 0, team: Team | None = None) -> dict[str, Any]:
    """The model's denoiser gap: against the conditional empirical denoiser, per condition
    and pooled, for a conditional model with ``train_cond``; else the unconditional one;
    split over ``team``'s processes (every one returns it)."""
    from diffmem.audit.gap import conditional_denoiser_gap, denoiser_gap

    if plan.model.conditional:
        if train_cond is None or plan.conditions is None:
            raise fail("--train-cond", "the training conditions, to compare a conditional "
                       "model with the conditional empirical denoiser", None)
        return conditional_denoiser_gap(plan.model, train, train_cond, plan.conditions,
                                        bandwidth=bandwidth, seed=seed, team=team)
    return denoiser_gap(plan.model, train, held=held, seed=seed, team=team)


def training_shape(train: TrainingData) -> tuple[int, ...]:
    """The data shape of a training set in any of its forms."""
    return Centres(train).data_shape


def load_train_cond(path: Path | None, train: TrainingData) -> Tensor | None:
    """``--train-cond``: one condition per training item."""
    if path is None:
        return None
    return as_conditions(path, "--train-cond", Centres(train).n_total)


__all__ = ["DrawPlan", "draw", "load_train_cond", "model_gap", "plan_draw", "training_shape"]
