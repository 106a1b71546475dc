"""Conditions of conditional models: integer class labels ``(n,)`` or vectors
``(n, *cond_shape)`` (a measured ``y``, precomputed text embeddings ``(n, seq, dim)``), one
per sample or training item; how they are read, repeated per sample, grouped and compared.

Two conditions are the same when all their values are equal (labels, or vectors copied
from one table: the conditions sampled are normally training conditions).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffmem._checks import fail, positive_int


def as_conditions(values: Any, name: str, n: int | None = None) -> Tensor:
    """Conditions as a tensor: integers become ``int64`` labels (one dimension), floats
    ``float32`` vectors (finite); ``n`` (if given) is the number required."""
    if isinstance(values, str | Path):
        p = Path(values)
        if not p.is_file() or p.suffix != ".npy":
            raise fail(name, "a .npy file of conditions (integer labels or vectors)", str(p))
        values = np.load(p)
    t = values if isinstance(values, Tensor) else torch.from_numpy(np.asarray(values))
    if t.dtype == torch.bool or not (t.is_floating_point() or t.dtype in (
            torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise fail(name, "integer labels or floating-point vectors", f"dtype {t.dtype}")
    if t.dim() == 0:
        raise fail(name, "one condition per row (an array (n,) or (n, ...))", "a scalar")
    if t.shape[0] == 0:
        raise fail(name, "at least one condition", "an empty array")
    if n is not None and t.shape[0] != n:
        raise fail(name, f"one condition per item ({n})", f"{t.shape[0]} conditions")
    if t.is_floating_point():
        t = t.to(torch.float32)
        if not bool(torch.isfinite(t).all()):
            raise fail(name, "finite conditions", "NaN or inf")
        return t
    if t.dim() != 1:
        raise fail(name, "integer labels of shape (n,)", f"shape {tuple(t.shape)}")
    return t.to(torch.int64)


def parse_null(value: str, like: Tensor) -> Tensor:
    """The null condition of classifier-free guidance, given as a label (``10``), a number,
    or a ``.npy`` file holding one condition (an embedding ``(seq, dim)``); shaped and
    typed like one row of ``like``."""
    p = Path(value)
    if p.suffix == ".npy":
        if not p.is_file():
            raise fail("--null-cond", "an existing .npy file with one condition", str(p))
        null = torch.from_numpy(np.load(p))
    else:
        try:
            null = torch.tensor(int(value)) if not like.is_floating_point() else \
                torch.tensor(float(value))
        except ValueError as err:
            raise fail("--null-cond", "an integer label, a number or a .npy file",
                       repr(value)) from err
    if not like.is_floating_point():
        if null.is_floating_point() or null.numel() != 1:
            raise fail("--null-cond", "one integer label, like the conditions",
                       f"shape {tuple(null.shape)}, dtype {null.dtype}")
        return null.reshape(()).to(torch.int64)
    row = tuple(like.shape[1:])
    if null.numel() == 1:
        null = null.reshape(()).expand(row)
    if tuple(null.shape) != row:
        raise fail("--null-cond", f"one condition of shape {row}", f"shape {tuple(null.shape)}")
    return null.to(torch.float32).contiguous()


def per_sample(conditions: Tensor, k: int) -> Tensor:
    """``k`` samples of each condition, in order: ``(len(conditions) k, *cond_shape)``."""
    return conditions.repeat_interleave(positive_int("--per-condition", k), 0)


def distinct(conditions: Tensor) -> tuple[Tensor, Tensor]:
    """The distinct conditions (sorted) and, for each row, the index of its own."""
    flat = conditions.reshape(conditions.shape[0], -1)
    keys, inverse = torch.unique(flat, dim=0, return_inverse=True)
    return keys.reshape(keys.shape[0], *conditions.shape[1:]), inverse


def same(a: Tensor, b: Tensor) -> Tensor:
    """Row by row, whether two batches of conditions are equal, ``(n,)`` booleans."""
    return (a.reshape(a.shape[0], -1) == b.reshape(b.shape[0], -1).to(a.dtype)).all(1)


def describe(condition: Tensor, index: int) -> Any:
    """A condition as a JSON value: its label, a short vector's values, or (long vectors,
    embeddings) its index among the distinct conditions."""
    if not condition.is_floating_point():
        return int(condition)
    if condition.numel() <= 8:
        return [float(v) for v in condition.reshape(-1)]
    return index
