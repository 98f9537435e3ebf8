"""The ingress side of the Ray Serve application: what stands in for the local model worker.

The ingress replica runs the *same* FastAPI app as ``nbce-rag serve`` (:func:`create_app`: the
routes, auth, limits, error format and streaming are not written twice). Two things differ:

* its pipeline is a :class:`RemotePipeline`: retrieval, the margin filter and the request's
  passages are handled here (encoder, index, calibration: CPU work), and decoding is a call to
  a decoder replica through a :class:`~ray.serve.handle.DeploymentHandle` (streamed:
  ``handle.options(stream=True)``), with the passages' affinity keys in the payload for the
  :class:`~nbce_rag.integrations.server.ray_router.PassageAffinityRouter`;
* its worker is a :class:`RemoteWorker`: each request runs in a thread of its own (waiting on a
  decoder replica costs no CPU), so requests are decoded concurrently by the replicas' step
  schedulers instead of one at a time.

Faults: a request whose decoder replica dies before it started decoding (the replica's
``started`` event) is sent again (another replica: Ray drops the dead one; at most
``retries`` times, within the deadline); afterwards the client gets an OpenAI-format 503
(``code: "replica_failed"``) -- on a stream as an error event. The request's deadline is also
enforced by the app itself (504), so a lost replica never makes a client wait past it.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Iterator, List, Optional

from nbce_rag.integrations.server.protocol import OpenAIError, error_from_exception, timeout_error
from nbce_rag.integrations.server.worker import CANCELLED, Job, ModelWorker
from nbce_rag.integrations.server.ray_router import passage_key

__all__ = ["RemoteWorker", "RemotePipeline", "DecoderInfo", "error_payload", "error_from_payload"]

logger = logging.getLogger("nbce_rag.integrations.server")

_current = threading.local()  # the job a RemoteWorker thread is running (its deadline and kind)


def error_payload(exc: BaseException) -> Dict[str, Any]:
    """An exception as the OpenAI error fields (what a decoder replica sends back: exceptions
    with their own constructors do not survive pickling)."""
    e = error_from_exception(exc)
    return {"status": e.status, "message": e.message, "type": e.type, "param": e.param, "code": e.code}


def error_from_payload(d: Dict[str, Any]) -> OpenAIError:
    return OpenAIError(int(d["status"]), d["message"], type=d.get("type") or "server_error", param=d.get("param"),
                       code=d.get("code"))


def replica_failed(detail: str) -> OpenAIError:
    return OpenAIError(503, f"the decoder replica serving this request failed ({detail}); Ray Serve restarts it: "
                            "retry the request", type="server_error", code="replica_failed")


class DecoderInfo:
    """What the ingress knows of the decoder: its settings (request options are checked
    against them, as by ``nbce-rag serve``) and its name (``/v1/models``). No model."""

    def __init__(self, config: Any, name: str = ""):
        self.config = config
        self.name = name


class RemotePipeline:
    """Retrieval and filtering here, decoding on a decoder replica (see the module docstring).

    ``rag``: a :class:`~nbce_rag.pipeline.RAGPipeline` whose decoder is a :class:`DecoderInfo`
    (its index, filter and calibration are used; its decoder never runs). ``handle``: the
    decoder deployment's handle. No ``start`` method: the app hands each request to the
    worker whole (:meth:`stream`)."""

    def __init__(self, rag: Any, handle: Any, *, retries: int = 1, scorer: Any = None,
                 index_dir: Optional[str] = None, refresh_s: float = 2.0):
        from nbce_rag.decoding.scoring import resolve_scorer

        self.index_dir = index_dir
        self.refresh_s = float(refresh_s)
        self._checked = time.monotonic()
        self._reload_lock = threading.Lock()
        self.rag = rag
        self.scorer = resolve_scorer(scorer)  # scores passages sent without one, as the decoder would
        self.handle = handle
        self.retries = int(retries)
        self.index = rag.index
        self.threshold = rag.threshold
        self.decoder = rag.decoder
        self.calibration = rag.calibration
        self.k = rag.k

    def refresh_index(self, force: bool = False) -> bool:
        """Load the index directory again when a writer saved a new generation since this copy
        (checked at most every ``refresh_s`` seconds, by the manifest; one reload at a time,
        requests in flight keep the copy they started with). Returns True when it reloaded."""
        idx = self.rag.index
        if self.index_dir is None or idx is None:
            return False
        now = time.monotonic()
        if not force and now - self._checked < self.refresh_s:
            return False
        if not self._reload_lock.acquire(blocking=False):
            return False
        try:
            self._checked = now
            saved = type(idx).saved_generation(self.index_dir)
            if saved is None or saved == idx.generation:
                return False
            new = type(idx).load(self.index_dir, encoder=idx.encoder)
            self.rag.index = self.index = new
            logger.info("index %s: loaded generation %s (%d chunks)", self.index_dir, saved, len(new))
            return True
        except Exception as e:  # noqa: BLE001 - keep serving the copy in memory
            logger.warning("index %s: could not load the new generation: %s", self.index_dir, e)
            return False
        finally:
            self._reload_lock.release()

    def stream(self, question: str, passages: Optional[List[Any]] = None, *, k: Optional[int] = None,
               **options: Any) -> Iterator[Any]:
        """Select the passages now, then stream the decoder replica's events (the final
        answer gets ``supported``, ``dropped`` and ``calibration`` as in ``RAGPipeline.stream``)."""
        from nbce_rag.decoding.scoring import score_missing

        if passages is None:
            self.refresh_index()
        kept, dropped = self.rag.select(question, passages, k)
        kept = [p for _, p in score_missing(self.scorer, question, list(enumerate(kept)))]
        job: Optional[Job] = getattr(_current, "job", None)
        deadline = job.deadline if job is not None else time.monotonic() + 120.0
        system = options.get("system_prompt", self.decoder.config.system_prompt)
        payload = {"question": question, "passages": list(kept), "options": options,
                   "final_only": bool(job.final_only) if job is not None else False,
                   "affinity": [passage_key(p.text, system) for p in kept]}
        for attempt in range(self.retries + 1):
            payload["timeout_s"] = max(0.0, deadline - time.monotonic())
            started = False
            resp = self.handle.options(stream=True).decode.remote(payload)
            finished = False
            try:
                for kind, value in resp:
                    if kind == "started":
                        started = True
                    elif kind == "event":
                        if value.answer is not None:
                            value.answer.supported = bool(kept)
                            value.answer.dropped = dropped
                            value.answer.calibration = self.calibration
                        yield value
                    elif kind == "timeout":
                        raise timeout_error(payload["timeout_s"])
                    elif kind == "error":
                        raise error_from_payload(value)
                finished = True
                return
            except OpenAIError:
                finished = True
                raise
            except Exception as e:  # noqa: BLE001 - Ray's errors: the replica died or went away
                finished = True
                if not _is_replica_loss(e):
                    raise
                if started or attempt >= self.retries or time.monotonic() >= deadline:
                    raise replica_failed(type(e).__name__) from None
                logger.warning("a decoder replica was lost before decoding (%s); sending the request again",
                               type(e).__name__)
            finally:
                if not finished:
                    resp.cancel()  # the client went away or timed out: the replica drops the rows


def _is_replica_loss(e: BaseException) -> bool:
    from ray import exceptions as rx

    lost = (rx.RayActorError, rx.ActorUnavailableError)
    try:
        from ray.serve.exceptions import RequestCancelledError  # noqa: F401  (cancellations are not losses)
    except ImportError:  # pragma: no cover
        pass
    return isinstance(e, lost)


class RemoteWorker(ModelWorker):
    """The ingress's worker: every job runs in a thread of its own (up to ``max_concurrent``
    at once; ``max_queue`` more wait), because its model work happens on a decoder replica.
    Same interface as :class:`ModelWorker` (``submit``, ``queued``, ``active``, ``busy``,
    ``stats``, ``stop``). ``decoder``: the decoder deployment's handle, for
    :meth:`remote_metrics` (every replica's series) and :meth:`replica_stats`."""

    def __init__(self, max_queue: int, max_concurrent: int, decoder: Any = None):
        super().__init__(max_queue)
        self.max_concurrent = int(max_concurrent)
        self._pool = ThreadPoolExecutor(self.max_concurrent, thread_name_prefix="nbce-rag-ingress")
        self._jobs: Dict[int, Job] = {}
        self._running = 0
        self._count_lock = threading.Lock()
        self.decoder = decoder

    @property
    def queued(self) -> int:
        with self._count_lock:
            return max(0, len(self._jobs) - self._running)

    @property
    def active(self) -> int:
        return self._running

    @property
    def busy(self) -> bool:
        return bool(self._jobs)

    def start(self) -> None:  # no loop thread: jobs run in the pool
        pass

    def submit(self, job: Job) -> None:
        with self._count_lock:
            if len(self._jobs) >= self.max_concurrent + self._queue.maxsize:
                self.stats["rejected"] += 1
                if self.metrics is not None:
                    self.metrics.outcome("rejected")
                raise OpenAIError(503, f"the server is busy ({len(self._jobs)} requests in flight); retry in a "
                                       "moment", type="server_error", code="server_overloaded")
            self._jobs[id(job)] = job
        self._pool.submit(self._run, job)

    def _observe(self, job: Job, ev: Any) -> None:
        pass  # tokens and timings are counted by the decoder replica that produced them

    def _run(self, job: Job) -> None:
        with self._count_lock:
            self._running += 1
        _current.job = job
        try:
            if not job.over():
                self._run_alone(job)
        except Exception as e:  # noqa: BLE001  # pragma: no cover - _run_alone hands errors to the job
            job.outcome = "failed"
            job.push("error", e)
        finally:
            _current.job = None
            self._count(job)
            with self._count_lock:
                self._running -= 1
                self._jobs.pop(id(job), None)

    def stop(self, timeout: float = 5.0) -> None:
        for job in list(self._jobs.values()):
            job.abort(CANCELLED)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ the replicas
    async def remote_metrics(self) -> List[Any]:
        """``(labels, families)`` of every decoder replica (for the ingress's ``/metrics``)."""
        if self.decoder is None:
            return []
        try:
            results = await self.decoder.broadcast("metrics_families").results_async(timeout_s=10,
                                                                                     return_exceptions=True)
        except Exception as e:  # noqa: BLE001 - the ingress's own series are still served
            logger.warning("could not collect the decoder replicas' metrics: %s", e)
            return []
        return [({"tier": "decoder", "replica": rid}, fams) for r in results if not isinstance(r, BaseException)
                for rid, fams in [r]]

    async def replica_stats(self) -> List[Dict[str, Any]]:
        """Every decoder replica's :meth:`stats` (id, requests, passage keys served, KV cache)."""
        results = await self.decoder.broadcast("stats").results_async(timeout_s=10, return_exceptions=True)
        return [r for r in results if not isinstance(r, BaseException)]
