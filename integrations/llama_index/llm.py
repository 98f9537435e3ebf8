"""The LlamaIndex LLM, :class:`NBCELLM` (``CustomLLM``): the prompt is the question, the
passages come as ``contexts=[...]``; it decodes through :meth:`RAGPipeline.answer_stream`,
the model loaded on first use when built over a name."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, AsyncGenerator, Dict, Iterator, List, Optional

from llama_index.core.base.llms.types import (
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
)
from llama_index.core.bridge.pydantic import ConfigDict, Field, PrivateAttr, model_validator
from llama_index.core.llms.callbacks import llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from pydantic import AliasChoices

from nbce_rag.adapter_args import check_constructor_arguments, device_name, generation_options, load_pipeline
from nbce_rag.config import openai_options
from nbce_rag.types import StreamEvent, pop_passages

from nbce_rag.integrations.llama_index.convert import answer_info, messages_to_question, node_to_passage

_END = object()


async def _aiter_thread(it: Iterator[Any]) -> AsyncGenerator[Any, None]:
    """Drive a blocking iterator from async code, one step per worker-thread call."""
    while True:
        item = await asyncio.to_thread(next, it, _END)
        if item is _END:
            return
        yield item



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
                self._rag = load_pipeline(self.model, decoder=self.decoder, device=self.device, dtype=self.dtype,
                                          device_map=self.device_map, model_kwargs=self.model_kwargs)
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
            from nbce_rag.models import BUNDLED_LLM_NAME

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
