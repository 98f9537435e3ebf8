"""Plain data types shared by the decoder, the retriever, the filter and the adapters.

:class:`Passage` (= :data:`Hit`) goes in; :class:`DroppedHit` and :class:`FilterResult` say
what the filter decided; :class:`SourceInfo`, :class:`StreamEvent` and :class:`Answer` come
out of the decoder. ``Answer.usage()`` and ``Answer.metadata()`` are the one place an answer
is turned into the plain data the adapters and the server report.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional

#: largest |score| a passage may carry: far above any cosine, BM25 or store distance, and small
#: enough that score arithmetic (softmax(score / temperature) in float32) stays finite
SCORE_LIMIT = 1e9


@dataclass
class Passage:
    """A passage given to the decoder, or a hit returned by :meth:`VectorIndex.search`.

    ``score`` is the retrieval score (canonical cosine of the CoSENT encoder) when known: a
    finite number with ``|score| <= SCORE_LIMIT`` (stored as ``float``), or ``None``; anything
    else raises ``ValueError`` when the passage is made.
    """

    text: str
    score: Optional[float] = None
    id: Optional[str] = None
    metadata: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.score = check_score(self.score)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


#: A search result is a passage with its score set; the two are one type so hits go straight
#: into the decoder.
Hit = Passage


def as_passage(obj: Any, *, where: str = "passages") -> Passage:
    """Normalise a user-given passage: a ``str``, a :class:`Passage`, a mapping with ``text``
    (and optional ``score``/``id``/``metadata``), or any object with ``.text`` / ``.page_content``
    (LangChain ``Document``) and an optional ``.score``. Raises ``TypeError`` otherwise."""
    if isinstance(obj, Passage):
        check_score(obj.score, where=where)  # it may have been changed since it was made
        return obj
    if isinstance(obj, str):
        return Passage(text=obj)
    if isinstance(obj, dict):
        text = obj.get("text", obj.get("page_content"))
        if not isinstance(text, str):
            raise TypeError(
                f"{where}: a dict passage needs a string 'text' field, got keys {sorted(obj)}"
            )
        return Passage(
            text=text,
            score=check_score(obj.get("score"), where=where),
            id=None if obj.get("id") is None else str(obj.get("id")),
            metadata=dict(obj.get("metadata") or {}),
        )
    text = getattr(obj, "text", None)
    if text is None:
        text = getattr(obj, "page_content", None)
    if isinstance(text, str):
        meta = getattr(obj, "metadata", None)
        score = getattr(obj, "score", None)
        if score is None and isinstance(meta, dict):  # LangChain keeps scores in metadata
            score = meta.get("score")
        return Passage(
            text=text,
            score=check_score(score, where=where),
            id=None if getattr(obj, "id", None) is None else str(getattr(obj, "id")),
            metadata=dict(meta) if isinstance(meta, dict) else {},
        )
    raise TypeError(
        f"{where}: expected a str, a Passage, a dict with 'text', or an object with a .text "
        f"attribute; got {type(obj).__name__}"
    )


def check_score(x: Any, *, where: str = "passage") -> Optional[float]:
    """A passage score as ``float`` (or ``None``); ``ValueError`` unless it is a finite number
    (a numeric string counts) with ``|x| <= SCORE_LIMIT``."""
    if x is None:
        return None
    if isinstance(x, bool):
        raise ValueError(f"{where}: a passage score must be a number or None, got {x!r}")
    try:
        f = float(x) if isinstance(x, (numbers.Real, str)) or hasattr(x, "__float__") else None
    except (TypeError, ValueError, OverflowError):
        f = None
    if f is None:
        raise ValueError(f"{where}: a passage score must be a number or None, got {type(x).__name__} {str(x)[:40]!r}")
    if not math.isfinite(f) or abs(f) > SCORE_LIMIT:
        raise ValueError(
            f"{where}: a passage score must be finite with |score| <= {SCORE_LIMIT:g}, got {f!r}; "
            "drop the score (None) or re-score the passage (MarginThreshold.rescore)"
        )
    return f


def document_id(hit: Any) -> Optional[str]:
    """The document a passage is, or is a chunk of: ``metadata["doc_id"]``, else the part of a
    ``"<doc id>#<n>"`` chunk id (as :meth:`VectorIndex.add` makes them) before the last ``#``,
    else its id. The one chunk -> document rule (calibration labels, hard-negative mining)."""
    meta = getattr(hit, "metadata", None)
    if isinstance(meta, dict) and meta.get("doc_id") is not None:
        return str(meta["doc_id"])
    hid = getattr(hit, "id", None)
    if hid is None:
        return None
    return str(hid).rsplit("#", 1)[0]


def pop_passages(kwargs: Dict[str, Any], convert: Callable[[Any], Passage] = as_passage) -> Optional[List[Passage]]:
    """Remove the passages given to a framework's model call as ``contexts=`` (or its alias
    ``documents=``) from ``kwargs`` and return them converted; ``None`` when neither is given."""
    contexts = kwargs.pop("contexts", None)
    documents = kwargs.pop("documents", None)
    if contexts is not None and documents is not None:
        raise TypeError("pass passages as contexts= or documents=, not both")
    contexts = contexts if contexts is not None else documents
    if isinstance(contexts, (str, bytes)):
        raise TypeError("contexts must be a list of passages; wrap a single string in a list")
    return None if contexts is None else [convert(c) for c in contexts]



@dataclass
class DroppedHit:
    """A candidate the filter dropped, and why."""

    hit: Passage
    reason: str  #: human-readable, with the numbers that decided it
    code: str  #: machine-readable: "below_threshold" | "outside_margin" | "no_score"
    zone: str = "uncertain"  #: "confident" (below ``lower``) or "uncertain" (inside the band)

    @property
    def score(self) -> Optional[float]:
        return self.hit.score

    def to_dict(self) -> Dict[str, Any]:
        return {
            "hit": self.hit.to_dict(),
            "score": self.hit.score,
            "reason": self.reason,
            "code": self.code,
            "zone": self.zone,
        }


@dataclass
class FilterResult:
    """What :meth:`MarginThreshold.filter` decided for one query's candidates: the ``keep``
    decision (``kept`` / ``dropped``) and the ``support`` decision (``supported``).

    ``kept`` keeps the input order. An empty ``kept`` means *no relevant context*: the pipeline
    abstains (or answers closed-book when asked), flagged unsupported; it never falls back to
    top-k. ``supported`` is ``s_max >= support_threshold`` (``support_score`` = ``best_score``
    = ``s_max``); when it is not given (a result made by hand) it is "some passage was kept".
    """

    kept: List[Passage]
    dropped: List[DroppedHit]
    threshold: float  #: the keep threshold
    margin: Optional[float]  #: the keep margin
    best_score: Optional[float]  #: s_max of the candidates (None when there were none)
    confident: List[bool] = field(default_factory=list)  #: per kept hit: score >= upper
    supported: Optional[bool] = None  #: the support decision (None given: bool(kept))
    support_threshold: Optional[float] = None  #: the support rule's threshold on s_max
    calibration: Optional[str] = None  #: where the calibration came from (labelled / synthetic / prior / ...)

    def __post_init__(self) -> None:
        if self.supported is None:
            self.supported = bool(self.kept)

    @property
    def empty(self) -> bool:
        return not self.kept

    @property
    def support_score(self) -> Optional[float]:
        """The score the support decision reads: the best candidate's (``s_max``)."""
        return self.best_score

    def __len__(self) -> int:
        return len(self.kept)

    def __iter__(self):
        return iter(self.kept)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "kept": [h.to_dict() for h in self.kept],
            "dropped": [d.to_dict() for d in self.dropped],
            "threshold": self.threshold,
            "margin": self.margin,
            "best_score": self.best_score,
            "confident": list(self.confident),
            "supported": bool(self.supported),
            "support_score": self.best_score,
            "support_threshold": self.support_threshold,
            "calibration": self.calibration,
        }


@dataclass
class SourceInfo:
    """What one passage contributed to an answer."""

    index: int  #: position in the ``passages`` list given to the decoder
    text: str
    score: Optional[float] = None  #: retrieval score, or the decoder's scorer's (``metadata["score_from"]``)
    n_tokens: int = 0  #: generated tokens drawn from this passage
    share: float = 0.0  #: n_tokens / all generated tokens
    id: Optional[str] = None
    metadata: Dict[str, Any] = field(default_factory=dict)
    #: the pooling's weight of this passage (summed over its windows) at the first generated
    #: token, and at the last (for ``posterior`` with the online update: the posterior after the
    #: answer); selection poolings give 0/1. None without passages.
    weight_initial: Optional[float] = None
    weight_final: Optional[float] = None

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class StreamEvent:
    """One step of :meth:`NBCEDecoder.stream`: the new text and where it came from.

    ``text`` may be empty while a multi-byte character or a possible stop string is held back;
    the concatenation of all ``text`` equals ``Answer.text``. The last event has
    ``finish_reason`` set (``"stop"`` or ``"length"``) and carries the final :class:`Answer`.
    """

    text: str
    token_id: Optional[int] = None
    source: Optional[int] = None  #: passage index, -1 for the no-passage row
    finish_reason: Optional[str] = None
    answer: Optional["Answer"] = None


@dataclass
class Answer:
    """The result of :meth:`NBCEDecoder.generate` (and of the pipeline)."""

    text: str
    token_ids: List[int]
    token_sources: List[int]  #: per generated token: passage index, -1 = no-passage row
    sources: List[SourceInfo]  #: one per passage given, in the order given
    finish_reason: str = "length"
    prompt_tokens: int = 0  #: tokens prefilled over all rows
    cached_tokens: int = 0  #: of prompt_tokens, those taken from the passage KV cache (not recomputed)
    completion_tokens: int = 0
    #: the filter's ``support`` decision (the best candidate's score ``support_score`` >=
    #: ``support_threshold``) and some passage was decoded; without a filter: some passage was given
    supported: bool = True
    dropped: List[DroppedHit] = field(default_factory=list)  #: filter decisions, set by the pipeline
    #: which calibration filtered (labelled / synthetic / prior / none), set by the pipeline
    calibration: Optional[str] = None
    support_score: Optional[float] = None  #: s_max, the score the support decision read (None: no filter ran)
    support_threshold: Optional[float] = None  #: the support rule's threshold (None: no filter ran)
    #: "passages" (decoded from passages), "abstained" (nothing passed the filter: no decoding, the
    #: answer says so) or "closed_book" (the model alone: nothing passed, or no passage was given)
    answered_from: str = "passages"
    notes: List[str] = field(default_factory=list)  #: what the pipeline did that the caller should know

    @property
    def cited(self) -> List[SourceInfo]:
        """Sources that supplied at least one token, most-used first."""
        return sorted((s for s in self.sources if s.n_tokens), key=lambda s: -s.n_tokens)

    def usage(self) -> Dict[str, Any]:
        """Token counts in the OpenAI ``usage`` shape: ``prompt_tokens`` (over all rows),
        ``completion_tokens``, ``total_tokens`` and ``prompt_tokens_details.cached_tokens`` (of
        the prompt tokens, those taken from the passage KV cache, as OpenAI reports its prompt
        caching)."""
        return {
            "prompt_tokens": int(self.prompt_tokens),
            "completion_tokens": int(self.completion_tokens),
            "total_tokens": int(self.prompt_tokens + self.completion_tokens),
            "prompt_tokens_details": {"cached_tokens": int(self.cached_tokens)},
        }

    def grounding(self) -> Dict[str, Any]:
        """The filter's decisions for this answer, as plain data: ``supported``,
        ``support_score`` / ``support_threshold`` (the support rule), ``calibration`` (which
        calibration decided), ``answered_from``, ``kept`` (passages decoded), ``dropped`` (how many)
        and ``notes``."""
        return {
            "supported": bool(self.supported),
            "support_score": self.support_score,
            "support_threshold": self.support_threshold,
            "calibration": self.calibration,
            "answered_from": self.answered_from,
            "kept": len(self.sources),
            "dropped": len(self.dropped),
            "notes": list(self.notes),
        }

    def metadata(self) -> Dict[str, Any]:
        """What the answer says about its grounding, as plain JSON-able data: :meth:`grounding`'s
        fields, with ``sources`` (score, tokens, share, initial and final pooling weight per
        passage), ``dropped`` (the filter's decisions, one per candidate) and ``token_sources``."""
        return {
            **self.grounding(),
            "sources": [s.to_dict() for s in self.sources],
            "dropped": [_dropped_dict(x) for x in self.dropped],
            "token_sources": list(self.token_sources),
        }

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["dropped"] = [_dropped_dict(x) for x in self.dropped]
        return d


def _dropped_dict(x: Any) -> Any:
    return x.to_dict() if hasattr(x, "to_dict") else x
