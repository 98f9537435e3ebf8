"""``nbce-rag serve``: an OpenAI-compatible HTTP server (needs the ``server`` extra).

    nbce-rag serve [--index DIR] [--model M] [--host H] [--port P] [--api-key K]

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``,
``POST /v1/embeddings``, ``GET /health``. Passages come in the request's ``documents`` field
(``extra_body={"documents": [{"title", "text"}]}`` with the ``openai`` client); without it the
server retrieves from ``--index`` and filters with its calibration. See
``nbce_rag.integrations.server`` for the extension fields and limits.
"""

from __future__ import annotations

import argparse
import os

from nbce_rag.commands.arguments import DTYPE_HELP, add_encoder_dtype, check_device, encoder_options, examples

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def register(subparsers: "argparse._SubParsersAction") -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve an OpenAI-compatible API (chat, completions, embeddings) over the RAG pipeline",
        description="Serve /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models and /health. "
        "Requests carry passages in `documents` (vLLM's field); without them the server retrieves from "
        "--index and filters with the index's calibration.json. Needs `pip install 'nbce-rag[server]'`.",
        epilog=examples(
            "nbce-rag serve --index my_index                  # http://127.0.0.1:8000/v1",
            "nbce-rag serve --index my_index --host 0.0.0.0 --api-key $KEY --threads 1",
            "nbce-rag serve --model HuggingFaceTB/SmolLM2-360M-Instruct --device cuda --port 8080",
            "nbce-rag serve --index my_index --replicas 2 --threads 1   # Ray Serve: 2 decoder replicas, affinity routing",
        ),
    )
    p.add_argument("--index", default=None, metavar="DIR",
                   help="index directory (nbce-rag index) for server-side retrieval; without it, requests "
                   "without documents are answered closed-book")
    p.add_argument("--model", default=None, metavar="M",
                   help="LLM: a Hugging Face id, a local path or a .gguf file (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--encoder", default=None, metavar="E",
                   help="encoder for queries and /v1/embeddings (default: the index's, else the bundled all-MiniLM-L6-v2)")
    p.add_argument("--no-filter", action="store_true",
                   help="ignore the index's calibration.json (every top-k candidate reaches the decoder)")
    p.add_argument("-k", "--k", type=int, default=10, help="candidates retrieved per question (default 10)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=os.environ.get("NBCE_RAG_API_KEY"), metavar="K",
                   help="require `Authorization: Bearer K` (default: $NBCE_RAG_API_KEY; unset = no auth)")
    p.add_argument("--served-model-name", "--model-name", dest="model_name", nargs="+", default=None, metavar="NAME",
                   help="model id listed by /v1/models and echoed in responses (default nbce-rag); more names are "
                   "aliases a request's `model` may use (any other name is a 404)")
    p.add_argument("--allowed-hosts", nargs="+", default=None, metavar="HOST",
                   help="host names the Host header may carry ('*': any). Default: bound to loopback without "
                   "--api-key, only 127.0.0.1/localhost/::1 (a web page cannot reach the server by DNS rebinding); "
                   "otherwise not checked")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    p.add_argument("--dtype", default=None, help=DTYPE_HELP)
    add_encoder_dtype(p)
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: torch's choice, all cores: best when the server runs alone; "
                   "1 when the machine is shared with other work)")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="answer length when a request gives no max_tokens (default 64)")
    g = p.add_argument_group("limits")
    g.add_argument("--max-queue", type=int, default=64, help="requests waiting for the model (503 beyond; default 64)")
    g.add_argument("--timeout", type=float, default=120.0, metavar="S",
                   help="per-request timeout in seconds, queue time included (504; default 120)")
    g.add_argument("--max-body-bytes", type=int, default=2 * 1024 * 1024, help="request body size (413; default 2 MiB)")
    g.add_argument("--max-documents", type=int, default=64, help="passages per request (default 64)")
    g.add_argument("--max-document-chars", type=int, default=20_000, help="characters per passage (default 20000)")
    g.add_argument("--max-tokens", type=int, default=1024, help="largest max_tokens a request may ask (default 1024)")
    g.add_argument("--max-prompt-tokens", type=int, default=16_384,
                   help="prompt tokens over all NBCE rows of one request (400 beyond; default 16384)")
    g.add_argument("--max-row-tokens", type=int, default=512,
                   help="passage tokens per NBCE row; longer passages are split into windows, which bounds one "
                   "row's prefill (default 512; 0: the decoder's own limit)")
    s_ = p.add_argument_group("scheduler (concurrent requests share decode steps)")
    s_.add_argument("--max-active", type=int, default=32, help="requests decoded together (default 32)")
    s_.add_argument("--step-rows", type=int, default=256,
                    help="rows per decode step; a request with more rows steps alone, in turns (default 256)")
    s_.add_argument("--prefill-tokens", type=int, default=512,
                    help="padded tokens per prefill chunk, interleaved with decode steps (default 512)")
    r_ = p.add_argument_group("scale-out on Ray Serve (needs `pip install 'nbce-rag[ray]'`)")
    r_.add_argument("--replicas", default=None, metavar="N",
                    help="serve with N decoder replicas (or 'auto': autoscaling) behind a retriever/ingress tier on "
                    "Ray Serve, routed by passage affinity; starts a local Ray cluster unless --ray-address")
    r_.add_argument("--min-replicas", type=int, default=1, help="with --replicas auto (default 1)")
    r_.add_argument("--max-replicas", type=int, default=4, help="with --replicas auto (default 4)")
    r_.add_argument("--target-ongoing-requests", type=float, default=8.0,
                    help="with --replicas auto: ongoing requests per replica the autoscaler aims at (default 8)")
    r_.add_argument("--decoder-cpus", type=float, default=1.0, help="CPUs of one decoder replica (default 1)")
    r_.add_argument("--decoder-gpus", type=float, default=0.0, help="GPUs of one decoder replica (1: one per GPU)")
    r_.add_argument("--ingress-replicas", type=int, default=1, help="retriever/ingress replicas (default 1)")
    r_.add_argument("--ingress-cpus", type=float, default=0.5, help="CPUs of one ingress replica (default 0.5)")
    r_.add_argument("--router", default="affinity", choices=["affinity", "default"],
                    help="decoder routing: passage affinity (default) or Ray's power of two choices")
    r_.add_argument("--imbalanced-threshold", type=float, default=2.0,
                    help="ongoing requests the preferred replica may have above the least loaded (default 2)")
    r_.add_argument("--ray-address", default=None, metavar="ADDR",
                    help="an existing Ray cluster (e.g. auto, ray://host:10001); default: a local one")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level (default info)")
    p.set_defaults(func=run)


def allowed_hosts(host: str, api_key, given):
    """The Host names the server accepts: ``--allowed-hosts`` when given; on loopback without
    an API key the loopback names; else ``None`` (not checked)."""
    if given:
        return list(given)
    if host in _LOOPBACK and not api_key:
        return sorted(_LOOPBACK)
    return None


def scale_options(args: argparse.Namespace):
    """The :class:`ScaleOutOptions` of ``--replicas`` and its flags, checked (ConfigError:
    exit 2, before anything starts)."""
    from nbce_rag.errors import ConfigError

    try:
        from nbce_rag.integrations.server.ray_app import ScaleOutOptions
    except ImportError as e:
        from nbce_rag.errors import NBCERagError

        raise NBCERagError(f"{e}. Install the ray extra: pip install 'nbce-rag[ray]'") from None
    replicas = args.replicas
    if replicas != "auto":
        try:
            replicas = int(replicas)
        except ValueError:
            raise ConfigError(f"--replicas must be a number >= 1 or 'auto' (got {args.replicas!r})") from None
    return ScaleOutOptions(replicas=replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                           target_ongoing_requests=args.target_ongoing_requests, decoder_cpus=args.decoder_cpus,
                           decoder_gpus=args.decoder_gpus, ingress_replicas=args.ingress_replicas,
                           ingress_cpus=args.ingress_cpus, router=args.router,
                           imbalanced_threshold=args.imbalanced_threshold, threads=args.threads).validate()


def run(args: argparse.Namespace) -> int:
    import logging

    try:
        import uvicorn

        from nbce_rag.integrations.server import DEFAULT_MODEL_NAME, ServerLimits, create_app
    except ImportError as e:
        from nbce_rag.errors import NBCERagError

        raise NBCERagError(f"{e}. Install the server extra: pip install 'nbce-rag[server]'") from None
    from nbce_rag.pipeline import RAGPipeline

    log = logging.getLogger("nbce_rag.serve")
    check_device(args.device, args.dtype, args.encoder_dtype)
    scale = scale_options(args) if args.replicas is not None else None
    if args.threads and scale is None:
        import torch

        torch.set_num_threads(args.threads)
    limits = ServerLimits(
        max_body_bytes=args.max_body_bytes, max_documents=args.max_documents,
        max_document_chars=args.max_document_chars, max_tokens=args.max_tokens,
        max_queue=args.max_queue, request_timeout_s=args.timeout, max_prompt_tokens=args.max_prompt_tokens,
        max_row_tokens=args.max_row_tokens or None, max_active=args.max_active, step_rows=args.step_rows,
        prefill_tokens=args.prefill_tokens,
    )
    names = args.model_name or [DEFAULT_MODEL_NAME]
    allowed = allowed_hosts(args.host, args.api_key, args.allowed_hosts)
    if scale is not None:
        from nbce_rag.integrations.server.ray_app import build_app, serve_blocking

        options = {} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}
        app = build_app(model=args.model, index=args.index, encoder=args.encoder,
                        threshold=None if args.no_filter else "auto", k=args.k, device=args.device,
                        dtype=args.dtype, encoder_dtype=args.encoder_dtype, decoder_options=options,
                        limits=limits, api_key=args.api_key, model_name=names,
                        allowed_hosts=allowed, options=scale)
        print(f"nbce-rag: serving {names[0]} on http://{args.host}:{args.port}/v1 with {scale.replicas} decoder "
              f"replica(s) on Ray Serve (router: {scale.router}; index: {args.index or 'none'})", flush=True)
        serve_blocking(app, scale, host=args.host, port=args.port, address=args.ray_address)
        return 0
    encoder = None
    if args.encoder:
        from nbce_rag.retrieval.encoder import CoSENTEncoder

        encoder = CoSENTEncoder.from_pretrained(args.encoder, device=args.device, **encoder_options(args))
    options = {} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}
    pipeline = RAGPipeline.from_pretrained(
        index=args.index, model=args.model, encoder=encoder, threshold=None if args.no_filter else "auto",
        k=args.k, device=args.device, dtype=args.dtype, encoder_dtype=args.encoder_dtype, **options,
    )
    if args.host not in _LOOPBACK and not args.api_key:
        log.warning("serving on %s without an API key: anyone who can reach it can use it (set --api-key)", args.host)
    app = create_app(pipeline, encoder=encoder, api_key=args.api_key, limits=limits,
                     model_name=names[0], aliases=names[1:], allowed_hosts=allowed)
    print(f"nbce-rag: serving {names[0]} on http://{args.host}:{args.port}/v1 "
          f"(index: {args.index or 'none'}, auth: {'on' if args.api_key else 'off'})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
