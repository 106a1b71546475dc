"""Image data: the paper's two squares, scikit-learn's 8x8 digits, a user's own images, and the
exact-match memorization metric for binary images. Images are float tensors
``(N, C, H, W)`` with values in ``[0, 1]``."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffmem._checks import fail, positive_int


def two_squares(resolution: int = 64) -> Tensor:
    """The paper's two binary images: ``img0[6:18, 6:18] = 1`` and ``img1[40:54, 40:54] = 1``
    at 64x64; at another resolution the square edges are scaled by ``resolution / 64`` and
    rounded. Shape ``(2, 1, resolution, resolution)``, float64."""
    r = positive_int("resolution", resolution)
    if r < 8:
        raise fail("resolution", "an integer >= 8", resolution)

    def edge(v: int) -> int:
        return int(round(v * r / 64))

    imgs = torch.zeros(2, 1, r, r, dtype=torch.float64)
    imgs[0, 0, edge(6):edge(18), edge(6):edge(18)] = 1
    imgs[1, 0, edge(40):edge(54), edge(40):edge(54)] = 1
    return imgs


def digits() -> Tensor:
    """scikit-learn's 1797 handwritten 8x8 digits scaled to ``[0, 1]``, ``(1797, 1, 8, 8)``
    (shipped with scikit-learn: no download)."""
    from sklearn.datasets import load_digits

    return torch.tensor(load_digits().images / 16.0, dtype=torch.float64)[:, None]


def digit_split(n_train: int = 1500, labels: bool = False) -> Any:
    """The digits flattened to ``(N, 64)``, shuffled with seed 0 and split into the first
    ``n_train`` (training) and the rest (held out); with ``labels``, also their classes:
    ``((train, held), (train_labels, held_labels))``."""
    from sklearn.datasets import load_digits

    n_train = positive_int("n_train", n_train)
    flat = digits().reshape(-1, 64)
    if n_train >= flat.shape[0]:
        raise fail("n_train", f"fewer than the {flat.shape[0]} digits", n_train)
    order = torch.randperm(flat.shape[0], generator=torch.Generator().manual_seed(0))
    flat = flat[order]
    if not labels:
        return flat[:n_train], flat[n_train:]
    target = torch.as_tensor(load_digits().target)[order]
    return (flat[:n_train], flat[n_train:]), (target[:n_train], target[n_train:])


def _as_nchw(array: np.ndarray, source: str) -> Tensor:
    if array.ndim == 3:
        array = array[:, None]
    if array.ndim != 4:
        raise fail("images", "an array of shape (N, H, W) or (N, C, H, W)",
                   f"shape {array.shape} in {source}")
    if array.shape[0] == 0:
        raise fail("images", "at least one image", f"none in {source}")
    out = torch.tensor(np.asarray(array, dtype=np.float64))
    if not bool(torch.isfinite(out).all()):
        raise fail("images", "finite pixel values", f"NaN or inf in {source}")
    return out


#: Image files the loader reads from a folder.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: Largest value of each Pillow mode's integers: pixels are divided by it.
_MODE_MAX = {"1": 1.0, "L": 255.0, "LA": 255.0, "RGB": 255.0, "RGBA": 255.0, "CMYK": 255.0,
             "YCbCr": 255.0, "I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0,
             "I;16N": 65535.0}


def read_image(path: Path) -> np.ndarray:
    """One image file as floats in ``[0, 1]``, shape ``(C, H, W)``: each pixel divided by the
    largest value of the file's bit depth (255 for 8-bit, 65535 for 16-bit, 1 for bilevel),
    whatever the image's own values; palette images are expanded to RGB(A)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                mode = im.mode
            if mode == "I" and im.format == "PNG":  # 16-bit PNG read by older Pillow
                mode = "I;16"
            if mode not in _MODE_MAX:
                raise fail("path", "8-bit, 16-bit or bilevel images (grey, RGB, RGBA)",
                           f"{path} (Pillow mode {im.mode})")
            a = np.asarray(im, dtype=np.float64) / _MODE_MAX[mode]
    except (UnidentifiedImageError, OSError) as err:
        raise fail("path", "readable PNG/JPEG images", f"{path} ({err})") from err
    return a[None] if a.ndim == 2 else np.moveaxis(a, -1, 0)


def _resized(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(C, H, W)`` resampled to ``size`` (bilinear with antialiasing)."""
    t = torch.from_numpy(np.ascontiguousarray(a))[None]
    out = torch.nn.functional.interpolate(t, size=size, mode="bilinear", antialias=True,
                                          align_corners=False)
    return out[0].clamp(0, 1).numpy()


def image_files(folder: Path) -> list[Path]:
    """The PNG/JPEG files of a folder, sorted by name."""
    return sorted(f for f in Path(folder).iterdir()
                  if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def load_images(path: str | Path, key: str | None = None,
                resize: tuple[int, int] | None = None, name: str = "path") -> Tensor:
    """Load a user's images: a ``.npy`` array, a ``.npz`` archive (``key``, or its only
    array), or a folder of PNG/JPEG files (sorted by name; grey or colour; each scaled to
    ``[0, 1]`` by its bit depth, :func:`read_image`). A folder's images must share one size,
    unless ``resize = (H, W)`` resamples them. Raises ``ValueError`` (naming ``name``) for a
    missing or unreadable file, an empty folder, mixed sizes (naming the first odd file) or
    non-finite values."""
    p = Path(path)
    if not p.exists():
        raise fail(name, "an existing .npy/.npz file or a folder of PNG/JPEG files", str(p))
    if resize is not None:
        if len(resize) != 2 or any(isinstance(v, bool) or int(v) != v or v < 1
                                   for v in resize):
            raise fail("resize", "a size (H, W) of two integers >= 1", resize)
        resize = (int(resize[0]), int(resize[1]))
    if p.is_dir():
        files = image_files(p)
        if not files:
            raise fail(name, "a folder holding PNG/JPEG files", f"{p} (no PNG/JPEG files)")
        arrays = []
        for f in files:
            try:
                a = read_image(f)
            except ValueError as err:
                raise ValueError(str(err).replace("path:", f"{name}:", 1)) from err
            if resize is not None:
                a = _resized(a, resize)
            if arrays and a.shape != arrays[0].shape:
                raise fail(name, f"images of one size {arrays[0].shape} (or --resize H,W)",
                           f"{f} of size {a.shape}")
            arrays.append(a)
        return _as_nchw(np.stack(arrays), str(p))
    return _as_nchw(load_array(p, key, name), str(p))


def load_array(path: str | Path, key: str | None = None, name: str = "path") -> np.ndarray:
    """The array of a ``.npy`` file or of a ``.npz`` archive (``key``, or its only array)."""
    p = Path(path)
    try:
        if p.suffix == ".npy":
            return np.load(p, allow_pickle=False)
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as archive:
                names = list(archive.keys())
                if key is None and len(names) != 1:
                    raise fail("key", f"one of the arrays {names}", None)
                chosen = key if key is not None else names[0]
                if chosen not in names:
                    raise fail("key", f"one of the arrays {names}", repr(key))
                return archive[chosen]
    except (OSError, ValueError) as err:
        if isinstance(err, ValueError) and str(err).startswith("key:"):
            raise
        raise fail(name, "a readable .npy/.npz file", f"{p} ({err})") from err
    raise fail(name, "a .npy or .npz file or a folder of PNG/JPEG files", str(p))


def _binary_rows(rows: Tensor, threshold: float) -> list[bytes]:
    """Each row thresholded at ``threshold`` and packed into bytes (a hashable key)."""
    bits = (rows.flatten(1) > threshold).cpu().numpy()
    return [r.tobytes() for r in np.packbits(bits, axis=1)]


def exact_matches(samples: Tensor | Iterable[Tensor], train: Any,
                  threshold: float = 0.5) -> Tensor:
    """Per sample: whether it equals some training image after thresholding every pixel at
    ``threshold`` (boolean ``(batch,)``). ``samples`` is a tensor or an iterable of batches
    (read once, after the training set). ``train`` is a tensor or anything
    :class:`diffmem.centres.Centres` streams (memory-map, path, shards): its thresholded
    rows are hashed chunk by chunk, in one pass, so memory stays ``O(N / 8)`` bytes."""
    from diffmem.centres import as_centres

    if isinstance(train, Tensor):
        shape, chunks = tuple(train.shape[1:]), _tensor_chunks(train)
    else:
        centres = as_centres(train)
        shape, chunks = tuple(centres.data_shape), centres.stored_chunks(dtype=torch.float32)
    batches = [samples] if isinstance(samples, Tensor) else samples

    def checked(batch: Tensor) -> Tensor:
        if tuple(batch.shape[1:]) != shape:
            raise fail("samples", f"images of shape {shape} like train",
                       f"shape {tuple(batch.shape)}")
        return batch

    if isinstance(samples, Tensor):  # before the scan of the training set
        checked(samples)
    seen: set[bytes] = set()
    for rows in chunks:
        seen.update(_binary_rows(rows, threshold))
    found: list[bool] = []
    for batch in batches:
        found += [key in seen for key in _binary_rows(checked(batch), threshold)]
    return torch.tensor(found, dtype=torch.bool)


def exact_match_fraction(samples: Tensor, train: Any, threshold: float = 0.5) -> float:
    """The paper's image metric: threshold every pixel at ``threshold``, then the fraction of
    samples exactly equal to some (thresholded) training image (:func:`exact_matches`)."""
    if samples.shape[0] == 0:
        raise fail("samples", "at least one sample", "an empty batch")
    return float(exact_matches(samples, train, threshold).double().mean())


def is_binary(data: Any) -> bool:
    """Whether every value of a training set is 0 or 1 (images made of two levels)."""
    from diffmem.centres import as_centres

    rows = _tensor_chunks(data) if isinstance(data, Tensor) else \
        as_centres(data).stored_chunks(dtype=torch.float32)
    return all(bool(((r == 0) | (r == 1)).all()) for r in rows)


def _tensor_chunks(data: Tensor) -> Any:
    """An in-memory set in chunks of a bounded number of values."""
    from diffmem.centres import scan_rows

    step = scan_rows(int(math.prod(data.shape[1:])))
    return (data[i : i + step] for i in range(0, data.shape[0], step))
