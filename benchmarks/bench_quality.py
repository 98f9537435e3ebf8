"""Answer accuracy of NBCE (each pooling) vs concatenation vs closed-book, as passages grow,
and with the gold passage at each position.

Data (from ``--data``, default ``../shared/data``; skipped with a message when absent):

* ``squad``: SQuAD v1.1 dev; the gold paragraph plus other paragraphs of the same article
  (hard, same-topic distractors), topped up from other articles when an article is short.
  One question per article (dev has 48); more questions take a second paragraph per article.
* ``hotpot``: HotpotQA distractor dev (first 100); the 2 gold paragraphs plus its 8
  distractors, topped up with other questions' paragraphs for larger n.
* ``nq``: NaturalQuestions-Open with its gold passage (Lost-in-the-Middle "oracle" file);
  other questions' passages are the distractors.

Every passage carries a retrieval score (cosine of the bundled CoSENT encoder against the
question), as the pipeline would give it, so ``replug`` and ``scored_entropy`` can use it.
Metric: a gold answer string contained in the answer (case-insensitive, SQuAD-normalised),
and SQuAD token F1. Greedy decoding, the bundled SmolLM2-135M-Instruct.

Results are cached per (dataset, question, n, position, method) in ``--work`` so an
interrupted run resumes; the summary goes to ``benchmarks/results/quality.json`` and
``quality.png``.

    python benchmarks/bench_quality.py --datasets squad --questions 20

On a GPU machine without the data or the encoder, build the items (passages + retrieval
scores) here and run them there, sharded over processes:

    python benchmarks/bench_quality.py --export-items items.json.gz --questions 60
    python benchmarks/bench_quality.py --items items.json.gz --device cuda --shard 0/4 --work W &
    ...                                                                     --shard 3/4 --work W
    python benchmarks/bench_quality.py --summary-only --work W

Unscored passages and the ``posterior`` pooling (issue 14; ``--methods relevance`` = the
poolings of :data:`RELEVANCE`, ``u:`` = run as if the passages had no score). What ran on the
shared 2-core CPU, and the full run for a GPU::

    OMP_NUM_THREADS=1 python benchmarks/bench_quality.py --methods relevance-cpu --ns 5,10 \
        --positions "" --max-new-tokens 16 --threads 1 --work benchmarks/_work_relevance \
        --shard i/2 --deadline-min 58          # i = 0, 1 in parallel, then --summary-only
    python benchmarks/bench_quality.py --export-items items.json.gz --questions 60
    QUALITY_ARGS="--methods relevance --ns 5,10,20,50" bash benchmarks/run_gpu.sh OUT 30 items.json.gz 8
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import random
import re
import string
import sys
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
POOLINGS = ["min_entropy", "mean", "max", "replug", "scored_entropy"]
#: the study of issue 14 (passages without scores; the posterior pooling). "u:" = the pooling
#: run as if the passages carried no score (what a plain-passage path sees with scorer=None);
#: the others see the retrieval scores, which on this benchmark are the canonical cosine of
#: the bundled encoder, i.e. exactly what the decoder's default scorer gives unscored passages.
RELEVANCE = ["min_entropy", "replug", "posterior:product,static", "posterior:product,online",
             "u:posterior:question,static", "u:posterior:question,online", "scored_entropy", "posterior:scores,online"]
#: what fits a shared 2-core CPU (see README): the decision set of ``auto``
RELEVANCE_CPU = RELEVANCE[:6]
NOT_POOLINGS = ("closed", "concat", "filter")


def pooling_for(method: str):
    """The pooling of a method name; ``u:<name>`` hides the retrieval scores from it."""
    from nbce_rag.decoding.nbce import Pooling, get_pooling

    if not method.startswith("u:"):
        return method

    inner = get_pooling(method[2:])

    class Unscored(Pooling):
        name = method

        def needs_question_loglik(self, has_scores):
            return inner.needs_question_loglik(False)

        def begin(self, scores=None, question_loglik=None):
            return inner.begin(None, question_loglik)

        def __call__(self, logp, ent, scores, prev, eta):
            return inner(logp, ent, None, prev, eta)

    return Unscored()


# ------------------------------------------------------------------ metrics (SQuAD's)
def normalize(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def contains(pred: str, golds) -> bool:
    p = normalize(pred)
    return any(normalize(g) and normalize(g) in p for g in golds)


def f1(pred: str, golds) -> float:
    best = 0.0
    pt = normalize(pred).split()
    for g in golds:
        gt = normalize(g).split()
        common = collections.Counter(pt) & collections.Counter(gt)
        same = sum(common.values())
        if same:
            pr, rc = same / len(pt), same / len(gt)
            best = max(best, 2 * pr * rc / (pr + rc))
    return best


# ------------------------------------------------------------------ data
def load_squad(data: Path, nq: int, seed: int):
    d = json.loads((data / "squad_v1.1" / "dev-v1.1.json").read_text())["data"]
    rng = random.Random(seed)
    all_paras = [p["context"] for a in d for p in a["paragraphs"]]
    items = []
    arts = list(d)
    rng.shuffle(arts)
    # one question per article (48 in dev); past 48, a second pass draws another paragraph of
    # each article in the same order (the first 48 items do not change)
    for a in arts + arts:
        if len(items) == nq:
            break
        paras = a["paragraphs"]
        pi = rng.randrange(len(paras))
        qa = paras[pi]["qas"][rng.randrange(len(paras[pi]["qas"]))]
        same = [p["context"] for j, p in enumerate(paras) if j != pi]
        rng.shuffle(same)
        others = [p for p in all_paras if p not in same and p != paras[pi]["context"]]
        rng.shuffle(others)
        items.append({"question": qa["question"], "answers": [x["text"] for x in qa["answers"]],
                      "gold": [paras[pi]["context"]], "distractors": same + others[:100]})
    return items


def load_hotpot(data: Path, nq: int, seed: int):
    d = json.loads((data / "hotpotqa_distractor_dev100" / "hotpot_dev_distractor_first100.json").read_text())
    rng = random.Random(seed)

    def paras(ex):  # official [[title, sentences]] or the HF-datasets {"title": [...], "sentences": [...]}
        c = ex["context"]
        pairs = zip(c["title"], c["sentences"]) if isinstance(c, dict) else c
        return [(t, " ".join(s)) for t, s in pairs]

    def support(ex):
        f = ex["supporting_facts"]
        return set(f["title"]) if isinstance(f, dict) else {t for t, _ in f}

    pool = [f"{t}: {s}" for ex in d for t, s in paras(ex)]
    items = []
    for ex in d:
        if ex["answer"].lower() in ("yes", "no"):
            continue  # a contained "yes"/"no" says nothing
        sup = support(ex)
        gold = [f"{t}: {s}" for t, s in paras(ex) if t in sup]
        # the gold paragraph that contains the answer first (used alone at n=1)
        gold.sort(key=lambda g: ex["answer"].lower() not in g.lower())
        dis = [f"{t}: {s}" for t, s in paras(ex) if t not in sup]
        extra = [p for p in pool if all(p not in x for x in gold + dis)]
        rng.shuffle(extra)
        items.append({"question": ex["question"], "answers": [ex["answer"]], "gold": gold, "distractors": dis + extra[:100]})
        if len(items) == nq:
            break
    return items


def load_nq(data: Path, nq: int, seed: int):
    rows = []
    with gzip.open(data / "lost_in_the_middle" / "nq-open-oracle.jsonl.gz", "rt") as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) >= 400:
                break
    rng = random.Random(seed)
    texts = [f"{r['ctxs'][0]['title']}: {r['ctxs'][0]['text']}" for r in rows]
    items = []
    for i, r in enumerate(rows[:nq]):
        others = [t for j, t in enumerate(texts) if j != i]
        rng.shuffle(others)
        items.append({"question": r["question"], "answers": r["answers"], "gold": [texts[i]], "distractors": others[:100]})
    return items


LOADERS = {"squad": load_squad, "hotpot": load_hotpot, "nq": load_nq}


def passages_for(item, n: int, position=None):
    """n passages: the gold ones (at most n) and distractors; gold first at ``position`` if
    given, else a fixed pseudo-random order."""
    gold = item["gold"][: max(1, min(len(item["gold"]), n))]
    ps = list(item["distractors"][: n - len(gold)])
    if position is None:
        rng = random.Random(zlib.crc32(item["question"].encode()))  # stable across processes
        for g in gold:
            ps.insert(rng.randrange(len(ps) + 1), g)
    else:
        for j, g in enumerate(gold):
            ps.insert(min(position + j, len(ps)), g)
    return ps


# ------------------------------------------------------------------ run
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--datasets", default="squad,hotpot,nq")
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--ns", default="1,5,10,20,50")
    ap.add_argument("--methods", default="closed,concat," + ",".join(POOLINGS) + ",filter",
                    help="closed, concat, the poolings, and 'filter' (margin filter + default NBCE; needs scored items); "
                         "'relevance' = the issue-14 study: " + ";".join(RELEVANCE) + "; 'relevance-cpu' = its first 6")
    ap.add_argument("--positions", default="0,3,6,9", help="gold positions for the sweep at --position-n")
    ap.add_argument("--position-n", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--work", default=str(HERE / "_work"))
    ap.add_argument("--out", default=str(HERE / "results" / "quality.json"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--summary-only", action="store_true", help="only rewrite the JSON/PNG/markdown from the cache")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, mps")
    ap.add_argument("--dtype", default="float32", help="model dtype (fp32 by default on every device: comparable runs)")
    ap.add_argument("--dtypes", default=None, metavar="DT,DT",
                    help="compare model dtypes on the same questions (e.g. 'float32,bfloat16', issue 28): every NBCE "
                         "method runs once per dtype as METHOD@DTYPE (one decoder per dtype); the paired summary "
                         "compares each against the first dtype")
    ap.add_argument("--export-items", metavar="PATH", help="write the items (passages + retrieval scores) and exit")
    ap.add_argument("--items", metavar="PATH", help="read items written by --export-items instead of --data")
    ap.add_argument("--shard", default="0/1", help="i/k: run the questions with index %% k == i (parallel workers)")
    ap.add_argument("--deadline-min", type=float, default=None, help="start no new question after this many minutes")
    ap.add_argument("--decode-variants", default=None, metavar="NAME=JSON;...",
                    help="decode option sets to compare for every NBCE pooling, e.g. "
                    "'base={};rp1.2={\"repetition_penalty\": 1.2}': method POOLING+NAME each (one shared prefill)")
    ap.add_argument("--filter-k", type=int, default=20,
                    help="candidates per question for the filter's calibration (method 'filter')")
    args = ap.parse_args()
    work = Path(args.work)
    if args.summary_only:
        summarize(load_cache(work), args)
        return 0
    if args.items:
        with gzip.open(args.items, "rt") as f:
            all_items = json.load(f)
    else:
        data = Path(args.data)
        if not data.is_dir():
            print(f"no data at {data}; pass --data (see ../shared/data/README.md). Skipping.")
            return 0
        all_items = {}
        for ds in args.datasets.split(","):
            try:
                all_items[ds] = LOADERS[ds](data, args.questions, args.seed)
            except FileNotFoundError as e:
                print(f"{ds}: data missing ({e}); skipped")
    ns = [int(x) for x in args.ns.split(",")]
    if args.export_items:
        return export_items(all_items, max(ns + [args.position_n, args.filter_k]), args.export_items)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from nbce_rag import CoSENTEncoder, MarginThreshold, NBCEDecoder, Passage
    from nbce_rag.errors import PromptTooLongError

    dtypes = args.dtypes.split(",") if args.dtypes else None
    decs = {dt: NBCEDecoder.from_pretrained(device=args.device, dtype=dt) for dt in (dtypes or [args.dtype])}
    dec = decs[(dtypes or [args.dtype])[0]]
    enc = None if args.items else CoSENTEncoder.from_pretrained()
    shard_i, shard_k = map(int, args.shard.split("/"))
    work.mkdir(parents=True, exist_ok=True)
    cache = load_cache(work)
    cache_file = work / ("quality_cache.jsonl" if shard_k == 1 else f"quality_cache.shard{shard_i}of{shard_k}.jsonl")
    labels = {dt: f"{d.name}, {str(next(d.model.parameters()).dtype).replace('torch.', '')}, {d.device.type}" for dt, d in decs.items()}
    t_start = time.monotonic()
    methods = (RELEVANCE if args.methods == "relevance" else RELEVANCE_CPU if args.methods == "relevance-cpu" else args.methods.split(";" if ";" in args.methods else ","))
    variants = parse_variants(args.decode_variants)
    if variants:  # every pooling once per decode variant: "replug+base", "replug+rp1.2", ...
        methods = [f"{m}+{v}" for m in methods if m not in NOT_POOLINGS for v in variants] + [m for m in methods if m in NOT_POOLINGS]
    if dtypes:  # every pooling once per dtype: "replug@float32", "replug@bfloat16", ...
        methods = [f"{m}@{dt}" for m in methods if m not in NOT_POOLINGS for dt in dtypes] + [m for m in methods if m in NOT_POOLINGS]

    def key_of(ds, qi, n, pos, method):
        return f"{ds}|{qi}|{n}|{pos}|{method}|{args.max_new_tokens}"

    def record(rec, ans, item, ps, method, seconds):
        rec.update(model=labels[dtype_of(method) or (dtypes or [args.dtype])[0]], text=ans.text, correct=contains(ans.text, item["answers"]), f1=f1(ans.text, item["answers"]))
        if method not in ("closed", "concat") and ps:
            gold_idx = [i for i, t in enumerate(ps) if t in item["gold"]]
            rec["gold_share"] = sum(s.share for s in ans.sources if s.index in gold_idx)
        rec["seconds"] = seconds
        with open(cache_file, "a") as f:
            f.write(json.dumps(rec) + "\n")
        cache[rec["key"]] = rec

    thresholds = {}

    def threshold_for(ds, qi):
        """The margin filter calibrated on the *other* half of this data set's questions
        (2-fold cross-fitting: a question never calibrates its own threshold)."""
        fold = qi % 2
        if (ds, fold) not in thresholds:
            s_, y_, g_ = [], [], []
            for qj, it in enumerate(all_items[ds]):
                if qj % 2 == fold or "scores" not in it:
                    continue
                for t in passages_for(it, args.filter_k):
                    s_.append(it["scores"][t])
                    y_.append(int(t in it["gold"]))
                    g_.append(qj)
            thresholds[(ds, fold)] = MarginThreshold.calibrate(s_, y_, g_, n_bootstrap=200)
        return thresholds[(ds, fold)]

    def scored(item, ps):
        """The passages with their retrieval score: stored in the items, or the canonical
        cosine computed now (MarginThreshold.rescore, as the pipeline does)."""
        if "scores" in item:
            return [Passage(t, score=float(item["scores"][t])) for t in ps]
        return MarginThreshold.rescore(enc, item["question"], ps)

    def run_filter(ds, qi, item, n, ps):
        key = key_of(ds, qi, n, None, "filter")
        if key in cache:
            return
        th = threshold_for(ds, qi)
        fr = th.filter(scored(item, ps))
        kept = [p.text for p in fr.kept]
        rec = {"key": key, "dataset": ds, "q": qi, "n": n, "pos": None, "method": "filter",
               "kept": len(kept), "gold_kept": sum(t in item["gold"] for t in kept),
               "threshold": th.threshold, "margin": th.margin}
        t0 = time.perf_counter()
        ans = dec.generate(item["question"], kept, max_new_tokens=args.max_new_tokens)
        record(rec, ans, item, kept, "filter", time.perf_counter() - t0)

    def run_one(ds, qi, item, n, pos, methods_here):
        """Closed-book, concatenation, and every NBCE pooling of ``methods_here`` (these share
        one prefill through NBCEDecoder.compare)."""
        ps = passages_for(item, n, pos) if n else []
        if "filter" in methods_here and "scores" in item:
            run_filter(ds, qi, item, n, ps)
        todo = [m for m in methods_here if m != "filter" and key_of(ds, qi, n, pos, m) not in cache]
        if not todo:
            return
        for m in [m for m in todo if m in ("closed", "concat")]:
            rec = {"key": key_of(ds, qi, n, pos, m), "dataset": ds, "q": qi, "n": n, "pos": pos, "method": m}
            t0 = time.perf_counter()
            try:
                ans = (dec.generate(item["question"], [], max_new_tokens=args.max_new_tokens) if m == "closed"
                       else dec.generate_concat(item["question"], ps, max_new_tokens=args.max_new_tokens))
                record(rec, ans, item, ps, m, time.perf_counter() - t0)
            except PromptTooLongError as e:
                rec.update(overflow=True, correct=False, f1=0.0, text="", error=str(e)[:200], seconds=0.0)
                with open(cache_file, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                cache[rec["key"]] = rec
        all_pools = [m for m in todo if base_method(m) not in NOT_POOLINGS]
        for dt in (dtypes or [None]):  # one shared prefill per dtype
            pools = [m for m in all_pools if dtype_of(m) == dt]
            if not pools:
                continue
            t0 = time.perf_counter()
            opts = [dict({"pooling": pooling_for(base_method(m))}, **(variants[variant_of(m)] if variant_of(m) else {})) for m in pools]
            answers = decs[dt or args.dtype].compare(item["question"], scored(item, ps), opts, max_new_tokens=args.max_new_tokens)
            secs = (time.perf_counter() - t0) / len(pools)
            for m, ans in zip(pools, answers):
                rec = {"key": key_of(ds, qi, n, pos, m), "dataset": ds, "q": qi, "n": n, "pos": pos, "method": m}
                record(rec, ans, item, ps, m, secs)

    # question-major across datasets, so that a run stopped by --deadline-min has every cell
    # filled to about the same number of questions
    datasets = [ds for ds in args.datasets.split(",") if ds in all_items]
    longest = max((len(all_items[ds]) for ds in datasets), default=0)
    for qi in range(longest):
        if qi % shard_k != shard_i:
            continue
        if args.deadline_min is not None and time.monotonic() - t_start > 60 * args.deadline_min:
            print(f"deadline of {args.deadline_min} min reached before question {qi}; stopping", flush=True)
            break
        for ds in datasets:
            if qi >= len(all_items[ds]):
                continue
            item = all_items[ds][qi]
            if "closed" in methods:
                run_one(ds, qi, item, 0, None, ["closed"])
            for n in ns:
                run_one(ds, qi, item, n, None, [m for m in methods if m != "closed"])
            if ds == "squad" and args.positions:
                # NBCE is order-invariant by construction (tests/test_decoder.py proves it token
                # for token), so the sweep measures concatenation, min_entropy once as reference
                for pos in map(int, args.positions.split(",")):
                    run_one(ds, qi, item, args.position_n, pos, [m for m in ("concat", "min_entropy") if m in methods])
            print(f"  {ds} q{qi} done ({time.monotonic() - t_start:.0f} s)", flush=True)
    if shard_k == 1:
        summarize(cache, args)
    return 0


def base_method(method: str) -> str:
    """``"replug+rp1.2@bfloat16"`` -> ``"replug"`` (the pooling or method without variant and dtype)."""
    return method.split("@")[0].split("+")[0]


def variant_of(method: str):
    """The decode variant of a method name (``None`` without ``+``)."""
    m = method.split("@")[0]
    return m.split("+", 1)[1] if "+" in m else None


def dtype_of(method: str):
    """The dtype of a method name of a ``--dtypes`` run (``None`` without ``@``)."""
    return method.split("@", 1)[1] if "@" in method else None


def parse_variants(spec):
    """``"name={json};name2={json}"`` -> ``{name: options}`` (``None`` when not given)."""
    if not spec:
        return None
    out = {}
    for part in spec.split(";"):
        name, _, opts = part.partition("=")
        if not name.strip() or "+" in name or "|" in name:
            raise SystemExit(f"--decode-variants: bad variant name in {part!r}")
        out[name.strip()] = json.loads(opts or "{}")
    return out


def repeated_ngram(text: str, n: int = 4) -> bool:
    """Whether some n-gram of (SQuAD-normalised) words occurs twice in ``text``: the repetition
    measure (share of answers with a repeated 4-gram)."""
    w = normalize(text).split()
    grams = [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]
    return len(grams) != len(set(grams))


def load_cache(work: Path) -> dict:
    """Every cached answer in ``work`` (all shards' files)."""
    cache = {}
    for path in sorted(work.glob("quality_cache*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                cache[r["key"]] = r
    return cache


def export_items(all_items: dict, max_n: int, path: str) -> int:
    """Items with only the passages a run can use, each scored by the bundled CoSENT encoder
    against its question (what the pipeline's retriever would attach)."""
    from nbce_rag import CoSENTEncoder, MarginThreshold

    enc = CoSENTEncoder.from_pretrained()
    out = {}
    for ds, items in all_items.items():
        out[ds] = []
        for item in items:
            item = dict(item, distractors=item["distractors"][:max_n])
            texts = item["gold"] + item["distractors"]
            item["scores"] = {p.text: p.score for p in MarginThreshold.rescore(enc, item["question"], texts)}
            out[ds].append(item)
        print(f"{ds}: {len(out[ds])} items", flush=True)
    with gzip.open(path, "wt") as f:
        json.dump(out, f)
    print(f"wrote {path}")
    return 0


def summarize(cache, args):
    groups = collections.defaultdict(list)
    for r in cache.values():
        if not r["key"].endswith(f"|{args.max_new_tokens}"):
            continue
        groups[(r["dataset"], r["method"], r["n"], r["pos"])].append(r)
    rows = []
    for (ds, m, n, pos), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], -1 if kv[0][3] is None else kv[0][3])):
        rows.append({
            "dataset": ds, "method": m, "n": n, "gold_position": pos, "questions": len(rs),
            "accuracy": sum(r["correct"] for r in rs) / len(rs),
            "f1": sum(r["f1"] for r in rs) / len(rs),
            "overflow": sum(bool(r.get("overflow")) for r in rs),
            "gold_share": (sum(r.get("gold_share", 0) for r in rs) / len(rs)) if m not in ("closed", "concat") else None,
            "repeat4": sum(repeated_ngram(r.get("text", "")) for r in rs) / len(rs),
            "mean_words": sum(len(r.get("text", "").split()) for r in rs) / len(rs),
            "seconds_per_question": sum(r["seconds"] for r in rs) / len(rs),
        })
        if m == "filter":
            rows[-1].update(kept_per_question=sum(r["kept"] for r in rs) / len(rs),
                            gold_kept=sum(r["gold_kept"] > 0 for r in rs) / len(rs),
                            empty=sum(r["kept"] == 0 for r in rs) / len(rs))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    models_used = sorted({r.get("model", "SmolLM2-135M-Instruct (bundled GGUF), float32, cpu") for r in cache.values()})
    out.write_text(json.dumps({"model": models_used, "max_new_tokens": args.max_new_tokens,
                               "metric": "gold answer contained (SQuAD-normalised); f1 = SQuAD token F1",
                               "rows": rows}, indent=2))
    plot(rows, out.with_suffix(".png"))
    out.with_suffix(".md").write_text(markdown(rows))
    # one paired section per set of passage counts that ran the same poolings
    methods_at = collections.defaultdict(set)
    for r in cache.values():
        if r["key"].endswith(f"|{args.max_new_tokens}") and r["pos"] is None and r["method"] not in NOT_POOLINGS:
            methods_at[r["n"]].add(r["method"])
    groups = collections.defaultdict(list)
    for n, ms in sorted(methods_at.items()):
        groups[frozenset(ms)].append(n)
    baseline = f"replug@{args.dtypes.split(',')[0]}" if getattr(args, "dtypes", None) else "replug"
    sections = [paired_markdown(cache, args.max_new_tokens, baseline=baseline, ns=ns) for ns in groups.values()]
    if any(sections):
        out.with_name(out.stem + "_paired.md").write_text("\n".join(x for x in sections if x))


def paired_markdown(cache, max_new_tokens, baseline: str = "replug", seed: int = 0, ns=None) -> str:
    """The poolings on the same questions only (every question-cell where every NBCE method of
    the run answered; ``ns``: only these passage counts): per cell contains-gold accuracy % (F1 %,
    gold share), and per method its paired difference in accuracy against ``baseline`` over all
    those question-cells (points, 95% bootstrap interval over question-cells) with wins/losses.
    Empty when no cell has them."""
    import numpy as np

    by_q = collections.defaultdict(dict)
    for r in cache.values():
        if (r["key"].endswith(f"|{max_new_tokens}") and r["pos"] is None and r["method"] not in NOT_POOLINGS
                and (ns is None or r["n"] in ns)):
            by_q[(r["dataset"], r["n"], r["q"])][r["method"]] = r
    methods = sorted({m for d in by_q.values() for m in d}, key=lambda m: (RELEVANCE + [m]).index(m))
    full = {k: d for k, d in by_q.items() if all(m in d for m in methods)}
    if not full or baseline not in methods:
        return ""
    cells = sorted({(ds, n) for ds, n, _ in full})

    def fmt(rs):
        return (f"{100 * np.mean([r['correct'] for r in rs]):.0f} ({100 * np.mean([r['f1'] for r in rs]):.0f}, "
                f"{np.mean([r.get('gold_share', 0) for r in rs]):.2f})")

    lines = [f"Paired, n = {', '.join(str(n) for n in sorted({n for _, n, _ in full}))}: only question-cells where "
             "every method answered. Cells: contains-gold accuracy % (SQuAD F1 %, share of answer tokens from gold passages).", "",
             "| cell | q | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for ds, n in cells:
        qs = [d for (d_, n_, _), d in full.items() if (d_, n_) == (ds, n)]
        lines.append(f"| {ds} n={n} | {len(qs)} | " + " | ".join(fmt([d[m] for d in qs]) for m in methods) + " |")
    every = list(full.values())
    lines.append(f"| all | {len(every)} | " + " | ".join(fmt([d[m] for d in every]) for m in methods) + " |")
    lines += ["", f"Accuracy difference against `{baseline}` on the same {len(every)} question-cells "
              "(points; 95% bootstrap interval, 2000 resamples of question-cells; wins/losses = questions only one of the two got right):", "",
              "| method | difference | 95% interval | wins | losses |", "|---|---:|---|---:|---:|"]
    rng = np.random.default_rng(seed)
    base = np.array([d[baseline]["correct"] for d in every], dtype=float)
    for m in methods:
        if m == baseline:
            continue
        x = np.array([d[m]["correct"] for d in every], dtype=float) - base
        boot = [x[rng.integers(0, len(x), len(x))].mean() for _ in range(2000)]
        lo, hi = np.percentile(boot, [2.5, 97.5])
        lines.append(f"| {m} | {100 * x.mean():+.1f} | [{100 * lo:+.1f}, {100 * hi:+.1f}] | {int((x > 0).sum())} | {int((x < 0).sum())} |")
    return "\n".join(lines) + "\n"


def markdown(rows) -> str:
    """Accuracy (F1, gold share) per dataset, method and n, as a markdown table."""
    ns = sorted({r["n"] for r in rows if r["gold_position"] is None and r["n"]})
    lines = []
    for ds in sorted({r["dataset"] for r in rows}):
        lines.append(f"**{ds}** — contains-gold accuracy % (SQuAD F1 %, share of answer tokens from gold passages; "
                     "answers with a repeated word 4-gram %); questions per cell")
        lines.append("")
        lines.append("| method | " + " | ".join(f"n={n}" for n in ns) + " |")
        lines.append("|---|" + "---|" * len(ns))
        present = {r["method"] for r in rows if r["dataset"] == ds}
        order = ["closed", "concat"] + POOLINGS + [m for m in RELEVANCE if m not in POOLINGS] + ["filter"]
        for m in [m for m in order if m in present] + sorted(present - set(order)):
            cells = []
            for n in ns:
                r = next((r for r in rows if r["dataset"] == ds and r["method"] == m and r["gold_position"] is None
                          and (r["n"] == n or (m == "closed" and r["n"] == 0))), None)
                if r is None:
                    cells.append("–")
                    continue
                share = "" if r["gold_share"] is None else f", {r['gold_share']:.2f}"
                ovf = f", {r['overflow']} overflow" if r["overflow"] else ""
                if m == "filter":
                    ovf += f", kept {r['kept_per_question']:.1f}/q"
                cells.append(f"{100 * r['accuracy']:.0f} ({100 * r['f1']:.0f}{share}; rep {100 * r['repeat4']:.0f}{ovf}); {r['questions']}q")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    pos = [r for r in rows if r["gold_position"] is not None]
    if pos:
        lines.append("**gold position sweep** (squad, n=%d): " % pos[0]["n"] + "; ".join(
            f"{r['method']} @ {r['gold_position']}: {100 * r['accuracy']:.0f}% ({r['questions']}q)" for r in pos))
    return "\n".join(lines) + "\n"


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dss = sorted({r["dataset"] for r in rows})
    if not dss:
        return
    fig, axes = plt.subplots(1, len(dss) + 1, figsize=(5 * (len(dss) + 1), 4), squeeze=False)
    for ax, ds in zip(axes[0], dss):
        for m in ["concat"] + POOLINGS + [m for m in RELEVANCE if m not in POOLINGS] + ["filter"]:
            rs = sorted((r for r in rows if r["dataset"] == ds and r["method"] == m and r["gold_position"] is None), key=lambda r: r["n"])
            if rs:
                ax.plot([r["n"] for r in rs], [100 * r["accuracy"] for r in rs], "o-", label=m)
        cb = [r for r in rows if r["dataset"] == ds and r["method"] == "closed"]
        if cb:
            ax.axhline(100 * cb[0]["accuracy"], color="gray", ls="--", label="closed-book")
        ax.set_xscale("log")
        ax.set_title(f"{ds}: accuracy vs passages")
        ax.set_xlabel("passages (gold + distractors)")
        ax.set_ylabel("answer contains gold (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    ax = axes[0][-1]
    for m in ("concat", "min_entropy"):
        rs = sorted((r for r in rows if r["dataset"] == "squad" and r["method"] == m and r["gold_position"] is not None), key=lambda r: r["gold_position"])
        if rs:
            ax.plot([r["gold_position"] for r in rs], [100 * r["accuracy"] for r in rs], "o-", label=m)
    ax.set_title("squad: gold passage position (n=10)")
    ax.set_xlabel("position of the gold passage")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
