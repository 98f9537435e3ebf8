"""Retrieval for LlamaIndex: :class:`CoSENTEmbedding`, :class:`CoSENTRetriever` (over a
:class:`VectorIndex`, a vector store, a ``VectorStoreIndex`` or any retriever, re-scored with
the canonical cosine) and :class:`MarginThresholdPostprocessor`; selection is
:func:`nbce_rag.retrieval.selection.select`."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Dict, List, Optional, Sequence

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.bridge.pydantic import ConfigDict, Field, PrivateAttr
from llama_index.core.callbacks import CallbackManager
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle
from llama_index.core.vector_stores.types import VectorStoreQuery

from nbce_rag.retrieval.selection import Selection, as_encoder, candidate_encoder, check_k, select

from nbce_rag.integrations.llama_index.convert import node_to_passage, passage_to_node


class CoSENTEmbedding(BaseEmbedding):
    """LlamaIndex ``BaseEmbedding`` over a :class:`CoSENTEncoder` (L2-normalised vectors).
    ``encoder=`` an encoder, or ``model_name=`` one to load (``None`` = bundled
    all-MiniLM-L6-v2), loaded on first use."""

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    device: Optional[str] = None
    dtype: Optional[str] = Field(default=None, description="the encoder's compute dtype: float32, bfloat16 or auto (default)")
    _encoder: Any = PrivateAttr(default=None)
    _source: Optional[str] = PrivateAttr(default=None)
    _lock: Any = PrivateAttr(default_factory=threading.Lock)

    def __init__(self, encoder: Any = None, model_name: Optional[str] = None, **kwargs: Any) -> None:
        from nbce_rag.retrieval.encoder import BUNDLED_NAME

        name = model_name or (getattr(encoder, "name", None) if encoder is not None else None) or BUNDLED_NAME
        super().__init__(model_name=str(name), **kwargs)
        self._encoder = encoder
        self._source = model_name

    @classmethod
    def class_name(cls) -> str:
        return "CoSENTEmbedding"

    @classmethod
    def from_pipeline(cls, pipeline: Any, **kwargs: Any) -> "CoSENTEmbedding":
        return cls(encoder=pipeline.index.encoder, **kwargs)

    @property
    def encoder(self) -> Any:
        if self._encoder is None:
            with self._lock:
                if self._encoder is None:
                    from nbce_rag.retrieval.encoder import CoSENTEncoder

                    self._encoder = CoSENTEncoder.from_pretrained(self._source, device=self.device, dtype=self.dtype)
        return self._encoder

    def _get_text_embeddings(self, texts: List[str]) -> List[List[float]]:
        if not texts:
            return []
        return self.encoder.encode(list(texts), batch_size=self.embed_batch_size, show_progress_bar=False).astype(float).tolist()

    def _get_text_embedding(self, text: str) -> List[float]:
        return self._get_text_embeddings([text])[0]

    def _get_query_embedding(self, query: str) -> List[float]:
        return self._get_text_embeddings([query])[0]

    async def _aget_query_embedding(self, query: str) -> List[float]:
        return await asyncio.to_thread(self._get_query_embedding, query)

    async def _aget_text_embedding(self, text: str) -> List[float]:
        return await asyncio.to_thread(self._get_text_embedding, text)

    async def _aget_text_embeddings(self, texts: List[str]) -> List[List[float]]:
        return await asyncio.to_thread(self._get_text_embeddings, texts)


def _as_encoder(obj: Any) -> Any:
    return as_encoder(obj, native=(CoSENTEmbedding, lambda e: e.encoder),
                      embeddings=(BaseEmbedding, lambda e: e.get_text_embedding_batch),
                      what="a CoSENTEncoder or a LlamaIndex BaseEmbedding")


def _select_nodes(query: str, nodes: Sequence[NodeWithScore], **how: Any) -> Selection:
    """:func:`nbce_rag.retrieval.selection.select` over nodes (their text without metadata, their score)."""
    return select(query, [node_to_passage(n, metadata_mode=MetadataMode.NONE) for n in nodes], **how)


def _kept_nodes(nodes: Sequence[NodeWithScore], sel: Selection) -> List[NodeWithScore]:
    """The nodes a selection kept, in its order, scored with the (canonical) score it used."""
    return [NodeWithScore(node=nodes[i].node, score=p.score) for p, i in zip(sel.kept, sel.kept_index)]


class CoSENTRetriever(BaseRetriever):
    """Top-``similarity_top_k`` nodes for a query, scored with the canonical cosine of the
    CoSENT encoder and (optionally) filtered by a calibrated :class:`MarginThreshold`.

    Candidates come from exactly one of:

    - ``index``: an nbce-rag :class:`VectorIndex` (scores are already the cosine);
    - ``vector_store``: a LlamaIndex vector store (``PGVectorStore``, ``FaissVectorStore``
      inside a ``VectorStoreIndex``...), a ``VectorStoreIndex``, or any LlamaIndex retriever.
      A raw store is queried with ``embed_model`` (default: a :class:`CoSENTEmbedding` over
      ``encoder``) and must store text; an index or retriever uses its own embedding.

    ``fetch_k`` candidates (default ``similarity_top_k``) are re-scored with ``encoder`` (a
    :class:`CoSENTEncoder` or any ``BaseEmbedding``; default the index's encoder), re-sorted
    and cut to ``similarity_top_k`` before the filter: stores report scores their own way
    (``exp(-d)``, ``1 - d``, inner products), a threshold only holds on the cosine. Nodes are
    returned unchanged with ``score`` = cosine. :attr:`last_dropped` holds the filter's
    decisions of the last call and :attr:`last_selection` its :class:`Selection` (with the
    support decision in ``result``; per instance; not meant for concurrent use).
    """

    def __init__(self, index: Any = None, vector_store: Any = None, *, encoder: Any = None, threshold: Any = None,
                 similarity_top_k: int = 10, fetch_k: Optional[int] = None, embed_model: Optional[BaseEmbedding] = None,
                 callback_manager: Optional[CallbackManager] = None, verbose: bool = False) -> None:
        if (index is None) == (vector_store is None):
            raise ValueError("CoSENTRetriever needs exactly one candidate source: index= or vector_store=")
        self.similarity_top_k = check_k(similarity_top_k, "similarity_top_k")
        self.index = index
        self.vector_store = vector_store
        self.encoder = encoder
        self.threshold = threshold
        self.fetch_k = fetch_k
        self.embed_model = embed_model
        self.last_dropped: List[Any] = []
        #: the last call's Selection (``result``: the filter's keep and support decisions), or None
        self.last_selection: Any = None
        super().__init__(callback_manager=callback_manager, verbose=verbose)

    @classmethod
    def from_pipeline(cls, pipeline: Any, **kwargs: Any) -> "CoSENTRetriever":
        """The pipeline's index, filter and ``k`` as a retriever (override any by keyword)."""
        kwargs.setdefault("threshold", pipeline.threshold)
        kwargs.setdefault("similarity_top_k", pipeline.k)
        if "vector_store" not in kwargs:
            kwargs.setdefault("index", pipeline.index)
        return cls(**kwargs)

    def _get_prompts(self) -> Dict[str, Any]:
        return {}

    def _encoder(self) -> Any:
        def own() -> Any:
            for emb in (self.embed_model, getattr(self.vector_store, "_embed_model", None)):
                if isinstance(emb, CoSENTEmbedding):
                    return emb.encoder
            return None

        return candidate_encoder(_as_encoder(self.encoder), self.index, own)

    def _store_embed_model(self) -> BaseEmbedding:
        if self.embed_model is None:
            self.embed_model = CoSENTEmbedding(encoder=self._encoder())
        return self.embed_model

    def _n(self) -> int:
        return max(self.similarity_top_k, self.fetch_k or 0)

    def _store_query(self, qb: QueryBundle) -> List[NodeWithScore]:
        vs, n = self.vector_store, self._n()
        if hasattr(vs, "as_retriever") and hasattr(vs, "docstore"):  # a VectorStoreIndex
            return vs.as_retriever(similarity_top_k=n).retrieve(qb)
        if isinstance(vs, BaseRetriever):
            return vs.retrieve(qb)
        emb = qb.embedding or self._store_embed_model().get_query_embedding(qb.query_str)
        return self._from_result(vs.query(VectorStoreQuery(query_embedding=emb, similarity_top_k=n, query_str=qb.query_str)))

    async def _astore_query(self, qb: QueryBundle) -> List[NodeWithScore]:
        vs, n = self.vector_store, self._n()
        if hasattr(vs, "as_retriever") and hasattr(vs, "docstore"):
            return await vs.as_retriever(similarity_top_k=n).aretrieve(qb)
        if isinstance(vs, BaseRetriever):
            return await vs.aretrieve(qb)
        emb = qb.embedding or await self._store_embed_model().aget_query_embedding(qb.query_str)
        return self._from_result(await vs.aquery(VectorStoreQuery(query_embedding=emb, similarity_top_k=n, query_str=qb.query_str)))

    @staticmethod
    def _from_result(res: Any) -> List[NodeWithScore]:
        if res.nodes is None:
            raise ValueError(
                "this vector store returned ids only (it does not store text); wrap it in a "
                "VectorStoreIndex (which has the docstore) and pass that as vector_store="
            )
        sims = res.similarities or [None] * len(res.nodes)
        return [NodeWithScore(node=n, score=s) for n, s in zip(res.nodes, sims)]

    def _select(self, query: str, nodes: List[NodeWithScore], from_store: bool) -> List[NodeWithScore]:
        """Re-score store candidates (cut to ``similarity_top_k``), filter; record the drops."""
        enc = self._encoder() if from_store or self.threshold is not None else None
        sel = _select_nodes(query, nodes, threshold=self.threshold, encoder=enc, rescore=from_store,
                            k=self.similarity_top_k if from_store else None)
        self.last_dropped = [dict(d.to_dict(), node_id=nodes[i].node.node_id)
                             for d, i in zip(sel.dropped, sel.dropped_index)]
        self.last_selection = sel
        return _kept_nodes(nodes, sel)

    def _retrieve(self, query_bundle: QueryBundle) -> List[NodeWithScore]:
        q = query_bundle.query_str
        if self.index is not None:
            return self._select(q, [passage_to_node(h) for h in self.index.search(q, k=self.similarity_top_k)], False)
        return self._select(q, self._store_query(query_bundle), True)

    async def _aretrieve(self, query_bundle: QueryBundle) -> List[NodeWithScore]:
        if self.index is not None:
            return await asyncio.to_thread(self._retrieve, query_bundle)
        nodes = await self._astore_query(query_bundle)
        return await asyncio.to_thread(self._select, query_bundle.query_str, nodes, True)


class MarginThresholdPostprocessor(BaseNodePostprocessor):
    """Keep the nodes that pass a calibrated :class:`MarginThreshold`. With ``encoder`` (a
    :class:`CoSENTEncoder` or ``BaseEmbedding``) and a query, nodes are first re-scored with
    the canonical cosine; otherwise their ``score`` must be that cosine."""

    threshold: Any = Field(description="a MarginThreshold")
    encoder: Any = Field(default=None, exclude=True)
    rescore: bool = True

    @classmethod
    def class_name(cls) -> str:
        return "MarginThresholdPostprocessor"

    @classmethod
    def from_pipeline(cls, pipeline: Any, **kwargs: Any) -> "MarginThresholdPostprocessor":
        return cls(**{**pipeline.filter_settings(), **kwargs})

    def _postprocess_nodes(self, nodes: List[NodeWithScore], query_bundle: Optional[QueryBundle] = None) -> List[NodeWithScore]:
        enc = _as_encoder(self.encoder)
        rescore = enc is not None and self.rescore and query_bundle is not None
        sel = _select_nodes(query_bundle.query_str if query_bundle is not None else "", nodes,
                            threshold=self.threshold, encoder=enc, rescore=rescore)
        return _kept_nodes(nodes, sel)
