"""Sampling a diffusers model with its own scheduler, exactly as diffusers' pipelines do.

The loop of ``DDPMPipeline``/``DDIMPipeline`` (and of the conditional pipelines, less their
text encoders), for any diffusers scheduler ``S`` set to ``steps`` timesteps:

    x = z * S.init_noise_sigma
    for k in S.timesteps:
        out = net(S.scale_model_input(x, k), k, y)
        x = S.step(out, k, x, eta=eta, generator=g).prev_sample

so ``clip_sample``, ``thresholding``, ``prediction_type`` and the scheduler's own noise are
honoured as the scheduler implements them. Flow-matching schedulers (no
``init_noise_sigma``, no ``scale_model_input``) start from ``z`` and take the network's
input as it is; with dynamic shifting the shift ``mu`` is diffusers' resolution rule, linear
in the number of image tokens ``L`` (:func:`flow_mu`). With classifier-free guidance of weight ``w``
and a null condition ``out = out(null) + w (out(y) - out(null))``, both halves in one batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffmem._checks import fail

#: Scheduler classes named in the help (any diffusers scheduler class is accepted).
EXAMPLES = ("DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler",
            "DPMSolverMultistepScheduler")


def flow_mu(config: dict[str, Any], tokens: int) -> float:
    """The dynamic shift of a flow-matching scheduler for ``tokens`` image tokens, as
    diffusers' pipelines compute it: linear from ``base_shift`` at ``base_image_seq_len``
    tokens to ``max_shift`` at ``max_image_seq_len``."""
    lo_n, hi_n = float(config.get("base_image_seq_len", 256)), \
        float(config.get("max_image_seq_len", 4096))
    lo, hi = float(config.get("base_shift", 0.5)), float(config.get("max_shift", 1.15))
    return lo + (hi - lo) * (tokens - lo_n) / (hi_n - lo_n)


def timestep_options(config: dict[str, Any], tokens: int | None, steps: int = 1,
                     linear_sigmas: bool = False) -> dict[str, Any]:
    """What ``set_timesteps`` needs besides the step count: ``mu`` (:func:`flow_mu`) when
    the scheduler shifts dynamically, and with ``linear_sigmas`` (FLUX's pipelines) the
    noise levels ``sigma_i = linspace(1, 1/steps, steps)`` before the shift (unless the
    scheduler makes its own, ``use_flow_sigmas``)."""
    options: dict[str, Any] = {}
    if linear_sigmas and not config.get("use_flow_sigmas"):
        options["sigmas"] = np.linspace(1.0, 1 / steps, steps)
    if not config.get("use_dynamic_shifting"):
        return options
    if tokens is None:
        raise fail("--sampler", "the number of image tokens for a dynamically shifted "
                   "scheduler", None)
    return {**options, "mu": flow_mu(config, tokens)}


def sampling_grid(network: dict[str, Any]) -> dict[str, Any]:
    """What a diffusers model's entry (``ModelScore.network``) says of its timesteps: its
    number of image ``tokens`` and whether its pipeline sets ``linear_sigmas``."""
    return {"tokens": network.get("tokens"),
            "linear_sigmas": bool(network.get("linear_sigmas", False))}


def make_scheduler(config: dict[str, Any], class_name: str | None, steps: int,
                   eta: float | None = None, tokens: int | None = None,
                   linear_sigmas: bool = False) -> Any:
    """The diffusers scheduler ``class_name`` (default: the config's ``_class_name``) built
    from the model's scheduler ``config`` and checked: it can be set to ``steps`` steps
    (with :func:`timestep_options` for ``tokens`` image tokens and ``linear_sigmas``), and
    takes ``eta`` when one
    is given."""
    try:
        import diffusers
    except ImportError as err:
        raise fail("--sampler", "diffusers installed for 'pipeline' (pip install "
                   "'diffmem[diffusers]')", "pipeline") from err
    name = class_name or config.get("_class_name") or "DDPMScheduler"
    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise fail("--scheduler-class", f"a diffusers scheduler class, e.g. one of {EXAMPLES}",
                   repr(name))
    try:
        scheduler = cls.from_config(config)
        scheduler.set_timesteps(steps, **timestep_options(dict(scheduler.config), tokens, steps,
                                                          linear_sigmas))
    except Exception as err:  # diffusers' own checks: say what they said
        raise fail("--scheduler-class", f"a scheduler that works with this model's config "
                   f"and {steps} steps", f"{name}: {type(err).__name__}: "
                   f"{str(err).splitlines()[0][:200] if str(err) else ''}") from err
    takes = inspect.signature(scheduler.step).parameters
    if eta is not None and "eta" not in takes:
        raise fail("--eta", "a scheduler with an eta parameter (DDIMScheduler)", name)
    return scheduler


def pipeline_sample(net: Callable[..., Tensor], z: Tensor, scheduler: Any, steps: int, *,
                    cond: Tensor | None = None, guidance: float | None = None,
                    null: Tensor | None = None, eta: float | None = None,
                    generator: torch.Generator | None = None,
                    tokens: int | None = None, linear_sigmas: bool = False,
                    post: Callable[..., Tensor] | None = None) -> Tensor:
    """Samples from standard normal ``z`` by the scheduler's loop (module docstring);
    ``net(x, timestep, y)`` is the network's raw output (``y`` ``None`` when unconditional);
    ``post(out, x, timestep, cond)``, when given, changes the guided output before the
    scheduler's step (a cure of :mod:`diffmem.mitigate`, in the network's parameterization).
    The scheduler's own noise (DDPM, DDIM with ``eta > 0``, ancestral samplers) is drawn
    from ``generator``, as the pipelines do; ``tokens`` is the number of image tokens
    (for dynamic shifting), ``linear_sigmas`` FLUX's noise levels (:func:`timestep_options`)."""
    scheduler.set_timesteps(steps, **timestep_options(dict(scheduler.config), tokens, steps,
                                                      linear_sigmas))
    scale = getattr(scheduler, "scale_model_input", None)
    takes = inspect.signature(scheduler.step).parameters
    options: dict[str, Any] = {}
    if eta is not None:
        options["eta"] = float(eta)
    if "generator" in takes:
        options["generator"] = generator
    x = z * getattr(scheduler, "init_noise_sigma", 1.0)
    pair = None
    if guidance is not None and cond is not None:
        assert null is not None
        pair = torch.cat([null.to(cond.device).expand(cond.shape[0], *null.shape),
                          cond.to(null)])
    with torch.no_grad():
        for k in scheduler.timesteps:
            inp = x if scale is None else scale(x, k)
            if pair is None:
                out = net(inp, k, cond)
            else:
                uncond, conditioned = net(torch.cat([inp, inp]), k, pair).chunk(2)
                out = uncond + guidance * (conditioned - uncond)
            if post is not None:
                out = post(out, inp, k, cond)
            x = scheduler.step(out, k, x, **options).prev_sample
    if not bool(torch.isfinite(x).all()):
        raise fail("--sampler", "finite samples from the scheduler's loop", "NaN or inf")
    return x
