"""The filter's two decisions, calibrated apart: pure NumPy.

One threshold cannot do two jobs with opposite needs (``benchmarks/RESULTS_filter.md`` §5b:
the off-topic threshold cost 8 points of answer accuracy). So the filter makes two decisions:

``keep`` -- which candidates become NBCE rows (recall first)::

    keep i  iff  s_i >= keep.threshold  and  s_i >= s_max - keep.margin     (no margin: m = +inf)

  The default pooling weighs every row by its score, so an irrelevant row kept costs one row
  and little weight, while a relevant passage dropped is lost. :func:`calibrate_keep` chooses
  ``(threshold, margin)`` with **macro keep-recall** >= ``recall_target``: the mean, over
  *answerable* queries (those with a relevant candidate), of the share of their relevant
  candidates kept -- a query with two relevant passages counts as much as one with one, so the
  rule does not depend on how many passages are relevant. Among the rules that reach the
  target, the one with the **fewest kept rows per query** wins (ties: the higher threshold,
  then the smaller margin). The margins tried are ``{none} U {quantiles of the gaps
  s_max(q) - s_rel(q, j)}`` over every relevant candidate (gaps to the best candidate, not to
  the best relevant one: a relevant passage ranked below an irrelevant one must stay within
  the margin); for each, the threshold is the exact scan (the highest cut that reaches the
  target given the margin).

``support`` -- is the question answerable from the index at all (precision first)::

    supported  iff  s_max >= support.threshold

  :func:`calibrate_support` takes the best-candidate score ``s_max`` of *in-domain* questions
  (their top-k holds a relevant passage) and of *off-topic* ones (their top-k holds none, or
  questions of another domain asked against this index). With at least ``min_off_topic``
  off-topic questions the threshold is the **lowest** cut that flags a share ``flag_target`` of
  them (so the most in-domain questions stay supported while the off-topic target holds); the
  in-domain share kept supported is reported and a warning says when it falls below
  ``supported_target``. Without off-topic questions precision cannot be measured: the
  threshold is the **highest** cut that keeps ``supported_target`` of the in-domain questions
  supported (``method: "in_domain_quantile"``), and the stats say so.

Both come with percentile bootstrap intervals over queries (the keep rule re-fitted on
resampled queries; support on in-domain and off-topic questions resampled apart). Cuts sit
halfway between adjacent distinct scores (:func:`~nbce_rag.filtering.objective.cut_threshold`),
as the rest of the calibration.

A version-1 calibration (one rule) reads as ``keep = (threshold, margin)`` and
``support.threshold = threshold``: exactly today's behaviour, since "some candidate passes
``s >= t``" is "``s_max >= t``".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from nbce_rag.errors import CalibrationError
from nbce_rag.filtering.objective import cut_threshold

#: Macro keep-recall a calibrated ``keep`` rule reaches by default: the highest target whose rows
#: stay <= 60% of no filter's on the calibration splits (benchmarks/RESULTS_filter.md §6).
DEFAULT_KEEP_RECALL_TARGET = 0.98
#: Share of off-topic questions the ``support`` rule flags unsupported by default: the highest
#: target that keeps >= 95% of in-domain questions supported on the calibration splits (§6).
DEFAULT_FLAG_TARGET = 0.94
#: Share of in-domain questions the ``support`` rule should keep supported (the target of the
#: in-domain-only fit; a warning when the off-topic fit falls below it).
DEFAULT_SUPPORTED_TARGET = 0.95
#: Quantiles of the gaps ``s_max - s_rel`` tried as the keep margin.
KEEP_MARGIN_QUANTILES = tuple(float(q) for q in np.round(np.linspace(0.0, 1.0, 21), 3))
#: Fewer off-topic questions than this: the support threshold is fitted on in-domain ones only.
MIN_OFF_TOPIC = 5

__all__ = [
    "DEFAULT_KEEP_RECALL_TARGET",
    "DEFAULT_FLAG_TARGET",
    "DEFAULT_SUPPORTED_TARGET",
    "KEEP_MARGIN_QUANTILES",
    "MIN_OFF_TOPIC",
    "KEEP_CI_KEYS",
    "KeepDecision",
    "SupportDecision",
    "calibrate_keep",
    "calibrate_support",
    "keep_mask",
    "keep_recall",
    "question_max",
]


# ============================================================================ shared helpers


def _groups(groups: Any, n: int) -> Tuple[np.ndarray, int]:
    if groups is None:
        raise CalibrationError("the keep rule is per query: give the query id of every score (groups)")
    g = np.asarray(groups, dtype=object).ravel()
    if g.size != n:
        raise CalibrationError(f"groups has {g.size} entries but there are {n} scores; give one query id per score")
    if n == 0:
        return np.zeros(0, dtype=np.int64), 0
    _, inv = np.unique(g.astype(str), return_inverse=True)
    return inv.astype(np.int64), int(inv.max()) + 1


def _scores(x: Any, what: str) -> np.ndarray:
    try:
        s = np.asarray(x, dtype=np.float64).ravel()
    except (TypeError, ValueError) as e:
        raise CalibrationError(f"{what} must be numbers ({e})") from None
    bad = np.flatnonzero(~np.isfinite(s))
    if bad.size:
        raise CalibrationError(f"{bad.size} of the {what} are NaN or infinite (first at position {int(bad[0])}); "
                               "every score must be a finite cosine")
    return s


def _gmax(s: np.ndarray, gi: np.ndarray, G: int) -> np.ndarray:
    m = np.full(G, -np.inf)
    if s.size:
        np.maximum.at(m, gi, s)
    return m


def _ci(values: Sequence[float], level: float) -> Optional[Tuple[float, float]]:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return None
    a = (1.0 - level) / 2.0
    return float(np.quantile(v, a)), float(np.quantile(v, 1.0 - a))


def _check_share(name: str, v: float) -> float:
    v = float(v)
    if not 0.0 < v <= 1.0:
        raise CalibrationError(f"{name} must be in (0, 1], got {v}")
    return v


def question_max(scores: Any, groups: Any) -> Dict[str, float]:
    """``{query id: s_max}``: the best candidate's score of every query (what ``support`` reads)."""
    s = _scores(scores, "scores")
    g = np.asarray(groups, dtype=object).ravel()
    if g.size != s.size:
        raise CalibrationError(f"groups has {g.size} entries but there are {s.size} scores")
    out: Dict[str, float] = {}
    for q, x in zip(g.astype(str), s):
        out[q] = max(out.get(q, -math.inf), float(x))
    return out


def keep_mask(scores: Any, groups: Any, threshold: float, margin: Optional[float]) -> np.ndarray:
    """The keep rule over many queries' candidates (``groups``: query id per score)."""
    s = _scores(scores, "scores")
    gi, G = _groups(groups, s.size)
    keep = s >= threshold
    if margin is not None:
        keep &= (_gmax(s, gi, G)[gi] - s) <= margin
    return keep


def keep_recall(keep: Any, labels: Any, groups: Any) -> Tuple[float, int]:
    """Macro keep-recall of a keep mask: the mean over answerable queries of the share of their
    relevant candidates kept; returns ``(recall, number of answerable queries)`` (``nan, 0``
    when no query has a relevant candidate)."""
    k = np.asarray(keep, dtype=bool).ravel()
    y = np.asarray(labels).ravel() > 0
    gi, G = _groups(groups, k.size)
    n_rel = np.bincount(gi[y], minlength=G).astype(np.float64)
    n_kept = np.bincount(gi[y & k], minlength=G).astype(np.float64)
    ans = n_rel > 0
    if not ans.any():
        return float("nan"), 0
    return float(np.mean(n_kept[ans] / n_rel[ans])), int(ans.sum())


# ============================================================================ keep (recall first)


def _keep_fit(s: np.ndarray, y: np.ndarray, gi: np.ndarray, G: int, target: float,
              margins: List[Tuple[Optional[float], Optional[float]]]) -> Optional[Dict[str, Any]]:
    """The fewest-rows ``(threshold, margin)`` reaching macro keep-recall ``target``."""
    pos = y > 0
    n_rel = np.bincount(gi[pos], minlength=G).astype(np.float64)
    ans = n_rel > 0
    n_ans = int(ans.sum())
    if n_ans == 0:
        return None
    w = np.where(pos, 1.0 / np.maximum(n_rel[gi], 1.0), 0.0) / n_ans  # each relevant's share of the macro recall
    gap = _gmax(s, gi, G)[gi] - s
    order = np.argsort(-s, kind="mergesort")
    s_o, w_o, gap_o = s[order], w[order], gap[order]
    best = None
    table = []
    for m, q in margins:
        sel = np.ones(s_o.size, dtype=bool) if m is None else gap_o <= m + 1e-12
        ss, ww = s_o[sel], w_o[sel]
        if ss.size == 0:
            continue
        cw = np.cumsum(ww)
        last = np.flatnonzero(np.r_[ss[1:] != ss[:-1], True])
        d, rec, n = ss[last], cw[last], last + 1
        ok = np.flatnonzero(rec >= target - 1e-9)
        if ok.size == 0:
            table.append({"margin": m, "quantile": q, "threshold": None, "keep_recall": float(rec[-1]),
                          "rows": None, "feasible": False})
            continue
        j = int(ok[0])  # the highest cut that reaches the target
        t = cut_threshold(d, j)
        rows = float(n[j]) / G
        row = {"margin": m, "quantile": q, "threshold": t, "keep_recall": float(rec[j]), "rows": rows,
               "feasible": True}
        table.append(row)
        if best is None or rows < best["rows"] - 1e-12 or (
                abs(rows - best["rows"]) <= 1e-12 and (t > best["threshold"] + 1e-12 or (
                    abs(t - best["threshold"]) <= 1e-12 and _m(m) < _m(best["margin"])))):
            best = row
    if best is None:
        return None
    return dict(best, candidates=table, n_answerable=n_ans)


def _m(m: Optional[float]) -> float:
    return math.inf if m is None else m


def _margin_candidates(s: np.ndarray, y: np.ndarray, gi: np.ndarray, G: int, margin: Any,
                       quantiles: Sequence[float]) -> List[Tuple[Optional[float], Optional[float]]]:
    if margin is None:
        return [(None, None)]
    if not isinstance(margin, str):
        return [(float(margin), None)]
    gaps = (_gmax(s, gi, G)[gi] - s)[y > 0]
    out: List[Tuple[Optional[float], Optional[float]]] = [(None, None)]
    if gaps.size:
        seen = set()
        for q in quantiles:
            v = float(np.quantile(gaps, q))
            if v not in seen:
                seen.add(v)
                out.append((v, float(q)))
    return out


def calibrate_keep(
    scores: Any,
    labels: Any,
    groups: Any,
    *,
    recall_target: float = DEFAULT_KEEP_RECALL_TARGET,
    margin: Any = "auto",
    margin_quantiles: Sequence[float] = KEEP_MARGIN_QUANTILES,
    n_bootstrap: int = 1000,
    ci_level: float = 0.95,
    seed: int = 0,
    min_answerable: int = 1,
) -> Dict[str, Any]:
    """Recall-first ``keep`` rule (see the module docstring) from cosine ``scores``, 0/1
    ``labels`` and the query id of every score (``groups``).

    ``margin``: ``"auto"`` (none or a quantile of the gaps to the best candidate, whichever
    keeps the fewest rows), a number (fixed), or ``None`` (no margin). Returns ``{"threshold",
    "margin", "ci": {threshold, margin, keep_recall, rows}, "stats": {...}}``; the stats hold
    ``recall_target``, the in-sample ``keep_recall`` and ``rows`` (mean kept candidates per
    query), the number of answerable queries and the table of margins tried.
    Raises :class:`CalibrationError` without any answerable query (fewer than ``min_answerable``).
    """
    s = _scores(scores, "scores")
    y = (np.asarray(labels).ravel().astype(np.float64) > 0).astype(np.int8) if np.size(labels) else np.zeros(0, np.int8)
    if y.size != s.size:
        raise CalibrationError(f"scores and labels differ in length ({s.size} vs {y.size})")
    target = _check_share("recall_target", recall_target)
    _check_share("ci_level", ci_level)
    if isinstance(margin, str) and margin != "auto":
        raise CalibrationError(f"margin must be 'auto', a number >= 0 or None; got {margin!r}")
    if margin is not None and not isinstance(margin, str) and not (float(margin) >= 0 and math.isfinite(float(margin))):
        raise CalibrationError(f"a fixed margin must be a finite number >= 0; got {margin}")
    gi, G = _groups(groups, s.size)
    n_ans = int(np.unique(gi[y > 0]).size)
    if n_ans < max(1, int(min_answerable)):
        raise CalibrationError(f"the keep rule needs at least {max(1, int(min_answerable))} queries with a relevant "
                               f"candidate; got {n_ans}. Label more queries, or retrieve more candidates (k)")
    cands = _margin_candidates(s, y, gi, G, margin, margin_quantiles)
    est = _keep_fit(s, y, gi, G, target, cands)
    if est is None:  # only with a fixed margin that hides every relevant candidate
        raise CalibrationError(f"no threshold reaches keep-recall {target} with margin {margin}: widen the margin "
                               "or use margin='auto'")
    stats: Dict[str, Any] = {
        "method": "recall_first",
        "recall_target": target,
        "keep_recall": est["keep_recall"],
        "rows": est["rows"],
        "margin_mode": "auto" if margin == "auto" else ("none" if margin is None else "fixed"),
        "margin_quantile": est["quantile"],
        "margin_candidates": est["candidates"],
        "n_queries": int(G),
        "n_answerable": int(n_ans),
        "n_relevant": int(y.sum()),
        "ci_level": float(ci_level),
        "n_bootstrap": int(n_bootstrap),
        "seed": int(seed),
    }
    ci: Dict[str, Optional[Tuple[float, float]]] = {}
    if n_bootstrap > 0 and G > 1:
        rng = np.random.default_rng(seed)
        order = np.argsort(gi, kind="mergesort")
        bounds = np.searchsorted(gi[order], np.arange(G + 1))
        members = [order[bounds[g]:bounds[g + 1]] for g in range(G)]
        boot: Dict[str, List[float]] = {k: [] for k in ("threshold", "margin", "keep_recall", "rows")}
        n_none = 0
        for _ in range(int(n_bootstrap)):
            pick = rng.integers(0, G, size=G)
            idx = np.concatenate([members[g] for g in pick])
            ng = np.repeat(np.arange(G), [members[g].size for g in pick])
            if not (y[idx] > 0).any():
                continue
            b = _keep_fit(s[idx], y[idx], ng, G, target,
                          _margin_candidates(s[idx], y[idx], ng, G, margin, margin_quantiles))
            if b is None:
                continue
            boot["threshold"].append(b["threshold"])
            n_none += b["margin"] is None
            boot["margin"].append(math.inf if b["margin"] is None else b["margin"])
            # the calibrated rule on the resample: how much it keeps, how much recall
            keep = s[idx] >= est["threshold"]
            if est["margin"] is not None:
                keep &= (_gmax(s[idx], ng, G)[ng] - s[idx]) <= est["margin"]
            boot["keep_recall"].append(keep_recall(keep, y[idx], ng)[0])
            boot["rows"].append(float(keep.sum()) / G)
        ci = {k: _ci(v, ci_level) for k, v in boot.items()}
        stats["n_bootstrap_used"] = len(boot["threshold"])
        stats["margin_none_fraction"] = n_none / max(len(boot["threshold"]), 1)
    return {"threshold": float(est["threshold"]), "margin": est["margin"], "ci": ci, "stats": stats}


# ============================================================================ support (precision first)


def _support_fit(ind: np.ndarray, off: np.ndarray, flag_target: float, supported_target: float,
                 min_off_topic: int) -> Dict[str, Any]:
    if off.size >= min_off_topic:
        # the lowest cut with share(off < t) >= flag_target: just above the n_flag-th smallest
        o = np.sort(off)
        n_flag = max(1, int(math.ceil(flag_target * o.size - 1e-9)))
        v = float(o[n_flag - 1])
        above = o[o > v]
        if above.size:
            d = np.array([float(above.min()), v])
            t = cut_threshold(d, 0)  # halfway between v and the next higher off-topic maximum
        else:
            t = float(np.nextafter(v, np.inf))  # above every off-topic maximum
        method = "off_topic"
    else:
        if ind.size == 0:
            raise CalibrationError("the support rule needs in-domain questions (queries whose top-k holds a "
                                   "relevant passage) or off-topic ones")
        # the highest cut with share(ind >= t) >= supported_target
        d = np.unique(ind)[::-1]
        n_need = max(1, int(math.ceil(supported_target * ind.size - 1e-9)))
        v = float(np.sort(ind)[::-1][n_need - 1])
        t = cut_threshold(d, int(np.flatnonzero(d == v)[0]))
        method = "in_domain_quantile"
    supported_in = float(np.mean(ind >= t)) if ind.size else float("nan")
    flagged_off = float(np.mean(off < t)) if off.size else float("nan")
    return {"threshold": float(t), "method": method, "in_domain_supported": supported_in,
            "off_topic_flagged": flagged_off}


def calibrate_support(
    in_domain_max: Any,
    off_topic_max: Any = None,
    *,
    flag_target: float = DEFAULT_FLAG_TARGET,
    supported_target: float = DEFAULT_SUPPORTED_TARGET,
    min_off_topic: int = MIN_OFF_TOPIC,
    n_bootstrap: int = 1000,
    ci_level: float = 0.95,
    seed: int = 0,
) -> Dict[str, Any]:
    """Precision-first ``support`` rule (``supported iff s_max >= threshold``) from the
    best-candidate scores of in-domain questions (``in_domain_max``) and of off-topic ones
    (``off_topic_max``: questions whose top-k holds no relevant passage, or another domain's
    questions asked against this index). See the module docstring for the fit.

    Returns ``{"threshold", "ci": {threshold, in_domain_supported, off_topic_flagged},
    "stats": {"method": "off_topic" | "in_domain_quantile", "flag_target", "supported_target",
    "in_domain_supported", "off_topic_flagged", "supported_target_met", "flag_target_met",
    "n_in_domain", "n_off_topic", ...}}``.
    """
    ind = _scores(in_domain_max if in_domain_max is not None else [], "in-domain maxima")
    off = _scores(off_topic_max if off_topic_max is not None else [], "off-topic maxima")
    ft = _check_share("flag_target", flag_target)
    st = _check_share("supported_target", supported_target)
    _check_share("ci_level", ci_level)
    if off.size < min_off_topic and ind.size == 0:
        raise CalibrationError(f"the support rule needs in-domain questions, or at least {min_off_topic} off-topic "
                               f"ones; got {ind.size} in-domain and {off.size} off-topic")
    est = _support_fit(ind, off, ft, st, min_off_topic)
    stats: Dict[str, Any] = {
        "method": est["method"],
        "flag_target": ft,
        "supported_target": st,
        "in_domain_supported": est["in_domain_supported"],
        "off_topic_flagged": est["off_topic_flagged"],
        "supported_target_met": bool(ind.size and est["in_domain_supported"] >= st - 1e-9),
        "flag_target_met": (bool(est["off_topic_flagged"] >= ft - 1e-9) if off.size else None),
        "n_in_domain": int(ind.size),
        "n_off_topic": int(off.size),
        "min_off_topic": int(min_off_topic),
        "ci_level": float(ci_level),
        "n_bootstrap": int(n_bootstrap),
        "seed": int(seed),
    }
    ci: Dict[str, Optional[Tuple[float, float]]] = {}
    if n_bootstrap > 0 and ind.size + off.size > 1:
        rng = np.random.default_rng(seed)
        boot: Dict[str, List[float]] = {k: [] for k in ("threshold", "in_domain_supported", "off_topic_flagged")}
        for _ in range(int(n_bootstrap)):
            bi = ind[rng.integers(0, ind.size, ind.size)] if ind.size else ind
            bo = off[rng.integers(0, off.size, off.size)] if off.size else off
            try:
                b = _support_fit(bi, bo, ft, st, min_off_topic)
            except CalibrationError:
                continue
            boot["threshold"].append(b["threshold"])
            # the calibrated threshold on the resample
            boot["in_domain_supported"].append(float(np.mean(bi >= est["threshold"])) if bi.size else float("nan"))
            boot["off_topic_flagged"].append(float(np.mean(bo < est["threshold"])) if bo.size else float("nan"))
        ci = {k: _ci(v, ci_level) for k, v in boot.items()}
        stats["n_bootstrap_used"] = len(boot["threshold"])
    return {"threshold": est["threshold"], "ci": ci, "stats": stats}


# ============================================================================ the two decisions as objects

#: CI keys of the keep rule (in ``MarginThreshold.ci`` and the file's ``keep.ci``).
KEEP_CI_KEYS = ("threshold", "margin", "keep_recall", "rows")
KEEP_RULE = "keep i iff s_i >= keep.threshold and s_i >= s_max - keep.margin"
SUPPORT_RULE = "supported iff s_max >= support.threshold"


@dataclass(frozen=True)
class KeepDecision:
    """Which candidates become NBCE rows: ``keep i iff s_i >= threshold and s_i >= s_max - margin``.

    A read-only view of a :class:`~nbce_rag.filtering.threshold.MarginThreshold`'s keep rule
    (its ``threshold`` and ``margin``); ``stats["method"]`` is ``"recall_first"``
    (:func:`calibrate_keep`), ``"objective"`` (the single best-objective scan) or
    ``"single_rule"`` (a version-1 file or a rule given by hand)."""

    threshold: float
    margin: Optional[float]
    ci: Dict[str, Optional[Tuple[float, float]]] = field(default_factory=dict)
    stats: Dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return str(self.stats.get("method", "single_rule"))

    def keeps(self, score: float, best: float) -> bool:
        return score >= self.threshold and (self.margin is None or best - score <= self.margin)


@dataclass
class SupportDecision:
    """Whether the index supports a question at all: ``supported iff s_max >= threshold``.

    ``stats["method"]``: ``"off_topic"`` or ``"in_domain_quantile"`` (:func:`calibrate_support`),
    or ``"single_rule"`` (a version-1 calibration: the keep threshold, today's behaviour)."""

    threshold: float
    ci: Dict[str, Optional[Tuple[float, float]]] = field(default_factory=dict)
    stats: Dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return str(self.stats.get("method", "single_rule"))

    def supported(self, best: Optional[float]) -> bool:
        """The decision for a question whose best candidate scores ``best`` (``None``: no candidate)."""
        return best is not None and math.isfinite(best) and best >= self.threshold

    @classmethod
    def fit(cls, in_domain_max: Any, off_topic_max: Any = None, **kwargs: Any) -> "SupportDecision":
        """:func:`calibrate_support` as a decision."""
        r = calibrate_support(in_domain_max, off_topic_max, **kwargs)
        return cls(threshold=r["threshold"], ci=r["ci"], stats=r["stats"])

    def to_dict(self) -> Dict[str, Any]:
        return {"threshold": self.threshold, "rule": SUPPORT_RULE,
                "ci": {k: (list(v) if v is not None else None) for k, v in self.ci.items()},
                "stats": self.stats}
