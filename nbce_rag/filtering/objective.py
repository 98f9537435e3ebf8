"""What a calibration maximises: F1, F-beta, or "answer coverage" (precision at a coverage target).

The best-F1 cut treats every relevant passage as equally needed. The decoder needs one good
passage far more than it needs them all: when queries have several relevant passages the
F1-optimal cut keeps most candidates, and every irrelevant one it keeps dilutes the answer.
Two answer-oriented objectives are offered (chosen with ``objective=`` in
:meth:`MarginThreshold.calibrate` / ``nbce-rag calibrate --objective``):

``"f1"``            F1 of the kept passages (the historical default).
``"f<beta>"``       F-beta, e.g. ``"f0.5"``: beta < 1 weighs precision above recall,
                    ``F_b = (1 + b^2) TP / ((1 + b^2) TP + b^2 FN + FP) = (1 + b^2) TP / (kept + b^2 P)``.
``"coverage<c>"``   e.g. ``"coverage0.9"`` or ``"coverage90%"``: the highest precision among the cuts that still keep
                    at least one relevant passage for a share ``c`` of the *answerable* queries
                    (those with a relevant candidate); ties go to the lower threshold.

Each objective evaluates every distinct cut of the sorted scores exactly (as the F1 scan).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from nbce_rag.errors import CalibrationError

__all__ = ["DEFAULT_OBJECTIVE", "Objective", "check_objective_option", "cut_threshold", "parse_objective"]

#: The objective of the label-free recipes (prior, synthetic) and of ``nbce-rag calibrate`` when
#: none is given. Chosen on the calibration splits only (benchmarks/RESULTS_filter.md §5): the
#: objective that flags >= 90% of off-topic questions with the highest mean F1 -- F1 flagged
#: 58%, F0.5 99% at 0.03 lower mean F1. ``MarginThreshold.calibrate`` itself stays best-F1.
DEFAULT_OBJECTIVE = "f0.5"


def cut_threshold(d: np.ndarray, j: int) -> float:
    """Threshold that keeps the distinct scores d[0..j]: halfway to the next lower distinct
    score (the score itself for the last cut, or when the midpoint rounds onto the lower one)."""
    if j >= len(d) - 1:
        return float(d[j])
    hi, lo = float(d[j]), float(d[j + 1])
    mid = (hi + lo) / 2.0
    return hi if mid <= lo else mid


@dataclass(frozen=True)
class Objective:
    kind: str  #: "fbeta" | "coverage"
    beta: float = 1.0
    target: float = 0.9

    @property
    def name(self) -> str:
        if self.kind == "coverage":
            return f"coverage{self.target:g}"
        return "f1" if self.beta == 1.0 else f"f{self.beta:g}"

    def describe(self) -> str:
        if self.kind == "coverage":
            return (f"highest precision keeping a relevant passage for >= {self.target:.0%} of answerable queries")
        return "F1" if self.beta == 1.0 else f"F-beta, beta = {self.beta:g} (precision weighed {1 / self.beta ** 2:g}x)"

    def best_sorted(self, s: np.ndarray, y: np.ndarray, P: int, g: Optional[np.ndarray] = None,
                    n_answerable: Optional[int] = None) -> Tuple[float, float, float, float]:
        """Best cut of scores ``s`` sorted descending (labels ``y``; ``P`` = all positives,
        including any not in ``s``; ``g`` = query index of each score, needed for coverage).
        Returns ``(threshold, objective value, precision, recall)``; threshold = +inf and
        value = -inf when no cut is feasible."""
        if s.size == 0 or P == 0:
            return float("inf"), float("-inf") if self.kind == "coverage" else 0.0, 0.0, 0.0
        ctp = np.cumsum(y)
        last = np.flatnonzero(np.r_[s[1:] != s[:-1], True])
        d, tp, n = s[last], ctp[last], last + 1
        prec = tp / n
        if self.kind == "fbeta":
            b2 = self.beta ** 2
            val = (1.0 + b2) * tp / (n + b2 * P)
            j = int(np.argmax(val))
            return cut_threshold(d, j), float(val[j]), float(prec[j]), float(tp[j] / P)
        if g is None or n_answerable is None:
            raise CalibrationError("the coverage objective needs the query of every score (groups)")
        pos = np.flatnonzero(y > 0)
        # first position (in sorted order) of a relevant candidate, per query that has one here
        first = {}
        for i in pos:
            first.setdefault(int(g[i]), int(i))
        fp = np.sort(np.fromiter(first.values(), dtype=np.int64, count=len(first)))
        covered = np.searchsorted(fp, last, side="right")  # queries with a relevant kept at cut j
        ok = np.flatnonzero(covered >= self.target * n_answerable - 1e-9)
        if ok.size == 0:
            return float("inf"), float("-inf"), 0.0, 0.0
        best = prec[ok].max()
        j = int(ok[np.flatnonzero(prec[ok] >= best - 1e-12)[-1]])  # ties: the lowest threshold
        return cut_threshold(d, j), float(prec[j]), float(prec[j]), float(tp[j] / P)


_F = re.compile(r"^f(?:beta)?[-_:=]?(\d+(?:\.\d+)?)$")
_C = re.compile(r"^coverage[-_:=@]?(\d*(?:\.\d+)?)(%?)$")


def check_objective_option(kwargs: dict) -> None:
    """Parse ``kwargs["objective"]`` in place (to its canonical name) when one is given, so that a
    calibration entry point (from qrels, a prior, synthetic questions) rejects a bad objective
    before it searches or generates anything."""
    if kwargs.get("objective"):
        kwargs["objective"] = parse_objective(kwargs["objective"]).name


def parse_objective(obj: "str | Objective | None") -> Objective:
    """``"f1"``, ``"f0.5"`` / ``"fbeta0.5"``, ``"coverage0.9"`` / ``"coverage90%"`` / ``"coverage"``
    (0.9); ``None``: :data:`DEFAULT_OBJECTIVE`. A coverage target is a share in (0, 1] or a
    percentage written with ``%``; a bare number above 1 is an error, never rescaled."""
    if obj is None:
        obj = DEFAULT_OBJECTIVE
    if isinstance(obj, Objective):
        return obj
    s = str(obj).strip().lower()
    m = _F.match(s)
    if m:
        b = float(m.group(1))
        if not b > 0:
            raise CalibrationError(f"objective {obj!r}: beta must be > 0")
        return Objective("fbeta", b)
    m = _C.match(s)
    if m:
        if m.group(2) and not m.group(1):
            raise CalibrationError(f"objective {obj!r}: give the percentage, e.g. 'coverage90%'")
        t = float(m.group(1)) if m.group(1) else 0.9
        if m.group(2):
            if not 0 < t <= 100:
                raise CalibrationError(f"objective {obj!r}: a coverage percentage must be in (0%, 100%]")
            t /= 100.0
        elif not 0 < t <= 1:
            raise CalibrationError(f"objective {obj!r}: the coverage target must be a share in (0, 1] "
                                   f"(e.g. 'coverage0.9') or a percentage written with % (e.g. 'coverage90%')")
        return Objective("coverage", target=t)
    raise CalibrationError(f"unknown objective {obj!r}: use 'f1', 'f<beta>' (e.g. 'f0.5') or "
                           "'coverage<share>' (e.g. 'coverage0.9')")
