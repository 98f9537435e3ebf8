"""Plain data types shared by the decoder, the retriever, the filter and the adapters."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class Passage:
    """A passage given to the decoder, or a hit returned by :meth:`VectorIndex.search`.

    ``score`` is the retrieval score (canonical cosine of the CoSENT encoder) when known.
    """

    text: str
    score: Optional[float] = None
    id: Optional[str] = None
    metadata: Dict[str, Any] = field(default_factory=dict)

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
            score=_opt_float(obj.get("score")),
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
            score=_opt_float(score),
            id=None if getattr(obj, "id", None) is None else str(getattr(obj, "id")),
            metadata=dict(meta) if isinstance(meta, dict) else {},
        )
    raise TypeError(
        f"{where}: expected a str, a Passage, a dict with 'text', or an object with a .text "
        f"attribute; got {type(obj).__name__}"
    )


def _opt_float(x: Any) -> Optional[float]:
    return None if x is None else float(x)


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
    completion_tokens: int = 0
    supported: bool = True  #: False when no passage backed the answer (closed-book)
    dropped: List[Any] = field(default_factory=list)  #: filter decisions, set by the pipeline

    @property
    def cited(self) -> List[SourceInfo]:
        """Sources that supplied at least one token, most-used first."""
        return sorted((s for s in self.sources if s.n_tokens), key=lambda s: -s.n_tokens)

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["dropped"] = [x.to_dict() if hasattr(x, "to_dict") else x for x in self.dropped]
        return d
