"""Training data for CoSENT: :func:`qrels_to_pairs` turns retrieval qrels into graded pairs.

The file readers that used to live here (:func:`read_pairs`, :func:`read_stsb`,
:func:`read_beir`, :func:`read_qrels`, ...) are in :mod:`nbce_rag.readers` and are
re-exported here so that ``from nbce_rag.data import read_qrels`` keeps working.
"""

from __future__ import annotations

import logging
import random
from typing import Any, List, Optional

from .errors import ConfigError
from .readers import (  # noqa: F401 - re-exported
    BeirData,
    Pair,
    PathLike,
    _scale,
    as_pairs,
    read_beir,
    read_beir_corpus,
    read_beir_queries,
    read_pairs,
    read_qrels,
    read_stsb,
)
from .types import document_id

logger = logging.getLogger(__name__)


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
        best_rel = max((h.score for h in hits if document_id(h) in rel), default=None)
        if best_rel is None and n_hard:
            if q_vecs is None:
                enc = index.encoder
                q_vecs = enc.encode(q_texts, show_progress_bar=False)
            rel_vecs = index.encoder.encode([data.doc_text(d) for d in rel], show_progress_bar=False)
            best_rel = float(np.max(rel_vecs @ q_vecs[qi]))
        seen = set(rel)
        n = skipped = 0
        for h in hits:
            d = document_id(h)
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
