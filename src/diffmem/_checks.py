"""Input checks shared by every module: each raises ``ValueError`` naming the argument,
what was expected and what was received. Nothing is silently clipped."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def fail(name: str, expected: str, received: object) -> ValueError:
    """Build the project's standard error: ``argument: expected ..., received ...``."""
    return ValueError(f"{name}: expected {expected}, received {received}")


def finite_tensor(name: str, value: Tensor) -> Tensor:
    """Require a tensor whose entries are all finite."""
    if not isinstance(value, Tensor):
        raise fail(name, "a torch.Tensor", type(value).__name__)
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise fail(name, "finite values (no NaN or inf)", f"{bad} non-finite entries")
    return value


def _number(name: str, value: object, expected: str) -> float:
    """``value`` as a float, or the standard error when it is not a real number."""
    if isinstance(value, bool | str | bytes):
        raise fail(name, expected, repr(value))
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as err:
        raise fail(name, expected, repr(value)) from err


def nonnegative(name: str, value: float) -> float:
    """Require a finite real number >= 0."""
    number = _number(name, value, "a finite number >= 0")
    if not math.isfinite(number) or number < 0:
        raise fail(name, "a finite number >= 0", number)
    return number


def positive(name: str, value: float) -> float:
    """Require a finite real number > 0."""
    number = _number(name, value, "a finite number > 0")
    if not math.isfinite(number) or number <= 0:
        raise fail(name, "a finite number > 0", number)
    return number


def _integer(name: str, value: object, low: int) -> int:
    expected = f"an integer >= {low}"
    number = _number(name, value, expected)
    if not math.isfinite(number) or int(number) != number or number < low:
        raise fail(name, expected, value)
    return int(number)


def positive_int(name: str, value: int) -> int:
    """Require an integer >= 1."""
    return _integer(name, value, 1)


def nonnegative_int(name: str, value: int) -> int:
    """Require an integer >= 0."""
    return _integer(name, value, 0)


def training_set(name: str, train: Tensor, allow_empty: bool = False) -> Tensor:
    """Require a non-empty (unless ``allow_empty``: a process's block of a training set split
    over processes may be empty), finite, floating training set ``(N, *data_shape)``."""
    if not isinstance(train, Tensor):
        raise fail(name, "a torch.Tensor of shape (N, *data_shape)", type(train).__name__)
    if train.dim() < 2:
        raise fail(name, "a tensor of shape (N, *data_shape) with at least 2 dimensions",
                   f"shape {tuple(train.shape)}")
    if train.shape[0] == 0 and not allow_empty:
        raise fail(name, "at least one training point", "an empty set (N = 0)")
    if not train.is_floating_point():
        raise fail(name, "a floating-point tensor", train.dtype)
    return finite_tensor(name, train)


def batch_like(name: str, x: Tensor, data_shape: tuple[int, ...]) -> Tensor:
    """Require a finite floating batch of shape ``(batch, *data_shape)``."""
    if not isinstance(x, Tensor):
        raise fail(name, f"a torch.Tensor of shape (batch, {data_shape})", type(x).__name__)
    if tuple(x.shape[1:]) != tuple(data_shape) or x.dim() != len(data_shape) + 1:
        raise fail(name, f"shape (batch, *{tuple(data_shape)})", f"shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise fail(name, "a floating-point tensor", x.dtype)
    return finite_tensor(name, x)
