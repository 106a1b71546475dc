"""Scores: closed-form minimizers of denoising score matching and their regularizations.

* :mod:`diffmem.scores.base`: what a score is (:data:`Score`) and the optional parts
  samplers use (:class:`HasSchedule`, :class:`HasSigma2Score`, :class:`HasDenoiser`);
* :mod:`diffmem.scores.empirical`: the empirical Gaussian mixture and its Tikhonov and
  threshold regularizations, all through the one mixture kernel;
* :mod:`diffmem.scores.conditional`: conditional scores ``s(x, t, y)``;
* :mod:`diffmem.scores.smoothed`: the kernel density estimate's score, the smoothed
  (input-averaged) empirical score and the Gaussian (linear) score.
"""

from diffmem.scores.base import (
    HasDenoiser,
    HasSchedule,
    HasSigma2Score,
    Score,
    check_schedule,
)
from diffmem.scores.conditional import CONDITIONAL_MODES, ConditionalEmpiricalScore
from diffmem.scores.empirical import (
    ClosedFormScore,
    EmpiricalScore,
    ThresholdScore,
    TikhonovScore,
)
from diffmem.scores.smoothed import GaussianScore, KDEScore, SmoothedScore

__all__ = [
    "CONDITIONAL_MODES",
    "ClosedFormScore",
    "ConditionalEmpiricalScore",
    "EmpiricalScore",
    "GaussianScore",
    "HasDenoiser",
    "HasSchedule",
    "HasSigma2Score",
    "KDEScore",
    "Score",
    "SmoothedScore",
    "ThresholdScore",
    "TikhonovScore",
    "check_schedule",
]
