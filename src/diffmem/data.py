"""The paper's data sets (2-D) and starting points."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from diffmem._checks import fail, positive, positive_int


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
        raise fail("per_side", "an integer >= 2", per_side)
    # integer numerators keep the grid exactly symmetric (the midpoint is exactly 0)
    u = (h * (2 * torch.arange(n, dtype=torch.float64) - (n - 1)) / (n - 1)).to(dtype)[:-1]
    hh = torch.full_like(u, h)
    sides = [torch.stack([u, -hh], 1), torch.stack([hh, u], 1),
             torch.stack([-u, hh], 1), torch.stack([-hh, -u], 1)]
    return torch.cat(sides)


class GaussianTruth:
    """The standard normal ``N(0, I_d)``: the law the paper's 20 points are drawn from."""

    name = "gaussian"

    def __init__(self, dim: int = 2) -> None:
        self.dim = positive_int("dim", dim)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        return torch.randn(n, self.dim, generator=generator, dtype=torch.float64)

    def log_density(self, x: Tensor) -> Tensor:
        """``log N(x; 0, I)`` per row (nats)."""
        return -0.5 * (x * x).sum(1) - 0.5 * self.dim * math.log(2 * math.pi)


class RingTruth:
    """``modes`` Gaussians of standard deviation ``std`` with means equally spaced on a
    circle of radius ``radius``, equal weights: a law with structure, where blurring the
    training points and averaging them (barycentres) differ."""

    name = "ring"

    def __init__(self, modes: int = 8, radius: float = 2.0, std: float = 0.15) -> None:
        self.modes = positive_int("modes", modes)
        self.radius = positive("radius", radius)
        self.std = positive("std", std)
        angle = 2 * math.pi * torch.arange(self.modes, dtype=torch.float64) / self.modes
        self.means = self.radius * torch.stack([angle.cos(), angle.sin()], 1)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        k = torch.randint(0, self.modes, (n,), generator=generator)
        return self.means[k] + self.std * torch.randn(n, 2, generator=generator,
                                                      dtype=torch.float64)

    def log_density(self, x: Tensor) -> Tensor:
        """``log (1/M) sum_k N(x; mu_k, std^2 I)`` per row (nats)."""
        sq = ((x[:, None, :] - self.means[None].to(x)) ** 2).sum(-1)
        return (torch.logsumexp(-sq / (2 * self.std**2), 1) - math.log(self.modes)
                - math.log(2 * math.pi * self.std**2))


def truth(name: str) -> GaussianTruth | RingTruth:
    """A known law by name: ``'gaussian'`` or ``'ring'``."""
    table = {"gaussian": GaussianTruth, "ring": RingTruth}
    if name not in table:
        raise fail("truth", f"one of {sorted(table)}", repr(name))
    return table[name]()
