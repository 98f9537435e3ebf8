"""Prometheus metrics of the server, as serving backends expose them (``GET /metrics``).

Series (all prefixed ``nbce_rag_``):

* ``http_requests_total{method, path, status}``: HTTP requests by route and status code
  (``path`` is the route template, so ``/v1/models/{id}`` stays one series).
* ``requests_total{outcome}``: model-worker outcomes (completed, cancelled, timed_out, failed,
  rejected).
* ``queue_depth``: requests waiting for admission; ``active_requests``: being decoded.
* ``time_to_first_token_seconds`` and ``time_per_output_token_seconds`` histograms (from the
  request's arrival: queue and retrieval included).
* ``prompt_tokens_total``, ``cached_prompt_tokens_total`` (taken from the passage KV cache),
  ``generation_tokens_total``; ``passage_kv_hit_ratio`` = cached / prompt tokens so far
  (PromQL: ``rate(cached_prompt_tokens_total[5m]) / rate(prompt_tokens_total[5m])`` for a
  window).
* ``rows_per_step`` histogram: NBCE rows of the requests that advanced in one scheduler
  iteration (how full the batched decode steps are).

Through ``prometheus_client``, with a registry per app (never the global one: two apps in one
process, or two tests, count apart). Under Ray Serve every decoder replica keeps the same
series in its own registry and the ingress's ``/metrics`` adds them, labelled ``tier`` and
``replica``, so one scrape (one dashboard) shows the cluster (:mod:`.ray_app`).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["ServerMetrics", "TTFT_BUCKETS", "TPOT_BUCKETS", "ROWS_BUCKETS", "CONTENT_TYPE"]

PREFIX = "nbce_rag_"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _family(kind: str, name: str, doc: str, labels: Sequence[str], registry: Any, buckets=None) -> Any:
    import prometheus_client as pc

    cls = {"counter": pc.Counter, "gauge": pc.Gauge, "histogram": pc.Histogram}[kind]
    kw: Dict[str, Any] = {"registry": registry}
    if buckets is not None:
        kw["buckets"] = buckets
    return cls(PREFIX + name, doc, tuple(labels), **kw)


class ServerMetrics:
    """The server's series (see the module docstring), in a registry of their own.

    The model worker calls :meth:`queue`, :meth:`outcome`, :meth:`token` (every streamed
    token event of a job), :meth:`answer` (a request's final answer) and :meth:`step`; the
    app's middleware calls :meth:`http`."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry(auto_describe=True)

        def fam(kind: str, name: str, doc: str, labels: Sequence[str] = (), buckets=None) -> Any:
            return _family(kind, name, doc, labels, self.registry, buckets)

        self.http_requests = fam("counter", "http_requests", "HTTP requests by method, route and status code",
                                 ("method", "path", "status"))
        self.requests = fam("counter", "requests", "Generation and embedding requests by outcome", ("outcome",))
        self.queue_depth = fam("gauge", "queue_depth", "Requests waiting for admission to the model worker")
        self.active = fam("gauge", "active_requests", "Requests being decoded")
        self.ttft = fam("histogram", "time_to_first_token_seconds",
                        "Time from a request's arrival to its first generated token", buckets=TTFT_BUCKETS)
        self.tpot = fam("histogram", "time_per_output_token_seconds",
                        "Time between two generated tokens of one request", buckets=TPOT_BUCKETS)
        self.prompt_tokens = fam("counter", "prompt_tokens", "Prompt tokens over all NBCE rows")
        self.cached_tokens = fam("counter", "cached_prompt_tokens",
                                 "Prompt tokens taken from the passage KV cache (not recomputed)")
        self.generation_tokens = fam("counter", "generation_tokens", "Generated tokens")
        self.hit_ratio = fam("gauge", "passage_kv_hit_ratio",
                             "Cached prompt tokens / prompt tokens since start (passage KV cache)")
        self.rows_per_step = fam("histogram", "rows_per_step",
                                 "NBCE rows of the requests that advanced in one scheduler iteration",
                                 buckets=ROWS_BUCKETS)
        self._lock = threading.Lock()
        self._prompt = 0
        self._cached = 0
        self._last: Dict[int, float] = {}  # id(job) -> time of its last token

    # ---------------------------------------------------------------- hooks
    def http(self, method: str, path: str, status: int) -> None:
        self.http_requests.labels(method=method, path=path, status=str(status)).inc()

    def queue(self, queued: int, active: int) -> None:
        self.queue_depth.set(queued)
        self.active.set(active)

    def outcome(self, outcome: str, job: Any = None) -> None:
        self.requests.labels(outcome=outcome).inc()
        if job is not None:
            with self._lock:
                self._last.pop(id(job), None)

    def token(self, job: Any, arrival: float) -> None:
        """A token event of ``job`` (arrived at ``arrival``, ``time.monotonic()``) was pushed."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(id(job))
            self._last[id(job)] = now
        if last is None:
            self.ttft.observe(max(0.0, now - arrival))
        else:
            self.tpot.observe(max(0.0, now - last))

    def answer(self, answer: Any) -> None:
        prompt, cached = int(answer.prompt_tokens), int(getattr(answer, "cached_tokens", 0))
        self.prompt_tokens.inc(prompt)
        self.cached_tokens.inc(cached)
        self.generation_tokens.inc(max(0, int(answer.completion_tokens)))
        with self._lock:
            self._prompt += prompt
            self._cached += cached
            ratio = self._cached / self._prompt if self._prompt else 0.0
        self.hit_ratio.set(ratio)

    def step(self, rows: int) -> None:
        if rows > 0:
            self.rows_per_step.observe(rows)

    # ---------------------------------------------------------------- exposition
    def families(self) -> List[Any]:
        """This registry's metric families (picklable: a decoder replica sends them to the ingress)."""
        return list(self.registry.collect())

    def render(self, extra: Sequence[Tuple[Dict[str, str], Sequence[Any]]] = ()) -> bytes:
        """The Prometheus text format of this registry; with ``extra`` (``(labels, families)``
        of other replicas) every sample gets those labels (this registry's: ``tier="ingress"``)
        and families of one name are merged, so the text stays one family per name."""
        from prometheus_client import generate_latest

        if not extra:
            return generate_latest(self.registry)
        from prometheus_client import CollectorRegistry

        merged: Dict[str, Any] = {}
        for labels, fams in [({"tier": "ingress", "replica": "ingress"}, self.families()), *extra]:
            for fam in fams:
                out = merged.get(fam.name)
                if out is None:
                    out = merged[fam.name] = _copy_family(fam)
                for smp in fam.samples:
                    out.samples.append(smp._replace(labels={**smp.labels, **labels}))
        reg = CollectorRegistry(auto_describe=False)
        reg.register(_Static(list(merged.values())))
        return generate_latest(reg)


class _Static:
    """A collector that yields fixed families (the merged view of the replicas)."""

    def __init__(self, families: List[Any]):
        self._families = families

    def collect(self):
        return iter(self._families)


def _copy_family(fam: Any) -> Any:
    from prometheus_client.metrics_core import Metric

    out = Metric(fam.name, fam.documentation, fam.type, getattr(fam, "unit", ""))
    return out


def install(app: Any, srv: Any) -> None:
    """Add ``GET /metrics`` (no API key, like ``/health``) and the HTTP status middleware to
    ``app`` (a FastAPI app of :func:`~nbce_rag.integrations.server.app.create_app`)."""
    from fastapi import Request
    from fastapi.responses import Response

    metrics: ServerMetrics = srv.metrics

    @app.middleware("http")
    async def _count_status(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", None) or "unmatched"
        metrics.http(request.method, path, response.status_code)
        return response

    @app.get("/metrics")
    async def prometheus_metrics():
        w = srv.worker
        metrics.queue(w.queued, w.active)
        remote = getattr(w, "remote_metrics", None)  # decoder replicas' series (Ray Serve ingress)
        extra = await remote() if remote is not None else ()
        return Response(metrics.render(extra), media_type=CONTENT_TYPE)
