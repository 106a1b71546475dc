"""Trained models as diffmem scores: local diffusers models, diffmem's own checkpoints, and any
Python callable; and sampling them, in resumable batches, for the audit.

A loaded model is a :class:`ModelScore`: a score ``s(x, t)`` on a diffmem schedule (every
sampler takes it) that also gives its denoiser ``D(x, t) = x + sigma(t)^2 s(x, t)``.

**diffusers.** A pipeline folder (``model_index.json``, ``unet/``, ``scheduler/``) as
``DDPMPipeline.save_pretrained`` writes it, or a ``UNet2DModel`` folder with a scheduler
config. The scheduler's ``K = num_train_timesteps`` betas (``beta_schedule`` ``linear``,
``scaled_linear`` or ``squaredcos_cap_v2``, or ``trained_betas``) give
``abar_k = prod_{i <= k} (1 - beta_i)``, and :class:`DiscreteVP` makes them a VP schedule
on ``t in [0, 1]``: ``t = (k + 1) / K`` is timestep ``k`` (``m^2 = abar_k``,
``sigma^2 = 1 - abar_k``), ``log abar`` is interpolated linearly in between (``abar = 1`` at
``t = 0``), and the network receives the fractional timestep ``K t - 1``. Its output becomes a
score by its ``prediction_type``:

* ``epsilon``: ``eps = net``, ``s = -eps / sigma``;
* ``v_prediction``: ``v = m eps - sigma x_0``, so ``eps = m v + sigma x`` and
  ``s = -(m v + sigma x) / sigma``;
* ``sample``: ``x_0 = net``, ``s = (m x_0 - x) / sigma^2``.

A flow-matching scheduler (``FlowMatchEulerDiscreteScheduler`` and its kin, as SD3 and FLUX
use) is the linear path ``x = (1 - sigma) x_0 + sigma z`` instead (:class:`DiscreteFlow`,
``t = sigma``): the network receives ``timestep = K sigma`` and predicts the velocity
``u = z - x_0``, so ``s = -((1 - sigma) u + x) / sigma`` (prediction type ``flow``).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffmem._checks import fail, positive_int
from diffmem.edm import edm_sample, karras_sigmas
from diffmem.io import atomic_write_json
from diffmem.parallel import SOLO, Team
from diffmem.samplers import sample_ode
from diffmem.schedules import (
    EDM,
    RectifiedFlow,
    Schedule,
    TimeLike,
    expand_as_batch,
    get_schedule,
    time_tensor,
    variance_preserving_t_of_ratio,
)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


# --- the discrete schedules of diffusers, as a VP schedule --------------------------------
def discrete_alphas_cumprod(config: dict[str, Any]) -> Tensor:
    """``abar_k = prod_{i <= k} (1 - beta_i)`` (float64, ``(K,)``) from a diffusers scheduler
    config, as diffusers computes its betas."""
    try:
        K = positive_int("num_train_timesteps", config.get("num_train_timesteps", 1000))
    except ValueError as err:
        raise fail("scheduler", "a positive num_train_timesteps",
                   config.get("num_train_timesteps")) from err
    trained = config.get("trained_betas")
    if trained is not None:
        betas = torch.tensor(trained, dtype=torch.float64)
    else:
        kind = config.get("beta_schedule", "linear")
        start, end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
        if kind == "linear":
            betas = torch.linspace(start, end, K, dtype=torch.float64)
        elif kind == "scaled_linear":
            betas = torch.linspace(start**0.5, end**0.5, K, dtype=torch.float64) ** 2
        elif kind == "squaredcos_cap_v2":
            def abar(u: float) -> float:
                return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

            betas = torch.tensor([min(1 - abar((i + 1) / K) / abar(i / K), 0.999)
                                  for i in range(K)], dtype=torch.float64)
        else:
            raise fail("scheduler", f"beta_schedule one of {BETA_SCHEDULES} (or trained_betas)",
                       repr(kind))
    if config.get("rescale_betas_zero_snr"):
        raise fail("scheduler", "rescale_betas_zero_snr false (a zero final signal has no "
                   "finite noise level to start from)", "true")
    if not bool(((betas > 0) & (betas < 1)).all()):
        raise fail("scheduler", "betas in (0, 1)", f"range [{float(betas.min())}, "
                   f"{float(betas.max())}]")
    return torch.cumprod(1 - betas, 0)


class DiscreteVP(Schedule):
    """A diffusers noise schedule as a diffmem VP schedule on ``[0, 1]``: ``log m^2 =
    log abar`` piecewise linear through ``(0, 0)`` and ``((k + 1)/K, log abar_k)``,
    ``sigma^2 = 1 - m^2``; ``timestep(t) = K t - 1`` is the network's timestep."""

    name = "VP"

    def __init__(self, alphas_cumprod: Tensor) -> None:
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.K = int(abar.shape[0])
        self._grid = torch.linspace(0, 1, self.K + 1, dtype=torch.float64)
        self._log = torch.cat([torch.zeros(1, dtype=torch.float64), torch.log(abar)])
        self._slope = torch.diff(self._log) * self.K

    def params(self) -> dict[str, Any]:
        return {"K": self.K, "abar_last": float(torch.exp(self._log[-1]))}

    def _segment(self, t: Tensor) -> Tensor:
        return (t * self.K).floor().clamp(0, self.K - 1).long()

    def _log_abar(self, t: Tensor) -> Tensor:
        k = self._segment(t)
        log, slope = self._log.to(t.device), self._slope.to(t.device)
        return (log[k] + slope[k] * (t.to(torch.float64) - self._grid.to(t.device)[k])).to(t.dtype)

    def _log_m(self, t: Tensor) -> Tensor:
        return 0.5 * self._log_abar(t)

    def _dlog_m(self, t: Tensor) -> Tensor:
        return (0.5 * self._slope.to(t.device)[self._segment(t)]).to(t.dtype)

    def _sigma2(self, t: Tensor) -> Tensor:
        return -torch.expm1(self._log_abar(t))

    def _dsigma2(self, t: Tensor) -> Tensor:
        return -torch.exp(self._log_abar(t)) * 2 * self._dlog_m(t)

    def _t_of_sigma2(self, sigma2: Tensor) -> Tensor:
        target = torch.log1p(-sigma2.to(torch.float64))
        log = self._log.to(sigma2.device)
        k = (torch.searchsorted(-log, -target, right=True) - 1).clamp(0, self.K - 1)
        slope = self._slope.to(sigma2.device)[k]
        t = self._grid.to(sigma2.device)[k] + (target - log[k]) / slope
        return t.to(sigma2.dtype)

    def t_of_ratio(self, r: TimeLike) -> Tensor:
        """``sigma^2 = 1 - m^2``: ``sigma^2 = r^2 / (1 + r^2)``."""
        return variance_preserving_t_of_ratio(self, r)

    def timestep(self, t: Tensor) -> Tensor:
        """The network's (fractional) timestep at ``t``: ``K t - 1``."""
        return self.K * t - 1

    def time_of_timestep(self, k: Tensor) -> Tensor:
        """The inverse of :meth:`timestep`: ``t = (k + 1) / K``."""
        return (k + 1) / self.K


class DiscreteFlow(RectifiedFlow):
    """diffusers' flow-matching schedulers (``FlowMatchEulerDiscreteScheduler``,
    ``FlowMatchHeunDiscreteScheduler``, ...) as a diffmem schedule: the linear path
    ``x = (1 - sigma) x_0 + sigma z`` (:class:`~diffmem.schedules.RectifiedFlow`, ``t =
    sigma``), on which the network receives ``timestep = K sigma`` (``K =
    num_train_timesteps``), whatever the scheduler's ``shift``, dynamic shifting or sigma
    spacing (those choose which ``sigma`` are visited, not what the network is given). ``T =
    1 - 1/K``: at ``sigma = 1`` the drift is infinite."""

    def __init__(self, K: int) -> None:
        self.K = positive_int("num_train_timesteps", K)
        if self.K < 2:
            raise fail("num_train_timesteps", "at least 2", K)
        super().__init__(1 - 1 / self.K)

    def timestep(self, t: Tensor) -> Tensor:
        """The network's timestep at ``t``: ``K t`` (``K sigma``)."""
        return self.K * t

    def time_of_timestep(self, k: Tensor) -> Tensor:
        """The inverse of :meth:`timestep`: ``t = k / K``."""
        return k / self.K


def scheduler_config(scheduler: Any) -> dict[str, Any]:
    """A diffusers scheduler's config as a plain dict, with ``_class_name`` (the instance's
    class when ``scheduler`` is a scheduler rather than a config)."""
    config = getattr(scheduler, "config", None)
    if config is None:
        return dict(scheduler)
    return {"_class_name": type(scheduler).__name__, **dict(config)}


def is_flow_scheduler(config: dict[str, Any]) -> bool:
    """Whether a diffusers scheduler config is a flow-matching one (``_class_name``
    ``FlowMatch*``)."""
    return str(config.get("_class_name", "")).startswith("FlowMatch")


def scheduler_schedule(config: dict[str, Any]) -> DiscreteVP | DiscreteFlow:
    """The diffmem schedule of a diffusers scheduler config: :class:`DiscreteFlow` for the
    flow-matching schedulers, :class:`DiscreteVP` (its betas) for the others."""
    if is_flow_scheduler(config):
        try:
            return DiscreteFlow(int(config.get("num_train_timesteps", 1000)))
        except (TypeError, ValueError) as err:
            raise fail("scheduler", "a positive num_train_timesteps",
                       config.get("num_train_timesteps")) from err
    return DiscreteVP(discrete_alphas_cumprod(config))


def prediction_of(config: dict[str, Any]) -> str:
    """What the network predicts under a diffusers scheduler config: ``'flow'`` (the
    velocity ``z - x_0``) for the flow-matching schedulers, else the config's
    ``prediction_type`` (default ``'epsilon'``), checked."""
    if is_flow_scheduler(config):
        return "flow"
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES[:3]:
        raise fail("prediction_type", f"one of {PREDICTION_TYPES[:3]}", repr(prediction))
    return str(prediction)


def _load_options() -> dict[str, Any]:
    """``from_pretrained`` options: local files only, and the low-memory loading only where
    ``accelerate`` (which it needs) is installed, so diffusers has nothing to warn about."""
    return {"local_files_only": True,
            "low_cpu_mem_usage": importlib.util.find_spec("accelerate") is not None}


# --- scores of models ----------------------------------------------------------------------
class ModelScore:
    """A trained model as a diffmem score on ``schedule``: ``fn(x, t) -> s`` (``kind``
    ``'score'``) or ``fn(x, t) -> D`` (``kind='denoiser'``, ``D = x + sigma^2 s``), applied
    in batches. Outputs are checked (shape of ``x``, finite).

    A conditional model (``conditional=True``) is ``fn(x, t, y)`` with ``y`` the batch's
    conditions (integer labels ``(batch,)`` or vectors ``(batch, *cond_shape)``); with
    ``guidance = w`` and a ``null`` condition (the one that means "no condition") its output
    is classifier-free guided, ``out(y) = out(null) + w (out(y) - out(null))`` (linear in
    the output, so the same for a score, a denoiser or a noise prediction).

    ``network`` keeps what the diffusers sampler needs (the UNet, its scheduler config and
    how it takes a condition) when the model is a diffusers one."""

    def __init__(self, fn: Callable[..., Tensor], schedule: Schedule,
                 data_shape: tuple[int, ...], kind: str = "score", name: str = "model",
                 batch: int = 256, *, conditional: bool = False,
                 network: dict[str, Any] | None = None) -> None:
        if kind not in ("score", "denoiser"):
            raise fail("kind", "'score' or 'denoiser'", repr(kind))
        self.fn, self.schedule, self.kind, self.name = fn, schedule, kind, name
        self.data_shape = tuple(data_shape)
        self.batch = positive_int("batch", batch)
        self.conditional = conditional
        self.network = network
        self.guidance: float | None = None
        self.null: Tensor | None = None

    def guided(self, guidance: float | None, null: Tensor | None) -> ModelScore:
        """Set classifier-free guidance (``None``: none); checks that the model takes
        ``null``. Returns the model."""
        if guidance is None:
            self.guidance, self.null = None, None
            return self
        if not self.conditional:
            raise fail("--guidance", "a conditional model (with --train-cond or --conditions)",
                       guidance)
        if not math.isfinite(guidance):
            raise fail("--guidance", "a finite guidance weight", guidance)
        if null is None:
            raise fail("--null-cond", "the condition that means 'no condition', with "
                       "--guidance", None)
        self.check_condition(null[None], "--null-cond")
        self.guidance, self.null = float(guidance), null
        return self

    def check_condition(self, y: Tensor, name: str) -> None:
        """Evaluate the model once on ``y`` (a batch of conditions) at mid-time; an error
        the model raises becomes a ``ValueError`` naming ``name``."""
        x = torch.zeros(y.shape[0], *self.data_shape)
        t = torch.full((y.shape[0],), 0.5 * float(self.schedule.T))
        try:
            self._apply(x, t, y)
        except Exception as err:  # the user's model: say what it raised
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            raise fail(name, f"conditions {self.name} can take", f"shape {tuple(y.shape)}, "
                       f"dtype {y.dtype}: {type(err).__name__}: {(lines or [''])[-1][:200]}"
                       ) from err

    def _apply(self, x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        """``fn`` on one batch, conditioned (and guided) when the model is conditional."""
        if not self.conditional:
            return self.fn(x, t)
        if y is None:
            raise fail("y", f"conditions for the conditional model {self.name}", None)
        if y.shape[0] != x.shape[0]:
            raise fail("y", f"one condition per sample ({x.shape[0]})", tuple(y.shape))
        if self.guidance is None:
            return self.fn(x, t, y)
        assert self.null is not None
        null = self.null.to(y.device).expand(x.shape[0], *self.null.shape)
        both = self.fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([null, y.to(null)]))
        uncond, cond = both.chunk(2)
        return uncond + self.guidance * (cond - uncond)

    def _out(self, x: Tensor, t: TimeLike, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if not isinstance(x, Tensor) or tuple(x.shape[1:]) != self.data_shape:
            raise fail("x", f"a tensor (batch, *{self.data_shape}) for {self.name}",
                       f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__)
        tt = time_tensor(t).to(device=x.device, dtype=x.dtype).expand(x.shape[0])
        if y is not None and y.dim() >= 1 and y.shape[0] == 1 and x.shape[0] > 1:
            y = y.expand(x.shape[0], *y.shape[1:])
        parts = []
        with torch.no_grad():
            for lo in range(0, x.shape[0], self.batch):
                rows = slice(lo, lo + self.batch)
                out = self._apply(x[rows], tt[rows], None if y is None else y[rows])
                if not isinstance(out, Tensor) or out.shape != x[rows].shape:
                    raise fail(self.name, f"outputs of the shape of x, {tuple(x[rows].shape)}",
                               f"shape {tuple(out.shape)}" if isinstance(out, Tensor)
                               else type(out).__name__)
                parts.append(out.to(x.dtype))
        out = torch.cat(parts) if parts else torch.empty_like(x)
        if not bool(torch.isfinite(out).all()):
            raise fail(self.name, "finite outputs", "NaN or inf")
        return out, self.schedule.sigma2(tt).to(x.dtype)

    def __call__(self, x: Tensor, t: TimeLike, y: Tensor | None = None) -> Tensor:
        """The score ``s(x, t)`` (``s(x, t | y)`` for a conditional model)."""
        out, s2 = self._out(x, t, y)
        if self.kind == "score":
            return out
        return (out - x) / expand_as_batch(s2, x)

    def sigma2_score(self, x: Tensor, t: TimeLike, y: Tensor | None = None) -> Tensor:
        """``sigma(t)^2 s(x, t)``."""
        out, s2 = self._out(x, t, y)
        if self.kind == "denoiser":
            return out - x
        return expand_as_batch(s2, x) * out

    def denoiser(self, x: Tensor, t: TimeLike, y: Tensor | None = None) -> Tensor:
        """``D(x, t) = x + sigma(t)^2 s(x, t)``."""
        return x + self.sigma2_score(x, t, y)


def network_output_to_score(out: Tensor, x: Tensor, m: Tensor, sigma: Tensor,
                            prediction_type: str) -> Tensor:
    """A diffusers network's output as a score (``m``, ``sigma`` per sample): ``epsilon``
    ``s = -out / sigma``; ``v_prediction`` ``s = -(m out + sigma x) / sigma``; ``sample``
    ``s = (m out - x) / sigma^2``; ``flow`` (the velocity ``u = z - x_0`` on the linear path
    ``m = 1 - sigma``, so ``z = m u + x``) ``s = -(m out + x) / sigma``."""
    m, sigma = expand_as_batch(m.to(x), x), expand_as_batch(sigma.to(x), x)
    if prediction_type == "epsilon":
        return -out / sigma
    if prediction_type == "flow":
        return -(m * out + x) / sigma
    if prediction_type == "v_prediction":
        return -(m * out + sigma * x) / sigma
    if prediction_type == "sample":
        return (m * out - x) / (sigma * sigma)
    raise fail("prediction_type", f"one of {PREDICTION_TYPES}", repr(prediction_type))


def score_to_network_output(score: Tensor, x: Tensor, m: Tensor, sigma: Tensor,
                            prediction_type: str) -> Tensor:
    """The inverse of :func:`network_output_to_score`: the output a network of
    ``prediction_type`` gives for ``score`` at ``x``: ``epsilon`` ``-sigma s``;
    ``v_prediction`` ``-sigma (s + x) / m``; ``sample`` ``(sigma^2 s + x) / m``; ``flow``
    ``-(sigma s + x) / m``."""
    m, sigma = expand_as_batch(m.to(x), x), expand_as_batch(sigma.to(x), x)
    if prediction_type == "epsilon":
        return -sigma * score
    if prediction_type == "flow":
        return -(sigma * score + x) / m
    if prediction_type == "v_prediction":
        return -sigma * (score + x) / m
    if prediction_type == "sample":
        return (sigma * sigma * score + x) / m
    raise fail("prediction_type", f"one of {PREDICTION_TYPES}", repr(prediction_type))


def read_scheduler_config(folder: Path, scheduler: str | Path | None) -> tuple[dict[str, Any],
                                                                                Path]:
    """The scheduler config of a diffusers model folder: ``scheduler`` (a folder or its
    ``scheduler_config.json``) or the pipeline's ``scheduler/``; and its path."""
    sched = Path(folder / "scheduler" if scheduler is None else scheduler)
    if sched.is_dir():
        sched = sched / "scheduler_config.json"
    if not sched.is_file():
        raise fail("--scheduler", "a diffusers scheduler config (scheduler_config.json or "
                   "its folder)", str(sched))
    try:
        return json.loads(sched.read_text()), sched
    except (OSError, ValueError) as err:
        raise fail("--scheduler", "a readable JSON scheduler config", f"{sched} ({err})") from err


#: diffusers denoising networks diffmem loads, and the keyword each takes its condition by
#: (UNets and diffusion transformers alike; ``pooled_projections`` too for SD3's, from a
#: text pipeline's prompts).
DENOISER_CLASSES = {"UNet2DModel": "class_labels",
                    "UNet2DConditionModel": "encoder_hidden_states",
                    "DiTTransformer2DModel": "class_labels",
                    "Transformer2DModel": "class_labels",
                    "PixArtTransformer2DModel": "encoder_hidden_states",
                    "SD3Transformer2DModel": "encoder_hidden_states",
                    "FluxTransformer2DModel": "encoder_hidden_states"}
#: Networks that need more than one condition tensor: only through a text pipeline.
NEEDS_PROMPTS = ("SD3Transformer2DModel", "FluxTransformer2DModel")


def _denoiser_dir(folder: Path) -> Path:
    """The network's folder: a pipeline's ``unet/`` or ``transformer/``, or ``folder``."""
    if (folder / "model_index.json").is_file():
        for name in ("unet", "transformer"):
            if (folder / name / "config.json").is_file():
                return folder / name
        raise fail("--model", "a diffusers pipeline folder with unet/ or transformer/",
                   str(folder))
    if not (folder / "config.json").is_file():
        raise fail("--model", "a diffusers pipeline folder (model_index.json, unet/ or "
                   "transformer/, scheduler/) or a network folder (config.json)", str(folder))
    return folder


def load_diffusers(path: str | Path, scheduler: str | Path | None = None,
                   device: str | torch.device = "cpu") -> ModelScore:
    """A local diffusers model as a score on its scheduler's schedule: a pipeline folder,
    or a network folder with ``scheduler`` (a scheduler folder or its
    ``scheduler_config.json``). Nothing is downloaded.

    The network is a UNet or a diffusion transformer of :data:`DENOISER_CLASSES`.
    ``UNet2DModel`` is unconditional, or class-conditional when its config has class
    embeddings (``num_class_embeds``): it is then called with ``class_labels=y``, as are
    DiT's transformers. ``UNet2DConditionModel`` and ``PixArtTransformer2DModel`` take
    ``encoder_hidden_states=y``, ``y`` a batch of precomputed ``(seq, dim)`` embeddings (no
    text encoder is loaded: see :mod:`diffmem.text` for prompts). A pipeline with a
    ``vae/`` (DiT's) is a latent model: its samples are the VAE's decoded images."""
    try:
        import diffusers
    except ImportError as err:
        raise fail("--model", "diffusers installed (pip install 'diffmem[diffusers]')",
                   str(path)) from err
    folder = Path(path)
    if not folder.is_dir():
        raise fail("--model", "a diffusers model folder", str(folder))
    net_dir = _denoiser_dir(folder)
    config, sched_path = read_scheduler_config(folder, scheduler)
    try:
        class_name = json.loads((net_dir / "config.json").read_text()).get(
            "_class_name", "UNet2DModel")
    except ValueError as err:
        raise fail("--model", "a readable network config.json", str(net_dir)) from err
    if class_name not in DENOISER_CLASSES:
        raise fail("--model", f"a network of a class diffmem loads, {tuple(DENOISER_CLASSES)}",
                   class_name)
    if class_name in NEEDS_PROMPTS:
        raise fail("--prompts", f"the prompts of a {class_name} pipeline (its conditions are "
                   "text embeddings and their pooled projections)", None)
    try:
        unet = getattr(diffusers, class_name).from_pretrained(str(net_dir), **_load_options())
    except (OSError, ValueError, RuntimeError) as err:
        raise fail("--model", f"a loadable {class_name}", f"{net_dir} ({err})") from err
    model = wrap_diffusers(unet.to(device), config, name=f"diffusers {net_dir.name}",
                           scheduler_path=str(sched_path))
    if net_dir != folder and (folder / "vae" / "config.json").is_file():
        try:
            vae = diffusers.AutoencoderKL.from_pretrained(str(folder / "vae"),
                                                          **_load_options())
        except (OSError, ValueError, RuntimeError) as err:
            raise fail("--model", "a loadable AutoencoderKL in vae/", f"{folder} ({err})"
                       ) from err
        attach_decoder(model, vae.to(device))
    return model


def attach_decoder(model: ModelScore, vae: Any) -> None:
    """Make ``model`` a latent model whose samples are ``vae``'s images:
    ``image = (decode(z / scaling_factor + shift_factor) + 1) / 2`` clipped to ``[0, 1]``
    (the pipelines' post-processing), of ``out_channels x (f h) x (f w)`` with
    ``f = 2^(len(block_out_channels) - 1)``; and its inverse on the way in,
    ``z = (mean E(2 image - 1) - shift_factor) scaling_factor`` (the latent mean, as
    training scripts encode their images), as ``network["encode"]``."""
    scale = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
    shift = getattr(vae.config, "shift_factor", None)

    def encode(images: Tensor) -> Tensor:
        x = (2 * images - 1).to(device=vae.device, dtype=vae.dtype)
        with torch.no_grad():
            out = vae.encode(x, return_dict=False)[0]
        z = (out.mean if hasattr(out, "mean") else out).float()
        if shift is not None:
            z = z - float(shift)
        return z * scale

    def decode(latents: Tensor) -> Tensor:
        z = latents.to(device=vae.device, dtype=vae.dtype) / scale
        if shift is not None:
            z = z + float(shift)
        with torch.no_grad():
            image = vae.decode(z, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    f = 2 ** (len(vae.config.block_out_channels) - 1)
    assert model.network is not None
    model.network.update(decode=decode, encode=encode, image_shape=(int(vae.config.out_channels),
                                                     model.data_shape[1] * f,
                                                     model.data_shape[2] * f))


def pack_latents(x: Tensor) -> Tensor:
    """FLUX's packed latents: ``(B, C, h, w)`` as ``(B, (h/2)(w/2), 4C)``, each token a 2 x 2
    patch with features ordered ``(c, row, column)``."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(
        b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(tokens: Tensor, h: int, w: int) -> Tensor:
    """The inverse of :func:`pack_latents` for latents of ``h x w``."""
    b, _, f = tokens.shape
    return tokens.reshape(b, h // 2, w // 2, f // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(
        b, f // 4, h, w)


def latent_positions(h: int, w: int) -> Tensor:
    """FLUX's image token positions ``(0, row, column)`` of the ``(h/2) x (w/2)`` packed
    grid, ``((h/2)(w/2), 3)``."""
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()


def wrap_diffusers(unet: Any, scheduler: Any, *, name: str = "diffusers model",
                   scheduler_path: str | None = None,
                   embed: Callable[[Tensor, Tensor], dict[str, Any]] | None = None,
                   latent_size: tuple[int, int] | None = None) -> ModelScore:
    """A diffusers network in memory (a UNet or a diffusion transformer of
    :data:`DENOISER_CLASSES`) with its scheduler (an instance or its config) as a score on
    the scheduler's schedule (:func:`scheduler_schedule`), as :func:`load_diffusers` gives
    it (for a model being trained; its weights are read at each call, in eval mode and
    without gradients). The network is called ``net(x, timestep=k, **condition)`` with the
    timestep expanded to the batch, and a learned variance (``out_channels = 2
    in_channels``, DiT and PixArt) dropped, as their pipelines do. ``embed(y, x)``, when
    given, turns the batch's conditions ``y`` into the network's keyword arguments (a text
    pipeline's prompt indices into their embeddings). ``latent_size`` ``(h, w)`` overrides
    the network's ``sample_size`` (a pipeline run at another resolution).

    FLUX's transformer works on packed latents (:func:`pack_latents`): diffmem's samples are
    the unpacked ``(in_channels / 4, h, w)`` latents, the network receives them packed with
    their positions (``img_ids``, :func:`latent_positions`) and ``timestep / 1000``, as
    ``FluxPipeline`` passes them, and its output is unpacked."""
    config = scheduler_config(scheduler)
    prediction = prediction_of(config)
    schedule = scheduler_schedule(config)
    class_name = type(unet).__name__
    if class_name not in DENOISER_CLASSES:
        raise fail("unet", f"a network of a class diffmem loads, {tuple(DENOISER_CLASSES)}",
                   class_name)
    cfg = unet.config
    flux = class_name == "FluxTransformer2DModel"
    size = latent_size if latent_size is not None else getattr(cfg, "sample_size", None)
    if size is None:
        raise fail("latent_size", f"the latent size of a {class_name} (its config has no "
                   "sample_size)", None)
    size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    channels = int(cfg.in_channels) // 4 if flux else int(cfg.in_channels)
    data_shape = (channels, *size)
    takes = DENOISER_CLASSES[class_name]
    learned_sigma = int(getattr(cfg, "out_channels", None) or cfg.in_channels) == \
        2 * int(cfg.in_channels)
    # made once where the network lives: the per-call .to() below is then a no-op
    positions = latent_positions(*size).to(device=unet.device, dtype=unet.dtype) \
        if flux else None
    extra: dict[str, Any] = {}
    if class_name == "PixArtTransformer2DModel":
        extra["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    labels = (getattr(cfg, "num_class_embeds", None) is not None
              or getattr(cfg, "class_embed_type", None) is not None
              or getattr(cfg, "num_embeds_ada_norm", None) is not None)
    conditional = embed is not None or takes == "encoder_hidden_states" or labels

    def net(x: Tensor, timestep: Tensor, y: Tensor | None = None) -> Tensor:
        kwargs: dict[str, Any] = dict(extra)
        if embed is not None:
            assert y is not None
            kwargs.update(embed(y, x))
        elif conditional:
            assert y is not None
            kwargs[takes] = y.to(x.device).long() if takes == "class_labels" else \
                y.to(device=x.device, dtype=unet.dtype)
        timestep = torch.as_tensor(timestep, device=x.device)
        if timestep.dim() == 0:
            timestep = timestep.expand(x.shape[0])
        inp = x.to(unet.dtype)
        if flux:
            assert positions is not None
            inp, timestep = pack_latents(inp), timestep / 1000
            kwargs["img_ids"] = positions.to(device=x.device, dtype=unet.dtype)
        was_training = unet.training
        unet.eval()
        try:
            with torch.no_grad():
                out = unet(inp, timestep=timestep, **kwargs).sample
        finally:
            unet.train(was_training)
        if flux:
            return unpack_latents(out, *size)
        return out[:, :channels] if learned_sigma else out

    def score(x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        t64 = t.to(torch.float64)
        out = net(x, schedule.timestep(t.to(torch.float32)), y)
        return network_output_to_score(out.to(x.dtype), x, schedule.m(t64),
                                       schedule.sigma(t64), prediction)

    patch = 2 if flux else int(getattr(cfg, "patch_size", None) or 1)
    return ModelScore(score, schedule, data_shape, "score", name=name,
                      conditional=conditional,
                      network={"net": net, "unet": unet, "scheduler_config": config,
                               "scheduler_path": scheduler_path, "takes": takes,
                               "tokens": (size[0] // patch) * (size[1] // patch),
                               "linear_sigmas": flux})


def load_checkpoint_model(path: str | Path, index: int = 0,
                          device: str | torch.device = "cpu") -> ModelScore:
    """A diffmem checkpoint as a score: a score-MLP stack (``train_dsm``; model ``index``,
    EMA weights) or an EDM U-Net (``train_edm``; EMA weights when kept)."""
    from diffmem.nn import MLPConfig, NetworkScore, ScoreMLP
    from diffmem.training import load_checkpoint

    state = load_checkpoint(Path(path), device)
    if "architecture" in state:  # an EDM U-Net
        from diffmem.unet import EDMDenoiser, UNet

        arch = state["architecture"]
        den = EDMDenoiser(UNet(int(arch["channels"]), int(arch["image_channels"])))
        den.load_state_dict(state["ema"] if state.get("ema") is not None else state["model"])
        den = den.to(device).eval()
        shape = tuple(int(v) for v in state.get("data_shape", [arch["image_channels"], 32, 32]))
        return ModelScore(lambda x, t: den(x, t), EDM(), shape, "denoiser",
                          name=f"U-Net {Path(path).name}")
    cfg = state.get("config")
    if not isinstance(cfg, dict) or "parameterizations" not in cfg:
        raise fail("--model", "a diffmem checkpoint (train_dsm or train_edm)", str(path))
    weights = state["ema"]
    dim = int(weights["weights.0"].shape[1]) - int(cfg["mlp"].get("n_fourier", 8))
    out_dim = int(weights[f"weights.{len([k for k in weights if k.startswith('weights.')]) - 1}"]
                  .shape[2])
    mlp = ScoreMLP(MLPConfig(dim=out_dim, cond_dim=dim - out_dim, **cfg["mlp"]),
                   cfg["parameterizations"])
    mlp.load_state_dict(weights)
    if not 0 <= index < mlp.n_models:
        raise fail("--model-index", f"a model of the stack, 0..{mlp.n_models - 1}", index)
    schedule = get_schedule(cfg.get("schedule", "VP"))
    net = NetworkScore(mlp.to(device), schedule, index)
    conditional = mlp.config.cond_dim > 0

    def fn(x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return net(x, t) if not conditional else net(x, t, y.reshape(x.shape[0], -1).to(x))

    return ModelScore(fn, schedule, (out_dim,), "score",
                      name=f"score MLP {Path(path).name}[{index}]", conditional=conditional)


def load_callable(spec: str, schedule: str, kind: str, data_shape: tuple[int, ...],
                  conditional: bool = False) -> ModelScore:
    """``package.module:function`` or ``path/to/file.py:function``: a function ``fn(x, t)``
    (``fn(x, t, y)`` when ``conditional``, ``y`` the batch's conditions) returning the score
    (``kind='score'``) or the denoiser ``D(x, t)`` (``'denoiser'``; on the EDM schedule
    ``t`` is the noise level ``sigma``) on ``schedule`` (VE, VP, EDM or RF)."""
    if ":" not in spec:
        raise fail("--model", "package.module:function or path/to/file.py:function", spec)
    where, name = spec.rsplit(":", 1)
    try:
        if where.endswith(".py"):
            file = Path(where)
            if not file.is_file():
                raise fail("--model", "an existing Python file", str(file))
            module_spec = importlib.util.spec_from_file_location(file.stem, file)
            assert module_spec is not None and module_spec.loader is not None
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[file.stem] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ValueError:
        raise
    except Exception as err:  # the user's code: say what happened
        raise fail("--model", f"an importable module {where!r}",
                   f"{type(err).__name__}: {err}") from err
    fn = getattr(module, name, None)
    if not callable(fn):
        raise fail("--model", f"a callable named {name!r} in {where}",
                   "nothing callable by that name")
    return ModelScore(fn, get_schedule(schedule), data_shape, kind, name=spec,
                      conditional=conditional)


def load_model(spec: str, *, scheduler: str | None = None, schedule: str = "VP",
               kind: str = "score", data_shape: tuple[int, ...] | None = None,
               index: int = 0, device: str | torch.device = "cpu",
               conditional: bool = False) -> ModelScore:
    """A model named on the command line: a diffusers folder, a diffmem checkpoint
    (``.pt``) or a Python callable (``module:function``, ``file.py:function``; called
    ``fn(x, t, y)`` when ``conditional``). Diffusers models and checkpoints say themselves
    whether they are conditional."""
    path = Path(spec)
    if path.is_dir():
        return load_diffusers(path, scheduler, device)
    if path.suffix == ".pt":
        if not path.is_file():
            raise fail("--model", "an existing checkpoint file", str(path))
        return load_checkpoint_model(path, index, device)
    if data_shape is None:
        raise fail("--model", "a training set to take the data shape from", spec)
    return load_callable(spec, schedule, kind, data_shape, conditional)


# --- sampling, in resumable batches --------------------------------------------------------
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
