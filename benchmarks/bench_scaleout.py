"""Scale-out on Ray Serve: passage-affinity routing vs Ray's default router vs one replica.

Workload: ``--sets`` document sets (default 8) from SQuAD v1.1 dev (``--data``, default
``../shared/data``; read by path, never copied): each set is ``--passages`` paragraphs of one
article, asked ``--questions`` of that article's questions (default 6), all sets' questions in one
shuffled order (``--seed``). Each request is a streamed chat completion with the set in
``documents`` (``stream_options.include_usage``), sent by ``--concurrency`` clients.

Configurations (each a fresh Ray Serve application, so every passage KV cache starts cold):

* ``one``: one decoder replica;
* ``default``: ``--replicas`` decoder replicas (default 2), Ray's power-of-two-choices router;
* ``affinity``: the same replicas, :class:`PassageAffinityRouter`.

Every decoder replica has one CPU and one torch thread; the ingress half a CPU. Measured per
configuration: passage KV hit rate (cached prompt tokens / prompt tokens, from ``usage``; and
the replicas' own row hits), throughput (requests/s over the whole workload), time to first
token (p50 of all requests and of *repeats*: questions over a document set asked before), and
how requests spread over the replicas. The machine's load average is recorded: on a shared
machine the timings move with the other processes.

    python benchmarks/bench_scaleout.py                    # bundled SmolLM2-135M, 8 x 6 requests x 3 configs
    python benchmarks/bench_scaleout.py --configs one affinity --concurrency 4 --max-tokens 8

Writes ``benchmarks/results/scaleout.json`` and ``scaleout.png``. Needs the ``ray`` extra,
httpx and matplotlib. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def load_workload(data: Path, sets: int, passages: int, questions: int) -> List[Dict[str, Any]]:
    """``sets`` document sets from SQuAD dev: ``passages`` paragraphs of one article and
    ``questions`` of their questions (articles in file order; those too small are skipped)."""
    path = data / "squad_v1.1" / "dev-v1.1.json"
    if not path.exists():
        sys.exit(f"SQuAD v1.1 dev not found at {path}; pass --data DIR (the shared data folder)")
    articles = json.loads(path.read_text())["data"]
    out = []
    for art in articles:
        paras = art["paragraphs"][:passages]
        qs = [qa["question"] for p in paras for qa in p["qas"]][:questions]
        if len(paras) < passages or len(qs) < questions:
            continue
        out.append({"title": art["title"], "documents": [{"title": art["title"].replace("_", " "), "text": p["context"]}
                                                          for p in paras], "questions": qs})
        if len(out) == sets:
            break
    if len(out) < sets:
        sys.exit(f"only {len(out)} articles have {passages} paragraphs and {questions} questions")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_request(base: str, docs, question: str, max_tokens: int) -> Dict[str, Any]:
    import httpx

    body = {"model": "nbce-rag", "messages": [{"role": "user", "content": question}], "documents": docs,
            "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, usage, status, error = None, None, None, None
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=900) as r:
        status = r.status_code
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                error = obj["error"]
                continue
            if obj.get("usage"):
                usage = obj["usage"]
            for ch in obj.get("choices", []):
                if ch.get("delta", {}).get("content") and ttft is None:
                    ttft = time.perf_counter() - t0
    return {"status": status, "error": error, "ttft": ttft, "latency": time.perf_counter() - t0, "usage": usage}


def run_config(name: str, args, workload, order) -> Dict[str, Any]:
    from ray import serve

    from nbce_rag.integrations.server import ServerLimits
    from nbce_rag.integrations.server.ray_app import ScaleOutOptions, build_app

    replicas = 1 if name == "one" else args.replicas
    opts = ScaleOutOptions(replicas=replicas, router="default" if name == "default" else "affinity",
                           decoder_cpus=1, ingress_cpus=0.5, threads=1, imbalanced_threshold=args.imbalanced_threshold,
                           max_ongoing_requests=args.max_active)
    limits = ServerLimits(max_active=args.max_active, request_timeout_s=1800, max_queue=256)
    app = build_app(model=args.model, device="cpu", threshold=None, limits=limits, scorer=None, options=opts,
                    decoder_options={"max_new_tokens": args.max_tokens})
    t_deploy = time.perf_counter()
    handle = serve.run(app, name="bench", route_prefix="/")
    deploy_s = time.perf_counter() - t_deploy
    base = args.base
    # warm-up, not counted: one closed-book request per replica (the model's first forward)
    with ThreadPoolExecutor(replicas) as ex:
        list(ex.map(lambda i: one_request(base, [], f"Warm-up {i}?", 2), range(replicas)))
    load0 = os.getloadavg()
    seen: set = set()
    jobs = []
    for s, q in order:
        jobs.append((s, q, s in seen))
        seen.add(s)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as ex:
        results = list(ex.map(lambda j: one_request(base, workload[j[0]]["documents"], j[1], args.max_tokens), jobs))
    wall = time.perf_counter() - t0
    load1 = os.getloadavg()
    stats = handle.replica_stats.remote().result()
    serve.delete("bench")
    rows = []
    for (s, q, rep), r in zip(jobs, results):
        u = r["usage"] or {}
        # no data text in the results (the data is not ours to copy)
        rows.append({"set": s, "repeat": rep, "status": r["status"], "error": r["error"],
                     "ttft": r["ttft"], "latency": r["latency"], "prompt_tokens": u.get("prompt_tokens"),
                     "cached_tokens": (u.get("prompt_tokens_details") or {}).get("cached_tokens")})
    ok = [x for x in rows if x["status"] == 200 and x["error"] is None and x["prompt_tokens"]]
    prompt = sum(x["prompt_tokens"] for x in ok)
    cached = sum(x["cached_tokens"] or 0 for x in ok)
    kv = [s["kv"] or {} for s in stats]
    row_hits, row_total = sum(k.get("hits", 0) for k in kv), sum(k.get("rows", 0) for k in kv)

    def p50(xs):
        xs = [x for x in xs if x is not None]
        return statistics.median(xs) if xs else None

    out = {
        "config": name, "replicas": replicas, "router": opts.router, "deploy_s": deploy_s, "wall_s": wall,
        "requests": len(rows), "ok": len(ok), "throughput_rps": len(ok) / wall,
        "hit_rate_tokens": cached / prompt if prompt else None,
        "hit_rate_rows": row_hits / row_total if row_total else None,
        "ttft_p50": p50(x["ttft"] for x in ok), "ttft_p50_repeats": p50(x["ttft"] for x in ok if x["repeat"]),
        "ttft_p50_first": p50(x["ttft"] for x in ok if not x["repeat"]),
        "latency_p50": p50(x["latency"] for x in ok),
        "per_replica": [{"replica": s["replica"], "requests": s["requests"], "kv": s["kv"]} for s in stats],
        "sets_per_replica": _sets_per_replica(stats, workload),
        "load_avg_before": load0, "load_avg_after": load1, "rows": rows,
    }
    print(f"{name:9s} replicas={replicas} ok={len(ok)}/{len(rows)} wall={wall:.1f}s "
          f"thr={out['throughput_rps']:.3f} req/s hit(tokens)={out['hit_rate_tokens']:.3f} "
          f"hit(rows)={out['hit_rate_rows']} ttft_p50_repeats={out['ttft_p50_repeats']} load={load1}", flush=True)
    return out


def _sets_per_replica(stats, workload) -> List[int]:
    """How many document sets each replica saw (any of their passages)."""
    from nbce_rag.integrations.server.ray_router import passage_key

    keysets = [{passage_key(f"{d['title']}\n{d['text']}") for d in w["documents"]} for w in workload]
    return [sum(1 for ks in keysets if ks & set(s["served"])) for s in stats]


def plot(results: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["config"] for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    axes[0].bar(names, [r["hit_rate_tokens"] or 0 for r in results], color="tab:blue")
    axes[0].set_title("passage KV hit rate\n(cached / prompt tokens)")
    axes[1].bar(names, [r["throughput_rps"] for r in results], color="tab:green")
    axes[1].set_title("throughput (requests/s)")
    axes[2].bar(names, [r["ttft_p50_repeats"] or 0 for r in results], color="tab:orange")
    axes[2].set_title("p50 time to first token,\nrepeat questions (s)")
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("nbce-rag on Ray Serve: 8 document sets x 6 questions, 1 thread per decoder replica", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    ap.add_argument("--sets", type=int, default=8)
    ap.add_argument("--questions", type=int, default=6)
    ap.add_argument("--passages", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--max-active", type=int, default=8)
    ap.add_argument("--imbalanced-threshold", type=float, default=2.0)
    ap.add_argument("--configs", nargs="+", default=["one", "default", "affinity"], choices=["one", "default", "affinity"])
    ap.add_argument("--num-cpus", type=float, default=None,
                    help="logical CPUs of the local Ray cluster (default: replicas + 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "scaleout.json"))
    args = ap.parse_args()

    import ray
    from ray import serve

    workload = load_workload(Path(args.data), args.sets, args.passages, args.questions)
    order = [(s, q) for s, w in enumerate(workload) for q in w["questions"]]
    random.Random(args.seed).shuffle(order)
    port = free_port()
    args.base = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=args.num_cpus or args.replicas + 1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    results = []
    try:
        for name in args.configs:
            results.append(run_config(name, args, workload, order))
    finally:
        serve.shutdown()
        ray.shutdown()
    one = next((r for r in results if r["config"] == "one"), None)
    summary = {}
    for r in results:
        if one is not None and r is not one:
            summary[r["config"]] = {
                "hit_rate_vs_one": (r["hit_rate_tokens"] / one["hit_rate_tokens"]) if one["hit_rate_tokens"] else None,
                "throughput_vs_one": r["throughput_rps"] / one["throughput_rps"],
                "ttft_p50_repeats_vs_one": (r["ttft_p50_repeats"] / one["ttft_p50_repeats"])
                if r["ttft_p50_repeats"] and one["ttft_p50_repeats"] else None,
            }
    out = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "machine": platform.platform(),
           "cpus": os.cpu_count(), "python": platform.python_version(), "settings": {
               k: v for k, v in vars(args).items() if k not in ("base",)},
           "workload": [{"set": i, "questions": len(w["questions"])} for i, w in enumerate(workload)],
           "summary": summary, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    plot(results, Path(args.out).with_suffix(".png"))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
