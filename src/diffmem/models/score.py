"""A trained model as a diffmem score: :class:`ModelScore`, a score ``s(x, t)`` on a diffmem
schedule (every sampler takes it) that also gives its denoiser ``D(x, t) = x + sigma(t)^2
s(x, t)``, conditional and guided where the model is."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from diffmem._checks import fail, positive_int
from diffmem.schedules import (
    Schedule,
    TimeLike,
    expand_as_batch,
    time_tensor,
)


# --- scores of models ----------------------------------------------------------------------
class ModelScore:
    """A trained model as a diffmem score on ``schedule``: ``fn(x, t) -> s`` (``kind``
    ``'score'``) or ``fn(x, t) -> D`` (``kind='denoiser'``, ``D = x + sigma^2 s``), applied
    in batches. Outputs are checked (shape of ``x``, finite).

    A conditional model (``conditional=True``) is ``fn(x, t, y)`` with ``y`` the batch's
    conditions (integer labels ``(batch,)`` or vectors ``(batch, *cond_shape)``); with
    ``guidance = w`` and a ``null`` condition (the one that means "no condition") its output
    is classifier-free guided, ``out(y) = out(null) + w (out(y) - out(null))`` (linear in
    the output, so the same for a score, a denoiser or a noise prediction).

    ``network`` keeps what the diffusers sampler needs (the UNet, its scheduler config and
    how it takes a condition) when the model is a diffusers one."""

    def __init__(self, fn: Callable[..., Tensor], schedule: Schedule,
                 data_shape: tuple[int, ...], kind: str = "score", name: str = "model",
                 batch: int = 256, *, conditional: bool = False,
                 network: dict[str, Any] | None = None) -> None:
        if kind not in ("score", "denoiser"):
            raise fail("kind", "'score' or 'denoiser'", repr(kind))
        self.fn, self.schedule, self.kind, self.name = fn, schedule, kind, name
        self.data_shape = tuple(data_shape)
        self.batch = positive_int("batch", batch)
        self.conditional = conditional
        self.network = network
        self.guidance: float | None = None
        self.null: Tensor | None = None

    def guided(self, guidance: float | None, null: Tensor | None) -> ModelScore:
        """Set classifier-free guidance (``None``: none); checks that the model takes
        ``null``. Returns the model."""
        if guidance is None:
            self.guidance, self.null = None, None
            return self
        if not self.conditional:
            raise fail("--guidance", "a conditional model (with --train-cond or --conditions)",
                       guidance)
        if not math.isfinite(guidance):
            raise fail("--guidance", "a finite guidance weight", guidance)
        if null is None:
            raise fail("--null-cond", "the condition that means 'no condition', with "
                       "--guidance", None)
        self.check_condition(null[None], "--null-cond")
        self.guidance, self.null = float(guidance), null
        return self

    def check_condition(self, y: Tensor, name: str) -> None:
        """Evaluate the model once on ``y`` (a batch of conditions) at mid-time; an error
        the model raises becomes a ``ValueError`` naming ``name``."""
        x = torch.zeros(y.shape[0], *self.data_shape)
        t = torch.full((y.shape[0],), 0.5 * float(self.schedule.T))
        try:
            self._apply(x, t, y)
        except Exception as err:  # the user's model: say what it raised
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            raise fail(name, f"conditions {self.name} can take", f"shape {tuple(y.shape)}, "
                       f"dtype {y.dtype}: {type(err).__name__}: {(lines or [''])[-1][:200]}"
                       ) from err

    def _apply(self, x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        """``fn`` on one batch, conditioned (and guided) when the model is conditional."""
        if not self.conditional:
            return self.fn(x, t)
        if y is None:
            raise fail("y", f"conditions for the conditional model {self.name}", None)
        if y.shape[0] != x.shape[0]:
            raise fail("y", f"one condition per sample ({x.shape[0]})", tuple(y.shape))
        if self.guidance is None:
            return self.fn(x, t, y)
        assert self.null is not None
        null = self.null.to(y.device).expand(x.shape[0], *self.null.shape)
        both = self.fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([null, y.to(null)]))
        uncond, cond = both.chunk(2)
        return uncond + self.guidance * (cond - uncond)

    def _out(self, x: Tensor, t: TimeLike, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if not isinstance(x, Tensor) or tuple(x.shape[1:]) != self.data_shape:
            raise fail("x", f"a tensor (batch, *{self.data_shape}) for {self.name}",
                       f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__)
        tt = time_tensor(t).to(device=x.device, dtype=x.dtype).expand(x.shape[0])
        if y is not None and y.dim() >= 1 and y.shape[0] == 1 and x.shape[0] > 1:
            y = y.expand(x.shape[0], *y.shape[1:])
        parts = []
        with torch.no_grad():
            for lo in range(0, x.shape[0], self.batch):
                rows = slice(lo, lo + self.batch)
                out = self._apply(x[rows], tt[rows], None if y is None else y[rows])
                if not isinstance(out, Tensor) or out.shape != x[rows].shape:
                    raise fail(self.name, f"outputs of the shape of x, {tuple(x[rows].shape)}",
                               f"shape {tuple(out.shape)}" if isinstance(out, Tensor)
                               else type(out).__name__)
                parts.append(out.to(x.dtype))
        out = torch.cat(parts) if parts else torch.empty_like(x)
        if not bool(torch.isfinite(out).all()):
            raise fail(self.name, "finite outputs", "NaN or inf")
        return out, self.schedule.sigma2(tt).to(x.dtype)

    def __call__(self, x: Tensor, t: TimeLike, y: Tensor | None = None) -> Tensor:
        """The score ``s(x, t)`` (``s(x, t | y)`` for a conditional model)."""
        out, s2 = self._out(x, t, y)
        if self.kind == "score":
            return out
        return (out - x) / expand_as_batch(s2, x)

    def sigma2_score(self, x: Tensor, t: TimeLike, y: Tensor | None = None) -> Tensor:
        """``sigma(t)^2 s(x, t)``."""
        out, s2 = self._out(x, t, y)
        if self.kind == "denoiser":
            return out - x
        return expand_as_batch(s2, x) * out

    def denoiser(self, x: Tensor, t: TimeLike, y: Tensor | None = None) -> Tensor:
        """``D(x, t) = x + sigma(t)^2 s(x, t)``."""
        return x + self.sigma2_score(x, t, y)
