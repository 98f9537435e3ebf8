"""Margin-calibrated passage filter: which retrieved candidates reach the NBCE decoder.

Retrieval always returns ``k`` hits, relevant or not, and NBCE fuses whatever it is given.
:class:`MarginThreshold` decides, per query, which candidates to keep, with every number
*calibrated from labelled data* (a hand-picked cut-off is all LangChain's
``EmbeddingsFilter`` and LlamaIndex's ``SimilarityPostprocessor`` offer).

Scores are the canonical cosine of the CoSENT encoder, ``s = cos(E(q), E(p))``. Candidates
from an external store (which may report a distance or a transformed "relevance") are
re-scored with :meth:`MarginThreshold.rescore` first.

Calibration (:meth:`MarginThreshold.calibrate`), from cosine scores ``s``, 0/1 labels ``y``
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

``threshold`` equals ``t*`` when no margin is used. The band does not change the decision:
it labels kept and dropped hits ``confident`` / ``uncertain`` (what a reranker or a monitor
consumes) and is reported with the calibration. Why this rule and not another (``t*`` alone,
the margin alone, ``t*`` AND a fixed-quantile margin, the band edges as the decision, ...):
the cross-validated comparison on SciFact train in ``benchmarks/RESULTS_filter.md``.

When nothing passes the result is empty (``FilterResult.kept == []``): the pipeline answers
closed-book and flags the answer as unsupported; there is no fall-back to top-k.

The calibration records the encoder identity; :meth:`MarginThreshold.filter`,
:meth:`MarginThreshold.check_encoder` and :meth:`MarginThreshold.for_index` refuse another
encoder with :class:`~nbce_rag.errors.EncoderMismatchError`. It is saved as
``calibration.json`` (:data:`CALIBRATION_FILENAME`) inside an index directory, where the
pipeline picks it up.

The core is plain numpy; the plot (``plot_distributions``) imports matplotlib lazily.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ._io import atomic_write, read_json, write_json
from .errors import CalibrationError, CorruptFileError, EncoderMismatchError
from .types import DroppedHit, FilterResult, Passage, as_passage

logger = logging.getLogger(__name__)

#: File name of a calibration inside an index directory (found by :meth:`MarginThreshold.for_index`).
CALIBRATION_FILENAME = "calibration.json"
FORMAT_NAME = "nbce-rag/margin-threshold"
FORMAT_VERSION = 1

PathLike = Union[str, "os.PathLike[str]"]

#: Quantiles of the within-query relevant spread tried as the margin by ``margin="auto"``.
DEFAULT_MARGIN_QUANTILES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

__all__ = [
    "CALIBRATION_FILENAME",
    "MarginThreshold",
    "FilterResult",
    "DroppedHit",
    "CalibrationWarning",
    "best_f1_threshold",
    "precision_target_threshold",
    "recall_target_threshold",
    "within_query_spreads",
    "margin_from_spreads",
    "apply_rule",
    "prf",
    "read_queries",
    "read_qrels",
    "plot_distributions",
]


class CalibrationWarning(UserWarning):
    """Calibration data is usable but thin (few queries, no margin, unreachable target)."""


# --------------------------------------------------------------------------------------------
# Pure numpy core
# --------------------------------------------------------------------------------------------


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
    return _cut_threshold(d, j), float(f1[j]), float(tp[j] / n[j]), float(tp[j] / P)


def _cut_threshold(d: np.ndarray, j: int) -> float:
    """Threshold that keeps the distinct scores d[0..j]: halfway to the next lower distinct
    score (the score itself for the last cut, or when the midpoint rounds onto the lower one)."""
    if j >= len(d) - 1:
        return float(d[j])
    hi, lo = float(d[j]), float(d[j + 1])
    mid = (hi + lo) / 2.0
    return hi if mid <= lo else mid


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
    return _cut_threshold(d, j), float(f1[j]), float(tp[j] / n[j]), float(tp[j] / P)


def precision_target_threshold(scores: Any, labels: Any, target: float) -> Optional[float]:
    """The lowest threshold whose kept set has precision >= ``target``; ``None`` if no cut reaches it."""
    s, y = _as_arrays(scores, labels)
    d, tp, n = _cuts(s, y)
    ok = np.flatnonzero(tp / n >= target - 1e-12)
    if ok.size == 0:
        return None
    return _cut_threshold(d, int(ok[-1]))


def recall_target_threshold(scores: Any, labels: Any, target: float) -> Optional[float]:
    """The highest threshold whose kept set has recall >= ``target``; ``None`` without positives."""
    s, y = _as_arrays(scores, labels)
    d, tp, n = _cuts(s, y)
    P = int(y.sum())
    if P == 0:
        return None
    ok = np.flatnonzero(tp / P >= target - 1e-12)
    return _cut_threshold(d, int(ok[0]))


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


# --------------------------------------------------------------------------------------------
# The calibrated filter
# --------------------------------------------------------------------------------------------


def _identity_of(obj: Any) -> Optional[str]:
    """Encoder identity of an encoder (``.identity``), an index (``.encoder_identity``) or a str."""
    if obj is None:
        return None
    if isinstance(obj, str):
        return obj
    for attr in ("encoder_identity", "identity"):
        v = getattr(obj, attr, None)
        if isinstance(v, str):
            return v
    enc = getattr(obj, "encoder", None)
    if enc is not None and enc is not obj:
        return _identity_of(enc)
    raise TypeError(
        f"expected an encoder (with .identity), an index (with .encoder_identity) or an identity "
        f"string; got {type(obj).__name__}"
    )


def _identities_match(a: str, b: str) -> bool:
    """Same weights? Identities are ``"<name>@sha256:<hex>"`` (nbce_rag.encoder): the digest after
    the last ``@`` decides, the name is informational. Identities without ``@`` compare whole."""
    if "@" in a and "@" in b:
        return a.rsplit("@", 1)[-1] == b.rsplit("@", 1)[-1]
    return a == b


def _ci(values: np.ndarray, level: float) -> Optional[Tuple[float, float]]:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return None
    a = (1.0 - level) / 2.0
    return float(np.quantile(v, a)), float(np.quantile(v, 1.0 - a))


@dataclass
class MarginThreshold:
    """A calibrated filter: global best-F1 threshold + relative margin, with an uncertainty band.

    Build it with :meth:`calibrate` (scores + labels + query ids) or
    :meth:`calibrate_from_qrels` (an index + labelled queries); apply it with :meth:`filter`.
    See the module docstring for the rule and how each number is derived.
    """

    threshold: float  #: t*: best-F1 global cosine threshold (keep iff s >= t*)
    lower: float  #: below: irrelevant with confidence (recall target met above it)
    upper: float  #: at/above: relevant with confidence (precision target met)
    margin: Optional[float]  #: m: drop s < s_max(query) - m; None disables the margin
    encoder_identity: Optional[str] = None
    ci: Dict[str, Optional[Tuple[float, float]]] = field(default_factory=dict)
    stats: Dict[str, Any] = field(default_factory=dict)  #: counts, targets, in-sample metrics
    #: calibration data (scores, labels, group ids) of the last calibrate(); not saved
    data: Optional[Dict[str, np.ndarray]] = field(default=None, repr=False, compare=False)

    # ---------------- confidence intervals ----------------
    @property
    def threshold_ci(self) -> Optional[Tuple[float, float]]:
        return self.ci.get("threshold")

    @property
    def lower_ci(self) -> Optional[Tuple[float, float]]:
        return self.ci.get("lower")

    @property
    def upper_ci(self) -> Optional[Tuple[float, float]]:
        return self.ci.get("upper")

    @property
    def margin_ci(self) -> Optional[Tuple[float, float]]:
        return self.ci.get("margin")

    # ---------------- calibration ----------------
    @classmethod
    def calibrate(
        cls,
        scores: Any,
        labels: Any,
        groups: Any = None,
        *,
        encoder_identity: Any = None,
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
    ) -> "MarginThreshold":
        """Calibrate from cosine ``scores``, 0/1 relevance ``labels`` and the query id of every
        score (``groups``; the candidates of one query share an id).

        ``margin``: ``"auto"`` (default) picks ``m`` among 0 and the ``margin_quantiles``
        quantiles of the within-query spread of relevant scores -- or no margin -- by the F1 of
        the whole rule, the threshold being re-scanned exactly for each candidate; a number
        fixes ``m`` (the threshold is still scanned given it); ``None`` disables the margin.
        Without ``groups`` every score is its own query: no margin, and the bootstrap
        resamples single scores. ``encoder_identity`` may be an identity string, an encoder or
        an index. Raises :class:`CalibrationError` when the data cannot support a calibration
        (NaN scores, too few positives/negatives, all scores equal) and warns
        (:class:`CalibrationWarning`) when it is thin. ``objective``: what the margin and the
        threshold maximise -- ``None`` / ``"f1"`` (this method's default), ``"f0.5"`` (F-beta) or ``"coverage0.9"``
        (highest precision keeping a relevant passage for 90% of answerable queries); see
        :mod:`nbce_rag.objective`.
        """
        from .objective import parse_objective

        obj = parse_objective("f1" if objective is None else objective)
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
        th = cls(
            threshold=est["threshold"],
            lower=est["lower"],
            upper=est["upper"],
            margin=est["margin"],
            encoder_identity=_identity_of(encoder_identity),
            ci=ci,
            stats=stats,
        )
        th.data = {"scores": s, "labels": y, "groups": gi}
        return th

    @classmethod
    def calibrate_from_qrels(
        cls,
        index: Any,
        queries: Union[Mapping[str, str], Iterable[Tuple[str, str]], PathLike],
        qrels: Union[Mapping[str, Mapping[str, Any]], Iterable[Tuple[str, str, Any]], PathLike],
        k: int = 20,
        *,
        show_progress: bool = False,
        **kwargs: Any,
    ) -> "MarginThreshold":
        """Calibrate on an index's own top-``k`` candidates of labelled queries.

        ``queries``: ``{query_id: text}``, ``(id, text)`` pairs, or a BEIR ``queries.jsonl`` path.
        ``qrels``: ``{query_id: {doc_id: relevance}}``, ``(qid, doc_id, rel)`` triples, or a
        BEIR/TREC qrels TSV path. Only queries that have qrels are used; a candidate is relevant
        when its ``hit.id`` -- or the document it is a chunk of (``metadata["doc_id"]``, or the
        ``"<doc id>#<n>"`` chunk id) -- has relevance > 0. Queries whose relevant passages were not retrieved
        stay in (all their candidates are negatives), so "nothing relevant" is calibrated too.
        ``index.search(text, k)`` must return hits scored with the canonical cosine (as
        :class:`~nbce_rag.index.VectorIndex` does). Other keyword arguments go to :meth:`calibrate`.
        """
        qmap = read_queries(queries) if isinstance(queries, (str, os.PathLike)) else _as_query_map(queries)
        rmap = read_qrels(qrels) if isinstance(qrels, (str, os.PathLike)) else _as_qrels_map(qrels)
        qids = [q for q in rmap if q in qmap]
        if not qids:
            raise CalibrationError(
                "no query id in qrels matches a query; check that the queries file and the qrels "
                "use the same ids (BEIR: queries.jsonl '_id', qrels 'query-id')"
            )
        missing = len(rmap) - len(qids)
        if missing:
            _warn(f"{missing} qrels queries have no text in the queries given; they are skipped")
        scores: List[float] = []
        labels: List[int] = []
        groups: List[str] = []
        results = _search_all(index, [qmap[q] for q in qids], k, show_progress)
        for qid, hits in zip(qids, results):
            rel = rmap[qid]
            for h in hits:
                if h.score is None:
                    raise CalibrationError("index.search returned hits without scores; cannot calibrate")
                scores.append(float(h.score))
                labels.append(1 if _relevance(rel, h) > 0 else 0)
                groups.append(qid)
        kwargs.setdefault("encoder_identity", _identity_of(index))
        th = cls.calibrate(scores, labels, groups, **kwargs)
        th.stats["k"] = int(k)
        return th

    # ---------------- applying ----------------
    def check_encoder(self, encoder: Any) -> None:
        """Raise :class:`EncoderMismatchError` unless ``encoder`` (an encoder, an index or an
        identity string) is the encoder this calibration was made with."""
        other = _identity_of(encoder)
        if other is None or self.encoder_identity is None:
            return
        if not _identities_match(other, self.encoder_identity):
            raise EncoderMismatchError(
                f"this calibration was made with encoder {self.encoder_identity!r}, but it is applied "
                f"with {other!r}; cosine levels differ between encoders, so recalibrate with "
                "`nbce-rag calibrate` (or MarginThreshold.calibrate_from_qrels) for this encoder"
            )

    def filter(self, hits: Sequence[Any], encoder: Any = None, *, query: Optional[str] = None) -> FilterResult:
        """Keep the candidates of one query that pass the rule; the rest go to ``dropped`` with a reason.

        ``hits``: :class:`~nbce_rag.types.Passage`/``Hit`` objects (or anything
        :func:`~nbce_rag.types.as_passage` accepts) scored with the canonical cosine, e.g. as
        returned by ``VectorIndex.search``. ``encoder`` (an encoder or an index) is checked
        against the calibration's encoder identity. With ``query`` and an ``encoder`` that can
        encode, the hits are first re-scored with the canonical cosine (:meth:`rescore`) --
        use that for candidates from an external store.
        """
        if encoder is not None:
            self.check_encoder(encoder)
        ps = [as_passage(h, where="hits") for h in hits]
        if query is not None:
            if encoder is None:
                raise ValueError("filter(query=...) re-scores the hits and needs the encoder")
            ps = self.rescore(encoder, query, ps)
        dropped: List[DroppedHit] = []
        scored: List[Tuple[int, Passage, float]] = []
        for i, p in enumerate(ps):
            s = None if p.score is None else float(p.score)
            if s is None or not math.isfinite(s):
                dropped.append(DroppedHit(p, reason=(
                    "no finite cosine score; re-score candidates from an external store with "
                    "MarginThreshold.rescore(encoder, query, hits)"), code="no_score", zone="confident"))
            else:
                scored.append((i, p, s))
        best = max((s for _, _, s in scored), default=None)
        kept: List[Passage] = []
        confident: List[bool] = []
        for _, p, s in scored:
            zone = "confident" if s < self.lower else "uncertain"
            if s < self.threshold:
                dropped.append(DroppedHit(p, reason=(
                    f"score {s:.4f} < threshold {self.threshold:.4f}"
                    + (" (below the band's lower edge {:.4f}: irrelevant with confidence)".format(self.lower)
                       if zone == "confident" else " (inside the uncertainty band)")),
                    code="below_threshold", zone=zone))
            elif self.margin is not None and best is not None and best - s > self.margin:
                dropped.append(DroppedHit(p, reason=(
                    f"score {s:.4f} is {best - s:.4f} below the best candidate {best:.4f}, more than "
                    f"the margin {self.margin:.4f}"), code="outside_margin", zone="uncertain"
                    if s < self.upper else "confident"))
            else:
                kept.append(p)
                confident.append(s >= self.upper)
        return FilterResult(kept=kept, dropped=dropped, threshold=self.threshold, margin=self.margin,
                            best_score=best, confident=confident)

    def keep_mask(self, scores: Any, groups: Any = None) -> np.ndarray:
        """Vectorised rule over many queries' scores (``groups``: query id per score)."""
        s = np.asarray(scores, dtype=np.float64).ravel()
        gi, G = _group_index(groups, s.size) if groups is not None else (np.zeros(s.size, dtype=np.int64), 1)
        gmax = _group_max(s, gi, G)[gi] if s.size else s
        return apply_rule(s, gmax, self.threshold, self.margin)

    @staticmethod
    def rescore(encoder: Any, query: str, hits: Sequence[Any]) -> List[Passage]:
        """The canonical cosine of ``hits`` against ``query`` (see :func:`nbce_rag.retrieval.rescore`)."""
        from .retrieval import rescore

        return rescore(encoder, query, hits)

    # ---------------- persistence ----------------
    def to_dict(self) -> Dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "encoder_identity": self.encoder_identity,
            "threshold": self.threshold,
            "lower": self.lower,
            "upper": self.upper,
            "margin": self.margin,
            "rule": "keep iff s >= threshold and s >= s_max - margin",
            "ci": {k: (list(v) if v is not None else None) for k, v in self.ci.items()},
            "stats": self.stats,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "calibration") -> "MarginThreshold":
        if not isinstance(d, Mapping) or d.get("format") != FORMAT_NAME:
            raise CorruptFileError(f"{source} is not an nbce-rag calibration (format {FORMAT_NAME!r} expected)")
        if int(d.get("version", 0)) > FORMAT_VERSION:
            raise CorruptFileError(f"{source} has calibration format version {d.get('version')}, newer than "
                                   f"this nbce-rag supports ({FORMAT_VERSION}); upgrade nbce-rag")
        try:
            t, lo, up = float(d["threshold"]), float(d["lower"]), float(d["upper"])
            m = None if d.get("margin") is None else float(d["margin"])
            ci = {k: (None if v is None else (float(v[0]), float(v[1]))) for k, v in dict(d.get("ci") or {}).items()}
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise CorruptFileError(f"{source} is missing or has a malformed field ({e!r}); recalibrate") from None
        if not all(math.isfinite(x) for x in (t, lo, up)) or (m is not None and not math.isfinite(m)):
            raise CorruptFileError(f"{source} holds non-finite thresholds; recalibrate")
        return cls(threshold=t, lower=lo, upper=up, margin=m, encoder_identity=d.get("encoder_identity"),
                   ci=ci, stats=dict(d.get("stats") or {}))

    def save(self, path: PathLike) -> Path:
        """Write the calibration as JSON (atomically). A directory (e.g. an index directory)
        gets ``calibration.json`` inside it. Returns the file written."""
        p = Path(path)
        if p.is_dir():
            p = p / CALIBRATION_FILENAME
        write_json(p, self.to_dict())
        return p

    @classmethod
    def load(cls, path: PathLike, encoder: Any = None) -> "MarginThreshold":
        """Read a calibration file (or ``calibration.json`` inside a directory); with ``encoder``
        (an encoder, an index or an identity string) check that it matches."""
        p = Path(path)
        if p.is_dir():
            p = p / CALIBRATION_FILENAME
        th = cls.from_dict(read_json(p), source=str(p))
        if encoder is not None:
            th.check_encoder(encoder)
        return th

    @classmethod
    def for_index(cls, index_dir: PathLike, encoder: Any = None) -> Optional["MarginThreshold"]:
        """The calibration saved inside an index directory, or ``None`` when there is none.
        With ``encoder`` (or the loaded index) the encoder identity is checked."""
        p = Path(index_dir) / CALIBRATION_FILENAME
        if not p.exists():
            return None
        return cls.load(p, encoder=encoder)

    # ---------------- reporting ----------------
    def report(self) -> str:
        """A plain-text summary: numbers, band, margin, metrics with confidence intervals."""

        def f(x: Optional[float]) -> str:
            return "none" if x is None else f"{x:.4f}"

        def c(key: str) -> str:
            v = self.ci.get(key)
            return f"  [{v[0]:.4f}, {v[1]:.4f}]" if v else ""

        st = self.stats
        lvl = st.get("ci_level", 0.95)
        if self.margin is None:
            mdesc = "no margin (none improved F1)" if st.get("margin_mode") == "auto" else "no margin"
        elif st.get("margin_quantile") is not None:
            mdesc = (f"q{st['margin_quantile']:g} of the within-query spread of relevant scores "
                     f"({st.get('n_margin_spreads')} spreads), chosen by {st.get('objective', 'f1')}")
        elif self.margin == 0.0 and st.get("margin_mode") == "auto":
            mdesc = f"0: keep the best candidate only (chosen by {st.get('objective', 'f1')})"
        else:
            mdesc = "fixed"
        lines = [
            f"encoder:    {self.encoder_identity}",
            f"data:       {st.get('n_scores')} scores, {st.get('n_positives')} relevant, "
            f"{st.get('n_negatives')} irrelevant, {st.get('n_queries')} queries"
            + (f" (top-{st['k']} candidates)" if st.get("k") else ""),
            "rule:       keep iff s >= threshold and s >= s_max(query) - margin",
            f"            [intervals: {int(round(lvl * 100))}% bootstrap over queries, "
            f"{st.get('n_bootstrap_used', st.get('n_bootstrap'))} resamples]",
            f"threshold:  {f(self.threshold)}{c('threshold')}   best {st.get('objective', 'f1')} of the rule (exact scan given the margin)",
            f"margin:     {f(self.margin)}{c('margin')}   {mdesc}"
            + (f"; no margin in {st['margin_none_fraction']:.0%} of resamples" if st.get("margin_none_fraction") else ""),
            f"band:       [{f(self.lower)}, {f(self.upper)}]   lower: recall >= {st.get('recall_target')} above it"
            f" {c('lower').strip()}; upper: precision >= {st.get('precision_target')} above it {c('upper').strip()}"
            + ("" if st.get("precision_at_upper_reached", True) else " (target never reached: upper is above every score)"),
            f"global t*:  {f(st.get('global_threshold'))}{c('global_threshold')}   best-F1 threshold without margin",
        ]
        r = st.get("rule") or {}
        g = st.get("global_threshold_metrics") or {}
        if r:
            lines.append(
                f"rule (in-sample):   precision {r['precision']:.4f}{c('precision')}  recall "
                f"{r['recall']:.4f}{c('recall')}  F1 {r['f1']:.4f}{c('f1')}"
            )
        if g:
            lines.append(f"global t* alone:    precision {g['precision']:.4f}  recall {g['recall']:.4f}  F1 {g['f1']:.4f}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _warn(msg: str) -> None:
    """Warn at the first caller outside this module (so the warning names the user's line)."""
    import sys

    level, f = 2, sys._getframe(1)
    while f is not None and f.f_globals.get("__name__") == __name__:
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
    """All calibrated numbers for one data set (the full data or one bootstrap resample).
    ``objective`` (nbce_rag.objective.Objective; None = F1) picks the margin and its threshold."""
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
    for m, q in cands:
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


def _search_all(index: Any, texts: List[str], k: int, show_progress: bool) -> List[List[Passage]]:
    """Top-k hits of every text: ``index.search_many`` in blocks when the index has it
    (one encode call per block), else ``index.search`` one by one."""
    search_many = getattr(index, "search_many", None)
    block = 256 if search_many is not None else 1
    starts = range(0, len(texts), block)
    if show_progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="calibrate: search", unit=f"x{block} queries" if block > 1 else "query")
    out: List[List[Passage]] = []
    for i in starts:
        if search_many is not None:
            out.extend(search_many(texts[i:i + block], k=k))
        else:
            out.append(index.search(texts[i], k))
    return out


def _relevance(rel: Mapping[str, float], hit: Passage) -> float:
    """Relevance of a hit under one query's qrels: by its id, else by the document it is a
    chunk of (``metadata["doc_id"]``, or the part of a ``"<doc id>#<n>"`` chunk id before ``#``)."""
    hid = None if hit.id is None else str(hit.id)
    if hid is not None and hid in rel:
        return float(rel[hid] or 0)
    doc = hit.metadata.get("doc_id") if isinstance(hit.metadata, dict) else None
    if doc is not None and str(doc) in rel:
        return float(rel[str(doc)] or 0)
    if hid is not None and "#" in hid:
        return float(rel.get(hid.rsplit("#", 1)[0], 0) or 0)
    return 0.0


def _as_query_map(q: Any) -> Dict[str, str]:
    if isinstance(q, Mapping):
        return {str(k): str(v) for k, v in q.items()}
    return {str(a): str(b) for a, b in q}


def _as_qrels_map(r: Any) -> Dict[str, Dict[str, float]]:
    if isinstance(r, Mapping):
        return {str(q): {str(d): float(v) for d, v in dict(docs).items()} for q, docs in r.items()}
    out: Dict[str, Dict[str, float]] = {}
    for q, d, v in r:
        out.setdefault(str(q), {})[str(d)] = float(v)
    return out


def read_queries(path: PathLike) -> Dict[str, str]:
    """Queries from a BEIR ``queries.jsonl`` (``_id``/``id`` + ``text``) or a ``id<TAB>text`` TSV."""
    import json

    p = Path(path)
    out: Dict[str, str] = {}
    try:
        with open(p, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                if line.lstrip().startswith("{"):
                    o = json.loads(line)
                    qid = o.get("_id", o.get("id"))
                    if qid is None or "text" not in o:
                        raise CalibrationError(f"{p}:{n}: a query line needs '_id' (or 'id') and 'text'")
                    out[str(qid)] = str(o["text"])
                else:
                    parts = line.split("\t", 1)
                    if len(parts) != 2:
                        raise CalibrationError(f"{p}:{n}: expected JSONL or 'id<TAB>text'")
                    out[parts[0]] = parts[1]
    except FileNotFoundError:
        raise CalibrationError(f"queries file {p} does not exist") from None
    except json.JSONDecodeError as e:
        raise CalibrationError(f"{p}: invalid JSON line ({e})") from None
    return out


def read_qrels(path: PathLike) -> Dict[str, Dict[str, float]]:
    """Qrels from a BEIR TSV (``query-id corpus-id score``, header optional) or a TREC file
    (``qid 0 docid rel``)."""
    p = Path(path)
    out: Dict[str, Dict[str, float]] = {}
    try:
        with open(p, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) == 4:
                    q, _, d, v = parts
                elif len(parts) == 3:
                    q, d, v = parts
                else:
                    raise CalibrationError(f"{p}:{n}: expected 'query-id corpus-id score' or TREC 'qid 0 docid rel'")
                try:
                    val = float(v)
                except ValueError:
                    if n == 1:
                        continue  # header
                    raise CalibrationError(f"{p}:{n}: relevance {v!r} is not a number") from None
                out.setdefault(q, {})[d] = val
    except FileNotFoundError:
        raise CalibrationError(f"qrels file {p} does not exist") from None
    return out


def plot_distributions(
    th: MarginThreshold,
    path: PathLike,
    scores: Any = None,
    labels: Any = None,
    *,
    title: Optional[str] = None,
) -> Path:
    """Write a PNG of the relevant and irrelevant score distributions with ``lower``,
    ``threshold`` and ``upper`` drawn (and the margin below the median best candidate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if scores is None:
        if th.data is None:
            raise CalibrationError("no calibration data to plot: pass scores and labels")
        scores, labels = th.data["scores"], th.data["labels"]
    s, y = _as_arrays(scores, labels)
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
    bins = np.linspace(float(s.min()), float(s.max()), 50)
    ax.hist(s[y == 0], bins=bins, density=True, alpha=0.55, color="tab:gray",
            label=f"irrelevant (n={int((y == 0).sum())})")
    ax.hist(s[y > 0], bins=bins, density=True, alpha=0.55, color="tab:green",
            label=f"relevant (n={int((y > 0).sum())})")
    ax.axvspan(th.lower, th.upper, color="tab:orange", alpha=0.12, label="uncertainty band")
    ax.axvline(th.lower, color="tab:orange", ls="--", lw=1.2, label=f"lower {th.lower:.3f}")
    ax.axvline(th.threshold, color="tab:red", lw=1.8, label=f"threshold {th.threshold:.3f}")
    gt = th.stats.get("global_threshold")
    if gt is not None and abs(gt - th.threshold) > 1e-9:
        ax.axvline(gt, color="tab:purple", lw=1.2, label=f"global t* (no margin) {gt:.3f}")
    ax.axvline(th.upper, color="tab:orange", ls="-.", lw=1.2, label=f"upper {th.upper:.3f}")
    if th.threshold_ci:
        ax.axvspan(*th.threshold_ci, color="tab:red", alpha=0.15, label="threshold 95% CI")
    ax.set_xlabel("cosine score")
    ax.set_ylabel("density")
    m = "none" if th.margin is None else f"{th.margin:.3f}"
    rule = f"rule: keep iff s >= {th.threshold:.3f} and s >= s_max - {m}"
    ax.set_title(f"{title or 'Calibration: relevant vs irrelevant scores'}\n{rule}", fontsize=9.5)
    ax.legend(fontsize=7.5, loc="upper left")
    fig.tight_layout()
    out = Path(path)
    try:
        atomic_write(out, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return out
