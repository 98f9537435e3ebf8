"""The model worker: one thread that owns the model and runs every model call.

Generation requests are :class:`~nbce_rag.decoding.decoder.DecodeState` groups handed to a
:class:`~nbce_rag.decoding.scheduler.StepScheduler` (see its docstring for the policy): between two
decode steps the worker takes new requests from its bounded queue (while fewer than
``max_active`` are active), drops the ones whose client went away or whose deadline passed
(their rows leave the batch at once), runs one scheduler iteration (at most one prefill chunk
plus one batched decode step) and pushes each request's events to its own asyncio queue.
Other work (embeddings; a pipeline without the step API) runs alone between iterations.

How long one iteration can hold the worker bounds how late a timeout or a disconnect is
noticed: one prefill chunk (``SchedulerConfig.prefill_tokens`` padded tokens) plus one decode
step of at most ``step_rows`` rows (or one larger request's rows).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple

from nbce_rag.integrations.server.protocol import OpenAIError

logger = logging.getLogger("nbce_rag.integrations.server")

CANCELLED = "cancelled"


class Job:
    """One request's work for the model worker, and the channel its results come back on.

    ``start`` (generation): a callable run in the worker that returns a DecodeState (retrieval
    and tokenization happen there); the scheduler decodes it with the others. ``fn`` (anything
    else): run alone; with ``stream`` its result is iterated event by event."""

    __slots__ = ("fn", "start", "stream", "final_only", "loop", "out", "cancel", "reason", "deadline", "outcome",
                 "state", "arrival")

    def __init__(self, fn: Optional[Callable[[], Any]] = None, *, stream: bool, final_only: bool, deadline: float,
                 start: Optional[Callable[[], Any]] = None):
        self.fn = fn
        self.start = start
        self.stream = stream
        self.final_only = final_only  #: push only the event carrying the Answer (non-streaming requests)
        self.loop = asyncio.get_running_loop()
        self.out: "asyncio.Queue[Tuple[str, Any]]" = asyncio.Queue()
        self.cancel = threading.Event()
        self.reason: Optional[str] = None  #: why it was cancelled: "cancelled" (client gone) or "timed_out"
        self.deadline = deadline
        self.outcome: Optional[str] = None
        self.state: Any = None
        self.arrival = time.monotonic()  #: when the request arrived (time to first token counts from here)

    def abort(self, reason: str = CANCELLED) -> None:
        """Ask the worker to drop this job (checked between steps)."""
        if self.reason is None:
            self.reason = reason
        self.cancel.set()

    def over(self) -> bool:
        """Whether the job was cancelled or ran past its deadline; if so its outcome is set
        (and a timeout is pushed to its client), and nothing more should run for it."""
        if self.cancel.is_set():
            self.outcome = self.reason or CANCELLED
            return True
        if time.monotonic() >= self.deadline:
            self.outcome = "timed_out"
            self.push("timeout")
            return True
        return False

    def push(self, kind: str, value: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass


class ModelWorker:
    """A single thread that runs every model call, from a bounded queue; generation requests
    are decoded together by ``scheduler`` (a :class:`StepScheduler`; ``None``: one at a time).

    ``stats`` counts outcomes: completed, cancelled (client went away), timed_out, failed,
    rejected (queue full); ``steps``: scheduler iterations run. ``metrics``: a
    :class:`~nbce_rag.integrations.server.metrics.ServerMetrics` the worker reports to (or None).
    """

    def __init__(self, max_queue: int, scheduler: Any = None, metrics: Any = None):
        self._queue: "queue.Queue[Optional[Job]]" = queue.Queue(maxsize=max_queue)
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self.scheduler = scheduler
        self._active: Dict[int, Job] = {}
        self._exclusive = False  # running a job alone, or admitting one (retrieval, tokenization)
        self.stats = {"completed": 0, "cancelled": 0, "timed_out": 0, "failed": 0, "rejected": 0}
        self.metrics = metrics

    @property
    def queued(self) -> int:
        """Requests waiting for admission."""
        return self._queue.qsize()

    @property
    def active(self) -> int:
        """Requests being decoded (admitted to the scheduler, or running alone)."""
        return len(self._active) + int(self._exclusive)

    @property
    def busy(self) -> bool:
        return self._exclusive or bool(self._active)

    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="nbce-rag-model-worker", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel what is waiting, let the running jobs notice, and end the thread."""
        with self._lock:
            t = self._thread
            self._thread = None
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.abort(CANCELLED)
                job.push("error", _shutting_down())
        for job in list(self._active.values()):
            job.abort(CANCELLED)
        if t is not None and t.is_alive():
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:  # pragma: no cover
                pass
            t.join(timeout)

    def submit(self, job: Job) -> None:
        self.start()
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.stats["rejected"] += 1
            if self.metrics is not None:
                self.metrics.outcome("rejected")
            raise OpenAIError(503, f"the server is busy ({self._queue.maxsize} requests are waiting); "
                                   "retry in a moment", type="server_error", code="server_overloaded") from None
        if self.metrics is not None:
            self.metrics.queue(self.queued, self.active)

    # ------------------------------------------------------------------ the loop
    def _count(self, job: Job) -> None:
        key = job.outcome or "failed"
        self.stats[key] = self.stats.get(key, 0) + 1
        if self.metrics is not None:
            self.metrics.outcome(key, job)

    def _observe(self, job: Job, ev: Any) -> None:
        """Report a job's event to the metrics (a token; the final answer's token counts)."""
        if self.metrics is None:
            return
        if getattr(ev, "token_id", None) is not None:
            self.metrics.token(job, job.arrival)
        if getattr(ev, "answer", None) is not None:
            self.metrics.answer(ev.answer)

    def _end(self, key: int, job: Job) -> None:
        """Count the job's outcome, then let it go (in this order: ``busy`` never reads False
        before the outcome is counted)."""
        self._count(job)
        del self._active[key]

    def _room(self) -> bool:
        sched = self.scheduler
        return sched is None or sched.free > 0

    def _loop(self) -> None:
        while True:
            # 1. admission: block only when there is nothing to step
            while self._room():
                try:
                    job = self._queue.get(block=not self._active)
                except queue.Empty:
                    break
                if job is None:
                    self._shutdown()
                    return
                self._admit(job)
            # 2. requests whose client went away or whose deadline passed leave now
            now = time.monotonic()
            for key, job in list(self._active.items()):
                if job.cancel.is_set() or now >= job.deadline:
                    reason = job.reason if job.cancel.is_set() else "timed_out"
                    self.scheduler.remove(job.state)
                    job.outcome = reason or CANCELLED
                    if job.outcome == "timed_out":
                        job.push("timeout")
                    self._end(key, job)
            # 3. one iteration: a prefill chunk and a batched decode step
            if self._active:
                try:
                    results = self.scheduler.step()
                except Exception as e:  # noqa: BLE001 - pragma: no cover - the scheduler catches per request
                    logger.exception("the scheduler failed")
                    for key, job in list(self._active.items()):
                        self.scheduler.remove(job.state)
                        job.outcome = "failed"
                        job.push("error", e)
                        self._end(key, job)
                    continue
                if self.metrics is not None:
                    self.metrics.step(sum(getattr(r.state, "n_rows", 0) for r in results if r.error is None))
                    self.metrics.queue(self.queued, self.active)
                for r in results:
                    job = self._active.get(id(r.state))
                    if job is None:  # pragma: no cover - removed in this iteration
                        continue
                    if r.error is not None:
                        job.outcome = "failed"
                        job.push("error", r.error)
                        self._end(id(r.state), job)
                        continue
                    for ev in r.events:
                        self._observe(job, ev)
                        if not job.final_only or ev.answer is not None:
                            job.push("event", ev)
                    if r.state.done:
                        job.outcome = "completed"
                        job.push("done")
                        self._end(id(r.state), job)

    def _admit(self, job: Job) -> None:
        self._exclusive = True  # busy from the moment the job leaves the queue
        try:
            if job.over():
                pass
            elif job.start is None or self.scheduler is None:
                self._run_alone(job)
            else:
                try:
                    job.state = job.start()  # retrieval, filter and tokenization; no model call yet
                    self._active[id(job.state)] = job
                    self.scheduler.add(job.state)
                    return
                except Exception as e:  # noqa: BLE001 - handed to the request, which answers it
                    job.outcome = "failed"
                    job.push("error", e)
            self._count(job)
        finally:
            self._exclusive = False

    def _shutdown(self) -> None:
        for key, job in list(self._active.items()):
            self.scheduler.remove(job.state)
            job.outcome = CANCELLED
            job.push("error", _shutting_down())
            self._end(key, job)

    def _run_alone(self, job: Job) -> None:
        it = None
        try:
            result = job.fn() if job.fn is not None else job.start()
            if not job.stream:
                job.outcome = "completed"
                job.push("result", result)
                return
            it = iter(result)
            for ev in it:
                self._observe(job, ev)
                if not job.final_only or ev.answer is not None:
                    job.push("event", ev)
                if job.over():
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


def _shutting_down() -> OpenAIError:
    return OpenAIError(503, "the server is shutting down", type="server_error", code="server_shutting_down")
