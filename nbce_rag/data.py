"""Readers for CoSENT training data.

Three sources give ``(text1, text2, score)`` pairs, the input of :meth:`CoSENTEncoder.fit`:

* **STS-B TSV** (``genre file year id score s1 s2 [...]``; only the first 7 fields are read,
  split on tabs without quoting because sentences contain ``"``). Gold scores 0-5.
* **CSV / JSONL** with the columns ``text1, text2, score`` (``sentence1``/``sentence2`` are
  accepted as aliases). A header row is required for CSV.
* **Retrieval qrels** (BEIR layout: ``corpus.jsonl``, ``queries.jsonl``, ``qrels/*.tsv``): every
  (query, relevant passage) pair, plus **hard negatives mined from an index** and random
  negatives, graded so that CoSENT sees an order (see :func:`qrels_to_pairs`).

Score scale: CoSENT only uses the *order* of the scores inside a batch, so the scale does
not change training. Scores are still normalised to ``[0, 1]`` so that they read like the
cosines they are compared with in reports: :func:`read_pairs` divides by 5 when the file is
STS-B, or when ``score_scale="auto"`` (the default) finds a score above 1 and none above 5.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from .errors import ConfigError, CorruptFileError

logger = logging.getLogger(__name__)

Pair = Tuple[str, str, float]
PathLike = Union[str, Path]

_TEXT1_KEYS = ("text1", "sentence1", "s1", "query", "anchor")
_TEXT2_KEYS = ("text2", "sentence2", "s2", "passage", "positive")
_SCORE_KEYS = ("score", "label", "similarity")


# --------------------------------------------------------------------------- pair files


def read_stsb(path: PathLike, *, normalize: bool = True) -> List[Pair]:
    """Read an STS-B file (``sts-train.csv`` etc., tab-separated despite the name).

    Returns ``(s1, s2, score)`` with the gold score divided by 5 when ``normalize`` (the
    default), so scores lie in ``[0, 1]``. Rows with fewer than 7 fields or a non-numeric score
    raise :class:`CorruptFileError` naming the line.
    """
    path = Path(path)
    pairs: List[Pair] = []
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 7:
                raise CorruptFileError(
                    f"{path}:{lineno}: an STS-B row needs 7 tab-separated fields "
                    f"(genre file year id score s1 s2), got {len(fields)}"
                )
            try:
                score = float(fields[4])
            except ValueError:
                raise CorruptFileError(f"{path}:{lineno}: score {fields[4]!r} is not a number") from None
            pairs.append((fields[5], fields[6], score / 5.0 if normalize else score))
    return pairs


def read_pairs(path: PathLike, *, score_scale: Union[str, float, None] = "auto") -> List[Pair]:
    """Read ``(text1, text2, score)`` pairs from STS-B TSV, CSV or JSONL (detected from content).

    ``score_scale``: ``"auto"`` (divide by 5 when the largest score is in ``(1, 5]``, which is
    the STS-B 0-5 scale), a number to divide every score by, or ``None`` to keep them as given.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pair file {path} does not exist")
    first = ""
    with _open_text(path) as f:
        for line in f:
            if line.strip():
                first = line
                break
    if not first:
        raise ConfigError(f"pair file {path} is empty")
    if path.suffix.lower() == ".jsonl" or first.lstrip().startswith("{"):
        pairs = _read_pairs_jsonl(path)
    elif _looks_like_stsb(first):
        pairs = read_stsb(path, normalize=False)
    else:
        pairs = _read_pairs_csv(path, first)
    if not pairs:
        raise ConfigError(f"pair file {path} holds no pairs")
    return _scale(pairs, score_scale, path)


def _looks_like_stsb(line: str) -> bool:
    fields = line.rstrip("\r\n").split("\t")
    if len(fields) < 7:
        return False
    try:
        float(fields[4])
    except ValueError:
        return False
    return True


def _scale(pairs: List[Pair], score_scale: Union[str, float, None], path: Path) -> List[Pair]:
    if score_scale is None:
        return pairs
    if score_scale == "auto":
        top = max(p[2] for p in pairs)
        low = min(p[2] for p in pairs)
        if 1.0 < top <= 5.0 and low >= 0.0:
            logger.info("%s: scores look like the 0-5 STS scale; dividing by 5", path)
            div = 5.0
        else:
            return pairs
    else:
        div = float(score_scale)
        if div <= 0:
            raise ConfigError(f"score_scale must be positive, got {score_scale}")
    return [(a, b, s / div) for a, b, s in pairs]


def _pick(row: Dict[str, Any], keys: Sequence[str]) -> Any:
    for k in keys:
        if k in row:
            return row[k]
    return None


def _read_pairs_jsonl(path: Path) -> List[Pair]:
    pairs: List[Pair] = []
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorruptFileError(f"{path}:{lineno}: not valid JSON ({e})") from None
            pairs.append(_row_to_pair(row, f"{path}:{lineno}"))
    return pairs


def _read_pairs_csv(path: Path, first: str) -> List[Pair]:
    delimiter = "\t" if first.count("\t") > first.count(",") else ","
    pairs: List[Pair] = []
    with _open_text(path) as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        header = [h.strip().lower() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        if not any(k in header for k in _TEXT1_KEYS):
            raise CorruptFileError(
                f"{path}: a CSV pair file needs a header with text1,text2,score (got {header})"
            )
        for lineno, row in enumerate(reader, 2):
            pairs.append(_row_to_pair(row, f"{path}:{lineno}"))
    return pairs


def _row_to_pair(row: Any, where: str) -> Pair:
    if isinstance(row, (list, tuple)) and len(row) == 3:
        a, b, s = row
    elif isinstance(row, dict):
        a, b, s = _pick(row, _TEXT1_KEYS), _pick(row, _TEXT2_KEYS), _pick(row, _SCORE_KEYS)
    else:
        raise CorruptFileError(f"{where}: expected an object with text1, text2, score")
    if not isinstance(a, str) or not isinstance(b, str):
        raise CorruptFileError(f"{where}: text1 and text2 must be strings")
    try:
        score = float(s)
    except (TypeError, ValueError):
        raise CorruptFileError(f"{where}: score {s!r} is not a number") from None
    return (a, b, score)


def as_pairs(pairs: Iterable[Any]) -> List[Pair]:
    """Normalise user pairs: tuples ``(t1, t2, score)``, dicts with text1/text2/score, or
    sentence-transformers ``InputExample`` objects (``texts``, ``label``)."""
    out: List[Pair] = []
    for i, p in enumerate(pairs):
        if hasattr(p, "texts") and hasattr(p, "label"):
            t1, t2 = p.texts[0], p.texts[1]
            out.append((t1, t2, float(p.label)))
        else:
            try:
                out.append(_row_to_pair(p, f"pair {i}"))
            except CorruptFileError as e:
                raise ConfigError(str(e)) from None
    return out


# --------------------------------------------------------------------------- BEIR / qrels


@dataclass
class BeirData:
    """A BEIR-style retrieval set: ``corpus[id] = (title, text)``, ``queries[id] = text``,
    ``qrels[qid][doc_id] = grade``."""

    corpus: Dict[str, Tuple[str, str]]
    queries: Dict[str, str]
    qrels: Dict[str, Dict[str, int]] = field(default_factory=dict)

    def doc_text(self, doc_id: str) -> str:
        title, text = self.corpus[doc_id]
        return f"{title}\n{text}" if title else text


def read_beir_corpus(path: PathLike) -> Dict[str, Tuple[str, str]]:
    """``corpus.jsonl`` rows ``{"_id", "title", "text"}`` -> ``{id: (title, text)}``."""
    corpus: Dict[str, Tuple[str, str]] = {}
    for lineno, row in _iter_jsonl(Path(path)):
        did = row.get("_id", row.get("id"))
        if did is None:
            raise CorruptFileError(f"{path}:{lineno}: corpus row without _id")
        corpus[str(did)] = (str(row.get("title") or ""), str(row.get("text") or ""))
    return corpus


def read_beir_queries(path: PathLike) -> Dict[str, str]:
    """``queries.jsonl`` rows ``{"_id", "text"}`` -> ``{id: text}``."""
    out: Dict[str, str] = {}
    for lineno, row in _iter_jsonl(Path(path)):
        qid = row.get("_id", row.get("id"))
        if qid is None:
            raise CorruptFileError(f"{path}:{lineno}: query row without _id")
        out[str(qid)] = str(row.get("text") or "")
    return out


def read_qrels(path: PathLike) -> Dict[str, Dict[str, int]]:
    """``query-id<TAB>corpus-id<TAB>score`` (header optional) -> ``{qid: {doc_id: grade}}``."""
    path = Path(path)
    qrels: Dict[str, Dict[str, int]] = {}
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            fields = line.strip().split("\t") if "\t" in line else line.split()
            if len(fields) < 3:
                if line.strip():
                    raise CorruptFileError(f"{path}:{lineno}: a qrels row needs query-id, corpus-id, score")
                continue
            if fields[2] == "score" or fields[0] in ("query-id", "query_id", "qid"):
                continue
            try:
                grade = int(float(fields[2]))
            except ValueError:
                raise CorruptFileError(f"{path}:{lineno}: score {fields[2]!r} is not a number") from None
            qrels.setdefault(fields[0], {})[fields[1]] = grade
    return qrels


def read_beir(root: PathLike, split: str = "test") -> BeirData:
    """Read ``root/corpus.jsonl``, ``root/queries.jsonl`` and ``root/qrels/<split>.tsv``."""
    root = Path(root)
    return BeirData(
        corpus=read_beir_corpus(root / "corpus.jsonl"),
        queries=read_beir_queries(root / "queries.jsonl"),
        qrels=read_qrels(root / "qrels" / f"{split}.tsv"),
    )


def qrels_to_pairs(
    data: BeirData,
    index: Any,
    *,
    n_hard: int = 3,
    n_random: int = 1,
    hard_score: float = 0.3,
    random_score: float = 0.0,
    top_k: int = 30,
    skip_top: int = 0,
    false_negative_ratio: float = 0.95,
    seed: int = 42,
    show_progress_bar: Optional[bool] = None,
) -> List[Pair]:
    """Turn retrieval qrels into graded CoSENT pairs, mining hard negatives from ``index``.

    For each judged query: every relevant passage gives ``(query, passage, grade/max_grade)``
    (1.0 for binary qrels); the ``n_hard`` best-ranked *non-relevant* passages that ``index``
    (a :class:`~nbce_rag.index.VectorIndex` over the corpus, ids = corpus ids, possibly
    chunked as ``"<doc_id>#<n>"``) returns in its top ``top_k`` give ``(query, passage,
    hard_score)``; ``n_random`` random corpus passages give ``(query, passage, random_score)``.

    The grades make an order, relevant > hard negative > random negative, which is what CoSENT
    learns from: a batch that mixed only two levels would teach less, and putting hard
    negatives *above* random ones keeps the model from pushing topically close passages as far
    away as unrelated ones. A mined candidate scoring at least ``false_negative_ratio`` times
    the query's best relevant passage is skipped as a probable unlabelled positive (the
    "TopK-PercPos" filter of NV-Retriever). ``skip_top`` > 0 passes over the first
    ``skip_top`` non-relevant candidates and mines below them (deeper, fewer unlabelled
    positives); the search then reaches at least ``skip_top + 3 * n_hard`` results.
    """
    import numpy as np

    if hard_score <= random_score:
        raise ConfigError("hard_score must be above random_score so that CoSENT sees an order")
    if skip_top < 0 or n_hard < 0 or n_random < 0:
        raise ConfigError("n_hard, n_random and skip_top must be >= 0")
    top_k = max(top_k, skip_top + 3 * n_hard)
    rng = random.Random(seed)
    doc_ids = sorted(data.corpus)
    qids = [q for q in data.qrels if q in data.queries]
    if not qids:
        raise ConfigError("no judged query of the qrels is in the queries file")
    missing = sum(1 for q in data.qrels if q not in data.queries)
    if missing:
        logger.warning("%d judged queries are not in the queries file; skipped", missing)
    q_texts = [data.queries[q] for q in qids]
    # candidates only matter for hard negatives: without them, no query is searched
    hits_all = index.search_many(q_texts, k=top_k, show_progress_bar=show_progress_bar) if n_hard else [[]] * len(qids)
    q_vecs = None
    pairs: List[Pair] = []
    for qi, (qid, hits) in enumerate(zip(qids, hits_all)):
        rel = {d: g for d, g in data.qrels[qid].items() if g > 0 and d in data.corpus}
        if not rel:
            continue
        top = max(rel.values())
        qtext = data.queries[qid]
        for d, g in sorted(rel.items()):
            pairs.append((qtext, data.doc_text(d), g / top))
        # best cosine of a relevant passage, to spot unlabelled positives among candidates
        best_rel = max((h.score for h in hits if _doc_of(h) in rel), default=None)
        if best_rel is None and n_hard:
            if q_vecs is None:
                enc = index.encoder
                q_vecs = enc.encode(q_texts, show_progress_bar=False)
            rel_vecs = index.encoder.encode([data.doc_text(d) for d in rel], show_progress_bar=False)
            best_rel = float(np.max(rel_vecs @ q_vecs[qi]))
        seen = set(rel)
        n = skipped = 0
        for h in hits:
            d = _doc_of(h)
            if d in seen or d not in data.corpus:
                continue
            seen.add(d)
            if skipped < skip_top:
                skipped += 1
                continue
            if h.score >= false_negative_ratio * best_rel:
                continue
            pairs.append((qtext, data.doc_text(d), hard_score))
            n += 1
            if n >= n_hard:
                break
        for _ in range(n_random):
            for _try in range(20):
                d = rng.choice(doc_ids)
                if d not in seen:
                    seen.add(d)
                    pairs.append((qtext, data.doc_text(d), random_score))
                    break
    return pairs


def _doc_of(hit: Any) -> str:
    meta = getattr(hit, "metadata", None) or {}
    if "doc_id" in meta:
        return str(meta["doc_id"])
    hid = str(hit.id)
    return hid.split("#", 1)[0]


# --------------------------------------------------------------------------- helpers


def _open_text(path: Path) -> io.TextIOWrapper:
    try:
        return open(path, "r", encoding="utf-8", errors="replace", newline="")
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist") from None


def _iter_jsonl(path: Path) -> Iterable[Tuple[int, Dict[str, Any]]]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorruptFileError(f"{path}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise CorruptFileError(f"{path}:{lineno}: expected a JSON object")
            yield lineno, row
