"""LangChain adapters for nbce-rag (``pip install 'nbce-rag[langchain]'``).

Every class is a thin layer over the core: the two language models call
:meth:`NBCEDecoder.stream` (directly, or through :meth:`RAGPipeline.stream`), so streaming,
stop strings, token accounting and per-token attribution are the core's.

=============================  =====================================================
``ChatNBCE``                   ``BaseChatModel``; passages as standard ``text-plain``
                               content blocks (or a ``documents=`` keyword); streaming;
                               usage metadata; sources in ``response_metadata["nbce"]``
``NBCELLM``                    ``LLM`` (string in, string out); passages as ``contexts=``;
                               the LLM cache is off by default (its key ignores keywords)
``CoSENTEmbeddings``           ``Embeddings`` over a :class:`CoSENTEncoder`
``CoSENTRetriever``            ``BaseRetriever`` over a :class:`VectorIndex` or any LangChain
                               ``VectorStore``; candidates are re-scored with the canonical
                               cosine, then filtered by a :class:`MarginThreshold`; ``k`` per call
``MarginThresholdFilter``      ``BaseDocumentCompressor`` applying a :class:`MarginThreshold`
``create_nbce_rag_chain``      question -> retrieve -> filter -> NBCE answer, streaming; returns
                               ``input``, ``context``, ``answer`` (like ``create_retrieval_chain``)
                               plus ``sources`` and ``supported``
``create_nbce_documents_chain``  drop-in for ``create_stuff_documents_chain`` inside
                               ``create_retrieval_chain``
=============================  =====================================================

>>> rag = RAGPipeline.from_pretrained(index="my_index")
>>> chain = create_nbce_rag_chain(rag.as_langchain_retriever(), rag.as_langchain_chat_model())
>>> for piece in chain.pick("answer").stream("How do I open a file?"): print(piece, end="")
>>> chain.invoke("How do I open a file?")["sources"]   # score and share of each passage

Modules: :mod:`.convert` (LangChain types <-> :class:`Passage`, messages, options, usage),
:mod:`.chat` (the two language models), :mod:`.retriever` (embeddings, retriever, filter),
:mod:`.chain` (the chains).
"""

from __future__ import annotations

try:
    from nbce_rag.integrations.langchain.chain import create_nbce_documents_chain, create_nbce_rag_chain
    from nbce_rag.integrations.langchain.chat import NBCELLM, ChatNBCE
    from nbce_rag.integrations.langchain.convert import (
        answer_metadata,  # noqa: F401 - public, outside __all__ as before
        decode_options,
        document_to_passage,
        documents_to_message,
        passage_to_document,
        split_messages,  # noqa: F401 - public, outside __all__ as before
    )
    from nbce_rag.integrations.langchain.retriever import CoSENTEmbeddings, CoSENTRetriever, MarginThresholdFilter
except ImportError as e:  # pragma: no cover - exercised only without the extra
    if (e.name or "").split(".")[0] not in ("langchain_core", "pydantic"):
        raise
    raise ImportError(
        "nbce_rag.integrations.langchain needs LangChain: pip install 'nbce-rag[langchain]' "
        f"(missing: {e.name})"
    ) from e

__all__ = [
    "ChatNBCE",
    "NBCELLM",
    "CoSENTEmbeddings",
    "CoSENTRetriever",
    "MarginThresholdFilter",
    "create_nbce_rag_chain",
    "create_nbce_documents_chain",
    "document_to_passage",
    "passage_to_document",
    "documents_to_message",
    "decode_options",
]
