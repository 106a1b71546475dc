"""Does a model copy its training data? Audit any set of samples against any training set.

The package is split by job, data flowing one way:

* :mod:`diffmem.audit.inputs`: samples and training sets as streams of batches (:class:`Rows`),
  data sets named on the command line (:func:`open_input`);
* :mod:`diffmem.audit.features`: feature spaces (TorchScript modules, cached vectors);
* :mod:`diffmem.audit.search`: the nearest training items, exact or with faiss;
* :mod:`diffmem.audit.result`: :class:`AuditResult`, duplicates, quantiles, units;
* :mod:`diffmem.audit.core`: :func:`audit`, which composes them;
* :mod:`diffmem.audit.gap`: how far a model's denoiser is from the memorizing one
  (:func:`denoiser_gap`, :func:`follows_down_to`).
"""

from diffmem.audit.core import DEFAULT_DELTAS, audit
from diffmem.audit.features import embed, load_features
from diffmem.audit.gap import denoiser_gap, follows_down_to, model_denoiser
from diffmem.audit.inputs import Rows, open_input
from diffmem.audit.result import CALIBRATED_THRESHOLD, QUANTILES, UNITS, AuditResult
from diffmem.audit.search import INDEXES, nearest

__all__ = [
    "CALIBRATED_THRESHOLD", "DEFAULT_DELTAS", "INDEXES", "QUANTILES", "UNITS", "AuditResult",
    "Rows", "audit", "denoiser_gap", "embed", "follows_down_to", "load_features",
    "model_denoiser", "nearest", "open_input",
]
