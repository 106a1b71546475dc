"""Constructed memorization cases with known answers, shared by the metric and audit tests."""

from __future__ import annotations

import torch
from torch import Tensor


def line_with_copies(n_train: int, dim: int, n_copies: int = 30,
                     seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n_train`` training points on a line, 1 apart (float64, ``(n_train, dim)``), and
    ``n_copies`` copies at distance exactly 1e-3 from points 0, 1, 2 in turn (random
    directions), so a copy's nearest point is known and its d1 is 1e-3."""
    gen = torch.Generator().manual_seed(seed)
    train = torch.zeros(n_train, dim, dtype=torch.float64)
    train[:, 0] = torch.arange(n_train)
    direction = torch.randn(n_copies, dim, generator=gen, dtype=torch.float64)
    direction /= direction.norm(dim=1, keepdim=True)
    return train, train[torch.arange(n_copies) % 3] + 1e-3 * direction
