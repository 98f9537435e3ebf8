"""What goes back to the client: the ``nbce`` response extension (:func:`nbce_info`) and the
server-sent events of a streamed answer (:func:`stream_body`, sent by :class:`EventStream`)."""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Dict, Optional, Tuple

try:
    from fastapi.responses import StreamingResponse
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "nbce_rag.integrations.server needs the `server` extra: pip install 'nbce-rag[server]' "
        f"(fastapi, uvicorn, pydantic); missing: {e.name}"
    ) from e

from nbce_rag.types import Answer

from nbce_rag.integrations.server.protocol import OpenAIError, error_from_exception, timeout_error
from nbce_rag.integrations.server.state import ServerState
from nbce_rag.integrations.server.worker import CANCELLED, Job

logger = logging.getLogger("nbce_rag.integrations.server")


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
    """The ``nbce`` response extension for an answer (see the package docstring)."""
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
                        "code": getattr(d, "code", None), "reason": getattr(d, "reason", None)})
    return {"supported": bool(answer.supported), "retrieved": bool(retrieved), "sources": sources, "dropped": dropped,
            "calibration": getattr(answer, "calibration", None),
            "support_score": getattr(answer, "support_score", None),
            "support_threshold": getattr(answer, "support_threshold", None),
            "answered_from": getattr(answer, "answered_from", "passages"),
            "notes": list(getattr(answer, "notes", None) or [])}


class EventStream(StreamingResponse):
    """A StreamingResponse that cancels its job however the response ends (even when the
    client is gone before the body generator ever started)."""

    def __init__(self, job: Job, content: Any, **kw: Any):
        super().__init__(content, **kw)
        self._job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._job.abort(CANCELLED)  # no-op once the job has finished


async def stream_body(srv: ServerState, job: Job, first: Tuple[str, Any], *, kind: str, rid: str, created: int,
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
                err = timeout_error(srv.limits.request_timeout_s) if kind_ == "timeout" else error_from_exception(value)
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
        job.abort(CANCELLED)  # no-op when the job is finished; stops it when the client went away
