r"""Latent text-to-image pipelines as diffmem models: prompts in, images out.

A diffusers pipeline folder (``model_index.json`` with ``unet`` or ``transformer``, ``vae``,
``text_encoder``\(s), ``tokenizer``\(s) and ``scheduler``, as ``save_pretrained`` writes
it: Stable Diffusion 1.x/2.x (epsilon or v prediction), SDXL (two text encoders, pooled
embeddings and size conditioning), SD3 (a diffusion transformer on flow matching), FLUX
(CLIP and T5 encoders, a transformer on packed latents, flow matching) and PixArt-alpha and
-sigma (a T5 encoder, a transformer with a learned variance) becomes a conditional
:class:`~diffmem.models.ModelScore` on its latents:

* the prompts (:func:`diffmem.prompts.read_prompts`) are encoded once by the pipeline's own
  tokenizer and text encoder (``encode_prompt``, with its call's ``max_sequence_length``), and the
  negative prompt (default the empty one) last: the model's condition is a prompt's index ``y``
  and the null condition is the negative prompt's, so classifier-free guidance ``out(null) + w
  (out(y) - out(null))`` is the pipeline's (applied only for ``w > 1``, as the pipelines do; ``w``
  defaults to the pipeline's ``guidance_scale``, for FLUX to its ``true_cfg_scale``, 1: none);
* the network receives ``encoder_hidden_states = E[y]`` and what else its pipeline passes:
  the pooled embeddings ``P[y]`` as SD3's and FLUX's ``pooled_projections`` or SDXL's
  ``text_embeds`` with ``time_ids = (H, W, 0, 0, H, W)`` (SDXL's null condition is zeros,
  as its ``force_zeros_for_empty_prompt`` says); PixArt's ``encoder_attention_mask``;
  FLUX's ``txt_ids`` and its distilled ``guidance`` (the call's default ``guidance_scale``,
  3.5, an input of the network, not a guidance of diffmem's). Its output becomes a score by
  the scheduler's prediction type, on the scheduler's schedule (``scaled_linear`` betas for
  SD, the flow-matching path for SD3 and FLUX, whose sigmas ``linspace(1, 1/n, n)`` and
  dynamic shift are its pipeline's);
* samples are decoded by the VAE, ``image = (decode(z / scaling_factor + shift_factor) +
  1) / 2`` clipped to ``[0, 1]`` (the pipelines' post-processing, without their safety
  checker), and audited as images of ``3 x H x W`` (``H = vae_scale_factor * sample_size``
  by default, FLUX's ``128 vae_scale_factor``; :class:`TextOptions` ``resolution`` sets
  another).

Prompts longer than a tokenizer keeps are truncated by the pipeline; diffmem counts the
tokens first and says which prompts were cut (:attr:`TextModel.truncated`). PixArt-alpha's
resolution binning is not applied: diffmem generates at the resolution asked for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffmem._checks import fail
from diffmem.models import ModelScore, _load_options, attach_decoder, wrap_diffusers
from diffmem.prompts import Prompts

#: Components a latent text-to-image pipeline folder must have.
REQUIRED = ("vae", "text_encoder", "tokenizer", "scheduler")
DENOISERS = ("unet", "transformer")
#: The pipelines diffmem samples with prompts.
PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline",
             "StableDiffusion3Pipeline", "FluxPipeline", "PixArtAlphaPipeline",
             "PixArtSigmaPipeline")
#: FLUX's pipelines generate ``128 * vae_scale_factor`` pixels square by default (their
#: transformer's config has no ``sample_size``).
FLUX_SAMPLE_SIZE = 128
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def refuse_with_prompts(options: dict[str, Any]) -> None:
    """Options that have no meaning with ``--prompts`` (the prompts are the conditions, the
    negative prompt the null one, the pipeline brings its scheduler): the first one given
    raises ``ValueError`` naming it."""
    given = [name for name, v in options.items() if v is not None]
    if given:
        raise fail(given[0], "no value with --prompts (the prompts are the conditions, the "
                   "negative prompt the null one, the pipeline brings its scheduler)",
                   str(options[given[0]]))


def _index(folder: Path) -> dict[str, Any]:
    """The pipeline's ``model_index.json``, with every required component present."""
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise fail("--model", "a diffusers pipeline folder with model_index.json (for "
                   "--prompts)", str(folder))
    try:
        index = json.loads(index_file.read_text())
    except ValueError as err:
        raise fail("--model", "a readable model_index.json", f"{index_file} ({err})") from err
    denoiser = [d for d in DENOISERS if index.get(d)]
    listed = [c for c, v in index.items() if not c.startswith("_") and isinstance(v, list)
              and v and v[0] is not None]  # e.g. SDXL's text_encoder_2 and tokenizer_2
    wanted = list(REQUIRED) + [c for c in listed if c not in REQUIRED and c not in DENOISERS]
    missing = [c for c in wanted if not index.get(c) or not (folder / c).is_dir()]
    if not denoiser or not (folder / denoiser[0]).is_dir():
        missing.insert(0, " or ".join(DENOISERS))
    if missing:
        raise fail("--model", f"a text-to-image pipeline with {', '.join(REQUIRED)} and a "
                   f"{' or '.join(DENOISERS)}", f"{folder}: missing {', '.join(missing)}")
    return index


def pipeline_resolution(folder: str | Path) -> tuple[int, int]:
    """The image size ``(H, W)`` a pipeline folder generates by default, from its configs
    alone: ``vae_scale_factor * sample_size`` with ``vae_scale_factor = 2^(len(
    block_out_channels) - 1)`` (FLUX: ``sample_size = 128``)."""
    folder = Path(folder)
    _index(folder)
    net = next(folder / d for d in DENOISERS if (folder / d / "config.json").is_file())
    try:
        unet = json.loads((net / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise fail("--model", "readable network and vae/ configs", f"{folder} ({err})"
                   ) from err
    size = unet.get("sample_size", FLUX_SAMPLE_SIZE)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    factor = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
    return int(h) * factor, int(w) * factor


@dataclass(frozen=True)
class TextOptions:
    """How a pipeline is loaded with its prompts: the ``negative`` prompt (the null
    condition), the ``dtype`` of its weights, the ``resolution`` ``(H, W)`` it generates
    (``None``: its own) and whether its attention is computed in slices."""

    negative: str = ""
    dtype: str = "float32"
    resolution: tuple[int, int] | None = None
    attention_slicing: bool = False


@dataclass
class TextModel:
    """A loaded text-to-image pipeline: the latent ``model`` (conditions: prompt indices,
    the negative prompt's index is ``len(prompts)``), the prompts, the pipeline's default
    guidance and which prompts the tokenizer truncated."""

    model: ModelScore
    prompts: Prompts
    negative: str
    default_guidance: float | None
    truncated: list[int]
    max_tokens: int
    pipe: Any = None

    @property
    def guidance_applied(self) -> float | None:
        """The classifier-free guidance the pipeline applies by default: its weight when
        above 1 (the pipelines apply none at ``w <= 1``), else ``None``."""
        w = self.default_guidance
        return w if w is not None and w > 1 else None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """diffusers' and transformers' loading bars, deprecation notes and truncation warnings
    silenced (diffmem says what matters itself)."""
    import diffusers
    import transformers

    d_level = diffusers.utils.logging.get_verbosity()
    t_level = transformers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        diffusers.utils.logging.set_verbosity(d_level)
        transformers.utils.logging.set_verbosity(t_level)
        diffusers.utils.logging.enable_progress_bar()
        transformers.utils.logging.enable_progress_bar()


def _check_tokenizer(pipe: Any) -> None:
    """Every tokenizer's ids must index its text encoder's embedding table (``tokenizer``
    with ``text_encoder``, ``tokenizer_2`` with ``text_encoder_2``, ...)."""
    for suffix in ("", "_2", "_3"):
        tok = getattr(pipe, f"tokenizer{suffix}", None)
        enc = getattr(pipe, f"text_encoder{suffix}", None)
        vocab = getattr(getattr(enc, "config", None), "vocab_size", None)
        if tok is not None and vocab is not None and len(tok) > int(vocab):
            raise fail("--model", f"a tokenizer that matches its text encoder (token ids of "
                       f"tokenizer{suffix} below text_encoder{suffix}'s vocab_size {vocab})",
                       f"a tokenizer of {len(tok)} tokens")


def _call_default(pipe: Any, name: str) -> Any:
    """The default of the pipeline's ``__call__`` parameter ``name`` (``None`` if none)."""
    param = inspect.signature(pipe.__call__).parameters.get(name)
    return None if param is None or param.default is inspect.Parameter.empty \
        else param.default


def _too_long(pipe: Any, texts: list[str]) -> tuple[list[int], int]:
    """Which prompts have more tokens than a tokenizer keeps: the CLIP tokenizers'
    ``model_max_length``, the T5 tokenizers' ``max_sequence_length`` of the pipeline's call
    (PixArt's, FLUX's second tokenizer); and the smallest such limit."""
    longest = _call_default(pipe, "max_sequence_length")
    cut: set[int] = set()
    limits = []
    for name in ("tokenizer", "tokenizer_2"):
        tok = getattr(pipe, name, None)
        if tok is None:
            continue
        t5 = longest is not None and "T5" in type(tok).__name__
        limit = int(longest) if t5 else int(tok.model_max_length)
        limits.append(limit)
        ids = tok(texts, padding=False, truncation=False)["input_ids"]
        cut.update(i for i, row in enumerate(ids) if len(row) > limit)
    return sorted(cut), min(limits)


@dataclass
class Encoded:
    """A pipeline's encoding of its prompts: the ``embeds`` ``(n, seq, dim)`` every
    network takes, and where the pipeline has them the ``pooled`` embeddings ``(n, dim)``
    (SDXL, SD3, FLUX), the attention ``mask`` ``(n, seq)`` (PixArt) and the text token
    positions ``text_ids`` ``(seq, 3)`` (FLUX)."""

    embeds: Tensor
    pooled: Tensor | None = None
    mask: Tensor | None = None
    text_ids: Tensor | None = None


#: Prompts the text encoders take at once (the table of all of them is kept on the CPU).
ENCODE_CHUNK = 64


def _encode(pipe: Any, texts: list[str], device: torch.device) -> Encoded:
    """The pipeline's own encoding of ``texts`` (no guidance, one image each), with the
    options its call defaults to (``max_sequence_length``, ``clean_caption``), on ``device``
    :data:`ENCODE_CHUNK` prompts at a time, the tables kept on the CPU: the device's memory
    grows with the batch sampled, not with the number of prompts."""
    parts = [_encode_chunk(pipe, texts[lo:lo + ENCODE_CHUNK], device)
             for lo in range(0, len(texts), ENCODE_CHUNK)]

    def joined(name: str) -> Tensor | None:
        found = [getattr(e, name) for e in parts]
        return None if found[0] is None else torch.cat([f.cpu() for f in found])

    embeds = joined("embeds")
    assert embeds is not None
    return Encoded(embeds, pooled=joined("pooled"), mask=joined("mask"),
                   text_ids=None if parts[0].text_ids is None else parts[0].text_ids.cpu())


def _encode_chunk(pipe: Any, texts: list[str], device: torch.device) -> Encoded:
    """One call of the pipeline's ``encode_prompt`` (:func:`_encode`)."""
    sig = inspect.signature(pipe.encode_prompt).parameters
    kwargs: dict[str, Any] = {"device": device, "num_images_per_prompt": 1,
                              "do_classifier_free_guidance": False,
                              "prompt_2": None, "prompt_3": None}  # the same prompt
    for name in ("max_sequence_length", "clean_caption"):
        value = _call_default(pipe, name)
        if value is not None:
            kwargs[name] = value
    with torch.no_grad():
        out = pipe.encode_prompt(texts, **{k: v for k, v in kwargs.items() if k in sig})
    name = type(pipe).__name__
    if name == "FluxPipeline":  # (embeds, pooled, text_ids)
        return Encoded(out[0], pooled=out[1], text_ids=out[2])
    if name.startswith("PixArt"):  # (embeds, mask, negative embeds, negative mask)
        return Encoded(out[0], mask=out[1])
    if not isinstance(out, tuple):
        return Encoded(out)
    # SD: (embeds, negative); SDXL and SD3: (embeds, negative, pooled, negative pooled)
    return Encoded(out[0], pooled=out[2] if len(out) >= 4 else None)


def _conditioning(pipe: Any, denoiser: Any, enc: Encoded, image_size: tuple[int, int]
                  ) -> Any:
    """``embed(y, x)``: the denoiser's keyword arguments for prompt indices ``y``, as the
    pipeline passes them: ``encoder_hidden_states``, and SD3's ``pooled_projections``,
    SDXL's ``added_cond_kwargs`` (pooled text embeddings and the size conditioning
    ``(H, W, 0, 0, H, W)``: original size, no crop, target size), PixArt's
    ``encoder_attention_mask`` (and PixArt-alpha's resolution and aspect ratio at
    ``sample_size`` 128), or FLUX's pooled projections, ``txt_ids`` and distilled
    ``guidance`` (the call's default ``guidance_scale``, when the transformer embeds it)."""
    name = type(denoiser).__name__
    cfg = denoiser.config
    text_time = getattr(cfg, "addition_embed_type", None) == "text_time"
    pooled_by = {"SD3Transformer2DModel": "pooled_projections",
                 "FluxTransformer2DModel": "pooled_projections"}.get(name)
    if (pooled_by or text_time) and enc.pooled is None:
        raise fail("--model", f"a pipeline whose encode_prompt gives pooled embeddings for "
                   f"its {name}", type(pipe).__name__)
    table, pooled, mask = enc.embeds, enc.pooled, enc.mask
    fixed: dict[str, Any] = {}
    if text_time:
        fixed["time_ids"] = torch.tensor([*image_size, 0, 0, *image_size], dtype=table.dtype,
                                         device=table.device)
    if name == "FluxTransformer2DModel":
        assert enc.text_ids is not None
        fixed["txt_ids"] = enc.text_ids
        if getattr(cfg, "guidance_embeds", False):
            default = _call_default(pipe, "guidance_scale")
            if default is None:
                raise fail("--model", f"a pipeline whose call has a default guidance_scale "
                           f"(the input of its guidance-distilled {name})", type(pipe).__name__)
            fixed["guidance"] = float(default)
    if name == "PixArtTransformer2DModel" and type(pipe).__name__ == "PixArtAlphaPipeline" \
            and cfg.sample_size == 128:
        fixed["resolution"] = torch.tensor([[float(v) for v in image_size]], dtype=table.dtype,
                                           device=table.device)
        fixed["aspect_ratio"] = torch.tensor([[image_size[0] / image_size[1]]],
                                             dtype=table.dtype, device=table.device)

    def embed(y: Tensor, x: Tensor) -> dict[str, Any]:
        """The batch's rows of the (CPU) tables, on the batch's device."""
        rows = y.cpu().long()
        b = rows.shape[0]
        dev = x.device

        def at(v: Tensor) -> Tensor:
            return v.to(dev)

        kwargs: dict[str, Any] = {"encoder_hidden_states": at(table[rows])}
        if pooled_by is not None:
            assert pooled is not None
            kwargs[pooled_by] = at(pooled[rows])
        elif text_time:
            assert pooled is not None
            kwargs["added_cond_kwargs"] = {"text_embeds": at(pooled[rows]),
                                           "time_ids": at(fixed["time_ids"]).expand(b, 6)}
        if mask is not None:
            kwargs["encoder_attention_mask"] = at(mask[rows])
        if "resolution" in fixed:
            kwargs["added_cond_kwargs"] = {
                "resolution": at(fixed["resolution"]).expand(b, 2),
                "aspect_ratio": at(fixed["aspect_ratio"]).expand(b, 1)}
        if "txt_ids" in fixed:
            kwargs["txt_ids"] = at(fixed["txt_ids"])
        if "guidance" in fixed:
            kwargs["guidance"] = torch.full((b,), fixed["guidance"], device=dev)
        return kwargs

    return embed


def _latent_grid(pipe: Any, denoiser: Any, resolution: tuple[int, int] | None
                 ) -> tuple[tuple[int, int], tuple[int, int]]:
    """The image size ``(H, W)`` generated (``resolution``, default the pipeline's) and its
    latent size ``(H / f, W / f)``, ``f = vae_scale_factor``; ``H`` and ``W`` must be
    multiples of ``f`` times the network's patch (2 for FLUX's packing) or, for a UNet, of
    ``f`` times its ``2^(levels - 1)`` downsampling. Raises ``ValueError`` naming
    ``--resolution``."""
    f = int(pipe.vae_scale_factor)
    name = type(denoiser).__name__
    if resolution is None:
        size = getattr(denoiser.config, "sample_size", None) or FLUX_SAMPLE_SIZE
        h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        return (h * f, w * f), (h, w)
    if name.startswith("UNet"):
        unit = 2 ** (len(denoiser.config.block_out_channels) - 1)
    else:
        unit = 2 if name == "FluxTransformer2DModel" else \
            int(getattr(denoiser.config, "patch_size", 1) or 1)
    step = f * unit
    h, w = (int(v) for v in resolution)
    if h <= 0 or w <= 0 or h % step or w % step:
        raise fail("--resolution", f"H,W positive multiples of {step} for this pipeline "
                   f"(VAE factor {f} x {name}'s {unit})", f"{h},{w}")
    return (h, w), (h // f, w // f)


def load_text_model(folder: str | Path, prompts: Prompts, options: TextOptions | None = None,
                    *, device: str | torch.device = "cpu", progress: bool = False
                    ) -> TextModel:
    """Load a latent text-to-image pipeline folder (module docstring) with its prompts
    encoded (:class:`TextOptions`: the negative prompt, the dtype, the resolution, default
    the pipeline's, and attention computed in slices, less memory for the same result to
    rounding, where the network supports it). Nothing is downloaded.
    Raises ``ValueError`` naming ``--model``, ``--prompts``, ``--resolution`` or
    ``--dtype`` on a missing component, a tokenizer that does not match its text encoder,
    a size the network cannot take, or a dtype diffmem does not know."""
    opts = TextOptions() if options is None else options
    pipe = _load_pipeline(Path(folder), opts.dtype, device, progress)
    with _quiet():
        truncated, limit = _too_long(pipe, prompts.texts + [opts.negative])
    if truncated:
        shown = ", ".join(str(i + 1) for i in truncated[:10])
        print(f"diffmem: {len(truncated)} prompt(s) longer than the tokenizer's "
              f"{limit} tokens are truncated, as the pipeline does (prompt "
              f"{shown}{', ...' if len(truncated) > 10 else ''})", file=sys.stderr)
    encoder = _Encoder(pipe, opts, prompts.texts, device)
    enc = encoder.encoded(prompts.texts)
    if opts.attention_slicing:
        _slice_attention(pipe, encoder.denoiser)
    embed = _conditioning(pipe, encoder.denoiser, enc, encoder.size)
    model = wrap_diffusers(encoder.denoiser, pipe.scheduler, name=f"pipeline {Path(folder).name}",
                           embed=embed, latent_size=encoder.latent)
    attach_decoder(model, pipe.vae)
    assert model.network is not None
    model.network.update({
        "prompts": prompts.texts, "embeds": enc.embeds, "embed": embed, "encoded": enc,
        "texts": list(prompts.texts), "with_embeddings": encoder.with_embeddings,
        "with_mask": encoder.with_mask, "reencoded": encoder.reencoded,
        "tokenize": encoder.tokens,
        "end_token": getattr(getattr(pipe, "tokenizer", None), "eos_token_id", None),
        "words": _words(pipe)})
    # FLUX's guidance_scale is an input of its network; its classifier-free guidance is
    # true_cfg_scale (1 by default: none)
    default = _call_default(pipe, "true_cfg_scale" if type(pipe).__name__ == "FluxPipeline"
                            else "guidance_scale")
    guidance = None if default is None else float(default)
    return TextModel(model, prompts, opts.negative, guidance, truncated, limit, pipe)


def _load_pipeline(folder: Path, dtype: str, device: str | torch.device,
                   progress: bool) -> Any:
    """The pipeline of ``folder`` in ``dtype`` on ``device``, checked to be a latent
    text-to-image pipeline with a tokenizer that matches its text encoder."""
    try:
        import diffusers
    except ImportError as err:
        raise fail("--prompts", "diffusers and transformers installed (pip install "
                   "'diffmem[pipelines]')", str(folder)) from err
    if dtype not in DTYPES:
        raise fail("--dtype", f"one of {tuple(DTYPES)}", repr(dtype))
    index = _index(folder)
    options: dict[str, Any] = {} if dtype == "float32" else {"torch_dtype": DTYPES[dtype]}
    # components saved as absent (SD3 without T5, SD without a safety checker) stay absent
    options.update({c: None for c, v in index.items() if not c.startswith("_")
                    and isinstance(v, list) and (not v or v[0] is None)})
    try:
        with _quiet():
            pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder), **options,
                                                               **_load_options())
    except ImportError as err:
        raise fail("--prompts", "transformers installed for the pipeline's text encoder "
                   "(pip install 'diffmem[pipelines]')", str(err).splitlines()[0]) from err
    except Exception as err:  # diffusers' and transformers' own loading errors
        lines = [ln for ln in str(err).splitlines() if ln.strip()] or [type(err).__name__]
        raise fail("--model", "a loadable text-to-image pipeline folder",
                   f"{folder} ({type(err).__name__}: {lines[0][:200]})") from err
    if not hasattr(pipe, "encode_prompt") or type(pipe).__name__ not in PIPELINES:
        raise fail("--model", f"a latent text-to-image pipeline of {PIPELINES}",
                   type(pipe).__name__)
    pipe.set_progress_bar_config(disable=not progress)
    pipe = pipe.to(device)
    _check_tokenizer(pipe)
    return pipe


class _Encoder:
    """A loaded pipeline's prompts as its network takes them, and the models the prompt
    cures make from a loaded one (new embeddings, a cross-attention mask, other texts)."""

    def __init__(self, pipe: Any, opts: TextOptions, texts: list[str],
                 device: str | torch.device) -> None:
        self.pipe, self.negative, self.n, self.device = pipe, opts.negative, len(texts), device
        self.denoiser = pipe.unet if getattr(pipe, "unet", None) is not None \
            else pipe.transformer
        self.size, self.latent = _latent_grid(pipe, self.denoiser, opts.resolution)

    def encoded(self, texts: list[str]) -> Encoded:
        """``texts`` and the negative prompt (last) as the pipeline encodes them."""
        with _quiet():
            out = _encode(self.pipe, texts + [self.negative], torch.device(self.device))
        if self.negative == "" and getattr(self.pipe.config, "force_zeros_for_empty_prompt",
                                           False):
            out.embeds[-1] = 0  # SDXL's null condition: zeros, not the empty prompt's
            if out.pooled is not None:
                out.pooled[-1] = 0
        return out

    def rewrapped(self, new_enc: Encoded, like: ModelScore,
                  texts: list[str] | None = None) -> ModelScore:
        """``like`` (this model, guided as it is) with the prompts encoded as ``new_enc``
        (from ``texts``, when they changed)."""
        embed = _conditioning(self.pipe, self.denoiser, new_enc, self.size)
        new = wrap_diffusers(self.denoiser, self.pipe.scheduler, name=like.name, embed=embed,
                             latent_size=self.latent)
        assert new.network is not None and like.network is not None
        new.network = {**like.network, "net": new.network["net"], "embeds": new_enc.embeds,
                       "embed": embed, "encoded": new_enc,
                       "texts": like.network["texts"] if texts is None else list(texts)}
        return new.guided(like.guidance, like.null)

    def with_embeddings(self, table: Tensor, like: ModelScore) -> ModelScore:
        """``like`` with the prompts' embeddings ``table`` (``(n + 1, seq, dim)``, the
        negative prompt's last): a prompt-embedding cure."""
        assert like.network is not None
        return self.rewrapped(dataclasses.replace(like.network["encoded"], embeds=table),
                              like)

    def with_mask(self, mask: Tensor, like: ModelScore) -> ModelScore:
        """``like`` with the cross-attention mask ``mask`` (``(n + 1, seq)``, 1 kept, 0
        masked) given to the network with each row: a cross-attention cure."""
        assert like.network is not None
        return self.rewrapped(dataclasses.replace(like.network["encoded"], mask=mask), like)

    def reencoded(self, texts: list[str], like: ModelScore) -> ModelScore:
        """``like`` with its prompts replaced by ``texts`` (one each, in order), encoded by
        the pipeline: a prompt-text cure."""
        if len(texts) != self.n:
            raise fail("texts", f"{self.n} prompts", len(texts))
        return self.rewrapped(self.encoded(list(texts)), like, texts)

    def tokens(self, texts: list[str]) -> Tensor:
        """The first tokenizer's ids of ``texts``, padded to its length, as the pipeline
        tokenizes them."""
        tok = self.pipe.tokenizer
        return torch.as_tensor(tok(list(texts), padding="max_length", truncation=True,
                                   max_length=tok.model_max_length).input_ids)


def _words(pipe: Any) -> list[str]:
    """The whole alphabetic words of the pipeline's (first) tokenizer's vocabulary, sorted:
    CLIP's tokens ending in ``</w>``, T5's starting with ``▁``."""
    tok = getattr(pipe, "tokenizer", None) or getattr(pipe, "tokenizer_2", None)
    if tok is None:
        return []
    words = set()
    for token in tok.get_vocab():
        word = token[:-4] if token.endswith("</w>") else token[1:] \
            if token.startswith("▁") else ""
        if word.isalpha():
            words.add(word)
    return sorted(words)


def _slice_attention(pipe: Any, denoiser: Any) -> None:
    """Attention computed a slice of heads at a time (``set_attention_slice('auto')``), where
    the network has it; raises ``ValueError`` naming ``--attention-slicing`` where not."""
    if not hasattr(denoiser, "set_attention_slice"):
        raise fail("--attention-slicing", "a network with sliceable attention (the UNets of "
                   "Stable Diffusion and SDXL)", type(denoiser).__name__)
    denoiser.set_attention_slice("auto")


def name_by_prompt(entries: list[dict[str, Any]], texts: list[str],
                   labels: list[str | None] | None = None) -> None:
    """Per-condition entries keyed by prompt index (``condition``) named by their prompt:
    ``condition`` becomes the prompt's text, ``prompt_index`` keeps the index (and
    ``prompt_label`` the prompt's label, when the prompts file gave one)."""
    for e in entries:
        i = int(e["condition"])
        e["prompt_index"], e["condition"] = i, texts[i]
        if labels and labels[i] is not None:
            e["prompt_label"] = labels[i]
