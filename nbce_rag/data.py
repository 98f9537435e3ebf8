"""Former home of the training-data readers and :func:`qrels_to_pairs`; kept so that old
imports (``from nbce_rag.data import read_qrels, qrels_to_pairs``) keep working.

The readers are in :mod:`nbce_rag.retrieval.readers`, ``qrels_to_pairs`` in :mod:`nbce_rag.retrieval.training`.
"""

from __future__ import annotations

from nbce_rag.retrieval.readers import (  # noqa: F401 - re-exported
    BeirData,
    Pair,
    PathLike,
    scale_pairs,
    as_pairs,
    read_beir,
    read_beir_corpus,
    read_beir_queries,
    read_pairs,
    read_qrels,
    read_stsb,
)
from nbce_rag.retrieval.training import qrels_to_pairs  # noqa: F401 - re-exported
