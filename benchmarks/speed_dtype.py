"""The dtype comparison of ``bench_speed.py --dtypes`` (issue 28): the runs, interleaved per
dtype; indexing throughput per encoder compute dtype; the markdown table and the plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

SPEED = str(Path(__file__).resolve().parent / "bench_speed.py")


def measure_index(args, n, make_passages) -> dict:
    """Indexing throughput: ``VectorIndex.build`` over ``n`` synthetic ~150-token passages (one
    chunk each) with the bundled encoder in ``--dtype`` (its compute dtype; vectors stay fp32),
    after a warm-up: chunks/s. (How close the bf16 vectors are: tests/test_dtype.py.)"""
    from nbce_rag import CoSENTEncoder, VectorIndex

    enc = CoSENTEncoder.from_pretrained(device=args.device, dtype=args.dtype)
    passages = make_passages(n, enc.tokenizer, seed=3)
    enc.encode(passages[:8], show_progress_bar=False)  # warm-up
    t0, c0 = time.perf_counter(), time.thread_time()
    index = VectorIndex.build(enc, passages, chunk_tokens=254, overlap=0, show_progress_bar=False)
    dt, dc = time.perf_counter() - t0, time.thread_time() - c0
    return {"method": "index", "n": n, "dtype": str(enc.dtype), "chunks": len(index), "seconds": dt,
            "chunks_per_s": len(index) / dt, "cpu_seconds": dc, "chunks_per_cpu_s": len(index) / dc, "peak_mem_mib": _peak_mem(), "load_avg": os.getloadavg()}


def run_dtypes(args, results, save) -> None:
    """For each method and n, one worker process per dtype, the dtypes one after the other
    (interleaved: load changes on a shared machine hit both)."""
    for method in args.methods.split(","):
        for n in map(int, (args.index_ns if method == "index" else args.ns).split(",")):
            for dt in args.dtypes.split(","):
                cmd = [sys.executable, SPEED, "--worker", "--method", method, "--worker-ns", str(n),
                       "--device", args.device, "--max-new-tokens", str(args.max_new_tokens),
                       "--batch-rows", str(args.batch_rows), "--threads", str(args.threads),
                       "--warm-repeats", str(args.warm_repeats), "--dtype", dt]
                p = subprocess.run(cmd, capture_output=True, text=True)
                got = [json.loads(l[7:]) for l in p.stdout.splitlines() if l.startswith("RESULT ")]
                if not got:
                    got = [{"method": method, "n": n, "error": p.stderr[-500:]}]
                for r in got:
                    r["asked_dtype"] = dt
                    r.setdefault("load_avg", os.getloadavg())
                    results[:] = [x for x in results if (x["method"], x["n"], x.get("asked_dtype")) != (method, n, dt)] + [r]
                    print(json.dumps({k: v for k, v in r.items() if k not in ("cold", "warm", "warm_q2", "disk")}), flush=True)
                save()


def _short(dtype: str) -> str:
    return {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(dtype, dtype)


def markdown_dtypes(results) -> str:
    """The dtype comparison: per n, TTFT cold / with the passage KV cache (another question over
    cached passages), decode ms/token, peak RSS and KV bytes per token, each dtype and the
    speed-up of the second over the first; then indexing chunks/s."""
    asked = list(dict.fromkeys(r.get("asked_dtype") for r in results if r.get("asked_dtype")))
    if len(asked) < 2:
        return ""
    a, b = asked[:2]
    by = {(r["method"], r["n"], r.get("asked_dtype")): r for r in results if "error" not in r}

    def t(x):
        return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"

    lines = []
    kv = sorted({n for (m, n, _) in by if m == "nbce_kv"})
    if kv:
        ra = next(by[k] for k in by if k[0] == "nbce_kv" and k[2] == a)
        rb = next(by[k] for k in by if k[0] == "nbce_kv" and k[2] == b)
        da, db = _short(ra["dtype"]), _short(rb["dtype"])
        lines += [f"`{a}` = {da}, `{b}` = {db}. Cells: {da} / {db} (speed-up of {db}). CPU = this thread's CPU time "
                  "(one torch thread; the work, without waiting for a core on the shared machine); wall = elapsed.", "",
                  "| n | TTFT cold, CPU | TTFT with KV cache (other q), CPU | decode ms/token cold, CPU | "
                  "decode ms/token cached, CPU | wall speed-ups: TTFT cold / cached / decode | peak RSS MiB | load avg |",
                  "|---:|---|---|---|---|---|---|---|"]
        ms = lambda v: f"{1000 * v:.0f}"  # noqa: E731
        for n in kv:
            x, y = by.get(("nbce_kv", n, a)), by.get(("nbce_kv", n, b))
            if x is None or y is None:
                continue

            def pair(run, key, fmt=t):
                fx, fy = x[run][key], y[run][key]
                return f"{fmt(fx)} / {fmt(fy)} ({fx / fy:.1f}x)"

            def wall(run, key):
                return f"{x[run][key] / y[run][key]:.1f}x"

            lines.append(f"| {n} | {pair('cold', 'ttft_cpu_s')} | {pair('warm_q2', 'ttft_cpu_s')} | "
                         f"{pair('cold', 'decode_cpu_s_per_token', ms)} | {pair('warm_q2', 'decode_cpu_s_per_token', ms)} | "
                         f"{wall('cold', 'ttft_s')} / {wall('warm_q2', 'ttft_s')} / {wall('cold', 'decode_s_per_token')} | "
                         f"{x['peak_mem_mib']:.0f} / {y['peak_mem_mib']:.0f} | "
                         f"{x['load_avg'][0]:.1f} / {y['load_avg'][0]:.1f} |")
        lines.append(f"\nPassage KV cache per cached token: RAM {ra['ram_bytes_per_token'] / 1024:.1f} / "
                     f"{rb['ram_bytes_per_token'] / 1024:.1f} KiB, disk {ra['disk_bytes_per_token'] / 1024:.1f} / "
                     f"{rb['disk_bytes_per_token'] / 1024:.1f} KiB ({da} / {db}); warm tokens identical to cold "
                     f"within each dtype: {all(r['warm_tokens_equal_cold'] for k, r in by.items() if k[0] == 'nbce_kv')}")
    ix = sorted({n for (m, n, _) in by if m == "index"})
    for n in ix:
        x, y = by.get(("index", n, a)), by.get(("index", n, b))
        if x and y:
            lines.append(f"\nIndexing {x['chunks']} chunks (~150 tokens) with the bundled encoder: "
                         f"{x['chunks_per_cpu_s']:.1f} chunks per CPU-second ({_short(x['dtype'])}) vs "
                         f"{y['chunks_per_cpu_s']:.1f} ({_short(y['dtype'])}): {y['chunks_per_cpu_s'] / x['chunks_per_cpu_s']:.1f}x "
                         f"(wall: {x['chunks_per_s']:.1f} vs {y['chunks_per_s']:.1f} chunks/s, "
                         f"{y['chunks_per_s'] / x['chunks_per_s']:.1f}x); load avg "
                         f"{x['load_avg'][0]:.1f} / {y['load_avg'][0]:.1f}")
    return "\n".join(lines) + "\n"


def style_axes(axes, titles) -> None:
    """The speed plots' panels: passages on a log2 x axis, a title each, a light grid."""
    for ax, t in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("passages (~150 tokens each)")
        ax.set_title(t)
        ax.grid(alpha=0.3)


def plot_dtypes(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for dt in dict.fromkeys(r.get("asked_dtype") for r in results if r.get("asked_dtype")):
        rs = sorted((r for r in results if r["method"] == "nbce_kv" and r.get("asked_dtype") == dt and "error" not in r),
                    key=lambda r: r["n"])
        if not rs:
            continue
        label = f"{dt} ({_short(rs[0]['dtype'])})"
        ns = [r["n"] for r in rs]
        axes[0].plot(ns, [r["cold"]["ttft_cpu_s"] for r in rs], "o-", label=f"{label} cold")
        axes[0].plot(ns, [r["warm_q2"]["ttft_cpu_s"] for r in rs], "s--", label=f"{label} KV cache")
        axes[1].plot(ns, [1000 * r["cold"]["decode_cpu_s_per_token"] for r in rs], "o-", label=f"{label} cold")
        axes[1].plot(ns, [1000 * r["warm_q2"]["decode_cpu_s_per_token"] for r in rs], "s--", label=f"{label} KV cache")
        axes[2].plot(ns, [r["peak_mem_mib"] for r in rs], "o-", label=label)
    style_axes(axes, ("time to first token (CPU s)", "decode CPU ms / token", "peak RSS (MiB)"))
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M on the CPU, 1 thread: fp32 vs the library's auto dtype")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _peak_mem() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)


def levers(args) -> dict:
    """The CPU levers of issue 28 on the bundled model, one thread, the issue's shapes (9 rows x
    180 tokens: a prefill, then one decode step over the 9 rows): fp32 and bf16 with the SDPA and
    the eager attention, and int8 dynamic quantisation of the linear layers (fp32 activations,
    ``torch.ao.quantization.quantize_dynamic``). Thread CPU time, median of ``--lever-repeats``
    runs each, the variants interleaved; then torch.profiler's top operators of a bf16 prefill and decode step."""
    import copy
    import statistics

    import torch

    from nbce_rag import NBCEDecoder

    torch.set_num_threads(args.threads or 1)
    rows, length = 9, 180
    base = NBCEDecoder.from_pretrained(device="cpu", dtype="float32", kv_cache=None)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, base.tokenizer.vocab_size - 100, (rows, length), generator=gen)
    nxt = torch.randint(100, base.tokenizer.vocab_size - 100, (rows, 1), generator=gen)

    def variant(dtype, attn):
        m = copy.deepcopy(base.model).to(dtype)
        m.config._attn_implementation = attn
        return m.eval()

    models = {"fp32 sdpa": variant(torch.float32, "sdpa"), "bf16 sdpa": variant(torch.bfloat16, "sdpa"),
              "bf16 eager": variant(torch.bfloat16, "eager"), "fp32 eager": variant(torch.float32, "eager")}
    models["int8 dynamic (fp32 act.)"] = torch.ao.quantization.quantize_dynamic(
        copy.deepcopy(base.model), {torch.nn.Linear}, dtype=torch.qint8)

    clock = time.thread_time  # CPU time of this thread (one torch thread): the work, not the wait for a core

    def once(m):
        with torch.inference_mode():
            t0 = clock()
            out = m(input_ids=ids, use_cache=True)
            t1 = clock()
            cache = out.past_key_values
            t2 = clock()
            m(input_ids=nxt, past_key_values=cache, use_cache=True)
            t3 = clock()
            return t1 - t0, t3 - t2, out.logits[:, -1].float()

    times = {k: ([], []) for k in models}
    ref = {}
    for _ in range(max(1, args.lever_repeats)):
        for k, m in models.items():
            p, d, logits = once(m)
            times[k][0].append(p)
            times[k][1].append(d)
            ref[k] = logits
    top1 = ref["fp32 sdpa"].argmax(-1)
    res = {}
    for k, (p, d) in times.items():
        res[k] = {"prefill_s": statistics.median(p), "decode_step_ms": 1000 * statistics.median(d),
                  "prefill_all": p, "decode_all_ms": [1000 * x for x in d],
                  "top1_agrees_with_fp32": float((ref[k].argmax(-1) == top1).float().mean()),
                  "max_abs_logit_diff_vs_fp32": float((ref[k] - ref["fp32 sdpa"]).abs().max())}
        print("LEVER", k, json.dumps({x: y for x, y in res[k].items() if not x.endswith("all") and not x.endswith("_ms_all")}),
              flush=True)
    from torch.profiler import ProfilerActivity, profile

    tables = {}
    for k in ("bf16 sdpa", "fp32 sdpa"):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            once(models[k])
        tables[k] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
        print(k, tables[k], flush=True)
    return {"rows": rows, "tokens": length, "threads": args.threads or 1, "repeats": args.lever_repeats,
            "load_avg": os.getloadavg(), "results": res, "profiler_top_ops": tables}


def compile_levers(args, make_passages) -> dict:
    """Issue 28's ``torch.compile`` lever: the decode step of the real ``generate`` path on the CPU,
    per dtype, with the dynamic cache (the default, ``compile=False``), the static cache run
    eagerly (``compile="static"``) and the static cache under ``torch.compile`` (``compile=True``,
    inductor's C++ kernels). n passages + the no-context row, EOS suppressed so every run decodes
    the same number of tokens; decode per token = (time(T tokens) - time(1 token)) / (T - 1),
    thread CPU time (one torch thread) and wall, median of ``--lever-repeats``, the variants
    interleaved after one warm-up each (the compile happens there and is reported apart)."""
    import statistics

    import torch

    from nbce_rag import NBCEDecoder

    torch.set_num_threads(args.threads or 1)
    n, T = int(args.ns.split(",")[-1]), max(2, args.max_new_tokens)
    decs = {dt: NBCEDecoder.from_pretrained(device="cpu", dtype=dt, kv_cache=None) for dt in ("float32", "bfloat16")}
    tok = decs["float32"].tokenizer
    passages = make_passages(n, tok)
    q = "What is the main subject of these passages?"
    eos = sorted({int(t) for t in [tok.eos_token_id, *(getattr(decs["float32"], "stop_token_ids", None) or [])]
                  if t is not None})
    variants = [(dt, c) for dt in decs for c in (False, "static", True)]

    def run(dt, c, tokens):
        t0, w0 = time.thread_time(), time.perf_counter()
        with torch.inference_mode():
            a = decs[dt].generate(q, passages, max_new_tokens=tokens, compile=c, suppress_tokens=eos)
        return time.thread_time() - t0, time.perf_counter() - w0, a

    warm, texts, rec = {}, {}, {v: {"cpu": [], "wall": []} for v in variants}
    for v in variants:
        cpu, wall, a = run(*v, T)
        warm[v] = {"first_call_cpu_s": cpu, "first_call_wall_s": wall}
        texts[v] = a.token_ids
        print("WARM", v, json.dumps(warm[v]), flush=True)
    for _ in range(max(1, args.lever_repeats)):
        for v in variants:
            c1, w1, _ = run(*v, 1)
            cT, wT, a = run(*v, T)
            assert len(a.token_ids) == T, (v, len(a.token_ids))
            rec[v]["cpu"].append((cT - c1) / (T - 1))
            rec[v]["wall"].append((wT - w1) / (T - 1))
    res = {}
    for (dt, c), r in rec.items():
        name = f"{_short('torch.' + dt)} {'dynamic' if c is False else ('static eager' if c == 'static' else 'compiled')}"
        res[name] = {"decode_ms_cpu": 1000 * statistics.median(r["cpu"]), "decode_ms_wall": 1000 * statistics.median(r["wall"]),
                     "all_ms_cpu": [1000 * x for x in r["cpu"]], **warm[(dt, c)],
                     "same_tokens_as_dynamic": texts[(dt, c)] == texts[(dt, False)]}
        print("LEVER", name, json.dumps({k: v for k, v in res[name].items() if not k.startswith("all")}), flush=True)
    return {"n_passages": n, "rows": n + 1, "new_tokens": T, "threads": args.threads or 1,
            "repeats": args.lever_repeats, "load_avg": os.getloadavg(), "results": res}
