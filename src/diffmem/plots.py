"""Figure helpers shared by the experiments (matplotlib, non-interactive backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from diffmem.metrics import nearest  # noqa: E402

Axes = Any


def _np(v: Any) -> np.ndarray:
    """A tensor (any device) or sequence as a numpy array for matplotlib."""
    if isinstance(v, Tensor):
        return v.detach().cpu().numpy()
    return np.asarray(v)


def figure(rows: int = 1, cols: int = 1, size: float = 4.0) -> tuple[Any, np.ndarray]:
    """A figure with a ``rows x cols`` grid of axes (always returned as a 2-D array)."""
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    return fig, axes


def voronoi(ax: Axes, train: Tensor, lim: float = 3.0, resolution: int = 300) -> None:
    """Shade the Voronoi cells of 2-D training points (nearest-point map on a grid), draw the
    cell boundaries and the points."""
    train = train.detach().cpu().to(torch.float64)
    u = torch.linspace(-lim, lim, resolution, dtype=torch.float64)
    gx, gy = torch.meshgrid(u, u, indexing="xy")
    idx, _ = nearest(torch.stack([gx.reshape(-1), gy.reshape(-1)], 1), train)
    cells = idx.reshape(resolution, resolution).numpy()
    ax.imshow(cells % 10, extent=(-lim, lim, -lim, lim), origin="lower", cmap="tab10",
              alpha=0.12, interpolation="nearest")
    ax.contour(gx.numpy(), gy.numpy(), cells, levels=np.arange(train.shape[0]) + 0.5,
               colors="0.5", linewidths=0.5)
    ax.scatter(_np(train[:, 0]), _np(train[:, 1]), c="k", s=18, marker="x", zorder=5,
               label="training points")
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")


def trajectories(ax: Axes, traj: Tensor, color: str = "C3", lw: float = 0.7) -> None:
    """Draw 2-D trajectories ``(B, n, 2)``, start marked with a dot."""
    traj = _np(traj)
    for path in traj:
        ax.plot(path[:, 0], path[:, 1], color=color, lw=lw, alpha=0.8)
    ax.scatter(traj[:, 0, 0], traj[:, 0, 1], color=color, s=6, zorder=4)


def scatter(ax: Axes, samples: Tensor, color: str = "C0", size: float = 3.0) -> None:
    """Scatter 2-D samples."""
    s = _np(samples)
    ax.scatter(s[:, 0], s[:, 1], s=size, color=color, alpha=0.6, zorder=3, linewidths=0)


def weights_vs_time(ax: Axes, times: Tensor, weights: Tensor, xlabel: str = "t",
                    logx: bool = True) -> None:
    """Plot each mixture weight ``w_n`` along one trajectory, ``weights`` ``(n_times, N)``."""
    w, tt = _np(weights), _np(times)
    for n in range(w.shape[1]):
        ax.plot(tt, w[:, n], lw=1)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("weight $w_n$")


def distance_decay(ax: Axes, x: Tensor, dist: Tensor, ref: Tensor, xlabel: str,
                   ref_label: str, logx: bool = True) -> None:
    """``|x(tau) - x(tau_end)|`` for each trajectory (rows of ``dist``) with a reference
    curve."""
    xx = _np(x)
    for row in _np(dist):
        ax.plot(xx, row, color="C0", lw=0.6, alpha=0.6)
    ax.plot(xx, _np(ref), "k--", lw=1.5, label=ref_label)
    if logx:
        ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("$|x - x_{end}|$")
    ax.legend(loc="best", fontsize=8)


def fraction_curve(ax: Axes, values: Sequence[float], fractions: Mapping[str, Sequence[float]],
                   xlabel: str, logx: bool = True) -> None:
    """Memorized fraction against a swept parameter, one line per tolerance."""
    for key, frac in fractions.items():
        ax.plot(values, frac, "o-", label=f"delta = {key}")
    if logx:
        ax.set_xscale("log")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction memorized")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
