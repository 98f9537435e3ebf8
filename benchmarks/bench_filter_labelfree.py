"""Label-free calibration benchmarks (issue 15): prior, synthetic, objectives, off-topic.

Stages (run through bench_filter.py; results in benchmarks/results/filter_<stage>.json):

``labelfree-encode``  embed the calibration and evaluation splits of SciFact, SQuAD, NQ and
                      HotpotQA once (cache outside the repository).
``labelfree-synth``   the synthetic recipe's questions: the bundled LM writes a question about
                      ``--n-synth`` chunks of each evaluation split's passages (cached JSONL).
``labelfree``         filter quality on every evaluation split (SciFact test, the held-out
                      SQuAD articles / NQ questions / HotpotQA half) of: the shipped prior (all
                      four calibration splits), the leave-one-dataset-out prior (the evaluated
                      data set left out), synthetic calibration on the evaluated passages,
                      labelled calibration on the same data set's calibration split, fixed
                      cut-offs and no filter; per objective; plus off-topic rejection (every
                      data set's questions against every other data set's passages) and
                      in-domain recall relative to the labelled calibration.
``labelfree-e2e``     answer accuracy end to end (bundled SmolLM2-135M, NBCE, greedy) on SQuAD and
                      NQ with 20 candidates for each objective's prior, on the calibration split
                      (to choose the default objective) and the evaluation split (to report).

    python benchmarks/bench_filter.py labelfree-encode
    python benchmarks/bench_filter.py labelfree-synth --n-synth 100
    python benchmarks/bench_filter.py labelfree
    python benchmarks/bench_filter.py labelfree-e2e --n-questions 30
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from nbce_rag.filtering.prior import DATASETS, LabelledSet, build_prior, candidates, load_labelled, quiet_calibrate
from nbce_rag.filtering.threshold import MarginThreshold, prf

from filter_common import RESULTS, EmbCache, correct, load_encoder, macro_recall

OBJECTIVES = ("f1", "f0.5", "coverage0.9")
FIXED = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
QUERIES = 300  # per data set and split (seeded draw)


def _sets(data: Path) -> Dict[str, Dict[str, LabelledSet]]:
    return {ds: {sp: load_labelled(data, ds, sp) for sp in ("cal", "eval")} for ds in DATASETS}


def _cache(args, enc, part: str = ""):
    """The embedding cache; ``part`` names a second file a parallel encode job writes (read too)."""
    import os

    key = hashlib.sha1(enc.identity.encode()).hexdigest()[:12]
    part = part or os.environ.get("LABELFREE_CACHE_PART", "")  # a job running beside another writes its own file
    c = EmbCache(enc, Path(args.cache) / f"labelfree_emb_{key}{part}.npz")
    for extra in sorted(Path(args.cache).glob(f"labelfree_emb_{key}_*.npz")):
        if extra != c.path:
            z = np.load(extra, allow_pickle=False)
            for k_, v in zip(z["keys"], z["vecs"]):
                c.map.setdefault(str(k_), v)
    return c


def stage_encode(args) -> Dict[str, Any]:
    import os

    enc = load_encoder(args.encoder)
    only = [d for d in os.environ.get("LABELFREE_DATASETS", "").split(",") if d]
    cache = _cache(args, enc, "_" + "_".join(only) if only else "")
    sets = _sets(Path(args.data))
    t0 = time.time()
    for ds in only or DATASETS:
        for sp in ("cal", "eval"):
            candidates(sets[ds][sp], cache.encode, args.k, n_queries=QUERIES, seed=args.seed)  # fills the cache
            print(f"encoded {ds} {sp} ({time.time() - t0:.0f}s)", flush=True)
    return {"stage": "labelfree-encode", "texts": len(cache.map), "seconds": time.time() - t0}


def _synth_path(args, ds: str) -> Path:
    return Path(args.cache) / f"labelfree_synth_{ds}_n{args.n_synth}_s{args.seed}.jsonl"


def stage_synth(args) -> Dict[str, Any]:
    """Questions from the bundled LM about sampled chunks of every evaluation split (cached)."""
    from nbce_rag import NBCEDecoder
    from nbce_rag.filtering.synthetic import clean_question, write_question

    dec = NBCEDecoder.from_pretrained(device="cpu")
    sets = _sets(Path(args.data))
    out = {}
    for ds in DATASETS:
        ls = sets[ds]["eval"]
        path = _synth_path(args, ds)
        done = {}
        if path.exists():
            for line in open(path, encoding="utf-8"):
                o = json.loads(line)
                done[o["row"]] = o
        rng = np.random.default_rng(args.seed)
        rows = [int(r) for r in rng.permutation(len(ls.passages)) if len(ls.passages[int(r)].split()) >= 20][: args.n_synth]
        t0 = time.time()
        for i, r in enumerate(rows):
            if r in done:
                continue
            raw = write_question(dec, ls.passages[r], max_new_tokens=32)
            o = {"row": r, "raw": raw, "question": clean_question(raw)}
            done[r] = o
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(o) + "\n")
            if i % 10 == 0:
                print(f"{ds}: {i}/{len(rows)} ({time.time() - t0:.0f}s) {o['question']!r}", flush=True)
        out[ds] = {"rows": len(rows), "questions": sum(1 for r in rows if done[r]["question"])}
    return {"stage": "labelfree-synth", "n_synth": args.n_synth, "decoder": dec.name, "per_dataset": out}


def _synthetic_th(args, ls: LabelledSet, P: np.ndarray, encode, objective: str, k: int, filter_top: int = 3):
    """The synthetic recipe (nbce_rag.filtering.synthetic) on cached questions: same rank filter and labels."""
    path = _synth_path(args, ls.name)
    if not path.exists():
        return None, None
    qs = [json.loads(line) for line in open(path, encoding="utf-8")]
    qs = [q for q in qs if q["question"]]
    Q = encode([q["question"] for q in qs])
    Q = Q / np.linalg.norm(Q, axis=1, keepdims=True)
    sims = Q @ P.T
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    s, y, g, kept = [], [], [], 0
    for i, (q, row) in enumerate(zip(qs, top)):
        rank = [int(j) for j in row].index(q["row"]) if q["row"] in row else None
        if rank is None or rank >= filter_top:
            continue
        kept += 1
        s += [float(sims[i, j]) for j in row]
        y += [int(int(j) == q["row"]) for j in row]
        g += [i] * len(row)
    info = {"questions": len(qs), "kept": kept, "filter_top": filter_top}
    if kept < 10:
        return None, info
    return quiet_calibrate(s, y, g, n_bootstrap=0, objective=objective), info


def _metrics(th: Optional[MarginThreshold], S: np.ndarray, Y: np.ndarray, keep: Optional[np.ndarray] = None):
    if keep is None:
        keep = th.keep_mask(S.ravel(), np.repeat(np.arange(S.shape[0]), S.shape[1])).reshape(S.shape)
    p, r, f = prf(keep.ravel(), Y.ravel())
    ans = Y.sum(1) > 0
    return {"precision": p, "recall": r, "f1": f, "kept_per_query": float(keep.sum(1).mean()),
            "empty": float((keep.sum(1) == 0).mean()),
            "answerable_with_relevant_kept": float(((keep & (Y > 0)).sum(1) > 0)[ans].mean()) if ans.any() else None}


def stage_labelfree(args) -> Dict[str, Any]:
    enc = load_encoder(args.encoder)
    cache = _cache(args, enc)
    sets = _sets(Path(args.data))
    k = args.k
    cand = {}
    for ds in DATASETS:
        for sp in ("cal", "eval"):
            cand[ds, sp] = candidates(sets[ds][sp], cache.encode, k, n_queries=QUERIES, seed=args.seed)
    res: Dict[str, Any] = {"stage": "labelfree", "k": k, "encoder": enc.identity, "queries_per_set": QUERIES,
                           "objectives": {}, "off_topic": {}}

    def prior_from(dss, objective):
        S = np.concatenate([cand[d, "cal"]["S"].ravel() for d in dss])
        Y = np.concatenate([cand[d, "cal"]["Y"].ravel() for d in dss])
        G = np.concatenate([np.repeat([f"{d}:{q}" for q in cand[d, "cal"]["qids"]], k) for d in dss])
        return quiet_calibrate(S, Y, G, n_bootstrap=0, objective=objective, encoder_identity=enc.identity)

    for obj in OBJECTIVES:
        t0 = time.time()
        prior = prior_from(DATASETS, obj)
        # the package recipe gives the same numbers (same candidates, same calibration)
        rows: Dict[str, Any] = {}
        ths: Dict[str, Dict[str, Any]] = {}
        for ds in DATASETS:
            S, Y = cand[ds, "eval"]["S"], cand[ds, "eval"]["Y"]
            lodo = prior_from([d for d in DATASETS if d != ds], obj)
            lab = quiet_calibrate(cand[ds, "cal"]["S"].ravel(), cand[ds, "cal"]["Y"].ravel(),
                                  np.repeat(np.arange(len(cand[ds, "cal"]["qids"])), k), n_bootstrap=0, objective=obj)
            syn, syn_info = _synthetic_th(args, sets[ds]["eval"], cand[ds, "eval"]["P"], cache.encode, obj, k)
            m = {"prior (4 data sets)": _metrics(prior, S, Y),
                 "prior, this data set left out": _metrics(lodo, S, Y),
                 "labelled (this data set's calibration split)": _metrics(lab, S, Y)}
            if syn is not None:
                m["synthetic (own passages)"] = _metrics(syn, S, Y)
            for c in FIXED:
                m[f"fixed >= {c}"] = _metrics(None, S, Y, S >= c)
            m[f"no filter (top-{k})"] = _metrics(None, S, Y, np.ones_like(S, dtype=bool))
            rows[ds] = {"n_queries": int(S.shape[0]), "methods": m, "synthetic": syn_info}
            ths[ds] = {"lodo": lodo, "labelled": lab, "synthetic": syn}
        # off-topic: questions of data set A against data set B's passages (all candidates irrelevant)
        off: Dict[str, Any] = {}
        for b in DATASETS:
            P = cand[b, "eval"]["P"]
            for a in DATASETS:
                if a == b:
                    continue
                c = candidates(sets[b]["eval"], cache.encode, k, n_queries=QUERIES, seed=args.seed,
                               passage_vectors=P, queries_from=sets[a]["eval"])
                G = np.repeat(np.arange(c["S"].shape[0]), k)
                for name, th in (("prior", prior), ("prior LODO(B)", ths[b]["lodo"]),
                                 ("labelled(B)", ths[b]["labelled"]), ("synthetic(B)", ths[b]["synthetic"])):
                    if th is None:
                        continue
                    keep = th.keep_mask(c["S"].ravel(), G).reshape(c["S"].shape)
                    off.setdefault(name, {})[f"{a}->{b}"] = float((keep.sum(1) == 0).mean())
        summary = {}
        for name, d in off.items():
            summary[name] = {"mean_flagged": float(np.mean(list(d.values()))), "min_flagged": float(min(d.values())),
                             "pairs": d}
        # in-domain: recall kept relative to the labelled calibration's recall
        indomain = {}
        for ds in DATASETS:
            m = rows[ds]["methods"]
            lab_r = m["labelled (this data set's calibration split)"]["recall"]
            for name in ("prior (4 data sets)", "prior, this data set left out", "synthetic (own passages)"):
                if name in m:
                    indomain.setdefault(name, {})[ds] = m[name]["recall"] / lab_r if lab_r else None
        # selection of the default objective: calibration splits only (the prior's own data)
        f1_cal = {ds: _metrics(prior, cand[ds, "cal"]["S"], cand[ds, "cal"]["Y"])["f1"] for ds in DATASETS}
        flag_cal = []
        for b in DATASETS:
            for a in DATASETS:
                if a != b:
                    c = candidates(sets[b]["cal"], cache.encode, k, n_queries=QUERIES, seed=args.seed,
                                   passage_vectors=cand[b, "cal"]["P"], queries_from=sets[a]["cal"])
                    keep = prior.keep_mask(c["S"].ravel(), np.repeat(np.arange(c["S"].shape[0]), k))
                    flag_cal.append(float((keep.reshape(c["S"].shape).sum(1) == 0).mean()))
        selection = {"f1_cal": f1_cal, "mean_f1_cal": float(np.mean(list(f1_cal.values()))),
                     "off_topic_flagged_cal": float(np.mean(flag_cal)), "off_topic_worst_cal": float(min(flag_cal))}
        print(f"selection on calibration splits, {obj}: {selection}")
        res["objectives"][obj] = {"selection_on_cal": selection,
                                  "prior": prior.to_dict(), "datasets": rows, "off_topic": summary,
                                  "in_domain_recall_vs_labelled": indomain, "seconds": time.time() - t0}
        _print(obj, rows, summary, indomain)
    print(markdown(res))
    return res


def _print(obj, rows, off, indomain) -> None:
    print(f"\n===== objective {obj}")
    for ds, r in rows.items():
        print(f"--- {ds} eval ({r['n_queries']} queries; synthetic: {r['synthetic']})")
        for name, m in r["methods"].items():
            print(f"  {name:46s} P {m['precision']:.3f} R {m['recall']:.3f} F1 {m['f1']:.3f} "
                  f"kept/q {m['kept_per_query']:.2f} empty {m['empty']:.2f}")
    for name, d in off.items():
        print(f"off-topic flagged, {name}: mean {d['mean_flagged']:.3f} min {d['min_flagged']:.3f}")
    for name, d in indomain.items():
        print(f"in-domain recall / labelled, {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in d.items() if v is not None))


E2E_METHODS = ("gold only", "no filter (20)", "prior f0.5 (v1 default)", "new default", "closed-book", "keep@<target>",
               "labelled (cal split)", "synthetic (own index)")


def _e2e_gen_options(args) -> Dict[str, Any]:
    """Decode options of the end-to-end runs, explicit (so a later change of a default does not
    mix two settings in one memo) and part of every memo key."""
    return {"max_new_tokens": args.max_new_tokens, "no_repeat_ngram_size": int(args.no_repeat_ngram_size),
            "repetition_penalty": float(args.repetition_penalty)}


def load_decoder(args):
    from nbce_rag import NBCEDecoder

    return NBCEDecoder.from_pretrained(device="cpu", dtype=args.dtype)


def answer_memo(args, dec):
    """``gen(question, texts) -> answer text``, memoised on disk (outside the repository) by the
    question, the passages, the decoder, its dtype and the decode options: runs resume, and the
    methods of one run share the answers they have in common (gold only = new default when both
    keep the gold passage alone)."""
    import torch

    from nbce_rag.types import Passage

    opts = _e2e_gen_options(args)
    tag = hashlib.sha1(json.dumps([dec.name, args.dtype]).encode()).hexdigest()[:10]
    memo_path = Path(args.cache) / f"labelfree_answers_{tag}.jsonl"
    memo: Dict[str, str] = {}
    if memo_path.exists():
        for line in open(memo_path, encoding="utf-8"):
            o = json.loads(line)
            memo[o["key"]] = o["text"]

    def gen(q: str, texts: List[str], scores: Optional[List[float]] = None) -> str:
        """``scores``: the retriever's cosines (what the pipeline passes); ``None``: the decoder scores them."""
        key = hashlib.sha1(json.dumps([q, texts, opts]).encode()).hexdigest()
        if key not in memo:
            sc = [None] * len(texts) if scores is None else [float(x) for x in scores]
            with torch.inference_mode():
                memo[key] = dec.generate(q, [Passage(text=t, score=x) for t, x in zip(texts, sc)], **opts).text
            with open(memo_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "text": memo[key]}) + "\n")
        return memo[key]

    return gen


def keep_rules(args, targets: Sequence[float], k: int = 20, rows_share: float = 0.6):
    """The ``keep`` rule :func:`~nbce_rag.filtering.decisions.calibrate_keep` fits for each macro
    keep-recall target on the pooled calibration splits (top ``k``, :data:`QUERIES` per data set,
    as ``build_prior``): ``(rows, sets, candidates, cache)``, one row per target with its
    threshold, margin, rows and per-data-set keep-recall."""
    from nbce_rag.filtering.decisions import calibrate_keep as api_keep
    from nbce_rag.filtering.decisions import keep_mask

    enc = load_encoder(args.encoder)
    cache = _cache(args, enc)
    sets = {ds: load_labelled(Path(args.data), ds, "cal") for ds in DATASETS}
    cand = {ds: candidates(sets[ds], cache.encode, k, n_queries=QUERIES, seed=args.seed) for ds in DATASETS}
    S = np.concatenate([cand[d]["S"] for d in DATASETS])
    Y = np.concatenate([cand[d]["Y"] for d in DATASETS])
    G = np.repeat(np.arange(S.shape[0]), k)
    rows = []
    for t in targets:
        r = api_keep(S.ravel(), Y.ravel(), G, recall_target=t, n_bootstrap=0)
        per = {}
        for d in DATASETS:
            Sd = cand[d]["S"]
            km = keep_mask(Sd.ravel(), np.repeat(np.arange(Sd.shape[0]), Sd.shape[1]), r["threshold"],
                           r["margin"]).reshape(Sd.shape)
            per[d] = {"keep_recall": macro_recall(km, cand[d]["Y"]), "rows": float(km.sum(1).mean())}
        rows.append({"target": t, "threshold": r["threshold"], "margin": r["margin"], "rows": r["stats"]["rows"],
                     "keep_recall": r["stats"]["keep_recall"], "per_dataset": per,
                     "rows_ok": r["stats"]["rows"] <= rows_share * k})
    return rows, sets, cand, cache


def new_default_selector(path: str):
    """``select(S_row) -> keep mask`` of a prior file, through the package's filter (its rows rule)."""
    th = MarginThreshold.load(path)

    def select(s: np.ndarray) -> np.ndarray:
        return th.keep_mask(np.asarray(s, float), np.zeros(len(s)))

    select.threshold = th  # type: ignore[attr-defined]
    return select


def e2e_selectors(args, dec: Any = None) -> Dict[str, Any]:
    """Method name -> ``select(S_row) -> keep mask`` (over one question's candidates, best first).

    ``prior f0.5 (v1 default)``: the prior shipped before issue 23 (f0.5 objective, threshold
    0.4966, margin 0; a copy in ``results/filter_prior_v1.json``). ``new default``: the rows
    rule (``keep``) of the two-decision prior file ``--new-prior``, through the package's filter."""
    sel: Dict[str, Any] = {"prior f0.5 (v1 default)": new_default_selector(str(RESULTS / "filter_prior_v1.json"))}
    if getattr(args, "new_prior", None):
        sel["new default"] = new_default_selector(args.new_prior)
    targets = [float(m.split("@", 1)[1]) for m in args.methods if m.startswith("keep@")]
    if targets:  # issue 23 item 6: the keep rule of each target, fitted on the calibration splits
        from nbce_rag.filtering.decisions import keep_mask

        for r in keep_rules(args, targets)[0]:
            def select(s: np.ndarray, t=r["threshold"], m=r["margin"]) -> np.ndarray:
                return keep_mask(np.asarray(s, float), np.zeros(len(s)), t, m)

            select.rule = {k: r[k] for k in ("target", "threshold", "margin", "rows", "keep_recall")}  # type: ignore[attr-defined]
            sel[f"keep@{r['target']:g}"] = select
    if "labelled (cal split)" in args.methods:
        sel["labelled (cal split)"] = {ds: _labelled_keep(args, ds) for ds in args.e2e_datasets}
    if "synthetic (own index)" in args.methods:
        sel["synthetic (own index)"] = {(sp, ds): _synthetic_keep(args, ds, sp, dec)
                                        for ds in args.e2e_datasets for sp in args.splits}
    return sel


def _labelled_keep(args, ds: str):
    """The labelled recipe's rows rule for data set ``ds``: ``calibrate_keep`` (the default macro
    keep-recall target) on its own calibration split's top-20 candidates (qrels as labels)."""
    from nbce_rag.filtering.decisions import DEFAULT_KEEP_RECALL_TARGET, calibrate_keep, keep_mask

    enc = load_encoder(args.encoder)
    c = candidates(load_labelled(Path(args.data), ds, "cal"), _cache(args, enc).encode, 20, n_queries=QUERIES,
                   seed=args.seed)
    G = np.repeat(np.arange(c["S"].shape[0]), c["S"].shape[1])
    r = calibrate_keep(c["S"].ravel(), c["Y"].ravel(), G, recall_target=DEFAULT_KEEP_RECALL_TARGET, n_bootstrap=0)

    def select(s: np.ndarray, t=r["threshold"], m=r["margin"]) -> np.ndarray:
        return keep_mask(np.asarray(s, float), np.zeros(len(s)), t, m)

    select.rule = {"dataset": ds, "threshold": r["threshold"], "margin": r["margin"],  # type: ignore[attr-defined]
                   "rows_cal": r["stats"]["rows"], "keep_recall_cal": r["stats"]["keep_recall"]}
    return select


def _synthetic_keep(args, ds: str, split: str, dec):
    """The synthetic recipe as a user runs it (``nbce-rag calibrate --synthetic`` on their index):
    ``synthetic_calibration`` over an index of the split's own passages, the decoder writing
    questions about 200 sampled chunks (k = 20, filter_top 3, no bootstrap); the calibration is
    kept in ``--cache`` so a rerun does not write the questions again."""
    from nbce_rag import MarginThreshold, VectorIndex
    from nbce_rag.filtering.synthetic import synthetic_calibration

    path = Path(args.cache) / f"synthetic_keep_{ds}_{split}_{dec.name.split()[0]}.json"
    if path.exists():
        th = MarginThreshold.load(path)
    else:
        ls = load_labelled(Path(args.data), ds, split)
        index = VectorIndex.build(load_encoder(args.encoder), [{"id": str(i), "text": t} for i, t in enumerate(ls.passages)],
                                  show_progress_bar=False)
        th = synthetic_calibration(index, dec, n=200, k=20, filter_top=3, seed=args.seed, n_bootstrap=0)
        th.save(path)

    def select(s: np.ndarray) -> np.ndarray:
        return th.keep_mask(np.asarray(s, float), np.zeros(len(s)))

    select.rule = {"dataset": ds, "split": split, "threshold": th.keep.threshold, "margin": th.keep.margin,  # type: ignore[attr-defined]
                   "n_questions_kept": th.stats.get("synthetic", {}).get("n_kept")}
    return select


def stage_e2e(args) -> Dict[str, Any]:
    """Answer accuracy with 20 candidates (issue 15 §5b; issue 23 §4): per method, the same
    seeded questions of each data set (paired), contains-gold accuracy, rows per question."""
    from nbce_rag.files import write_json

    enc = load_encoder(args.encoder)
    cache = _cache(args, enc)
    dss = args.e2e_datasets
    splits = args.splits
    sets = {ds: {sp: load_labelled(Path(args.data), ds, sp) for sp in splits} for ds in dss}
    dec = load_decoder(args)
    selectors = e2e_selectors(args, dec)
    methods = [m for m in args.methods]
    gen = answer_memo(args, dec)
    out_path = Path(args.results) / f"filter_labelfree-e2e{args.tag}.partial.json"
    out: Dict[str, Any] = {"stage": "labelfree-e2e", "candidates": 20, "n_questions": args.n_questions,
                           "decode_options": _e2e_gen_options(args), "dtype": args.dtype, "decoder": dec.name,
                           "encoder": enc.identity, "methods": methods,
                           "metric": "normalised gold answer contained in the normalised answer", "rows": {}}
    if out_path.exists() and args.resume:
        old = json.loads(out_path.read_text())
        out["rows"].update(old.get("rows", {}))
    t0 = time.time()
    cands = {(sp, ds): candidates(sets[ds][sp], cache.encode, 20, n_queries=args.n_questions, seed=args.seed + 1)
             for sp in splits for ds in dss}
    n_max = max(len(c["qids"]) for c in cands.values())
    # round robin over blocks of --block questions, so that a run cut short has the same share
    # of every data set and method (paired)
    for b0 in range(0, n_max, args.block):
        for (sp, ds), c in cands.items():
            ls = sets[ds][sp]
            row = out["rows"].setdefault(f"{sp}:{ds}", {"per_question": {}})
            row["n"] = len(c["qids"])
            row["gold_in_top20"] = float((c["Y"].sum(1) > 0).mean())
            for name in methods:
                per = row["per_question"].setdefault(name, {})
                for i in range(b0, min(b0 + args.block, len(c["qids"]))):
                    q = c["qids"][i]
                    if q in per:
                        continue
                    rows = [int(r) for r in c["rows"][i]]
                    if name == "gold only":
                        sel = sorted(ls.qrels[q])
                    elif name == "closed-book":
                        sel = []
                    elif name.startswith("no filter"):
                        sel = rows
                    else:
                        fn = selectors[name]
                        if isinstance(fn, dict):  # a rule per data set (labelled) or per split and set (synthetic)
                            fn = fn[(sp, ds)] if (sp, ds) in fn else fn[ds]
                        keep = fn(c["S"][i])
                        sel = [r for r, kk in zip(rows, keep) if kk]
                    if not sel and name not in ("closed-book", "prior f0.5 (v1 default)"):
                        a = ""  # nothing kept: the two-decision rules abstain (counted wrong), never closed-book
                    else:
                        qv = cache.encode([ls.queries[q]])[0]
                        qv = qv / np.linalg.norm(qv)
                        a = gen(ls.queries[q], [ls.passages[r] for r in sel], [float(c["P"][r] @ qv) for r in sel])
                    per[q] = {"correct": bool(correct(a, ls.answers[q])), "rows": len(sel),
                              "gold_kept": bool(any(r in ls.qrels[q] for r in sel)), "answer": a}
                done = list(per.values())
                if done:
                    print(f"{sp} {ds} {name:26s} acc {np.mean([d['correct'] for d in done]):.3f} "
                          f"rows/q {np.mean([d['rows'] for d in done]):.2f} n {len(done)} ({time.time() - t0:.0f}s)",
                          flush=True)
                write_json(out_path, out)
    out["summary"] = e2e_summary(out)
    out["priors"] = {n: f.threshold.to_dict() for n, f in selectors.items() if hasattr(f, "threshold")}
    out["keep_rules"] = {n: (f.rule if hasattr(f, "rule") else [g.rule for g in f.values()])
                         for n, f in selectors.items() if hasattr(f, "rule") or isinstance(f, dict)}
    out["seconds"] = time.time() - t0
    return out


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n: int = 2000, seed: int = 0):
    """95% percentile interval of mean(a - b) over questions resampled with replacement."""
    rng = np.random.default_rng(seed)
    d = np.asarray(a, float) - np.asarray(b, float)
    if len(d) == 0:
        return None
    idx = rng.integers(0, len(d), size=(n, len(d)))
    m = d[idx].mean(1)
    return [float(np.percentile(m, 2.5)), float(np.percentile(m, 97.5))]


def e2e_summary(out: Dict[str, Any], ref: str = "no filter (20)") -> Dict[str, Any]:
    """Per split:data set and method: accuracy, rows per question, gold kept, and the paired
    bootstrap interval of (method - ``ref``) over the questions both answered."""
    summ: Dict[str, Any] = {}
    for key, row in out["rows"].items():
        per = row["per_question"]
        s: Dict[str, Any] = {}
        for name, d in per.items():
            qs = sorted(d)
            r = {"n": len(qs), "accuracy": float(np.mean([d[q]["correct"] for q in qs])) if qs else None,
                 "rows_per_question": float(np.mean([d[q]["rows"] for q in qs])) if qs else None,
                 "gold_kept": float(np.mean([d[q]["gold_kept"] for q in qs])) if qs else None}
            if ref in per and name != ref:
                both = sorted(set(qs) & set(per[ref]))
                r["paired_n"] = len(both)
                r["delta_vs_no_filter"] = (float(np.mean([d[q]["correct"] for q in both]) -
                                           np.mean([per[ref][q]["correct"] for q in both])) if both else None)
                r["delta_ci95"] = paired_bootstrap([d[q]["correct"] for q in both], [per[ref][q]["correct"] for q in both])
                r["rows_vs_no_filter"] = (float(np.sum([d[q]["rows"] for q in both]) /
                                          max(1, np.sum([per[ref][q]["rows"] for q in both]))) if both else None)
            s[name] = r
        summ[key] = s
    return summ


def build_shipped_prior(args) -> MarginThreshold:
    """The shipped prior: build_prior (the package recipe) on the cached embeddings."""
    enc = load_encoder(args.encoder)
    cache = _cache(args, enc)
    return build_prior(enc, args.data, k=10, encode=cache.encode, n_bootstrap=args.bootstrap,
                       objective=args.objective)


def markdown(res: Dict[str, Any]) -> str:
    """The RESULTS_filter.md tables of a ``labelfree`` result."""
    lines: List[str] = []
    for obj, r in res["objectives"].items():
        lines.append(f"\n**objective `{obj}`** (P / R / F1, kept per query; evaluation splits, top-{res['k']})\n")
        dss = list(r["datasets"])
        lines.append("| method | " + " | ".join(dss) + " |")
        lines.append("|---|" + "---:|" * len(dss))
        names: List[str] = []
        for ds in dss:
            for n in r["datasets"][ds]["methods"]:
                if n not in names:
                    names.append(n)
        for n in names:
            cells = []
            for ds in dss:
                m = r["datasets"][ds]["methods"].get(n)
                cells.append("n/a" if m is None else
                             f"{m['precision']:.3f} / {m['recall']:.3f} / **{m['f1']:.3f}** ({m['kept_per_query']:.2f})")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
        for name, d in r["off_topic"].items():
            lines.append(f"- off-topic flagged unsupported, {name}: mean {d['mean_flagged']:.1%}, "
                         f"worst pair {d['min_flagged']:.1%} ("
                         + ", ".join(f"{k} {v:.0%}" for k, v in d["pairs"].items()) + ")")
        for name, d in r["in_domain_recall_vs_labelled"].items():
            lines.append(f"- in-domain recall / labelled recall, {name}: "
                         + ", ".join(f"{k} {v:.2f}" for k, v in d.items() if v is not None))
    return "\n".join(lines)


def e2e_markdown(out: Dict[str, Any]) -> str:
    """The RESULTS_filter.md table of an end-to-end result: accuracy (correct / questions), rows
    per question, gold kept, and the paired difference to no filter with its 95% interval."""
    summ = out.get("summary") or e2e_summary(out)
    methods = out.get("methods") or sorted({m for s in summ.values() for m in s})
    lines = ["| split:data set | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    for key, s in summ.items():
        cells = []
        for m in methods:
            r = s.get(m)
            if not r or not r["n"]:
                cells.append("—")
                continue
            c = f"{r['accuracy']:.1%} of {r['n']} ({r['rows_per_question']:.1f} rows; gold {r['gold_kept']:.0%})"
            if r.get("delta_ci95"):
                lo, hi = r["delta_ci95"]
                c += f"; Δ {r['delta_vs_no_filter']:+.1%} [{lo:+.1%}, {hi:+.1%}] on {r['paired_n']}"
            cells.append(c)
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stage_e2e_report(args) -> Dict[str, Any]:
    """Summarise a (possibly unfinished) end-to-end run from its partial file: what finished,
    paired on the questions every method answered."""
    part = Path(args.results) / f"filter_labelfree-e2e{args.tag}.partial.json"
    out = json.loads(part.read_text())
    # pair on the questions every method finished (a run cut short leaves ragged ends)
    for key, row in out["rows"].items():
        per = row["per_question"]
        common = set.intersection(*[set(d) for d in per.values()]) if per else set()
        row["per_question"] = {m: {q: d[q] for q in sorted(common)} for m, d in per.items()}
        row["n_finished_all_methods"] = len(common)
    out["summary"] = e2e_summary(out)
    out["markdown"] = e2e_markdown(out)
    out["partial_file"] = str(part)
    print(out["markdown"])
    return out
