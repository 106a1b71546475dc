r"""Latent text-to-image pipelines as diffmem models: prompts in, images out.

A diffusers pipeline folder (``model_index.json`` with ``unet`` or ``transformer``, ``vae``,
``text_encoder``\(s), ``tokenizer``\(s) and ``scheduler``, as ``save_pretrained`` writes
it: Stable Diffusion 1.x/2.x (epsilon or v prediction), SDXL (two text encoders, pooled
embeddings and size conditioning) and SD3 (a diffusion transformer on flow matching) becomes
a conditional :class:`~diffmem.models.ModelScore` on its latents:

* the prompts (:func:`read_prompts`) are encoded once by the pipeline's own tokenizer and text
  encoder (``encode_prompt``), and the negative prompt (default the empty one) last: the
  model's condition is a prompt's index ``y`` and the null condition is the negative
  prompt's, so classifier-free guidance ``out(null) + w (out(y) - out(null))`` is the
  pipeline's (applied only for ``w > 1``, as the pipelines do; ``w`` defaults to the
  pipeline's ``guidance_scale``);
* the network receives ``encoder_hidden_states = E[y]`` (and the pooled embeddings ``P[y]``
  as SD3's ``pooled_projections`` or SDXL's ``text_embeds`` with ``time_ids = (H, W, 0, 0,
  H, W)``; SDXL's null condition is zeros, as its ``force_zeros_for_empty_prompt`` says);
  its output becomes a score by the scheduler's prediction type, on the scheduler's schedule
  (``scaled_linear`` betas for SD, the flow-matching path for SD3);
* samples are decoded by the VAE, ``image = (decode(z / scaling_factor) + 1) / 2`` clipped to
  ``[0, 1]`` (the pipelines' post-processing, without their safety checker), and audited as
  images of ``3 x H x W`` (``H = vae_scale_factor * sample_size``).

Prompts longer than the tokenizer's ``model_max_length`` are truncated by the pipeline;
diffmem counts the tokens first and says which prompts were cut (:attr:`TextModel.truncated`).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffmem._checks import fail
from diffmem.models import ModelScore, _load_options, attach_decoder, wrap_diffusers

#: Components a latent text-to-image pipeline folder must have.
REQUIRED = ("vae", "text_encoder", "tokenizer", "scheduler")
DENOISERS = ("unet", "transformer")
#: The pipelines diffmem samples with prompts.
PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline",
             "StableDiffusion3Pipeline")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Prompts:
    """Prompts read from a file: their ``texts`` and optional ``labels``."""

    texts: list[str]
    labels: list[str | None] = field(default_factory=list)


def read_prompts(path: str | Path) -> Prompts:
    """``--prompts``: a text file with one prompt a line (blank lines skipped), or JSON lines
    (``.jsonl``, or every non-blank line starting with ``{``) with ``prompt`` and an optional
    ``label``. Raises ``ValueError`` naming ``--prompts`` (and the line) on an empty file, a
    line that is not JSON or has no ``prompt``."""
    p = Path(path)
    try:
        raw = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise fail("--prompts", "a readable UTF-8 text file of prompts", f"{p} ({err})") from err
    lines = [(i + 1, line.strip()) for i, line in enumerate(raw.splitlines()) if line.strip()]
    if not lines:
        raise fail("--prompts", "at least one prompt (one a line, or JSON lines)",
                   f"{p}: an empty file")
    as_json = p.suffix == ".jsonl" or all(line.startswith("{") for _, line in lines)
    texts: list[str] = []
    labels: list[str | None] = []
    for number, line in lines:
        if not as_json:
            texts.append(line)
            labels.append(None)
            continue
        try:
            item = json.loads(line)
        except ValueError as err:
            raise fail("--prompts", "JSON lines with a 'prompt'", f"{p}, line {number}: "
                       f"{err}") from err
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise fail("--prompts", "JSON lines with a 'prompt' string",
                       f"{p}, line {number}: {line[:80]}")
        texts.append(item["prompt"])
        label = item.get("label")
        labels.append(None if label is None else str(label))
    return Prompts(texts, labels)


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


def _latent_size(denoiser: Any) -> tuple[int, int]:
    size = denoiser.config.sample_size
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def pipeline_resolution(folder: str | Path) -> tuple[int, int]:
    """The image size ``(H, W)`` a pipeline folder generates by default, from its configs
    alone: ``vae_scale_factor * sample_size`` with ``vae_scale_factor = 2^(len(
    block_out_channels) - 1)``."""
    folder = Path(folder)
    _index(folder)
    net = next(folder / d for d in DENOISERS if (folder / d / "config.json").is_file())
    try:
        unet = json.loads((net / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise fail("--model", "readable network and vae/ configs", f"{folder} ({err})"
                   ) from err
    size = unet.get("sample_size", 64)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    factor = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
    return int(h) * factor, int(w) * factor


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
    """The tokenizer's ids must index the text encoder's embedding table."""
    tok, enc = pipe.tokenizer, pipe.text_encoder
    vocab = getattr(getattr(enc, "config", None), "vocab_size", None)
    if vocab is not None and len(tok) > int(vocab):
        raise fail("--model", "a tokenizer that matches its text encoder (token ids below the "
                   f"encoder's vocab_size {vocab})", f"a tokenizer of {len(tok)} tokens")


def _too_long(pipe: Any, texts: list[str]) -> tuple[list[int], int]:
    """Which prompts have more tokens than the tokenizer's ``model_max_length``."""
    tok = pipe.tokenizer
    limit = int(tok.model_max_length)
    ids = tok(texts, padding=False, truncation=False)["input_ids"]
    return [i for i, row in enumerate(ids) if len(row) > limit], limit


def _encode(pipe: Any, texts: list[str], device: torch.device) -> tuple[Tensor, Tensor | None]:
    """The pipeline's own prompt embeddings of ``texts`` (no guidance, one image each) and,
    for the pipelines that have them (SDXL, SD3), the pooled embeddings."""
    sig = inspect.signature(pipe.encode_prompt).parameters
    kwargs: dict[str, Any] = {"device": device, "num_images_per_prompt": 1,
                              "do_classifier_free_guidance": False,
                              "prompt_2": None, "prompt_3": None}  # the same prompt, as
    with torch.no_grad():  # the pipelines default to
        out = pipe.encode_prompt(texts, **{k: v for k, v in kwargs.items() if k in sig})
    if not isinstance(out, tuple):
        return out, None
    pooled = out[2] if len(out) >= 4 and isinstance(out[2], Tensor) else None
    return out[0], pooled


def _conditioning(pipe: Any, denoiser: Any, table: Tensor, pooled: Tensor | None,
                  image_size: tuple[int, int]) -> Any:
    """``embed(y, x)``: the denoiser's keyword arguments for prompt indices ``y``, as the
    pipeline passes them: ``encoder_hidden_states``, and SD3's ``pooled_projections`` or
    SDXL's ``added_cond_kwargs`` (pooled text embeddings and the size conditioning
    ``(H, W, 0, 0, H, W)``: original size, no crop, target size)."""
    name = type(denoiser).__name__
    text_time = getattr(denoiser.config, "addition_embed_type", None) == "text_time"
    if (name == "SD3Transformer2DModel" or text_time) and pooled is None:
        raise fail("--model", f"a pipeline whose encode_prompt gives pooled embeddings for "
                   f"its {name}", type(pipe).__name__)
    time_ids = torch.tensor([*image_size, 0, 0, *image_size], dtype=table.dtype,
                            device=table.device)

    def embed(y: Tensor, x: Tensor) -> dict[str, Any]:
        rows = y.to(table.device).long()
        kwargs: dict[str, Any] = {"encoder_hidden_states": table[rows]}
        if name == "SD3Transformer2DModel":
            assert pooled is not None
            kwargs["pooled_projections"] = pooled[rows]
        elif text_time:
            assert pooled is not None
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled[rows],
                                           "time_ids": time_ids.expand(rows.shape[0], 6)}
        return kwargs

    return embed


def load_text_model(folder: str | Path, prompts: Prompts, *, negative: str = "",
                    dtype: str = "float32", device: str | torch.device = "cpu",
                    progress: bool = False) -> TextModel:
    """Load a latent text-to-image pipeline folder (module docstring) with its prompts
    encoded. Nothing is downloaded. Raises ``ValueError`` naming ``--model``, ``--prompts``
    or ``--dtype`` on a missing component, a tokenizer that does not match its text
    encoder, or a dtype diffmem does not know."""
    try:
        import diffusers
    except ImportError as err:
        raise fail("--prompts", "diffusers and transformers installed (pip install "
                   "'diffmem[pipelines]')", str(folder)) from err
    if dtype not in DTYPES:
        raise fail("--dtype", f"one of {tuple(DTYPES)}", repr(dtype))
    folder = Path(folder)
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
    with _quiet():
        truncated, limit = _too_long(pipe, prompts.texts + [negative])
    if truncated:
        shown = ", ".join(str(i + 1) for i in truncated[:10])
        print(f"diffmem: {len(truncated)} prompt(s) longer than the tokenizer's "
              f"{limit} tokens are truncated, as the pipeline does (prompt "
              f"{shown}{', ...' if len(truncated) > 10 else ''})", file=sys.stderr)
    with _quiet():
        table, pooled = _encode(pipe, prompts.texts + [negative], torch.device(device))
    if negative == "" and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
        table[-1] = 0  # SDXL's null condition: zeros, not the empty prompt's embedding
        if pooled is not None:
            pooled[-1] = 0
    denoiser = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
    size = tuple(int(v) * pipe.vae_scale_factor for v in _latent_size(denoiser))
    model = wrap_diffusers(denoiser, pipe.scheduler, name=f"pipeline {folder.name}",
                           embed=_conditioning(pipe, denoiser, table, pooled, size))
    attach_decoder(model, pipe.vae)
    assert model.network is not None
    model.network["prompts"] = prompts.texts
    default = inspect.signature(pipe.__call__).parameters.get("guidance_scale")
    guidance = None if default is None or default.default is inspect.Parameter.empty \
        else float(default.default)
    return TextModel(model, prompts, negative, guidance, truncated, limit, pipe)


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
