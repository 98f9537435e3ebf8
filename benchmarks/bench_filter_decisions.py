"""Issue 23: the filter's two decisions, measured (run through bench_filter.py).

``keep``    which candidates become NBCE rows (recall first): keep i iff s_i >= t_keep and
            s_i >= s_max - m_keep, calibrated so that the *macro* keep-recall over answerable
            questions (per question: share of its relevant candidates kept; mean over questions
            with a relevant candidate) reaches a target, with the fewest rows.
``support`` whether the index supports the question at all (precision first): supported iff
            s_max >= t_support, calibrated from in-domain against off-topic best-candidate scores.

Stages (results in benchmarks/results/filter_<stage>.json):

``decisions``  retrieval level, no LM: NumPy over the cached candidate scores of SciFact, SQuAD,
               NQ and HotpotQA (top-20), calibration splits to choose, evaluation splits to
               report: keep-recall and rows per question for each keep target (with and without
               the relative margin), labelled vs prior vs leave-one-dataset-out prior; support:
               off-topic flagged (each data set's questions against another's passages) and
               in-domain supported; and the targets chosen by issue 23's rule.
``qlik``       the question-likelihood feature ``log p(q | passage) - log p(q | no passage)`` of
               the decoder's prefill (:func:`question_evidence`) as a ``support`` feature: AUC and
               off-topic flagged at 95% in-domain supported, cosine alone / feature alone / both.
``repetition`` repetition guards (no guard, ``no_repeat_ngram_size`` 3/4, ``repetition_penalty``)
               on calibration-split questions, gold passage + distractors.

    python benchmarks/bench_filter.py decisions
    python benchmarks/bench_filter.py qlik --n-questions 40 --dtype bfloat16
    python benchmarks/bench_filter.py repetition --n-questions 30 --dtype bfloat16
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from nbce_rag.filtering.prior import DATASETS, candidates, load_labelled

from bench_filter_labelfree import QUERIES, _cache, keep_rules
from filter_common import RESULTS, load_encoder, machine, macro_recall

K = 20
KEEP_TARGETS = (0.8, 0.9, 0.95, 0.98, 0.99)


# ============================================================================ the rules (NumPy reference)


def any_recall(keep: np.ndarray, Y: np.ndarray) -> float:
    """Share of questions with a relevant candidate that keep at least one."""
    ans = Y.sum(1) > 0
    return float(((keep & (Y > 0)).sum(1) > 0)[ans].mean()) if ans.any() else float("nan")


def keep_mask(S: np.ndarray, t: float, m: Optional[float]) -> np.ndarray:
    k = S >= t
    if m is not None:
        k &= S >= S.max(1, keepdims=True) - m
    return k


def threshold_for_recall(S: np.ndarray, Y: np.ndarray, target: float, m: Optional[float]) -> Optional[float]:
    """The highest ``t`` whose macro keep-recall (with margin ``m``) reaches ``target``; ``None``
    when even ``t = -inf`` does not."""
    ans = Y.sum(1) > 0
    Sa, Ya = S[ans], Y[ans] > 0
    ok = Ya & (np.ones_like(Ya) if m is None else Sa >= Sa.max(1, keepdims=True) - m)
    w = (1.0 / Ya.sum(1, keepdims=True) / ans.sum()) * np.ones_like(Sa)
    s, ww = Sa[ok], w[ok]
    if ww.sum() < target - 1e-12:
        return None
    o = np.argsort(-s, kind="stable")
    cum = np.cumsum(ww[o])
    i = int(np.searchsorted(cum, target - 1e-12))
    return float(s[o][min(i, len(s) - 1)])


def gap_margins(S: np.ndarray, Y: np.ndarray) -> List[Optional[float]]:
    """No margin, and the quantiles 0, 0.05, ..., 1 of the gaps s_max - s_rel of the relevant candidates."""
    gaps = (S.max(1, keepdims=True) - S)[Y > 0]
    return [None, *sorted({float(np.quantile(gaps, q)) for q in np.linspace(0, 1, 21)})]


def calibrate_keep(S: np.ndarray, Y: np.ndarray, target: float, margin: bool = True):
    """(t, m) with macro keep-recall >= ``target`` and the fewest rows per question (ties: the
    first in ``margins`` order)."""
    margins = gap_margins(S, Y) if margin else [None]
    best = None
    for m in margins:
        t = threshold_for_recall(S, Y, target, m)
        if t is None:
            continue
        rows = float(keep_mask(S, t, m).sum(1).mean())
        if best is None or rows < best[2] - 1e-12:
            best = (t, m, rows)
    return best


def support_threshold_for_flagged(off_smax: np.ndarray, flagged: float) -> float:
    """Lowest threshold that flags (s_max < t) at least ``flagged`` of off-topic questions."""
    s = np.sort(off_smax)
    i = int(np.ceil(flagged * len(s))) - 1
    return float(np.nextafter(s[min(max(i, 0), len(s) - 1)], np.inf))


def support_threshold_for_supported(in_smax: np.ndarray, supported: float) -> float:
    """Highest threshold that supports (s_max >= t) at least ``supported`` of in-domain questions."""
    s = np.sort(in_smax)[::-1]
    i = int(np.ceil(supported * len(s))) - 1
    return float(s[min(max(i, 0), len(s) - 1)])


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(pos > neg) + 0.5 P(tie) (Mann-Whitney)."""
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    allv = np.concatenate([pos, neg])
    order = allv.argsort(kind="stable")
    ranks = np.empty(len(allv))
    sv = allv[order]
    i = 0
    while i < len(sv):  # average ranks of ties
        j = i
        while j + 1 < len(sv) and sv[j + 1] == sv[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


# ============================================================================ data


def load_candidates(args, k: int = K):
    enc = load_encoder(args.encoder)
    cache = _cache(args, enc)
    sets = {ds: {sp: load_labelled(Path(args.data), ds, sp) for sp in ("cal", "eval")} for ds in DATASETS}
    cand = {(ds, sp): candidates(sets[ds][sp], cache.encode, k, n_queries=QUERIES, seed=args.seed)
            for ds in DATASETS for sp in ("cal", "eval")}
    off = {}
    for sp in ("cal", "eval"):
        for b in DATASETS:
            for a in DATASETS:
                if a != b:
                    off[a, b, sp] = candidates(sets[b][sp], cache.encode, k, n_queries=QUERIES, seed=args.seed,
                                               passage_vectors=cand[b, sp]["P"], queries_from=sets[a][sp])
    return enc, sets, cand, off


def _pool(cand, dss, sp):
    return (np.concatenate([cand[d, sp]["S"] for d in dss]), np.concatenate([cand[d, sp]["Y"] for d in dss]))


# ============================================================================ stage: decisions


def stage_decisions(args) -> Dict[str, Any]:
    t0 = time.time()
    enc, sets, cand, off = load_candidates(args)
    res: Dict[str, Any] = {"stage": "decisions", "k": K, "encoder": enc.identity, "queries_per_set": QUERIES,
                           "machine": machine(), "keep": {}, "support": {}}
    # ---- keep: labelled (own cal split), prior (4 cal splits, pooled), LODO prior; with/without margin
    for target in KEEP_TARGETS:
        for margin_mode in ("margin", "no margin"):
            margins = margin_mode == "margin"
            prior = calibrate_keep(*_pool(cand, DATASETS, "cal"), target, margins)
            r: Dict[str, Any] = {"prior": {"threshold": prior[0], "margin": prior[1], "rows_cal": prior[2]},
                                 "datasets": {}}
            for ds in DATASETS:
                S, Y = cand[ds, "eval"]["S"], cand[ds, "eval"]["Y"]
                lab = calibrate_keep(cand[ds, "cal"]["S"], cand[ds, "cal"]["Y"], target, margins)
                lodo = calibrate_keep(*_pool(cand, [d for d in DATASETS if d != ds], "cal"), target, margins)
                row = {}
                for name, rule in (("labelled", lab), ("prior", prior), ("prior LODO", lodo)):
                    if rule is None:
                        row[name] = None
                        continue
                    kp = keep_mask(S, rule[0], rule[1])
                    kc = keep_mask(cand[ds, "cal"]["S"], rule[0], rule[1])
                    row[name] = {"threshold": rule[0], "margin": rule[1],
                                 "keep_recall": macro_recall(kp, Y), "any_relevant_kept": any_recall(kp, Y),
                                 "rows": float(kp.sum(1).mean()), "empty": float((kp.sum(1) == 0).mean()),
                                 "keep_recall_cal": macro_recall(kc, cand[ds, "cal"]["Y"]),
                                 "rows_cal": float(kc.sum(1).mean())}
                row["answerable"] = float((Y.sum(1) > 0).mean())
                row["multi_relevant"] = float((Y.sum(1) > 1).mean())
                if row["labelled"] and row["prior LODO"]:
                    row["lodo_minus_labelled_recall"] = row["prior LODO"]["keep_recall"] - row["labelled"]["keep_recall"]
                r["datasets"][ds] = row
            res["keep"][f"{target}:{margin_mode}"] = r
            print(f"keep target {target} ({margin_mode}): prior t={prior[0]:.3f} m={prior[1]} rows(cal)={prior[2]:.2f}; eval "
                  + "; ".join(f"{ds} R {r['datasets'][ds]['prior']['keep_recall']:.3f} rows {r['datasets'][ds]['prior']['rows']:.2f}"
                              f" LODO-lab {r['datasets'][ds].get('lodo_minus_labelled_recall', float('nan')):+.3f}"
                              for ds in DATASETS), flush=True)
    res["api_check"] = api_check(cand)
    # ---- support: in-domain vs off-topic best-candidate scores
    sup: Dict[str, Any] = {}
    for sp in ("cal", "eval"):
        sup[sp] = {"in_domain_smax": {ds: cand[ds, sp]["S"][:, 0].tolist() for ds in DATASETS},
                   "off_topic_smax": {f"{a}->{b}": off[a, b, sp]["S"][:, 0].tolist() for (a, b, s_) in off if s_ == sp}}
    in_cal = np.concatenate([cand[ds, "cal"]["S"][:, 0] for ds in DATASETS])
    off_cal = np.concatenate([off[a, b, "cal"]["S"][:, 0] for (a, b, s_) in off if s_ == "cal"])
    res["support"]["auc_cosine"] = {sp: auc(np.concatenate([cand[ds, sp]["S"][:, 0] for ds in DATASETS]),
                                            np.concatenate([off[a, b, sp]["S"][:, 0] for (a, b, s_) in off if s_ == sp]))
                                    for sp in ("cal", "eval")}
    rules = {}
    for f in (0.8, 0.85, 0.9, 0.95, 0.98):
        rules[f"flag {f:.0%} off-topic (cal)"] = support_threshold_for_flagged(off_cal, f)
    for s_ in (0.9, 0.95, 0.98):
        rules[f"support {s_:.0%} in-domain (cal)"] = support_threshold_for_supported(in_cal, s_)
    rules["v1 prior threshold (0.4966)"] = 0.4966
    table = {}
    for name, t in rules.items():
        row = {"threshold": t}
        for sp in ("cal", "eval"):
            pairs = {f"{a}->{b}": float((off[a, b, sp]["S"][:, 0] < t).mean()) for (a, b, s_) in off if s_ == sp}
            ind = {ds: float((cand[ds, sp]["S"][:, 0] >= t).mean()) for ds in DATASETS}
            ind_ans = {ds: float((cand[ds, sp]["S"][:, 0] >= t)[cand[ds, sp]["Y"].sum(1) > 0].mean()) for ds in DATASETS}
            row[sp] = {"off_topic_flagged_mean": float(np.mean(list(pairs.values()))),
                       "off_topic_flagged_worst": float(min(pairs.values())), "pairs": pairs,
                       "in_domain_supported_mean": float(np.mean(list(ind.values()))),
                       "in_domain_supported_worst": float(min(ind.values())), "in_domain_supported": ind,
                       "answerable_supported": ind_ans}
        table[name] = row
        print(f"support {name:34s} t={t:.3f} | cal flagged {row['cal']['off_topic_flagged_mean']:.3f} "
              f"(worst {row['cal']['off_topic_flagged_worst']:.3f}) supported {row['cal']['in_domain_supported_mean']:.3f} "
              f"(worst {row['cal']['in_domain_supported_worst']:.3f}) | eval flagged {row['eval']['off_topic_flagged_mean']:.3f} "
              f"(worst {row['eval']['off_topic_flagged_worst']:.3f}) supported {row['eval']['in_domain_supported_mean']:.3f} "
              f"(worst {row['eval']['in_domain_supported_worst']:.3f})", flush=True)
    res["support"]["rules"] = table
    # the trade-off curve (calibration splits): flagged vs supported over thresholds
    grid = np.round(np.arange(0.2, 0.8, 0.01), 3)
    res["support"]["curve_cal"] = [{"threshold": float(t), "off_topic_flagged": float((off_cal < t).mean()),
                                    "in_domain_supported": float((in_cal >= t).mean())} for t in grid]
    res["support"]["scores"] = sup
    res["shipped_prior"] = shipped_prior_check(cand, off)
    res["seconds"] = time.time() - t0
    plot_decisions(res, RESULTS / "filter_decisions.png")
    return res


def shipped_prior_check(cand, off) -> Dict[str, Any]:
    """The shipped prior file (both decisions) on every split: keep-recall and rows per data set,
    off-topic flagged and in-domain supported by its support rule."""
    from nbce_rag.filtering.prior import PRIOR_DIR
    from nbce_rag.filtering.threshold import MarginThreshold

    th = MarginThreshold.load(PRIOR_DIR / "all-MiniLM-L6-v2.json")
    t_keep, m_keep, t_sup = th.keep.threshold, th.keep.margin, th.support.threshold
    out: Dict[str, Any] = {"keep": {"threshold": t_keep, "margin": m_keep}, "support": {"threshold": t_sup}}
    for sp in ("cal", "eval"):
        r: Dict[str, Any] = {}
        for ds in DATASETS:
            S, Y = cand[ds, sp]["S"], cand[ds, sp]["Y"]
            km = keep_mask(S, t_keep, m_keep)
            r[ds] = {"keep_recall": macro_recall(km, Y), "any_relevant_kept": any_recall(km, Y),
                     "rows": float(km.sum(1).mean()), "in_domain_supported": float((S[:, 0] >= t_sup).mean()),
                     "answerable_supported": float((S[:, 0] >= t_sup)[Y.sum(1) > 0].mean())}
        pairs = {f"{a}->{b}": float((off[a, b, sp]["S"][:, 0] < t_sup).mean()) for (a, b, s_) in off if s_ == sp}
        out[sp] = {"datasets": r, "off_topic_pairs": pairs, "off_topic_flagged_mean": float(np.mean(list(pairs.values()))),
                   "off_topic_flagged_worst": float(min(pairs.values())),
                   "in_domain_supported_mean": float(np.mean([v["in_domain_supported"] for v in r.values()]))}
        print(f"shipped prior, {sp}: " + "; ".join(f"{ds} R {v['keep_recall']:.3f} rows {v['rows']:.1f} supported "
                                                  f"{v['in_domain_supported']:.3f}" for ds, v in r.items())
              + f" | off-topic flagged mean {out[sp]['off_topic_flagged_mean']:.3f} worst {out[sp]['off_topic_flagged_worst']:.3f}",
              flush=True)
    return out


def api_check(cand) -> Dict[str, Any]:
    """The package's keep calibration (``nbce_rag.filtering.decisions.calibrate_keep``) against
    the NumPy reference above, on the pooled calibration splits: same keep masks on every
    evaluation split?"""
    try:
        from nbce_rag.filtering.decisions import calibrate_keep as api_calibrate_keep
        from nbce_rag.filtering.decisions import keep_mask as api_keep_mask
    except ImportError as e:
        return {"available": False, "why": str(e)}
    S, Y = _pool(cand, DATASETS, "cal")
    G = np.repeat(np.arange(S.shape[0]), S.shape[1])
    out: Dict[str, Any] = {"available": True, "targets": {}}
    for target in KEEP_TARGETS:
        api = api_calibrate_keep(S.ravel(), Y.ravel(), G, recall_target=target, n_bootstrap=0)
        ref = calibrate_keep(S, Y, target)
        same = {}
        for ds in DATASETS:
            Se = cand[ds, "eval"]["S"]
            ka = api_keep_mask(Se.ravel(), np.repeat(np.arange(Se.shape[0]), Se.shape[1]), api["threshold"],
                               api["margin"]).reshape(Se.shape)
            same[ds] = float((ka == keep_mask(Se, ref[0], ref[1])).all(1).mean())
        out["targets"][str(target)] = {"api": {"threshold": api["threshold"], "margin": api["margin"],
                                               "rows_cal": api["stats"]["rows"]},
                                       "reference": {"threshold": ref[0], "margin": ref[1], "rows_cal": ref[2]},
                                       "questions_with_identical_keep_mask": same}
        print(f"api check {target}: api t={api['threshold']:.4f} m={api['margin']} ref t={ref[0]:.4f} m={ref[1]} "
              f"identical masks {same}", flush=True)
    return out


def plot_decisions(res: Dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional
        return
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    for ds in DATASETS:
        xs, ys = [], []
        for key, r in res["keep"].items():
            if key.endswith(":margin") and r["datasets"][ds]["prior"]:
                xs.append(r["datasets"][ds]["prior"]["rows"])
                ys.append(r["datasets"][ds]["prior"]["keep_recall"])
        ax[0].plot(xs, ys, "o-", label=ds)
    ax[0].axvline(12, color="grey", ls=":", label="60% of 20 rows")
    ax[0].set_xlabel("rows per question (evaluation split; no filter = 20)")
    ax[0].set_ylabel("macro keep-recall (evaluation split)")
    ax[0].set_title("keep: prior at targets " + ", ".join(str(t) for t in KEEP_TARGETS))
    ax[0].legend()
    c = res["support"]["curve_cal"]
    ax[1].plot([x["in_domain_supported"] for x in c], [x["off_topic_flagged"] for x in c], "-")
    ax[1].axhline(0.9, color="grey", ls=":")
    ax[1].axvline(0.95, color="grey", ls=":")
    ax[1].set_xlabel("in-domain questions supported (calibration splits)")
    ax[1].set_ylabel("off-topic questions flagged (calibration splits)")
    ax[1].set_title(f"support: s_max >= t (cosine; AUC cal {res['support']['auc_cosine']['cal']:.3f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ============================================================================ stage: qlik (item 2)


def question_evidence(dec, question: str, texts: Sequence[str], scores: Sequence[float]) -> np.ndarray:
    """``log p(q | passage_k) - log p(q | no passage)`` for every passage, read from the decoder's
    own prefill (the rows of :meth:`NBCEDecoder.start` with a pooling that needs the question
    likelihood; :func:`nbce_rag.decoding.scoring.span_logliks` inside): no second implementation."""
    from nbce_rag.types import Passage

    state = dec.start(question, [Passage(text=t, score=float(s)) for t, s in zip(texts, scores)],
                      pooling="posterior:question", max_new_tokens=1)
    while not dec.prefill(state):
        pass
    ll = [r.q_loglik for r in state.prep.rows]
    if any(x is None for x in ll):
        raise RuntimeError("the prefill did not compute log p(question | passage) for every row")
    return np.asarray(ll[1:], dtype=np.float64) - float(ll[0])


def _logistic_fit(X: np.ndarray, y: np.ndarray, l2: float = 1e-3, iters: int = 50) -> np.ndarray:
    """Logistic regression (Newton / IRLS, small L2), features standardised by the caller."""
    Xb = np.c_[np.ones(len(X)), X]
    w = np.zeros(Xb.shape[1])
    for _ in range(iters):
        p = 1 / (1 + np.exp(-Xb @ w))
        g = Xb.T @ (p - y) + l2 * w
        H = (Xb * (p * (1 - p))[:, None]).T @ Xb + l2 * np.eye(len(w))
        step = np.linalg.solve(H, g)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def stage_qlik(args) -> Dict[str, Any]:
    """Off-topic detection by the best candidate's cosine, by the question-likelihood evidence,
    and by both (logistic on the calibration splits), on ``--n-questions`` questions per data
    set and split: in-domain (own index) and off-topic (the next data set's index)."""
    import torch

    from nbce_rag import NBCEDecoder

    torch.set_num_threads(args.threads)
    t0 = time.time()
    enc = load_encoder(args.encoder)
    cache = _cache(args, enc)
    dss = [d for d in args.e2e_datasets if d in DATASETS]
    sets = {ds: {sp: load_labelled(Path(args.data), ds, sp) for sp in ("cal", "eval")} for ds in dss}
    dec = NBCEDecoder.from_pretrained(device="cpu", dtype=args.dtype, kv_cache=None)
    top = args.qlik_top
    rows: List[Dict[str, Any]] = []
    from nbce_rag.files import write_json

    part = Path(args.results) / f"filter_qlik{args.tag}.partial.json"
    if args.resume and part.exists():  # groups measured by an earlier run are kept, not redone
        rows = [r for r in json.loads(part.read_text())["questions"] if r["split"] in args.splits]
    done = {(r["split"], r["dataset"], r["kind"]) for r in rows}
    for sp in args.splits:
        for i, ds in enumerate(dss):
            other = dss[(i + 1) % len(dss)]
            own = candidates(sets[ds][sp], cache.encode, top, n_queries=args.n_questions, seed=args.seed + 2)
            off = candidates(sets[other][sp], cache.encode, top, n_queries=args.n_questions, seed=args.seed + 2,
                             queries_from=sets[ds][sp])
            for kind, c, ls in (("in-domain", own, sets[ds][sp]), ("off-topic", off, sets[other][sp])):
                if (sp, ds, kind) in done:
                    continue
                for j, q in enumerate(c["qids"]):
                    ev = question_evidence(dec, sets[ds][sp].queries[q], [ls.passages[int(r)] for r in c["rows"][j]],
                                           c["S"][j])
                    rows.append({"split": sp, "dataset": ds, "index": ds if kind == "in-domain" else other,
                                 "kind": kind, "qid": q, "cos": c["S"][j].tolist(), "evidence": ev.tolist(),
                                 "answerable": bool(c["Y"][j].sum() > 0) if kind == "in-domain" else False})
                print(f"qlik {sp} {ds} {kind}: {len(c['qids'])} questions ({time.time() - t0:.0f}s)", flush=True)
                write_json(part, {"questions": rows})
    res: Dict[str, Any] = {"stage": "qlik", "dtype": args.dtype, "top": top, "n_questions": args.n_questions,
                           "decoder": dec.name, "encoder": enc.identity, "machine": machine(), "questions": rows}
    res["summary"] = qlik_summary(rows)
    res["seconds"] = time.time() - t0
    for name, r in res["summary"]["features"].items():
        print(f"{name:32s} AUC cal {r['auc_cal']:.3f} eval {r['auc_eval']:.3f} | at 95% supported (cal cut): eval "
              f"flagged {r['eval_flagged']:.3f} supported {r['eval_supported']:.3f}", flush=True)
    return res


def qlik_summary(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    def feats(r):
        cos, ev = np.asarray(r["cos"]), np.asarray(r["evidence"])
        return {"cos top-1": cos[0], "evidence top-1": ev[0], "evidence max top-k": ev.max()}

    names = ["cos top-1", "evidence top-1", "evidence max top-k"]
    splits = sorted({r["split"] for r in rows})
    data = {sp: (np.array([[feats(r)[n] for n in names] for r in rows if r["split"] == sp]),
                 np.array([r["kind"] == "in-domain" for r in rows if r["split"] == sp], dtype=float))
            for sp in splits}
    Xc, yc = data["cal"] if "cal" in data else data[splits[0]]
    Xe, ye = data["eval"] if "eval" in data else (Xc, yc)  # one split only: in-sample, said in the result
    mu, sd = Xc.mean(0), Xc.std(0) + 1e-12
    cols = {"cosine alone (s_max)": [0], "evidence alone (top-1)": [1], "evidence alone (max top-k)": [2],
            "cosine + evidence top-1 (logistic)": [0, 1], "cosine + evidence max (logistic)": [0, 2]}
    out: Dict[str, Any] = {}
    for name, cs in cols.items():
        if len(cs) == 1:
            fc, fe, w = Xc[:, cs[0]], Xe[:, cs[0]], None
        else:
            w = _logistic_fit((Xc[:, cs] - mu[cs]) / sd[cs], yc)
            fc = np.c_[np.ones(len(Xc)), (Xc[:, cs] - mu[cs]) / sd[cs]] @ w
            fe = np.c_[np.ones(len(Xe)), (Xe[:, cs] - mu[cs]) / sd[cs]] @ w
        t = support_threshold_for_supported(fc[yc > 0], 0.95)
        out[name] = {"auc_cal": auc(fc[yc > 0], fc[yc == 0]), "auc_eval": auc(fe[ye > 0], fe[ye == 0]),
                     "threshold_95_supported_cal": float(t),
                     "cal_flagged": float((fc[yc == 0] < t).mean()), "cal_supported": float((fc[yc > 0] >= t).mean()),
                     "eval_flagged": float((fe[ye == 0] < t).mean()), "eval_supported": float((fe[ye > 0] >= t).mean()),
                     "logistic_weights": None if w is None else w.tolist(),
                     "standardisation": None if w is None else {"mean": mu[cs].tolist(), "sd": sd[cs].tolist()}}
    return {"features": out, "in_sample_only": "eval" not in data or "cal" not in data,
            "n": {sp: {"in_domain": int(data[sp][1].sum()), "off_topic": int((1 - data[sp][1]).sum())} for sp in data}}


# ============================================================================ stage: repetition (item 5)


def loops(text: str, n: int = 3, times: int = 3) -> bool:
    """An answer loops when some word n-gram occurs at least ``times`` times."""
    w = text.lower().split()
    grams: Dict[tuple, int] = {}
    for i in range(len(w) - n + 1):
        g = tuple(w[i:i + n])
        grams[g] = grams.get(g, 0) + 1
        if grams[g] >= times:
            return True
    return False


GUARDS = {"no guard": {}, "no_repeat_ngram_size=3": {"no_repeat_ngram_size": 3},
          "no_repeat_ngram_size=4": {"no_repeat_ngram_size": 4}, "repetition_penalty=1.2": {"repetition_penalty": 1.2}}


def stage_repetition(args) -> Dict[str, Any]:
    """Repetition guards on calibration-split questions: gold passage + the best-ranked
    distractors (``--n-distractors``), greedy, ``--max-new-tokens``; contains-gold accuracy,
    looping answers (a word 3-gram 3 times), answer length."""
    import torch

    from nbce_rag import NBCEDecoder
    from nbce_rag.types import Passage

    from filter_common import correct

    torch.set_num_threads(args.threads)
    t0 = time.time()
    enc = load_encoder(args.encoder)
    cache = _cache(args, enc)
    dss = args.e2e_datasets
    dec = NBCEDecoder.from_pretrained(device="cpu", dtype=args.dtype)
    per: Dict[str, Dict[str, Any]] = {g: {} for g in GUARDS}
    for ds in dss:
        ls = load_labelled(Path(args.data), ds, "cal")
        c = candidates(ls, cache.encode, 20, n_queries=args.n_questions, seed=args.seed + 3)
        for i, q in enumerate(c["qids"]):
            gold = sorted(ls.qrels[q])
            others = [int(r) for r in c["rows"][i] if int(r) not in ls.qrels[q]][: args.n_distractors]
            texts = [ls.passages[r] for r in gold + others]
            qv = cache.encode([ls.queries[q]])[0]
            sc = [float(c["P"][r] @ (qv / np.linalg.norm(qv))) for r in gold + others]
            # every guard acts after the prefill: one shared prefill (NBCEDecoder.compare), explicit
            # options (the benchmark does not depend on the library's defaults)
            base = {"no_repeat_ngram_size": 0, "repetition_penalty": 1.0}
            with torch.inference_mode():
                answers = dec.compare(ls.queries[q], [Passage(text=t, score=x) for t, x in zip(texts, sc)],
                                      [{**base, **o} for o in GUARDS.values()], max_new_tokens=args.max_new_tokens)
            for g, ans in zip(GUARDS, answers):
                a = ans.text
                per[g][f"{ds}:{q}"] = {"correct": bool(correct(a, ls.answers[q])), "loops": loops(a),
                                       "words": len(a.split()), "answer": a}
            if i % 5 == 4:
                print(f"repetition {ds} {i + 1}/{len(c['qids'])} ({time.time() - t0:.0f}s)", flush=True)
    from bench_filter_labelfree import paired_bootstrap

    summ = {}
    for g, d in per.items():
        ks = sorted(d)
        summ[g] = {"n": len(ks), "accuracy": float(np.mean([d[k]["correct"] for k in ks])),
                   "looping": float(np.mean([d[k]["loops"] for k in ks])),
                   "words": float(np.mean([d[k]["words"] for k in ks])),
                   "delta_vs_no_guard_ci95": paired_bootstrap([d[k]["correct"] for k in ks],
                                                              [per["no guard"][k]["correct"] for k in ks])}
        print(f"{g:26s} acc {summ[g]['accuracy']:.3f} looping {summ[g]['looping']:.3f} words {summ[g]['words']:.1f}")
    return {"stage": "repetition", "dtype": args.dtype, "max_new_tokens": args.max_new_tokens,
            "n_distractors": args.n_distractors, "n_questions_per_set": args.n_questions, "datasets": dss,
            "decoder": dec.name, "machine": machine(), "summary": summ, "answers": per, "seconds": time.time() - t0}


# ============================================================================ stage: labelfree-prior (item 3)


def choose_targets(args, rows_share: float = 0.6) -> Dict[str, Any]:
    """Issue 23's rule for the defaults, on the calibration splits only (top ``--k``), through the
    package's own calibration (:mod:`nbce_rag.filtering.decisions`):

    * ``keep``: the highest macro keep-recall target of :data:`KEEP_TARGETS` whose rows per
      question stay <= ``rows_share`` of no filter's (``k``);
    * ``support``: the highest ``flag_target`` (0.90 ... 0.99) whose fit keeps >= 95% of the
      in-domain (answerable) questions supported; off-topic = every data set's questions against
      every other data set's passages (as ``build_prior``)."""
    from nbce_rag.filtering.decisions import calibrate_support

    k = args.k
    keep_rows, sets, cand, cache = keep_rules(args, KEEP_TARGETS, k=k, rows_share=rows_share)
    ok = [r for r in keep_rows if r["rows_ok"]]
    keep_choice = max(ok, key=lambda r: r["target"])["target"] if ok else min(KEEP_TARGETS)
    ind = np.concatenate([cand[d]["S"][:, 0][cand[d]["Y"].sum(1) > 0] for d in DATASETS])
    unans = np.concatenate([cand[d]["S"][:, 0][cand[d]["Y"].sum(1) == 0] for d in DATASETS])
    off = [unans]
    for a in DATASETS:
        for b in DATASETS:
            if a != b:
                off.append(candidates(sets[b], cache.encode, k, n_queries=QUERIES, seed=args.seed,
                                      passage_vectors=cand[b]["P"], queries_from=sets[a])["S"][:, 0])
    off_all = np.concatenate(off)
    sup_rows = []
    for f in np.round(np.arange(0.90, 0.995, 0.01), 2):
        r = calibrate_support(ind, off_all, flag_target=float(f), n_bootstrap=0)
        sup_rows.append({"flag_target": float(f), "threshold": r["threshold"],
                         "in_domain_supported": r["stats"]["in_domain_supported"],
                         "off_topic_flagged": r["stats"]["off_topic_flagged"]})
    good = [r for r in sup_rows if r["in_domain_supported"] >= 0.95]
    flag_choice = max(good, key=lambda r: r["flag_target"])["flag_target"] if good else 0.9
    for r in keep_rows:
        print(f"keep target {r['target']}: t={r['threshold']:.3f} m={r['margin']} rows(cal) {r['rows']:.2f} "
              f"recall {r['keep_recall']:.3f} " + " ".join(f"{d} {v['keep_recall']:.2f}/{v['rows']:.1f}"
                                                           for d, v in r["per_dataset"].items()), flush=True)
    for r in sup_rows:
        print(f"flag target {r['flag_target']}: t={r['threshold']:.3f} supported {r['in_domain_supported']:.3f} "
              f"flagged {r['off_topic_flagged']:.3f}", flush=True)
    print(f"chosen: keep_recall_target {keep_choice}, flag_target {flag_choice}", flush=True)
    return {"k": k, "rows_share_bound": rows_share, "keep": keep_rows, "support": sup_rows,
            "keep_recall_target": keep_choice, "flag_target": flag_choice}
