"""Calibration maths of the margin filter: pure NumPy, the rule and how each number is derived.

:class:`~nbce_rag.filtering.threshold.MarginThreshold` (the filter, its persistence and report) is
built from :func:`calibrate_rule`; everything here takes arrays and returns numbers.

Scores are the canonical cosine of the CoSENT encoder, ``s = cos(E(q), E(p))``.

Calibration (:func:`calibrate_rule`), from cosine scores ``s``, 0/1 labels ``y``
and the query id of every score (the candidates of a query, e.g. its top-k; ``s_max(q)`` is
the best candidate's score of query ``q``):

* global ``t*`` -- the best-F1 threshold, found by an exact scan of the sorted scores (every
  distinct cut is evaluated, ties are never split; a threshold sits halfway between the two
  adjacent distinct scores that define its cut, as in sentence-transformers'
  ``find_best_f1_and_threshold``). Decisions are ``keep iff s >= t``.
* the uncertainty band ``[lower, upper]`` -- ``upper`` = the lowest threshold whose precision
  is >= ``precision_target`` (relevant with confidence above it), ``lower`` = the highest
  threshold whose recall is >= ``recall_target`` (irrelevant with confidence below it);
  widened to contain ``t*`` and ``threshold``. When no cut reaches the precision target,
  ``upper`` lies above every score and a warning says so.
* ``margin`` ``m`` -- the relative margin to the best candidate of the same query. Triangle
  inequality argument (Su, "From the triangle inequality to Margin Softmax", kexue.fm 8656):
  the relevant passages of one query lie in a ball around its intent, so their scores lie
  within a "class diameter" of each other, and a candidate further than that below the best
  one is outside the ball of whatever the best one is about. The diameter is measured as
  the within-query spread of relevant scores, ``D = { s_top_rel(q) - s_rel(q, j) }`` over the
  non-top relevant candidates of queries with >= 2 relevant candidates. The candidates for
  ``m`` are ``{no margin, 0} U { Q_alpha(D) : alpha in margin_quantiles }``; for each, the
  threshold ``tau(m)`` is the exact best-F1 scan over the candidates that pass the margin
  (recall still counts every relevant one), and the pair with the highest F1 is kept::

      (m, tau) = argmax_{m in M} F1( s >= tau(m)  and  s >= s_max - m )

  ``m = 0`` keeps the best candidate only: the data's answer when queries have a single
  relevant passage (SciFact); with several relevant passages per query a larger quantile
  wins.
* bootstrap over queries (``n_bootstrap`` resamples of whole queries, the whole selection
  re-run on each): percentile confidence intervals of ``threshold``, ``t*``, ``lower``,
  ``upper``, ``margin`` and of the precision/recall/F1 of the calibrated rule.

The filter rule, for one query's candidates ``s_1..s_k`` with ``s_max = max_j s_j``::

    keep i  iff  s_i >= threshold  and  s_i >= s_max - margin        (no margin: m = +inf)

``threshold`` equals ``t*`` when no margin is used; the band does not change the decision
(it labels hits ``confident`` / ``uncertain``). Why this rule and not another (``t*`` alone,
the margin alone, a fixed-quantile margin, the band edges as the decision, ...): the
cross-validated comparison on SciFact train in ``benchmarks/RESULTS_filter.md``. How the rule
is applied, saved and checked against the encoder: :mod:`nbce_rag.filtering.threshold`.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from nbce_rag.errors import CalibrationError
from nbce_rag.filtering.objective import cut_threshold, parse_objective

#: Quantiles of the within-query relevant spread tried as the margin by ``margin="auto"``.
DEFAULT_MARGIN_QUANTILES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

__all__ = [
    "DEFAULT_MARGIN_QUANTILES",
    "CalibrationWarning",
    "calibrate_rule",
    "best_f1_threshold",
    "precision_target_threshold",
    "recall_target_threshold",
    "within_query_spreads",
    "margin_from_spreads",
    "apply_rule",
    "prf",
]


class CalibrationWarning(UserWarning):
    """Calibration data is usable but thin (few queries, no margin, unreachable target)."""


def calibrate_rule(
    scores: Any,
    labels: Any,
    groups: Any = None,
    *,
    margin: Union[str, float, None] = "auto",
    margin_quantiles: Sequence[float] = DEFAULT_MARGIN_QUANTILES,
    precision_target: float = 0.9,
    recall_target: float = 0.9,
    n_bootstrap: int = 1000,
    ci_level: float = 0.95,
    min_positives: int = 10,
    min_negatives: int = 10,
    min_margin_queries: int = 5,
    seed: int = 0,
    objective: Any = None,
) -> Dict[str, Any]:
    """Every calibrated number of the rule (see the module docstring), as a dict:
    ``threshold``, ``lower``, ``upper``, ``margin``, ``ci`` (bootstrap intervals), ``stats``
    (counts, targets, in-sample metrics) and ``data`` (the validated arrays). The arguments are
    those of :meth:`MarginThreshold.calibrate <nbce_rag.filtering.threshold.MarginThreshold.calibrate>`.
    """

    obj = parse_objective("f1" if objective is None else objective)  # None: best F1
    obj_arg = None if (obj.kind == "fbeta" and obj.beta == 1.0) else obj
    s, y = _validate(scores, labels, min_positives, min_negatives)
    for name, v in (("precision_target", precision_target), ("recall_target", recall_target),
                    ("ci_level", ci_level)):
        if not 0.0 < float(v) <= 1.0:
            raise CalibrationError(f"{name} must be in (0, 1], got {v}")
    qs = [float(q) for q in margin_quantiles]
    if any(not 0.0 <= q <= 1.0 for q in qs):
        raise CalibrationError(f"margin_quantiles must lie in [0, 1], got {list(margin_quantiles)}")
    if isinstance(margin, str):
        if margin != "auto":
            raise CalibrationError(f"margin must be 'auto', a number >= 0 or None; got {margin!r}")
    elif margin is not None:
        margin = float(margin)
        if not (margin >= 0.0 and math.isfinite(margin)):
            raise CalibrationError(f"a fixed margin must be a finite number >= 0; got {margin}")
    gi, G = _group_index(groups, s.size)
    if groups is None:
        _warn("no query ids (groups) given: the relative margin is disabled and the bootstrap "
              "resamples single scores; pass the query id of every score to calibrate the margin")

    mode = margin if groups is not None else None
    est = _estimate(s, y, gi, G, precision_target, recall_target, mode, qs,
                    min_margin_queries, warn=True, objective=obj_arg)
    n_pos = int(y.sum())
    stats: Dict[str, Any] = {
        "n_scores": int(s.size),
        "n_positives": n_pos,
        "n_negatives": int(s.size - n_pos),
        "n_queries": int(G) if groups is not None else None,
        "n_queries_with_positive": int(np.unique(gi[y > 0]).size) if groups is not None else None,
        "n_margin_spreads": est["n_spreads"],
        "precision_target": float(precision_target),
        "recall_target": float(recall_target),
        "margin_mode": "auto" if margin == "auto" else ("none" if mode is None else "fixed"),
        "objective": obj.name,
        "margin_quantile": est["quantile"],  # alpha of the chosen margin (None: 0 or fixed/none)
        "margin_candidates": est["candidates"],
        "global_threshold": est["t_star"],  # t* of the plain scan (no margin)
        "precision_at_upper_reached": est["upper_reached"],
        "ci_level": float(ci_level),
        "n_bootstrap": int(n_bootstrap),
        "seed": int(seed),
        "score_range": [float(s.min()), float(s.max())],
        # in-sample quality of the global t* alone and of the full rule
        "global_threshold_metrics": dict(zip(("precision", "recall", "f1"), est["prf_t"])),
        "rule": dict(zip(("precision", "recall", "f1"), est["prf_rule"])),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }

    ci: Dict[str, Optional[Tuple[float, float]]] = {}
    if n_bootstrap > 0:
        if G < 20:
            _warn(f"only {G} queries to bootstrap over: the confidence intervals are unreliable; "
                  "calibrate on 50+ labelled queries")
        rng = np.random.default_rng(seed)
        members = _members(gi, G)
        keys = ("threshold", "global_threshold", "lower", "upper", "margin", "precision", "recall", "f1")
        boot: Dict[str, List[Any]] = {k: [] for k in keys}
        for _ in range(int(n_bootstrap)):
            pick = rng.integers(0, G, size=G)
            idx = np.concatenate([members[g] for g in pick])
            # relabel groups so duplicated queries stay distinct resampled queries
            new_gi = np.repeat(np.arange(G), [members[g].size for g in pick])
            ys = y[idx]
            if ys.sum() == 0 or ys.sum() == ys.size:
                continue
            b = _estimate(s[idx], ys, new_gi, G, precision_target, recall_target, mode, qs,
                          min_margin_queries, warn=False, objective=obj_arg)
            boot["threshold"].append(b["threshold"])
            boot["global_threshold"].append(b["t_star"])
            boot["lower"].append(b["lower"])
            boot["upper"].append(b["upper"])
            boot["margin"].append(b["margin"])
            # in-sample metrics of the *calibrated* rule on the resample
            gmax = _group_max(s[idx], new_gi, G)[new_gi]
            keep = apply_rule(s[idx], gmax, est["threshold"], est["margin"])
            p, r, f = prf(keep, ys)
            boot["precision"].append(p)
            boot["recall"].append(r)
            boot["f1"].append(f)
        # resamples that chose "no margin" are left out of the margin's interval (it covers
        # the finite choices); margin_none_fraction says how often none was chosen
        ci = {k: _ci(np.asarray([np.inf if v is None else v for v in boot[k]], dtype=np.float64),
                     ci_level) for k in keys}
        nb = max(len(boot["margin"]), 1)
        stats["n_bootstrap_used"] = len(boot["margin"])
        stats["margin_none_fraction"] = sum(v is None for v in boot["margin"]) / nb
        stats["margin_zero_fraction"] = sum(v == 0.0 for v in boot["margin"]) / nb
    return {"threshold": est["threshold"], "lower": est["lower"], "upper": est["upper"], "margin": est["margin"],
            "ci": ci, "stats": stats, "data": {"scores": s, "labels": y, "groups": gi}}


def _cuts(scores: np.ndarray, labels: np.ndarray):
    """Sort descending and return, for every distinct-score cut "keep s >= d_j":
    the distinct scores ``d`` (descending), true positives ``tp`` and kept count ``n`` at each cut."""
    order = np.argsort(-scores, kind="mergesort")
    s = scores[order]
    y = labels[order].astype(np.int64)
    ctp = np.cumsum(y)
    # last index of each run of equal scores (ties are kept or dropped together)
    last = np.flatnonzero(np.r_[s[1:] != s[:-1], True])
    return s[last], ctp[last], last + 1


def _best_f1_sorted(s: np.ndarray, y: np.ndarray, P: int) -> Tuple[float, float, float, float]:
    """best_f1_threshold on scores already sorted descending (labels int, P = all positives)."""
    if s.size == 0 or P == 0:
        return float("inf"), 0.0, 0.0, 0.0
    ctp = np.cumsum(y)
    last = np.flatnonzero(np.r_[s[1:] != s[:-1], True])
    d, tp, n = s[last], ctp[last], last + 1
    f1 = 2.0 * tp / (n + P)
    j = int(np.argmax(f1))
    return cut_threshold(d, j), float(f1[j]), float(tp[j] / n[j]), float(tp[j] / P)


def _above_all(d: np.ndarray) -> float:
    """A threshold that keeps nothing."""
    return float(np.nextafter(d[0], np.inf))


def _as_arrays(scores: Any, labels: Any) -> Tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel()
    if s.shape != y.shape:
        raise CalibrationError(f"scores and labels differ in length ({s.size} vs {y.size})")
    return s, (y > 0).astype(np.int8)


def best_f1_threshold(scores: Any, labels: Any, eligible: Any = None) -> Tuple[float, float, float, float]:
    """Exact best-F1 threshold by a scan of the sorted scores.

    Returns ``(threshold, f1, precision, recall)`` for the rule ``keep iff s >= threshold``.
    Every distinct cut is evaluated (O(n log n)); among equal F1 the highest threshold wins.
    With no positive at all, returns a threshold above every score and F1 = 0.

    ``eligible`` (a boolean mask) restricts the kept set to ``eligible & (s >= threshold)``
    (e.g. the candidates that pass the margin) while recall still counts *every* positive:
    the exact best threshold of a rule that also has another condition.
    """
    s, y = _as_arrays(scores, labels)
    if s.size == 0:
        raise CalibrationError("no scores given")
    P = int(y.sum())
    if eligible is not None:
        e = np.asarray(eligible, dtype=bool).ravel()
        s, y = s[e], y[e]
        if s.size == 0:
            return float("inf"), 0.0, 0.0, 0.0
    d, tp, n = _cuts(s, y)
    if P == 0:
        return _above_all(d), 0.0, 0.0, 0.0
    f1 = 2.0 * tp / (n + P)  # 2TP / (2TP + FP + FN) with FP = n - TP, FN = P - TP
    j = int(np.argmax(f1))
    return cut_threshold(d, j), float(f1[j]), float(tp[j] / n[j]), float(tp[j] / P)


def precision_target_threshold(scores: Any, labels: Any, target: float) -> Optional[float]:
    """The lowest threshold whose kept set has precision >= ``target``; ``None`` if no cut reaches it."""
    s, y = _as_arrays(scores, labels)
    d, tp, n = _cuts(s, y)
    ok = np.flatnonzero(tp / n >= target - 1e-12)
    if ok.size == 0:
        return None
    return cut_threshold(d, int(ok[-1]))


def recall_target_threshold(scores: Any, labels: Any, target: float) -> Optional[float]:
    """The highest threshold whose kept set has recall >= ``target``; ``None`` without positives."""
    s, y = _as_arrays(scores, labels)
    d, tp, n = _cuts(s, y)
    P = int(y.sum())
    if P == 0:
        return None
    ok = np.flatnonzero(tp / P >= target - 1e-12)
    return cut_threshold(d, int(ok[0]))


def _group_index(groups: Any, n: int) -> Tuple[np.ndarray, int]:
    """Map arbitrary query ids to 0..G-1 (each score its own group when ``groups`` is None)."""
    if groups is None:
        return np.arange(n), n
    g = np.asarray(groups, dtype=object).ravel() if not isinstance(groups, np.ndarray) else groups.ravel()
    if g.size != n:
        raise CalibrationError(f"groups has {g.size} entries but there are {n} scores; give one query id per score")
    _, inv = np.unique(g.astype(str), return_inverse=True)
    return inv.astype(np.int64), int(inv.max()) + 1 if n else 0


def _group_max(s: np.ndarray, gi: np.ndarray, G: int) -> np.ndarray:
    m = np.full(G, -np.inf)
    np.maximum.at(m, gi, s)
    return m


def within_query_spreads(scores: Any, labels: Any, groups: Any) -> np.ndarray:
    """``s_top_rel(q) - s_rel(q, j)`` for every non-top relevant candidate of every query with
    at least two relevant candidates (the within-query spread of relevant scores)."""
    s, y = _as_arrays(scores, labels)
    gi, _ = _group_index(groups, s.size)
    return _spreads(s, y, gi)


def _spreads(s: np.ndarray, y: np.ndarray, gi: np.ndarray) -> np.ndarray:
    pos = np.flatnonzero(y > 0)
    if pos.size == 0:
        return np.zeros(0)
    sp, gp = s[pos], gi[pos]
    order = np.lexsort((-sp, gp))  # by query, best relevant first
    sp, gp = sp[order], gp[order]
    first = np.r_[True, gp[1:] != gp[:-1]]
    top = np.maximum.accumulate(np.where(first, np.arange(sp.size), 0))  # index of the group's top
    return (sp[top] - sp)[~first]


def margin_from_spreads(spreads: np.ndarray, quantile: float) -> Optional[float]:
    if spreads.size == 0:
        return None
    return float(np.quantile(spreads, quantile))


def apply_rule(
    scores: np.ndarray, group_max: np.ndarray, threshold: float, margin: Optional[float]
) -> np.ndarray:
    """Vectorised filter rule: ``s >= threshold  and  s_max(query) - s <= m``."""
    keep = scores >= threshold
    if margin is not None:
        keep &= (group_max - scores) <= margin  # s >= s_max - m, in the form the spreads are measured
    return keep


def prf(keep: np.ndarray, labels: np.ndarray) -> Tuple[float, float, float]:
    """Micro precision, recall, F1 of a keep mask (precision of an empty set is 0)."""
    y = np.asarray(labels) > 0
    tp = float(np.sum(keep & y))
    nk = float(np.sum(keep))
    P = float(np.sum(y))
    p = tp / nk if nk else 0.0
    r = tp / P if P else 0.0
    f = 2 * tp / (nk + P) if (nk + P) else 0.0
    return p, r, f


def _ci(values: np.ndarray, level: float) -> Optional[Tuple[float, float]]:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return None
    a = (1.0 - level) / 2.0
    return float(np.quantile(v, a)), float(np.quantile(v, 1.0 - a))


def _warn(msg: str) -> None:
    """Warn at the first caller outside this module (so the warning names the user's line)."""
    import sys

    level, f = 2, sys._getframe(1)
    while f is not None and f.f_globals.get("__name__") in (__name__, "nbce_rag.filtering.threshold"):
        f, level = f.f_back, level + 1
    warnings.warn(msg, CalibrationWarning, stacklevel=level)


def _validate(scores: Any, labels: Any, min_pos: int, min_neg: int) -> Tuple[np.ndarray, np.ndarray]:
    try:
        s = np.asarray(scores, dtype=np.float64).ravel()
    except (TypeError, ValueError) as e:
        raise CalibrationError(f"scores must be numbers ({e})") from None
    yr = np.asarray(labels).ravel()
    if s.size != yr.size:
        raise CalibrationError(f"scores and labels differ in length ({s.size} vs {yr.size})")
    if s.size == 0:
        raise CalibrationError("no scores given: calibration needs scored, labelled query-passage pairs")
    bad = np.flatnonzero(~np.isfinite(s))
    if bad.size:
        raise CalibrationError(
            f"{bad.size} scores are NaN or infinite (first at position {int(bad[0])}); every candidate "
            "needs a finite cosine score -- re-score with the encoder (MarginThreshold.rescore)"
        )
    try:
        yf = yr.astype(np.float64)
    except (TypeError, ValueError):
        raise CalibrationError("labels must be 0/1 relevance (or graded numbers, > 0 = relevant)") from None
    if not np.all(np.isfinite(yf)):
        raise CalibrationError("labels contain NaN; give 0 (irrelevant) or 1 (relevant) for every score")
    y = (yf > 0).astype(np.int8)
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    if n_pos < min_pos or n_neg < min_neg:
        raise CalibrationError(
            f"calibration needs at least {min_pos} relevant and {min_neg} irrelevant scored pairs; got "
            f"{n_pos} relevant and {n_neg} irrelevant. Label more queries (with qrels: more queries, or a "
            "larger k so irrelevant candidates are included), or lower min_positives/min_negatives"
        )
    if float(s.max()) == float(s.min()):
        raise CalibrationError(
            f"all {s.size} scores are equal ({s[0]:.6g}): no threshold can separate relevant from "
            "irrelevant; check that the scores are the encoder's cosine of each query with each passage"
        )
    if s.min() < -1.0 - 1e-4 or s.max() > 1.0 + 1e-4:
        _warn(f"scores span [{s.min():.4g}, {s.max():.4g}], outside the cosine range [-1, 1]: they look like "
              "a store's distance or raw inner product; re-score with the encoder's cosine")
    return s, y


def _members(gi: np.ndarray, G: int) -> List[np.ndarray]:
    order = np.argsort(gi, kind="mergesort")
    bounds = np.searchsorted(gi[order], np.arange(G + 1))
    return [order[bounds[g]:bounds[g + 1]] for g in range(G)]


def _estimate(s, y, gi, G, p_target, r_target, mode, quantiles, min_margin_queries, warn, objective=None):
    """All calibrated numbers for one data set (the full data or one bootstrap resample)."""
    t_star, f1_star, _, _ = best_f1_threshold(s, y)
    up = precision_target_threshold(s, y, p_target)
    upper_reached = up is not None
    if up is None:
        up = float(np.nextafter(s.max(), np.inf))
        if warn:
            _warn(f"no threshold reaches precision {p_target}: upper is set above every score "
                  "(nothing is relevant with confidence); lower precision_target or improve the encoder")
    lo = recall_target_threshold(s, y, r_target)
    gmax = _group_max(s, gi, G)[gi]
    spreads = np.zeros(0)
    n_multi = 0
    # candidate margins: (margin, quantile alpha)
    cands: List[Tuple[Optional[float], Optional[float]]] = [(None, None)]
    if mode == "auto":
        spreads = _spreads(s, y, gi)
        pos = y > 0
        n_multi = int(np.sum(np.bincount(gi[pos], minlength=G) >= 2))
        cands.append((0.0, None))
        if n_multi >= min_margin_queries:
            for q in quantiles:
                cands.append((float(np.quantile(spreads, q)), q))
        elif warn:
            _warn(f"only {n_multi} queries have two or more relevant candidates (need "
                  f"{min_margin_queries}): the margin can only be 0 (keep the best candidate alone) or "
                  "none; label queries with several relevant passages to calibrate it")
    elif mode is not None:
        cands = [(float(mode), None)]
    best = None
    table = []
    order = np.argsort(-s, kind="mergesort")
    s_o, y_o, gap_o = s[order], y[order].astype(np.int64), (gmax - s)[order]
    P = int(y.sum())
    g_o, n_ans = gi[order], int(np.unique(gi[y > 0]).size)
    for m, q in cands:  # objective: nbce_rag.filtering.objective.Objective (None: F1)
        sel = slice(None) if m is None else gap_o <= m
        if objective is None:
            tau, f1, p, r = _best_f1_sorted(s_o[sel], y_o[sel], P)
            val = f1
        else:
            tau, val, p, r = objective.best_sorted(s_o[sel], y_o[sel], P, g_o[sel], n_ans)
            f1 = 2 * p * r / (p + r) if p + r else 0.0
        table.append({"margin": m, "quantile": q, "threshold": tau, "f1": f1, "precision": p, "recall": r,
                      "objective": val})
        if best is None or val > best["objective"] + 1e-12:
            best = table[-1]
    t, margin = best["threshold"], best["margin"]
    lower, upper = min(lo, t_star, t), max(up, t_star, t)
    return {
        "threshold": t,
        "t_star": t_star,
        "lower": lower,
        "upper": upper,
        "margin": margin,
        "quantile": best["quantile"],
        "candidates": table,
        "upper_reached": upper_reached,
        "n_spreads": int(spreads.size),
        "prf_t": prf(s >= t_star, y),
        "prf_rule": prf(apply_rule(s, gmax, t, margin), y),
    }
