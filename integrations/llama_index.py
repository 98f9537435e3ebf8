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
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, AsyncGenerator, Dict, Generator, Iterator, List, Optional, Sequence

try:
    from llama_index.core.base.base_retriever import BaseRetriever
    from llama_index.core.base.embeddings.base import BaseEmbedding
    from llama_index.core.base.llms.types import (
        ChatMessage,
        CompletionResponse,
        CompletionResponseAsyncGen,
        CompletionResponseGen,
        LLMMetadata,
        MessageRole,
    )
    from llama_index.core.base.response.schema import (
        RESPONSE_TYPE,
        AsyncStreamingResponse,
        Response,
        StreamingResponse,
    )
    from llama_index.core.bridge.pydantic import ConfigDict, Field, PrivateAttr, model_validator
    from pydantic import AliasChoices
    from llama_index.core.callbacks import CallbackManager
    from llama_index.core.callbacks.schema import CBEventType, EventPayload
    from llama_index.core.instrumentation import get_dispatcher
    from llama_index.core.instrumentation.events.synthesis import SynthesizeEndEvent, SynthesizeStartEvent
    from llama_index.core.llms.callbacks import llm_completion_callback
    from llama_index.core.llms.custom import CustomLLM
    from llama_index.core.postprocessor.types import BaseNodePostprocessor
    from llama_index.core.query_engine import CustomQueryEngine
    from llama_index.core.response_synthesizers.base import BaseSynthesizer
    from llama_index.core.schema import BaseNode, MetadataMode, NodeWithScore, QueryBundle, TextNode
    from llama_index.core.vector_stores.types import VectorStoreQuery
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "nbce_rag.integrations.llama_index needs LlamaIndex: pip install 'nbce-rag[llamaindex]' "
        f"(missing: {e.name})"
    ) from e

from .._adapter_args import check_constructor_arguments, device_name, generation_options
from ..config import openai_options
from ..retrieval import Selection, as_encoder, candidate_encoder, check_k, select
from ..types import Answer, Passage, StreamEvent, as_passage, pop_passages

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

dispatcher = get_dispatcher(__name__)
_END = object()


# --------------------------------------------------------------------------------------------
# Conversions
# --------------------------------------------------------------------------------------------


def node_to_passage(node: Any, *, metadata_mode: MetadataMode = MetadataMode.LLM) -> Passage:
    """A ``NodeWithScore`` / node (text as the LLM sees it, ``node_id``, score), or anything
    :func:`nbce_rag.types.as_passage` accepts, as a :class:`Passage`."""
    if isinstance(node, NodeWithScore):
        n = node.node
        return Passage(text=n.get_content(metadata_mode=metadata_mode), score=node.score, id=n.node_id,
                       metadata=dict(n.metadata))
    if isinstance(node, BaseNode):
        return Passage(text=node.get_content(metadata_mode=metadata_mode), id=node.node_id, metadata=dict(node.metadata))
    return as_passage(node, where="contexts")


def passage_to_node(p: Passage) -> NodeWithScore:
    """A :class:`Passage` as a ``NodeWithScore``. Its metadata is kept on the node but hidden
    from the LLM and embedding views, so the text the decoder sees is the passage text."""
    meta = dict(p.metadata)
    keys = list(meta)
    node = TextNode(text=p.text, metadata=meta, excluded_llm_metadata_keys=keys, excluded_embed_metadata_keys=keys)
    if p.id is not None:
        node.id_ = str(p.id)
    return NodeWithScore(node=node, score=p.score)


_ROLE = {MessageRole.USER: "User", MessageRole.ASSISTANT: "Assistant", MessageRole.TOOL: "Tool"}


def messages_to_question(messages: Sequence[ChatMessage]) -> str:
    """The question of a chat: the last user message, prefixed by a ``Role: text``
    transcript of the earlier turns (system messages are left out: set ``system_prompt``)."""
    turns = [(m.role, (m.content or "").strip()) for m in messages if m.role != MessageRole.SYSTEM]
    turns = [(r, t) for r, t in turns if t]
    if not turns:
        raise ValueError("NBCELLM.chat needs a user message with text")
    question = turns[-1][1]
    if len(turns) > 1:
        transcript = "\n".join(f"{_ROLE.get(r, str(r.value).capitalize())}: {t}" for r, t in turns[:-1])
        question = f"{transcript}\n\n{question}"
    return question


def answer_info(answer: Answer) -> Dict[str, Any]:
    """Grounding of an answer as plain data: :meth:`Answer.metadata` (``supported``,
    ``sources``, ``dropped``, ``token_sources``) plus ``finish_reason`` and ``usage``."""
    return {**answer.metadata(), "finish_reason": answer.finish_reason, "usage": answer.usage()}


async def _aiter_thread(it: Iterator[Any]) -> AsyncGenerator[Any, None]:
    """Drive a blocking iterator from async code, one step per worker-thread call."""
    while True:
        item = await asyncio.to_thread(next, it, _END)
        if item is _END:
            return
        yield item


# --------------------------------------------------------------------------------------------
# LLM
# --------------------------------------------------------------------------------------------


#: what users of other LlamaIndex LLMs (HuggingFaceLLM, OpenAI) pass, and what to pass here instead
_LLM_HINTS = {
    "model_id": "model= (or NBCELLM.from_model_id(model_id, ...))",
    "torch_dtype": "dtype=",
    "max_length": "max_new_tokens=",
    "generate_kwargs": "nbce_options={...} (NBCEConfig fields) or NBCELLM.from_model_id(..., generate_kwargs=...)",
    "tokenizer_name": "a model directory (model=) holding its tokenizer, or decoder=NBCEDecoder(model, tokenizer)",
    "tokenizer": "decoder=NBCEDecoder(model, tokenizer)",
    "tokenizer_kwargs": "a model directory holding the tokenizer as it should be",
    "stopping_ids": "stop=[strings] (the tokenizer's EOS always stops)",
    "is_chat_model": "nothing: NBCELLM is a completion LLM; chat() answers the last user message",
    "api_key": "nothing: decoding is local",
    "api_base": "nothing: decoding is local (for an nbce-rag server, use llama_index's OpenAILike)",
}


class NBCELLM(CustomLLM):
    """A LlamaIndex LLM answering with NBCE decoding: the prompt is the question, the
    passages are ``contexts=[...]`` (``str``, node, ``NodeWithScore``, dict or
    :class:`Passage`), one NBCE row each::

        llm.complete("Who built it?", contexts=["passage 1", "passage 2"]).text
        for r in llm.stream_complete("Who built it?", contexts=nodes): print(r.delta, end="")

    Build it over a decoder (``NBCELLM(decoder=dec)``), a pipeline (``NBCELLM(pipeline=rag)``)
    or a model loaded on first use (``NBCELLM(model="...")`` or ``model_name=`` as in
    ``HuggingFaceLLM``; ``None`` = bundled), also as ``NBCELLM.from_model_id(model_id,
    device=, device_map=, model_kwargs=, generate_kwargs=)``; loading options ``device``,
    ``dtype``, ``device_map``, ``model_kwargs``. An argument that is not a parameter raises
    ``TypeError`` naming what to use instead. Options:
    ``max_new_tokens``, ``temperature`` (0/None greedy, > 0 samples), ``top_p``, ``top_k``,
    ``repetition_penalty``, ``frequency_penalty``, ``presence_penalty``, ``seed``,
    ``stop``, ``nbce_options`` (other :class:`NBCEConfig` fields), and per call the same
    names or any NBCEConfig field. ``system_prompt`` is the LLM's system prompt.
    ``retrieve=True``: without ``contexts``, retrieve through the pipeline (index + filter).
    ``filter_passages=True``: given contexts are re-scored and filtered by the pipeline's
    threshold first.

    A response's ``additional_kwargs`` hold ``supported``, ``sources`` (score, tokens,
    share), ``dropped``, ``token_sources``, ``finish_reason`` and ``usage``; ``raw`` is the
    :class:`Answer`. Streaming follows LlamaIndex: ``text`` is cumulative, ``delta`` new.
    ``chat`` uses the last user message as the question (earlier turns as a transcript).
    ``acomplete``/``astream_complete`` decode in a worker thread, never blocking the loop.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=(), populate_by_name=True)

    pipeline: Any = Field(default=None, exclude=True, description="a RAGPipeline")
    decoder: Any = Field(default=None, exclude=True, description="an NBCEDecoder")
    model: Optional[str] = Field(default=None, validation_alias=AliasChoices("model", "model_name"),
                                 description="model to load when no decoder is given (None = bundled); "
                                 "model_name= as in HuggingFaceLLM")
    model_display_name: Optional[str] = Field(default=None, description="name reported in metadata")
    device: Optional[str] = None
    dtype: Optional[str] = Field(default=None, description="float32, bfloat16, float16 or auto (default: by device)")
    device_map: Any = Field(default=None, description="transformers device_map, e.g. 'auto'")
    model_kwargs: Dict[str, Any] = Field(default_factory=dict, description="keywords for transformers' from_pretrained")
    max_new_tokens: Optional[int] = Field(default=None, alias="max_tokens")
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
    context_window: Optional[int] = None

    _rag: Any = PrivateAttr(default=None)
    _lock: Any = PrivateAttr(default_factory=threading.Lock)

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("messages_to_prompt", messages_to_question)
        super().__init__(**kwargs)

    @model_validator(mode="before")
    @classmethod
    def _check_arguments(cls, data: Any) -> Any:
        if isinstance(data, dict):
            check_constructor_arguments(cls.__name__, data, cls.model_fields, _LLM_HINTS)
        return data

    @classmethod
    def from_pipeline(cls, pipeline: Any, **kwargs: Any) -> "NBCELLM":
        return cls(pipeline=pipeline, **kwargs)

    @classmethod
    def from_model_id(cls, model_id: Optional[str] = None, *, device: Any = None, device_map: Any = None,
                      model_kwargs: Optional[Dict[str, Any]] = None, generate_kwargs: Optional[Dict[str, Any]] = None,
                      **kwargs: Any) -> "NBCELLM":
        """The LLM over ``model_id`` (an HF id, a local path or a ``.gguf`` file; ``None`` = the
        bundled model), loaded on first use, with the loading arguments of LangChain's
        ``HuggingFacePipeline.from_model_id`` and LlamaIndex's ``HuggingFaceLLM``: ``device``
        (``-1``/``"cpu"``, ``0``/``"cuda:0"``, ``"mps"``), ``device_map``, ``model_kwargs`` for
        transformers' ``from_pretrained`` (the dtype is ``dtype=``), ``generate_kwargs`` with
        generation options (any :class:`NBCEConfig` field). Other keywords are this class's."""
        options = dict(kwargs.pop("nbce_options", None) or {})
        options.update(generation_options(generate_kwargs, "NBCELLM.from_model_id generate_kwargs"))
        return cls(model=model_id, device=device_name(device), device_map=device_map,
                   model_kwargs=dict(model_kwargs or {}), nbce_options=options, **kwargs)

    @classmethod
    def class_name(cls) -> str:
        return "NBCELLM"

    # ---------------- engine
    def _loaded_decoder(self) -> Any:
        if self.decoder is not None:
            return self.decoder
        if self.pipeline is not None:
            return self.pipeline.decoder
        return self._rag.decoder if self._rag is not None else None

    def get_pipeline(self) -> Any:
        """The :class:`RAGPipeline` this LLM decodes with (loads the model on first use)."""
        if self.pipeline is not None:
            return self.pipeline
        with self._lock:
            if self._rag is None:
                from ..decoder import NBCEDecoder
                from ..pipeline import RAGPipeline

                dec = self.decoder if self.decoder is not None else NBCEDecoder.from_pretrained(
                    self.model, device=self.device, dtype=self.dtype, device_map=self.device_map,
                    model_kwargs=self.model_kwargs)
                self._rag = RAGPipeline(dec)
        return self._rag

    @property
    def metadata(self) -> LLMMetadata:
        dec = self._loaded_decoder()
        if self.model_display_name:
            name = self.model_display_name
        elif dec is not None:
            name = str(dec.name or "") or type(dec.model).__name__
        elif self.model:
            name = str(self.model)
        else:
            from ..models import BUNDLED_LLM_NAME

            name = BUNDLED_LLM_NAME
        window = self.context_window or (dec.context_window if dec is not None else 8192)
        num_output = self.max_new_tokens or (dec.config.max_new_tokens if dec is not None else 64)
        return LLMMetadata(context_window=int(window), num_output=int(num_output), is_chat_model=False,
                           model_name=name)

    def _options(self, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        """The LLM's settings, then this call's keywords, as NBCEConfig overrides through
        the one OpenAI-parameter mapping (:func:`nbce_rag.config.openai_options`)."""
        own = {"max_tokens": self.max_new_tokens, "stop": self.stop or None, "temperature": self.temperature,
               "top_p": self.top_p, "seed": self.seed, "top_k": self.top_k,
               "repetition_penalty": self.repetition_penalty, "frequency_penalty": self.frequency_penalty,
               "presence_penalty": self.presence_penalty}
        opts = openai_options({**self.nbce_options, **own}, kwargs)
        if self.system_prompt and "system_prompt" not in opts:
            opts["system_prompt"] = self.system_prompt
        return opts

    def _events(self, prompt: str, formatted: bool, kwargs: Dict[str, Any]) -> Iterator[StreamEvent]:
        kwargs = dict(kwargs)
        passages = pop_passages(kwargs, node_to_passage)
        k = kwargs.pop("k", None)
        k = k if k is not None else self.k
        kwargs.pop("formatted", None)
        question = prompt if formatted or self.completion_to_prompt is None else self.completion_to_prompt(prompt)
        options = self._options(kwargs)
        return self.get_pipeline().answer_stream(question, passages, retrieve=self.retrieve,
                                                 filter_passages=self.filter_passages, k=k, **options)

    def _complete(self, prompt: str, formatted: bool, kwargs: Dict[str, Any]) -> CompletionResponse:
        answer = None
        for ev in self._events(prompt, formatted, kwargs):
            answer = ev.answer or answer
        return CompletionResponse(text=answer.text, raw=answer, additional_kwargs=answer_info(answer))

    def _stream(self, prompt: str, formatted: bool, kwargs: Dict[str, Any]) -> Iterator[CompletionResponse]:
        text = ""
        for ev in self._events(prompt, formatted, kwargs):
            if ev.answer is not None:
                text += ev.text
                yield CompletionResponse(text=text, delta=ev.text, raw=ev.answer, additional_kwargs=answer_info(ev.answer))
            elif ev.text:
                text += ev.text
                yield CompletionResponse(text=text, delta=ev.text)

    # ---------------- LlamaIndex API
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return self._complete(prompt, formatted, kwargs)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        return self._stream(prompt, formatted, kwargs)

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return await asyncio.to_thread(self._complete, prompt, formatted, kwargs)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        it = await asyncio.to_thread(self._stream, prompt, formatted, kwargs)
        return _aiter_thread(it)


# --------------------------------------------------------------------------------------------
# Synthesizer
# --------------------------------------------------------------------------------------------


class NBCESynthesizer(BaseSynthesizer):
    """A response synthesizer that hands every node to :class:`NBCELLM` as a separate
    passage (text as the LLM sees it, the node's score and id), instead of stuffing or
    refining them into one prompt. No nodes (e.g. the filter kept nothing) -> a closed-book
    answer flagged unsupported, not LlamaIndex's "Empty Response".

    ``Response.metadata["nbce"]`` holds :func:`answer_info` (for streaming responses it is
    filled in when the stream ends). ``llm=None`` builds the default :class:`NBCELLM`
    (bundled model) -- never ``Settings.llm``.
    """

    def __init__(self, llm: Optional[NBCELLM] = None, callback_manager: Optional[CallbackManager] = None,
                 streaming: bool = False, **decode_kwargs: Any) -> None:
        if llm is None:
            llm = NBCELLM()
        if not isinstance(llm, NBCELLM):
            raise TypeError(f"NBCESynthesizer needs an NBCELLM (it passes nodes as separate passages); got {type(llm).__name__}")
        super().__init__(llm=llm, callback_manager=callback_manager, streaming=streaming)
        self._decode_kwargs = decode_kwargs

    @property
    def llm(self) -> NBCELLM:
        return self._llm

    def _get_prompts(self) -> Dict[str, Any]:
        return {}

    def _update_prompts(self, prompts: Dict[str, Any]) -> None:
        pass

    # text-only entry points (abstract in BaseSynthesizer): chunks are the passages
    def get_response(self, query_str: str, text_chunks: Sequence[str], **response_kwargs: Any):
        kw = {**self._decode_kwargs, **response_kwargs}
        if self._streaming:
            return (r.delta for r in self._llm.stream_complete(query_str, contexts=list(text_chunks), **kw) if r.delta)
        return self._llm.complete(query_str, contexts=list(text_chunks), **kw).text

    async def aget_response(self, query_str: str, text_chunks: Sequence[str], **response_kwargs: Any):
        kw = {**self._decode_kwargs, **response_kwargs}
        if self._streaming:
            gen = await self._llm.astream_complete(query_str, contexts=list(text_chunks), **kw)

            async def deltas() -> AsyncGenerator[str, None]:
                async for r in gen:
                    if r.delta:
                        yield r.delta

            return deltas()
        return (await self._llm.acomplete(query_str, contexts=list(text_chunks), **kw)).text

    # node entry points: keep score and id of every node
    def _begin(self, query: Any, nodes: List[NodeWithScore], additional_source_nodes):
        qb = QueryBundle(query_str=query) if isinstance(query, str) else query
        passages = [node_to_passage(n) for n in nodes]
        source_nodes = list(nodes) + list(additional_source_nodes or [])
        meta = self._get_metadata_for_response([n.node for n in source_nodes]) or {}
        return qb, passages, source_nodes, meta

    @dispatcher.span
    def synthesize(self, query: Any, nodes: List[NodeWithScore],
                   additional_source_nodes: Optional[Sequence[NodeWithScore]] = None, **response_kwargs: Any) -> RESPONSE_TYPE:
        qb, passages, source_nodes, meta = self._begin(query, nodes, additional_source_nodes)
        dispatcher.event(SynthesizeStartEvent(query=qb))
        kw = {**self._decode_kwargs, **response_kwargs}
        with self._callback_manager.event(CBEventType.SYNTHESIZE, payload={EventPayload.QUERY_STR: qb.query_str}) as event:
            if self._streaming:
                stream = self._llm.stream_complete(qb.query_str, contexts=passages, **kw)

                def deltas() -> Generator[str, None, None]:
                    for r in stream:
                        if "supported" in r.additional_kwargs:
                            meta["nbce"] = r.additional_kwargs
                        if r.delta:
                            yield r.delta

                response: RESPONSE_TYPE = StreamingResponse(deltas(), source_nodes=source_nodes, metadata=meta)
            else:
                r = self._llm.complete(qb.query_str, contexts=passages, **kw)
                meta["nbce"] = r.additional_kwargs
                response = Response(r.text, source_nodes=source_nodes, metadata=meta)
            event.on_end(payload={EventPayload.RESPONSE: response})
        dispatcher.event(SynthesizeEndEvent(query=qb, response=response))
        return response

    @dispatcher.span
    async def asynthesize(self, query: Any, nodes: List[NodeWithScore],
                          additional_source_nodes: Optional[Sequence[NodeWithScore]] = None,
                          **response_kwargs: Any) -> RESPONSE_TYPE:
        qb, passages, source_nodes, meta = self._begin(query, nodes, additional_source_nodes)
        dispatcher.event(SynthesizeStartEvent(query=qb))
        kw = {**self._decode_kwargs, **response_kwargs}
        with self._callback_manager.event(CBEventType.SYNTHESIZE, payload={EventPayload.QUERY_STR: qb.query_str}) as event:
            if self._streaming:
                stream = await self._llm.astream_complete(qb.query_str, contexts=passages, **kw)

                async def deltas() -> AsyncGenerator[str, None]:
                    async for r in stream:
                        if "supported" in r.additional_kwargs:
                            meta["nbce"] = r.additional_kwargs
                        if r.delta:
                            yield r.delta

                response: RESPONSE_TYPE = AsyncStreamingResponse(deltas(), source_nodes=source_nodes, metadata=meta)
            else:
                r = await self._llm.acomplete(qb.query_str, contexts=passages, **kw)
                meta["nbce"] = r.additional_kwargs
                response = Response(r.text, source_nodes=source_nodes, metadata=meta)
            event.on_end(payload={EventPayload.RESPONSE: response})
        dispatcher.event(SynthesizeEndEvent(query=qb, response=response))
        return response


# --------------------------------------------------------------------------------------------
# Embedding, retriever, postprocessor
# --------------------------------------------------------------------------------------------


class CoSENTEmbedding(BaseEmbedding):
    """LlamaIndex ``BaseEmbedding`` over a :class:`CoSENTEncoder` (L2-normalised vectors).
    ``encoder=`` an encoder, or ``model_name=`` one to load (``None`` = bundled
    all-MiniLM-L6-v2), loaded on first use."""

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    device: Optional[str] = None
    _encoder: Any = PrivateAttr(default=None)
    _source: Optional[str] = PrivateAttr(default=None)
    _lock: Any = PrivateAttr(default_factory=threading.Lock)

    def __init__(self, encoder: Any = None, model_name: Optional[str] = None, **kwargs: Any) -> None:
        from ..encoder import BUNDLED_NAME

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
                    from ..encoder import CoSENTEncoder

                    self._encoder = CoSENTEncoder.from_pretrained(self._source, device=self.device)
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
    """:func:`nbce_rag.retrieval.select` over nodes (their text without metadata, their score)."""
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
    decisions of the last call (per instance; not meant for concurrent use).
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


# --------------------------------------------------------------------------------------------
# Query engine
# --------------------------------------------------------------------------------------------


class NBCEQueryEngine(CustomQueryEngine):
    """retrieve -> node postprocessors -> :class:`NBCESynthesizer`, as a query engine.

    ``query(q)`` returns a ``Response`` (``StreamingResponse`` with ``streaming=True``) whose
    ``source_nodes`` are the passages the decoder saw and ``metadata["nbce"]`` says whether
    the answer is supported and what each passage contributed; ``aquery`` is the async twin
    (``AsyncStreamingResponse`` when streaming). When nothing survives retrieval and
    filtering, the answer is closed-book with ``supported=False``.

    ``NBCEQueryEngine.from_pipeline(rag)`` (or ``rag.as_query_engine()``) answers exactly as
    ``rag.ask``. Pass ``decode_kwargs`` (e.g. ``max_new_tokens=32``) for per-engine options.
    """

    retriever: Any = Field(description="a LlamaIndex BaseRetriever (e.g. CoSENTRetriever)")
    llm: Any = Field(default=None, description="an NBCELLM (None: the bundled model)")
    node_postprocessors: List[Any] = Field(default_factory=list)
    streaming: bool = False
    decode_kwargs: Dict[str, Any] = Field(default_factory=dict)

    _synth: Any = PrivateAttr(default=None)

    def model_post_init(self, __context: Any) -> None:
        if self.llm is None:
            self.llm = NBCELLM()
        self._synth = NBCESynthesizer(llm=self.llm, callback_manager=self.callback_manager, streaming=self.streaming,
                                      **self.decode_kwargs)

    @classmethod
    def from_pipeline(cls, pipeline: Any, *, streaming: bool = False, **kwargs: Any) -> "NBCEQueryEngine":
        """A query engine that retrieves, filters and decodes like ``pipeline.ask``. Keywords
        other than the engine's fields (``retriever``, ``llm``, ``node_postprocessors``,
        ``decode_kwargs``) are decoding options (e.g. ``max_new_tokens=32``)."""
        fields = {k: kwargs.pop(k) for k in ("retriever", "llm", "node_postprocessors", "decode_kwargs", "callback_manager")
                  if k in kwargs}
        decode = {**fields.pop("decode_kwargs", {}), **kwargs}
        retriever = fields.pop("retriever", None) or CoSENTRetriever.from_pipeline(pipeline)
        llm = fields.pop("llm", None) or NBCELLM.from_pipeline(pipeline)
        return cls(retriever=retriever, llm=llm, streaming=streaming, decode_kwargs=decode, **fields)

    @property
    def synthesizer(self) -> NBCESynthesizer:
        return self._synth

    def _nodes(self, query_str: str) -> List[NodeWithScore]:
        qb = QueryBundle(query_str)
        nodes = self.retriever.retrieve(qb)
        for pp in self.node_postprocessors:
            nodes = pp.postprocess_nodes(nodes, query_bundle=qb)
        return nodes

    async def _anodes(self, query_str: str) -> List[NodeWithScore]:
        qb = QueryBundle(query_str)
        nodes = await self.retriever.aretrieve(qb)
        for pp in self.node_postprocessors:
            nodes = await pp.apostprocess_nodes(nodes, query_bundle=qb)
        return nodes

    def custom_query(self, query_str: str) -> RESPONSE_TYPE:
        return self._synth.synthesize(query_str, self._nodes(query_str))

    async def acustom_query(self, query_str: str) -> RESPONSE_TYPE:
        return await self._synth.asynthesize(query_str, await self._anodes(query_str))
