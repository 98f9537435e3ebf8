"""Retrieval for LangChain: :class:`CoSENTEmbeddings`, :class:`CoSENTRetriever` (over a
:class:`VectorIndex` or any ``VectorStore``, re-scored with the canonical cosine) and
:class:`MarginThresholdFilter`; selection is :func:`nbce_rag.retrieval.selection.select`."""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any, Dict, List, Mapping, Optional, Sequence

from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun, Callbacks
from langchain_core.documents import BaseDocumentCompressor, Document
from langchain_core.embeddings import Embeddings
from langchain_core.retrievers import BaseRetriever
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from nbce_rag.retrieval.selection import Selection, as_encoder, candidate_encoder, check_k, select
from nbce_rag.types import Passage

from nbce_rag.integrations.langchain.convert import document_to_passage, passage_to_document


class CoSENTEmbeddings(BaseModel, Embeddings):
    """LangChain ``Embeddings`` over a :class:`CoSENTEncoder` (L2-normalised vectors, so
    inner product = cosine). ``model``: the encoder to load (``None`` = the bundled
    all-MiniLM-L6-v2, a directory, or a sentence-transformers id); or pass ``encoder=``.
    ``dtype``: the encoder's compute dtype (``CoSENTEncoder.dtype``; default auto)."""

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True, protected_namespaces=(),
                              extra="forbid")

    model_name: Optional[str] = Field(default=None, alias="model")
    encoder: Any = Field(default=None, exclude=True)
    device: Optional[str] = None
    dtype: Optional[str] = None
    batch_size: int = 32

    _lock: Any = PrivateAttr(default_factory=threading.Lock)

    @classmethod
    def from_pipeline(cls, pipeline: Any, **kwargs: Any) -> "CoSENTEmbeddings":
        return cls(encoder=pipeline.index.encoder, **kwargs)

    def get_encoder(self) -> Any:
        if self.encoder is None:
            with self._lock:
                if self.encoder is None:
                    from nbce_rag.retrieval.encoder import CoSENTEncoder

                    self.encoder = CoSENTEncoder.from_pretrained(self.model_name, device=self.device, dtype=self.dtype)
        return self.encoder

    def embed_documents(self, texts: List[str]) -> List[List[float]]:
        if not texts:
            return []
        vecs = self.get_encoder().encode(list(texts), batch_size=self.batch_size, show_progress_bar=False)
        return vecs.astype(float).tolist()

    def embed_query(self, text: str) -> List[float]:
        return self.embed_documents([text])[0]


def _as_encoder(obj: Any) -> Any:
    return as_encoder(obj, native=(CoSENTEmbeddings, lambda e: e.get_encoder()),
                      embeddings=(Embeddings, lambda e: e.embed_documents),
                      what="a CoSENTEncoder or a LangChain Embeddings")


class _VectorStoreSource:
    """A LangChain ``VectorStore`` as a candidate source; its own scores are kept (and
    replaced by the canonical cosine in :func:`nbce_rag.retrieval.selection.select`)."""

    def __init__(self, store: Any, search_kwargs: Mapping[str, Any]):
        self.store = store
        self.search_kwargs = dict(search_kwargs)

    def search(self, query: str, k: int) -> List[Passage]:
        try:
            pairs = self.store.similarity_search_with_score(query, k=k, **self.search_kwargs)
        except NotImplementedError:
            pairs = [(d, None) for d in self.store.similarity_search(query, k=k, **self.search_kwargs)]
        return [replace(document_to_passage(d), score=None if s is None else float(s)) for d, s in pairs]


class CoSENTRetriever(BaseRetriever):
    """Top-``k`` passages for a query, scored with the canonical cosine of the CoSENT encoder
    and (optionally) filtered by a calibrated :class:`MarginThreshold`.

    Candidates come from an nbce-rag :class:`VectorIndex` (``index=``), or from any LangChain
    ``VectorStore`` (``vectorstore=``: PGVector, FAISS, Chroma, ...), whose own scores (a
    distance, ``1 - d``, an inner product...) are replaced by the cosine computed with
    ``encoder`` (a :class:`CoSENTEncoder`, :class:`CoSENTEmbeddings`, or any ``Embeddings``;
    default: the index's encoder, or the store's embeddings when they are
    :class:`CoSENTEmbeddings`). ``fetch_k`` candidates (default ``k``) are drawn, re-sorted by
    cosine and cut to ``k`` before the filter.

    Documents carry the cosine in ``metadata["score"]`` (a store's own score in
    ``metadata["store_score"]``) and the chunk id in ``Document.id``. ``k`` may be given per
    call: ``retriever.invoke(q, k=3)``. With a threshold, fewer (possibly zero) documents
    come back: zero means nothing relevant, and the answer should be flagged unsupported.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    index: Any = None
    vectorstore: Any = None
    encoder: Any = None
    threshold: Any = None
    k: int = 10
    fetch_k: Optional[int] = None
    search_kwargs: Dict[str, Any] = Field(default_factory=dict)
    #: which calibration filters (set by from_pipeline; reported by create_nbce_rag_chain)
    calibration: Optional[str] = None
    _last: Any = PrivateAttr(default=None)

    @property
    def last_selection(self) -> Optional[Selection]:
        """The last call's :class:`Selection` (``result``: the filter's keep and support
        decisions), or None (per instance; not meant for concurrent use)."""
        return self._last

    @classmethod
    def from_pipeline(cls, pipeline: Any, **kwargs: Any) -> "CoSENTRetriever":
        """The pipeline's index, filter and ``k`` as a retriever (override any by keyword)."""
        kwargs.setdefault("calibration", getattr(pipeline, "calibration", None))
        kwargs.setdefault("index", pipeline.index)
        kwargs.setdefault("threshold", pipeline.threshold)
        kwargs.setdefault("k", pipeline.k)
        return cls(**kwargs)

    def model_post_init(self, __context: Any) -> None:
        if (self.index is None) == (self.vectorstore is None):
            raise ValueError("CoSENTRetriever needs exactly one candidate source: index= or vectorstore=")
        check_k(self.k)

    def _encoder(self) -> Any:
        emb = getattr(self.vectorstore, "embeddings", None)
        return candidate_encoder(_as_encoder(self.encoder), self.index,
                                 lambda: emb.get_encoder() if isinstance(emb, CoSENTEmbeddings) else None)

    def select(self, query: str, k: Optional[int] = None) -> Selection:
        """``(kept, dropped)`` passages for ``query`` (what :meth:`RAGPipeline.select` returns)."""
        k = check_k(k or self.k)
        if self.index is not None:
            enc = self._encoder() if self.threshold is not None else None
            return select(query, self.index, threshold=self.threshold, encoder=enc, k=k)
        return select(query, _VectorStoreSource(self.vectorstore, self.search_kwargs), threshold=self.threshold,
                      encoder=self._encoder(), k=k, fetch_k=self.fetch_k, rescore=True)

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun,
                                k: Optional[int] = None) -> List[Document]:
        sel = self._last = self.select(query, k)
        return [passage_to_document(p) for p in sel.kept]

    async def _aget_relevant_documents(self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun,
                                       k: Optional[int] = None) -> List[Document]:
        import asyncio

        sel = self._last = await asyncio.to_thread(self.select, query, k)
        return [passage_to_document(p) for p in sel.kept]


class MarginThresholdFilter(BaseDocumentCompressor):
    """A ``BaseDocumentCompressor`` keeping the documents that pass a calibrated
    :class:`MarginThreshold` (global threshold + margin below the best candidate).

    With ``encoder`` (or ``rescore=True`` and an index's encoder), every document is first
    re-scored with the canonical cosine against the query, so candidates from any store are
    judged on the scale the threshold was calibrated on; without, ``metadata["score"]`` must
    hold that cosine. Use it in ``ContextualCompressionRetriever`` (langchain-classic), in
    :func:`create_nbce_rag_chain`, or directly.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    threshold: Any
    encoder: Any = None
    rescore: bool = True

    @classmethod
    def from_pipeline(cls, pipeline: Any, **kwargs: Any) -> "MarginThresholdFilter":
        return cls(**{**pipeline.filter_settings(), **kwargs})

    def filter(self, documents: Sequence[Document], query: str) -> Selection:
        """The :class:`~nbce_rag.retrieval.selection.Selection`: kept and dropped passages with reasons,
        ``kept_index`` (positions in ``documents``) and the full ``result``."""
        enc = _as_encoder(self.encoder)
        return select(query, [document_to_passage(d) for d in documents], threshold=self.threshold, encoder=enc,
                      rescore=enc is not None and self.rescore)

    def compress_documents(self, documents: Sequence[Document], query: str,
                           callbacks: Optional[Callbacks] = None) -> Sequence[Document]:
        sel = self.filter(documents, query)
        out = []
        for p, i in zip(sel.kept, sel.kept_index):
            orig = documents[i]
            meta = dict(orig.metadata or {})
            meta["score"] = float(p.score)
            if "store_score" in p.metadata:
                meta.setdefault("store_score", p.metadata["store_score"])
            out.append(Document(page_content=orig.page_content, id=orig.id, metadata=meta))
        return out
