"""Cures for a model that copies: the paper's Tikhonov regularization applied at sampling
time and the field's mitigations, as wrappers of any loaded model (one cure a module), and
``diffmem mitigate``'s sweep over them (:mod:`diffmem.mitigate.sweep`).

* :class:`~diffmem.mitigate.tikhonov.Tikhonov` (``tikhonov``): Baptista et al.'s Tikhonov
  score ``(D - x) / (sigma^2 + lambda)`` on the model's denoiser;
* :class:`~diffmem.mitigate.guidance.Guidance` (``guidance``): the guidance weight;
* :class:`~diffmem.mitigate.guidance.GuidanceSchedule` (``guidance-schedule``): no condition
  for the first part of sampling (Jain et al., CVPR 2025, static);
* :class:`~diffmem.mitigate.nearest.NearestGuidance` (``nn-guidance``): the prediction kept
  away from its nearest training item (AMG's dissimilarity guidance, exact search);
* :class:`~diffmem.mitigate.nearest.AntiMemorization` (``amg``): the condition's pull taken
  away, and the copied item's condition guided against, while the prediction reproduces a
  training item (AMG's despecification and caption-negative guidances);
* :class:`~diffmem.mitigate.prompt.PromptOptimization` (``prompt-opt``): each prompt's
  embedding moved until its first-step text-conditional noise prediction is typical (Wen et
  al., ICLR 2024);
* :class:`~diffmem.mitigate.prompt.RandomTokens` (``random-tokens``): random words added to
  each prompt, and :class:`~diffmem.mitigate.prompt.EmbeddingNoise` (``embedding-noise``):
  Gaussian noise on each prompt's embedding (Somepalli et al., NeurIPS 2023);
* :class:`~diffmem.mitigate.attention.AttentionRescale` (``attention-rescale``): the start
  token's cross-attention logits scaled up and the summary tokens masked (Ren et al., ECCV
  2024).

``NAME=STRENGTH`` (:func:`parse_cure`) names one at one strength; :func:`cure_model` applies
a list of them to a model.
"""

from __future__ import annotations

from diffmem._checks import fail
from diffmem.mitigate.attention import AttentionRescale
from diffmem.mitigate.base import Cure, CureContext, CuredModel, cure_context, cure_model
from diffmem.mitigate.guidance import Guidance, GuidanceSchedule
from diffmem.mitigate.nearest import AntiMemorization, NearestGuidance
from diffmem.mitigate.prompt import EmbeddingNoise, PromptOptimization, RandomTokens
from diffmem.mitigate.tikhonov import Tikhonov

#: The cures, by name.
CURES: dict[str, type[Cure]] = {c.name: c for c in (Tikhonov, Guidance, GuidanceSchedule,
                                                     NearestGuidance, AntiMemorization,
                                                     PromptOptimization,
                                                     RandomTokens, EmbeddingNoise,
                                                     AttentionRescale)}


def parse_cure(text: str) -> Cure:
    """``NAME=STRENGTH`` as a cure; ``ValueError`` naming ``--cure`` on an unknown name, a
    strength that is not a number, NaN or outside the cure's range."""
    name, sep, value = str(text).partition("=")
    name = name.strip()
    if name not in CURES:
        raise fail("--cure", f"NAME=STRENGTH with NAME one of {tuple(CURES)}", repr(text))
    try:
        strength = float(value) if sep else float("nan")
    except ValueError as err:
        raise fail("--cure", f"{name}=STRENGTH with a number ({CURES[name].meaning})",
                   repr(text)) from err
    return CURES[name](strength)


__all__ = ["CURES", "AntiMemorization", "AttentionRescale", "Cure", "CureContext", "CuredModel",
           "EmbeddingNoise", "Guidance", "GuidanceSchedule", "NearestGuidance",
           "PromptOptimization", "RandomTokens", "Tikhonov", "cure_context", "cure_model",
           "parse_cure"]
