"""What the endpoints of one app share: the request limits (:class:`ServerLimits`) and
:class:`ServerState` -- the request checks (auth, Host, content type, body size and depth,
model name), the mapping from a request to the pipeline (decode options, passages, the
worker's job), the channel to the model worker and the embeddings encoder. The routes are
:mod:`.app`; what goes back to the client is :mod:`.responses`."""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

try:
    from fastapi import Request
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "nbce_rag.integrations.server needs the `server` extra: pip install 'nbce-rag[server]' "
        f"(fastapi, uvicorn, pydantic); missing: {e.name}"
    ) from e

import numpy as np

from nbce_rag.config import OPENAI_PARAMS, openai_options
from nbce_rag.errors import ConfigError
from nbce_rag.types import Passage

from nbce_rag.integrations.server.protocol import GenerationRequest, OpenAIError, bad_request, check_unsupported
from nbce_rag.integrations.server.worker import CANCELLED, Job, ModelWorker


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
        from nbce_rag.decoding.scheduler import SchedulerConfig

        return SchedulerConfig(max_active=self.max_active, step_rows=self.step_rows,
                               prefill_tokens=self.prefill_tokens)


class ServerState:
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
            from nbce_rag.decoding.scheduler import StepScheduler

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
                raise bad_request("invalid Content-Length header") from None
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
            raise bad_request("the request body is empty; send a JSON object", code="invalid_json")
        depth = _json_depth(raw)
        if depth > self.limits.max_json_depth:
            raise bad_request(f"the request body nests JSON {depth} levels deep; this server accepts at most "
                              f"{self.limits.max_json_depth}", code="invalid_json")
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise bad_request(f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(obj, dict):
            raise bad_request(f"the request body must be a JSON object, got {type(obj).__name__}", code="invalid_json")
        return obj

    # ---------------- request -> pipeline arguments
    def decode_options(self, req: GenerationRequest, system_prompt: Optional[str]) -> Dict[str, Any]:
        lim = self.limits
        opts: Dict[str, Any] = {}
        if req.n not in (None, 1):
            raise bad_request("n must be 1 (one answer per request)", param="n")
        if req.logprobs not in (None, False, 0):
            raise bad_request("logprobs are not supported", param="logprobs")
        mt = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if mt is not None:
            if mt < 1:
                raise bad_request(f"max_tokens must be >= 1 (got {mt})", param="max_tokens")
            if mt > lim.max_tokens:
                raise bad_request(f"max_tokens is {mt}, more than this server's limit of {lim.max_tokens}",
                                  param="max_tokens", code="max_tokens_too_large")
            opts["max_new_tokens"] = int(mt)
        elif self.pipeline.decoder.config.max_new_tokens > lim.max_tokens:
            opts["max_new_tokens"] = lim.max_tokens
        if req.stop is not None:
            stop = [req.stop] if isinstance(req.stop, str) else list(req.stop)
            if len(stop) > lim.max_stop:
                raise bad_request(f"at most {lim.max_stop} stop strings are allowed (got {len(stop)})", param="stop")
            if not all(stop):
                raise bad_request("stop strings must be non-empty", param="stop")
            opts["stop"] = stop
        t, p = req.temperature, req.top_p
        if t is not None and not 0 <= t <= 2:
            raise bad_request(f"temperature must be in [0, 2] (got {t})", param="temperature")
        if p is not None and not 0 < p <= 1:
            raise bad_request(f"top_p must be in (0, 1] (got {p})", param="top_p")
        # every parameter of the one mapping (OPENAI_PARAMS) the request carries; max_tokens is set above
        params = {name: getattr(req, name, None) for name in OPENAI_PARAMS}
        params.update(max_tokens=None, max_completion_tokens=None)
        nbce = ({key: getattr(req.nbce, key) for key in ("pooling", "beta", "eta", "nbce_top_p", "on_unsupported")}
                if req.nbce else {})
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
            if key in ("pooling", "beta", "eta", "nbce_top_p", "on_unsupported") or msg.lower().startswith(
                    ("unknown pooling", "pooling")):
                param = f"nbce.{key}" if key in ("beta", "eta", "nbce_top_p", "on_unsupported") else "nbce.pooling"
            else:
                param = {"max_new_tokens": "max_tokens"}.get(key, key if key in opts else None)
            raise bad_request(msg, param=param) from None
        return opts

    def passages(self, req: GenerationRequest) -> Optional[List[Passage]]:
        """The request's passages, or ``None`` when the server should retrieve."""
        if req.documents is None and req.contexts is None:
            return None
        items: List[Tuple[str, Any]] = [("documents", d) for d in (req.documents or [])]
        items += [("contexts", c) for c in (req.contexts or [])]
        lim = self.limits
        if len(items) > lim.max_documents:
            raise bad_request(f"{len(items)} documents sent; this server accepts at most {lim.max_documents} "
                              "per request", param="documents", code="too_many_documents")
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
                raise bad_request(f"{field}[{i}] has {len(text) + len(title or '')} characters; this server accepts "
                                  f"at most {lim.max_document_chars} per document (split it)",
                                  param=f"{field}[{i}].text", code="document_too_long")
            body = f"{title}\n{text}" if title and title.strip() else text
            meta: Dict[str, Any] = {"request_index": pos}
            if title is not None:
                meta["title"] = title
            out.append(Passage(text=body, score=score, id=None if did is None else str(did), metadata=meta))
        return out

    def prepare(self, req: GenerationRequest, question: str, system_prompt: Optional[str]):
        """Check the request and return ``(job arguments, retrieved)``: ``start`` (a callable
        the worker runs to get the request's DecodeState) for a pipeline with the step API,
        else ``fn`` (a callable returning the event stream, run alone)."""
        lim = self.limits
        self.check_model(req.model)
        check_unsupported(req)
        if not isinstance(question, str) or not question.strip():
            raise bad_request("the question is empty: send a non-empty user message (or prompt)", param="messages")
        if len(question) > lim.max_question_chars:
            raise bad_request(f"the question has {len(question)} characters; this server accepts at most "
                              f"{lim.max_question_chars}", param="messages", code="question_too_long")
        opts = self.decode_options(req, system_prompt)
        passages = self.passages(req)
        k = req.nbce.k if req.nbce is not None else None
        if k is not None and not 1 <= k <= lim.max_documents:
            raise bad_request(f"nbce.k must be in [1, {lim.max_documents}] (got {k})", param="nbce.k")
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
                start: Optional[Callable[[], Any]] = None) -> Job:
        job = Job(fn, stream=stream, final_only=final_only, start=start,
                  deadline=time.monotonic() + self.limits.request_timeout_s)
        self.worker.submit(job)
        return job

    async def first(self, job: Job, request: Request) -> Tuple[str, Any]:
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
                job.abort(CANCELLED)
                return ("disconnected", None)
            job.abort("timed_out")
            return ("timeout", None)
        finally:
            for t in (getter, watcher):
                if not t.done():
                    t.cancel()
            # let the cancellations settle so that no task still waits on receive()
            await asyncio.gather(getter, watcher, return_exceptions=True)

    async def next(self, job: Job) -> Tuple[str, Any]:
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
                    from nbce_rag.retrieval.encoder import CoSENTEncoder

                    self._encoder = CoSENTEncoder.from_pretrained()
            return self._encoder


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
