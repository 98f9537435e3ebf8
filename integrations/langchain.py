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
"""

from __future__ import annotations

import threading
from typing import Any, AsyncIterator, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

try:
    from langchain_core.callbacks import (
        AsyncCallbackManagerForRetrieverRun,
        BaseCallbackHandler,
        BaseCallbackManager,
        CallbackManagerForLLMRun,
        CallbackManagerForRetrieverRun,
        Callbacks,
    )
    from langchain_core.documents import BaseDocumentCompressor, Document
    from langchain_core.embeddings import Embeddings
    from langchain_core.language_models import BaseChatModel, LLM
    from langchain_core.language_models.base import LangSmithParams
    from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage
    from langchain_core.messages.content import create_plaintext_block, create_text_block
    from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, Generation, GenerationChunk, LLMResult
    from langchain_core.retrievers import BaseRetriever
    from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda
    from langchain_core.runnables.utils import AddableDict
    from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "nbce_rag.integrations.langchain needs LangChain: pip install 'nbce-rag[langchain]' "
        f"(missing: {e.name})"
    ) from e

from dataclasses import replace

from .._adapter_args import check_constructor_arguments, device_name, generation_options
from ..config import openai_options
from ..retrieval import Selection, as_encoder, candidate_encoder, check_k, select
from ..types import Answer, Passage, StreamEvent, as_passage, pop_passages

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

#: keywords LangChain itself may add to a model call; they are not decoding options
_FRAMEWORK_KWARGS = ("stream", "model", "ls_structured_output_format")


# --------------------------------------------------------------------------------------------
# Conversions
# --------------------------------------------------------------------------------------------


def document_to_passage(doc: Any) -> Passage:
    """A LangChain ``Document`` (score in ``metadata["score"]``), a ``str``, a dict, a
    :class:`Passage`, or a ``text-plain`` content block, as a :class:`Passage`."""
    if isinstance(doc, Document):
        meta = dict(doc.metadata or {})
        score = meta.pop("score", None)
        return Passage(text=doc.page_content, score=None if score is None else float(score),
                       id=None if doc.id is None else str(doc.id), metadata=meta)
    if isinstance(doc, dict) and doc.get("type") == "text-plain":
        return _block_to_passage(doc)
    return as_passage(doc, where="documents")


def passage_to_document(p: Passage, **extra_meta: Any) -> Document:
    """A :class:`Passage` as a ``Document``; its score goes to ``metadata["score"]``."""
    meta = dict(p.metadata)
    meta.update(extra_meta)
    if p.score is not None:
        meta["score"] = float(p.score)
    return Document(page_content=p.text, id=p.id, metadata=meta)


def _doc_block(doc: Any) -> Dict[str, Any]:
    p = document_to_passage(doc)
    extras: Dict[str, Any] = {"metadata": dict(p.metadata)}
    if p.score is not None:
        extras["score"] = p.score
    if p.id is not None:
        extras["doc_id"] = p.id
    title = p.metadata.get("title") or p.metadata.get("source") or p.id
    # create_plaintext_block puts unknown keywords into the block's ``extras``
    return create_plaintext_block(text=p.text, title=None if title is None else str(title), **extras)


def _block_to_passage(block: Mapping[str, Any]) -> Passage:
    text = block.get("text")
    if not isinstance(text, str):
        raise ValueError(
            "a text-plain block must carry its text inline ('text'); url/base64/file_id "
            "blocks are not fetched by ChatNBCE"
        )
    extras = dict(block.get("extras") or {})
    meta = dict(extras.get("metadata") or {})
    if block.get("title") is not None:
        meta.setdefault("title", block["title"])
    pid = extras.get("doc_id")
    if pid is None:
        bid = block.get("id")
        pid = bid if isinstance(bid, str) and not bid.startswith("lc_") else block.get("title")
    score = extras.get("score")
    return Passage(text=text, score=None if score is None else float(score),
                   id=None if pid is None else str(pid), metadata=meta)


def documents_to_message(question: str, documents: Iterable[Any]) -> HumanMessage:
    """One ``HumanMessage``: a standard ``text-plain`` block per document (text, title, and
    score/id/metadata in ``extras``), then the question as a ``text`` block. This is how
    passages reach :class:`ChatNBCE` as separate passages through any LCEL chain."""
    blocks: List[Any] = [_doc_block(d) for d in documents]
    blocks.append(create_text_block(question))
    return HumanMessage(content=blocks)


_ROLE = {"human": "User", "ai": "Assistant", "tool": "Tool", "function": "Function", "chat": "User"}


def split_messages(messages: Sequence[BaseMessage]) -> Tuple[str, Optional[List[Passage]], Optional[str]]:
    """``(question, passages, system_prompt)`` from chat messages.

    ``text-plain`` blocks (of any message) are the passages (``None`` when there are none);
    system messages form the system prompt; the text of the last human message is the
    question, prefixed by a ``Role: text`` transcript of the earlier turns when there are any.
    """
    system: List[str] = []
    turns: List[Tuple[str, str]] = []
    passages: List[Passage] = []
    for m in messages:
        texts: List[str] = []
        for b in m.content_blocks:
            t = b.get("type")
            if t == "text":
                texts.append(b.get("text") or "")
            elif t == "text-plain":
                passages.append(_block_to_passage(b))
            elif t in ("reasoning", "tool_call", "tool_call_chunk", "invalid_tool_call"):
                continue
            else:
                raise ValueError(
                    f"ChatNBCE reads text and text-plain (passage) content blocks only; got a {t!r} block"
                )
        text = "".join(texts).strip()
        if m.type == "system":
            if text:
                system.append(text)
        elif text:
            turns.append((m.type, text))
    if not turns or turns[-1][0] not in ("human", "chat"):
        raise ValueError("ChatNBCE needs a question: a text block (or string content) in the last human message")
    question = turns[-1][1]
    if len(turns) > 1:
        transcript = "\n".join(f"{_ROLE.get(r, r.capitalize())}: {t}" for r, t in turns[:-1])
        question = f"{transcript}\n\n{question}"
    return question, (passages or None), ("\n\n".join(system) if system else None)


def decode_options(
    *,
    max_tokens: Optional[int] = None,
    stop: Optional[Sequence[str]] = None,
    temperature: Optional[float] = None,
    top_p: Optional[float] = None,
    seed: Optional[int] = None,
    extra: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """Map the usual LLM parameters to :class:`NBCEConfig` overrides (one layer of
    :func:`nbce_rag.config.openai_options`: ``temperature`` > 0 samples, 0 is greedy;
    ``top_p`` shapes sampling and never turns it on). ``None`` leaves the decoder's default."""
    return openai_options({**dict(extra or {}), "max_tokens": max_tokens, "stop": stop,
                           "temperature": temperature, "top_p": top_p, "seed": seed})


def _penalties(model: Any) -> Dict[str, Any]:
    """The model's ``top_k``, ``repetition_penalty`` (transformers' / HuggingFacePipeline's
    names) and ``frequency_penalty``, ``presence_penalty`` (ChatOpenAI's); see :mod:`nbce_rag.sampling`."""
    return {k: getattr(model, k) for k in ("top_k", "repetition_penalty", "frequency_penalty", "presence_penalty")}


def answer_metadata(answer: Answer) -> Dict[str, Any]:
    """What an answer says about its grounding (:meth:`Answer.metadata`)."""
    return answer.metadata()


# --------------------------------------------------------------------------------------------
# Language models
# --------------------------------------------------------------------------------------------


#: what users of other LangChain models pass, and what to pass here instead
_CONSTRUCTOR_HINTS = {
    "model_id": "model= (or ChatNBCE.from_model_id(model_id, ...))",
    "torch_dtype": "dtype=",
    "max_length": "max_tokens= (it counts new tokens only)",
    "generate_kwargs": "nbce_options={...} (NBCEConfig fields) or keywords of the call",
    "pipeline_kwargs": "from_model_id(..., pipeline_kwargs={...}) or nbce_options={...}",
    "task": "from_model_id(...); the task is always text generation",
    "tokenizer": "a model directory (model=) holding its tokenizer, or decoder=NBCEDecoder(model, tokenizer)",
    "base_url": "nothing: decoding is local (for an nbce-rag server, use langchain_openai.ChatOpenAI)",
    "n": "one answer per call (call again, or use .batch())",
    "tools": "nothing: tool calling is not supported",
    "response_format": "nothing: structured output is not supported",
}


def _check_arguments(cls: Any, data: Any) -> Any:
    if isinstance(data, dict):
        check_constructor_arguments(cls.__name__, data, cls.model_fields, _CONSTRUCTOR_HINTS)
    return data


def _from_model_id(cls: Any, model_id: Optional[str], *, task: Optional[str], device: Any, device_map: Any,
                   model_kwargs: Optional[Dict[str, Any]], pipeline_kwargs: Optional[Dict[str, Any]],
                   kwargs: Dict[str, Any]) -> Any:
    if task not in (None, "text-generation"):
        raise ValueError(f"task {task!r} is not supported: NBCE answers by text generation (task='text-generation')")
    options = dict(kwargs.pop("nbce_options", None) or {})
    options.update(generation_options(pipeline_kwargs, f"{cls.__name__}.from_model_id pipeline_kwargs"))
    return cls(model=model_id, device=device_name(device), device_map=device_map, model_kwargs=dict(model_kwargs or {}),
               nbce_options=options, **kwargs)


_NO_TOOLS = ("{name}.{method}: NBCE decoding has no tool calling or structured output (it fuses per-passage "
             "next-token distributions of a plain chat model). Parse the text answer yourself, or use a "
             "tool-calling model for this step.")


class _NBCEEngine:
    """Shared behaviour of the two LangChain language models (the pydantic fields
    ``pipeline, decoder, model_name, device, dtype, device_map, model_kwargs, max_tokens,
    temperature, top_p, seed, stop, nbce_options, retrieve, filter_passages, k`` live on each
    class)."""

    def _get_pipeline(self) -> Any:
        if self.pipeline is not None:
            return self.pipeline
        with self._lock:
            if self._rag is None:
                from ..decoder import NBCEDecoder
                from ..pipeline import RAGPipeline

                dec = self.decoder
                if dec is None:
                    dec = NBCEDecoder.from_pretrained(self.model_name, device=self.device, dtype=self.dtype,
                                                      device_map=self.device_map, model_kwargs=self.model_kwargs)
                self._rag = RAGPipeline(dec)
        return self._rag

    @property
    def display_name(self) -> str:
        if self.model_name:
            return str(self.model_name)
        dec = self.decoder if self.decoder is not None else getattr(self.pipeline, "decoder", None)
        if dec is not None:
            return str(dec.name or "") or type(dec.model).__name__
        from ..models import BUNDLED_LLM_NAME

        return BUNDLED_LLM_NAME

    def _options(self, stop: Optional[Sequence[str]], kwargs: Dict[str, Any]) -> Dict[str, Any]:
        """The model's settings, then this call's keywords (and LangChain's ``stop``), as
        NBCEConfig overrides through the one OpenAI-parameter mapping."""
        call = {k: v for k, v in kwargs.items() if k not in _FRAMEWORK_KWARGS}
        if stop is not None:
            call["stop"] = list(stop)
        own = {"max_tokens": self.max_tokens, "stop": self.stop or None, "temperature": self.temperature,
               "top_p": self.top_p, "seed": self.seed, **_penalties(self)}
        return openai_options({**self.nbce_options, **own}, call)

    def _events(self, question: str, passages: Optional[List[Any]], options: Dict[str, Any],
                k: Optional[int] = None) -> Iterator[StreamEvent]:
        """The one place the LangChain models decode."""
        return self._get_pipeline().answer_stream(question, passages, retrieve=self.retrieve,
                                                  filter_passages=self.filter_passages,
                                                  k=k if k is not None else self.k, **options)

    def _identifying(self) -> Dict[str, Any]:
        return {
            "model_name": self.display_name,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": self.stop,
            "nbce_options": dict(self.nbce_options),
            "retrieve": self.retrieve,
            "filter_passages": self.filter_passages,
            "k": self.k,
            "engine": id(self.pipeline if self.pipeline is not None else self.decoder),
        }


#: Answer.usage() (OpenAI names) -> LangChain's UsageMetadata names
_USAGE_NAMES = {"prompt_tokens": "input_tokens", "completion_tokens": "output_tokens", "total_tokens": "total_tokens"}


def _usage(answer: Answer) -> Dict[str, Any]:
    """LangChain's ``UsageMetadata``: OpenAI's cached prompt tokens become ``input_token_details.cache_read``."""
    u = answer.usage()
    out: Dict[str, Any] = {_USAGE_NAMES[k]: u[k] for k in _USAGE_NAMES}
    out["input_token_details"] = {"cache_read": u["prompt_tokens_details"]["cached_tokens"]}
    return out


class ChatNBCE(_NBCEEngine, BaseChatModel):
    """A LangChain chat model answering with NBCE decoding.

    Passages travel as standard ``text-plain`` content blocks (build the message with
    :func:`documents_to_message`, or put ``create_plaintext_block(text=...)`` blocks in any
    message) or as a ``documents=[...]`` keyword (``Document``, ``str``, dict or
    :class:`Passage`); each passage is one NBCE row, never concatenated. The question is the
    text of the last human message; system messages become the system prompt.

    Build it over a loaded decoder (``ChatNBCE(decoder=dec)``), a pipeline
    (``ChatNBCE(pipeline=rag)`` / ``rag.as_langchain_chat_model()``), or a model to load
    lazily (``ChatNBCE(model="HuggingFaceTB/SmolLM2-360M-Instruct")``; ``None`` = the bundled
    default), as langchain_huggingface does: ``ChatNBCE.from_model_id(model_id, device=0,
    device_map=None, model_kwargs={...}, pipeline_kwargs={...})``. Loading options: ``device``,
    ``dtype``, ``device_map``, ``model_kwargs`` (to transformers' ``from_pretrained``). An
    argument that is not a parameter raises ``TypeError`` naming what to use instead;
    ``bind_tools`` and ``with_structured_output`` raise ``NotImplementedError`` (no tool
    calling). Standard parameters: ``max_tokens`` (alias ``max_new_tokens``), ``temperature``
    (0 = greedy, > 0 samples), ``top_p``, ``top_k``, ``seed``, ``stop``, ``repetition_penalty``,
    ``frequency_penalty``, ``presence_penalty``; ``timeout``, ``max_retries`` and
    ``api_key`` (LangChain's standard parameters) are accepted and unused (decoding is local).
    Other :class:`NBCEConfig` fields go in ``nbce_options`` or per call (``chat.invoke(msgs, beta=0.5)``).

    ``retrieve=True``: with no passages in the messages, retrieve them through the pipeline
    (index + filter), i.e. answer like ``rag.ask(question)``. ``filter_passages=True``: given
    passages are re-scored and filtered by the pipeline's threshold first. By default given
    passages are decoded as given (filter upstream, with :class:`CoSENTRetriever` /
    :class:`MarginThresholdFilter`).

    The answer's usage metadata counts prefilled tokens over all rows (input) and decoding
    steps (output); ``response_metadata["nbce"]`` holds ``supported``, per-passage
    ``sources`` (score, tokens, share), ``dropped`` and ``token_sources``.
    """

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True, protected_namespaces=())

    pipeline: Any = Field(default=None, exclude=True)
    decoder: Any = Field(default=None, exclude=True)
    model_name: Optional[str] = Field(default=None, alias="model")
    device: Optional[str] = None
    dtype: Optional[str] = None
    device_map: Any = None
    model_kwargs: Dict[str, Any] = Field(default_factory=dict)
    max_tokens: Optional[int] = Field(default=None, alias="max_new_tokens")
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    top_k: Optional[int] = None
    repetition_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    stop: Optional[List[str]] = Field(default=None, alias="stop_sequences")
    timeout: Optional[float] = None
    max_retries: Optional[int] = None
    #: LangChain's standard chat-model parameter; accepted, never used or shown (decoding is local)
    api_key: Optional[Any] = Field(default=None, exclude=True, repr=False)
    streaming: bool = False
    nbce_options: Dict[str, Any] = Field(default_factory=dict)
    retrieve: bool = False
    filter_passages: bool = False
    k: Optional[int] = None

    _rag: Any = PrivateAttr(default=None)
    _lock: Any = PrivateAttr(default_factory=threading.Lock)

    @model_validator(mode="before")
    @classmethod
    def _check_arguments(cls, data: Any) -> Any:
        return _check_arguments(cls, data)

    @classmethod
    def from_pipeline(cls, pipeline: Any, **kwargs: Any) -> "ChatNBCE":
        """A chat model over ``pipeline``'s decoder (and, with ``retrieve=True`` or
        ``filter_passages=True``, its index and filter)."""
        return cls(pipeline=pipeline, **kwargs)

    @classmethod
    def from_model_id(cls, model_id: Optional[str] = None, task: Optional[str] = None, *, device: Any = None,
                      device_map: Any = None, model_kwargs: Optional[Dict[str, Any]] = None,
                      pipeline_kwargs: Optional[Dict[str, Any]] = None, **kwargs: Any) -> "ChatNBCE":
        """Like ``langchain_huggingface.HuggingFacePipeline.from_model_id``: ``model_id`` (an HF
        id, a local path or a ``.gguf`` file; ``None`` = the bundled model), ``device`` (``-1``/
        ``"cpu"``, ``0``/``"cuda:0"``, ``"mps"``), ``device_map`` (e.g. ``"auto"``),
        ``model_kwargs`` for transformers' ``from_pretrained`` (``revision``,
        ``attn_implementation``, ...; the dtype is ``dtype=``), ``pipeline_kwargs`` with
        generation options (``max_new_tokens``, ``temperature``, ``do_sample``, ``top_p``, ...,
        any :class:`NBCEConfig` field). Other keywords are this class's parameters. The model
        loads on first use."""
        return _from_model_id(cls, model_id, task=task, device=device, device_map=device_map,
                              model_kwargs=model_kwargs, pipeline_kwargs=pipeline_kwargs, kwargs=kwargs)

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> Any:
        """Not supported: raises ``NotImplementedError`` saying why and what to do."""
        raise NotImplementedError(_NO_TOOLS.format(name=type(self).__name__, method="bind_tools"))

    def with_structured_output(self, schema: Any, **kwargs: Any) -> Any:
        """Not supported: raises ``NotImplementedError`` saying why and what to do."""
        raise NotImplementedError(_NO_TOOLS.format(name=type(self).__name__, method="with_structured_output"))

    @property
    def _llm_type(self) -> str:
        return "nbce-chat"

    @property
    def _identifying_params(self) -> Dict[str, Any]:
        return self._identifying()

    def _get_ls_params(self, stop: Optional[List[str]] = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(ls_provider="nbce", ls_model_type="chat",
                                 ls_model_name=kwargs.get("model") if isinstance(kwargs.get("model"), str)
                                 else self.display_name)
        t = kwargs.get("temperature", self.temperature)
        if t is not None:
            params["ls_temperature"] = float(t)
        mt = kwargs.get("max_tokens", self.max_tokens)
        if mt is not None:
            params["ls_max_tokens"] = int(mt)
        st = stop or self.stop
        if st:
            params["ls_stop"] = list(st)
        return params

    def _prepare(self, messages: List[BaseMessage], stop: Optional[List[str]], kwargs: Dict[str, Any]):
        kwargs = dict(kwargs)
        documents = kwargs.pop("documents", None)
        k = kwargs.pop("k", None)
        question, passages, system = split_messages(messages)
        if documents is not None:
            if isinstance(documents, (str, bytes)):
                raise TypeError("documents must be a list; wrap a single document in a list")
            passages = (passages or []) + [document_to_passage(d) for d in documents]
        options = self._options(stop, kwargs)
        if system is not None and "system_prompt" not in options:
            options["system_prompt"] = system
        return question, passages, options, k

    def _message_metadata(self, answer: Answer) -> Dict[str, Any]:
        return {
            "model_name": self.display_name,
            "model_provider": "nbce",
            "finish_reason": answer.finish_reason,
            "nbce": answer.metadata(),
        }

    def _generate(self, messages: List[BaseMessage], stop: Optional[List[str]] = None,
                  run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> ChatResult:
        question, passages, options, k = self._prepare(messages, stop, kwargs)
        answer = None
        for ev in self._events(question, passages, options, k):
            answer = ev.answer or answer
        msg = AIMessage(content=answer.text, usage_metadata=_usage(answer),
                        response_metadata=self._message_metadata(answer))
        return ChatResult(generations=[ChatGeneration(message=msg, generation_info={"finish_reason": answer.finish_reason})],
                          llm_output={"model_name": self.display_name, "token_usage": _usage(answer)})

    def _stream(self, messages: List[BaseMessage], stop: Optional[List[str]] = None,
                run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        # BaseChatModel.stream fires on_llm_new_token for every chunk itself: do not fire here.
        question, passages, options, k = self._prepare(messages, stop, kwargs)
        for ev in self._events(question, passages, options, k):
            if ev.answer is not None:
                a = ev.answer
                yield ChatGenerationChunk(
                    message=AIMessageChunk(content=ev.text, usage_metadata=_usage(a),
                                           response_metadata=self._message_metadata(a), chunk_position="last"),
                    generation_info={"finish_reason": a.finish_reason},
                )
            elif ev.text:
                yield ChatGenerationChunk(message=AIMessageChunk(content=ev.text))


class NBCELLM(_NBCEEngine, LLM):
    """A LangChain string LLM answering with NBCE decoding; the prompt is the question and
    the passages come as ``contexts=[...]`` (``str``, ``Document``, dict or
    :class:`Passage`; ``documents=`` is an alias)::

        llm.invoke("Who built it?", contexts=[d.page_content for d in docs])
        llm.bind(contexts=docs).stream("Who built it?")

    ``cache`` defaults to ``False``: LangChain's LLM cache key ignores call keywords, so a
    global cache would return the answer of other passages for the same question. The other
    parameters are those of :class:`ChatNBCE`. ``generate()`` puts ``finish_reason``, usage
    and the ``nbce`` sources into each generation's ``generation_info``.
    """

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True, protected_namespaces=())

    cache: Any = Field(default=False, exclude=True)
    pipeline: Any = Field(default=None, exclude=True)
    decoder: Any = Field(default=None, exclude=True)
    model_name: Optional[str] = Field(default=None, alias="model")
    device: Optional[str] = None
    dtype: Optional[str] = None
    device_map: Any = None
    model_kwargs: Dict[str, Any] = Field(default_factory=dict)
    max_tokens: Optional[int] = Field(default=None, alias="max_new_tokens")
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    top_k: Optional[int] = None
    repetition_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    stop: Optional[List[str]] = None
    nbce_options: Dict[str, Any] = Field(default_factory=dict)
    retrieve: bool = False
    filter_passages: bool = False
    k: Optional[int] = None

    _rag: Any = PrivateAttr(default=None)
    _lock: Any = PrivateAttr(default_factory=threading.Lock)

    @model_validator(mode="before")
    @classmethod
    def _check_arguments(cls, data: Any) -> Any:
        return _check_arguments(cls, data)

    @classmethod
    def from_pipeline(cls, pipeline: Any, **kwargs: Any) -> "NBCELLM":
        return cls(pipeline=pipeline, **kwargs)

    @classmethod
    def from_model_id(cls, model_id: Optional[str] = None, task: Optional[str] = None, *, device: Any = None,
                      device_map: Any = None, model_kwargs: Optional[Dict[str, Any]] = None,
                      pipeline_kwargs: Optional[Dict[str, Any]] = None, **kwargs: Any) -> "NBCELLM":
        """Like ``HuggingFacePipeline.from_model_id``; see :meth:`ChatNBCE.from_model_id`."""
        return _from_model_id(cls, model_id, task=task, device=device, device_map=device_map,
                              model_kwargs=model_kwargs, pipeline_kwargs=pipeline_kwargs, kwargs=kwargs)

    def with_structured_output(self, schema: Any, **kwargs: Any) -> Any:
        """Not supported: raises ``NotImplementedError`` saying why and what to do."""
        raise NotImplementedError(_NO_TOOLS.format(name=type(self).__name__, method="with_structured_output"))

    @property
    def _llm_type(self) -> str:
        return "nbce"

    @property
    def _identifying_params(self) -> Dict[str, Any]:
        return self._identifying()

    def _prepare(self, stop: Optional[List[str]], kwargs: Dict[str, Any]):
        kwargs = dict(kwargs)
        passages = pop_passages(kwargs, document_to_passage)
        k = kwargs.pop("k", None)
        return passages, self._options(stop, kwargs), k

    def _answer(self, prompt: str, stop, kwargs) -> Answer:
        passages, options, k = self._prepare(stop, kwargs)
        answer = None
        for ev in self._events(prompt, passages, options, k):
            answer = ev.answer or answer
        return answer

    def _call(self, prompt: str, stop: Optional[List[str]] = None,
              run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> str:
        return self._answer(prompt, stop, kwargs).text

    def _generate(self, prompts: List[str], stop: Optional[List[str]] = None,
                  run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> LLMResult:
        gens = []
        for prompt in prompts:
            a = self._answer(prompt, stop, kwargs)
            gens.append([Generation(text=a.text, generation_info={
                "finish_reason": a.finish_reason, "usage": _usage(a), "nbce": a.metadata()})])
        return LLMResult(generations=gens, llm_output={"model_name": self.display_name})

    def _stream(self, prompt: str, stop: Optional[List[str]] = None,
                run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> Iterator[GenerationChunk]:
        passages, options, k = self._prepare(stop, kwargs)
        for ev in self._events(prompt, passages, options, k):
            if ev.answer is None and not ev.text:
                continue
            info = None
            if ev.answer is not None:
                a = ev.answer
                info = {"finish_reason": a.finish_reason, "usage": _usage(a), "nbce": a.metadata()}
            chunk = GenerationChunk(text=ev.text, generation_info=info)
            if run_manager is not None and ev.text:
                # BaseLLM.stream leaves token callbacks to the implementation
                run_manager.on_llm_new_token(ev.text, chunk=chunk)
            yield chunk


# --------------------------------------------------------------------------------------------
# Embeddings, retriever, filter
# --------------------------------------------------------------------------------------------


class CoSENTEmbeddings(BaseModel, Embeddings):
    """LangChain ``Embeddings`` over a :class:`CoSENTEncoder` (L2-normalised vectors, so
    inner product = cosine). ``model``: the encoder to load (``None`` = the bundled
    all-MiniLM-L6-v2, a directory, or a sentence-transformers id); or pass ``encoder=``."""

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True, protected_namespaces=(),
                              extra="forbid")

    model_name: Optional[str] = Field(default=None, alias="model")
    encoder: Any = Field(default=None, exclude=True)
    device: Optional[str] = None
    batch_size: int = 32

    _lock: Any = PrivateAttr(default_factory=threading.Lock)

    @classmethod
    def from_pipeline(cls, pipeline: Any, **kwargs: Any) -> "CoSENTEmbeddings":
        return cls(encoder=pipeline.index.encoder, **kwargs)

    def get_encoder(self) -> Any:
        if self.encoder is None:
            with self._lock:
                if self.encoder is None:
                    from ..encoder import CoSENTEncoder

                    self.encoder = CoSENTEncoder.from_pretrained(self.model_name, device=self.device)
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
    replaced by the canonical cosine in :func:`nbce_rag.retrieval.select`)."""

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

    @classmethod
    def from_pipeline(cls, pipeline: Any, **kwargs: Any) -> "CoSENTRetriever":
        """The pipeline's index, filter and ``k`` as a retriever (override any by keyword)."""
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
        kept, _ = self.select(query, k)
        return [passage_to_document(p) for p in kept]

    async def _aget_relevant_documents(self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun,
                                       k: Optional[int] = None) -> List[Document]:
        import asyncio

        kept, _ = await asyncio.to_thread(self.select, query, k)
        return [passage_to_document(p) for p in kept]


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
        """The :class:`~nbce_rag.retrieval.Selection`: kept and dropped passages with reasons,
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


# --------------------------------------------------------------------------------------------
# Chains
# --------------------------------------------------------------------------------------------


def _question_of(x: Any, keys: Sequence[str] = ("input", "question", "query")) -> str:
    if isinstance(x, str):
        return x
    if isinstance(x, Mapping):
        for k in keys:
            if isinstance(x.get(k), str):
                return x[k]
    raise TypeError(f"expected a question string or a dict with one of {list(keys)}; got {type(x).__name__}")


def _stream_answer(llm: Any, question: str, docs: Sequence[Any], config: Optional[RunnableConfig]) -> Iterator[str]:
    if isinstance(llm, BaseChatModel):
        for chunk in llm.stream([documents_to_message(question, docs)], config=config):
            if chunk.text:
                yield chunk.text
    else:
        for piece in llm.stream(question, config=config, contexts=list(docs)):
            if piece:
                yield piece


async def _astream_answer(llm: Any, question: str, docs: Sequence[Any], config: Optional[RunnableConfig]) -> AsyncIterator[str]:
    if isinstance(llm, BaseChatModel):
        async for chunk in llm.astream([documents_to_message(question, docs)], config=config):
            if chunk.text:
                yield chunk.text
    else:
        async for piece in llm.astream(question, config=config, contexts=list(docs)):
            if piece:
                yield piece


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


def _rag_chunks(llm: Any, question: str, docs: List[Any], config: RunnableConfig) -> Iterator[AddableDict]:
    """``create_retrieval_chain``'s stream (``input``, ``context``, then ``answer`` pieces), then
    the grounding: ``sources`` (per passage: score, tokens, share of the answer) and ``supported``."""
    yield AddableDict(input=question)
    yield AddableDict(context=docs)
    said, meta = False, None
    if isinstance(llm, BaseChatModel):
        for chunk in llm.stream([documents_to_message(question, docs)], config=config):
            meta = chunk.response_metadata.get("nbce") or meta
            if chunk.text:
                said = True
                yield AddableDict(answer=chunk.text)
    else:
        catcher = _GroundingCatcher()
        for piece in llm.stream(question, config=_with_handler(config, catcher), contexts=list(docs)):
            if piece:
                said = True
                yield AddableDict(answer=piece)
        meta = catcher.nbce
    if not said:
        yield AddableDict(answer="")
    yield _grounding(meta)


async def _arag_chunks(llm: Any, question: str, docs: List[Any], config: RunnableConfig) -> AsyncIterator[AddableDict]:
    yield AddableDict(input=question)
    yield AddableDict(context=docs)
    said, meta = False, None
    if isinstance(llm, BaseChatModel):
        async for chunk in llm.astream([documents_to_message(question, docs)], config=config):
            meta = chunk.response_metadata.get("nbce") or meta
            if chunk.text:
                said = True
                yield AddableDict(answer=chunk.text)
    else:
        catcher = _GroundingCatcher()
        async for piece in llm.astream(question, config=_with_handler(config, catcher), contexts=list(docs)):
            if piece:
                said = True
                yield AddableDict(answer=piece)
        meta = catcher.nbce
    if not said:
        yield AddableDict(answer="")
    yield _grounding(meta)


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
