"""What a cure is, and a model with cures applied.

A cure changes how a trained model samples, once before sampling (:meth:`Cure.prepare`: a
new model, e.g. with other prompt embeddings) or at one of three places of every evaluation,
so that it holds for every sampler (``ode``, ``edm``, ``pipeline``) and for detection alike:

* the **condition** ``y`` given at time ``t`` (:meth:`Cure.condition`);
* the classifier-free **guidance** weight (:meth:`Cure.guidance_weight`);
* the guided **denoiser** ``D(x, t) = x + sigma(t)^2 s(x, t)``, after guidance
  (:meth:`Cure.denoise`).

:class:`CuredModel` is the cured :class:`~diffmem.models.ModelScore`. For a diffusers model
its network entry gets a ``net`` that applies the condition hooks, and a ``post`` that turns
the scheduler's guided output into ``D`` (by the prediction type, at the time of the
timestep), applies the denoiser hooks and turns it back, so ``--sampler pipeline`` samples
the cured model in the network's own parameterization. A flow-matching scheduler's first
step at ``sigma = 1`` lies beyond the schedule's ``T``: there ``m = 0`` and a changed denoiser
has no finite velocity ``-(sigma s + x) / m``, so that one evaluation is left uncured (the
condition hooks still apply). Cures compose in the order given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from diffmem._checks import fail
from diffmem.models import (
    ModelScore,
    network_output_to_score,
    prediction_of,
    score_to_network_output,
)
from diffmem.schedules import expand_as_batch


@dataclass
class CureContext:
    """What cures may need besides the model: its null condition (``None`` when it has
    none), the training set in the model's data space (a :class:`~diffmem.centres.Centres`,
    ``None`` when not given), the end ``T`` of the model's time axis and the training items'
    conditions (``None`` when not given)."""

    null: Tensor | None = None
    train: Any = None
    T: float = 1.0
    train_cond: Tensor | None = None
    #: Training items' reproduction radii found so far (item -> distance to its nearest
    #: other item), shared by every evaluation and run that uses this context.
    radii: dict[int, float] = field(default_factory=dict)
    #: Nearest items searched per evaluation, found so far (0: the cure's default).
    neighbours: int = 0


def cure_context(model: ModelScore, null: Tensor | None = None, train: Any = None,
                 train_cond: Tensor | None = None, *, search: bool = True) -> CureContext:
    """What the cures of ``model`` may need: its null condition, its training set ``train``
    (any :class:`~diffmem.centres.Centres` input) for the exact nearest-neighbour search,
    and the training items' conditions. A latent model's training set given as its images
    (of its ``image_shape``) is searched as latents: each image encoded by the model's VAE,
    ``z = (mean E(2 x - 1) - shift) scaling`` (:func:`~diffmem.models.attach_decoder`), in
    chunks, the latents it was trained on when it was trained on these images. ``search``
    false (no cure searches the training set) skips the encoding."""
    from diffmem.centres import Centres

    if train is None:
        return CureContext(null=null, train_cond=train_cond)
    centres = train if isinstance(train, Centres) else Centres(train)
    network = model.network or {}
    encode, shape = network.get("encode"), network.get("image_shape")
    if search and encode is not None and tuple(centres.data_shape) == tuple(shape):
        centres = Centres(torch.cat([encode(chunk).cpu() for chunk in
                                     centres.stored_chunks(LATENT_CHUNK, torch.float32)]))
    return CureContext(null=null, train=centres, train_cond=train_cond)


#: Training images encoded by a latent model's VAE at a time.
LATENT_CHUNK = 64


@dataclass(frozen=True)
class Cure:
    """One cure at one strength (``NAME=STRENGTH`` on the command line). Subclasses set
    :attr:`name`, the strength's range ``[low, high]``, the default sweep :attr:`grid`
    (``0`` is the uncured model) and override the hooks they need."""

    strength: float
    name: ClassVar[str] = "cure"
    low: ClassVar[float] = 0.0
    high: ClassVar[float] = math.inf
    grid: ClassVar[tuple[float, ...]] = ()
    #: What the strength is, for the help and the page.
    meaning: ClassVar[str] = ""
    #: Whether the cure searches the training set (:func:`cure_context` encodes a latent
    #: model's training images only then).
    searches: ClassVar[bool] = False
    #: Whether a larger strength is a stronger cure (``1``) or a weaker one (``-1``: a
    #: guidance weight, a prompt-optimization target); ``mitigate``'s search orders by it.
    direction: ClassVar[int] = 1

    def __post_init__(self) -> None:
        v = self.strength
        if not isinstance(v, int | float) or not math.isfinite(v) or not \
                self.low <= v <= self.high:
            raise fail("--cure", f"{self.name}=STRENGTH with a finite strength in "
                       f"[{self.low:g}, {self.high:g}] ({self.meaning})",
                       f"{self.name}={v}")

    def __str__(self) -> str:
        return f"{self.name}={self.strength:g}"

    def check(self, model: ModelScore, ctx: CureContext) -> None:
        """Raise ``ValueError`` naming the cure and what ``model`` (or ``ctx``) lacks."""

    def prepare(self, model: ModelScore, ctx: CureContext) -> ModelScore:
        """The model to sample, made once before sampling (default: ``model``)."""
        return model

    def condition(self, y: Tensor, t: Tensor, ctx: CureContext) -> Tensor:
        """The condition given at per-row times ``t``."""
        return y

    def guidance_weight(self, w: float | None) -> float | None:
        """The guidance weight (``None``: no guidance)."""
        return w

    def denoise(self, d: Tensor, x: Tensor, t: Tensor, ctx: CureContext,
                model: ModelScore, y: Tensor | None = None) -> Tensor:
        """The cured denoiser from the guided one ``d`` at ``x`` and per-row times ``t``
        (``y``: the rows' conditions as the model got them, ``None`` when unconditional)."""
        return d

    @property
    def changes_denoiser(self) -> bool:
        return type(self).denoise is not Cure.denoise

    @property
    def changes_condition(self) -> bool:
        return type(self).condition is not Cure.condition


def refuse(cure: Cure, needs: str, model: ModelScore) -> ValueError:
    """The error of a cure that does not apply: it names the cure and what the model lacks."""
    return fail("--cure", f"a model with {needs} for {cure.name}",
                f"{getattr(model, 'name', 'the model')}, without it")


class CuredModel(ModelScore):
    """``base`` with ``cures`` applied (module docstring): a score on the same schedule,
    sampled by every sampler."""

    def __init__(self, base: ModelScore, cures: list[Cure], ctx: CureContext) -> None:
        for cure in cures:
            cure.check(base, ctx)
        super().__init__(base.fn, base.schedule, base.data_shape, base.kind,
                         name=f"{base.name} + {' + '.join(map(str, cures))}",
                         batch=base.batch, conditional=base.conditional)
        self.base, self.cures, self.ctx = base, list(cures), ctx
        self.guidance, self.null = base.guidance, base.null
        for cure in cures:
            w = cure.guidance_weight(self.guidance)
            if w != self.guidance:
                self.guidance, self.null = w, ctx.null
        if base.network is not None:
            self.network = {**base.network, "net": self._net(base.network["net"]),
                            "post": self._post(base.network)}

    def _condition(self, y: Tensor | None, t: Tensor) -> Tensor | None:
        if y is None:
            return None
        for cure in self.cures:
            y = cure.condition(y, t, self.ctx)
        return y

    def _denoise(self, d: Tensor, x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        """The denoiser hooks in order; each gets this model (its ``fn`` the base's, its
        guidance the one the cures set)."""
        for cure in self.cures:
            d = cure.denoise(d, x, t, self.ctx, self, y)
        return d

    def _apply(self, x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        y = self._condition(y, t)
        out = super()._apply(x, t, y)
        if not any(c.changes_denoiser for c in self.cures):
            return out
        s2 = expand_as_batch(self.schedule.sigma2(t.to(torch.float64)).to(x.dtype), x)
        d = out if self.kind == "denoiser" else x + s2 * out
        d = self._denoise(d, x, t, y)
        return d if self.kind == "denoiser" else (d - x) / s2

    def _times(self, k: Any, rows: int, device: torch.device) -> Tensor:
        """The diffmem time of a network timestep ``k``, one per row."""
        t = self.schedule.time_of_timestep(torch.as_tensor(k, dtype=torch.float64))
        return t.to(device).reshape(-1).expand(rows)

    def _net(self, net: Any) -> Any:
        if not any(c.changes_condition for c in self.cures):
            return net

        def cured(x: Tensor, k: Any, y: Tensor | None = None) -> Tensor:
            return net(x, k, self._condition(y, self._times(k, x.shape[0], x.device)))

        return cured

    def _post(self, network: dict[str, Any]) -> Any:
        if not any(c.changes_denoiser for c in self.cures):
            return network.get("post")
        prediction = prediction_of(network["scheduler_config"])

        def post(out: Tensor, x: Tensor, k: Any, y: Tensor | None = None) -> Tensor:
            t = self._times(k, x.shape[0], x.device)
            if float(t.max()) > float(self.schedule.T):  # sigma = 1 of a flow scheduler
                return out
            m, sigma = self.schedule.m(t), self.schedule.sigma(t)
            xx = x.to(torch.float64)
            s = network_output_to_score(out.to(torch.float64), xx, m, sigma, prediction)
            s2 = expand_as_batch(sigma.to(xx) ** 2, xx)
            d = self._denoise(xx + s2 * s, xx, t, self._condition(y, t))
            return score_to_network_output((d - xx) / s2, xx, m, sigma,
                                           prediction).to(out.dtype)

        return post


def cure_model(model: ModelScore, cures: list[Cure], ctx: CureContext | None = None
               ) -> ModelScore:
    """``model`` with ``cures`` applied in order (``model`` itself when there are none);
    each cure first checks that it applies (``ValueError`` naming it and what is missing)."""
    if not cures:
        return model
    ctx = ctx or CureContext(null=model.null)
    ctx.T = float(model.schedule.T)
    for cure in cures:
        cure.check(model, ctx)
        model = cure.prepare(model, ctx)
    return CuredModel(model, cures, ctx)
