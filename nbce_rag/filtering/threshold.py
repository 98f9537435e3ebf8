"""Margin-calibrated passage filter: which retrieved candidates reach the NBCE decoder, and
whether the index supports the question at all.

Retrieval always returns ``k`` hits, relevant or not, and NBCE fuses whatever it is given.
:class:`MarginThreshold` makes two decisions per query, with every number *calibrated from
data* (a hand-picked cut-off is all LangChain's ``EmbeddingsFilter`` and LlamaIndex's
``SimilarityPostprocessor`` offer):

* ``keep`` -- which candidates become NBCE rows (recall first)::

      keep i  iff  s_i >= threshold  and  s_i >= s_max - margin        (no margin: m = +inf)

* ``support`` -- whether the question is answerable from the index (precision first)::

      supported  iff  s_max >= support.threshold

Scores are the canonical cosine of the CoSENT encoder, ``s = cos(E(q), E(p))``. Candidates
from an external store (which may report a distance or a transformed "relevance") are
re-scored with :meth:`MarginThreshold.rescore` first.

Calibration (:meth:`MarginThreshold.calibrate`, :meth:`MarginThreshold.calibrate_from_qrels`):
with ``keep_recall_target`` the keep rule is the recall-first fit of
:func:`nbce_rag.filtering.decisions.calibrate_keep` (macro keep-recall over answerable queries,
fewest rows); without it, the single best-objective scan of :mod:`nbce_rag.filtering.calibration`
(best-F1 threshold ``t*``, margin chosen by the F1 of the whole rule). The support rule is
:func:`nbce_rag.filtering.decisions.calibrate_support` on the best-candidate scores of
in-domain and off-topic questions. Both carry bootstrap intervals over queries. The band
``[lower, upper]`` does not change a decision: it labels kept and dropped hits
``confident`` / ``uncertain`` (what a reranker or a monitor consumes).

When nothing passes ``keep`` the result is empty (``FilterResult.kept == []``); the pipeline
then abstains (or answers closed-book when asked), flagged unsupported: there is no
fall-back to top-k. A question whose best candidate fails ``support`` while some candidates
pass ``keep`` is answered from them and flagged unsupported.

The calibration records the encoder identity; :meth:`MarginThreshold.filter`,
:meth:`MarginThreshold.check_encoder` and :meth:`MarginThreshold.for_index` refuse another
encoder with :class:`~nbce_rag.errors.EncoderMismatchError`. It is saved as
``calibration.json`` (:data:`CALIBRATION_FILENAME`) inside an index directory, where the
pipeline picks it up; the file format (version 2; version-1 files still load, as one rule for
both decisions): :mod:`nbce_rag.filtering.calibration_file`.

The plot (``plot_distributions``, :mod:`nbce_rag.filtering.plot`) needs matplotlib (optional).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from nbce_rag.files import read_json, write_json
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
from nbce_rag.filtering.calibration_file import (  # noqa: F401 - FORMAT_* re-exported
    FORMAT_NAME,
    FORMAT_VERSION,
    calibration_dict,
    check_calibration_dict,
    single_rule_support,
)
from nbce_rag.filtering.decisions import (
    DEFAULT_FLAG_TARGET,
    DEFAULT_SUPPORTED_TARGET,
    KeepDecision,
    SupportDecision,
    calibrate_keep,
    calibrate_support,
)
from nbce_rag.filtering.plot import plot_distributions  # noqa: F401 - re-exported
from nbce_rag.filtering.objective import check_objective_option
from nbce_rag.retrieval.encoder import identities_match
from nbce_rag.errors import CalibrationError, CorruptFileError, EncoderMismatchError
from nbce_rag.retrieval.selection import identity_of
from nbce_rag.retrieval.readers import load_qrels, load_queries, read_qrels, read_queries  # noqa: F401 - re-exported
from nbce_rag.types import DroppedHit, FilterResult, Passage, as_passage, document_id

logger = logging.getLogger(__name__)

#: File name of a calibration inside an index directory (found by :meth:`MarginThreshold.for_index`).
CALIBRATION_FILENAME = "calibration.json"

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "CALIBRATION_FILENAME",
    "MarginThreshold",
    "KeepDecision",
    "SupportDecision",
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
    """A calibrated filter with two decisions: ``keep`` (``threshold`` + relative ``margin``:
    which candidates become rows) and ``support`` (a threshold on the best candidate's score:
    is the question answerable), with an uncertainty band.

    Build it with :meth:`calibrate` (scores + labels + query ids) or
    :meth:`calibrate_from_qrels` (an index + labelled queries); apply it with :meth:`filter`.
    Made by hand (``MarginThreshold(threshold=..., lower=..., upper=..., margin=...)``) or read
    from a version-1 file, ``support`` is the single rule ``s_max >= threshold``.
    See the module docstring for the rules and how each number is derived.
    """

    threshold: float  #: the keep threshold (keep iff s >= threshold and within the margin)
    lower: float  #: below: irrelevant with confidence (recall target met above it)
    upper: float  #: at/above: relevant with confidence (precision target met)
    margin: Optional[float]  #: m: drop s < s_max(query) - m; None disables the margin
    encoder_identity: Optional[str] = None
    ci: Dict[str, Optional[Tuple[float, float]]] = field(default_factory=dict)
    stats: Dict[str, Any] = field(default_factory=dict)  #: counts, targets, in-sample metrics; keep's under "keep"
    #: the support decision (None: the single rule ``s_max >= threshold``, filled in on creation)
    support: Optional[SupportDecision] = None
    #: calibration data (scores, labels, group ids) of the last calibrate(); not saved
    data: Optional[Dict[str, np.ndarray]] = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.support is None:
            self.support = single_rule_support(self.threshold, self.ci)

    @property
    def keep(self) -> KeepDecision:
        """The keep rule (a read-only view of ``threshold``, ``margin``, their intervals and
        ``stats["keep"]``)."""
        from nbce_rag.filtering.decisions import KEEP_CI_KEYS

        return KeepDecision(threshold=self.threshold, margin=self.margin,
                            ci={k: self.ci[k] for k in KEEP_CI_KEYS if k in self.ci},
                            stats=dict(self.stats.get("keep") or {"method": "single_rule"}))

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
        keep_recall_target: Optional[float] = None,
        off_topic_max: Any = None,
        flag_target: float = DEFAULT_FLAG_TARGET,
        supported_target: float = DEFAULT_SUPPORTED_TARGET,
    ) -> "MarginThreshold":
        """Calibrate from cosine ``scores``, 0/1 relevance ``labels`` and the query id of every
        score (``groups``; the candidates of one query share an id).

        **keep.** With ``keep_recall_target`` (e.g. 0.95, what the label-free recipes and
        ``nbce-rag calibrate`` use) the keep rule is recall first
        (:func:`~nbce_rag.filtering.decisions.calibrate_keep`): the fewest rows whose macro
        keep-recall over answerable queries reaches the target, the margin chosen among
        quantiles of the gaps to the best candidate (``margin="auto"``), fixed, or ``None``.
        Without it the keep rule is the single best-``objective`` scan (this method's
        historical behaviour): ``margin="auto"`` picks ``m`` among 0 and the
        ``margin_quantiles`` quantiles of the within-query spread of relevant scores -- or no
        margin -- by the objective of the whole rule; ``objective``: ``None`` / ``"f1"``,
        ``"f0.5"`` (F-beta) or ``"coverage0.9"`` (:mod:`nbce_rag.filtering.objective`).

        **support.** :func:`~nbce_rag.filtering.decisions.calibrate_support` on the best
        candidate's score of every query: in-domain = queries with a relevant candidate,
        off-topic = queries without one, plus ``off_topic_max`` (the best-candidate scores of
        off-topic questions asked against this index, e.g. another data set's questions).
        ``flag_target``: share of off-topic questions flagged; ``supported_target``: share of
        in-domain ones to keep supported (the fit when there are fewer than 5 off-topic ones).

        Without ``groups`` every score is its own query: no margin, and the bootstrap
        resamples single scores. ``encoder_identity`` may be an identity string, an encoder or
        an index. Raises :class:`CalibrationError` when the data cannot support a calibration
        (NaN scores, too few positives/negatives, all scores equal) and warns
        (:class:`CalibrationWarning`) when it is thin.
        """
        c = calibrate_rule(scores, labels, groups, margin=margin, margin_quantiles=margin_quantiles,
                           precision_target=precision_target, recall_target=recall_target, n_bootstrap=n_bootstrap,
                           ci_level=ci_level, min_positives=min_positives, min_negatives=min_negatives,
                           min_margin_queries=min_margin_queries, seed=seed, objective=objective)
        d = c["data"]
        s, y = d["scores"], d["labels"]
        gi = d["groups"]
        gid = gi if groups is not None else np.arange(s.size)
        t, m, lower, upper = c["threshold"], c["margin"], c["lower"], c["upper"]
        ci, stats = dict(c["ci"]), dict(c["stats"])
        if keep_recall_target is not None:
            k = calibrate_keep(s, y, gid, recall_target=keep_recall_target,
                               margin=margin if groups is not None else None,
                               n_bootstrap=n_bootstrap, ci_level=ci_level, seed=seed)
            # the single-rule scan stays as a description; the keep rule replaces its numbers
            stats["objective_rule"] = {"threshold": t, "margin": m, "objective": stats.get("objective"),
                                       "ci": {q: (list(v) if v else None) for q, v in ci.items()
                                              if q in ("threshold", "margin", "precision", "recall", "f1")}}
            for q in ("threshold", "margin", "precision", "recall", "f1"):
                ci.pop(q, None)
            t, m = k["threshold"], k["margin"]
            ci.update(k["ci"])
            lower, upper = min(lower, t), max(upper, t)
            stats["keep"] = k["stats"]
            gmax = _group_max(s, gid, int(gid.max()) + 1 if gid.size else 0)[gid]
            p, r, f = prf(apply_rule(s, gmax, t, m), y)
            stats["rule"] = {"precision": p, "recall": r, "f1": f}
        else:
            from nbce_rag.filtering.decisions import keep_mask, keep_recall

            kr, n_ans = keep_recall(keep_mask(s, gid, t, m), y, gid)
            stats["keep"] = {"method": "objective", "objective": stats.get("objective"),
                             "keep_recall": None if n_ans == 0 else kr, "n_answerable": n_ans,
                             "rows": float(keep_mask(s, gid, t, m).sum()) / max(int(np.unique(gid).size), 1)}
        sup = SupportDecision.fit(*_question_maxima(s, y, gid, off_topic_max), flag_target=flag_target,
                                  supported_target=supported_target, n_bootstrap=n_bootstrap,
                                  ci_level=ci_level, seed=seed)
        th = cls(threshold=t, lower=lower, upper=upper, margin=m, encoder_identity=_identity_of(encoder_identity),
                 ci=ci, stats=stats, support=sup)
        th.data = d
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
        off_topic: Any = None,
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
        :class:`~nbce_rag.retrieval.index.VectorIndex` does). ``off_topic``: questions this index
        should *not* support (texts, ``{id: text}`` or a queries file), searched like the others;
        their best-candidate scores calibrate the ``support`` decision (``off_topic_max``). Other
        keyword arguments go to :meth:`calibrate`.
        """
        check_objective_option(kwargs)  # before searching
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
        if off_topic is not None:
            texts = (list(off_topic) if isinstance(off_topic, (list, tuple))
                     else list(load_queries(off_topic).values()))
            off = [max((float(h.score) for h in hs if h.score is not None), default=float("nan"))
                   for hs in _search_all(index, texts, k, show_progress)]
            extra = kwargs.pop("off_topic_max", None)
            kwargs["off_topic_max"] = [x for x in off if math.isfinite(x)] + list(extra if extra is not None else [])
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
        sup = self.support or single_rule_support(self.threshold, self.ci)
        return FilterResult(kept=kept, dropped=dropped, threshold=self.threshold, margin=self.margin,
                            best_score=best, confident=confident, supported=sup.supported(best),
                            support_threshold=sup.threshold, calibration=self.stats.get("source"))

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
        """The calibration as a version-2 dict (:mod:`nbce_rag.filtering.calibration_file`)."""
        return calibration_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "calibration") -> "MarginThreshold":
        """Rebuild a calibration from :meth:`to_dict`'s output. Every field is checked (type,
        finite, cosine range, ``lower <= threshold <= upper``, ``0 <= margin``, an encoder
        identity present, the keep and support objects of version 2): any problem raises
        :class:`CorruptFileError` naming the field. Version-1 dicts load as one rule for both
        decisions."""
        if not isinstance(d, Mapping) or d.get("format") != FORMAT_NAME:
            raise CorruptFileError(f"{source} is not an nbce-rag calibration (format {FORMAT_NAME!r} expected)")
        version = d.get("version")
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            raise CorruptFileError(f"{source} has calibration format version {version}, newer than "
                                   f"this nbce-rag supports ({FORMAT_VERSION}); upgrade nbce-rag")
        v = check_calibration_dict(
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
        check_calibration_dict(d, lambda msg: CalibrationError(f"cannot save this calibration: {msg}"))
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
    def _report_decisions(self, f: Any) -> List[str]:
        """The keep and support lines of :meth:`report` (stats are informational: any value that
        is not a number prints as n/a)."""

        def n(x: Any, spec: str = ".4f") -> str:
            ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
            return format(x, spec) if ok else "n/a"

        def iv(ci: Mapping[str, Any], key: str, spec: str = ".4f") -> str:
            v = ci.get(key)
            return f" [{n(v[0], spec)}, {n(v[1], spec)}]" if v else ""

        out: List[str] = []
        kp = self.keep
        ks = kp.stats
        if kp.method == "recall_first":
            out.append(f"keep:       macro keep-recall {n(ks.get('keep_recall'), '.1%')}{iv(kp.ci, 'keep_recall', '.1%')} "
                       f"(target {n(ks.get('recall_target'), '.0%')}, {ks.get('n_answerable')} answerable queries), "
                       f"{n(ks.get('rows'), '.2f')}{iv(kp.ci, 'rows', '.2f')} rows per query")
        elif ks.get("keep_recall") is not None:
            out.append(f"keep:       single {ks.get('objective', '')} rule: macro keep-recall {n(ks.get('keep_recall'), '.1%')}, "
                       f"{n(ks.get('rows'), '.2f')} rows per query")
        sp = self.support
        ss = sp.stats if sp is not None else {}
        if sp is None or sp.method == "single_rule":
            out.append(f"support:    s_max >= {f(self.threshold if sp is None else sp.threshold)} (one rule: "
                       "supported when some candidate is kept)")
        else:
            how = (f"flags {n(ss.get('off_topic_flagged'), '.1%')}{iv(sp.ci, 'off_topic_flagged', '.1%')} of "
                   f"{ss.get('n_off_topic')} off-topic questions (target {n(ss.get('flag_target'), '.0%')})"
                   if sp.method == "off_topic" else
                   f"no off-topic questions to measure precision on ({ss.get('n_off_topic', 0)}): the highest cut "
                   f"keeping {n(ss.get('supported_target'), '.0%')} of in-domain questions supported")
            out.append(f"support:    s_max >= {f(sp.threshold)}{iv(sp.ci, 'threshold')}   {how}; "
                       f"in-domain supported {n(ss.get('in_domain_supported'), '.1%')}"
                       f"{iv(sp.ci, 'in_domain_supported', '.1%')} of {ss.get('n_in_domain')}")
            if sp.method == "off_topic" and ss.get("supported_target_met") is False:
                out.append(f"            (below the in-domain target {n(ss.get('supported_target'), '.0%')}: the "
                           "off-topic target wins; lower flag_target to support more in-domain questions)")
        return out

    def report(self) -> str:
        """A plain-text summary: numbers, band, margin, metrics with confidence intervals."""

        def f(x: Optional[float]) -> str:
            return "none" if x is None else f"{x:.4f}"

        def c(key: str) -> str:
            v = self.ci.get(key)
            return f"  [{v[0]:.4f}, {v[1]:.4f}]" if v else ""

        st = self.stats
        lvl = st.get("ci_level", 0.95)
        ks = self.keep.stats
        if self.keep.method == "recall_first":
            mdesc = ("no margin (fewest rows without one)" if self.margin is None else
                     f"q{ks['margin_quantile']} of the gaps s_max - s_relevant, fewest rows at the recall target"
                     if ks.get("margin_quantile") is not None else "fixed")
        elif self.margin is None:
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
            "rule:       keep iff s >= threshold and s >= s_max(query) - margin; "
            "supported iff s_max(query) >= support threshold",
            f"            [intervals: {int(round(lvl * 100))}% bootstrap over queries, "
            f"{st.get('n_bootstrap_used', st.get('n_bootstrap'))} resamples]",
            f"threshold:  {f(self.threshold)}{c('threshold')}   "
            + ("keep: recall first (see keep below)" if self.keep.method == "recall_first" else
               f"best {st.get('objective', 'f1')} of the rule (exact scan given the margin)"),
            f"margin:     {f(self.margin)}{c('margin')}   {mdesc}"
            + (f"; no margin in {nf:.0%} of resamples" if (nf := (ks if self.keep.method == "recall_first" else st)
                                                            .get("margin_none_fraction")) else ""),
            f"band:       [{f(self.lower)}, {f(self.upper)}]   lower: recall >= {st.get('recall_target')} above it"
            f" {c('lower').strip()}; upper: precision >= {st.get('precision_target')} above it {c('upper').strip()}"
            + ("" if st.get("precision_at_upper_reached", True) else " (target never reached: upper is above every score)"),
            f"global t*:  {f(st.get('global_threshold'))}{c('global_threshold')}   best-F1 threshold without margin",
        ]
        lines += self._report_decisions(f)
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

def _question_maxima(s: np.ndarray, y: np.ndarray, gid: np.ndarray, off_topic_max: Any) -> Tuple[np.ndarray, np.ndarray]:
    """Best-candidate scores of the queries with a relevant candidate (in-domain) and of those
    without (off-topic), the latter extended by ``off_topic_max``."""
    G = int(gid.max()) + 1 if gid.size else 0
    best = _group_max(s, gid, G)
    has_rel = np.bincount(gid[y > 0], minlength=G) > 0
    seen = np.bincount(gid, minlength=G) > 0
    off = best[seen & ~has_rel]
    if off_topic_max is not None:
        extra = np.asarray(off_topic_max, dtype=np.float64).ravel()
        if extra.size and not np.all(np.isfinite(extra)):
            raise CalibrationError("off_topic_max holds NaN or infinite scores; give each off-topic question's "
                                   "best candidate cosine")
        off = np.concatenate([off, extra])
    return best[seen & has_rel], off


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


