"""Feature spaces: a TorchScript module (a copy-detection descriptor such as SSCD) mapping
images to vectors, applied in batches with a cache, and the space an audit measures in."""

from __future__ import annotations

import hashlib
import io
import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffmem._checks import fail
from diffmem.audit.inputs import Rows
from diffmem.centres import Centres
from diffmem.io import atomic_write_bytes

#: CLIP's image normalization, when a vision model folder has no preprocessor config.
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def load_clip_model(folder: Path, device: str | torch.device) -> Any:
    """The model of a CLIP folder (local files only): transformers' ``CLIPModel`` (both
    towers, as CLIP checkpoints are published) or a vision model
    (``CLIPVisionModelWithProjection`` or ``CLIPVisionModel``), in evaluation mode."""
    try:
        import transformers
    except ImportError as err:
        raise fail("--features", "transformers installed for a CLIP model folder "
                   "(pip install 'diffmem[pipelines]')", str(folder)) from err
    try:
        config = json.loads((folder / "config.json").read_text())
        arch = (config.get("architectures") or ["CLIPVisionModelWithProjection"])[0]
        cls = getattr(transformers, arch if arch == "CLIPModel" or arch.startswith(
            "CLIPVision") else "CLIPVisionModelWithProjection")
        return cls.from_pretrained(str(folder), local_files_only=True).to(device).eval()
    except Exception as err:  # transformers' own loading errors: say what they said
        lines = [ln for ln in str(err).splitlines() if ln.strip()] or [type(err).__name__]
        raise fail("--features", "a CLIP model folder (config.json and weights) or a "
                   "TorchScript file", f"{folder} ({type(err).__name__}: {lines[0][:200]})"
                   ) from err


def _unit(vec: Tensor) -> Tensor:
    """Rows scaled to unit length."""
    return vec / vec.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def load_clip_vision(folder: Path, device: str | torch.device = "cpu",
                     model: Any = None) -> Callable[..., Tensor]:
    """A CLIP model folder (transformers' ``CLIPModel``, ``CLIPVisionModelWithProjection``
    or ``CLIPVisionModel``, local files only; or its loaded ``model``) as a feature map of
    images in ``[0, 1]``: resized (bicubic) to its ``image_size``, normalized by the
    folder's preprocessor mean and std (CLIP's by default), then its projected image
    embedding (a ``CLIPVisionModel``: its pooled output), unit length."""
    model = load_clip_model(folder, device) if model is None else model
    pre = folder / "preprocessor_config.json"
    stats = json.loads(pre.read_text()) if pre.is_file() else {}
    mean = torch.tensor(stats.get("image_mean", CLIP_MEAN), device=device).view(1, -1, 1, 1)
    std = torch.tensor(stats.get("image_std", CLIP_STD), device=device).view(1, -1, 1, 1)
    vision = model.vision_model if hasattr(model, "text_model") else None
    size = int((vision.config if vision is not None else model.config).image_size)

    def features(images: Tensor) -> Tensor:
        x = images.to(device=device, dtype=torch.float32)
        if x.dim() == 3:
            x = x[:, None]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic",
                                            align_corners=False)
        with torch.no_grad():
            if vision is not None:
                pooled = vision(pixel_values=(x - mean) / std).pooler_output
                return _unit(model.visual_projection(pooled))
            out = model(pixel_values=(x - mean) / std)
        return _unit(out.image_embeds if hasattr(out, "image_embeds") else out.pooler_output)

    return features


def load_clip_text(folder: Path, device: str | torch.device = "cpu",
                   model: Any = None) -> Callable[[list[str]], Tensor] | None:
    """The text tower of a CLIP model folder (``CLIPModel`` with its tokenizer files) as a
    map of prompts to unit-length projected text embeddings, in the space of
    :func:`load_clip_vision`'s features (their dot product is the CLIP score's cosine);
    ``None`` when the folder holds a vision model alone or no tokenizer."""
    path = Path(folder)
    if not path.is_dir():
        return None
    model = load_clip_model(path, device) if model is None else model
    if not hasattr(model, "text_model"):
        return None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError):
        return None
    length = int(model.text_model.config.max_position_embeddings)

    def text(prompts: list[str]) -> Tensor:
        tokens = tokenizer(list(prompts), padding="max_length", truncation=True,
                           max_length=length, return_tensors="pt").to(device)
        with torch.no_grad():
            pooled = model.text_model(input_ids=tokens["input_ids"],
                                      attention_mask=tokens["attention_mask"]).pooler_output
            return _unit(model.text_projection(pooled)).to("cpu", torch.float32)

    return text


def load_features(path: str | Path,
                  device: str | torch.device = "cpu") -> Callable[..., Tensor]:
    """A TorchScript module (``torch.jit.save``) mapping a batch of images to vectors, or a
    CLIP model folder (:func:`load_clip_vision`)."""
    p = Path(path)
    if p.is_dir():
        return load_clip_vision(p, device)
    if not p.is_file():
        raise fail("--features", "an existing TorchScript file (torch.jit.save) or a CLIP "
                   "model folder", str(p))
    try:
        with warnings.catch_warnings():  # TorchScript is how copy detectors are published
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(p), map_location=device)
    except (RuntimeError, ValueError, OSError) as err:
        raise fail("--features", "a TorchScript module file",
                   f"{p} ({str(err).splitlines()[0][:200]})") from err
    return module.eval()


def file_digest(path: Path) -> str:
    """A short hash of a file's bytes, or of a folder's files (names and bytes)."""
    h = hashlib.sha256()
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as handle:
            for block in iter(lambda handle=handle: handle.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def embed(rows: Rows, module: Callable[[Tensor], Tensor], batch: int,
          device: torch.device, progress: bool, cache: Path | None = None,
          fingerprint: str = "") -> Tensor:
    """``module`` applied to every row in batches (float32), checked: one finite vector per
    row. With ``cache``, the vectors are stored there (``.npy`` beside a ``.json``
    fingerprint) and reused while the module and the data are unchanged."""
    if cache is not None:
        meta = cache.with_suffix(".json")
        if cache.is_file() and meta.is_file() and json.loads(meta.read_text()).get(
                "fingerprint") == fingerprint:
            return torch.from_numpy(np.load(cache))
    parts = []
    bar = tqdm(rows.batches(batch), total=math.ceil(rows.n / batch), disable=not progress,
               desc=f"features of {rows.name}", leave=False)
    with torch.no_grad():
        for lo, x in bar:
            try:
                out = module(x.to(device=device, dtype=torch.float32))
            except Exception as err:  # the user's module: report what it raised
                lines = [line.strip() for line in str(err).splitlines() if line.strip()]
                raise fail("--features", f"a module that maps a batch of {rows.name} of shape "
                           f"{tuple(x.shape)} to vectors",
                           f"{type(err).__name__}: {(lines or [''])[-1][:200]}") from err
            if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
                raise fail("--features", f"vectors of shape ({x.shape[0]}, f) for a batch of "
                           f"{x.shape[0]}", f"shape {tuple(out.shape)}" if isinstance(
                               out, Tensor) else type(out).__name__)
            if not bool(torch.isfinite(out).all()):
                raise fail("--features", "finite feature vectors",
                           f"non-finite values for rows {lo}..{lo + x.shape[0] - 1}")
            parts.append(out.detach().to("cpu", torch.float32))
    vectors = torch.cat(parts)
    if cache is not None:
        buf = io.BytesIO()
        np.save(buf, vectors.numpy())
        atomic_write_bytes(cache, buf.getvalue())
        atomic_write_bytes(cache.with_suffix(".json"),
                           json.dumps({"fingerprint": fingerprint}).encode())
    return vectors


def data_identity(data: Any) -> str:
    """What identifies a data set for the feature cache: paths with size and time, else a
    hash of the values."""
    if isinstance(data, str | Path):
        st = Path(data).stat()
        return f"{Path(data).resolve()}:{st.st_size}:{st.st_mtime_ns}"
    if isinstance(data, list | tuple):
        return "|".join(data_identity(d) for d in data)
    if isinstance(data, np.memmap) and data.filename is not None:
        return data_identity(data.filename) + f":{data.shape}"
    arr = data.detach().cpu().numpy() if isinstance(data, Tensor) else np.asarray(data)
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()[:16]


def feature_space(rows: Rows, centres: Centres, features: Any, batch_size: int,
                   dev: torch.device, progress: bool, feature_cache: Path | None,
                   sources: tuple[Any, Any]) -> tuple[Rows, Centres, str | None]:
    """The space the distances are measured in: the data itself, or the vectors of a feature
    module (cached per module file and data set, ``sources`` = (samples, train) as given,
    in ``feature_cache``)."""
    if features is None:
        return rows, centres, None
    module, digest = features, ""
    if isinstance(features, str | Path):
        module = load_features(features, dev)
        feature_name, digest = str(features), file_digest(Path(features))
    else:
        feature_name = type(features).__name__
    if not callable(module):
        raise fail("--features", "a callable or a TorchScript file", type(module).__name__)

    def cached(role: str) -> Path | None:
        return None if feature_cache is None or not digest else \
            Path(feature_cache) / f"{role}.npy"

    train_vec = embed(Rows(centres, "train"), module, batch_size, dev, progress,
                      cached("train"), f"{digest}:{data_identity(sources[1])}")
    sample_vec = embed(rows, module, batch_size, dev, progress, cached("samples"),
                       f"{digest}:{data_identity(sources[0])}")
    if train_vec.shape[1] != sample_vec.shape[1]:
        raise fail("--features", "vectors of one length", f"{train_vec.shape[1]} and "
                   f"{sample_vec.shape[1]}")
    return (Rows(sample_vec, "samples"), Centres(train_vec, process_group=centres.group),
            feature_name)
