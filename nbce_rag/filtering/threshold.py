"""Margin-calibrated passage filter: which retrieved candidates reach the NBCE decoder.

Retrieval always returns ``k`` hits, relevant or not, and NBCE fuses whatever it is given.
:class:`MarginThreshold` decides, per query, which candidates to keep, with every number
*calibrated from labelled data* (a hand-picked cut-off is all LangChain's
``EmbeddingsFilter`` and LlamaIndex's ``SimilarityPostprocessor`` offer).

Scores are the canonical cosine of the CoSENT encoder, ``s = cos(E(q), E(p))``. Candidates
from an external store (which may report a distance or a transformed "relevance") are
re-scored with :meth:`MarginThreshold.rescore` first.

Calibration (:meth:`MarginThreshold.calibrate`, :meth:`MarginThreshold.calibrate_from_qrels`)
is computed by :mod:`nbce_rag.filtering.calibration` (pure NumPy), whose docstring gives every number's
derivation: the best-F1 threshold ``t*``, the uncertainty band ``[lower, upper]``, the margin
``m`` (triangle-inequality argument, chosen by the F1 of the whole rule) and the bootstrap
over queries. File formats of queries and qrels: :mod:`nbce_rag.retrieval.readers`.

The filter rule, for one query's candidates ``s_1..s_k`` with ``s_max = max_j s_j``::

    keep i  iff  s_i >= threshold  and  s_i >= s_max - margin        (no margin: m = +inf)

``threshold`` equals ``t*`` when no margin is used. The band does not change the decision:
it labels kept and dropped hits ``confident`` / ``uncertain`` (what a reranker or a monitor
consumes) and is reported with the calibration.

When nothing passes the result is empty (``FilterResult.kept == []``): the pipeline answers
closed-book and flags the answer as unsupported; there is no fall-back to top-k.

The calibration records the encoder identity; :meth:`MarginThreshold.filter`,
:meth:`MarginThreshold.check_encoder` and :meth:`MarginThreshold.for_index` refuse another
encoder with :class:`~nbce_rag.errors.EncoderMismatchError`. It is saved as
``calibration.json`` (:data:`CALIBRATION_FILENAME`) inside an index directory, where the
pipeline picks it up.

The plot (``plot_distributions``) imports matplotlib lazily.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from nbce_rag.files import atomic_write, read_json, write_json
from nbce_rag.filtering.calibration import (  # noqa: F401 - re-exported: the maths used to live here
    DEFAULT_MARGIN_QUANTILES,
    CalibrationWarning,
    _as_arrays,
    _group_index,
    _group_max,
    _warn,
    apply_rule,
    best_f1_threshold,
    calibrate_rule,
    margin_from_spreads,
    precision_target_threshold,
    prf,
    recall_target_threshold,
    within_query_spreads,
)
from nbce_rag.retrieval.encoder import identities_match
from nbce_rag.errors import CalibrationError, CorruptFileError, EncoderMismatchError
from nbce_rag.retrieval.selection import identity_of
from nbce_rag.retrieval.readers import load_qrels, load_queries, read_qrels, read_queries  # noqa: F401 - re-exported
from nbce_rag.types import DroppedHit, FilterResult, Passage, as_passage, document_id

logger = logging.getLogger(__name__)

#: File name of a calibration inside an index directory (found by :meth:`MarginThreshold.for_index`).
CALIBRATION_FILENAME = "calibration.json"
FORMAT_NAME = "nbce-rag/margin-threshold"
FORMAT_VERSION = 1

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "CALIBRATION_FILENAME",
    "MarginThreshold",
    "FilterResult",
    "DroppedHit",
    "CalibrationWarning",
    "plot_distributions",
]


# --------------------------------------------------------------------------------------------
# The calibrated filter
# --------------------------------------------------------------------------------------------


def _identity_of(obj: Any) -> Optional[str]:
    """Encoder identity of an encoder (``.identity``), an index (``.encoder_identity``), an
    object holding one of those as ``.encoder``, or an identity string."""
    if obj is None or isinstance(obj, str):
        return obj
    ident = identity_of(obj)
    if ident is not None:
        return ident
    enc = getattr(obj, "encoder", None)
    if enc is not None and enc is not obj:
        return _identity_of(enc)
    raise TypeError(
        f"expected an encoder (with .identity), an index (with .encoder_identity) or an identity "
        f"string; got {type(obj).__name__}"
    )


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
        threshold maximise -- ``None`` / ``"f1"`` (this method's default), ``"f0.5"`` (F-beta) or
        ``"coverage0.9"`` (highest precision keeping a relevant passage for 90% of answerable
        queries); see :mod:`nbce_rag.filtering.objective`.
        """
        c = calibrate_rule(scores, labels, groups, margin=margin, margin_quantiles=margin_quantiles,
                           precision_target=precision_target, recall_target=recall_target, n_bootstrap=n_bootstrap,
                           ci_level=ci_level, min_positives=min_positives, min_negatives=min_negatives,
                           min_margin_queries=min_margin_queries, seed=seed, objective=objective)
        th = cls(threshold=c["threshold"], lower=c["lower"], upper=c["upper"], margin=c["margin"],
                 encoder_identity=_identity_of(encoder_identity), ci=c["ci"], stats=c["stats"])
        th.data = c["data"]
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
        :class:`~nbce_rag.retrieval.index.VectorIndex` does). Other keyword arguments go to :meth:`calibrate`.
        """
        qmap, rmap = load_queries(queries), load_qrels(qrels)
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
        if not identities_match(other, self.encoder_identity):
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
        """The canonical cosine of ``hits`` against ``query`` (see :func:`nbce_rag.retrieval.selection.rescore`)."""
        from nbce_rag.retrieval.selection import rescore

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
        """Rebuild a calibration from :meth:`to_dict`'s output. Every field is checked (type,
        finite, cosine range, ``lower <= threshold <= upper``, ``0 <= margin``, an encoder
        identity present): any problem raises :class:`CorruptFileError` naming the field."""
        if not isinstance(d, Mapping) or d.get("format") != FORMAT_NAME:
            raise CorruptFileError(f"{source} is not an nbce-rag calibration (format {FORMAT_NAME!r} expected)")
        version = d.get("version")
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            raise CorruptFileError(f"{source} has calibration format version {version}, newer than "
                                   f"this nbce-rag supports ({FORMAT_VERSION}); upgrade nbce-rag")
        v = _check_calibration_fields(
            d, lambda msg: CorruptFileError(f"{source} is malformed: {msg}; recalibrate (nbce-rag calibrate)"))
        return cls(**v)

    def save(self, path: PathLike) -> Path:
        """Write the calibration as JSON (atomically). A directory (e.g. an index directory)
        gets ``calibration.json`` inside it. Returns the file written. A calibration that
        :meth:`load` would refuse (no encoder identity, thresholds outside the cosine range,
        an inconsistent band) is not written: :class:`CalibrationError`."""
        p = Path(path)
        if p.is_dir():
            p = p / CALIBRATION_FILENAME
        d = self.to_dict()
        _check_calibration_fields(d, lambda msg: CalibrationError(f"cannot save this calibration: {msg}"))
        write_json(p, d)
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

#: how far a stored threshold may lie outside [-1, 1] (float32 cosines of equal texts exceed 1
#: by rounding, and "above every score" is the next float above the highest one)
_COSINE_SLACK = 1e-3
#: stats keys that report() formats as numbers
_NUMERIC_STATS = ("ci_level", "margin_quantile", "margin_none_fraction", "recall_target", "precision_target",
                  "global_threshold", "k", "n_scores", "n_positives", "n_negatives", "n_queries",
                  "n_bootstrap", "n_bootstrap_used", "n_margin_spreads")


def _check_calibration_fields(d: Mapping[str, Any], bad: Any) -> Dict[str, Any]:
    """Check every field of a calibration dict; return ``MarginThreshold`` keyword arguments.
    ``bad(message)`` makes the exception to raise (CorruptFileError on load, CalibrationError
    on save)."""

    def number(key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad(f"{key} must be a finite number (got {value!r})")
        return float(value)

    def cosine(key: str) -> float:
        if key not in d:
            raise bad(f"field {key!r} is missing")
        x = number(key, d[key])
        if abs(x) > 1.0 + _COSINE_SLACK:
            raise bad(f"{key} {x!r} is outside the cosine range [-1, 1]")
        return x

    version = d.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise bad(f"field 'version' must be an integer in [1, {FORMAT_VERSION}] (got {version!r})")
    ident = d.get("encoder_identity")
    if not isinstance(ident, str) or not ident.strip():
        raise bad(f"field 'encoder_identity' must name the encoder the scores came from (got {ident!r}); "
                  "without it the encoder check is impossible")
    t, lo, up = cosine("threshold"), cosine("lower"), cosine("upper")
    if not lo <= t <= up:
        raise bad(f"the band is inconsistent: need lower <= threshold <= upper, got {lo!r}, {t!r}, {up!r}")
    m = d.get("margin")
    if m is not None:
        m = number("margin", m)
        if not 0.0 <= m <= 2.0 + _COSINE_SLACK:
            raise bad(f"margin {m!r} must be in [0, 2] (a difference of cosines), or null for no margin")
    ci_raw = d.get("ci") or {}
    if not isinstance(ci_raw, Mapping):
        raise bad(f"field 'ci' must be an object (got {ci_raw!r})")
    ci: Dict[str, Optional[Tuple[float, float]]] = {}
    for k, v in ci_raw.items():
        if v is None:
            ci[str(k)] = None
            continue
        if not isinstance(v, (list, tuple)) or len(v) != 2:
            raise bad(f"ci.{k} must be a [low, high] pair or null (got {v!r})")
        a, b = number(f"ci.{k}[0]", v[0]), number(f"ci.{k}[1]", v[1])
        if a > b:
            raise bad(f"ci.{k} has low {a!r} > high {b!r}")
        ci[str(k)] = (a, b)
    stats = d.get("stats") or {}
    if not isinstance(stats, Mapping):
        raise bad(f"field 'stats' must be an object (got {stats!r})")
    for k in _NUMERIC_STATS:
        if stats.get(k) is not None or (k == "ci_level" and k in stats):
            number(f"stats.{k}", stats[k])
    for k in ("rule", "global_threshold_metrics"):
        sub = stats.get(k)
        if sub is None:
            continue
        if not isinstance(sub, Mapping):
            raise bad(f"stats.{k} must be an object (got {sub!r})")
        for key in ("precision", "recall", "f1") if sub else ():
            number(f"stats.{k}.{key}", sub.get(key))
    return dict(threshold=t, lower=lo, upper=up, margin=m, encoder_identity=ident, ci=ci, stats=dict(stats))


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
    chunk of (:func:`nbce_rag.types.document_id`)."""
    hid = None if hit.id is None else str(hit.id)
    key = hid if hid is not None and hid in rel else document_id(hit)
    return float(rel.get(key, 0) or 0) if key is not None else 0.0


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
