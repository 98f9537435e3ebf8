"""The OpenAI wire format the server speaks: request models (with the fields' meanings, like
vLLM's ``protocol.py``), the error format, and how a request's messages become a question.

Unknown OpenAI parameters are accepted and ignored (clients send many), except those that
would change the answer's meaning and that this server cannot honour (``tools``,
``tool_choice``, ``functions``, ``response_format`` other than text, ``n`` > 1, ``logprobs``,
``echo``): those are a 400 that says so.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

try:
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, Field, ValidationError
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "nbce_rag.integrations.server needs the `server` extra: pip install 'nbce-rag[server]' "
        f"(fastapi, uvicorn, pydantic); missing: {e.name}"
    ) from e

from nbce_rag.errors import ConfigError, NBCERagError, PromptTooLongError

logger = logging.getLogger("nbce_rag.integrations.server")

__all__ = [
    "OpenAIError", "DocumentIn", "NBCEOptions", "StreamOptions", "ChatMessage", "ChatCompletionRequest",
    "CompletionRequest", "EmbeddingRequest", "GenerationRequest", "bad_request", "timeout_error",
    "error_from_exception", "validate_request", "check_unsupported", "chat_question", "completion_question",
]


# ---------------------------------------------------------------------------------- errors
class OpenAIError(Exception):
    """An error answered in the OpenAI format ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def timeout_error(limit: float) -> OpenAIError:
    return OpenAIError(504, f"the request did not finish within the server's timeout of {limit:g} s "
                            "(queue time included); retry later or ask for fewer tokens",
                       type="timeout", code="timeout")


def error_from_exception(exc: BaseException) -> OpenAIError:
    """Map an exception raised inside the worker (pipeline, decoder, encoder) to an HTTP error."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, PromptTooLongError):
        return OpenAIError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, (ConfigError, ValueError, TypeError)):
        return bad_request(str(exc))
    if isinstance(exc, NBCERagError):
        return OpenAIError(500, str(exc), type="server_error")
    logger.error("internal error while serving a request", exc_info=exc)
    return OpenAIError(500, f"internal server error ({type(exc).__name__})", type="server_error")


# ---------------------------------------------------------------------------------- request models
class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class DocumentIn(BaseModel):
    """One passage of the ``documents`` field (vLLM's shape, plus optional id/score)."""

    model_config = ConfigDict(extra="allow")
    text: str = Field(description="The passage text; one NBCE row (or several windows when it is long).")
    title: Optional[str] = Field(None, description="Read by the model as `title + newline + text`.")
    id: Optional[Union[str, int]] = Field(None, description="Echoed in `nbce.sources[].id`.")
    score: Optional[float] = Field(None, description="A retrieval score (used by the `scored_entropy` pooling).")


class NBCEOptions(BaseModel):
    """The ``nbce`` request extension: NBCE settings for this request."""

    model_config = ConfigDict(extra="forbid")
    pooling: Optional[str] = Field(None, description="How passage rows are pooled: auto, min_entropy, mean, max, "
                                                     "replug, scored_entropy (see nbce_rag.decoding.nbce).")
    beta: Optional[float] = Field(None, description="Weight of the no-passage row in the NBCE fusion (default 0.25).")
    eta: Optional[float] = Field(None, description="Stickiness of the selected passage between tokens.")
    nbce_top_p: Optional[float] = Field(None, description="Nucleus each row is truncated to before fusion.")
    k: Optional[int] = Field(None, description="Candidates retrieved from the server's index (no `documents`).")
    on_unsupported: Optional[str] = Field(None, description="When no candidate passes the filter: \"abstain\" "
                                          "(default: say nothing in the documents answers it) or \"closed_book\" "
                                          "(the model answers alone, flagged unsupported).")


class StreamOptions(_Open):
    include_usage: Optional[bool] = Field(False, description="Send an extra chunk with `usage` and no choices.")


class GenerationRequest(_Open):
    model: Optional[str] = Field(None, description="The served model name (or an alias from --served-model-name); "
                                                   "omitted = the served model; anything else is a 404.")
    stream: Optional[bool] = Field(False, description="Server-sent events, ending with `data: [DONE]`.")
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[int] = Field(None, description="Tokens to generate (the decoder's max_new_tokens).")
    max_completion_tokens: Optional[int] = Field(None, description="Alias of max_tokens (wins when both are set).")
    temperature: Optional[float] = Field(None, description="Omitted or 0: greedy; > 0: sampling at that temperature.")
    top_p: Optional[float] = Field(None, description="< 1 samples from the nucleus (temperature 1 unless given).")
    seed: Optional[int] = Field(None, description="Seed of this request's sampler (reproducible answers).")
    stop: Optional[Union[str, List[str]]] = Field(None, description="Up to ServerLimits.max_stop stop strings.")
    n: Optional[int] = Field(None, description="Must be 1.")
    logprobs: Optional[Union[bool, int]] = Field(None, description="Not supported (400 when set).")
    documents: Optional[List[Union[str, DocumentIn]]] = Field(
        None, description="vLLM's RAG field: the passages, one NBCE row each; [] = none (no retrieval).")
    contexts: Optional[List[str]] = Field(None, description="Alias of documents (plain strings).")
    nbce: Optional[NBCEOptions] = Field(None, description="NBCE settings for this request.")
    tools: Optional[Any] = Field(None, description="Not supported: a 400 when non-empty.")
    tool_choice: Optional[Any] = Field(None, description="Not supported: a 400 unless \"none\".")
    functions: Optional[Any] = Field(None, description="Not supported (legacy tools): a 400 when non-empty.")
    function_call: Optional[Any] = Field(None, description="Not supported (legacy tool_choice): a 400 unless \"none\".")
    response_format: Optional[Any] = Field(None, description="Only {\"type\": \"text\"}; json_object/json_schema are a 400.")


class ChatMessage(_Open):
    role: str = Field(description="system/developer (-> the decoder's system prompt), user (the last one is "
                                  "the question), assistant (ignored).")
    content: Optional[Union[str, List[Dict[str, Any]]]] = Field(None, description="A string or text parts.")


class ChatCompletionRequest(GenerationRequest):
    messages: List[ChatMessage] = Field(description="The conversation; NBCE answers its last user message.")


class CompletionRequest(GenerationRequest):
    prompt: Union[str, List[Any]] = Field(description="The question: a string or a list of one string.")
    echo: Optional[bool] = Field(None, description="Not supported (400 when true).")


class EmbeddingRequest(_Open):
    input: Union[str, List[Any]] = Field(description="A string or a list of strings (token arrays are refused).")
    model: Optional[str] = Field(None, description="Not checked: the server has one encoder.")
    encoding_format: Optional[Literal["float", "base64"]] = Field("float", description="base64: little-endian float32.")
    dimensions: Optional[int] = Field(None, description="Must equal the encoder's dimension when given.")


_UNION_TAG = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|function-.*|[A-Z]\w*)$")


def validate_request(model: type, obj: Dict[str, Any]) -> Any:
    """Parse a request body; a validation error becomes a 400 naming the offending field."""
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        errors = e.errors()
        # in a union, the deepest error is the informative one ("documents.0.text: Field required")
        err = max(errors, key=lambda x: len(x.get("loc", ())))
        loc = ".".join(str(x) for x in err.get("loc", ()) if not (isinstance(x, str) and _UNION_TAG.match(x)))
        msg = err.get("msg", "invalid value")
        raise bad_request(f"invalid request: {loc or 'body'}: {msg}", param=loc or None) from None


def check_unsupported(req: GenerationRequest) -> None:
    """A 400 for parameters that would change what the answer is and that NBCE decoding
    cannot honour (tool calls, structured output), instead of silently ignoring them."""
    if req.tools or req.functions:
        param = "tools" if req.tools else "functions"
        raise bad_request(f"{param} is not supported: this server answers from passages and does not call tools "
                          "(remove the field, or use a tool-calling model server for agents)", param=param,
                          code="unsupported_parameter")
    for param in ("tool_choice", "function_call"):
        v = getattr(req, param)
        if v is not None and v != "none":
            raise bad_request(f"{param} is not supported (only \"none\"): this server does not call tools", param=param,
                              code="unsupported_parameter")
    rf = req.response_format
    if rf is not None:
        kind = rf.get("type") if isinstance(rf, dict) else rf
        if kind != "text":
            raise bad_request(f"response_format {kind!r} is not supported: only {{\"type\": \"text\"}} (structured "
                              "output would need constrained decoding)", param="response_format",
                              code="unsupported_parameter")


# ---------------------------------------------------------------------------------- messages -> question
def _text_of(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for i, part in enumerate(content):
        kind = part.get("type")
        if kind in ("text", "input_text") and isinstance(part.get("text"), str):
            parts.append(part["text"])
        else:
            raise bad_request(f"{where}.content[{i}]: only text parts are supported (got type {kind!r})",
                              param=f"{where}.content", code="unsupported_content")
    return "\n".join(parts)


def chat_question(req: ChatCompletionRequest) -> Tuple[str, Optional[str]]:
    if not req.messages:
        raise bad_request("messages is empty; send at least one user message", param="messages")
    system = [_text_of(m.content, f"messages[{i}]") for i, m in enumerate(req.messages)
              if m.role in ("system", "developer")]
    users = [(i, m) for i, m in enumerate(req.messages) if m.role == "user"]
    if not users:
        raise bad_request("messages has no user message: the last user message is the question", param="messages")
    i, last = users[-1]
    question = _text_of(last.content, f"messages[{i}]")
    system_prompt = "\n\n".join(s for s in system if s.strip()) or None
    return question, system_prompt


def completion_question(req: CompletionRequest) -> str:
    p = req.prompt
    if isinstance(p, list):
        if len(p) != 1 or not isinstance(p[0], str):
            raise bad_request("prompt must be a string or a list of exactly one string (batched and token prompts are "
                              "not supported)", param="prompt")
        p = p[0]
    return p
