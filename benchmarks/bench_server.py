"""Bounded load test of the OpenAI-compatible server (``nbce-rag serve``) on loopback.

Starts ``python -m nbce_rag.cli serve`` (bundled SmolLM2-135M-Instruct, no index) as a
subprocess on 127.0.0.1, then, for each concurrency level (default 1, 4, 16), runs that many
clients, each sending a fixed number of chat requests one after another (default 4, 2 and 1 per
client at 1, 4 and 16 clients; alternately streaming and not; every
request carries a few passages in ``documents``; short answers). Records per request the
latency (to the last byte / ``[DONE]``), the time to the first content chunk for streams,
status and errors; per level p50/p95/p99, throughput (requests/s and generated tokens/s), the
server's RSS before and after (``/proc/<pid>/status``: VmRSS, VmHWM) and the load average
(the machine's cores may be shared). Finally, without the server running, the same requests
through ``RAGPipeline.ask`` in-process (sequential) as a no-HTTP baseline.

    python benchmarks/bench_server.py          # 1/4/16 clients x 4/2/1 requests each, < 10 min on 2 busy cores
    python benchmarks/bench_server.py --levels 1 4 16 --requests 4 2 1 --max-tokens 12 --passages 3 --threads 1

    python benchmarks/bench_server.py --in-process --levels 1 4 16 --max-tokens 12 --out X.json
        # no HTTP: n requests one by one vs together through the step scheduler, alternated

Writes ``benchmarks/results/server_load.json`` and ``server_load.png``. Needs the ``server``
extra, httpx and matplotlib. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

FACTS = [
    ("Eiffel Tower", "The Eiffel Tower in Paris was completed in 1889 and is 330 metres tall.",
     "When was the Eiffel Tower completed?"),
    ("Mount Everest", "Tenzing Norgay and Edmund Hillary first reached the summit of Mount Everest in 1953.",
     "Who first reached the summit of Mount Everest?"),
    ("Thames", "The River Thames flows through Oxford and London into the North Sea.",
     "Which sea does the Thames flow into?"),
    ("Banana", "India is the largest producer of bananas, which grow in tropical climates.",
     "Which country produces the most bananas?"),
    ("Boiling point", "At sea level, pure water boils at 100 degrees Celsius.",
     "At what temperature does water boil at sea level?"),
    ("Python", "Python is a programming language created by Guido van Rossum and released in 1991.",
     "Who created the Python programming language?"),
    ("Moon landing", "Apollo 11 landed on the Moon on 20 July 1969 with Neil Armstrong and Buzz Aldrin.",
     "When did Apollo 11 land on the Moon?"),
    ("Great Wall", "Most of the Great Wall of China that survives today was built during the Ming dynasty.",
     "During which dynasty was most of the Great Wall built?"),
]


SYSTEM = "Answer the question in one short sentence."


def make_request(i: int, n_passages: int, max_tokens: int) -> Dict[str, Any]:
    """Request ``i``: the question of fact ``i`` with its passage among ``n_passages - 1`` others."""
    gold = i % len(FACTS)
    idx = [gold] + [(gold + 1 + j) % len(FACTS) for j in range(n_passages - 1)]
    idx = idx[i % n_passages:] + idx[: i % n_passages]  # the gold passage moves around
    return {
        "model": "nbce-rag",
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": FACTS[gold][2]}],
        "documents": [{"title": FACTS[k][0], "text": FACTS[k][1]} for k in idx],
        "max_tokens": max_tokens,
        "stream": i % 2 == 0,
        **({"stream_options": {"include_usage": True}} if i % 2 == 0 else {}),
    }


def percentile(xs: List[float], q: float) -> Optional[float]:
    """Linear-interpolation percentile (numpy's default)."""
    if not xs:
        return None
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def proc_mem(pid: int) -> Dict[str, float]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(val.split()[0]) / 1024.0  # MiB
    return out


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def one_request(client, base: str, body: Dict[str, Any]) -> Dict[str, Any]:
    import httpx

    t0 = time.perf_counter()
    rec: Dict[str, Any] = {"stream": body["stream"], "ok": False}
    try:
        if body["stream"]:
            ttft = None
            text = []
            usage = None
            done = False
            async with client.stream("POST", base + "/v1/chat/completions", json=body) as r:
                rec["status"] = r.status_code
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        break
                    obj = json.loads(data)
                    if "error" in obj:
                        rec["error"] = obj["error"]["message"]
                        break
                    if obj.get("usage"):
                        usage = obj["usage"]
                    for ch in obj.get("choices", []):
                        piece = ch.get("delta", {}).get("content")
                        if piece:
                            if ttft is None:
                                ttft = time.perf_counter() - t0
                            text.append(piece)
            rec.update(ttft=ttft, text="".join(text),
                       completion_tokens=(usage or {}).get("completion_tokens"),
                       ok=rec.get("status") == 200 and done and "error" not in rec)
        else:
            r = await client.post(base + "/v1/chat/completions", json=body)
            rec["status"] = r.status_code
            obj = r.json()
            if r.status_code == 200:
                rec.update(text=obj["choices"][0]["message"]["content"],
                           completion_tokens=obj["usage"]["completion_tokens"], ok=True)
            else:
                rec["error"] = obj.get("error", {}).get("message", r.text)
    except (httpx.HTTPError, ValueError, KeyError) as e:
        rec["error"] = f"{type(e).__name__}: {e}"
    rec["latency"] = time.perf_counter() - t0
    return rec


async def run_level(base: str, concurrency: int, per_client: int, n_passages: int, max_tokens: int,
                    offset: int) -> Dict[str, Any]:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def worker(c: int) -> List[Dict[str, Any]]:
            recs = []
            for j in range(per_client):
                i = offset + c * per_client + j
                rec = await one_request(client, base, make_request(i, n_passages, max_tokens))
                rec["i"] = i
                recs.append(rec)
            return recs

        t0 = time.perf_counter()
        parts = await asyncio.gather(*(worker(c) for c in range(concurrency)))
        wall = time.perf_counter() - t0
    recs = [r for p in parts for r in p]
    lat = [r["latency"] for r in recs if r["ok"]]
    ttft = [r["ttft"] for r in recs if r["ok"] and r.get("ttft") is not None]
    toks = sum(r.get("completion_tokens") or 0 for r in recs if r["ok"])
    return {
        "concurrency": concurrency,
        "requests": len(recs),
        "errors": sum(not r["ok"] for r in recs),
        "error_samples": [r.get("error") or f"status {r.get('status')}" for r in recs if not r["ok"]][:5],
        "wall_s": wall,
        "throughput_rps": len(lat) / wall,
        "tokens_per_s": toks / wall,
        "latency_s": {f"p{q}": percentile(lat, q) for q in (50, 95, 99)} | {"mean": statistics.fmean(lat) if lat else None,
                                                                             "max": max(lat) if lat else None},
        "ttft_s": {f"p{q}": percentile(ttft, q) for q in (50, 95, 99)},
        "records": recs,
    }


def wait_ready(base: str, proc: subprocess.Popen, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not become ready")


def baseline(reqs: List[Dict[str, Any]], device: Optional[str], threads: int) -> Dict[str, Any]:
    """The same requests through RAGPipeline.ask in-process, sequentially (no HTTP, no queue)."""
    sys.path.insert(0, str(ROOT))
    import torch

    if threads:
        torch.set_num_threads(threads)
    from nbce_rag import RAGPipeline
    from nbce_rag.runtime import keep_freed_memory

    keep_freed_memory()  # as the server (the CLI) does

    rag = RAGPipeline.from_pretrained(device=device)
    def passages(b):
        return [f"{d['title']}\n{d['text']}" for d in b["documents"]]
    def ask(b):
        return rag.ask(b["messages"][-1]["content"], passages(b), max_new_tokens=b["max_tokens"], system_prompt=SYSTEM)

    ask(reqs[0])  # warm-up
    lat, texts = [], []
    for b in reqs:
        t0 = time.perf_counter()
        ans = ask(b)
        lat.append(time.perf_counter() - t0)
        texts.append(ans.text)
    return {"requests": len(reqs), "latency_s": {f"p{q}": percentile(lat, q) for q in (50, 95, 99)},
            "texts": texts}


def scheduler_ratio(levels: List[int], n_passages: int, max_tokens: int, repeats: int, threads: int,
                    device: Optional[str]) -> Dict[str, Any]:
    """In one process, no HTTP: ``n`` requests answered one after another (``RAGPipeline.ask``)
    vs all at once through the step scheduler (``RAGPipeline.batch``), alternated ``repeats``
    times so that the machine's load hits both alike. The ratio of the two is what batching
    buys; answers must be identical."""
    sys.path.insert(0, str(ROOT))
    import torch

    if threads:
        torch.set_num_threads(threads)
    from nbce_rag import RAGPipeline
    from nbce_rag.runtime import keep_freed_memory

    keep_freed_memory()  # as the server (the CLI) does

    rag = RAGPipeline.from_pretrained(device=device)

    def args(b):
        return b["messages"][-1]["content"], [f"{d['title']}\n{d['text']}" for d in b["documents"]]

    rag.ask("warm up", ["x"], max_new_tokens=2)
    out = []
    for n in levels:
        reqs = [args(make_request(i, n_passages, max_tokens)) for i in range(n)]
        seq_t, bat_t, same = [], [], True
        for _ in range(repeats):
            load0 = os.getloadavg()[0]
            t0 = time.perf_counter()
            one = [rag.ask(q, p, max_new_tokens=max_tokens, system_prompt=SYSTEM) for q, p in reqs]
            seq_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            many = rag.batch([q for q, _ in reqs], [p for _, p in reqs], max_new_tokens=max_tokens,
                             system_prompt=SYSTEM)
            bat_t.append(time.perf_counter() - t0)
            same = same and [a.token_ids for a in one] == [a.token_ids for a in many]
        toks = sum(a.completion_tokens for a in many)
        row = {"requests": n, "sequential_s": seq_t, "batched_s": bat_t, "same_tokens": same,
               "completion_tokens": toks, "speedup": statistics.fmean(seq_t) / statistics.fmean(bat_t),
               "loadavg_1m": [load0, os.getloadavg()[0]]}
        out.append(row)
        print(f"in-process, {n} requests x {max_tokens} tokens: sequential {statistics.fmean(seq_t):.1f} s, "
              f"batched {statistics.fmean(bat_t):.1f} s -> x{row['speedup']:.2f}, same tokens: {same}, "
              f"load {load0:.1f}", flush=True)
    return {"max_tokens": max_tokens, "passages": n_passages, "repeats": repeats, "levels": out}


def plot(res: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = res["levels"]
    xs = [lv["concurrency"] for lv in levels]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for q, style in (("p50", "o-"), ("p95", "s--"), ("p99", "^:")):
        a1.plot(xs, [lv["latency_s"][q] for lv in levels], style, label=f"latency {q}")
    a1.plot(xs, [lv["ttft_s"]["p50"] for lv in levels], "x-", label="first token p50 (streams)")
    if res.get("baseline"):
        a1.axhline(res["baseline"]["latency_s"]["p50"], color="grey", lw=1, label="RAGPipeline.ask p50 (no HTTP)")
    a1.set_xscale("log", base=2)
    a1.set_xticks(xs, [str(x) for x in xs])
    a1.set_xlabel("concurrent clients")
    a1.set_ylabel("seconds")
    a1.set_title("latency per request")
    a1.legend(fontsize=8)
    a1.grid(alpha=0.3)
    a2.bar([str(x) for x in xs], [lv["throughput_rps"] for lv in levels], color="tab:blue")
    for i, lv in enumerate(levels):
        a2.text(i, lv["throughput_rps"], f"{lv['throughput_rps']:.2f} req/s\n{lv['errors']} errors",
                ha="center", va="bottom", fontsize=8)
    a2.set_xlabel("concurrent clients")
    a2.set_ylabel("requests / s")
    a2.set_title("throughput (one model worker)")
    a2.set_ylim(0, max(lv["throughput_rps"] for lv in levels) * 1.3)
    m = res["memory_mib"]
    fig.suptitle(f"nbce-rag serve, {res['config']['model']}, {res['config']['passages']} passages, "
                 f"max_tokens {res['config']['max_tokens']} | RSS {m['before']['VmRSS']:.0f} -> "
                 f"{m['after']['VmRSS']:.0f} MiB | {res['machine']['cpus']} CPU cores", fontsize=9)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients per level")
    ap.add_argument("--requests", type=int, nargs="+", default=[4, 2, 1],
                    help="requests per client: one value for every level, or one per level (default 4 2 1: "
                    "4, 8 and 16 requests at 1, 4 and 16 clients)")
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--passages", type=int, default=3, help="documents per request (default 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server and the baseline (default 1)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None,
                    help="the server's --dtype (default: auto = bf16 on a CPU with bf16 units, else fp32; issue 28)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the in-process RAGPipeline baseline")
    ap.add_argument("--out", default=str(RESULTS / "server_load.json"))
    ap.add_argument("--in-process", action="store_true",
                    help="no server: n requests one by one vs together through the step scheduler "
                    "(RAGPipeline.batch), alternated --repeats times; writes --out")
    ap.add_argument("--repeats", type=int, default=2, help="A/B repeats of --in-process (default 2)")
    args = ap.parse_args(argv)
    if args.in_process:
        res = {"command": "python benchmarks/bench_server.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
               **scheduler_ratio(args.levels, args.passages, args.max_tokens, args.repeats, args.threads, args.device)}
        Path(args.out).write_text(json.dumps(res, indent=1))
        return 0

    import torch

    per_client = args.requests * len(args.levels) if len(args.requests) == 1 else args.requests
    if len(per_client) != len(args.levels):
        ap.error("--requests takes one value, or one per level")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "nbce_rag.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--device", args.device, "--max-queue", "64", "--timeout", "600", "--log-level", "warning",
           "--threads", str(args.threads)] + (["--dtype", args.dtype] if args.dtype else [])
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t_start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env)
    res: Dict[str, Any] = {
        "command": "python benchmarks/bench_server.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "server_command": " ".join(cmd[1:]),
        "config": {"model": "bundled SmolLM2-135M-Instruct", "levels": args.levels, "requests_per_client": per_client,
                   "max_tokens": args.max_tokens, "passages": args.passages, "device": args.device,
                   "torch_threads": args.threads, "system_prompt": SYSTEM,
                   "streaming": "even-numbered requests stream (stream_options.include_usage), odd ones do not"},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__},
    }
    try:
        wait_ready(base, proc, timeout=300)
        res["startup_s"] = time.perf_counter() - t_start
        import httpx

        for i in range(2):  # warm-up (first forward passes), not timed
            body = {**make_request(1000 + i, args.passages, args.max_tokens), "stream": False}
            body.pop("stream_options", None)
            httpx.post(base + "/v1/chat/completions", json=body, timeout=600).raise_for_status()
        mem_before = proc_mem(proc.pid)
        res["levels"] = []
        offset = 0
        for c, r in zip(args.levels, per_client):
            load0 = os.getloadavg()[0]
            lv = asyncio.run(run_level(base, c, r, args.passages, args.max_tokens, offset))
            offset += c * r
            lv["loadavg_1m"] = [load0, os.getloadavg()[0]]
            lv["rss_after_mib"] = proc_mem(proc.pid)["VmRSS"]
            res["levels"].append(lv)
            print(f"c={c:>2}: {lv['requests']} req, {lv['errors']} errors, p50 {lv['latency_s']['p50']:.3f} s, "
                  f"p95 {lv['latency_s']['p95']:.3f} s, p99 {lv['latency_s']['p99']:.3f} s, "
                  f"{lv['throughput_rps']:.2f} req/s, {lv['tokens_per_s']:.1f} tok/s, load {load0:.1f}", flush=True)
        mem_after = proc_mem(proc.pid)
        res["memory_mib"] = {"before": mem_before, "after": mem_after}
        res["health_after"] = httpx.get(base + "/health", timeout=5).json()
        # answers do not depend on the concurrency level (greedy decoding, one worker)
        by_i: Dict[int, str] = {}
        for lv in res["levels"]:
            for r in lv["records"]:
                by_i[r["i"]] = r.get("text")
        res["texts_by_request"] = {str(k): v for k, v in sorted(by_i.items())}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()
    if not args.no_baseline:
        n = min(4, len(res["texts_by_request"]))
        reqs = [make_request(i, args.passages, args.max_tokens) for i in range(n)]
        bl = baseline(reqs, args.device, args.threads)
        bl["same_text_as_server"] = all(bl["texts"][i] == res["texts_by_request"].get(str(i)) for i in range(n))
        res["baseline"] = bl
        print(f"RAGPipeline.ask (no HTTP, sequential): p50 {bl['latency_s']['p50']:.3f} s, "
              f"same answers as the server: {bl['same_text_as_server']}")
    res["total_s"] = time.perf_counter() - t_start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, out)
    plot(res, out.with_suffix(".png"))
    m = res["memory_mib"]
    print(f"RSS before {m['before']['VmRSS']:.0f} MiB, after {m['after']['VmRSS']:.0f} MiB, peak "
          f"{m['after']['VmHWM']:.0f} MiB; total {res['total_s']:.0f} s -> {out}")
    return 0 if all(lv["errors"] == 0 for lv in res["levels"]) else 1


if __name__ == "__main__":
    sys.exit(main())
