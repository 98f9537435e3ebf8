"""LangChain chains over the NBCE models: :func:`create_nbce_rag_chain` (question -> retrieve
-> filter -> answer, with the grounding) and :func:`create_nbce_documents_chain` (a drop-in for
``create_stuff_documents_chain``). Each streams, synchronously and asynchronously; what one
streamed item of the model becomes is written once (:class:`_AnswerRun`), for both loops."""

from __future__ import annotations

from typing import Any, AsyncIterator, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from langchain_core.callbacks import BaseCallbackHandler, BaseCallbackManager
from langchain_core.documents import BaseDocumentCompressor, Document
from langchain_core.language_models import BaseChatModel
from langchain_core.outputs import LLMResult
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda
from langchain_core.runnables.utils import AddableDict

from nbce_rag.integrations.langchain.convert import documents_to_message


def _question_of(x: Any, keys: Sequence[str] = ("input", "question", "query")) -> str:
    if isinstance(x, str):
        return x
    if isinstance(x, Mapping):
        for k in keys:
            if isinstance(x.get(k), str):
                return x[k]
    raise TypeError(f"expected a question string or a dict with one of {list(keys)}; got {type(x).__name__}")


class _GroundingCatcher(BaseCallbackHandler):
    """Keeps the ``nbce`` grounding (sources, shares, supported) of a string LLM's run: its
    ``stream()`` yields bare strings, but the final generation reaches ``on_llm_end``."""

    def __init__(self) -> None:
        self.nbce: Optional[Dict[str, Any]] = None

    def on_llm_end(self, response: LLMResult, **kwargs: Any) -> None:
        for gens in response.generations:
            for g in gens:
                info = g.generation_info or {}
                if isinstance(info.get("nbce"), dict):
                    self.nbce = info["nbce"]


def _with_handler(config: Optional[RunnableConfig], handler: BaseCallbackHandler) -> RunnableConfig:
    config = dict(config or {})
    cbs = config.get("callbacks")
    if cbs is None:
        cbs = [handler]
    elif isinstance(cbs, BaseCallbackManager):
        cbs = cbs.copy()
        cbs.add_handler(handler, inherit=False)
    else:
        cbs = list(cbs) + [handler]
    config["callbacks"] = cbs
    return config  # type: ignore[return-value]


def _grounding(meta: Optional[Mapping[str, Any]]) -> AddableDict:
    meta = meta or {}
    return AddableDict(sources=list(meta.get("sources") or []), supported=bool(meta.get("supported", False)))


class _AnswerRun:
    """One call of ``llm`` (a chat model or a string LLM) answering ``question`` over ``docs``:
    what to stream it with, and what each streamed item (a chat chunk or a string piece) becomes.
    The sync and async loops differ only in ``stream`` / ``astream``.

    With ``grounding=True`` a string LLM's run is watched for its ``nbce`` grounding (its pieces
    do not carry it; a chat model's last chunk does)."""

    def __init__(self, llm: Any, question: str, docs: Sequence[Any], config: Optional[RunnableConfig],
                 *, grounding: bool = False) -> None:
        self.llm, self.question, self.docs, self.config = llm, question, docs, config
        self.chat = isinstance(llm, BaseChatModel)
        self.catcher = _GroundingCatcher() if grounding and not self.chat else None
        self.said = False
        self.meta: Optional[Mapping[str, Any]] = None

    def call(self) -> Tuple[Any, Dict[str, Any]]:
        """``(input, keywords)`` for ``llm.stream`` / ``llm.astream``."""
        if self.chat:
            return [documents_to_message(self.question, self.docs)], {"config": self.config}
        config = self.config if self.catcher is None else _with_handler(self.config, self.catcher)
        return self.question, {"config": config, "contexts": list(self.docs)}

    def text(self, item: Any) -> str:
        """The answer text of one streamed item (possibly empty); keeps a chunk's grounding."""
        if not self.chat:
            return item or ""
        self.meta = item.response_metadata.get("nbce") or self.meta
        return item.text or ""

    # the stream of create_nbce_rag_chain: head, one chunk per item with text, tail
    def head(self) -> List[AddableDict]:
        return [AddableDict(input=self.question), AddableDict(context=self.docs)]

    def chunk(self, item: Any) -> Optional[AddableDict]:
        text = self.text(item)
        if not text:
            return None
        self.said = True
        return AddableDict(answer=text)

    def tail(self) -> List[AddableDict]:
        meta = self.catcher.nbce if self.catcher is not None else self.meta
        return ([] if self.said else [AddableDict(answer="")]) + [_grounding(meta)]


def _stream_answer(llm: Any, question: str, docs: Sequence[Any], config: Optional[RunnableConfig]) -> Iterator[str]:
    run = _AnswerRun(llm, question, docs, config)
    inp, kw = run.call()
    for item in llm.stream(inp, **kw):
        if text := run.text(item):
            yield text


async def _astream_answer(llm: Any, question: str, docs: Sequence[Any], config: Optional[RunnableConfig]) -> AsyncIterator[str]:
    run = _AnswerRun(llm, question, docs, config)
    inp, kw = run.call()
    async for item in llm.astream(inp, **kw):
        if text := run.text(item):
            yield text


def create_nbce_documents_chain(llm: Any, *, document_variable_name: str = "context",
                                question_key: str = "input") -> Runnable:
    """A drop-in for ``create_stuff_documents_chain``: a runnable taking
    ``{"input": question, "context": [Document, ...]}`` and returning the answer string,
    with every document a separate NBCE passage (never stuffed into one prompt). Streams.

    >>> from langchain_classic.chains import create_retrieval_chain
    >>> chain = create_retrieval_chain(retriever, create_nbce_documents_chain(ChatNBCE(pipeline=rag)))
    >>> chain.invoke({"input": "..."})["answer"]
    """

    def _docs(x: Mapping[str, Any]) -> List[Any]:
        docs = x.get(document_variable_name)
        if docs is None:
            raise KeyError(f"the input has no {document_variable_name!r} (list of documents)")
        return list(docs)

    def answer(x: Mapping[str, Any], config: RunnableConfig) -> Iterator[str]:
        yield from _stream_answer(llm, _question_of(x, (question_key, "question", "input")), _docs(x), config)

    async def aanswer(x: Mapping[str, Any], config: RunnableConfig) -> AsyncIterator[str]:
        async for piece in _astream_answer(llm, _question_of(x, (question_key, "question", "input")), _docs(x), config):
            yield piece

    return RunnableLambda(answer, afunc=aanswer, name="nbce_documents_chain")


def _rag_chunks(llm: Any, question: str, docs: List[Any], config: RunnableConfig) -> Iterator[AddableDict]:
    """``create_retrieval_chain``'s stream (``input``, ``context``, then ``answer`` pieces), then
    the grounding: ``sources`` (per passage: score, tokens, share of the answer) and ``supported``."""
    run = _AnswerRun(llm, question, docs, config, grounding=True)
    yield from run.head()
    inp, kw = run.call()
    for item in llm.stream(inp, **kw):
        if (chunk := run.chunk(item)) is not None:
            yield chunk
    yield from run.tail()


async def _arag_chunks(llm: Any, question: str, docs: List[Any], config: RunnableConfig) -> AsyncIterator[AddableDict]:
    """:func:`_rag_chunks`, asynchronously."""
    run = _AnswerRun(llm, question, docs, config, grounding=True)
    for chunk in run.head():
        yield chunk
    inp, kw = run.call()
    async for item in llm.astream(inp, **kw):
        if (chunk := run.chunk(item)) is not None:
            yield chunk
    for chunk in run.tail():
        yield chunk


def create_nbce_rag_chain(retriever: Any, llm: Any, filter: Optional[BaseDocumentCompressor] = None) -> Runnable:
    """question -> ``retriever`` -> ``filter`` (optional) -> NBCE answer, as one runnable that
    returns what LangChain's ``create_retrieval_chain`` returns, plus the grounding:

    ``{"input": question, "context": [Document, ...], "answer": str, "sources": [...],
    "supported": bool}`` where ``context`` holds the documents that reached the model and
    ``sources`` one dict per passage (``id``, ``text``, ``score``, ``n_tokens``, ``share`` of
    the answer's tokens); ``supported`` is False when the answer is closed-book.

    Input: a question string (or ``{"input"|"question"|"query": ...}``). ``chain.stream(q)``
    yields ``{"input"}``, ``{"context"}``, then ``{"answer": piece}`` as it is decoded, then
    ``{"sources", "supported"}``; for the answer string alone use
    ``chain.pick("answer")`` (``.invoke(q)`` -> ``str``, ``.stream(q)`` -> pieces). ``ainvoke``,
    ``astream``, ``batch`` and ``astream_events`` work as for any runnable; callbacks nest
    (retriever and model runs appear under the chain's run). ``llm`` is a :class:`ChatNBCE`
    (passages as ``text-plain`` blocks) or an :class:`NBCELLM` (passages as ``contexts``). When
    the retriever/filter keep nothing, the model answers closed-book.
    """

    def _docs(question: str, config: RunnableConfig) -> List[Document]:
        docs = retriever.invoke(question, config=config)
        if filter is not None:
            docs = list(filter.compress_documents(docs, question, callbacks=config.get("callbacks")))
        return list(docs)

    async def _adocs(question: str, config: RunnableConfig) -> List[Document]:
        docs = await retriever.ainvoke(question, config=config)
        if filter is not None:
            docs = list(await filter.acompress_documents(docs, question, callbacks=config.get("callbacks")))
        return list(docs)

    def answer(x: Any, config: RunnableConfig) -> Iterator[AddableDict]:
        q = _question_of(x)
        yield from _rag_chunks(llm, q, _docs(q, config), config)

    async def aanswer(x: Any, config: RunnableConfig) -> AsyncIterator[AddableDict]:
        q = _question_of(x)
        async for chunk in _arag_chunks(llm, q, await _adocs(q, config), config):
            yield chunk

    return RunnableLambda(answer, afunc=aanswer, name="nbce_rag_chain")
