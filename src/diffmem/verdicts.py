"""Verdicts a user can act on: which conditions (prompts, samples) a model memorizes, by a
stated rule, not only a ranking whose scale moves from model to model.

Two rules, each the same on every model:

* **reference** (``detect --reference``): a set known not to be memorized (prompts such as
  COCO-style captions, whole classes, held-out samples) is scored with the same measure; the
  threshold is the smallest value that at most ``fpr`` of the reference exceeds
  (:func:`threshold_at_fpr`), and an entry is memorized when its primary measure exceeds
  it. The false-positive rate is ``fpr`` by construction, on the reference's population.
* **point** (samples, no reference): ``flipd > 1 - 1 / (2 d)``, the estimated local
  intrinsic dimension at the sample is below one half (:data:`diffmem.detect.LID_POINT`):
  the model maps the sample's neighbourhood to a point. Dimensionless, like the rule below.
* **consistency** (conditions, no reference): the confirmation generations of
  :func:`diffmem.detect.detect`: a condition is memorized when its generations are much
  closer to one another than the null condition's are, ``consistency_ratio <
  CONSISTENCY_RATIO`` (dimensionless, so the same threshold holds on every model); a
  condition the screen ranked below every confirmed one is not memorized.

With labels, :func:`rates` gives the verdicts' true- and false-positive rates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from diffmem._checks import fail

#: Default false-positive rate of the reference rule.
FPR = 0.05


def threshold_at_fpr(reference: Sequence[float], fpr: float = FPR) -> float:
    """The smallest threshold ``t`` among the reference's values that at most ``fpr`` of
    them exceed (``> t``): the ``(m - 1 - floor(fpr m))``-th of the ``m`` values sorted
    ascending."""
    values = sorted(float(v) for v in reference if v is not None and math.isfinite(v))
    if not values:
        raise fail("--reference", "at least one reference entry with a finite score",
                   "none")
    if not 0 <= fpr < 1:
        raise fail("--fpr", "a false-positive rate in [0, 1)", fpr)
    return values[len(values) - 1 - math.floor(fpr * len(values))]


def rates(flags: Sequence[bool | None], truth: Sequence[int | None]) -> dict[str, Any]:
    """True- and false-positive rates of verdicts ``flags`` against ``truth`` (1 memorized,
    0 not; ``None`` or -1 entries are left out)."""
    pairs = [(bool(f), int(t)) for f, t in zip(flags, truth, strict=True)
             if f is not None and t is not None and t in (0, 1)]
    pos = [f for f, t in pairs if t == 1]
    neg = [f for f, t in pairs if t == 0]
    return {"tpr": sum(pos) / len(pos) if pos else None,
            "fpr": sum(neg) / len(neg) if neg else None,
            "n_positive": len(pos), "n_negative": len(neg)}


def judge(result: Any, reference: Any = None, fpr: float = FPR) -> dict[str, Any] | None:
    """Set ``entry['memorized']`` on every entry of ``result`` (a
    :class:`~diffmem.detect.DetectResult`) by the reference rule when ``reference`` (a
    result on the reference set, same measures) is given, else (conditions) by the
    consistency rule. Returns the rule's description, stored as ``result.verdict`` (with the
    rates against the entries' labels where they have them); ``None`` when no rule applies
    (samples without a reference), said in ``result.verdict``."""
    from diffmem.detect import CONSISTENCY_RATIO, LID_POINT
    primary = result.primary
    if reference is not None:
        ref = [e.get(primary) for e in reference.entries]
        threshold = threshold_at_fpr(ref, fpr)
        for e in result.entries:
            v = e.get(primary)
            e["memorized"] = None if v is None else bool(v > threshold)
        finite = [v for v in ref if v is not None]
        verdict: dict[str, Any] = {
            "rule": f"{primary} above {threshold:.4g}, the value that at most {fpr:g} of "
                    f"the {len(finite)} reference entries exceed",
            "kind": "reference", "measure": primary, "threshold": threshold,
            "fpr_target": fpr, "n_reference": len(finite),
            "reference_fpr": sum(v > threshold for v in finite) / len(finite)}
    elif result.kind == "samples" and any(e.get("flipd") is not None for e in result.entries):
        threshold = 1 - LID_POINT / result.settings["dim"]
        for e in result.entries:
            e["memorized"] = None if e.get("flipd") is None else bool(e["flipd"] > threshold)
        verdict = {"rule": f"flipd above {threshold:.6g}: the estimated local intrinsic "
                           f"dimension at the sample, d (1 - flipd), is below {LID_POINT:g} (the "
                           "model maps its neighbourhood to a point)",
                   "kind": "point", "measure": "flipd", "threshold": threshold}
    elif any("consistency_ratio" in e for e in result.entries):
        for e in result.entries:
            r = e.get("consistency_ratio")
            e["memorized"] = r is not None and r < CONSISTENCY_RATIO
        verdict = {"rule": f"consistency_ratio below {CONSISTENCY_RATIO:g}: the condition's "
                           "generations are more than twice as close to one another as the "
                           "null condition's (conditions the screen ranked below every "
                           "confirmed one: not memorized)",
                   "kind": "consistency", "measure": "consistency_ratio",
                   "threshold": CONSISTENCY_RATIO,
                   "confirmed": sum("consistency_ratio" in e for e in result.entries)}
    else:
        result.verdict = {"rule": None, "kind": None, "why": (
            "verdicts need --reference, or the consistency measure (conditions) or flipd "
            "(samples)")}
        return None
    verdict["n_memorized"] = sum(bool(e.get("memorized")) for e in result.entries)
    if any(e.get("label") in (0, 1) for e in result.entries):
        verdict["against_labels"] = rates([e.get("memorized") for e in result.entries],
                                          [e.get("label") for e in result.entries])
    result.verdict = verdict
    return verdict
