"""LlamaIndex adapters for nbce-rag (``pip install 'nbce-rag[llamaindex]'``).

=================================  ==================================================
``NBCELLM``                        ``CustomLLM``: ``complete(question, contexts=[...])``,
                                   streaming and async; sources in ``additional_kwargs``
``NBCESynthesizer``                ``BaseSynthesizer``: each node is a separate NBCE
                                   passage (never stuffed/refined into one prompt)
``CoSENTEmbedding``                ``BaseEmbedding`` over a :class:`CoSENTEncoder`
``CoSENTRetriever``                ``BaseRetriever`` over a :class:`VectorIndex`, a
                                   LlamaIndex vector store, a ``VectorStoreIndex`` or any
                                   retriever; candidates re-scored with the canonical
                                   cosine, then filtered by a :class:`MarginThreshold`
``MarginThresholdPostprocessor``   ``BaseNodePostprocessor`` applying a :class:`MarginThreshold`
``NBCEQueryEngine``                ``CustomQueryEngine``: retrieve -> postprocess -> NBCE;
                                   ``query``, ``aquery``, streaming
=================================  ==================================================

Nothing here reads ``Settings.llm`` or ``Settings.embed_model``: every component is given
its model, or builds the nbce-rag default (the bundled models), so no code path falls back
to OpenAI. All decoding goes through :meth:`NBCEDecoder.stream` (directly or via
:meth:`RAGPipeline.stream`).

>>> rag = RAGPipeline.from_pretrained(index="my_index")
>>> engine = rag.as_query_engine(streaming=True)
>>> engine.query("How do I open a file?").print_response_stream()

Modules: :mod:`.convert` (nodes <-> :class:`Passage`, messages, answer metadata), :mod:`.llm`,
:mod:`.synthesizer`, :mod:`.retriever` (embedding, retriever, postprocessor), :mod:`.query_engine`.
"""

from __future__ import annotations

try:
    from nbce_rag.integrations.llama_index.convert import (  # noqa: F401 - answer_info: public, outside __all__
        answer_info,
        messages_to_question,
        node_to_passage,
        passage_to_node,
    )
    from nbce_rag.integrations.llama_index.llm import NBCELLM
    from nbce_rag.integrations.llama_index.query_engine import NBCEQueryEngine
    from nbce_rag.integrations.llama_index.retriever import CoSENTEmbedding, CoSENTRetriever, MarginThresholdPostprocessor
    from nbce_rag.integrations.llama_index.synthesizer import NBCESynthesizer, dispatcher  # noqa: F401 - public
except ImportError as e:  # pragma: no cover - exercised only without the extra
    if (e.name or "").split(".")[0] not in ("llama_index", "pydantic"):
        raise
    raise ImportError(
        "nbce_rag.integrations.llama_index needs LlamaIndex: pip install 'nbce-rag[llamaindex]' "
        f"(missing: {e.name})"
    ) from e

__all__ = [
    "NBCELLM",
    "NBCESynthesizer",
    "CoSENTEmbedding",
    "CoSENTRetriever",
    "MarginThresholdPostprocessor",
    "NBCEQueryEngine",
    "node_to_passage",
    "passage_to_node",
    "messages_to_question",
]
