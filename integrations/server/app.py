"""The FastAPI app: :func:`create_app` and its routes (errors, health, models, chat and text
completions, embeddings). The request checks and the mapping from a request to the pipeline
are :mod:`.state`; the ``nbce`` extension and server-sent events, :mod:`.responses`. The model
work happens in :mod:`.worker`; the wire format is :mod:`.protocol`."""

from __future__ import annotations

import base64
import logging
import time
import uuid
from typing import Any, Dict, Iterable, Optional, Sequence

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "nbce_rag.integrations.server needs the `server` extra: pip install 'nbce-rag[server]' "
        f"(fastapi, uvicorn, pydantic); missing: {e.name}"
    ) from e

import numpy as np

from nbce_rag.types import Answer

from nbce_rag.integrations.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    OpenAIError,
    bad_request,
    chat_question,
    completion_question,
    error_from_exception,
    text_field,
    timeout_error,
    validate_request,
)
from nbce_rag.integrations.server.responses import EventStream, nbce_info, stream_body
from nbce_rag.integrations.server.state import ServerLimits, ServerState

__all__ = ["create_app", "ServerLimits", "DEFAULT_MODEL_NAME", "nbce_info"]

logger = logging.getLogger("nbce_rag.integrations.server")

DEFAULT_MODEL_NAME = "nbce-rag"


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
    worker: Any = None,
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
    ``worker``: what runs the jobs instead of a local :class:`ModelWorker` (the Ray Serve
    ingress passes one that calls decoder replicas: :mod:`.ray_app`). ``GET /metrics``: the
    Prometheus series of :mod:`.metrics`.
    """
    from contextlib import asynccontextmanager

    srv = ServerState(pipeline, encoder=encoder, api_key=api_key, limits=limits, model_name=model_name,
                  aliases=aliases, allowed_hosts=allowed_hosts, worker=worker)

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
        return error_from_exception(exc).response()

    if srv.metrics is not None:
        from nbce_rag.integrations.server.metrics import install

        install(app, srv)

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
            req = validate_request(ChatCompletionRequest, body)
            question, system_prompt = chat_question(req)
        else:
            req = validate_request(CompletionRequest, body)
            if req.echo:
                raise bad_request("echo is not supported", param="echo")
            question, system_prompt = completion_question(req), None
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
            raise timeout_error(srv.limits.request_timeout_s)
        if kind0 == "error":
            raise error_from_exception(value0)
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
        gen = stream_body(srv, job, (kind0, value0), kind=kind, rid=rid, created=created,
                          include_usage=include_usage, retrieved=retrieved, t0=t0)
        return EventStream(job, gen, media_type="text/event-stream",
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
        req = validate_request(EmbeddingRequest, body)
        inputs = [req.input] if isinstance(req.input, str) else list(req.input)
        if not inputs:
            raise bad_request("input is empty", param="input")
        if not all(isinstance(x, str) for x in inputs):
            raise bad_request("input must be a string or a list of strings; token arrays are not supported "
                              "(LangChain: OpenAIEmbeddings(check_embedding_ctx_length=False))", param="input")
        lim = srv.limits
        if len(inputs) > lim.max_embedding_inputs:
            raise bad_request(f"{len(inputs)} inputs; this server embeds at most {lim.max_embedding_inputs} "
                              "per request", param="input", code="too_many_inputs")
        for i, s in enumerate(inputs):
            text_field(s, "input" if isinstance(req.input, str) else f"input[{i}]")
            if len(s) > lim.max_document_chars:
                raise bad_request(f"input[{i}] has {len(s)} characters; the limit is {lim.max_document_chars}",
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
            raise timeout_error(lim.request_timeout_s)
        if k == "error":
            raise error_from_exception(value)
        vecs, n_tok, enc_name = value
        if req.dimensions is not None and req.dimensions != vecs.shape[1]:
            raise bad_request(f"dimensions={req.dimensions} is not supported: this encoder gives {vecs.shape[1]}",
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
