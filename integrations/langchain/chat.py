"""The two LangChain language models, :class:`ChatNBCE` (``BaseChatModel``) and
:class:`NBCELLM` (``LLM``), over one engine: both decode through
:meth:`RAGPipeline.answer_stream`, the model loaded on first use when built over a name."""

from __future__ import annotations

import threading
from typing import Any, Dict, Iterator, List, Optional, Sequence

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LLM
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, Generation, GenerationChunk, LLMResult
from pydantic import ConfigDict, Field, PrivateAttr, model_validator

from nbce_rag.adapter_args import check_constructor_arguments, device_name, generation_options, load_pipeline
from nbce_rag.config import openai_options
from nbce_rag.types import Answer, StreamEvent, pop_passages

from nbce_rag.integrations.langchain.convert import document_to_passage, split_messages, usage_metadata


#: keywords LangChain itself may add to a model call; they are not decoding options
_FRAMEWORK_KWARGS = ("stream", "model", "ls_structured_output_format")


def _penalties(model: Any) -> Dict[str, Any]:
    """The model's ``top_k``, ``repetition_penalty`` (transformers' / HuggingFacePipeline's
    names) and ``frequency_penalty``, ``presence_penalty`` (ChatOpenAI's); see :mod:`nbce_rag.decoding.sampling`."""
    return {k: getattr(model, k) for k in ("top_k", "repetition_penalty", "frequency_penalty", "presence_penalty")}


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
                self._rag = load_pipeline(self.model_name, decoder=self.decoder, device=self.device, dtype=self.dtype,
                                          device_map=self.device_map, model_kwargs=self.model_kwargs)
        return self._rag

    @property
    def display_name(self) -> str:
        if self.model_name:
            return str(self.model_name)
        dec = self.decoder if self.decoder is not None else getattr(self.pipeline, "decoder", None)
        if dec is not None:
            return str(dec.name or "") or type(dec.model).__name__
        from nbce_rag.models import BUNDLED_LLM_NAME

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
        msg = AIMessage(content=answer.text, usage_metadata=usage_metadata(answer),
                        response_metadata=self._message_metadata(answer))
        return ChatResult(generations=[ChatGeneration(message=msg, generation_info={"finish_reason": answer.finish_reason})],
                          llm_output={"model_name": self.display_name, "token_usage": usage_metadata(answer)})

    def _stream(self, messages: List[BaseMessage], stop: Optional[List[str]] = None,
                run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        # BaseChatModel.stream fires on_llm_new_token for every chunk itself: do not fire here.
        question, passages, options, k = self._prepare(messages, stop, kwargs)
        for ev in self._events(question, passages, options, k):
            if ev.answer is not None:
                a = ev.answer
                yield ChatGenerationChunk(
                    message=AIMessageChunk(content=ev.text, usage_metadata=usage_metadata(a),
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
                "finish_reason": a.finish_reason, "usage": usage_metadata(a), "nbce": a.metadata()})])
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
                info = {"finish_reason": a.finish_reason, "usage": usage_metadata(a), "nbce": a.metadata()}
            chunk = GenerationChunk(text=ev.text, generation_info=info)
            if run_manager is not None and ev.text:
                # BaseLLM.stream leaves token callbacks to the implementation
                run_manager.on_llm_new_token(ev.text, chunk=chunk)
            yield chunk
