"""Retrieval: from documents to scored candidate passages.

The story: documents are read (``readers``) and chunked on word boundaries (``chunking``); the
CoSENT encoder (``encoder``, fine-tuned by ``training``) embeds them into the vector index
(``index``, its files and lock in ``index_store``); a question's candidates, from the index or
from any external store, are rescored with the canonical cosine and cut by the calibrated
filter in one place, ``selection.select``.

May import: ``nbce_rag.types``, ``config``, ``errors``, ``files``, ``models`` and its own modules;
never ``filtering`` (``select`` takes any object with a ``filter`` method), ``decoding``,
the pipeline or an integration.

``from nbce_rag.retrieval import select, rescore, Selection, ...`` keeps working: the names of
``selection`` are handed on lazily.
"""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    selection = importlib.import_module("nbce_rag.retrieval.selection")
    if name in selection.__all__:
        return getattr(selection, name)
    raise AttributeError(f"module 'nbce_rag.retrieval' has no attribute {name!r}")
