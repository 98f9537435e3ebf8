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
from typing import Any, Dict, List, Optional

import numpy as np

from nbce_rag.filtering.prior import DATASETS, LabelledSet, build_prior, candidates, load_labelled, quiet_calibrate
from nbce_rag.filtering.threshold import MarginThreshold, prf

from filter_common import EmbCache, correct, load_encoder

OBJECTIVES = ("f1", "f0.5", "coverage0.9")
FIXED = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
QUERIES = 300  # per data set and split (seeded draw)


def _sets(data: Path) -> Dict[str, Dict[str, LabelledSet]]:
    return {ds: {sp: load_labelled(data, ds, sp) for sp in ("cal", "eval")} for ds in DATASETS}


def _cache(args, enc, part: str = ""):
    """The embedding cache; ``part`` names a second file a parallel encode job writes (read too)."""
    key = hashlib.sha1(enc.identity.encode()).hexdigest()[:12]
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


def stage_e2e(args) -> Dict[str, Any]:
    """Answer accuracy with 20 candidates, per objective's prior (and no filter, gold only)."""
    import torch

    from nbce_rag import NBCEDecoder
    from nbce_rag.files import write_json
    from nbce_rag.types import Passage

    enc = load_encoder(args.encoder)
    cache = _cache(args, enc)
    sets = {ds: {sp: load_labelled(Path(args.data), ds, sp) for sp in ("cal", "eval")} for ds in DATASETS}
    k_cal = 10
    cand_cal = {ds: candidates(sets[ds]["cal"], cache.encode, k_cal, n_queries=QUERIES, seed=args.seed) for ds in DATASETS}
    priors = {}
    for obj in OBJECTIVES:
        S = np.concatenate([cand_cal[d]["S"].ravel() for d in DATASETS])
        Y = np.concatenate([cand_cal[d]["Y"].ravel() for d in DATASETS])
        G = np.concatenate([np.repeat([f"{d}:{q}" for q in cand_cal[d]["qids"]], k_cal) for d in DATASETS])
        priors[obj] = quiet_calibrate(S, Y, G, n_bootstrap=0, objective=obj, encoder_identity=enc.identity)
    dec = NBCEDecoder.from_pretrained(device="cpu")
    memo_path = Path(args.cache) / "labelfree_answers.jsonl"
    memo: Dict[str, str] = {}
    if memo_path.exists():
        for line in open(memo_path, encoding="utf-8"):
            o = json.loads(line)
            memo[o["key"]] = o["text"]

    def gen(q: str, texts: List[str]) -> str:
        key = hashlib.sha1(json.dumps([q, texts, args.max_new_tokens]).encode()).hexdigest()
        if key not in memo:
            with torch.inference_mode():
                memo[key] = dec.generate(q, [Passage(text=t) for t in texts], max_new_tokens=args.max_new_tokens).text
            with open(memo_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "text": memo[key]}) + "\n")
        return memo[key]

    out: Dict[str, Any] = {"stage": "labelfree-e2e", "candidates": 20, "n_questions": args.n_questions,
                           "max_new_tokens": args.max_new_tokens, "decoder": dec.name, "encoder": enc.identity,
                           "metric": "normalised gold answer contained in the normalised answer", "rows": {}}
    t0 = time.time()
    for sp in ("cal", "eval"):
        for ds in ("squad", "nq"):
            c = candidates(sets[ds][sp], cache.encode, 20, n_queries=args.n_questions, seed=args.seed + 1)
            ls = sets[ds][sp]
            acc: Dict[str, float] = {}
            stats: Dict[str, Any] = {}
            for name in ("gold only", *[f"prior {o}" for o in OBJECTIVES], "no filter (20)", "closed-book"):
                n_ok, kept, gold = 0, 0, 0
                for i, q in enumerate(c["qids"]):
                    rows = [int(r) for r in c["rows"][i]]
                    if name == "gold only":
                        sel = sorted(ls.qrels[q])
                    elif name == "closed-book":
                        sel = []
                    elif name.startswith("prior"):
                        th = priors[name.split()[1]]
                        keep = th.keep_mask(c["S"][i], np.zeros(len(rows)))
                        sel = [r for r, kk in zip(rows, keep) if kk]
                    else:
                        if args.skip_all:
                            break
                        sel = rows
                    kept += len(sel)
                    gold += any(r in ls.qrels[q] for r in sel)
                    n_ok += correct(gen(ls.queries[q], [ls.passages[r] for r in sel]), ls.answers[q])
                else:
                    nq = len(c["qids"])
                    acc[name] = n_ok / nq
                    stats[name] = {"kept_per_question": kept / nq, "gold_kept": gold / nq}
                print(f"{sp} {ds} {name:20s} acc {acc.get(name, float('nan')):.3f} "
                      f"kept/q {stats.get(name, {}).get('kept_per_question', float('nan')):.2f} ({time.time() - t0:.0f}s)",
                      flush=True)
            out["rows"][f"{sp}:{ds}"] = {"accuracy": acc, "filter": stats, "n": len(c["qids"]),
                                         "gold_in_top20": float((c["Y"].sum(1) > 0).mean())}
            write_json(Path(args.results) / "filter_labelfree-e2e.partial.json", out)
    out["priors"] = {o: p.to_dict() for o, p in priors.items()}
    out["seconds"] = time.time() - t0
    return out


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
