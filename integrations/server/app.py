"""The FastAPI app: routes, request checks (auth, Host, content type, body size and depth,
model name), the mapping from a request to the pipeline, and server-sent events. The model
work happens in :mod:`.worker`; the wire format is :mod:`.protocol`."""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "nbce_rag.integrations.server needs the `server` extra: pip install 'nbce-rag[server]' "
        f"(fastapi, uvicorn, pydantic); missing: {e.name}"
    ) from e

import numpy as np

from nbce_rag.config import OPENAI_PARAMS, openai_options
from nbce_rag.errors import ConfigError
from nbce_rag.types import Answer, Passage

from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    OpenAIError,
    _bad,
    _chat_question,
    _completion_question,
    _error_from_exception,
    _GenerationRequest,
    _timeout_error,
    _validate,
    check_unsupported,
)
from .worker import _CANCELLED, ModelWorker, _Job

logger = logging.getLogger("nbce_rag.integrations.server")

DEFAULT_MODEL_NAME = "nbce-rag"


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
    max_queue: int = 64  #: requests waiting for admission to the model worker (503 beyond)
    request_timeout_s: float = 120.0  #: wall time per request from arrival, queue included (504)
    max_prompt_tokens: int = 16_384  #: prompt tokens over all of a request's NBCE rows (400 beyond)
    max_row_tokens: Optional[int] = 512  #: passage tokens per row: longer passages become windows (None: the decoder's)
    max_json_depth: int = 32  #: nesting of the JSON body (400 beyond)
    max_active: int = 32  #: requests decoded together by the step scheduler (the rest wait in the queue)
    step_rows: int = 256  #: row budget of one decode step (a request with more rows steps alone, in turns)
    prefill_tokens: int = 512  #: padded tokens per prefill chunk: bounds how long one iteration holds the model

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_documents", "max_document_chars", "max_question_chars",
                     "max_tokens", "max_embedding_inputs", "max_queue", "max_prompt_tokens", "max_json_depth",
                     "max_active", "step_rows", "prefill_tokens"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"ServerLimits.{name} must be >= 1 (got {getattr(self, name)})")
        if self.max_stop < 0:
            raise ConfigError(f"ServerLimits.max_stop must be >= 0 (got {self.max_stop})")
        if not self.request_timeout_s > 0:
            raise ConfigError(f"ServerLimits.request_timeout_s must be > 0 (got {self.request_timeout_s})")
        if self.max_row_tokens is not None and self.max_row_tokens < 16:
            raise ConfigError(f"ServerLimits.max_row_tokens must be >= 16 or None (got {self.max_row_tokens})")

    def scheduler_config(self) -> Any:
        from nbce_rag.scheduler import SchedulerConfig

        return SchedulerConfig(max_active=self.max_active, step_rows=self.step_rows,
                               prefill_tokens=self.prefill_tokens)



class _Server:
    """State shared by the endpoints of one app."""

    def __init__(self, pipeline: Any, *, encoder: Any, api_key: Optional[str], limits: ServerLimits,
                 model_name: str, aliases: Sequence[str] = (), allowed_hosts: Optional[Iterable[str]] = None):
        self.pipeline = pipeline
        self._encoder = encoder
        self._encoder_lock = threading.Lock()
        self.api_key = api_key
        self.limits = limits
        self.model_name = model_name
        self.model_names = {model_name, *aliases}
        hosts = None if allowed_hosts is None else {h.strip().lower() for h in allowed_hosts if h.strip()}
        self.allowed_hosts = None if hosts is None or "*" in hosts else hosts
        self.created = int(time.time())
        #: pipelines with the step API (RAGPipeline) are decoded together; others one at a time
        self.stepped = callable(getattr(pipeline, "start", None)) and getattr(pipeline, "decoder", None) is not None
        scheduler = None
        if self.stepped:
            from nbce_rag.scheduler import StepScheduler

            scheduler = StepScheduler(pipeline.decoder, limits.scheduler_config())
        self.worker = ModelWorker(limits.max_queue, scheduler)

    # ---------------- Host / model
    def check_host(self, request: Request) -> None:
        """With ``allowed_hosts`` (``nbce-rag serve`` sets it on loopback without an API key),
        a ``Host`` header naming another host is a 400: a web page cannot reach the server
        through DNS rebinding."""
        if self.allowed_hosts is None:
            return
        host = request.headers.get("host", "")
        name = _host_name(host)
        if name not in self.allowed_hosts:
            raise OpenAIError(400, f"Host {host!r} is not allowed; this server answers "
                                   f"{sorted(self.allowed_hosts)} (nbce-rag serve --allowed-hosts)",
                              code="invalid_host")

    def check_model(self, model: Optional[str]) -> None:
        if model is None or model in self.model_names:
            return
        names = ", ".join(repr(n) for n in sorted(self.model_names))
        raise OpenAIError(404, f"the model {model!r} does not exist on this server; it serves {names} "
                               "(nbce-rag serve --served-model-name adds aliases)",
                          param="model", code="model_not_found")

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
        ctype = request.headers.get("content-type", "")
        media = ctype.split(";", 1)[0].strip().lower()
        if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
            raise OpenAIError(415, f"the request body must be JSON sent with `Content-Type: application/json` "
                                   f"(got {ctype or 'no Content-Type'!r})", code="unsupported_media_type")
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
        depth = _json_depth(raw)
        if depth > self.limits.max_json_depth:
            raise _bad(f"the request body nests JSON {depth} levels deep; this server accepts at most "
                       f"{self.limits.max_json_depth}", code="invalid_json")
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
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
        row = lim.max_row_tokens
        current = self.pipeline.decoder.config.max_passage_tokens
        if row is not None and (current is None or current > row):
            opts["max_passage_tokens"] = row  # bounds one row's prefill (see ServerLimits)
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
        """Check the request and return ``(job arguments, retrieved)``: ``start`` (a callable
        the worker runs to get the request's DecodeState) for a pipeline with the step API,
        else ``fn`` (a callable returning the event stream, run alone)."""
        lim = self.limits
        self.check_model(req.model)
        check_unsupported(req)
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
        psg = None if retrieved else passages

        if not self.stepped:
            return {"fn": lambda: pipeline.stream(question, psg, k=k, **opts)}, retrieved

        def start():
            state = pipeline.start(question, psg, k=k, **opts)
            n_tok = sum(len(r.ids) for r in state.prep.rows)
            if n_tok > lim.max_prompt_tokens:
                raise OpenAIError(400, f"the request needs {n_tok} prompt tokens over its {state.n_rows} NBCE rows; "
                                       f"this server accepts at most {lim.max_prompt_tokens} per request "
                                       "(send fewer or shorter documents)", param="documents",
                                  code="context_length_exceeded")
            return state

        return {"start": start}, retrieved

    # ---------------- the worker channel
    def new_job(self, fn: Optional[Callable[[], Any]] = None, *, stream: bool, final_only: bool = False,
                start: Optional[Callable[[], Any]] = None) -> _Job:
        job = _Job(fn, stream=stream, final_only=final_only, start=start,
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



_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


def _host_name(host: str) -> str:
    """The host part of a Host header (``[::1]:8000`` -> ``::1``, ``Example.com:80`` -> ``example.com``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _json_depth(raw: bytes) -> int:
    """How deep brackets nest in a JSON text (outside strings), without parsing it: the json
    module would recurse (and fail with a RecursionError) on hostile nesting."""
    if not (b"[" in raw or b"{" in raw):
        return 0
    stripped = _JSON_STRING.sub(b'""', raw)
    arr = np.frombuffer(stripped, dtype=np.uint8)
    step = ((arr == ord("[")) | (arr == ord("{"))).astype(np.int32) - ((arr == ord("]")) | (arr == ord("}"))).astype(np.int32)
    return int(np.cumsum(step).max(initial=0))


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
    return {"supported": bool(answer.supported), "retrieved": bool(retrieved), "sources": sources, "dropped": dropped,
            "calibration": getattr(answer, "calibration", None)}


# ---------------------------------------------------------------------------------- the app
def create_app(
    pipeline: Any,
    *,
    encoder: Any = None,
    api_key: Optional[str] = None,
    limits: ServerLimits = ServerLimits(),
    model_name: str = DEFAULT_MODEL_NAME,
    aliases: Sequence[str] = (),
    allowed_hosts: Optional[Iterable[str]] = None,
) -> FastAPI:
    """An OpenAI-compatible FastAPI app over ``pipeline`` (a :class:`RAGPipeline`).

    ``encoder``: the CoSENT encoder behind ``/v1/embeddings`` (``None``: the index's, else the
    bundled one, loaded on first use; ``False``: no embeddings endpoint, 404).
    ``api_key``: require ``Authorization: Bearer <api_key>`` (``None``: open).
    ``limits``: :class:`ServerLimits`. ``model_name``: the id ``/v1/models`` lists; a request's
    ``model`` must be it or one of ``aliases`` (else 404). ``allowed_hosts``: host names the
    ``Host`` header may carry (``None``: not checked; ``"*"`` in it: any) -- ``nbce-rag serve``
    sets the loopback names when bound to loopback without an API key (DNS rebinding).
    A :class:`RAGPipeline` is decoded by the step scheduler (concurrent requests share decode
    steps); any other object with a ``stream()`` like it is served one request at a time.
    """
    from contextlib import asynccontextmanager

    srv = _Server(pipeline, encoder=encoder, api_key=api_key, limits=limits, model_name=model_name,
                  aliases=aliases, allowed_hosts=allowed_hosts)

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

    @app.middleware("http")
    async def _host_check(request: Request, call_next):
        try:
            srv.check_host(request)
        except OpenAIError as e:
            return e.response()
        return await call_next(request)

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
        out = {"status": "ok", "model": srv.model_name, "queued": w.queued, "busy": w.busy, "active": w.active,
               "stats": dict(w.stats)}
        if w.scheduler is not None:
            out["scheduler"] = {"steps": w.scheduler.steps, "rows": w.scheduler.batch.rows}
        return out

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
        srv.check_model(model_id)
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
        work, retrieved = srv.prepare(req, question, system_prompt)
        stream = bool(req.stream)
        include_usage = bool(stream and req.stream_options is not None and req.stream_options.include_usage)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        t0 = time.perf_counter()
        job = srv.new_job(stream=True, final_only=not stream, **work)
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

