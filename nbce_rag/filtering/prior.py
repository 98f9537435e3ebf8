"""Prior calibrations: a filter that works before the user has labelled anything.

An index without its own ``calibration.json`` would let every top-k candidate reach the
decoder. A *prior* is a :class:`~nbce_rag.filtering.threshold.MarginThreshold` calibrated once per
encoder on public labelled data from several domains (SciFact, SQuAD, NaturalQuestions,
HotpotQA: science claims, encyclopedic QA, web search questions, multi-hop questions), so it
is tuned to no single one. Priors ship inside the package (``nbce_rag/filtering/priors/*.json``) and
are found by the encoder identity they record: a prior is applied to an index only when its
identity's weight digest equals the index's encoder digest (never to another encoder).

Which calibration filters an index (:func:`resolve_calibration`), first found wins::

    DIR/calibration.json              labelled  (nbce-rag calibrate --queries --qrels)
    DIR/calibration.synthetic.json    synthetic (nbce-rag calibrate --synthetic; nbce_rag.filtering.synthetic)
    prior of the index's encoder      prior     (shipped, or NBCE_RAG_PRIOR_PATH, or nbce-rag calibrate --prior)
    nothing                           none      (every top-k candidate reaches the decoder)

The recipe (:func:`build_prior`, ``nbce-rag calibrate --prior --data DIR``) makes a prior for
any encoder: for each data set, the queries of its *calibration split* are searched in an
exact index of that data set's passages (top ``k``), the candidates are labelled by the
data set's gold passages, a fixed number of queries per data set is drawn (so no data set
dominates), and :meth:`MarginThreshold.calibrate` runs on the pooled candidates (query ids
prefixed by the data set: the relative margin and the bootstrap stay per query). The
evaluation splits (SciFact test, the other SQuAD articles, the other NQ questions, the
second half of the HotpotQA sample) are never used by the recipe.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from nbce_rag.errors import CalibrationError, CorruptFileError
from nbce_rag.retrieval.encoder import identities_match as _identities_match
from nbce_rag.filtering.threshold import CALIBRATION_FILENAME, MarginThreshold, _identity_of
from nbce_rag.filtering.objective import check_objective_option

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

#: Where the shipped priors live (package data: ``nbce_rag/filtering/priors/*.json``).
PRIOR_DIR = Path(__file__).resolve().parent / "priors"
#: Extra prior files or directories (``os.pathsep``-separated), searched before the shipped ones.
PRIOR_PATH_ENV = "NBCE_RAG_PRIOR_PATH"
#: File name of a synthetic calibration inside an index directory (nbce_rag.filtering.synthetic).
SYNTHETIC_FILENAME = "calibration.synthetic.json"
#: The data sets of the shipped recipe (folder names under the data directory).
DATASETS = ("scifact", "squad", "nq", "hotpotqa")

__all__ = [
    "PRIOR_DIR",
    "SYNTHETIC_FILENAME",
    "DATASETS",
    "ResolvedCalibration",
    "LabelledSet",
    "prior_files",
    "find_prior",
    "resolve_calibration",
    "load_labelled",
    "candidates",
    "build_prior",
]


# ============================================================================ finding priors


def prior_files(extra: Iterable[PathLike] = ()) -> List[Path]:
    """Prior files searched, in order: ``extra``, then ``$NBCE_RAG_PRIOR_PATH``, then the shipped ones.
    A directory contributes its ``*.json`` files (sorted)."""
    roots: List[Path] = [Path(p) for p in extra]
    env = os.environ.get(PRIOR_PATH_ENV)
    if env:
        roots += [Path(p) for p in env.split(os.pathsep) if p]
    roots.append(PRIOR_DIR)
    out: List[Path] = []
    for r in roots:
        if r.is_dir():
            out += sorted(r.glob("*.json"))
        elif r.is_file():
            out.append(r)
    return out


def find_prior(encoder: Any, *, extra: Iterable[PathLike] = ()) -> Optional[MarginThreshold]:
    """The prior calibration of ``encoder`` (an encoder, an index or an identity string), or
    ``None`` when no prior records that encoder's weight digest.

    Every prior file is read and validated: a corrupt one raises
    :class:`~nbce_rag.errors.CorruptFileError` naming it (a broken install must not silently
    turn the filter off). Priors of other encoders are skipped, never applied.
    """
    ident = _identity_of(encoder)
    if ident is None:
        return None
    for f in prior_files(extra):
        try:
            th = MarginThreshold.load(f)
        except CorruptFileError as e:
            raise CorruptFileError(f"prior calibration {f} is unreadable ({e}); reinstall nbce-rag, or remove "
                                   f"the file from {PRIOR_PATH_ENV}, or rebuild it with `nbce-rag calibrate --prior`") from None
        if not th.encoder_identity:
            raise CorruptFileError(f"prior calibration {f} records no encoder identity, so it cannot be matched "
                                   "to an encoder; rebuild it with `nbce-rag calibrate --prior`")
        if _identities_match(ident, th.encoder_identity):
            th.stats.setdefault("source", "prior")
            th.stats["prior_file"] = str(f)
            return th
    return None


@dataclass
class ResolvedCalibration:
    """The calibration that filters an index, and where it came from."""

    threshold: Optional[MarginThreshold]
    source: str  #: "labelled" | "synthetic" | "prior" | "none" (or "given" for one passed in)
    path: Optional[str] = None

    def describe(self) -> str:
        """One line for logs, ``nbce-rag ask`` and the answer's metadata."""
        if self.threshold is None:
            return "none (no calibration: every top-k candidate reaches the decoder)"
        th = self.threshold
        m = "none" if th.margin is None else f"{th.margin:.3f}"
        rule = f"threshold {th.threshold:.3f}, margin {m}"
        if self.source == "prior":
            ds = "+".join(th.stats.get("prior", {}).get("datasets", [])) or "public data"
            return f"prior for {th.encoder_identity} (calibrated on {ds}; {rule})"
        if self.source == "synthetic":
            n = th.stats.get("synthetic", {}).get("n_kept")
            return f"synthetic ({n} generated questions; {rule}) from {self.path}"
        return f"{self.source} ({rule}) from {self.path}" if self.path else f"{self.source} ({rule})"


def resolve_calibration(index_dir: Optional[PathLike], encoder: Any = None, *,
                        use_prior: bool = True) -> ResolvedCalibration:
    """The calibration an index is filtered with: labelled > synthetic > prior > none.

    ``encoder`` (the loaded index or its encoder) is checked against every file found (an
    index calibration of another encoder raises :class:`EncoderMismatchError`; a prior of
    another encoder is simply not a candidate).
    """
    if index_dir is not None:
        for name, source in ((CALIBRATION_FILENAME, "labelled"), (SYNTHETIC_FILENAME, "synthetic")):
            p = Path(index_dir) / name
            if p.exists():
                th = MarginThreshold.load(p, encoder=encoder)
                th.stats.setdefault("source", source)
                return ResolvedCalibration(th, source, str(p))
    if use_prior and encoder is not None:
        th = find_prior(encoder)
        if th is not None:
            return ResolvedCalibration(th, "prior", th.stats.get("prior_file"))
    return ResolvedCalibration(None, "none")


# ============================================================================ labelled data


@dataclass
class LabelledSet:
    """One data set's split as a retrieval problem: passages, queries and gold passages."""

    name: str
    split: str
    passages: List[str]
    queries: Dict[str, str]
    qrels: Dict[str, Dict[int, int]]  #: query id -> {passage row: 1}
    answers: Dict[str, List[str]] = field(default_factory=dict)  #: QA sets: gold answer strings


def _split_rows(n: int, split: str, seed: int) -> np.ndarray:
    order = np.random.default_rng(seed).permutation(n)
    half = n // 2
    if split in ("cal", "train"):
        return np.sort(order[:half])
    if split in ("eval", "test"):
        return np.sort(order[half:])
    raise CalibrationError(f"split must be 'cal' or 'eval', got {split!r}")


def load_labelled(data_dir: PathLike, name: str, split: str = "cal", *, seed: int = 0,
                  max_nq_passages: int = 500, max_scifact_passages: Optional[int] = 2000) -> LabelledSet:
    """Read one of :data:`DATASETS` from the shared data folder (see its README).

    ``split``: ``"cal"`` (what priors are made from) or ``"eval"`` (held out). SciFact: train /
    test qrels over the whole corpus. SQuAD v1.1 dev: articles split in two halves; passages =
    the paragraphs of the half's articles. NQ (lost-in-the-middle oracle): questions split in
    two halves; passages = the gold passages of up to ``max_nq_passages`` questions of the
    half. SciFact's 5,183 abstracts are cut to ``max_scifact_passages`` (every abstract relevant
    to a train or test query, then a seeded random draw of the others; ``None``: all), which
    keeps the recipe to minutes on a CPU. HotpotQA distractor (100 questions): halves of the questions; passages = their 10
    paragraphs each, 2 gold.
    """
    d = Path(data_dir)
    try:
        if name == "scifact":
            root = d / "beir_scifact"
            rows, ids = [], {}
            with open(root / "corpus.jsonl", encoding="utf-8") as f:
                for line in f:
                    o = json.loads(line)
                    ids[str(o["_id"])] = len(rows)
                    rows.append((o.get("title", "") + " " + o["text"]).strip())
            queries = {}
            with open(root / "queries.jsonl", encoding="utf-8") as f:
                for line in f:
                    o = json.loads(line)
                    queries[str(o["_id"])] = o["text"]
            def read(split_name: str) -> List[List[str]]:
                with open(root / "qrels" / f"{split_name}.tsv", encoding="utf-8") as f:
                    return [p for p in (line.split() for line in f)
                            if len(p) == 3 and p[2].lstrip("-").isdigit() and int(p[2]) > 0 and p[1] in ids]

            mine = read("train" if split in ("cal", "train") else "test")
            if max_scifact_passages is not None and max_scifact_passages < len(rows):
                rel = sorted({ids[p[1]] for sp in ("train", "test") for p in read(sp)})
                others = sorted(set(range(len(rows))) - set(rel))
                rng = np.random.default_rng(seed)
                n_more = max(0, max_scifact_passages - len(rel))
                pick = sorted(rel + [others[int(i)] for i in rng.choice(len(others), min(n_more, len(others)),
                                                                         replace=False)])
                old2new = {o: n for n, o in enumerate(pick)}
                rows = [rows[o] for o in pick]
                ids = {d: old2new[r] for d, r in ids.items() if r in old2new}
            qrels: Dict[str, Dict[int, int]] = {}
            for p in mine:
                qrels.setdefault(p[0], {})[ids[p[1]]] = 1
            return LabelledSet(name, split, rows, {q: queries[q] for q in qrels if q in queries},
                               {q: r for q, r in qrels.items() if q in queries})
        if name == "squad":
            js = json.load(open(d / "squad_v1.1" / "dev-v1.1.json", encoding="utf-8"))["data"]
            keep = _split_rows(len(js), split, seed)
            passages, queries, qrels, answers = [], {}, {}, {}
            for ai in keep:
                for p in js[int(ai)]["paragraphs"]:
                    row = len(passages)
                    passages.append(p["context"])
                    for qa in p["qas"]:
                        queries[qa["id"]] = qa["question"]
                        qrels[qa["id"]] = {row: 1}
                        answers[qa["id"]] = [a["text"] for a in qa["answers"]]
            return LabelledSet(name, split, passages, queries, qrels, answers)
        if name == "nq":
            with gzip.open(d / "lost_in_the_middle" / "nq-open-oracle.jsonl.gz", "rt", encoding="utf-8") as f:
                items = [json.loads(line) for line in f if line.strip()]
            keep = _split_rows(len(items), split, seed)[:max_nq_passages]
            passages, queries, qrels, answers = [], {}, {}, {}
            for i in keep:
                it = items[int(i)]
                c = it["ctxs"][0]
                row = len(passages)
                passages.append((c.get("title", "") + ". " + c["text"]).strip(". "))
                qid = f"nq{int(i)}"
                queries[qid], qrels[qid], answers[qid] = it["question"], {row: 1}, list(it["answers"])
            return LabelledSet(name, split, passages, queries, qrels, answers)
        if name == "hotpotqa":
            js = json.load(open(d / "hotpotqa_distractor_dev100" / "hotpot_dev_distractor_first100.json",
                                encoding="utf-8"))
            half = len(js) // 2
            sel = range(half) if split in ("cal", "train") else range(half, len(js))
            passages, queries, qrels, answers = [], {}, {}, {}
            for i in sel:
                x = js[i]
                ctx = x["context"]
                gold = set(x["supporting_facts"]["title"])
                qid = str(x.get("_id", x.get("id", i)))
                queries[qid], answers[qid], qrels[qid] = x["question"], [x["answer"]], {}
                for ti, se in zip(ctx["title"], ctx["sentences"]):
                    if ti in gold:
                        qrels[qid][len(passages)] = 1
                    passages.append(f"{ti}. " + "".join(se).strip())
            return LabelledSet(name, split, passages, queries, qrels, answers)
    except FileNotFoundError as e:
        raise CalibrationError(f"data set {name!r} is not under {d} ({e.filename} is missing); see "
                               "the data README, or leave it out with --datasets") from None
    raise CalibrationError(f"unknown data set {name!r}; choose among {', '.join(DATASETS)}")


Encode = Callable[[List[str]], np.ndarray]


def _normed(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def candidates(ls: LabelledSet, encode: Encode, k: int = 10, *, n_queries: Optional[int] = None,
               seed: int = 0, passage_vectors: Optional[np.ndarray] = None,
               queries_from: Optional[LabelledSet] = None) -> Dict[str, Any]:
    """Top-``k`` cosine candidates of ``ls``'s queries in an exact index of ``ls``'s passages.

    Returns ``{"S": (n, k) scores best first, "Y": (n, k) 0/1, "qids", "rows": (n, k) passage
    rows, "n_rel": relevant passages per query}``. ``n_queries`` draws that many queries
    (seeded). ``queries_from``: ask another set's queries against ``ls``'s passages (every
    candidate is then irrelevant: the off-topic case).
    """
    src = queries_from or ls
    qids = sorted(src.queries)
    if n_queries is not None and n_queries < len(qids):
        rng = np.random.default_rng(seed)
        qids = sorted(qids[int(i)] for i in rng.choice(len(qids), n_queries, replace=False))
    P = _normed(encode(ls.passages)) if passage_vectors is None else passage_vectors
    Q = _normed(encode([src.queries[q] for q in qids]))
    kk = min(k, P.shape[0])
    sims = Q @ P.T
    top = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
    S = np.take_along_axis(sims, top, 1)
    o = np.argsort(-S, axis=1, kind="stable")
    top, S = np.take_along_axis(top, o, 1), np.take_along_axis(S, o, 1).astype(np.float64)
    rel = src.qrels if queries_from is None else {}
    Y = np.array([[1 if int(j) in rel.get(q, {}) else 0 for j in row] for q, row in zip(qids, top)], dtype=np.int8)
    n_rel = np.array([len(rel.get(q, {})) for q in qids])
    return {"S": S, "Y": Y, "qids": qids, "rows": top, "n_rel": n_rel, "P": P}


def build_prior(
    encoder: Any,
    data_dir: PathLike,
    *,
    datasets: Sequence[str] = DATASETS,
    k: int = 10,
    queries_per_dataset: int = 300,
    encode: Optional[Encode] = None,
    seed: int = 0,
    show_progress: bool = False,
    off_topic: bool = True,
    **calibrate_kwargs: Any,
) -> MarginThreshold:
    """The prior recipe: calibrate ``encoder`` on the calibration splits of several data sets.

    ``encoder``: anything with ``encode(texts) -> (n, dim)`` and an ``identity`` (e.g.
    :class:`~nbce_rag.retrieval.encoder.CoSENTEncoder`); ``encode`` overrides how texts are embedded
    (e.g. a cache). Up to ``queries_per_dataset`` queries per data set, top-``k`` candidates
    each. ``keep``: recall first at ``keep_recall_target`` (default
    :data:`~nbce_rag.filtering.decisions.DEFAULT_KEEP_RECALL_TARGET`) unless an ``objective`` is
    given (then the single best-objective scan). ``support``: with ``off_topic`` (default), every
    data set's questions are also asked against every other data set's passages and their
    best-candidate scores are the off-topic questions of
    :func:`~nbce_rag.filtering.decisions.calibrate_support`. Other keyword arguments go to
    :meth:`MarginThreshold.calibrate` (``n_bootstrap``, ``flag_target``, ...). The result
    records the recipe in ``stats["prior"]``.
    """
    from nbce_rag.filtering.decisions import DEFAULT_KEEP_RECALL_TARGET

    check_objective_option(calibrate_kwargs)  # before encoding the data sets
    if not datasets:
        raise CalibrationError("a prior needs at least one data set")
    enc_fn: Encode = encode or (lambda texts: np.asarray(encoder.encode(list(texts)), dtype=np.float32))
    S_all, Y_all, G_all = [], [], []
    per: Dict[str, Any] = {}
    sets: Dict[str, Tuple[LabelledSet, np.ndarray]] = {}
    it: Iterable[str] = datasets
    if show_progress:
        from tqdm.auto import tqdm

        it = tqdm(list(datasets), desc="prior: data sets", unit="set")
    for name in it:
        ls = load_labelled(data_dir, name, "cal", seed=seed)
        c = candidates(ls, enc_fn, k, n_queries=queries_per_dataset, seed=seed)
        sets[name] = (ls, c["P"])
        S_all.append(c["S"].ravel())
        Y_all.append(c["Y"].ravel())
        G_all.append(np.repeat([f"{name}:{q}" for q in c["qids"]], c["S"].shape[1]))
        per[name] = {"queries": len(c["qids"]), "passages": len(ls.passages),
                     "relevant_in_candidates": int(c["Y"].sum()),
                     "queries_with_relevant": int((c["Y"].sum(1) > 0).sum())}
        logger.info("prior: %s: %d queries, %d passages, %d relevant candidates", name, len(c["qids"]),
                    len(ls.passages), int(c["Y"].sum()))
    off: List[float] = []
    pairs: Dict[str, int] = {}
    if off_topic and len(sets) > 1:
        for qa, (lq, _) in sets.items():
            for pb, (lp, P) in sets.items():
                if qa == pb:
                    continue
                c = candidates(lp, enc_fn, k, n_queries=queries_per_dataset, seed=seed, passage_vectors=P,
                               queries_from=lq)
                off.extend(c["S"].max(axis=1).tolist())
                pairs[f"{qa}->{pb}"] = len(c["qids"])
    calibrate_kwargs.setdefault("seed", seed)
    if calibrate_kwargs.get("objective") is None and calibrate_kwargs.get("keep_recall_target") is None:
        calibrate_kwargs["keep_recall_target"] = DEFAULT_KEEP_RECALL_TARGET
    if off:
        extra = calibrate_kwargs.pop("off_topic_max", None)
        calibrate_kwargs["off_topic_max"] = off + list(extra if extra is not None else [])
    th = MarginThreshold.calibrate(np.concatenate(S_all), np.concatenate(Y_all), np.concatenate(G_all),
                                   encoder_identity=_identity_of(encoder), **calibrate_kwargs)
    th.stats["k"] = int(k)
    th.stats["source"] = "prior"
    th.stats["prior"] = {"datasets": list(datasets), "split": "cal", "queries_per_dataset": int(queries_per_dataset),
                         "per_dataset": per, "seed": int(seed), "off_topic_pairs": pairs,
                         "recipe": "nbce-rag calibrate --prior --data DIR (nbce_rag.filtering.prior.build_prior)"}
    return th


def quiet_calibrate(*args: Any, **kwargs: Any) -> MarginThreshold:
    """:meth:`MarginThreshold.calibrate` with its thin-data warnings silenced (benchmarks)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MarginThreshold.calibrate(*args, **kwargs)
