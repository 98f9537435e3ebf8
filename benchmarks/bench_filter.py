"""Benchmarks of the margin-calibrated passage filter (nbce_rag.filtering.threshold).

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
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from nbce_rag.filtering.calibration import (  # noqa: E402
    best_f1_threshold,
    precision_target_threshold,
    prf,
    recall_target_threshold,
    within_query_spreads,
)
from nbce_rag.retrieval.readers import read_qrels, read_queries  # noqa: E402
from nbce_rag.filtering.threshold import MarginThreshold, plot_distributions  # noqa: E402

from bench_filter_e2e import stage_e2e  # noqa: E402
from filter_common import RESULTS, EmbCache, encode_texts, load_encoder, machine  # noqa: E402


# ============================================================================ SciFact


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
        Q = encode_texts(enc, [queries[q] for q in qids], "queries")
        D = encode_texts(enc, [(x.get("title", "") + " " + x["text"]).strip() for x in corpus], "corpus")
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
    from nbce_rag.retrieval.index import VectorIndex

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


# ============================================================================ stage: hotpot


def stage_hotpot(args) -> Dict[str, Any]:
    """HotpotQA distractor (2 gold paragraphs + 8 distractors per question): a real data set
    with several relevant passages per query, where the margin should open up. 2-fold CV over
    the 100 questions (calibrate on one half, measure on the other, pool the held-out halves)."""
    import warnings

    js = json.load(open(Path(args.data) / "hotpotqa_distractor_dev100" / "hotpot_dev_distractor_first100.json",
                        encoding="utf-8"))
    enc = load_encoder(args.encoder)
    cache = EmbCache(enc, Path(args.cache) / f"hotpot_emb_{hashlib.sha1(enc.identity.encode()).hexdigest()[:12]}.npz")
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
    """Write the shipped prior (nbce_rag/filtering/priors/) with the package recipe on cached
    embeddings. ``--objective``: the one-rule prior of issue 15; otherwise both decisions (issue
    23), their targets chosen by bench_filter_decisions.choose_targets on the calibration splits."""
    import bench_filter_labelfree as lf

    out = ROOT / "nbce_rag" / "filtering" / "priors" / "all-MiniLM-L6-v2.json"
    if args.objective:
        th = lf.build_shipped_prior(args)
        th.save(out)
        print(th.report())
        return {"stage": "labelfree-prior", "written": str(out.relative_to(ROOT)), "calibration": th.to_dict()}
    import bench_filter_decisions as bd
    from nbce_rag.filtering.prior import build_prior

    choice = bd.choose_targets(args)
    enc = lf.load_encoder(args.encoder)
    cache = lf._cache(args, enc)
    th = build_prior(enc, args.data, k=args.k, encode=cache.encode, n_bootstrap=args.bootstrap,
                     keep_recall_target=choice["keep_recall_target"], flag_target=choice["flag_target"])
    th.stats["prior"]["targets_chosen_by"] = ("benchmarks/bench_filter.py labelfree-prior: highest keep-recall target "
                                              "with rows <= 60% of k, highest flag target with >= 95% in-domain "
                                              "supported (calibration splits)")
    th.save(out)
    print(th.report())
    return {"stage": "labelfree-prior", "written": str(out.relative_to(ROOT)), "choice": choice,
            "calibration": th.to_dict()}


def _labelfree(name: str):
    def run(args):
        import bench_filter_labelfree as lf

        return {"labelfree-encode": lf.stage_encode, "labelfree-synth": lf.stage_synth,
                "labelfree": lf.stage_labelfree, "labelfree-e2e": lf.stage_e2e,
                "labelfree-e2e-report": lf.stage_e2e_report}[name](args)
    return run


LABELFREE = {n: _labelfree(n) for n in ("labelfree-encode", "labelfree-synth", "labelfree", "labelfree-e2e",
                                        "labelfree-e2e-report")}
LABELFREE["labelfree-prior"] = _stage_prior


def _decisions(name: str):
    def run(args):
        import bench_filter_decisions as bd

        return {"decisions": bd.stage_decisions, "qlik": bd.stage_qlik, "repetition": bd.stage_repetition}[name](args)
    return run


DECISIONS = {n: _decisions(n) for n in ("decisions", "qlik", "repetition")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["design", "scifact", "hotpot", "e2e", *LABELFREE, *DECISIONS])
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
    ap.add_argument("--e2e-datasets", nargs="+", default=["squad", "nq", "hotpotqa"], help="labelfree-e2e: data sets")
    ap.add_argument("--splits", nargs="+", default=["eval"], help="labelfree-e2e: cal and/or eval")
    ap.add_argument("--methods", nargs="+", default=["gold only", "prior f0.5 (v1 default)", "no filter (20)"],
                    help="labelfree-e2e: methods (see bench_filter_labelfree.E2E_METHODS)")
    ap.add_argument("--dtype", default="float32", help="labelfree-e2e / decisions: the LM's dtype (bfloat16 is ~3x faster on AVX512-BF16 CPUs)")
    ap.add_argument("--no-repeat-ngram-size", type=int, default=0, help="labelfree-e2e: decode option (explicit)")
    ap.add_argument("--repetition-penalty", type=float, default=1.0, help="labelfree-e2e: decode option (explicit)")
    ap.add_argument("--new-prior", default=None, help="labelfree-e2e: the two-decision prior file of method 'new default'")
    ap.add_argument("--qlik-top", type=int, default=3, help="qlik: candidates per question scored by the LM")
    ap.add_argument("--n-distractors", type=int, default=4, help="repetition: distractors next to the gold passage")
    ap.add_argument("--block", type=int, default=10, help="labelfree-e2e: questions per data set in each round-robin block")
    ap.add_argument("--resume", action="store_true", help="labelfree-e2e: keep the per-question results of the partial file")
    ap.add_argument("--objective", default=None, help="labelfree-prior: objective of the shipped prior")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--tag", default="", help="suffix of the result file name (filter_<stage><tag>.json)")
    args = ap.parse_args(argv)
    if not Path(args.data).exists():
        print(f"skip: data folder {args.data} not found (see ../shared/data/README.md)")
        return 0
    import torch

    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    res = {"design": stage_design, "scifact": stage_scifact, "hotpot": stage_hotpot,
           "e2e": stage_e2e, **LABELFREE, **DECISIONS}[args.stage](args)
    res["command"] = "python benchmarks/bench_filter.py " + " ".join(argv if argv is not None else sys.argv[1:])
    res["wall_seconds"] = time.time() - t0
    out = RESULTS / f"filter_{args.stage}{args.tag}.json"
    from nbce_rag.files import write_json

    write_json(out, res)
    if args.stage == "scifact":
        MarginThreshold.from_dict(res["calibration"]).save(args.calibration)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
