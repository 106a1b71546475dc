"""What a score is, and the optional parts a sampler may use.

A score is any callable ``score(x, t) -> Tensor`` (``score(x, t, y)`` when conditional) with
``x`` of shape ``(batch, *data_shape)`` and ``t`` a float or a ``(batch,)`` tensor, returning
``grad_x log p_t(x)`` in the shape of ``x``. Scores may also carry:

* ``schedule`` (:class:`HasSchedule`): the forward process they belong to; samplers check
  that it is the one they integrate;
* ``sigma2_score(x, t)`` (:class:`HasSigma2Score`): ``sigma(t)^2 s(x, t)``, finite as
  ``sigma -> 0`` (the transformed-time sampler uses it);
* ``denoiser(x, t)`` (:class:`HasDenoiser`): Tweedie's ``D(x, t) = x + sigma(t)^2 s(x, t)``
  (the EDM sampler uses it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from diffmem._checks import fail
from diffmem.schedules import Schedule, TimeLike

Score = Callable[..., Tensor]


@runtime_checkable
class HasSchedule(Protocol):
    """A score that belongs to one forward process."""

    schedule: Schedule


@runtime_checkable
class HasSigma2Score(Protocol):
    """A score that also evaluates ``sigma(t)^2 s(x, t)`` (finite at every ``t``)."""

    def sigma2_score(self, x: Tensor, t: TimeLike, *args: Any) -> Tensor: ...


@runtime_checkable
class HasDenoiser(Protocol):
    """A score that also evaluates the denoiser ``D(x, t) = x + sigma(t)^2 s(x, t)``."""

    def denoiser(self, x: Tensor, t: TimeLike, *args: Any) -> Tensor: ...


def check_schedule(schedule: Schedule, score: object, name: str = "schedule") -> None:
    """Raise ``ValueError`` when ``score`` carries a schedule other than ``schedule``: a
    score sampled on another forward process silently follows the wrong dynamics."""
    if not isinstance(schedule, Schedule):
        raise fail(name, "a diffmem.schedules.Schedule", type(schedule).__name__)
    if isinstance(score, HasSchedule) and score.schedule != schedule:
        raise fail(name, f"the score's own schedule {score.schedule!r}", repr(schedule))
