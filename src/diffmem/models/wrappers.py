"""Local diffusers models as diffmem scores: folders loaded (:func:`load_diffusers`) and
networks wrapped (:func:`wrap_diffusers`) with their scheduler as a
:class:`~diffmem.models.discrete.DiscreteVP` or
:class:`~diffmem.models.discrete.DiscreteFlow` schedule; the network receives the fractional
timestep ``K t - 1`` (``K sigma`` for a flow-matching model) and its output becomes a score by
its prediction type. A latent model's decoder is attached (:func:`attach_decoder`) so its
samples are the images it draws."""

from __future__ import annotations

import importlib
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffmem._checks import fail
from diffmem.models.discrete import (
    network_output_to_score,
    prediction_of,
    scheduler_config,
    scheduler_schedule,
)
from diffmem.models.score import ModelScore


def _load_options() -> dict[str, Any]:
    """``from_pretrained`` options: local files only, and the low-memory loading only where
    ``accelerate`` (which it needs) is installed, so diffusers has nothing to warn about."""
    return {"local_files_only": True,
            "low_cpu_mem_usage": importlib.util.find_spec("accelerate") is not None}


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
    net = _Network(unet, embed, latent_size)

    def score(x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        t64 = t.to(torch.float64)
        out = net(x, schedule.timestep(t.to(torch.float32)), y)
        return network_output_to_score(out.to(x.dtype), x, schedule.m(t64),
                                       schedule.sigma(t64), prediction)

    size = net.size
    patch = 2 if net.flux else int(getattr(unet.config, "patch_size", None) or 1)
    return ModelScore(score, schedule, net.data_shape, "score", name=name,
                      conditional=net.conditional,
                      network={"net": net, "unet": unet, "scheduler_config": config,
                               "scheduler_path": scheduler_path, "takes": net.takes,
                               "tokens": (size[0] // patch) * (size[1] // patch),
                               "linear_sigmas": net.flux})


class _Network:
    """A diffusers network called as its pipeline calls it (:func:`wrap_diffusers`):
    ``net(x, timestep, y)`` with the condition as the network takes it, in eval mode without
    gradients, FLUX's latents packed, a learned variance dropped."""

    def __init__(self, unet: Any, embed: Callable[[Tensor, Tensor], dict[str, Any]] | None,
                 latent_size: tuple[int, int] | None) -> None:
        class_name = type(unet).__name__
        if class_name not in DENOISER_CLASSES:
            raise fail("unet", f"a network of a class diffmem loads, "
                       f"{tuple(DENOISER_CLASSES)}", class_name)
        cfg = unet.config
        self.unet, self.embed, self.flux = unet, embed, class_name == "FluxTransformer2DModel"
        size = latent_size if latent_size is not None else getattr(cfg, "sample_size", None)
        if size is None:
            raise fail("latent_size", f"the latent size of a {class_name} (its config has no "
                       "sample_size)", None)
        self.size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.channels = int(cfg.in_channels) // 4 if self.flux else int(cfg.in_channels)
        self.data_shape = (self.channels, *self.size)
        self.takes = DENOISER_CLASSES[class_name]
        self.learned_sigma = int(getattr(cfg, "out_channels", None) or cfg.in_channels) == \
            2 * int(cfg.in_channels)
        # made once where the network lives: the per-call .to() below is then a no-op
        self.positions = latent_positions(*self.size).to(device=unet.device, dtype=unet.dtype) \
            if self.flux else None
        self.extra: dict[str, Any] = {}
        if class_name == "PixArtTransformer2DModel":
            self.extra["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
        labels = (getattr(cfg, "num_class_embeds", None) is not None
                  or getattr(cfg, "class_embed_type", None) is not None
                  or getattr(cfg, "num_embeds_ada_norm", None) is not None)
        self.conditional = embed is not None or self.takes == "encoder_hidden_states" or labels

    def __call__(self, x: Tensor, timestep: Tensor, y: Tensor | None = None) -> Tensor:
        unet = self.unet
        kwargs: dict[str, Any] = dict(self.extra)
        if self.embed is not None:
            assert y is not None
            kwargs.update(self.embed(y, x))
        elif self.conditional:
            assert y is not None
            kwargs[self.takes] = y.to(x.device).long() if self.takes == "class_labels" else \
                y.to(device=x.device, dtype=unet.dtype)
        timestep = torch.as_tensor(timestep, device=x.device)
        if timestep.dim() == 0:
            timestep = timestep.expand(x.shape[0])
        inp = x.to(unet.dtype)
        if self.flux:
            assert self.positions is not None
            inp, timestep = pack_latents(inp), timestep / 1000
            kwargs["img_ids"] = self.positions.to(device=x.device, dtype=unet.dtype)
        was_training = unet.training
        unet.eval()
        try:
            with torch.no_grad():
                out = unet(inp, timestep=timestep, **kwargs).sample
        finally:
            unet.train(was_training)
        if self.flux:
            return unpack_latents(out, *self.size)
        return out[:, :self.channels] if self.learned_sigma else out
