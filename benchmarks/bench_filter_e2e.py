"""The ``e2e`` stage of bench_filter.py (run through it: ``python benchmarks/bench_filter.py e2e
...``): answer accuracy of filter + NBCE vs NBCE on all candidates vs concatenation on SQuAD
v1.1 dev questions with same-article distractors, as the candidates grow."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np

from nbce_rag.filtering.threshold import MarginThreshold, plot_distributions

from filter_common import RESULTS, EmbCache, correct, load_encoder, machine


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


def stage_e2e(args) -> Dict[str, Any]:
    import warnings

    import torch

    from nbce_rag import NBCEDecoder
    from nbce_rag.errors import PromptTooLongError
    from nbce_rag.types import Passage

    n_max = max(args.candidates)
    ev_items, cal_items = _squad_split(Path(args.data), args.n_questions, args.n_calibration, args.seed, n_max)
    enc = load_encoder(args.encoder)
    cache = EmbCache(enc, Path(args.cache) / f"squad_emb_{hashlib.sha1(enc.identity.encode()).hexdigest()[:12]}.npz")

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

    from nbce_rag.files import write_json

    t_start = time.time()
    n = len(ev_items)
    # A. references independent of the candidate count
    ref = {"closed_book": 0, "nbce_gold_only": 0}
    for it in ev_items:
        ref["closed_book"] += correct(gen("nbce", it["question"], ()), it["answers"])
        ref["nbce_gold_only"] += correct(gen("nbce", it["question"], (it["gold"],)), it["answers"])
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
            acc["filter_nbce"] += correct(a_f, ans)
            acc["top1_nbce"] += correct(gen("nbce", q, (hits[0].text,)), ans)
            st["kept"] += len(fr.kept)
            st["gold_kept"] += any(h.id == "0" for h in fr.kept)
            st["empty"] += fr.empty
            st["empty_correct"] += fr.empty and correct(a_f, ans)
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
            acc["nbce_all"] += correct(gen("nbce", q, texts), ans)
            acc["concat_all"] += correct(gen("concat", q, texts), ans)
        rows[n_c].update({k: v / n for k, v in acc.items()}, baseline_seconds=time.time() - t0)
        r = rows[n_c]
        print(f"{n_c:3d} candidates: filter+NBCE {r['filter_nbce']:.3f}  NBCE all {r['nbce_all']:.3f}  "
              f"concat {r['concat_all']:.3f} ({r['baseline_seconds']:.0f}s)", flush=True)
        write_json(RESULTS / "filter_e2e.partial.json", result())
    return result()
