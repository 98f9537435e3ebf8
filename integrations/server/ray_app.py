"""Scale-out on Ray Serve: a retriever tier and decoder replicas that keep their passages warm.

Two deployments (needs the ``ray`` extra: ``pip install 'nbce-rag[ray]'``)::

    HTTP ──> NBCEIngress (CPU replicas)                 ──handle──> NBCEDecoder (1 per GPU / num_cpus)
             the OpenAI-compatible app of `nbce-rag serve`          model + step scheduler + passage
             (create_app: same routes, auth, limits, errors,         KV cache (the server's ModelWorker),
             streaming), encoder + index + margin filter             Prometheus series per replica
                             └── PassageAffinityRouter: the replica whose KV cache holds the passages

* :class:`IngressReplica` builds the app with :func:`create_app` over a
  :class:`~nbce_rag.integrations.server.ray_worker.RemotePipeline` (retrieval and filtering
  here, decoding on a decoder replica) and a ``RemoteWorker``; ``/metrics`` adds every decoder
  replica's series.
* :class:`DecoderReplica` owns the model, a :class:`~nbce_rag.decoding.scheduler.StepScheduler`
  and the passage KV cache behind the same :class:`ModelWorker` as ``nbce-rag serve``;
  ``decode`` streams a request's events back through the handle; ``check_health`` fails when
  the worker thread is gone (Ray then restarts the replica); on shutdown Ray waits for the
  requests in flight (``graceful_shutdown_timeout_s``), then the worker stops.
* Routing: :class:`~nbce_rag.integrations.server.ray_router.PassageAffinityRouter`
  (``router="affinity"``, the default) or Ray's own power-of-two router (``router="default"``).

Run it: ``nbce-rag serve --replicas 2 [--index DIR] ...`` (a local Ray cluster), or ``serve run
examples/serve_config.yaml`` / ``serve deploy`` on a cluster (KubeRay: a RayService with that
config), whose ``import_path`` is :func:`app_builder`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Union

try:
    from ray import serve
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("nbce_rag.integrations.server.ray_app needs the `ray` extra: pip install 'nbce-rag[ray]' "
                      f"(ray[serve]); missing: {e.name}") from e

from nbce_rag.errors import ConfigError

from nbce_rag.integrations.server.app import DEFAULT_MODEL_NAME, create_app
from nbce_rag.integrations.server.metrics import ServerMetrics
from nbce_rag.integrations.server.ray_router import PassageAffinityRouter
from nbce_rag.integrations.server.ray_worker import DecoderInfo, RemotePipeline, RemoteWorker, error_payload
from nbce_rag.integrations.server.state import ServerLimits, check_prompt_tokens
from nbce_rag.integrations.server.worker import CANCELLED, Job, ModelWorker

__all__ = ["ScaleOutOptions", "DecoderReplica", "IngressReplica", "build_app", "app_builder", "serve_blocking",
           "ROUTERS"]

logger = logging.getLogger("nbce_rag.integrations.server")

ROUTERS = ("affinity", "default")


# ---------------------------------------------------------------------------------- options
@dataclass
class ScaleOutOptions:
    """How the deployments are laid out; checked (:meth:`validate`) before anything starts.

    ``replicas``: decoder replicas (an int, or ``"auto"``: autoscaling between
    ``min_replicas`` and ``max_replicas`` on ``target_ongoing_requests`` per replica).
    ``decoder_cpus`` / ``decoder_gpus``: Ray resources of one decoder replica (``decoder_gpus=1``:
    one replica per GPU). ``ingress_replicas`` / ``ingress_cpus``: the retriever tier.
    ``max_ongoing_requests``: requests one decoder replica takes at once (Ray queues the rest;
    default: the scheduler's ``max_active``). ``router``: ``"affinity"`` (passage-affinity) or
    ``"default"`` (Ray's power of two choices). ``imbalanced_threshold``: ongoing requests the
    preferred replica may have above the least loaded one. ``retries``: how many times a request
    whose replica died before decoding is sent again. ``threads``: torch threads per decoder
    replica (``None``: ``decoder_cpus`` rounded up)."""

    replicas: Union[int, str] = 2
    min_replicas: int = 1
    max_replicas: int = 4
    target_ongoing_requests: float = 8.0
    decoder_cpus: float = 1.0
    decoder_gpus: float = 0.0
    ingress_replicas: int = 1
    ingress_cpus: float = 0.5
    max_ongoing_requests: Optional[int] = None
    router: str = "affinity"
    imbalanced_threshold: float = 2.0
    retries: int = 1
    threads: Optional[int] = None
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    graceful_shutdown_timeout_s: float = 30.0
    index_refresh_s: float = 2.0

    def validate(self) -> "ScaleOutOptions":
        """Raise :class:`~nbce_rag.errors.ConfigError` naming the first bad option."""
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"{name}={getattr(self, name)!r}: {why}")

        if isinstance(self.replicas, str):
            if self.replicas != "auto":
                raise bad("replicas", "must be a number of decoder replicas >= 1, or 'auto' (autoscaling)")
            if not 1 <= int(self.min_replicas) <= int(self.max_replicas):
                raise ConfigError(f"autoscaling needs 1 <= min_replicas <= max_replicas (got min_replicas="
                                  f"{self.min_replicas}, max_replicas={self.max_replicas})")
            if not self.target_ongoing_requests > 0:
                raise bad("target_ongoing_requests", "must be > 0")
        elif isinstance(self.replicas, bool) or not isinstance(self.replicas, int) or self.replicas < 1:
            raise bad("replicas", "must be a number of decoder replicas >= 1, or 'auto' (autoscaling)")
        if not self.decoder_cpus >= 0 or not self.decoder_gpus >= 0 or not self.ingress_cpus >= 0:
            raise ConfigError(f"CPU/GPU amounts must be >= 0 (decoder_cpus={self.decoder_cpus}, "
                              f"decoder_gpus={self.decoder_gpus}, ingress_cpus={self.ingress_cpus})")
        if self.decoder_cpus == 0 and self.decoder_gpus == 0:
            raise ConfigError("a decoder replica needs resources: decoder_cpus > 0 or decoder_gpus > 0")
        if isinstance(self.ingress_replicas, bool) or int(self.ingress_replicas) < 1:
            raise bad("ingress_replicas", "must be >= 1")
        if self.max_ongoing_requests is not None and int(self.max_ongoing_requests) < 1:
            raise bad("max_ongoing_requests", "must be >= 1")
        if self.router not in ROUTERS:
            raise bad("router", f"must be one of {', '.join(ROUTERS)}")
        if not self.imbalanced_threshold >= 0:
            raise bad("imbalanced_threshold", "must be >= 0")
        if int(self.retries) < 0:
            raise bad("retries", "must be >= 0")
        if self.threads is not None and int(self.threads) < 1:
            raise bad("threads", "must be >= 1")
        if not self.index_refresh_s >= 0:
            raise bad("index_refresh_s", "must be >= 0")
        for name in ("health_check_period_s", "health_check_timeout_s", "graceful_shutdown_timeout_s"):
            if not getattr(self, name) > 0:
                raise bad(name, "must be > 0")
        return self

    def decoder_deployment_options(self, limits: ServerLimits) -> Dict[str, Any]:
        from ray.serve.config import RequestRouterConfig

        opts: Dict[str, Any] = {
            "name": "NBCEDecoder",
            "ray_actor_options": {"num_cpus": self.decoder_cpus, "num_gpus": self.decoder_gpus},
            "max_ongoing_requests": int(self.max_ongoing_requests or limits.max_active),
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
        }
        if self.replicas == "auto":
            opts["autoscaling_config"] = {"min_replicas": int(self.min_replicas), "max_replicas": int(self.max_replicas),
                                          "target_ongoing_requests": float(self.target_ongoing_requests)}
        else:
            opts["num_replicas"] = int(self.replicas)
        if self.router == "affinity":
            opts["request_router_config"] = RequestRouterConfig(
                request_router_class=PassageAffinityRouter,
                request_router_kwargs={"imbalanced_threshold": float(self.imbalanced_threshold)})
        return opts

    def ingress_deployment_options(self) -> Dict[str, Any]:
        return {"name": "NBCEIngress", "num_replicas": int(self.ingress_replicas),
                "ray_actor_options": {"num_cpus": self.ingress_cpus},
                "health_check_period_s": self.health_check_period_s,
                "health_check_timeout_s": self.health_check_timeout_s,
                "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ScaleOutOptions":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown scale-out option(s) {unknown}; known: {sorted(names)}")
        return cls(**d)


# ---------------------------------------------------------------------------------- decoder tier
class DecoderReplica:
    """One decoder replica: the model, a step scheduler and the passage KV cache behind the
    server's :class:`ModelWorker` (see the module docstring). ``spec``: ``model``, ``device``,
    ``dtype``, ``threads``, ``index`` (for its ``nbce-rag cache`` KV store, if any),
    ``kv_cache``, ``decoder_options`` (NBCEConfig fields), ``limits`` (ServerLimits fields)."""

    def __init__(self, spec: Dict[str, Any]):
        from nbce_rag.decoding.decoder import NBCEDecoder
        from nbce_rag.decoding.scheduler import StepScheduler

        if spec.get("threads"):
            import torch

            torch.set_num_threads(int(spec["threads"]))
        kv = spec.get("kv_cache", "auto")
        if spec.get("index") and kv == "auto":
            from nbce_rag.decoding.kvcache import cache_for_index

            kv = cache_for_index(spec["index"]) or "auto"
        self.decoder = NBCEDecoder.from_pretrained(spec.get("model"), device=spec.get("device"), dtype=spec.get("dtype"),
                                                   kv_cache=kv, scorer=None, **dict(spec.get("decoder_options") or {}))
        self.limits = ServerLimits(**dict(spec.get("limits") or {}))
        self.metrics = ServerMetrics()
        self.worker = ModelWorker(self.limits.max_queue, StepScheduler(self.decoder, self.limits.scheduler_config()),
                                  metrics=self.metrics)
        self.worker.start()
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside a Serve replica (unit use)
            self.replica_id = f"local-{os.getpid()}"
        self.requests = 0
        self.served: Counter = Counter()  # affinity keys of the passages this replica decoded

    def describe(self) -> Dict[str, Any]:
        """The decoder's settings and name (the ingress checks request options against them)."""
        return {"config": self.decoder.config, "name": str(self.decoder.name)}

    async def decode(self, request: Dict[str, Any]):
        """Decode one request; yields ``(kind, value)``: ``("started", None)`` once decoding
        begins, ``("event", StreamEvent)`` (only the final one with ``final_only``), then the
        end: nothing more (done), ``("error", {...OpenAI error fields})`` or ``("timeout", None)``.
        Cancelled by the caller (``response.cancel()``): the rows leave the batch."""
        self.requests += 1
        self.served.update(request.get("affinity") or ())
        question, passages, options = request["question"], list(request["passages"]), dict(request["options"])
        limits = self.limits
        job: Optional[Job] = None

        def start():
            job.push("started")
            state = self.decoder.start(question, passages, **options)
            check_prompt_tokens(state, limits)
            return state

        job = Job(stream=True, final_only=bool(request.get("final_only")), start=start,
                  deadline=time.monotonic() + float(request.get("timeout_s", limits.request_timeout_s)))
        try:
            self.worker.submit(job)
        except Exception as e:  # noqa: BLE001 - a full queue: 503 to the client
            yield ("error", error_payload(e))
            return
        try:
            while True:
                timeout = max(0.0, job.deadline - time.monotonic())
                try:
                    kind, value = await asyncio.wait_for(job.out.get(), timeout=timeout)
                except asyncio.TimeoutError:
                    job.abort("timed_out")
                    yield ("timeout", None)
                    return
                if kind == "done":
                    return
                if kind == "error":
                    yield ("error", error_payload(value))
                    return
                yield (kind, value)
                if kind == "timeout":
                    return
        finally:
            job.abort(CANCELLED)  # no-op once finished; frees the rows when the caller went away

    def metrics_families(self):
        """``(replica id, metric families)`` for the ingress's ``/metrics``."""
        self.metrics.queue(self.worker.queued, self.worker.active)
        return self.replica_id, self.metrics.families()

    def stats(self) -> Dict[str, Any]:
        """Replica id, its Ray actor's name, requests, passage keys served (``{key: count}``),
        KV cache counters and the worker's outcome counts."""
        kv = self.decoder.kv_cache
        try:
            import ray

            actor = ray.get_runtime_context().get_actor_name()
        except Exception:  # noqa: BLE001 - outside Ray
            actor = None
        return {"replica": self.replica_id, "actor": actor, "requests": self.requests, "served": dict(self.served),
                "kv": kv.stats.to_dict() if kv is not None else None, "worker": dict(self.worker.stats)}

    def check_health(self) -> None:
        t = self.worker._thread
        if t is None or not t.is_alive():
            raise RuntimeError("the decoder's model worker thread is not running")

    def __del__(self) -> None:
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.stop()


# ---------------------------------------------------------------------------------- retriever tier
class IngressReplica:
    """One ingress replica: encoder, index and filter, and the OpenAI-compatible app of
    ``nbce-rag serve`` (:func:`create_app`) whose decoding goes to ``decoder`` (a handle).
    ``spec``: ``index``, ``encoder``, ``threshold`` ("auto" or None), ``k``, ``scorer``
    ("auto" or None: how passages sent without a score are scored), ``limits``, ``api_key``,
    ``model_name``, ``aliases``, ``allowed_hosts``, ``retries``, ``max_concurrent``."""

    async def __init__(self, decoder: Any, spec: Dict[str, Any]):
        from nbce_rag.pipeline import RAGPipeline

        self.spec = dict(spec)
        self.limits = ServerLimits(**dict(spec.get("limits") or {}))
        info = await decoder.describe.remote()
        encoder = None
        if spec.get("encoder"):
            from nbce_rag.retrieval.encoder import CoSENTEncoder

            encoder = CoSENTEncoder.from_pretrained(spec["encoder"], dtype=spec.get("encoder_dtype"))
        self.encoder = encoder
        rag = RAGPipeline.from_pretrained(index=spec.get("index"), encoder=encoder,
                                          encoder_dtype=spec.get("encoder_dtype"),
                                          threshold=spec.get("threshold", "auto"), k=int(spec.get("k", 10)),
                                          decoder=DecoderInfo(info["config"], info["name"]))
        scorer = spec.get("scorer", "auto")
        if scorer == "auto" and rag.index is not None:
            scorer = rag.index  # as RAGPipeline: unscored passages get the index's canonical cosine
        max_concurrent = int(spec.get("max_concurrent") or 4 * self.limits.max_active)
        self.worker = RemoteWorker(self.limits.max_queue, max_concurrent, decoder=decoder)
        self.pipeline = RemotePipeline(rag, decoder, retries=int(spec.get("retries", 1)), scorer=scorer,
                                       index_dir=spec.get("index"), refresh_s=float(spec.get("index_refresh_s", 2.0)))

    def __serve_build_asgi_app__(self):
        s = self.spec
        names = list(s.get("model_name") or [DEFAULT_MODEL_NAME])
        return create_app(self.pipeline, encoder=self.encoder, api_key=s.get("api_key"), limits=self.limits,
                          model_name=names[0], aliases=names[1:], allowed_hosts=s.get("allowed_hosts"),
                          worker=self.worker)

    async def replica_stats(self):
        """Every decoder replica's :meth:`DecoderReplica.stats` (handle calls; tests, benchmarks)."""
        return await self.worker.replica_stats()

    def check_health(self) -> None:
        pass  # index and encoder are in memory; the decoder replicas have their own checks


NBCEIngress = serve.ingress()(IngressReplica)


# ---------------------------------------------------------------------------------- the application
def build_app(*, model: Optional[str] = None, index: Optional[str] = None, encoder: Optional[str] = None,
              threshold: Optional[str] = "auto", k: int = 10, device: Optional[str] = None,
              dtype: Optional[str] = None, encoder_dtype: Optional[str] = None,
              decoder_options: Optional[Dict[str, Any]] = None, kv_cache: Any = "auto",
              limits: ServerLimits = ServerLimits(), api_key: Optional[str] = None,
              model_name: Sequence[str] = (DEFAULT_MODEL_NAME,), allowed_hosts: Optional[Sequence[str]] = None,
              scorer: Optional[str] = "auto", options: Optional[ScaleOutOptions] = None):
    """The Ray Serve application (``serve.run(build_app(...))``). Options are validated first:
    a bad one raises :class:`ConfigError` before anything is deployed."""
    options = (options or ScaleOutOptions()).validate()
    if not isinstance(limits, ServerLimits):
        raise ConfigError(f"limits must be a ServerLimits (got {type(limits).__name__})")
    if index is not None and not os.path.isdir(index):
        raise ConfigError(f"index {index!r} is not a directory (build one with `nbce-rag index`)")
    lim = dataclasses.asdict(limits)
    threads = options.threads or (max(1, int(-(-options.decoder_cpus // 1))) if options.decoder_gpus == 0 else None)
    dec_spec = {"model": model, "device": device, "dtype": dtype, "threads": threads, "index": index,
                "kv_cache": kv_cache,
                "decoder_options": dict(decoder_options or {}), "limits": lim}
    ing_spec = {"index": index, "encoder": encoder, "encoder_dtype": encoder_dtype, "threshold": threshold,
                "k": int(k), "scorer": scorer,
                "limits": lim, "api_key": api_key, "model_name": list(model_name),
                "allowed_hosts": None if allowed_hosts is None else list(allowed_hosts), "retries": options.retries,
                "index_refresh_s": options.index_refresh_s}
    decoder = serve.deployment(DecoderReplica).options(**options.decoder_deployment_options(limits))
    ingress = serve.deployment(NBCEIngress).options(**options.ingress_deployment_options())
    return ingress.bind(decoder.bind(dec_spec), ing_spec)


def app_builder(args: Dict[str, Any]):
    """The ``import_path`` of ``serve run`` / ``serve deploy`` configs
    (``nbce_rag.integrations.server.ray_app:app_builder``). ``args``: ``model``, ``index``,
    ``encoder``, ``k``, ``device``, ``no_filter``, ``api_key`` (default ``$NBCE_RAG_API_KEY``),
    ``model_name`` (a name or a list), ``decoder_options`` (NBCEConfig fields), ``limits``
    (ServerLimits fields) and ``scale`` (:class:`ScaleOutOptions` fields)."""
    args = dict(args or {})
    known = {"model", "index", "encoder", "k", "device", "no_filter", "api_key", "model_name", "decoder_options",
             "limits", "scale", "allowed_hosts"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ConfigError(f"unknown application argument(s) {unknown}; known: {sorted(known)}")
    names = args.get("model_name") or DEFAULT_MODEL_NAME
    return build_app(model=args.get("model"), index=args.get("index"), encoder=args.get("encoder"),
                     threshold=None if args.get("no_filter") else "auto", k=int(args.get("k", 10)),
                     device=args.get("device"), decoder_options=args.get("decoder_options"),
                     limits=ServerLimits(**dict(args.get("limits") or {})),
                     api_key=args.get("api_key", os.environ.get("NBCE_RAG_API_KEY")),
                     model_name=[names] if isinstance(names, str) else list(names),
                     allowed_hosts=args.get("allowed_hosts"),
                     options=ScaleOutOptions.from_dict(dict(args.get("scale") or {})))


def check_resources(options: ScaleOutOptions, available: Dict[str, float]) -> None:
    """The deployments must fit the cluster (``ray.cluster_resources()``), else Ray would wait
    forever for a place to start a replica: a ConfigError that says what to lower."""
    n = int(options.min_replicas) if options.replicas == "auto" else int(options.replicas)  # what must start
    cpus = n * options.decoder_cpus + options.ingress_replicas * options.ingress_cpus
    gpus = n * options.decoder_gpus
    have_cpu, have_gpu = float(available.get("CPU", 0)), float(available.get("GPU", 0))
    if cpus > have_cpu + 1e-9:
        raise ConfigError(f"{n} decoder replica(s) x {options.decoder_cpus:g} CPU + {options.ingress_replicas} ingress "
                          f"x {options.ingress_cpus:g} CPU need {cpus:g} CPUs; the Ray cluster has {have_cpu:g}. Lower "
                          "--replicas, --decoder-cpus or --ingress-cpus (fractions are allowed, e.g. 0.5)")
    if gpus > have_gpu + 1e-9:
        raise ConfigError(f"{n} decoder replica(s) x {options.decoder_gpus:g} GPU need {gpus:g} GPUs; the Ray cluster "
                          f"has {have_gpu:g}. Lower --replicas or --decoder-gpus")


def serve_blocking(app: Any, options: ScaleOutOptions, *, host: str = "127.0.0.1", port: int = 8000,
                   address: Optional[str] = None, name: str = "nbce-rag") -> None:
    """Run ``app`` on Ray Serve at ``http://host:port`` until interrupted (``nbce-rag serve
    --replicas``): a local Ray cluster unless ``address`` names one; Ctrl-C shuts it down.
    The deployments must fit the cluster's CPUs/GPUs (:func:`check_resources`)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False)
    try:
        check_resources(options, ray.cluster_resources())
    except ConfigError:
        ray.shutdown()
        raise
    serve.start(http_options={"host": host, "port": int(port)})
    serve.run(app, name=name, route_prefix="/")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
