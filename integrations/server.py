"""An OpenAI-compatible HTTP server over a :class:`~nbce_rag.pipeline.RAGPipeline`.

RAG app backends speak the OpenAI API; this makes nbce-rag one of them. Needs the ``server``
extra (``pip install 'nbce-rag[server]'``: fastapi, uvicorn, pydantic). Start it with
``nbce-rag serve [--index DIR] [--model M] [--host H --port P] [--api-key K]``, or build the
app yourself::

    from nbce_rag import RAGPipeline
    from nbce_rag.integrations.server import create_app, ServerLimits
    app = create_app(RAGPipeline.from_pretrained(index="my_index"), api_key="secret")
    # uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints
---------
``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions``,
``POST /v1/completions``, ``POST /v1/embeddings`` (the CoSENT encoder), ``GET /health``
(never needs the API key: ``{"status": "ok", "queued", "busy", "stats"}``).

Requests (what is read, what it maps to)
----------------------------------------
* The **question** is the text of the last ``user`` message (``content`` a string, or a list
  of ``{"type": "text", "text": ...}`` parts joined by newlines); ``system``/``developer``
  messages are joined and become the decoder's ``system_prompt``; earlier user/assistant
  turns are ignored (NBCE answers one question). ``/v1/completions`` reads ``prompt`` (a
  string or a list of one string).
* ``max_tokens`` / ``max_completion_tokens`` -> ``max_new_tokens`` (default: the decoder's,
  64). ``stop`` (a string or up to ``ServerLimits.max_stop`` strings), ``seed``.
* ``temperature``: omitted or ``0`` = greedy (the decoder's default, as
  ``RAGPipeline.ask``); ``> 0`` = sampling at that temperature. ``top_p`` shapes sampling
  and never turns it on (the one mapping of every surface, ``nbce_rag.config.OPENAI_PARAMS``).
  ``n`` must be 1; ``logprobs``/``echo`` are refused. Other
  OpenAI parameters (``frequency_penalty``, ``user``, ...) are accepted and ignored.
* The ``model`` field is accepted whatever it says; responses carry the served name.

Passages (request extension fields, sent by the ``openai`` client through ``extra_body``)
-------------------------------------------------------------------------------------------
* ``documents``: vLLM's field, a list of ``{"title": str, "text": str}`` (also accepted:
  ``"id"``, ``"score"``, or a plain string). The model reads ``title + "\\n" + text`` (just
  ``text`` without a title), one NBCE row per document. ``contexts: [str]`` is an alias.
* When neither field is sent and the pipeline has an index, the server retrieves ``k``
  candidates and filters them with the pipeline's calibration; with no index the question
  is answered closed-book. ``"documents": []`` means "no passages" (no retrieval).
* With a calibration, given documents are re-scored and filtered too (as ``RAGPipeline``).
* ``nbce``: optional NBCE settings, ``{"pooling": "auto"|"min_entropy"|"mean"|"max"|"replug"|
  "scored_entropy", "beta": 0.25, "eta": 0.1, "nbce_top_p": 0.95, "k": 10}`` (``k``: how
  many candidates to retrieve from the index). Unknown keys are a 400.

Responses (extension field)
---------------------------
Non-streaming responses, and the last chunk of a stream (the one with ``finish_reason``),
carry a top-level ``nbce`` object (the ``openai`` client exposes it as
``response.model_extra["nbce"]``)::

    "nbce": {"supported": true,          # false: no passage backed the answer (closed-book)
             "retrieved": false,         # true: passages came from the server's index
             "sources": [{"index": 0,    # position in the request's documents (null if retrieved)
                          "id": "...", "title": "...", "score": 0.71,   # score: cosine, if known
                          "n_tokens": 12, "share": 0.75,                # tokens drawn from it
                          "weight_initial": 0.9, "weight_final": 1.0,   # pooling weight, first/last token
                          "text": "..."}],                               # only for retrieved passages
             "dropped": [{"id", "title", "score", "code"}]}             # what the filter removed

``usage`` (``prompt_tokens`` = tokens prefilled over all NBCE rows) is on every non-streaming
response, and on streams in one extra chunk with ``"choices": []`` when
``stream_options: {"include_usage": true}``. Streams end with ``data: [DONE]``.

Robustness
----------
* One model worker thread consumes a bounded queue (``ServerLimits.max_queue`` waiting
  requests): requests are never interleaved, and a full queue answers **503**
  (``code: "server_overloaded"``) at once.
* Per-request timeout (``request_timeout_s``, counted from arrival, queue time included):
  **504** (``type: "timeout"``) before the first token; on a stream that already started,
  an OpenAI-format error event ``data: {"error": {...}}`` followed by ``data: [DONE]`` (the
  ``openai`` client raises ``APIError``). The worker stops decoding that request.
* A client that disconnects (mid-stream, or while waiting) cancels its request: the worker
  checks a flag between tokens, closes the decoder's generator and moves on.
* Limits (``ServerLimits``): body size (**413**), number of documents, characters per
  document, question length, ``max_tokens``, stop strings, embedding inputs (**400**).
* Every error is ``{"error": {"message", "type", "param", "code"}}``, including malformed
  JSON (400, ``code: "invalid_json"``), unknown routes (404) and a missing or wrong API key
  (401, ``code: "invalid_api_key"``; send ``Authorization: Bearer <key>``).

Embeddings
----------
``/v1/embeddings`` encodes with the CoSENT encoder (``encoder=`` of :func:`create_app`; else the
index's encoder; else the bundled all-MiniLM-L6-v2, loaded on first use). ``input`` is a string
or a list of strings (token arrays are refused: with LangChain use
``OpenAIEmbeddings(check_embedding_ctx_length=False)``); ``encoding_format`` ``"float"`` or
``"base64"`` (little-endian float32, the ``openai`` client's default).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import queue
import re
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Literal, Optional, Tuple, Union

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, ValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "nbce_rag.integrations.server needs the `server` extra: pip install 'nbce-rag[server]' "
        f"(fastapi, uvicorn, pydantic); missing: {e.name}"
    ) from e

import numpy as np

from nbce_rag.config import OPENAI_PARAMS, openai_options
from nbce_rag.errors import ConfigError, NBCERagError, PromptTooLongError
from nbce_rag.types import Answer, Passage

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "nbce-rag"

__all__ = ["create_app", "ServerLimits", "ModelWorker", "OpenAIError", "DEFAULT_MODEL_NAME"]


# ---------------------------------------------------------------------------------- limits
@dataclass(frozen=True)
class ServerLimits:
    """Bounds on what one request may ask for; beyond them the server answers 4xx (or 503
    when the queue is full). The defaults suit one CPU/GPU worker serving a small model."""

    max_body_bytes: int = 2 * 1024 * 1024  #: request body (413 beyond)
    max_documents: int = 64  #: passages per request (``documents`` + ``contexts``), and max ``nbce.k``
    max_document_chars: int = 20_000  #: characters per passage (longer ones are windowed by the decoder)
    max_question_chars: int = 8_000  #: characters of the question (the last user message / prompt)
    max_tokens: int = 1024  #: largest ``max_tokens`` a request may ask for
    max_stop: int = 4  #: stop strings per request (OpenAI's limit)
    max_embedding_inputs: int = 256  #: strings per /v1/embeddings request
    max_queue: int = 64  #: requests waiting for the model worker (503 beyond)
    request_timeout_s: float = 300.0  #: wall time per request from arrival, queue included (504)

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_documents", "max_document_chars", "max_question_chars",
                     "max_tokens", "max_embedding_inputs", "max_queue"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"ServerLimits.{name} must be >= 1 (got {getattr(self, name)})")
        if self.max_stop < 0:
            raise ConfigError(f"ServerLimits.max_stop must be >= 0 (got {self.max_stop})")
        if not self.request_timeout_s > 0:
            raise ConfigError(f"ServerLimits.request_timeout_s must be > 0 (got {self.request_timeout_s})")


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


def _bad(message: str, param: Optional[str] = None, code: Optional[str] = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def _timeout_error(limit: float) -> OpenAIError:
    return OpenAIError(504, f"the request did not finish within the server's timeout of {limit:g} s "
                            "(queue time included); retry later or ask for fewer tokens",
                       type="timeout", code="timeout")


def _error_from_exception(exc: BaseException) -> OpenAIError:
    """Map an exception raised inside the worker (pipeline, decoder, encoder) to an HTTP error."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, PromptTooLongError):
        return OpenAIError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, (ConfigError, ValueError, TypeError)):
        return _bad(str(exc))
    if isinstance(exc, NBCERagError):
        return OpenAIError(500, str(exc), type="server_error")
    logger.exception("internal error while serving a request", exc_info=exc)
    return OpenAIError(500, f"internal server error ({type(exc).__name__})", type="server_error")


# ---------------------------------------------------------------------------------- worker
_CANCELLED = "cancelled"


class _Job:
    """One request's work for the model worker, and the channel its results come back on."""

    __slots__ = ("fn", "stream", "final_only", "loop", "out", "cancel", "reason", "deadline", "outcome")

    def __init__(self, fn: Callable[[], Any], *, stream: bool, final_only: bool, deadline: float):
        self.fn = fn
        self.stream = stream
        self.final_only = final_only  #: push only the event carrying the Answer (non-streaming requests)
        self.loop = asyncio.get_running_loop()
        self.out: "asyncio.Queue[Tuple[str, Any]]" = asyncio.Queue()
        self.cancel = threading.Event()
        self.reason: Optional[str] = None  #: why it was cancelled: "cancelled" (client gone) or "timed_out"
        self.deadline = deadline
        self.outcome: Optional[str] = None

    def abort(self, reason: str = _CANCELLED) -> None:
        """Ask the worker to drop this job (checked between tokens)."""
        if self.reason is None:
            self.reason = reason
        self.cancel.set()

    def push(self, kind: str, value: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass


class ModelWorker:
    """A single thread that runs every model call, one request at a time, from a bounded queue.

    ``stats`` counts outcomes: completed, cancelled (client went away), timed_out, failed,
    rejected (queue full).
    """

    def __init__(self, max_queue: int):
        self._queue: "queue.Queue[Optional[_Job]]" = queue.Queue(maxsize=max_queue)
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self.busy = False
        self.stats = {"completed": 0, "cancelled": 0, "timed_out": 0, "failed": 0, "rejected": 0}

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="nbce-rag-model-worker", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel what is waiting, let the running job notice, and end the thread."""
        with self._lock:
            t = self._thread
            self._thread = None
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.abort(_CANCELLED)
                job.push("error", OpenAIError(503, "the server is shutting down", type="server_error",
                                              code="server_shutting_down"))
        if t is not None and t.is_alive():
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:  # pragma: no cover
                pass
            t.join(timeout)

    def submit(self, job: _Job) -> None:
        self.start()
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.stats["rejected"] += 1
            raise OpenAIError(503, f"the server is busy ({self._queue.maxsize} requests are waiting); "
                                   "retry in a moment", type="server_error", code="server_overloaded") from None

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            self.busy = True
            try:
                self._run(job)
            finally:
                self.busy = False
                self.stats[job.outcome or "failed"] = self.stats.get(job.outcome or "failed", 0) + 1

    def _run(self, job: _Job) -> None:
        if job.cancel.is_set():
            job.outcome = job.reason or _CANCELLED
            return
        if time.monotonic() >= job.deadline:
            job.outcome = "timed_out"
            job.push("timeout")
            return
        it = None
        try:
            result = job.fn()
            if not job.stream:
                job.outcome = "completed"
                job.push("result", result)
                return
            it = iter(result)
            for ev in it:
                if not job.final_only or ev.answer is not None:
                    job.push("event", ev)
                if job.cancel.is_set():
                    job.outcome = job.reason or _CANCELLED
                    return
                if time.monotonic() >= job.deadline:
                    job.outcome = "timed_out"
                    job.push("timeout")
                    return
            job.outcome = "completed"
            job.push("done")
        except Exception as e:  # noqa: BLE001 - handed to the request, which answers it
            job.outcome = "failed"
            job.push("error", e)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                try:
                    close()  # a cancelled decode frees its KV cache now
                except Exception:  # noqa: BLE001  # pragma: no cover
                    logger.exception("closing a decode stream failed")


# ---------------------------------------------------------------------------------- request models
class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class DocumentIn(BaseModel):
    """One passage of the ``documents`` field (vLLM's shape, plus optional id/score)."""

    model_config = ConfigDict(extra="allow")
    text: str
    title: Optional[str] = None
    id: Optional[Union[str, int]] = None
    score: Optional[float] = None


class NBCEOptions(BaseModel):
    """The ``nbce`` request extension: NBCE settings for this request."""

    model_config = ConfigDict(extra="forbid")
    pooling: Optional[str] = None
    beta: Optional[float] = None
    eta: Optional[float] = None
    nbce_top_p: Optional[float] = None
    k: Optional[int] = None


class StreamOptions(_Open):
    include_usage: Optional[bool] = False


class _GenerationRequest(_Open):
    model: Optional[str] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    stop: Optional[Union[str, List[str]]] = None
    n: Optional[int] = None
    logprobs: Optional[Union[bool, int]] = None
    documents: Optional[List[Union[str, DocumentIn]]] = None
    contexts: Optional[List[str]] = None
    nbce: Optional[NBCEOptions] = None


class ChatMessage(_Open):
    role: str
    content: Optional[Union[str, List[Dict[str, Any]]]] = None


class ChatCompletionRequest(_GenerationRequest):
    messages: List[ChatMessage]


class CompletionRequest(_GenerationRequest):
    prompt: Union[str, List[Any]]
    echo: Optional[bool] = None


class EmbeddingRequest(_Open):
    input: Union[str, List[Any]]
    model: Optional[str] = None
    encoding_format: Optional[Literal["float", "base64"]] = "float"
    dimensions: Optional[int] = None


_UNION_TAG = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|function-.*|[A-Z]\w*)$")


def _validate(model: type, obj: Dict[str, Any]) -> Any:
    """Parse a request body; a validation error becomes a 400 naming the offending field."""
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        errors = e.errors()
        # in a union, the deepest error is the informative one ("documents.0.text: Field required")
        err = max(errors, key=lambda x: len(x.get("loc", ())))
        loc = ".".join(str(x) for x in err.get("loc", ()) if not (isinstance(x, str) and _UNION_TAG.match(x)))
        msg = err.get("msg", "invalid value")
        raise _bad(f"invalid request: {loc or 'body'}: {msg}", param=loc or None) from None


# ---------------------------------------------------------------------------------- helpers
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
            raise _bad(f"{where}.content[{i}]: only text parts are supported (got type {kind!r})",
                       param=f"{where}.content", code="unsupported_content")
    return "\n".join(parts)


def _chat_question(req: ChatCompletionRequest) -> Tuple[str, Optional[str]]:
    if not req.messages:
        raise _bad("messages is empty; send at least one user message", param="messages")
    system = [_text_of(m.content, f"messages[{i}]") for i, m in enumerate(req.messages)
              if m.role in ("system", "developer")]
    users = [(i, m) for i, m in enumerate(req.messages) if m.role == "user"]
    if not users:
        raise _bad("messages has no user message: the last user message is the question", param="messages")
    i, last = users[-1]
    question = _text_of(last.content, f"messages[{i}]")
    system_prompt = "\n\n".join(s for s in system if s.strip()) or None
    return question, system_prompt


def _completion_question(req: CompletionRequest) -> str:
    p = req.prompt
    if isinstance(p, list):
        if len(p) != 1 or not isinstance(p[0], str):
            raise _bad("prompt must be a string or a list of exactly one string (batched and token prompts are "
                       "not supported)", param="prompt")
        p = p[0]
    return p


class _Server:
    """State shared by the endpoints of one app."""

    def __init__(self, pipeline: Any, *, encoder: Any, api_key: Optional[str], limits: ServerLimits,
                 model_name: str):
        self.pipeline = pipeline
        self._encoder = encoder
        self._encoder_lock = threading.Lock()
        self.api_key = api_key
        self.limits = limits
        self.model_name = model_name
        self.created = int(time.time())
        self.worker = ModelWorker(limits.max_queue)

    # ---------------- auth / body
    def check_auth(self, request: Request) -> None:
        if not self.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise OpenAIError(401, "missing API key: send the header `Authorization: Bearer <key>`",
                              code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise OpenAIError(401, "incorrect API key", code="invalid_api_key")

    async def read_json(self, request: Request) -> Dict[str, Any]:
        limit = self.limits.max_body_bytes
        too_big = OpenAIError(413, f"the request body is larger than the server's limit of {limit} bytes; "
                                   "send fewer or shorter documents", code="request_too_large")
        cl = request.headers.get("content-length")
        if cl is not None:
            try:
                declared = int(cl)
            except ValueError:
                raise _bad("invalid Content-Length header") from None
            if declared > limit:
                raise too_big
        chunks: List[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        raw = b"".join(chunks)
        if not raw.strip():
            raise _bad("the request body is empty; send a JSON object", code="invalid_json")
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise _bad(f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(obj, dict):
            raise _bad(f"the request body must be a JSON object, got {type(obj).__name__}", code="invalid_json")
        return obj

    # ---------------- request -> pipeline arguments
    def decode_options(self, req: _GenerationRequest, system_prompt: Optional[str]) -> Dict[str, Any]:
        lim = self.limits
        opts: Dict[str, Any] = {}
        if req.n not in (None, 1):
            raise _bad("n must be 1 (one answer per request)", param="n")
        if req.logprobs not in (None, False, 0):
            raise _bad("logprobs are not supported", param="logprobs")
        mt = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if mt is not None:
            if mt < 1:
                raise _bad(f"max_tokens must be >= 1 (got {mt})", param="max_tokens")
            if mt > lim.max_tokens:
                raise _bad(f"max_tokens is {mt}, more than this server's limit of {lim.max_tokens}",
                           param="max_tokens", code="max_tokens_too_large")
            opts["max_new_tokens"] = int(mt)
        elif self.pipeline.decoder.config.max_new_tokens > lim.max_tokens:
            opts["max_new_tokens"] = lim.max_tokens
        if req.stop is not None:
            stop = [req.stop] if isinstance(req.stop, str) else list(req.stop)
            if len(stop) > lim.max_stop:
                raise _bad(f"at most {lim.max_stop} stop strings are allowed (got {len(stop)})", param="stop")
            if not all(stop):
                raise _bad("stop strings must be non-empty", param="stop")
            opts["stop"] = stop
        t, p = req.temperature, req.top_p
        if t is not None and not 0 <= t <= 2:
            raise _bad(f"temperature must be in [0, 2] (got {t})", param="temperature")
        if p is not None and not 0 < p <= 1:
            raise _bad(f"top_p must be in (0, 1] (got {p})", param="top_p")
        # every parameter of the one mapping (OPENAI_PARAMS) the request carries; max_tokens is set above
        params = {name: getattr(req, name, None) for name in OPENAI_PARAMS}
        params.update(max_tokens=None, max_completion_tokens=None)
        nbce = {key: getattr(req.nbce, key) for key in ("pooling", "beta", "eta", "nbce_top_p")} if req.nbce else {}
        try:
            opts.update(openai_options({**params, "system_prompt": system_prompt, **nbce}))
            self.pipeline.decoder.config.update(**opts)
        except (ConfigError, TypeError, ValueError) as e:
            msg = str(e)
            key = msg.split(" ", 1)[0]
            if key in ("pooling", "beta", "eta", "nbce_top_p") or msg.lower().startswith(("unknown pooling", "pooling")):
                param = f"nbce.{key}" if key in ("beta", "eta", "nbce_top_p") else "nbce.pooling"
            else:
                param = {"max_new_tokens": "max_tokens"}.get(key, key if key in opts else None)
            raise _bad(msg, param=param) from None
        return opts

    def passages(self, req: _GenerationRequest) -> Optional[List[Passage]]:
        """The request's passages, or ``None`` when the server should retrieve."""
        if req.documents is None and req.contexts is None:
            return None
        items: List[Tuple[str, Any]] = [("documents", d) for d in (req.documents or [])]
        items += [("contexts", c) for c in (req.contexts or [])]
        lim = self.limits
        if len(items) > lim.max_documents:
            raise _bad(f"{len(items)} documents sent; this server accepts at most {lim.max_documents} per request",
                       param="documents", code="too_many_documents")
        out: List[Passage] = []
        counters = {"documents": 0, "contexts": 0}
        for pos, (field, d) in enumerate(items):
            i = counters[field]
            counters[field] += 1
            if isinstance(d, str):
                text, title, did, score = d, None, None, None
            else:
                text, title, did, score = d.text, d.title, d.id, d.score
            if len(text) + len(title or "") > lim.max_document_chars:
                raise _bad(f"{field}[{i}] has {len(text) + len(title or '')} characters; this server accepts at most "
                           f"{lim.max_document_chars} per document (split it)", param=f"{field}[{i}].text",
                           code="document_too_long")
            body = f"{title}\n{text}" if title and title.strip() else text
            meta: Dict[str, Any] = {"request_index": pos}
            if title is not None:
                meta["title"] = title
            out.append(Passage(text=body, score=score, id=None if did is None else str(did), metadata=meta))
        return out

    def prepare(self, req: _GenerationRequest, question: str, system_prompt: Optional[str]):
        lim = self.limits
        if not isinstance(question, str) or not question.strip():
            raise _bad("the question is empty: send a non-empty user message (or prompt)", param="messages")
        if len(question) > lim.max_question_chars:
            raise _bad(f"the question has {len(question)} characters; this server accepts at most "
                       f"{lim.max_question_chars}", param="messages", code="question_too_long")
        opts = self.decode_options(req, system_prompt)
        passages = self.passages(req)
        k = req.nbce.k if req.nbce is not None else None
        if k is not None and not 1 <= k <= lim.max_documents:
            raise _bad(f"nbce.k must be in [1, {lim.max_documents}] (got {k})", param="nbce.k")
        retrieved = passages is None and getattr(self.pipeline, "index", None) is not None
        if passages is None and not retrieved:
            passages = []  # no index: closed-book
        pipeline = self.pipeline

        def run():
            return pipeline.stream(question, None if retrieved else passages, k=k, **opts)

        return run, retrieved

    # ---------------- the worker channel
    def new_job(self, fn: Callable[[], Any], *, stream: bool, final_only: bool = False) -> _Job:
        job = _Job(fn, stream=stream, final_only=final_only,
                   deadline=time.monotonic() + self.limits.request_timeout_s)
        self.worker.submit(job)
        return job

    async def first(self, job: _Job, request: Request) -> Tuple[str, Any]:
        """The job's first message, racing the client's disconnect and the timeout. Runs
        before any response byte is sent, so errors still get their HTTP status."""
        getter = asyncio.ensure_future(job.out.get())
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        try:
            timeout = max(0.0, job.deadline - time.monotonic())
            done, _ = await asyncio.wait({getter, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                return getter.result()
            if watcher in done:
                job.abort(_CANCELLED)
                return ("disconnected", None)
            job.abort("timed_out")
            return ("timeout", None)
        finally:
            for t in (getter, watcher):
                if not t.done():
                    t.cancel()
            # let the cancellations settle so that no task still waits on receive()
            await asyncio.gather(getter, watcher, return_exceptions=True)

    async def next(self, job: _Job) -> Tuple[str, Any]:
        timeout = max(0.0, job.deadline - time.monotonic())
        try:
            return await asyncio.wait_for(job.out.get(), timeout=timeout)
        except asyncio.TimeoutError:
            job.abort("timed_out")
            return ("timeout", None)

    # ---------------- encoder
    def encoder(self) -> Any:
        """Runs in the worker thread (loading the bundled encoder takes a second or two)."""
        with self._encoder_lock:
            if self._encoder is None:
                index = getattr(self.pipeline, "index", None)
                if index is not None:
                    self._encoder = index.encoder
                else:
                    from nbce_rag.encoder import CoSENTEncoder

                    self._encoder = CoSENTEncoder.from_pretrained()
            return self._encoder


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


_DONE = "data: [DONE]\n\n"


def _title(meta: Dict[str, Any]) -> Optional[str]:
    for key in ("title", "source", "doc_id"):
        v = meta.get(key)
        if v is not None:
            return str(v)
    return None


def nbce_info(answer: Answer, retrieved: bool) -> Dict[str, Any]:
    """The ``nbce`` response extension for an answer (see the module docstring)."""
    sources = []
    for s in answer.sources:
        meta = s.metadata or {}
        item = {"index": None if retrieved else meta.get("request_index", s.index), "id": s.id,
                "title": _title(meta), "score": s.score, "n_tokens": int(s.n_tokens),
                "share": float(s.share), "weight_initial": s.weight_initial, "weight_final": s.weight_final}
        if retrieved:
            item["text"] = s.text
        sources.append(item)
    dropped = []
    for d in answer.dropped or []:
        hit = getattr(d, "hit", d)
        meta = getattr(hit, "metadata", None) or {}
        dropped.append({"index": None if retrieved else meta.get("request_index"), "id": getattr(hit, "id", None),
                        "title": _title(meta), "score": getattr(hit, "score", None),
                        "code": getattr(d, "code", None)})
    return {"supported": bool(answer.supported), "retrieved": bool(retrieved), "sources": sources, "dropped": dropped}


# ---------------------------------------------------------------------------------- the app
def create_app(
    pipeline: Any,
    *,
    encoder: Any = None,
    api_key: Optional[str] = None,
    limits: ServerLimits = ServerLimits(),
    model_name: str = DEFAULT_MODEL_NAME,
) -> FastAPI:
    """An OpenAI-compatible FastAPI app over ``pipeline`` (a :class:`RAGPipeline`).

    ``encoder``: the CoSENT encoder behind ``/v1/embeddings`` (``None``: the index's, else the
    bundled one, loaded on first use; ``False``: no embeddings endpoint, 404).
    ``api_key``: require ``Authorization: Bearer <api_key>`` (``None``: open).
    ``limits``: :class:`ServerLimits`. ``model_name``: the id ``/v1/models`` lists.
    """
    from contextlib import asynccontextmanager

    srv = _Server(pipeline, encoder=encoder, api_key=api_key, limits=limits, model_name=model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        srv.worker.start()
        try:
            yield
        finally:
            srv.worker.stop()

    app = FastAPI(title="nbce-rag", description="OpenAI-compatible RAG server (NBCE decoding)",
                  lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.nbce = srv

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            msg = f"no such endpoint: {request.method} {request.url.path}"
            return OpenAIError(404, msg, code="not_found").response()
        if exc.status_code == 405:
            return OpenAIError(405, f"method {request.method} is not allowed on {request.url.path}",
                               code="method_not_allowed").response()
        return OpenAIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):  # pragma: no cover - last resort
        return _error_from_exception(exc).response()

    # ------------------------------------------------------------ misc endpoints
    @app.get("/health")
    async def health():
        w = srv.worker
        return {"status": "ok", "model": srv.model_name, "queued": w.queued, "busy": w.busy, "stats": dict(w.stats)}

    def _model_card() -> Dict[str, Any]:
        return {"id": srv.model_name, "object": "model", "created": srv.created, "owned_by": "nbce-rag",
                "nbce": {"decoder": str(getattr(pipeline.decoder, "name", "")),
                         "index": getattr(pipeline, "index", None) is not None,
                         "filter": getattr(pipeline, "threshold", None) is not None}}

    @app.get("/v1/models")
    async def models(request: Request):
        srv.check_auth(request)
        return {"object": "list", "data": [_model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        srv.check_auth(request)
        if model_id != srv.model_name:
            raise OpenAIError(404, f"model {model_id!r} not found; this server serves {srv.model_name!r}",
                              param="model", code="model_not_found")
        return _model_card()

    # ------------------------------------------------------------ generation
    async def _generate(request: Request, kind: str):
        srv.check_auth(request)
        body = await srv.read_json(request)
        if kind == "chat":
            req = _validate(ChatCompletionRequest, body)
            question, system_prompt = _chat_question(req)
        else:
            req = _validate(CompletionRequest, body)
            if req.echo:
                raise _bad("echo is not supported", param="echo")
            question, system_prompt = _completion_question(req), None
        fn, retrieved = srv.prepare(req, question, system_prompt)
        stream = bool(req.stream)
        include_usage = bool(stream and req.stream_options is not None and req.stream_options.include_usage)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        t0 = time.perf_counter()
        job = srv.new_job(fn, stream=True, final_only=not stream)
        kind0, value0 = await srv.first(job, request)
        if kind0 == "disconnected":
            logger.info("%s: client went away before the answer", rid)
            return JSONResponse(OpenAIError(499, "client closed the request").body(), status_code=499)
        if kind0 == "timeout":
            raise _timeout_error(srv.limits.request_timeout_s)
        if kind0 == "error":
            raise _error_from_exception(value0)
        if kind0 == "done":  # pragma: no cover - a stream always yields its final event first
            raise OpenAIError(500, "the decoder produced no answer", type="server_error")
        if not stream:
            answer: Answer = value0.answer
            logger.info("%s: %d+%d tokens in %.3f s", rid, answer.prompt_tokens, answer.completion_tokens,
                        time.perf_counter() - t0)
            if kind == "chat":
                choice = {"index": 0, "message": {"role": "assistant", "content": answer.text},
                          "logprobs": None, "finish_reason": answer.finish_reason}
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": answer.text, "logprobs": None, "finish_reason": answer.finish_reason}
                obj = "text_completion"
            return JSONResponse({"id": rid, "object": obj, "created": created, "model": srv.model_name,
                                 "choices": [choice], "usage": answer.usage(),
                                 "nbce": nbce_info(answer, retrieved)})
        gen = _stream_body(srv, job, (kind0, value0), kind=kind, rid=rid, created=created,
                           include_usage=include_usage, retrieved=retrieved, t0=t0)
        return _EventStream(job, gen, media_type="text/event-stream",
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _generate(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(request, "completion")

    # ------------------------------------------------------------ embeddings
    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        srv.check_auth(request)
        if encoder is False:
            raise OpenAIError(404, "embeddings are disabled on this server", code="not_found")
        body = await srv.read_json(request)
        req = _validate(EmbeddingRequest, body)
        inputs = [req.input] if isinstance(req.input, str) else list(req.input)
        if not inputs:
            raise _bad("input is empty", param="input")
        if not all(isinstance(x, str) for x in inputs):
            raise _bad("input must be a string or a list of strings; token arrays are not supported "
                       "(LangChain: OpenAIEmbeddings(check_embedding_ctx_length=False))", param="input")
        lim = srv.limits
        if len(inputs) > lim.max_embedding_inputs:
            raise _bad(f"{len(inputs)} inputs; this server embeds at most {lim.max_embedding_inputs} per request",
                       param="input", code="too_many_inputs")
        for i, s in enumerate(inputs):
            if len(s) > lim.max_document_chars:
                raise _bad(f"input[{i}] has {len(s)} characters; the limit is {lim.max_document_chars}",
                           param=f"input[{i}]", code="input_too_long")

        def run():
            enc = srv.encoder()
            vecs = np.asarray(enc.encode(inputs, show_progress_bar=False), dtype=np.float32)
            try:
                n_tok = int(sum(enc.count_tokens(inputs)))
            except Exception:  # noqa: BLE001 - an encoder without a tokenizer
                n_tok = 0
            return vecs, n_tok, str(getattr(enc, "name", "encoder"))

        job = srv.new_job(run, stream=False)
        k, value = await srv.first(job, request)
        if k == "disconnected":
            return JSONResponse(OpenAIError(499, "client closed the request").body(), status_code=499)
        if k == "timeout":
            raise _timeout_error(lim.request_timeout_s)
        if k == "error":
            raise _error_from_exception(value)
        vecs, n_tok, enc_name = value
        if req.dimensions is not None and req.dimensions != vecs.shape[1]:
            raise _bad(f"dimensions={req.dimensions} is not supported: this encoder gives {vecs.shape[1]}",
                       param="dimensions")
        data = []
        for i, v in enumerate(vecs):
            if req.encoding_format == "base64":
                emb: Any = base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode("ascii")
            else:
                emb = [float(x) for x in v]
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return {"object": "list", "data": data, "model": enc_name,
                "usage": {"prompt_tokens": n_tok, "total_tokens": n_tok}}

    return app


class _EventStream(StreamingResponse):
    """A StreamingResponse that cancels its job however the response ends (even when the
    client is gone before the body generator ever started)."""

    def __init__(self, job: _Job, content: Any, **kw: Any):
        super().__init__(content, **kw)
        self._job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._job.abort(_CANCELLED)  # no-op once the job has finished


async def _stream_body(srv: _Server, job: _Job, first: Tuple[str, Any], *, kind: str, rid: str, created: int,
                       include_usage: bool, retrieved: bool, t0: float):
    """Server-sent events of one streamed answer. Cancelled or closed (client gone) ->
    the job's cancel flag is set in ``finally`` and the worker drops the request."""
    chat = kind == "chat"
    obj = "chat.completion.chunk" if chat else "text_completion"
    base = {"id": rid, "object": obj, "created": created, "model": srv.model_name}

    def chunk(text: Optional[str], finish: Optional[str] = None, *, role: bool = False, **extra: Any) -> str:
        if chat:
            delta: Dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return _sse({**base, "choices": [choice], **extra})

    try:
        if chat:
            yield chunk("", role=True)
        kind_, value = first
        answer: Optional[Answer] = None
        while True:
            if kind_ == "event":
                if value.text:
                    yield chunk(value.text)
                if value.answer is not None:
                    answer = value.answer
            elif kind_ == "done":
                break
            elif kind_ in ("error", "timeout"):
                err = _timeout_error(srv.limits.request_timeout_s) if kind_ == "timeout" else _error_from_exception(value)
                logger.info("%s: stream ended by %s", rid, err.type)
                yield _sse(err.body())
                yield _DONE
                return
            kind_, value = await srv.next(job)
        if answer is None:  # pragma: no cover - a stream always ends with its answer
            yield _sse(OpenAIError(500, "the decoder produced no answer", type="server_error").body())
            yield _DONE
            return
        logger.info("%s: %d+%d tokens streamed in %.3f s", rid, answer.prompt_tokens, answer.completion_tokens,
                    time.perf_counter() - t0)
        yield chunk(None if chat else "", answer.finish_reason, nbce=nbce_info(answer, retrieved))
        if include_usage:
            yield _sse({**base, "choices": [], "usage": answer.usage()})
        yield _DONE
    finally:
        job.abort(_CANCELLED)  # no-op when the job is finished; stops it when the client went away
