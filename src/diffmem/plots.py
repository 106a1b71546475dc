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


def fraction_figure(values: Sequence[float], curves: Mapping[str, Mapping[str, Sequence[float]]],
                    xlabel: str, logx: bool = True, title: str | None = None) -> Any:
    """One panel per curve set (``{panel title: {delta key: fractions}}``) of the memorized
    fraction against a swept parameter."""
    fig, ax = figure(1, len(curves), size=4.5)
    for i, (label, per_delta) in enumerate(curves.items()):
        fraction_curve(ax[0, i], list(values), per_delta, xlabel, logx=logx)
        ax[0, i].set_title(title if title is not None else label)
    return fig


def voronoi_grid(train: Any, sample_sets: Sequence[Any], titles: Sequence[str],
                 cols: int | None = None, size: float = 3.2) -> Any:
    """Samples of each set of a sweep scattered over the Voronoi diagram of 2-D training
    points, ``cols`` panels per row (one row by default)."""
    n = len(sample_sets)
    cols = n if cols is None else cols
    rows = -(-n // cols)
    fig, ax = figure(rows, cols, size=size)
    train = torch.as_tensor(_np(train))
    for i, (samples, title) in enumerate(zip(sample_sets, titles, strict=True)):
        a = ax[i // cols, i % cols]
        voronoi(a, train)
        scatter(a, samples)
        a.set_title(title, fontsize=9)
    for j in range(n, rows * cols):
        ax[j // cols, j % cols].axis("off")
    return fig


def traced_panels(ax: np.ndarray, train: Any, trajectory: Any, times: Any, sigma: Any,
                  weights: Any, distances: Any, reference: Any, title: str,
                  window: Sequence[float] | None = None, slope: float | None = None,
                  lim: float = 3.0) -> None:
    """Three panels in the row ``ax``: trajectories over the Voronoi diagram, the weights of
    up to three trajectories against ``t``, and ``|x(t) - x(t_end)|`` against ``sigma(t)``
    with its ``O(sigma)`` reference line (and the slope-fit window)."""
    voronoi(ax[0], torch.as_tensor(_np(train)), lim=lim)
    trajectories(ax[0], trajectory)
    ax[0].set_title(f"{title}: trajectories")
    for w in _np(weights):
        weights_vs_time(ax[1], times, w)
    ax[1].set_title("weights $w_n(x(t), t)$ (3 trajectories)")
    distance_decay(ax[2], sigma, distances, reference, r"$\sigma(t)$", r"$O(\sigma)$")
    if window is not None:
        ax[2].axvspan(*window, color="0.9", zorder=0, label="fit window")
    if slope is not None:
        ax[2].set_title(f"median slope {slope:.3f}")


def image_row(ax: Sequence[Axes], imgs: Any, label: str, vmax: float = 1.0) -> None:
    """Images ``(n, H, W)`` or ``(n, 1, H, W)`` (grey, dark on light) or ``(n, 3, H, W)``
    (colour, in ``[0, vmax]``) in a row of axes, the row labelled."""
    arr = _np(imgs)
    colour = arr.ndim == 4 and arr.shape[1] == 3
    arr = (arr.transpose(0, 2, 3, 1) / vmax).clip(0, 1) if colour else \
        arr.reshape(arr.shape[0], *arr.shape[-2:])
    for j, a in enumerate(ax):
        if j < arr.shape[0]:
            if colour:
                a.imshow(arr[j], interpolation="nearest")
            else:
                a.imshow(arr[j], cmap="gray_r", vmin=0, vmax=vmax)
        a.set_xticks([])
        a.set_yticks([])
        if j >= arr.shape[0]:
            a.axis("off")
        if j == 0:
            a.set_ylabel(label, fontsize=7)


def image_rows(rows: Sequence[tuple[str, Any]], cols: int, size: float = 1.0) -> Any:
    """A figure with one labelled row of images per ``(label, images)``."""
    fig, ax = figure(len(rows), cols, size=size)
    for r, (label, imgs) in enumerate(rows):
        image_row(ax[r], imgs, label)
    return fig


def image_table(panels: Sequence[Sequence[tuple[str, Any]]], size: float = 0.9) -> Any:
    """A grid of titled image panels: ``panels[i][j] = (title, image (H, W))``; titles are
    shown on the first row, NaN pixels are left blank."""
    rows, cols = len(panels), max(len(r) for r in panels)
    fig, ax = figure(rows, cols, size=size)
    for i, row in enumerate(panels):
        for j in range(cols):
            a = ax[i, j]
            a.set_xticks([])
            a.set_yticks([])
            if j >= len(row):
                a.axis("off")
                continue
            title, img = row[j]
            a.imshow(_np(img), cmap="gray_r", vmin=0, vmax=1)
            if i == 0:
                a.set_title(title, fontsize=6)
    return fig


def denoiser_gap_figure(gaps: Mapping[str, Mapping[str, Any]], title: str) -> Any:
    """``E |D_model - D_e|^2 / E |D_e - x|^2`` against ``sigma`` for several models (one
    colour each; solid: noisy training points, dashed: noisy held-out points)."""
    fig, ax = figure(1, 1, size=5.0)
    a = ax[0, 0]
    floor = 1e-6  # the plot's floor on a log axis (a gap of exactly 0 is drawn there)
    for i, (label, gap) in enumerate(gaps.items()):
        a.plot(gap["sigma"], np.maximum(gap["train"]["empirical"], floor), "-",
               color=f"C{i % 10}", lw=1.3, label=f"{label} (training points)")
        if "held" in gap:
            a.plot(gap["sigma"], np.maximum(gap["held"]["empirical"], floor), "--",
                   color=f"C{i % 10}", lw=1, label=f"{label} (held-out points)")
    a.axhline(1.0, color="0.6", lw=0.8, ls=":")
    a.axhline(0.1, color="C3", lw=0.8, ls=":")
    a.set_xscale("log")
    a.set_yscale("log")
    a.set_xlabel(r"noise level $\sigma$")
    a.set_ylabel(r"$E|D - D_e|^2 / E|D_e - x|^2$")
    a.set_title(title, fontsize=9)
    a.legend(fontsize=6)
    return fig


def mitigation_plane(a: Axes, summary: Mapping[str, Any], title: str | None = None) -> None:
    """``diffmem mitigate``'s plane on ``a``: copies against cost, one curve per cure over its
    full-size runs (strengths marked; hollow where the run moves the clean samples by more
    than the cost factor; diamonds without a curve for a model trained again with a
    training-time cure), the search's screen estimates (grey crosses), the uncured model,
    the frontier, the target and the recommended run."""
    base = summary["baseline"]
    a.scatter([0], [base["copy_fraction"]], color="k", marker="s", s=40, zorder=3,
              label="uncured")
    runs = summary["runs"]
    for k, name in enumerate(dict.fromkeys(r["cure"] for r in runs)):
        mine = sorted((r for r in runs if r["cure"] == name), key=lambda r: r["strength"])
        again = all(r.get("when") == "training" for r in mine)
        if not again:
            xs = [0.0] + [r["cost"] or 0.0 for r in mine]
            ys = [base["copy_fraction"]] + [r["copy_fraction"] for r in mine]
            a.plot(xs, ys, color=f"C{k % 10}", lw=1, label=name)
        for j, r in enumerate(mine):
            kept = r.get("keeps_samples") is not False
            a.scatter([r["cost"] or 0.0], [r["copy_fraction"]], s=45 if again else 30,
                      zorder=3, marker="D" if again else "o", edgecolors=f"C{k % 10}",
                      facecolors=f"C{k % 10}" if kept else "none",
                      label=f"{name} (retrained)" if again and j == 0 else None)
            a.annotate(f"{r['strength']:g}", (r["cost"] or 0.0, r["copy_fraction"]),
                       fontsize=7, xytext=(3, 3), textcoords="offset points")
    screen = summary.get("screen") or []
    if screen:  # the search's estimates on its small plan: crosses, not joined
        a.scatter([r["cost"] or 0.0 for r in screen], [r["copy_fraction"] for r in screen],
                  marker="x", s=22, color="0.45", zorder=2,
                  label="screen estimates (few samples)")
    labels = set(summary["frontier"])
    front = sorted((r for r in runs if f"{r['cure']}={r['strength']:g}" in labels),
                   key=lambda r: r["cost"] or 0.0)
    a.plot([r["cost"] or 0.0 for r in front], [r["copy_fraction"] for r in front],
           color="0.5", ls="--", lw=1, label="frontier")
    a.axhline(summary["target"], color="C3", ls=":", lw=1,
              label=f"target {summary['target']:g}")
    best = summary.get("recommended")
    if best is not None:
        a.scatter([best["cost"] or 0.0], [best["copy_fraction"]], s=160, facecolors="none",
                  edgecolors="C3", linewidths=2, zorder=4, label="recommended")
    units = "feature units" if summary.get("features") else "data units"
    a.set(xlabel="cost: energy distance to the uncured samples of clean conditions\n"
                 f"({units})", ylabel="copies (fraction of memorized conditions' samples)",
          ylim=(-0.03, 1.03))
    if all(r["cost"] is None for r in runs):
        title = title or "cost not measured: the uncured model copies every condition"
    a.set_title(title or "hollow: moves the clean samples' distance to the data, their "
                f"condition or CLIP score,\nor the cured copies' (noise), by more than "
                f"{summary['cost_factor']:g}x", fontsize=9)
    a.legend(fontsize=7)
