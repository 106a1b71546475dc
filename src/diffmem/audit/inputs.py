"""Reading what an audit compares: samples and training sets as streams of batches
(:class:`Rows`), and data sets named on the command line (:func:`open_input`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffmem._checks import fail
from diffmem.centres import Centres, open_npy


class Rows:
    """Samples (or a training set's rows) as a stream of batches: a tensor, a numpy array or
    memory-map, a ``.npy`` path, or a :class:`diffmem.centres.Centres`, read ``batch`` rows
    at a time as float tensors (a memory-map is never loaded whole)."""

    def __init__(self, data: Any, name: str = "samples") -> None:
        self.name = name
        self.centres = data if isinstance(data, Centres) else None
        if self.centres is not None:
            self.data, self.n, self.data_shape = None, data.n, data.data_shape
            return
        if isinstance(data, str | Path):
            data = open_npy(data, name)
        if isinstance(data, np.ndarray):
            if data.dtype.kind != "f":
                raise fail(name, "floating-point values", f"dtype {data.dtype}")
        elif isinstance(data, Tensor):
            if not data.is_floating_point():
                raise fail(name, "a floating-point tensor", data.dtype)
        else:
            raise fail(name, "a tensor, a numpy array or memory-map, or a .npy path",
                       type(data).__name__)
        if data.ndim < 2:
            raise fail(name, "an array (n, *data_shape)", f"shape {tuple(data.shape)}")
        if data.shape[0] == 0:
            raise fail(name, "at least one sample", "an empty set")
        self.data = data
        self.n = int(data.shape[0])
        self.data_shape = tuple(int(v) for v in data.shape[1:])

    def batch(self, lo: int, hi: int) -> Tensor:
        """Rows ``lo:hi`` as a float tensor (checked finite)."""
        if self.centres is not None:
            t = self.centres.read(lo, hi)
        else:
            part = self.data[lo:hi]
            t = part if isinstance(part, Tensor) else torch.from_numpy(np.array(part))
        if t.dtype not in (torch.float32, torch.float64):
            t = t.to(torch.float32)
        if not bool(torch.isfinite(t).all()):
            raise fail(self.name, "finite values (no NaN or inf)",
                       f"non-finite values in rows {lo}..{hi - 1}")
        return t

    def batches(self, size: int) -> Iterator[tuple[int, Tensor]]:
        for lo in range(0, self.n, size):
            yield lo, self.batch(lo, min(self.n, lo + size))

    def take(self, index: Sequence[int]) -> Tensor:
        """Rows at ``index`` (for galleries and recall checks)."""
        index = [int(i) for i in index]
        if self.centres is not None:
            like = torch.empty(0, dtype=torch.float64)
            return self.centres.take_raw(torch.tensor(index, dtype=torch.long), like).reshape(
                len(index), *self.data_shape)
        if isinstance(self.data, Tensor):
            return self.data[index]
        order = np.argsort(index)
        rows = np.array(self.data[np.asarray(index)[order]])
        out = np.empty_like(rows)
        out[order] = rows
        return torch.from_numpy(out)


def open_input(path: str | Path, key: str | None = None,
               resize: tuple[int, int] | None = None, name: str = "samples") -> Any:
    """A data set named on the command line: a ``.npy`` file (returned as its path, to be
    memory-mapped), a ``.npz`` archive (its array ``key``), or a folder of PNG/JPEG images
    (loaded as floats in ``[0, 1]``, resampled to ``resize`` if given)."""
    from diffmem.images import load_array, load_images

    p = Path(path)
    if not p.exists():
        raise fail(name, "an existing .npy/.npz file or a folder of PNG/JPEG images", str(p))
    if p.is_dir():
        return load_images(p, resize=resize, name=name)
    if resize is not None:
        raise fail("--resize", "a folder of images (arrays are used as they are)", str(p))
    if p.suffix == ".npy":
        return str(p)
    if p.suffix == ".npz":
        return load_array(p, key, name)
    raise fail(name, "a .npy or .npz file or a folder of PNG/JPEG images", str(p))


def progress_batches(rows: Rows, batch: int, progress: bool, desc: str) -> Iterator[Tensor]:
    """``rows`` in batches of ``batch``, with a progress bar."""
    bar = tqdm(total=rows.n, disable=not progress, desc=desc, leave=False)
    for _, x in rows.batches(batch):
        yield x
        bar.update(x.shape[0])
    bar.close()
