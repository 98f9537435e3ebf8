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


def _grounding(meta: Optional[Mapping[str, Any]], decided: Optional[Mapping[str, Any]] = None) -> AddableDict:
    """The tail of the rag chain: ``sources`` and ``supported`` (the model's), overridden by the
    retriever's filter decisions when it made them (``supported``, ``support_score``,
    ``support_threshold``, ``calibration``, ``dropped``, ``answered_from``)."""
    meta = meta or {}
    out = AddableDict(sources=list(meta.get("sources") or []), supported=bool(meta.get("supported", False)))
    out.update(decided or {})
    return out


def _decisions(retriever: Any, docs: Sequence[Any], answered_from: str) -> Dict[str, Any]:
    """What the retriever's filter decided for the last question (a CoSENTRetriever records it)."""
    sel = getattr(retriever, "last_selection", None)
    res = getattr(sel, "result", None)
    out: Dict[str, Any] = {"answered_from": answered_from}
    if res is None:
        return out
    th = getattr(retriever, "threshold", None)
    out.update(supported=bool(res.supported) and bool(docs), support_score=res.support_score,
               support_threshold=res.support_threshold, dropped=[d.to_dict() for d in res.dropped],
               calibration=getattr(retriever, "calibration", None)
               or f"{(getattr(th, 'stats', None) or {}).get('source', 'given')} (threshold {res.threshold:.3f})")
    return out


def _on_unsupported(llm: Any, given: Optional[str]) -> str:
    """``given``, else the model's ``nbce_options``, else its pipeline's default ("abstain")."""
    if given is not None:
        return given
    mode = (getattr(llm, "nbce_options", None) or {}).get("on_unsupported")
    if mode is None and callable(getattr(llm, "_get_pipeline", None)):
        mode = llm._get_pipeline().decoder.config.on_unsupported
    return mode or "abstain"


def _abstained(question: str, docs: Sequence[Any], decided: Dict[str, Any]) -> List[AddableDict]:
    """The rag chain's stream for a question nothing passed the filter for (no decoding)."""
    from nbce_rag.pipeline import ABSTAIN_TEXT

    decided = dict(decided, supported=False, answered_from="abstained")
    return [AddableDict(input=question), AddableDict(context=list(docs)), AddableDict(answer=ABSTAIN_TEXT),
            _grounding({}, decided)]


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

    def tail(self, decided: Optional[Mapping[str, Any]] = None) -> List[AddableDict]:
        meta = self.catcher.nbce if self.catcher is not None else self.meta
        return ([] if self.said else [AddableDict(answer="")]) + [_grounding(meta, decided)]


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


def _rag_chunks(llm: Any, question: str, docs: List[Any], config: RunnableConfig,
                decided: Optional[Dict[str, Any]] = None) -> Iterator[AddableDict]:
    """``create_retrieval_chain``'s stream (``input``, ``context``, then ``answer`` pieces), then
    the grounding: ``sources`` (per passage: score, tokens, share of the answer), ``supported``
    and the filter's decisions (``decided``)."""
    run = _AnswerRun(llm, question, docs, config, grounding=True)
    yield from run.head()
    inp, kw = run.call()
    for item in llm.stream(inp, **kw):
        if (chunk := run.chunk(item)) is not None:
            yield chunk
    yield from run.tail(decided)


async def _arag_chunks(llm: Any, question: str, docs: List[Any], config: RunnableConfig,
                       decided: Optional[Dict[str, Any]] = None) -> AsyncIterator[AddableDict]:
    """:func:`_rag_chunks`, asynchronously."""
    run = _AnswerRun(llm, question, docs, config, grounding=True)
    for chunk in run.head():
        yield chunk
    inp, kw = run.call()
    async for item in llm.astream(inp, **kw):
        if (chunk := run.chunk(item)) is not None:
            yield chunk
    for chunk in run.tail(decided):
        yield chunk


def create_nbce_rag_chain(retriever: Any, llm: Any, filter: Optional[BaseDocumentCompressor] = None, *,
                          on_unsupported: Optional[str] = None) -> Runnable:
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
    (passages as ``text-plain`` blocks) or an :class:`NBCELLM` (passages as ``contexts``).

    With a :class:`CoSENTRetriever` that filters, the last item also carries its decisions:
    ``supported`` is the filter's support decision, with ``support_score``,
    ``support_threshold``, ``calibration`` and ``dropped``. When the retriever/filter keep
    nothing, the answer says that nothing in the documents answers the question (no decoding,
    ``answered_from: "abstained"``), or, with ``on_unsupported="closed_book"`` (here, or in the
    model's ``nbce_options``), the model answers alone; ``supported`` is False either way.
    """
    if on_unsupported not in (None, "abstain", "closed_book"):
        raise ValueError(f"on_unsupported must be 'abstain' or 'closed_book' (got {on_unsupported!r})")

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

    def decide(docs: List[Any]) -> Tuple[Dict[str, Any], bool]:
        """The filter's decisions, and whether to abstain (nothing kept, on_unsupported abstain)."""
        how = "passages" if docs else "closed_book"
        decided = _decisions(retriever, docs, how) if filter is None else {"answered_from": how}
        return decided, not docs and _on_unsupported(llm, on_unsupported) == "abstain"

    def answer(x: Any, config: RunnableConfig) -> Iterator[AddableDict]:
        q = _question_of(x)
        docs = _docs(q, config)
        decided, abstain = decide(docs)
        if abstain:
            yield from _abstained(q, docs, decided)
            return
        yield from _rag_chunks(llm, q, docs, config, decided)

    async def aanswer(x: Any, config: RunnableConfig) -> AsyncIterator[AddableDict]:
        q = _question_of(x)
        docs = await _adocs(q, config)
        decided, abstain = decide(docs)
        if abstain:
            for chunk in _abstained(q, docs, decided):
                yield chunk
            return
        async for chunk in _arag_chunks(llm, q, docs, config, decided):
            yield chunk

    return RunnableLambda(answer, afunc=aanswer, name="nbce_rag_chain")
