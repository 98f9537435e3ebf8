"""Speed and memory of NBCE decoding vs concatenation and vs a naive one-row-at-a-time loop.

For n = 1, 2, 4, ..., 64 passages of ~150 tokens each (synthetic, deterministic text, so no
data set is needed), measures with the bundled SmolLM2-135M-Instruct:

* ``nbce``: NBCEDecoder.stream (one batched prefill, KV-cache decode, ``batch_rows`` micro-batches)
* ``nbce_unbatched``: the same rows, but ``batch_rows=n+1`` (no micro-batching) -- for memory
* ``naive``: one forward per row per step, each row with its own cache (what a plain loop does)
* ``concat``: ``model.generate`` on one prompt with all passages concatenated (greedy)
* ``nbce_kv``: NBCEDecoder with the passage KV cache (:mod:`nbce_rag.decoding.kvcache`), in one process
  per n: ``cold`` (empty cache: every passage is computed and stored, also to a disk store),
  ``warm`` (the same question again: tokens must be identical), ``warm_q2`` (another question
  over the same passages: the realistic case), ``disk`` (a fresh RAM cache over the disk store
  the cold run wrote, as after a restart); plus RAM and disk bytes per cached token.
* ``--fill N``: time :func:`nbce_rag.decoding.kvcache.fill` (what ``nbce-rag cache`` runs) on N passages

time to first token (prefill + first step), decode time per token, and peak RSS (CPU) or peak
CUDA memory. Each (method, n) runs in its own subprocess so peak memory is clean.

    python benchmarks/bench_speed.py                    # CPU, writes benchmarks/results/speed_cpu.{json,png}
    python benchmarks/bench_speed.py --device cuda      # GPU
    python benchmarks/bench_speed.py --profile --ns 32 --threads 1   # a decode step's split

``--dtypes float32,auto`` (issue 28): the LM's dtype compared in one run, interleaved (for each
method and n, one process per dtype, one after the other, so a busy machine slows both alike);
``auto`` is what the library picks (bf16 on a CPU with AMX / AVX512-BF16). Method ``index``
times indexing (the encoder's compute dtype: chunks/s through ``VectorIndex.build``).
Writes ``speed_{device}_dtype.{json,png,md}``::

    OMP_NUM_THREADS=1 python benchmarks/bench_speed.py --dtypes float32,auto --threads 1 \
        --methods nbce_kv,index --ns 1,8,32

``--profile`` runs one NBCE decode at each n under ``torch.profiler`` and splits a decode step
into forward (the batched decode forward of all rows), fusion (``nbce_step``: log-softmax,
the per-row nucleus, entropy, pooling; the nucleus is also reported alone), attribution,
sampling (the processors and the pick) and bookkeeping (the rest of the step: detokenising,
stop strings, events). It also times one plain padded forward of the same rows (the decode
step's own forward shapes, without NBCE) for the regression guard "decode step within 1.3× of
one plain forward". Writes ``benchmarks/results/profile_{device}.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from speed_dtype import (compile_levers, levers, markdown_dtypes, measure_index, plot_dtypes,  # noqa: E402
                         run_dtypes, style_axes)
WORDS = ("river city tower museum bridge harbour engine garden market castle library station "
         "theatre festival mountain valley forest island desert canal palace factory school "
         "hospital railway airport stadium cathedral temple village province republic empire").split()


def make_passages(n: int, tokenizer, target_tokens: int = 150, seed: int = 0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = []
        while True:
            w = rng.sample(WORDS, 6)
            words.append(f"The {w[0]} of {w[1]} was built near the {w[2]} in {1500 + rng.randrange(500)}, "
                         f"after the {w[3]} and the {w[4]} joined the {w[5]}.")
            text = f"Record {i}. " + " ".join(words)
            if len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= target_tokens:
                break
        out.append(text)
    return out


QUESTION = "Describe in detail what was built, where and when."
QUESTION2 = "Which castle is mentioned, and in which year?"


def _peak_mem(device):
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)


def worker(args) -> list:
    """Load the model once and measure ``method`` at each n of ``--worker-ns``. On CUDA peak
    memory is reset per n (exact); on CPU the peak RSS only grows, so main() gives every
    (method, n) its own process there."""
    import torch

    from nbce_rag import NBCEDecoder

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.no_keep_freed_memory:
        from nbce_rag.runtime import keep_freed_memory

        keep_freed_memory()  # as the CLI does (nbce_rag/runtime.py)
    torch.manual_seed(0)
    if args.method == "index":
        out = [measure_index(args, n, make_passages) for n in map(int, args.worker_ns.split(","))]
        for r in out:
            print("RESULT " + json.dumps(r), flush=True)
        return out
    # no passage KV cache except where measured (nbce_kv): a warm-up must not warm the timed run
    dec = NBCEDecoder.from_pretrained(device=args.device, dtype=args.dtype, kv_cache=None)
    out = []
    for n in map(int, args.worker_ns.split(",")):
        r = measure(dec, args, n)
        print("RESULT " + json.dumps(r), flush=True)
        out.append(r)
    return out


def measure(dec, args, n) -> dict:
    import torch

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base_mem = _peak_mem(args.device)
    passages = make_passages(n, dec.tokenizer)
    N = args.max_new_tokens
    res = {"method": args.method, "n": n, "max_new_tokens": N, "dtype": str(next(dec.model.parameters()).dtype),
           "keep_freed_memory": not args.no_keep_freed_memory}

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if args.method in ("nbce", "nbce_unbatched"):
        rows = args.batch_rows if args.method == "nbce" else n + 1
        # warm-up (kernels, allocator), excluded; on a GPU at the same shapes, it is cheap there
        dec.generate(QUESTION, passages if cuda else passages[:1], max_new_tokens=2, batch_rows=rows)
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        times = []
        ntok = 0
        for ev in dec.stream(QUESTION, passages, max_new_tokens=N, batch_rows=rows):
            if ev.token_id is not None:
                sync()
                times.append(time.perf_counter() - t0)
                ntok += 1
        res.update(batch_rows=rows, tokens=ntok)
    elif args.method == "naive":
        if cuda:
            naive_nbce(dec, passages, 2, sync)
            torch.cuda.reset_peak_memory_stats()
        times, ntok = naive_nbce(dec, passages, N, sync)
        res.update(tokens=ntok)
    elif args.method == "concat":
        joined = "\n\n".join(passages)
        prompt = dec.build_prompt(QUESTION, joined)
        ids = dec.tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(dec.device)
        if ids.input_ids.shape[1] + N > dec.context_window:
            res.update(error=f"prompt of {ids.input_ids.shape[1]} tokens exceeds the {dec.context_window}-token window")
            return res
        from transformers import StoppingCriteria, StoppingCriteriaList

        class Clock(StoppingCriteria):
            """Called once per generated token: a timestamp per token from one generate() run."""

            def __init__(self):
                self.times = []

            def __call__(self, input_ids, scores, **kw):
                sync()
                self.times.append(time.perf_counter() - t0)
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        with torch.inference_mode():
            warm = ids if cuda else dec.tokenizer("hi", return_tensors="pt").to(dec.device)
            dec.model.generate(**warm, max_new_tokens=2, do_sample=False, pad_token_id=dec.tokenizer.pad_token_id)
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            clock = Clock()
            t0 = time.perf_counter()
            out = dec.model.generate(**ids, max_new_tokens=N, min_new_tokens=N, do_sample=False,
                                     pad_token_id=dec.tokenizer.pad_token_id,
                                     stopping_criteria=StoppingCriteriaList([clock]))
        ntok = out.shape[1] - ids.input_ids.shape[1]
        times = clock.times
        res.update(tokens=ntok, prompt_tokens=int(ids.input_ids.shape[1]))
    elif args.method == "nbce_kv":
        return measure_kv(dec, args, n, passages, res)
    else:
        raise SystemExit(f"unknown method {args.method}")
    res["ttft_s"] = times[0]
    res["decode_s_per_token"] = (times[-1] - times[0]) / max(1, len(times) - 1) if len(times) > 1 else None
    res["peak_mem_mib"] = _peak_mem(args.device)
    res["base_mem_mib"] = base_mem
    return res


def _timed_stream(dec, question, passages, N, sync):
    """Wall times, and this thread's CPU times (``time.thread_time``: with one torch thread the
    compute runs in the calling thread, so on a shared, oversubscribed CPU this is the work done,
    without the time spent waiting for a core)."""
    t0, c0 = time.perf_counter(), time.thread_time()
    times, cpu, answer = [], [], None
    for ev in dec.stream(question, passages, max_new_tokens=N):
        if ev.token_id is not None:
            sync()
            times.append(time.perf_counter() - t0)
            cpu.append(time.thread_time() - c0)
        answer = ev.answer or answer
    steps = max(1, len(times) - 1)
    return {"ttft_s": times[0], "decode_s_per_token": (times[-1] - times[0]) / steps,
            "ttft_cpu_s": cpu[0], "decode_cpu_s_per_token": (cpu[-1] - cpu[0]) / steps,
            "tokens": len(times), "cached_tokens": answer.cached_tokens, "prompt_tokens": answer.prompt_tokens}, answer


def measure_kv(dec, args, n, passages, res) -> dict:
    """Cold / warm / another question / from disk, in one process (ratios measured together)."""
    import shutil
    import tempfile

    from nbce_rag.decoding.kvcache import PassageKVCache

    sync = (lambda: __import__("torch").cuda.synchronize()) if args.device == "cuda" else (lambda: None)
    N = args.max_new_tokens
    tmp = tempfile.mkdtemp(prefix="kvbench-")
    try:
        dec.kv_cache = PassageKVCache(max_bytes="64GiB", disk=tmp)
        dec.generate(QUESTION, make_passages(1, dec.tokenizer, seed=99), max_new_tokens=2)  # warm-up, other text
        res["cold"], a = _timed_stream(dec, QUESTION, passages, N, sync)
        res["warm"], b = _timed_stream(dec, QUESTION, passages, N, sync)
        res["warm_tokens_equal_cold"] = a.token_ids == b.token_ids
        runs = [_timed_stream(dec, QUESTION2, passages, N, sync)[0] for _ in range(max(1, args.warm_repeats))]
        res["warm_q2"] = sorted(runs, key=lambda r: r["ttft_s"])[len(runs) // 2]  # the median run
        res["warm_q2_ttft_all"] = [r["ttft_s"] for r in runs]
        cache = dec.kv_cache
        tokens = sum(len(e.ids) for e in cache._ram.entries.values())
        res["ram_bytes"] = cache.nbytes
        res["ram_bytes_per_token"] = cache.nbytes / max(1, tokens)
        res["disk_bytes"] = cache.disk.nbytes()
        res["disk_bytes_per_token"] = res["disk_bytes"] / max(1, tokens)
        res["cached_positions"] = tokens
        dec.kv_cache = PassageKVCache(max_bytes="64GiB", disk=tmp)  # RAM empty: as after a restart
        res["disk"], c = _timed_stream(dec, QUESTION2, passages, N, sync)
        res["ttft_s"] = res["warm_q2"]["ttft_s"]
        res["decode_s_per_token"] = res["warm_q2"]["decode_s_per_token"]
        res["ttft_cold_over_warm_q2"] = res["cold"]["ttft_s"] / res["warm_q2"]["ttft_s"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["peak_mem_mib"] = _peak_mem(args.device)
    res["load_avg"] = os.getloadavg()
    return res


def measure_fill(args) -> dict:
    """Time kvcache.fill() (what ``nbce-rag cache`` runs) on --fill passages, written to a disk store."""
    import shutil
    import tempfile

    import torch

    from nbce_rag import NBCEDecoder
    from nbce_rag.decoding.kvcache import PassageKVCache, fill

    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="kvfill-")
    try:
        dec = NBCEDecoder.from_pretrained(device=args.device, dtype=args.dtype,
                                          kv_cache=PassageKVCache(max_bytes=0, disk=tmp))
        passages = make_passages(args.fill, dec.tokenizer, seed=7)
        fill(dec, make_passages(1, dec.tokenizer, seed=99))  # warm-up
        before = dec.kv_cache.disk.nbytes()
        t0 = time.perf_counter()
        st = fill(dec, passages, batch_passages=args.batch_rows)
        dt = time.perf_counter() - t0
        disk = dec.kv_cache.disk.nbytes() - before
        ptoks = sum(len(dec.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in passages)
        return {"method": "fill", "n": args.fill, "fill_s": dt, "s_per_passage": dt / args.fill,
                "est_s_per_1000": 1000 * dt / args.fill, "stored": st.stored, "cached_positions": st.prompt_tokens,
                "passage_tokens": ptoks, "disk_bytes": disk, "disk_bytes_per_passage_token": disk / ptoks,
                "load_avg": os.getloadavg(), "dtype": str(next(dec.model.parameters()).dtype)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def naive_nbce(dec, passages, N, sync):
    """One forward per row per step; each row keeps its own cache. Same math (nbce_step)."""
    import torch
    from transformers import DynamicCache

    from nbce_rag.decoding.nbce import attribute, get_pooling, nbce_step

    cfg = dec.config
    prompts = [dec.build_prompt(QUESTION, None)] + [dec.build_prompt(QUESTION, p) for p in passages]
    pooling = get_pooling(cfg.pooling)
    kw = dec._cache_kw
    t0 = time.perf_counter()
    times = []
    with torch.inference_mode():
        caches, logits = [], []
        for p in prompts:
            ids = dec.tokenizer(p, add_special_tokens=False, return_tensors="pt").input_ids.to(dec.device)
            out = dec.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: DynamicCache()})
            caches.append(getattr(out, "cache", None) or out.past_key_values)
            logits.append(out.logits[0, -1].float())
        prev = None
        for step in range(N):
            st = nbce_step(torch.stack(logits), beta=cfg.beta, eta=cfg.eta, top_p=cfg.nbce_top_p, pooling=pooling, prev=prev)
            tok = int(torch.argmax(st.logits))
            prev = attribute(st, tok)
            sync()
            times.append(time.perf_counter() - t0)
            if tok in dec._eos_ids or step + 1 == N:
                break
            x = torch.tensor([[tok]], device=dec.device)
            for r in range(len(prompts)):
                out = dec.model(input_ids=x, use_cache=True, **{kw: caches[r]})
                caches[r] = getattr(out, "cache", None) or out.past_key_values
                logits[r] = out.logits[0, -1].float()
    return times, len(times)


def profile(args) -> dict:
    """A decode step's split (see the module docstring). The decoder's own functions are
    wrapped here (not edited) with a timer and a torch.profiler ``record_function`` label. The
    split is timed in a run without the profiler (its per-op recording inflates the many small
    ops of a forward); a second run under torch.profiler gives the top operators of each part."""
    import collections
    import copy
    import statistics

    import torch
    from torch.profiler import ProfilerActivity, record_function

    import nbce_rag.decoding.decoder as decoder_mod
    import nbce_rag.decoding.nbce as nbce_mod
    import nbce_rag.decoding.sampling as sampling_mod
    from nbce_rag import NBCEDecoder

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    dec = NBCEDecoder.from_pretrained(device=args.device, dtype=args.dtype)
    spent = collections.defaultdict(list)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def labelled(name, fn):
        def wrapper(*a, **kw):
            with record_function(name):
                t0 = time.perf_counter()
                out = fn(*a, **kw)
                sync()
                spent[name].append(time.perf_counter() - t0)
                return out
        return wrapper

    patches = [
        (decoder_mod.NBCEDecoder, "_decode_step", "forward"),
        (decoder_mod, "nbce_step", "fusion"),
        (nbce_mod, "top_p_truncate", "fusion.nucleus"),
        (decoder_mod, "attribute", "attribution"),
        (sampling_mod.Sampler, "__call__", "sampling"),
    ]
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patches]
    for obj, attr, label in patches:
        setattr(obj, attr, labelled(label, getattr(obj, attr)))

    def decode(prep, cfg, prefilled, prof=None):
        """Per decode step wall times (the prefill, shared, and the first token excluded)."""
        spent.clear()
        steps = []
        it = iter(dec._run(prep, cfg, prefilled))
        next(it)
        spent.clear()  # the fusion and sampling of the first token
        if prof is not None:
            prof.start()
        t0 = time.perf_counter()
        for ev in it:
            if ev.token_id is None:
                break
            t1 = time.perf_counter()
            steps.append(t1 - t0)
            t0 = t1
        if prof is not None:
            prof.stop()
        return steps

    results = []
    try:
        for n in map(int, args.ns.split(",")):
            passages = make_passages(n, dec.tokenizer)
            dec.generate(QUESTION, passages[:1], max_new_tokens=2)  # warm-up
            # one prefill shared by the timed decode, the plain forward and the profiled decode
            cfg = dec.config.update(max_new_tokens=args.max_new_tokens)
            prep = dec._prepare(QUESTION, dec._check_passages(passages), cfg)
            with torch.inference_mode():
                groups, logits0, inverse = dec._prefill_rows(prep, cfg)

            def fresh():
                return ([decoder_mod.Group(g.rows, copy.deepcopy(g.cache), g.mask.clone(), g.last_pos.clone())
                         for g in groups], logits0.clone(), inverse)

            # the nucleus of these rows' first logits: the full sort (before) vs the fast path (now)
            lp = nbce_mod.log_softmax(logits0)
            t0 = time.perf_counter()
            nbce_mod.top_p_sorted(lp, cfg.nbce_top_p)
            nucleus_sort = 1000 * (time.perf_counter() - t0)
            t0 = time.perf_counter()
            saved[2][2](lp, cfg.nbce_top_p)  # the unwrapped top_p_truncate
            nucleus_fast = 1000 * (time.perf_counter() - t0)
            steps = decode(prep, cfg, fresh())
            per = {k: 1000 * statistics.mean(v) for k, v in spent.items() if v}
            step_ms = 1000 * statistics.mean(steps)
            known = sum(per.get(k, 0.0) for k in ("forward", "fusion", "attribution", "sampling"))
            plain = plain_forward_ms(dec, fresh()[0], sync)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            prof = torch.profiler.profile(activities=activities)
            decode(prep, cfg.update(max_new_tokens=min(4, args.max_new_tokens)), fresh(), prof)
            table = prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=25)
            r = {"n": n, "rows": n + 1, "decode_steps": len(steps), "step_ms": step_ms,
                 "forward_ms": per.get("forward"), "fusion_ms": per.get("fusion"),
                 "nucleus_ms": per.get("fusion.nucleus"), "attribution_ms": per.get("attribution"),
                 "sampling_ms": per.get("sampling"), "bookkeeping_ms": step_ms - known,
                 "plain_forward_ms": plain, "step_over_plain_forward": step_ms / plain,
                 "first_step_nucleus_full_sort_ms": nucleus_sort, "first_step_nucleus_fast_ms": nucleus_fast,
                 "load_avg": os.getloadavg(), "profiler_top_ops": table}
            print("PROFILE " + json.dumps({k: v for k, v in r.items() if k != "profiler_top_ops"}), flush=True)
            print(table, flush=True)
            results.append(r)
    finally:
        for obj, attr, fn in saved:
            setattr(obj, attr, fn)
    return {"machine": machine(args.device), "device": args.device, "threads": args.threads,
            "command": " ".join(sys.argv), "results": results}


def plain_forward_ms(dec, groups, sync, repeats: int = 5) -> float:
    """Median time of one plain padded decode forward of the same rows (one new token per row
    on top of their prefilled cache, one model call): what a decode step costs without NBCE."""
    import copy
    import statistics

    import torch

    if len(groups) != 1:
        raise SystemExit("plain forward: more than one decode group; raise decode_rows")
    g = groups[0]
    n = len(g.rows)
    ids = torch.full((n, 1), 42, dtype=torch.long, device=dec.device)
    mask = torch.cat([g.mask, torch.ones((n, 1), dtype=g.mask.dtype, device=g.mask.device)], -1)
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            cache = copy.deepcopy(g.cache)
            sync()
            t0 = time.perf_counter()
            dec.model(input_ids=ids, attention_mask=mask, position_ids=g.last_pos + 1, use_cache=True,
                      **{dec._cache_kw: cache})
            sync()
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def machine(device) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} (CPU)"


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for method in ("nbce", "nbce_unbatched", "naive", "concat", "nbce_kv"):
        rs = sorted((r for r in results if r["method"] == method and "error" not in r), key=lambda r: r["n"])
        if not rs:
            continue
        ns = [r["n"] for r in rs]
        axes[0].plot(ns, [r["ttft_s"] for r in rs], "o-", label=method)
        axes[1].plot(ns, [1000 * (r["decode_s_per_token"] or float("nan")) for r in rs], "o-", label=method)
        axes[2].plot(ns, [r["peak_mem_mib"] for r in rs], "o-", label=method)
    style_axes(axes, ("time to first token (s)", "decode ms / token", "peak memory (MiB)"))
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(results) -> str:
    """One row per n: time to first token, decode ms/token and peak memory of each method."""
    methods = [m for m in ("nbce", "nbce_unbatched", "concat", "naive") if any(r["method"] == m for r in results)]
    if not methods:
        return ""
    by = {(r["method"], r["n"]): r for r in results}
    ns = sorted({r["n"] for r in results})
    head = "| n | " + " | ".join(f"{m}: TTFT / decode / peak" for m in methods) + " |"
    lines = [head, "|---:|" + "---:|" * len(methods)]
    for n in ns:
        cells = []
        for m in methods:
            r = by.get((m, n))
            if r is None:
                cells.append("–")
            elif "error" in r:
                cells.append("does not fit" if "exceeds" in r["error"] else "failed")
            else:
                ttft = r["ttft_s"]
                ttft_s = f"{ttft * 1000:.0f} ms" if ttft < 1 else f"{ttft:.1f} s"
                cells.append(f"{ttft_s} / {1000 * r['decode_s_per_token']:.0f} ms / {r['peak_mem_mib']:.0f} MiB")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_kv(results) -> str:
    """The passage KV cache: TTFT cold / warm (same question) / warm (another question) / from
    disk, decode ms/token warm, and the cold/warm ratio, one row per n."""
    rs = sorted((r for r in results if r["method"] == "nbce_kv" and "error" not in r), key=lambda r: r["n"])
    if not rs:
        return ""

    def t(x):
        return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.1f} s"

    lines = ["| n | TTFT cold | TTFT warm (same q) | TTFT warm (other q) | TTFT from disk | cold / warm | "
             "decode ms/token cold / warm | prompt tokens reused | load avg |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rs:
        w = r["warm_q2"]
        lines.append(f"| {r['n']} | {t(r['cold']['ttft_s'])} | {t(r['warm']['ttft_s'])} | {t(w['ttft_s'])} | "
                     f"{t(r['disk']['ttft_s'])} | {r['ttft_cold_over_warm_q2']:.1f}x | "
                     f"{1000 * r['cold']['decode_s_per_token']:.0f} / {1000 * w['decode_s_per_token']:.0f} | "
                     f"{w['cached_tokens']}/{w['prompt_tokens']} | {r['load_avg'][0]:.1f} |")
    r = rs[-1]
    lines.append(f"\nRAM {r['ram_bytes_per_token'] / 1024:.1f} KiB and disk {r['disk_bytes_per_token'] / 1024:.1f} KiB "
                 f"per cached token ({r['dtype']}); warm tokens identical to cold: "
                 f"{all(x['warm_tokens_equal_cold'] for x in rs)}")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="model dtype (default: auto, what the library picks)")
    ap.add_argument("--dtypes", default=None, metavar="DT,DT",
                    help="compare dtypes in one run, interleaved (e.g. float32,auto): speed_{device}_dtype.json")
    ap.add_argument("--ns", default="1,2,4,8,16,32,64")
    ap.add_argument("--methods", default="nbce,nbce_unbatched,naive,concat")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--batch-rows", type=int, default=16)
    ap.add_argument("--naive-max-n", type=int, default=32, help="skip the slow naive loop above this n")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    ap.add_argument("--no-keep-freed-memory", action="store_true",
                    help="leave glibc's malloc as it is (by default the runs recycle freed memory as the CLI does: "
                    "nbce_rag/runtime.py)")
    ap.add_argument("--concat-max-n", type=int, default=64)
    ap.add_argument("--index-ns", default="128", help="--dtypes: passages indexed by method index")
    ap.add_argument("--levers", action="store_true",
                    help="time the CPU levers (fp32/bf16, SDPA/eager, int8 dynamic) on a 9x180 prefill + a decode step")
    ap.add_argument("--lever-repeats", type=int, default=5)
    ap.add_argument("--compile-levers", action="store_true",
                    help="time the decode step of generate() per dtype: dynamic cache, static cache eager, "
                    "static cache under torch.compile (n = the last of --ns, --max-new-tokens tokens)")
    ap.add_argument("--unbatched-ns", default="8,32,64", help="ns for the no-micro-batching memory comparison")
    ap.add_argument("--warm-repeats", type=int, default=1, metavar="R",
                    help="nbce_kv: repeat the warm (other question) run R times, report the median (noisy machines)")
    ap.add_argument("--fill", type=int, default=0, metavar="N",
                    help="only time filling the passage KV cache with N passages (kvcache.fill), print JSON")
    ap.add_argument("--out", default=None)
    ap.add_argument("--merge", action="store_true", help="keep the results already in --out, replacing re-measured ones")
    ap.add_argument("--table-only", action="store_true", help="only rewrite the markdown table and plot from --out")
    ap.add_argument("--profile", action="store_true",
                    help="split a decode step (forward / fusion / attribution / sampling / bookkeeping) with torch.profiler")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--worker-ns", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.fill:
        r = measure_fill(args)
        r.update(machine=machine(args.device), threads=args.threads, command=" ".join(sys.argv))
        print(json.dumps(r, indent=2))
        if args.out:
            Path(args.out).write_text(json.dumps(r, indent=2))
        return
    if args.worker:
        worker(args)
        return
    def write(res: dict, name: str) -> None:  # one measurement's JSON: --out, else results/NAME
        path = Path(args.out or HERE / "results" / name)
        path.write_text(json.dumps(res, indent=2))
        print(f"wrote {path}")

    if args.levers:
        write(dict(levers(args), machine=machine(args.device), command=" ".join(sys.argv)), "cpu_levers.json")
        return
    if args.compile_levers:
        write(dict(compile_levers(args, make_passages), machine=machine(args.device), command=" ".join(sys.argv)),
              "cpu_compile.json")
        return
    if args.profile:
        write(profile(args), f"profile_{args.device}.json")
        return
    out = Path(args.out or HERE / "results" / f"speed_{args.device}{'_dtype' if args.dtypes else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.table_only and args.dtypes:
        results = json.loads(out.read_text())["results"]
        plot_dtypes(results, out.with_suffix(".png"))
        out.with_suffix(".md").write_text(markdown_dtypes(results))
        print(markdown_dtypes(results))
        return
    if args.table_only:
        results = json.loads(out.read_text())["results"]
        plot(results, out.with_suffix(".png"))
        out.with_suffix(".md").write_text(markdown(results) + "\n" + markdown_kv(results))
        print(markdown(results) + "\n" + markdown_kv(results))
        return
    results = []
    if args.merge and out.exists():
        results = json.loads(out.read_text())["results"]

    def save():
        out.write_text(json.dumps({"machine": machine(args.device), "device": args.device, "threads": args.threads,
                                   "command": " ".join(sys.argv), "results": results}, indent=2))

    if args.dtypes:
        run_dtypes(args, results, save)
        plot_dtypes(results, out.with_suffix(".png"))
        out.with_suffix(".md").write_text(markdown_dtypes(results))
        print(markdown_dtypes(results))
        print(f"wrote {out}, {out.with_suffix('.png')} and {out.with_suffix('.md')}")
        return
    for method in args.methods.split(","):
        ns = [n for n in map(int, args.ns.split(","))
              if not ((method == "naive" and n > args.naive_max_n) or (method == "concat" and n > args.concat_max_n)
                      or (method == "nbce_unbatched" and str(n) not in args.unbatched_ns.split(",")))]
        # CUDA: one process per method (peak memory resets per n); CPU: one per (method, n)
        batches = [ns] if args.device == "cuda" else [[n] for n in ns]
        for batch in batches:
            if not batch:
                continue
            cmd = [sys.executable, __file__, "--worker", "--method", method, "--worker-ns", ",".join(map(str, batch)),
                   "--device", args.device, "--max-new-tokens", str(args.max_new_tokens),
                   "--batch-rows", str(args.batch_rows), "--threads", str(args.threads),
                   "--warm-repeats", str(args.warm_repeats)]
            if args.no_keep_freed_memory:
                cmd.append("--no-keep-freed-memory")
            if args.dtype:
                cmd += ["--dtype", args.dtype]
            p = subprocess.run(cmd, capture_output=True, text=True)
            got = [json.loads(l[7:]) for l in p.stdout.splitlines() if l.startswith("RESULT ")]
            done = {r["n"] for r in got}
            got += [{"method": method, "n": n, "error": p.stderr[-500:]} for n in batch if n not in done]
            for r in got:
                results = [x for x in results if (x["method"], x["n"]) != (r["method"], r["n"])] + [r]
                print(json.dumps(r), flush=True)
            save()
    plot(results, out.with_suffix(".png"))
    out.with_suffix(".md").write_text(markdown(results) + "\n" + markdown_kv(results))
    print(markdown_kv(results))
    print(f"wrote {out}, {out.with_suffix('.png')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
