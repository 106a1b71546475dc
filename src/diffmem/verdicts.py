"""Verdicts a user can act on: which conditions (prompts, samples) a model memorizes, by a
stated rule, not only a ranking whose scale moves from model to model.

The rules, each the same on every model:

* **consistency** (conditions, no reference): the sequential confirmation of
  :mod:`diffmem.confirm`. A condition is memorized when its confirmation settled it below the
  line: a bootstrap interval for its ``consistency_ratio`` (the median distance between two
  of its generations over the null condition's) lay wholly below
  :data:`~diffmem.confirm.LINE`. A condition whose interval still spans the line at the cap,
  or that the screen ranked below every confirmed one (no ratio), is not memorized. A
  condition whose ratio is at least the line is called memorized with probability at most
  ``alpha`` (:mod:`diffmem.confirm`).
* **reference** (``detect --reference``): a set known not to be memorized (prompts such as
  COCO-style captions, whole classes, held-out samples) is scored with the same measure and
  the threshold is set on it at the false-positive rate ``fpr`` (:func:`threshold_at_fpr`:
  a new entry drawn like the reference is flagged with probability at most ``fpr``, given
  ``1 / fpr - 1`` reference entries or more). For confirmed conditions the measure is
  ``consistency_ratio``, lower meaning memorized: an entry is memorized when its ratio is
  below that threshold *and* the consistency rule calls it memorized, so a reference can
  only remove verdicts (a reference of very varied prompts must not make a prompt whose
  generations are as varied as the null's memorized); otherwise (samples, or conditions
  screened only) an entry is memorized when its primary measure exceeds the threshold.
* **point** (samples, no reference): ``flipd > 1 - 1 / (2 d)``, the estimated local
  intrinsic dimension at the sample is below one half (:data:`diffmem.detect.LID_POINT`):
  the model maps the sample's neighbourhood to a point. Dimensionless, like the ratio.

With labels, :func:`rates` gives the verdicts' true- and false-positive rates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from diffmem._checks import fail

#: Default false-positive rate of the reference rule.
FPR = 0.05


def threshold_at_fpr(reference: Sequence[float | None], fpr: float = FPR,
                     below: bool = False) -> float:
    """The threshold that flags a new entry drawn like the reference with probability at
    most ``fpr``: of the reference's ``m`` finite values sorted ascending, the ``(m - 1 -
    k)``-th (from 0; flagged: ``> t``), or with ``below`` the ``k``-th (flagged: ``< t``),
    ``k = max(floor(fpr (m + 1)) - 1, 0)``. A new value exchangeable with the reference
    passes the ``k + 1`` most extreme of ``m + 1`` with probability ``(k + 1) / (m + 1) <=
    fpr`` (the split-conformal bound, :func:`fpr_bound`); below ``m = 1 / fpr - 1`` values no
    threshold reaches ``fpr`` and the most extreme value is taken (bound ``1 / (m + 1)``)."""
    values = sorted(float(v) for v in reference if v is not None and math.isfinite(v))
    if not values:
        raise fail("--reference", "at least one reference entry with a finite score",
                   "none")
    k = _rank(len(values), fpr)
    return values[k] if below else values[len(values) - 1 - k]


def check_fpr(fpr: float) -> float:
    """``fpr`` if it is a false-positive rate in ``[0, 1)``, else the ``--fpr`` error."""
    if not 0 <= fpr < 1:
        raise fail("--fpr", "a false-positive rate in [0, 1)", fpr)
    return fpr


def _rank(m: int, fpr: float) -> int:
    """``k = max(floor(fpr (m + 1)) - 1, 0)``: how many reference values lie beyond the
    threshold of :func:`threshold_at_fpr`."""
    check_fpr(fpr)
    return max(math.floor(fpr * (m + 1)) - 1, 0)


def reference_needed(fpr: float) -> int:
    """The fewest reference entries whose :func:`fpr_bound` reaches ``fpr > 0`` (19 at
    0.05)."""
    if not 0 < fpr < 1:
        raise fail("--fpr", "a false-positive rate in (0, 1)", fpr)
    m = max(math.ceil(1 / fpr) - 2, 1)
    while fpr_bound(m, fpr) > fpr:
        m += 1
    return m


def fpr_bound(m: int, fpr: float) -> float:
    """The false-positive rate :func:`threshold_at_fpr` guarantees on a new entry drawn like
    its ``m`` reference values: ``(k + 1) / (m + 1)``."""
    return (_rank(m, fpr) + 1) / (m + 1)


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
    result on the reference set, same measures) is given (on ``consistency_ratio`` when both
    carry it), else by the point rule (samples) or the consistency rule (conditions).
    Returns the rule's description, stored as ``result.verdict`` (with the rates against the
    entries' labels where they have them); ``None`` when no rule applies (samples without a
    reference), said in ``result.verdict``."""
    from diffmem.confirm import LINE
    from diffmem.detect import LID_POINT
    primary = result.primary
    line = float(result.settings.get("line", LINE))
    ratios = None if reference is None else \
        [e.get("consistency_ratio") for e in reference.entries]
    confirmed = "consistency" in result.settings.get("measures", ()) or \
        any("consistency_ratio" in e for e in result.entries)
    if ratios is not None and any(r is not None for r in ratios) and confirmed:
        at = threshold_at_fpr(ratios, fpr, below=True)
        threshold = min(at, line)
        verdict: dict[str, Any] = _by_ratio(result, threshold, line)
        finite = [r for r in ratios if r is not None and math.isfinite(r)]
        why = (f"the value a new entry like the {len(finite)} reference entries falls below "
               f"with probability at most {fpr_bound(len(finite), fpr):.3g}" if at <= threshold
               else f"the consistency rule's line (the reference's threshold, {at:.4g}, is "
               "above it)")
        verdict |= {
            "rule": f"consistency_ratio below {threshold:.4g}, {why}, and settled below the "
                    f"line {line:g} by the confirmation (conditions the screen ranked below "
                    "every confirmed one: not memorized)",
            "kind": "reference", "fpr_target": fpr, "n_reference": len(finite),
            "fpr_bound": fpr_bound(len(finite), fpr), "reference_threshold": at,
            "reference_fpr": sum(r < threshold for r in finite) / len(finite)}
    elif reference is not None:
        ref = [e.get(primary) for e in reference.entries]
        threshold = threshold_at_fpr(ref, fpr)
        for e in result.entries:
            v = e.get(primary)
            e["memorized"] = None if v is None else bool(v > threshold)
        finite = [v for v in ref if v is not None and math.isfinite(v)]
        verdict = {
            "rule": f"{primary} above {threshold:.4g}, which a new entry like the "
                    f"{len(finite)} reference entries exceeds with probability at most "
                    f"{fpr_bound(len(finite), fpr):.3g}",
            "kind": "reference", "measure": primary, "threshold": threshold,
            "fpr_target": fpr, "n_reference": len(finite),
            "fpr_bound": fpr_bound(len(finite), fpr),
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
        alpha = result.settings.get("alpha")
        verdict = _by_ratio(result, line, line)
        verdict |= {"rule": f"consistency_ratio settled below {line:g}: an interval for the "
                            "median distance between two of the condition's generations over "
                            f"the null condition's lies wholly below {line:g}"
                            + (f" (error at most {alpha:g})" if alpha else "")
                            + " (in doubt at the cap, or ranked by the screen below every "
                            "confirmed condition: not memorized)", "kind": "consistency"}
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


def _by_ratio(result: Any, threshold: float, line: float) -> dict[str, Any]:
    """``entry['memorized']``: the confirmation settled the entry below ``line`` (an entry
    recorded without its stop: its ratio below ``line``) and its ratio is below
    ``threshold``; ``False`` for an entry without a ratio (not confirmed). The verdict's
    measure, threshold and counts."""
    for e in result.entries:
        r = e.get("consistency_ratio")
        settled = e.get("stopped", "below" if r is not None and r < line else None)
        e["memorized"] = r is not None and settled == "below" and r < threshold
    stops = [e.get("stopped") for e in result.entries if e.get("same_as") is None]
    return {"measure": "consistency_ratio", "threshold": threshold, "line": line,
            "confirmed": sum("consistency_ratio" in e for e in result.entries),
            "in_doubt": stops.count("cap")}


def held_out(result: Any, clean: Sequence[int], fpr: float = FPR) -> list[bool | None]:
    """Each entry of ``result`` judged by the reference rule against the entries ``clean``
    (indices into ``result.entries``, known not memorized) other than itself: what ``detect
    --reference`` says of a condition given a reference like the clean ones (leave one
    out). ``result`` itself is left as it was."""
    flags = []
    for j, entry in enumerate(result.entries):
        one = replace(result, entries=[dict(entry)], verdict=None)
        judge(one, replace(result, entries=[result.entries[i] for i in clean if i != j]), fpr)
        flags.append(one.entries[0]["memorized"])
    return flags


def bound_note(verdict: dict[str, Any]) -> str | None:
    """A sentence when the reference was too small to reach ``--fpr`` (else ``None``)."""
    bound, target = verdict.get("fpr_bound"), verdict.get("fpr_target")
    if bound is None or target is None or bound <= target:
        return None
    more = f": {reference_needed(target)} or more reach it" if target > 0 else ""
    return (f"{verdict['n_reference']} reference entries bound the false-positive rate at "
            f"{bound:.3g}, not --fpr {target:g}{more}")
