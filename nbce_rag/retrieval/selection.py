"""One retrieval path: candidates -> canonical cosine -> calibrated filter -> :class:`Selection`.

    question ──> candidates: a :class:`CandidateSource`'s ``search(q, k)``, or passages given
             ──> rescore (optional): the encoder's cosine replaces a store's own score,
                 then the candidates are re-sorted and cut to ``k``
             ──> MarginThreshold.filter (optional)
             ──> Selection(kept, dropped)

:class:`~nbce_rag.pipeline.RAGPipeline`, the LangChain retriever and compressor and the
LlamaIndex retriever and postprocessor all call :func:`select`; an adapter only queries its
own store and converts its ``Document``/``Node`` types to and from :class:`Passage`
(:attr:`Selection.kept_index` says which of its objects were kept).

Scores are the canonical cosine of the CoSENT encoder: a calibrated threshold only holds on
that scale, while external stores report a distance, ``1 - d``, ``exp(-d)`` or an inner
product. :func:`rescore` recomputes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, List, Optional, Protocol, Sequence, Tuple, Type, Union, runtime_checkable

import numpy as np

from nbce_rag.types import DroppedHit, FilterResult, Passage, as_passage

__all__ = [
    "Encoder",
    "CandidateSource",
    "Selection",
    "EmbeddingEncoder",
    "as_encoder",
    "candidate_encoder",
    "check_k",
    "identity_of",
    "rescore",
    "select",
]


@runtime_checkable
class Encoder(Protocol):
    """What re-scoring needs: ``encode(texts) -> (n, dim)`` vectors (a :class:`CoSENTEncoder`,
    or a framework's embeddings wrapped in :class:`EmbeddingEncoder`)."""

    def encode(self, texts: Sequence[str], **kwargs: Any) -> Any: ...


@runtime_checkable
class CandidateSource(Protocol):
    """Where candidates come from: ``search(query, k)`` -> up to ``k`` passages, best first
    (a :class:`~nbce_rag.retrieval.index.VectorIndex`, or an adapter around a framework's store)."""

    def search(self, query: str, k: int) -> List[Passage]: ...


@dataclass
class Selection:
    """The passages that reach the decoder, and the filter's decisions.

    ``kept_index`` / ``dropped_index``: the position of each kept / dropped passage among the
    candidates given to (or searched by) :func:`select`, so an adapter can return its own
    objects. ``result`` is the filter's full :class:`FilterResult` (threshold, margin, best
    score, confidence), ``None`` without a filter. Unpacks as ``kept, dropped = selection``.
    """

    kept: List[Passage]
    dropped: List[DroppedHit] = field(default_factory=list)
    kept_index: List[int] = field(default_factory=list)
    dropped_index: List[int] = field(default_factory=list)
    result: Optional[FilterResult] = None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.kept, self.dropped))

    def __getitem__(self, i: int) -> Any:
        return (self.kept, self.dropped)[i]

    def __len__(self) -> int:
        return 2


class EmbeddingEncoder:
    """Any ``texts -> vectors`` function as an :class:`Encoder`, e.g. a LangChain
    ``Embeddings.embed_documents`` or a LlamaIndex ``get_text_embedding_batch``."""

    def __init__(self, embed: Callable[[List[str]], Any]):
        self.embed = embed

    def encode(self, texts: Sequence[str], **_: Any) -> np.ndarray:
        return np.asarray(self.embed(list(texts)), dtype=np.float32)


def check_k(k: Any, name: str = "k") -> int:
    """``k`` (how many candidates) as an int >= 1, else a ``ValueError`` naming ``name``."""
    if k is None or int(k) < 1:
        raise ValueError(f"{name} must be >= 1 (got {k})")
    return int(k)


def as_encoder(
    obj: Any,
    *,
    native: Optional[Tuple[Type[Any], Callable[[Any], Any]]] = None,
    embeddings: Optional[Tuple[Type[Any], Callable[[Any], Callable[[List[str]], Any]]]] = None,
    what: str = "an encoder",
) -> Optional[Encoder]:
    """``obj`` as an :class:`Encoder` (``None`` stays ``None``).

    ``native = (cls, get)``: a framework wrapper around a CoSENT encoder; ``get(obj)`` is that
    encoder (so its identity is checked against the calibration). Anything with ``encode`` is
    used as it is. ``embeddings = (cls, fn)``: any other framework embeddings, re-scoring with
    the ``texts -> vectors`` function ``fn(obj)``. Otherwise ``TypeError`` naming ``what``.
    """
    if obj is None:
        return None
    if native is not None and isinstance(obj, native[0]):
        return native[1](obj)
    if hasattr(obj, "encode"):
        return obj
    if embeddings is not None and isinstance(obj, embeddings[0]):
        return EmbeddingEncoder(embeddings[1](obj))
    raise TypeError(f"encoder must be {what}, got {type(obj).__name__}")


def candidate_encoder(encoder: Any, index: Any = None, store_encoder: Callable[[], Any] = lambda: None) -> Encoder:
    """The encoder that scores a retriever's candidates: ``encoder`` (already through
    :func:`as_encoder`), else the ``index``'s, else ``store_encoder()`` (the store's own
    CoSENT embeddings, or ``None``); a ``ValueError`` that says what to pass otherwise."""
    if encoder is not None:
        return encoder
    if index is not None:
        return index.encoder
    enc = store_encoder()
    if enc is None:
        raise ValueError(
            "candidates from a vector store are re-scored with the canonical cosine: pass encoder= "
            "(a CoSENTEncoder, or the framework's CoSENT embeddings)"
        )
    return enc


def identity_of(obj: Any) -> Optional[str]:
    """The encoder identity of an encoder (``.identity``) or an index (``.encoder_identity``);
    ``None`` for anything else (a framework's embeddings: nothing to check)."""
    if obj is None:
        return None
    for attr in ("identity", "encoder_identity"):
        v = getattr(obj, attr, None)
        if isinstance(v, str):
            return v
    return None


def rescore(encoder: Any, query: str, hits: Sequence[Any]) -> List[Passage]:
    """Recompute the canonical cosine of ``hits`` against ``query`` with ``encoder``.

    Vector stores report scores their own way (a distance, ``1 - d``, ``1 - d/sqrt 2``, an
    inner product, ...); thresholds are only valid on the encoder's cosine. Returns new
    passages with ``score`` = cosine; a previous score is kept in
    ``metadata["store_score"]``. Order and the other fields are unchanged. ``encoder`` may
    also be an index (its ``.encoder`` is used).
    """
    ps = [as_passage(h, where="hits") for h in hits]
    if not ps:
        return []
    if not hasattr(encoder, "encode") and hasattr(encoder, "encoder"):
        encoder = encoder.encoder  # an index: use its encoder
    q = np.asarray(encoder.encode([query]), dtype=np.float32).reshape(1, -1)
    P = np.asarray(encoder.encode([p.text for p in ps]), dtype=np.float32).reshape(len(ps), -1)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    P = P / np.maximum(np.linalg.norm(P, axis=1, keepdims=True), 1e-12)
    cos = (P @ q[0]).astype(np.float64)
    out = []
    for p, c in zip(ps, cos):
        meta = dict(p.metadata)
        if p.score is not None:
            meta.setdefault("store_score", p.score)
        out.append(Passage(text=p.text, score=float(c), id=p.id, metadata=meta))
    return out


_rescore = rescore  # select() takes a flag of the same name


def select(
    question: str,
    candidates: Union[CandidateSource, Sequence[Any]],
    *,
    threshold: Any = None,
    encoder: Any = None,
    k: Optional[int] = None,
    fetch_k: Optional[int] = None,
    rescore: bool = False,
) -> Selection:
    """The candidates of ``question`` that pass the filter.

    ``candidates``: a :class:`CandidateSource` (searched for ``max(k, fetch_k)`` passages) or
    a list of passages (anything :func:`~nbce_rag.types.as_passage` accepts).
    ``rescore``: replace every score by the canonical cosine computed with ``encoder`` (an
    :class:`Encoder` or an index); with ``k`` the candidates are then re-sorted by it and cut
    to ``k``. ``threshold``: a :class:`~nbce_rag.filtering.threshold.MarginThreshold` (``None``: keep
    every candidate); ``encoder``, when it has an identity, is checked against the
    calibration's (:class:`~nbce_rag.errors.EncoderMismatchError`).
    """
    if isinstance(candidates, (str, bytes)):
        raise TypeError("candidates must be a list of passages or a source with search(); "
                        "wrap a single string in a list")
    if not isinstance(candidates, (list, tuple)) and hasattr(candidates, "search"):
        k = check_k(k)
        candidates = candidates.search(question, k=max(k, fetch_k or 0))
    ps = [as_passage(c, where=f"candidates[{i}]") for i, c in enumerate(candidates)]
    order = list(range(len(ps)))
    if rescore and ps:
        if encoder is None:
            raise ValueError("re-scoring candidates with the canonical cosine needs an encoder")
        ps = _rescore(encoder, question, ps)
        if k is not None:
            order = sorted(order, key=lambda i: -ps[i].score)[:k]
            ps = [ps[i] for i in order]
    if threshold is None:
        return Selection(ps, [], order, [])
    res = threshold.filter(ps, encoder if identity_of(encoder) is not None else None)
    where = {id(p): order[j] for j, p in enumerate(ps)}
    return Selection(list(res.kept), list(res.dropped), [where[id(p)] for p in res.kept],
                     [where[id(d.hit)] for d in res.dropped], res)
