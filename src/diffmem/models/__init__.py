"""Trained models as diffmem scores: local diffusers models, diffmem's own checkpoints, and any
Python callable; and sampling them, in resumable batches, for the audit.

A loaded model is a :class:`ModelScore` (:mod:`~diffmem.models.score`): a score ``s(x, t)``
on a diffmem schedule (every sampler takes it) that also gives its denoiser ``D(x, t) = x +
sigma(t)^2 s(x, t)``. The package along its seams:

* :mod:`~diffmem.models.discrete`: diffusers schedulers as diffmem schedules
  (:class:`DiscreteVP`, :class:`DiscreteFlow`) and the networks' parameterizations
  (epsilon, ``v``, sample, flow velocity) to and from scores;
* :mod:`~diffmem.models.score`: :class:`ModelScore`;
* :mod:`~diffmem.models.wrappers`: diffusers folders and networks as scores;
* :mod:`~diffmem.models.loading`: ``--model`` of every family (diffusers, checkpoint,
  callable);
* :mod:`~diffmem.models.sampling`: sampling a model in resumable batches.

Everything is importable from ``diffmem.models`` as before the split.
"""

from diffmem.models.discrete import (
    BETA_SCHEDULES,
    PREDICTION_TYPES,
    DiscreteFlow,
    DiscreteVP,
    discrete_alphas_cumprod,
    is_flow_scheduler,
    network_output_to_score,
    prediction_of,
    scheduler_config,
    scheduler_schedule,
    score_to_network_output,
)
from diffmem.models.loading import load_callable, load_checkpoint_model, load_model
from diffmem.models.sampling import (
    SAMPLERS,
    draws_per_process,
    ode_draw,
    output_shape,
    sample_model,
)
from diffmem.models.score import ModelScore
from diffmem.models.wrappers import (
    DENOISER_CLASSES,
    NEEDS_PROMPTS,
    _load_options,
    attach_decoder,
    latent_positions,
    load_diffusers,
    pack_latents,
    read_scheduler_config,
    unpack_latents,
    wrap_diffusers,
)

__all__ = ["BETA_SCHEDULES", "DENOISER_CLASSES", "NEEDS_PROMPTS", "PREDICTION_TYPES",
           "SAMPLERS", "DiscreteFlow", "DiscreteVP", "ModelScore", "_load_options",
           "attach_decoder", "discrete_alphas_cumprod", "draws_per_process",
           "is_flow_scheduler", "latent_positions", "load_callable", "load_checkpoint_model",
           "load_diffusers", "load_model", "network_output_to_score", "ode_draw",
           "output_shape", "pack_latents", "prediction_of", "read_scheduler_config",
           "sample_model", "scheduler_config", "scheduler_schedule", "score_to_network_output",
           "unpack_latents", "wrap_diffusers"]
