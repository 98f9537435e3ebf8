"""Retriever benchmarks: CoSENT fine-tuning (STS-B, SciFact), encode throughput, search latency.

Usage (from the repository root; data defaults to ../shared/data)::

    python benchmarks/bench_encoder.py stsb     [--data DIR] [--model-out /tmp/nbce_bench/stsb_model]
    python benchmarks/bench_encoder.py scifact  [--data DIR] [--model-out /tmp/nbce_bench/scifact_model]
                                                [--epochs 1] [--max-train-pairs N] [--device cuda]
                                                [--sweep benchmarks/scifact_sweep.json --final-top 3]
    python benchmarks/bench_encoder.py throughput [--n 2000]
    python benchmarks/bench_encoder.py latency  [--sizes 10000 100000 1000000]
    python benchmarks/bench_encoder.py plot

Each writes ``benchmarks/results/<name>.json``; ``plot`` draws ``benchmarks/results/*.png``.
Data sets are never copied into the repository; a missing data folder ends the run with a
message and exit status 0. No model is downloaded (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_DATA = (ROOT / ".." / "shared" / "data").resolve()

import numpy as np  # noqa: E402

logger = logging.getLogger("bench_encoder")


def machine() -> Dict[str, Any]:
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else False,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_avg_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def write_result(name: str, obj: Dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    obj = {**obj, "machine": machine(), "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(obj, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def need(path: Path, what: str) -> bool:
    if not path.exists():
        print(f"{what} not found at {path}; pass --data DIR (skipping this benchmark)")
        return False
    return True


# --------------------------------------------------------------------------- STS-B


def bench_stsb(args: argparse.Namespace) -> int:
    from nbce_rag.retrieval.readers import read_stsb
    from nbce_rag.retrieval.encoder import CoSENTEncoder

    d = Path(args.data) / "stsb"
    if not need(d / "sts-train.csv", "STS-B"):
        return 0
    train, dev, test = (read_stsb(d / f"sts-{s}.csv") for s in ("train", "dev", "test"))
    if args.max_train_pairs:
        train = train[: args.max_train_pairs]
    enc = CoSENTEncoder.from_pretrained()
    before = enc.evaluate(test)
    print(f"STS-B test before: {before}")
    opts = {}
    if args.epochs:
        opts["epochs"] = args.epochs
    report = enc.fit(train, dev, **opts)
    after = enc.evaluate(test)
    print(f"STS-B test after: {after}  ({report['train_seconds'] / 60:.1f} min)")
    if args.model_out:
        enc.save_pretrained(args.model_out)
    write_result(
        "stsb" if not opts and not args.max_train_pairs else "stsb_custom",
        {
            "benchmark": "STS-B test Spearman x100, bundled all-MiniLM-L6-v2 before vs after CoSENT fine-tuning on STS-B train",
            "n_train": len(train),
            "n_dev": len(dev),
            "n_test": len(test),
            "test_before": before,
            "test_after": after,
            "fit_report": report,
            "model_out": args.model_out,
        },
    )
    return 0


# --------------------------------------------------------------------------- SciFact


def retrieval_metrics(index, queries: Dict[str, str], qrels: Dict[str, Dict[str, int]], *, chunk_k: int = 400) -> Dict[str, Any]:
    """nDCG@10, recall@10 and recall@100 over judged queries; a document scores the best
    cosine of its chunks (MaxP). Gains are the qrels grades, log2 discount (as BEIR)."""
    qids = [q for q in sorted(qrels) if q in queries and any(g > 0 for g in qrels[q].values())]
    t0 = time.perf_counter()
    all_hits = index.search_many([queries[q] for q in qids], k=chunk_k, show_progress_bar=False)
    search_s = time.perf_counter() - t0
    ndcg, r10, r100, docs_seen = [], [], [], []
    for q, hits in zip(qids, all_hits):
        best: Dict[str, float] = {}
        for h in hits:
            d = h.metadata.get("doc_id", h.id.split("#")[0])
            if d not in best:
                best[d] = h.score
        ranked = sorted(best, key=lambda d: -best[d])[:100]
        docs_seen.append(len(ranked))
        rel = {d: g for d, g in qrels[q].items() if g > 0}
        dcg = sum(rel.get(d, 0) / np.log2(i + 2) for i, d in enumerate(ranked[:10]))
        ideal = sorted(rel.values(), reverse=True)[:10]
        idcg = sum(g / np.log2(i + 2) for i, g in enumerate(ideal))
        ndcg.append(dcg / idcg)
        r10.append(len(set(ranked[:10]) & set(rel)) / len(rel))
        r100.append(len(set(ranked[:100]) & set(rel)) / len(rel))
    return {
        "ndcg@10": 100 * float(np.mean(ndcg)),
        "recall@10": 100 * float(np.mean(r10)),
        "recall@100": 100 * float(np.mean(r100)),
        "queries": len(qids),
        "min_docs_ranked": int(min(docs_seen)),
        "per_query_ndcg@10": {q: round(100 * float(x), 3) for q, x in zip(qids, ndcg)},
        "search_seconds": search_s,
    }


def by_overlap(train_qrels, test_qrels, before: Dict[str, Any], after: Dict[str, Any]) -> Dict[str, Any]:
    """Mean test nDCG@10 before/after, apart for the test queries with a relevant document that
    some train query also has ("seen": the training saw it as a positive) and the others."""
    seen_docs = {d for r in train_qrels.values() for d, g in r.items() if g > 0}
    out: Dict[str, Any] = {}
    for name, want in (("seen", True), ("unseen", False)):
        qs = [q for q in after["per_query_ndcg@10"]
              if any(g > 0 and d in seen_docs for d, g in test_qrels[q].items()) == want]
        out[name] = {"queries": len(qs),
                     "ndcg@10_before": float(np.mean([before["per_query_ndcg@10"][q] for q in qs])) if qs else None,
                     "ndcg@10_after": float(np.mean([after["per_query_ndcg@10"][q] for q in qs])) if qs else None}
    return out


def _brief(metrics: Dict[str, Any]) -> Dict[str, Any]:
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in metrics.items() if not k.startswith("per_query")}


#: a SciFact training recipe: how pairs are mined from the train qrels, then fit() options
RECIPE_KEYS = ("hard_negatives", "random_negatives", "hard_score", "skip_top", "max_train_pairs",
               "epochs", "lr", "max_length", "batch_size", "group_batches", "warmup_ratio", "seed")


def _recipe(args: argparse.Namespace, **over: Any) -> Dict[str, Any]:
    unknown = sorted(set(over) - set(RECIPE_KEYS))
    if unknown:
        raise SystemExit(f"unknown recipe key(s) {unknown}; known: {list(RECIPE_KEYS)}")
    r = {k: getattr(args, k) for k in RECIPE_KEYS}
    r.update(over)
    return r


def _train_on(enc, train, qrels, index0, recipe: Dict[str, Any]) -> Dict[str, Any]:
    """Mine graded pairs for ``qrels`` from ``index0`` (the untrained encoder's index), then
    fine-tune ``enc`` in place with the recipe; returns what happened."""
    import random

    from nbce_rag.retrieval.readers import BeirData
    from nbce_rag.retrieval.training import qrels_to_pairs

    mine = dict(n_hard=recipe["hard_negatives"], n_random=recipe["random_negatives"],
                hard_score=recipe["hard_score"], skip_top=recipe["skip_top"], seed=recipe["seed"])
    pairs = qrels_to_pairs(BeirData(train.corpus, train.queries, qrels), index0, **mine)
    out: Dict[str, Any] = {"recipe": recipe, "train_queries": len(qrels), "train_pairs_total": len(pairs)}
    if recipe["max_train_pairs"] and len(pairs) > recipe["max_train_pairs"]:
        pairs = random.Random(recipe["seed"]).sample(pairs, recipe["max_train_pairs"])
    out["train_pairs_used"] = len(pairs)
    out["pair_grades"] = {str(g): sum(1 for p in pairs if p[2] == g) for g in sorted({p[2] for p in pairs})}
    opts: Dict[str, Any] = {"epochs": recipe["epochs"], "batch_size": recipe["batch_size"],
                            "group_batches": recipe["group_batches"], "warmup_ratio": recipe["warmup_ratio"],
                            "seed": recipe["seed"]}
    if recipe["lr"]:
        opts["learning_rate"] = recipe["lr"]
    if recipe["max_length"]:
        opts["max_length"] = recipe["max_length"]
    out["fit_report"] = enc.fit(pairs, None, **opts)
    return out


def bench_scifact(args: argparse.Namespace) -> int:
    """SciFact before/after CoSENT fine-tuning on the train qrels.

    Protocol (default): one vector per abstract (title + text, truncated at the encoder's
    max_seq_length, 256), as MTEB/BEIR report all-MiniLM-L6-v2 (64.5 nDCG@10), so numbers are
    comparable. ``--chunked`` scores with the index's default chunking instead (MaxP: a
    document scores its best chunk), at about twice the encoding cost.

    ``--sweep FILE.json`` (a list of recipe overrides) chooses a recipe without looking at the
    test qrels: each variant trains on the train qrels minus a held-out ``--dev-fraction`` of
    their queries and is scored on those; the ``--final-top`` best by dev nDCG@10 are then
    trained on all train qrels and scored on the test qrels."""
    import random

    from nbce_rag.retrieval.readers import read_beir, read_qrels
    from nbce_rag.retrieval.encoder import CoSENTEncoder
    from nbce_rag.retrieval.index import VectorIndex

    root = Path(args.data) / "beir_scifact"
    if not need(root / "corpus.jsonl", "BEIR SciFact"):
        return 0
    train = read_beir(root, "train")
    test_qrels = read_qrels(root / "qrels" / "test.tsv")
    docs = [{"text": train.doc_text(d), "id": d} for d in sorted(train.corpus)]

    def load():
        return CoSENTEncoder.from_pretrained(args.model, device=args.device)

    def make_index(enc) -> "VectorIndex":
        if args.chunked:
            return VectorIndex.build(enc, docs, chunk_tokens=args.chunk_tokens, overlap=args.overlap, show_progress_bar=True)
        v = enc.encode([d["text"] for d in docs], show_progress_bar=True)
        idx = VectorIndex(enc.dim, enc.identity, encoder=enc)
        idx.add_vectors(v, [d["text"] for d in docs], [d["id"] for d in docs])
        return idx

    enc0 = load()
    out: Dict[str, Any] = {
        "benchmark": "BEIR SciFact test qrels: nDCG@10, recall@10/100, bundled all-MiniLM-L6-v2 before vs after "
        "CoSENT fine-tuning on the train qrels (graded pairs with hard negatives mined from the index)",
        "encoder": enc0.identity,
        "device": str(enc0.model.device),
        "corpus_docs": len(docs),
        "protocol": ({"chunk_tokens": args.chunk_tokens, "overlap": args.overlap, "doc_score": "max over chunks"}
                     if args.chunked else "one vector per abstract (title + text), truncated at 256 word pieces"),
    }
    t0 = time.perf_counter()
    index0 = make_index(enc0)
    out["index_seconds_before"] = time.perf_counter() - t0
    out["rows"] = len(index0)
    out["test_before"] = retrieval_metrics(index0, train.queries, test_qrels)
    print(f"SciFact test before: {_brief(out['test_before'])}", flush=True)

    finals = [_recipe(args)]
    if args.sweep:
        variants = [_recipe(args, **v) for v in json.loads(Path(args.sweep).read_text())]
        qids = sorted(q for q in train.qrels if q in train.queries)
        dev_q = set(random.Random(42).sample(qids, round(args.dev_fraction * len(qids))))
        fit_qrels = {q: r for q, r in train.qrels.items() if q not in dev_q}
        dev_qrels = {q: r for q, r in train.qrels.items() if q in dev_q}
        out["sweep"] = {"dev_queries": len(dev_q), "fit_queries": len(fit_qrels),
                        "dev_before": retrieval_metrics(index0, train.queries, dev_qrels), "variants": []}
        print(f"dev before: {_brief(out['sweep']['dev_before'])}", flush=True)
        t_start, took = time.perf_counter(), []
        for i, recipe in enumerate(variants):
            if args.deadline_min and took:
                # room for one more variant and for the finals: the current best recipes again,
                # on 1/(1 - dev_fraction) as many queries
                best = sorted(out["sweep"]["variants"], key=lambda r: -r["dev_after"]["ndcg@10"])[: args.final_top]
                need_s = float(np.mean(took)) + sum(r["seconds"] for r in best) / (1 - args.dev_fraction)
                if time.perf_counter() - t_start + need_s > 60 * args.deadline_min:
                    print(f"deadline: stopping the sweep after {i} of {len(variants)} variants", flush=True)
                    out["sweep"]["stopped_at_deadline"] = i
                    break
            enc = load()
            t0 = time.perf_counter()
            row = _train_on(enc, train, fit_qrels, index0, recipe)
            row["dev_after"] = retrieval_metrics(make_index(enc), train.queries, dev_qrels)
            row["seconds"] = time.perf_counter() - t0
            out["sweep"]["variants"].append(row)
            took.append(row["seconds"])
            print(f"variant {i + 1}/{len(variants)} {json.dumps(recipe)}: dev nDCG@10 "
                  f"{row['dev_after']['ndcg@10']:.2f}  ({row['seconds']:.0f} s)", flush=True)
            del enc
        ranked = sorted(out["sweep"]["variants"], key=lambda r: -r["dev_after"]["ndcg@10"])
        finals = [r["recipe"] for r in ranked[: args.final_top]]
    out["finals"] = []
    for j, recipe in enumerate(finals):
        enc = load()
        row = _train_on(enc, train, train.qrels, index0, recipe)
        if args.model_out and j == 0:
            enc.save_pretrained(args.model_out)
            row["model_out"] = args.model_out
        t0 = time.perf_counter()
        index = make_index(enc)
        row["index_seconds_after"] = time.perf_counter() - t0
        row["test_after"] = retrieval_metrics(index, train.queries, test_qrels)
        row["test_by_overlap"] = by_overlap(train.qrels, test_qrels, out["test_before"], row["test_after"])
        del index
        out["finals"].append(row)
        print(f"SciFact test after ({json.dumps(recipe)}): {_brief(row['test_after'])}  "
              f"({row['fit_report']['train_seconds'] / 60:.1f} min training)", flush=True)
        del enc
    # the chosen recipe (best on dev when sweeping) is the headline result
    out.update({k: out["finals"][0][k] for k in ("recipe", "train_pairs_total", "train_pairs_used", "pair_grades",
                                                 "fit_report", "test_after", "test_by_overlap")})
    write_result(args.name, out)
    return 0


# --------------------------------------------------------------------------- throughput


def _sentences(data: Path, n: int) -> List[str]:
    f = data / "stsb" / "sts-train.csv"
    if f.exists():
        from nbce_rag.retrieval.readers import read_stsb

        out: List[str] = []
        for a, b, _ in read_stsb(f):
            out += [a, b]
        return out[:n]
    rng = np.random.default_rng(0)
    words = "the a cat dog runs plays market fell rain snow guitar piano man woman child eats reads".split()
    return [" ".join(rng.choice(words, size=rng.integers(5, 20))) for _ in range(n)]


def _passages(data: Path, n: int) -> List[str]:
    f = data / "beir_scifact" / "corpus.jsonl"
    if f.exists():
        out = []
        with open(f, encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                out.append(f"{row['title']}\n{row['text']}")
                if len(out) >= n:
                    break
        return out
    return [" ".join(s for s in _sentences(data, 20 * n)[i * 20 : (i + 1) * 20]) for i in range(n)]


def bench_throughput(args: argparse.Namespace) -> int:
    """CoSENTEncoder.encode vs SentenceTransformer.encode on the same texts, same batch size;
    the two are timed alternately (A B B A ...) and the medians compared."""
    from nbce_rag.retrieval.encoder import CoSENTEncoder

    enc = CoSENTEncoder.from_pretrained()
    st = enc.model
    data = Path(args.data)
    sets = {"sentences": _sentences(data, args.n), "passages": _passages(data, args.n_passages)}
    out: Dict[str, Any] = {"benchmark": "encode throughput: CoSENTEncoder.encode vs SentenceTransformer.encode",
                           "batch_size": args.batch_size, "repeats": args.repeats, "sets": {}}
    for name, texts in sets.items():
        st.encode(texts[:64], batch_size=args.batch_size)  # warm-up
        enc.encode(texts[:64], batch_size=args.batch_size)
        t_st, t_ours = [], []
        for r in range(args.repeats):
            order = ("st", "ours") if r % 2 == 0 else ("ours", "st")
            for who in order:
                t0 = time.perf_counter()
                if who == "st":
                    st.encode(texts, batch_size=args.batch_size, show_progress_bar=False)
                    t_st.append(time.perf_counter() - t0)
                else:
                    enc.encode(texts, batch_size=args.batch_size, show_progress_bar=False)
                    t_ours.append(time.perf_counter() - t0)
        m_st, m_ours = float(np.median(t_st)), float(np.median(t_ours))
        out["sets"][name] = {
            "texts": len(texts),
            "mean_words": float(np.mean([len(t.split()) for t in texts])),
            "st_seconds": t_st,
            "ours_seconds": t_ours,
            "st_texts_per_s": len(texts) / m_st,
            "ours_texts_per_s": len(texts) / m_ours,
            "overhead_percent": 100.0 * (m_ours / m_st - 1.0),
        }
        print(f"{name}: direct {len(texts) / m_st:.1f}/s, CoSENTEncoder {len(texts) / m_ours:.1f}/s, "
              f"overhead {out['sets'][name]['overhead_percent']:+.1f}%")
    write_result("throughput", out)
    return 0


# --------------------------------------------------------------------------- latency


def _random_unit(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = np.empty((n, dim), dtype=np.float32)
    for a in range(0, n, 100_000):
        b = min(n, a + 100_000)
        x = rng.standard_normal((b - a, dim), dtype=np.float32)
        v[a:b] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return v


def _lat(fn, queries: np.ndarray) -> Dict[str, float]:
    ts = []
    for q in queries:
        t0 = time.perf_counter()
        fn(q)
        ts.append(time.perf_counter() - t0)
    ts_ms = np.asarray(ts) * 1000
    return {"p50_ms": float(np.percentile(ts_ms, 50)), "p99_ms": float(np.percentile(ts_ms, 99)),
            "mean_ms": float(ts_ms.mean()), "queries": len(ts)}


def bench_latency(args: argparse.Namespace) -> int:
    """Search latency (k=10, one query at a time, through VectorIndex.search_by_vector) over
    random unit vectors: exact NumPy, FAISS Flat (exact), FAISS HNSW32 and IVF (approximate,
    with recall@10 against exact). Random vectors are the worst case for approximate indexes."""
    from nbce_rag.retrieval.index import VectorIndex, faiss_available

    has_faiss = faiss_available()
    if has_faiss:
        import faiss

        faiss.omp_set_num_threads(args.threads or os.cpu_count() or 1)
    out: Dict[str, Any] = {"benchmark": "search latency, k=10, dim %d, random unit vectors" % args.dim,
                           "dim": args.dim, "k": 10, "faiss": has_faiss, "sizes": {}}
    for n in args.sizes:
        v = _random_unit(n, args.dim, seed=n)
        q = _random_unit(max(args.queries, 64), args.dim, seed=n + 1)
        idx = VectorIndex(args.dim, "random@sha256:0")
        ids = [str(i) for i in range(n)]
        idx.add_vectors(v, [""] * n, ids)
        del v
        res: Dict[str, Any] = {"vectors": n, "memory_mb": idx.vectors.nbytes / 2**20}
        nq_exact = args.queries if n < 1_000_000 else max(10, args.queries // 10)
        res["exact"] = _lat(lambda x: idx.search_by_vector(x, 10), q[:nq_exact])
        t0 = time.perf_counter()
        idx.search_by_vector(q[:64], 10)
        res["exact"]["batch64_ms_per_query"] = (time.perf_counter() - t0) * 1000 / 64
        _, exact_rows = idx.topk(q[: args.queries], 10)
        print(f"n={n}: exact {res['exact']}")
        if has_faiss:
            configs = [("faiss_flat", "Flat", "")]
            if n <= args.hnsw_max:
                configs.append(("faiss_hnsw32", "HNSW32", "efSearch=64"))
            nlist = max(16, int(np.sqrt(n)))
            configs.append((f"faiss_ivf{nlist}", f"IVF{nlist},Flat", "nprobe=16"))
            import nbce_rag.retrieval.index as index_mod

            index_mod.FAISS_TRAIN_MAX = 50 * nlist  # k-means sample for IVF (faiss wants >= 39 per list)
            res["ivf_train_rows"] = min(n, index_mod.FAISS_TRAIN_MAX)
            for name, factory, params in configs:
                idx.backend, idx.faiss_factory, idx.faiss_params, idx._faiss = "faiss", factory, params, None
                t0 = time.perf_counter()
                idx._faiss_index()
                build = time.perf_counter() - t0
                r = _lat(lambda x: idx.search_by_vector(x, 10), q[: args.queries])
                _, rows = idx.topk(q[: args.queries], 10)
                r["recall@10_vs_exact"] = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, exact_rows)]))
                r["build_seconds"] = build
                r["params"] = params
                res[name] = r
                print(f"n={n}: {name} {r}")
                idx._faiss = None
            idx.backend = "exact"
        out["sizes"][str(n)] = res
        idx = ids = None  # free the vectors before the next size
    write_result("latency", out)
    return 0


# --------------------------------------------------------------------------- plots


def plot(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def load(name):
        f = RESULTS / f"{name}.json"
        return json.loads(f.read_text()) if f.exists() else None

    stsb, sci, thr, lat = load("stsb"), load("scifact"), load("throughput"), load("latency")
    if stsb or sci:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        if stsb:
            vals = [stsb["test_before"]["spearman"], stsb["test_after"]["spearman"]]
            axes[0].bar(["bundled", "+ CoSENT"], vals, color=["#999", "#2a7"])
            for i, x in enumerate(vals):
                axes[0].text(i, x + 0.3, f"{x:.1f}", ha="center")
            axes[0].set_ylim(min(vals) - 5, max(vals) + 3)
            axes[0].set_title("STS-B test Spearman x100")
        if sci:
            keys = ["ndcg@10", "recall@10", "recall@100"]
            x = np.arange(len(keys))
            b = [sci["test_before"][k] for k in keys]
            a = [sci["test_after"][k] for k in keys]
            axes[1].bar(x - 0.2, b, 0.4, label="bundled", color="#999")
            axes[1].bar(x + 0.2, a, 0.4, label="+ CoSENT", color="#2a7")
            axes[1].set_xticks(x, keys)
            axes[1].axhline(64.5, ls=":", c="k", lw=1)
            axes[1].set_title("SciFact test (x100); dotted: 64.5 nDCG@10")
            axes[1].legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(RESULTS / "finetuning.png", dpi=120)
        print(f"wrote {RESULTS / 'finetuning.png'}")
    if lat:
        fig, ax = plt.subplots(figsize=(6, 4))
        names = sorted({k for r in lat["sizes"].values() for k in r if k == "exact" or k.startswith("faiss")},
                       key=lambda k: (k != "exact", k))
        for name in names:
            xs = [int(n) for n, r in lat["sizes"].items() if name in r]
            label = name if not name.startswith("faiss_ivf") else "faiss_ivf(sqrt n)"
            if name.startswith("faiss_ivf"):
                xs_all = [(int(n), r[k]["p50_ms"]) for n, r in lat["sizes"].items() for k in r if k.startswith("faiss_ivf")]
                if name != min(k for r in lat["sizes"].values() for k in r if k.startswith("faiss_ivf")):
                    continue
                ax.plot([x for x, _ in xs_all], [y for _, y in xs_all], "o-", label=label)
                continue
            ax.plot(xs, [lat["sizes"][str(x)][name]["p50_ms"] for x in xs], "o-", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("vectors (dim %d)" % lat["dim"])
        ax.set_ylabel("p50 latency per query, ms (k=10)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(RESULTS / "latency.png", dpi=120)
        print(f"wrote {RESULTS / 'latency.png'}")
    if thr:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        sets = list(thr["sets"])
        x = np.arange(len(sets))
        ax.bar(x - 0.2, [thr["sets"][s]["st_texts_per_s"] for s in sets], 0.4, label="SentenceTransformer.encode", color="#999")
        ax.bar(x + 0.2, [thr["sets"][s]["ours_texts_per_s"] for s in sets], 0.4, label="CoSENTEncoder.encode", color="#2a7")
        ax.set_xticks(x, sets)
        ax.set_ylabel("texts / s")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(RESULTS / "throughput.png", dpi=120)
        print(f"wrote {RESULTS / 'throughput.png'}")
    return 0


# --------------------------------------------------------------------------- main


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)

    s = sub.add_parser("stsb", help="STS-B Spearman before/after CoSENT fine-tuning (defaults of fit)")
    s.add_argument("--data", default=str(DEFAULT_DATA))
    s.add_argument("--model-out", default="/tmp/nbce_bench/stsb_model")
    s.add_argument("--epochs", type=int, default=None, help="override the default (4) for a quick look")
    s.add_argument("--max-train-pairs", type=int, default=None)
    s.set_defaults(func=bench_stsb)

    s = sub.add_parser("scifact", help="SciFact nDCG@10 / recall before and after CoSENT fine-tuning on train qrels")
    s.add_argument("--data", default=str(DEFAULT_DATA))
    s.add_argument("--model-out", default="/tmp/nbce_bench/scifact_model")
    s.add_argument("--model", default=None, help="starting encoder (default: the bundled one)")
    s.add_argument("--device", default=None, help="torch device for the encoder (default: cuda if available)")
    s.add_argument("--epochs", type=int, default=1)
    s.add_argument("--lr", type=float, default=None, help="learning rate (default: fit's, 2e-5)")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--warmup-ratio", type=float, default=0.1)
    s.add_argument("--group-batches", action="store_true", help="fit(group_batches=True): a query's pairs share a batch")
    s.add_argument("--seed", type=int, default=42, help="seed of the mining, the sample and fit (default 42)")
    s.add_argument("--max-train-pairs", type=int, default=2400, help="random sample of the mined pairs (0: all)")
    s.add_argument("--hard-negatives", type=int, default=3)
    s.add_argument("--random-negatives", type=int, default=1)
    s.add_argument("--hard-score", type=float, default=0.3, help="grade of a mined hard negative (default 0.3)")
    s.add_argument("--skip-top", type=int, default=0, help="mine hard negatives below this many top candidates")
    s.add_argument("--sweep", default=None, metavar="FILE.json",
                   help="list of recipe overrides to choose from on a dev split of the train queries")
    s.add_argument("--dev-fraction", type=float, default=0.2, help="share of train queries held out (--sweep)")
    s.add_argument("--final-top", type=int, default=1, help="best sweep recipes trained on all train qrels (default 1)")
    s.add_argument("--deadline-min", type=float, default=None,
                   help="stop starting sweep variants when the finals would not fit in this many minutes")
    s.add_argument("--chunk-tokens", type=int, default=200)
    s.add_argument("--overlap", type=int, default=32)
    s.add_argument("--chunked", action="store_true",
                   help="score with the index's chunking (MaxP) instead of one truncated vector per abstract")
    s.add_argument("--max-length", type=int, default=128,
                   help="truncate training inputs to this many tokens (default 128; 0: the encoder's 256)")
    s.add_argument("--name", default="scifact", help="result file name (default scifact)")
    s.set_defaults(func=bench_scifact)

    s = sub.add_parser("throughput", help="encode throughput vs SentenceTransformer.encode")
    s.add_argument("--data", default=str(DEFAULT_DATA))
    s.add_argument("--n", type=int, default=2000, help="sentences (default 2000)")
    s.add_argument("--n-passages", type=int, default=200, help="passages (default 200)")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--repeats", type=int, default=4)
    s.set_defaults(func=bench_throughput)

    s = sub.add_parser("latency", help="search latency p50/p99: exact vs FAISS at several sizes")
    s.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    s.add_argument("--dim", type=int, default=384)
    s.add_argument("--queries", type=int, default=200, help="queries per size (a tenth at >= 1M for exact)")
    s.add_argument("--hnsw-max", type=int, default=100_000, help="largest size to build HNSW for (build cost)")
    s.set_defaults(func=bench_latency)

    s = sub.add_parser("plot", help="draw benchmarks/results/*.png from the JSON results")
    s.set_defaults(func=plot)

    for sp in sub.choices.values():
        sp.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 avoids oversubscription on a shared machine)")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
