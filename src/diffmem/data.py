"""The paper's data sets (2-D) and starting points."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from diffmem._checks import positive, positive_int


def paper_points(dtype: torch.dtype = torch.float64) -> Tensor:
    """The 20 training points of the paper: ``np.random.seed(1); np.random.randn(20, 2)``
    (drawn with numpy's legacy global generator, exactly this call, without changing the
    caller's global numpy state)."""
    state = np.random.get_state()
    try:
        np.random.seed(1)
        pts = np.random.randn(20, 2)
    finally:
        np.random.set_state(state)
    return torch.tensor(pts, dtype=dtype)


def two_points(dtype: torch.dtype = torch.float64) -> Tensor:
    """``(-1, 0)`` and ``(1, 0)``."""
    return torch.tensor([[-1.0, 0.0], [1.0, 0.0]], dtype=dtype)


def four_points(dtype: torch.dtype = torch.float64) -> Tensor:
    """``(1, 0), (0, 1), (-1, 0), (0, -1)``."""
    return torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], dtype=dtype)


def square_boundary(half_width: float = 2.1, per_side: int = 21,
                    dtype: torch.dtype = torch.float64) -> Tensor:
    """Points on the boundary of ``[-h, h]^2``: ``per_side`` equispaced points on each side,
    corners counted once (``4 (per_side - 1)`` points, 80 for the paper's 21)."""
    h = positive("half_width", half_width)
    n = positive_int("per_side", per_side)
    if n < 2:
        raise ValueError(f"per_side: expected an integer >= 2, received {per_side}")
    # integer numerators keep the grid exactly symmetric (the midpoint is exactly 0)
    u = (h * (2 * torch.arange(n, dtype=torch.float64) - (n - 1)) / (n - 1)).to(dtype)[:-1]
    hh = torch.full_like(u, h)
    sides = [torch.stack([u, -hh], 1), torch.stack([hh, u], 1),
             torch.stack([-u, hh], 1), torch.stack([-hh, -u], 1)]
    return torch.cat(sides)
