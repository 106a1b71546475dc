"""Reading what the commands are given: sizes and shapes, label and sample files, the prompts'
resolution, and cures applied to a loaded model. Each error names its option."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffmem._checks import fail


def parse_size(text: str | None, name: str = "--resize") -> tuple[int, int] | None:
    """``H,W`` as two positive integers (``None`` when not given); errors name ``name``."""
    if text is None:
        return None
    try:
        h, w = (int(v) for v in text.split(","))
    except ValueError as err:
        raise fail(name, "H,W (two integers)", repr(text)) from err
    if h < 1 or w < 1:
        raise fail(name, "H,W of integers >= 1", repr(text))
    return h, w


def parse_shape(data_shape: str | None) -> tuple[int, ...] | None:
    """``--data-shape`` as integers (``None`` when not given)."""
    if data_shape is None:
        return None
    try:
        shape = tuple(int(v) for v in data_shape.split(","))
    except ValueError as err:
        raise fail("--data-shape", "integers separated by commas, e.g. 1,8,8",
                   repr(data_shape)) from err
    if not shape or min(shape) < 1:
        raise fail("--data-shape", "positive integers", repr(data_shape))
    return shape


def labels(path: Path | None, n: int) -> Any:
    """``--labels``: 0/1 integers, one per condition or sample (``None`` when not given)."""
    if path is None:
        return None
    from diffmem.conditions import as_conditions

    marks = as_conditions(path, "--labels", n)
    if marks.is_floating_point():
        raise fail("--labels", "integer labels 0 or 1", f"dtype {marks.dtype}")
    return marks


def sample_array(path: Path, name: str) -> Tensor:
    """A ``.npy`` of samples as float64 (``name`` in errors)."""
    import numpy as np

    from diffmem.centres import open_npy

    arr = open_npy(path, name)
    if arr.dtype.kind not in "fiu":
        raise fail(name, "a numeric array", f"dtype {arr.dtype}")
    return torch.from_numpy(np.array(arr, dtype=np.float64))


def same_kind(ref: Tensor, like: Tensor) -> Tensor:
    """``--reference`` checked to be of the kind of what is tested (dtype and shape)."""
    if ref.is_floating_point() != like.is_floating_point() or ref.shape[1:] != like.shape[1:]:
        raise fail("--reference", f"entries like those tested (dtype {like.dtype}, shape "
                   f"(n, *{tuple(like.shape[1:])}))",
                   f"dtype {ref.dtype}, shape {tuple(ref.shape)}")
    return ref


def prompt_marks(text: Any, table: Tensor) -> Tensor | None:
    """The prompts file's labels of the prompts ``table`` (-1 where unlabelled)."""
    marks = text.prompts.marks()
    return None if marks is None else torch.tensor(marks)[table]


def prompt_resolution(model: str | None, prompts: Path | None,
                      size: tuple[int, int] | None, text: Any) -> tuple[int, int] | None:
    """The size training images are resized to: ``--resize``, or with ``--prompts`` the
    resolution the pipeline generates (``--resolution`` or its own)."""
    if prompts is None or model is None or size is not None:
        return size
    from diffmem.text import pipeline_resolution

    if text is not None and text.resolution is not None:
        return text.resolution

    return pipeline_resolution(model)


def prompt_settings(plan: Any, prompts: Path | None,
                    size: tuple[int, int] | None) -> dict[str, Any]:
    """What audit.json records of a --prompts run: the file, the guidance applied, the
    prompts the tokenizer truncated and the size training images were resized to."""
    if prompts is None or plan is None:
        return {}
    return {"prompts": str(prompts), "guidance_applied": plan.model.guidance,
            "truncated_prompts": plan.truncated, "train_resized_to": size}


def cured(model: Any, cures: list[str], null: Any = None, train: Any = None,
          train_cond: Any = None) -> Any:
    """``model`` cured by ``--cure NAME=STRENGTH`` (none: unchanged), with its null
    condition, training set and training conditions for the cures that need them."""
    if not cures:
        return model
    from diffmem.mitigate import cure_context, cure_model, parse_cure

    parsed = [parse_cure(c) for c in cures]
    return cure_model(model, parsed, cure_context(
        model, null, train, train_cond, search=any(c.searches for c in parsed)))


def cured_plan(plan: Any, cures: list[str], train: Any = None,
               train_cond: Any = None) -> Any:
    """``plan`` with its model cured by ``--cure`` (:func:`cured`)."""
    return dataclasses.replace(plan, model=cured(plan.model, cures, plan.null, train,
                                                 train_cond))
