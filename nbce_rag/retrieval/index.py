"""The embedded vector index: chunk, embed, search by cosine, add and delete, persist.

:class:`VectorIndex` keeps one L2-normalised float32 row per chunk. Search is exact cosine
(one matrix product and a partial sort) by default; ``backend="faiss"`` (the ``faiss`` extra)
serves candidates from a FAISS index built from the same rows (``faiss_factory="Flat"`` is
exact, ``"HNSW32"`` or ``"IVF1024,Flat"`` approximate), and every returned score is
recomputed as the exact cosine, so scores mean the same with every backend.

Persistence is in :mod:`nbce_rag.retrieval.index_store`: ``save(dir)`` writes a directory
(``manifest.json`` plus one generation of ``vectors-*.npy`` and ``records-*.jsonl``)
atomically under a writer lock, merging with what another writer saved meanwhile; ``load``
verifies every file and never writes; ``edit`` holds the lock for a whole read-modify-write.
Its names (``MANIFEST``, ``LOCK_FILE``, ``DEFAULT_LOCK_TIMEOUT``, ``FORMAT``, ...) are also
importable from here.

The FAISS structure is not stored: the vectors are the single source of truth and the FAISS
index is rebuilt from them on load (instant for ``Flat``; minutes for HNSW over millions).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ContextManager, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from nbce_rag.errors import ConfigError
from nbce_rag.retrieval import index_store
from nbce_rag.retrieval.chunking import DEFAULT_CHUNK_TOKENS, DEFAULT_OVERLAP, chunk_text
from nbce_rag.retrieval.index_store import (  # noqa: F401 - re-exported
    BACKENDS,
    DEFAULT_LOCK_TIMEOUT,
    FORMAT,
    FORMAT_VERSION,
    LOCK_FILE,
    MANIFEST,
    PathLike,
    check_encoder,
)
from nbce_rag.retrieval.readers import JSONL_EXTENSIONS, PDF_EXTENSIONS, TEXT_EXTENSIONS, ReadReport, read_documents  # noqa: F401 - re-exported
from nbce_rag.types import Hit, Passage, as_passage, check_text

if TYPE_CHECKING:  # pragma: no cover
    from nbce_rag.retrieval.encoder import CoSENTEncoder

logger = logging.getLogger(__name__)

#: rows used to train FAISS indexes that need training (IVF, PQ); more only slows k-means down
FAISS_TRAIN_MAX = 100_000

def faiss_available() -> bool:
    """True when the optional ``faiss`` module can be imported."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _import_faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise ConfigError(
            "backend='faiss' needs FAISS: pip install 'nbce-rag[faiss]' (or use backend='exact')"
        ) from None
    return faiss


@dataclass
class AddReport:
    """What :meth:`VectorIndex.add` did."""

    documents: int = 0  #: documents given
    added_documents: int = 0
    chunks: int = 0  #: rows added
    skipped_empty: int = 0  #: documents with no text (whitespace only)
    skipped_duplicate: int = 0  #: documents skipped by ``on_duplicate="skip"``
    replaced: int = 0  #: documents replaced by ``on_duplicate="replace"``
    oversized_chunks: int = 0  #: chunks made of one word longer than ``chunk_tokens``
    ids: List[str] = field(default_factory=list)  #: ids of the rows added


class VectorIndex:
    """Chunks with their embeddings, searchable by cosine. See the module docstring, and
    :mod:`nbce_rag.retrieval.index_store` for saving, loading and concurrent writers."""

    def __init__(
        self,
        dim: int,
        encoder_identity: str,
        *,
        encoder: Optional["CoSENTEncoder"] = None,
        encoder_source: Optional[str] = None,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        overlap: int = DEFAULT_OVERLAP,
        backend: str = "exact",
        faiss_factory: str = "Flat",
        faiss_params: str = "",
    ) -> None:
        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "faiss":
            _import_faiss()
        if not 0 <= overlap < chunk_tokens:
            raise ConfigError(f"overlap must be in [0, chunk_tokens={chunk_tokens}), got {overlap}")
        self.dim = int(dim)
        self._encoder_identity = encoder_identity
        self._encoder = encoder
        self._checked_version = getattr(encoder, "weights_version", 0)
        self.encoder_source = encoder_source
        #: max_seq_length the encoder had (part of its identity), to reload it the same way
        self.encoder_max_seq_length: Optional[int] = encoder.max_seq_length if encoder is not None else None
        self.chunk_tokens = int(chunk_tokens)
        self.overlap = int(overlap)
        self.backend = backend
        self.faiss_factory = faiss_factory
        self.faiss_params = faiss_params
        self._vectors = np.zeros((0, self.dim), dtype=np.float32)
        self._ids: List[str] = []
        self._texts: List[str] = []
        self._metas: List[Dict[str, Any]] = []
        self._row: Dict[str, int] = {}
        self._faiss: Any = None
        #: report of the last :meth:`build`/:meth:`add`
        self.last_report: Optional[AddReport] = None
        #: (index directory, generation) this copy was loaded from or last saved as
        self._base: Optional[Tuple[str, str]] = None
        #: add/delete calls since then, replayed by save() if another writer saved meanwhile
        self._journal: List[Tuple[Any, ...]] = []

    # ------------------------------------------------------------------ construction

    @classmethod
    def build(
        cls,
        encoder: "CoSENTEncoder",
        documents: Iterable[Any],
        *,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        overlap: int = DEFAULT_OVERLAP,
        backend: str = "exact",
        faiss_factory: str = "Flat",
        faiss_params: str = "",
        batch_size: int = 32,
        show_progress_bar: Optional[bool] = None,
        decoder: Any = None,
    ) -> "VectorIndex":
        """Chunk and embed ``documents`` (strings, :class:`Passage`, or dicts with ``text``
        and optional ``id``/``metadata``) into a new index. ``chunk_tokens`` and ``overlap``
        count encoder tokens; see :mod:`nbce_rag.retrieval.chunking` for the rules. ``decoder``:
        any object with a ``cache_passages`` method, e.g. :class:`~nbce_rag.NBCEDecoder`, whose
        passage KV cache (RAM, and its disk store if it has one) is then filled with every chunk
        (``decoder.cache_passages(index, show_progress=...)``), so its first questions are
        already fast."""
        max_content = encoder.max_seq_length - encoder.num_special_tokens
        if chunk_tokens > max_content:
            raise ConfigError(
                f"chunk_tokens={chunk_tokens} does not fit the encoder: max_seq_length "
                f"{encoder.max_seq_length} leaves {max_content} tokens per chunk"
            )
        index = cls(
            encoder.dim,
            encoder.identity,
            encoder=encoder,
            encoder_source=encoder.source,
            chunk_tokens=chunk_tokens,
            overlap=overlap,
            backend=backend,
            faiss_factory=faiss_factory,
            faiss_params=faiss_params,
        )
        index.add(documents, batch_size=batch_size, show_progress_bar=show_progress_bar)
        if decoder is not None:
            decoder.cache_passages(index, show_progress=bool(show_progress_bar))
        return index

    # ------------------------------------------------------------------ properties

    @property
    def encoder_identity(self) -> str:
        """Identity of the encoder the vectors were made with (see ``CoSENTEncoder.identity``)."""
        return self._encoder_identity

    @property
    def encoder(self) -> "CoSENTEncoder":
        """The encoder for queries and new documents. After :meth:`load` without one, the
        encoder recorded in the manifest is loaded on first use and its identity checked."""
        if self._encoder is None:
            from nbce_rag.retrieval.encoder import CoSENTEncoder

            if not self.encoder_source:
                raise ConfigError(
                    f"this index was built with an encoder that was never saved (identity "
                    f"{self._encoder_identity}); pass encoder= to VectorIndex.load()"
                )
            enc = CoSENTEncoder.from_pretrained(
                self.encoder_source, local_files_only=True, max_seq_length=self.encoder_max_seq_length
            )
            check_encoder(self, enc, where=f"the recorded encoder {self.encoder_source}")
            self._encoder = enc
            self._checked_version = getattr(enc, "weights_version", 0)
        elif getattr(self._encoder, "weights_version", 0) != self._checked_version:
            # the encoder object was fine-tuned after this index was made: its vectors would
            # no longer match the stored ones
            check_encoder(self, self._encoder, where="the index's encoder, changed since (e.g. by fit())")
            self._checked_version = getattr(self._encoder, "weights_version", 0)
        return self._encoder

    @encoder.setter
    def encoder(self, enc: "CoSENTEncoder") -> None:
        check_encoder(self, enc, where="the given encoder")
        self._encoder = enc
        self._checked_version = getattr(enc, "weights_version", 0)

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> List[str]:
        """Row ids in storage order."""
        return list(self._ids)

    @property
    def vectors(self) -> np.ndarray:
        """The (count, dim) float32 matrix (read-only view)."""
        v = self._vectors.view()
        v.flags.writeable = False
        return v

    def __contains__(self, chunk_id: object) -> bool:
        return chunk_id in self._row

    def get(self, chunk_id: str) -> Hit:
        """The stored chunk ``chunk_id`` (``score`` is ``None``). ``KeyError`` if absent."""
        r = self._row[chunk_id]
        return Hit(text=self._texts[r], score=None, id=chunk_id, metadata=dict(self._metas[r]))

    def document_ids(self) -> List[str]:
        """Ids of the documents in the index, in first-seen order."""
        return list(dict.fromkeys(m.get("doc_id", i) for i, m in zip(self._ids, self._metas)))

    def __repr__(self) -> str:
        return (
            f"VectorIndex(count={len(self)}, dim={self.dim}, backend={self.backend!r}, "
            f"encoder={self._encoder_identity!r})"
        )

    # ------------------------------------------------------------------ add / delete

    def add(
        self,
        documents: Iterable[Any],
        *,
        on_duplicate: str = "error",
        batch_size: int = 32,
        show_progress_bar: Optional[bool] = None,
    ) -> List[str]:
        """Chunk, embed and append ``documents``; return the ids of the new rows.

        A document's id is its ``id`` (or ``metadata["id"]``), else a hash of its text, so
        ids are stable across rebuilds; chunk ids are ``"<doc id>#<n>"``. Each row's metadata
        is the document's plus ``doc_id``, ``chunk``, ``start``/``end`` (character offsets
        in the document text) and ``n_tokens``. Empty documents are skipped and counted
        (:attr:`last_report`). ``on_duplicate`` decides what a document id already present
        does: ``"error"`` (default, nothing is added), ``"replace"`` or ``"skip"``. Nothing
        changes if embedding fails.
        """
        if on_duplicate not in ("error", "replace", "skip"):
            raise ConfigError(f"on_duplicate must be 'error', 'replace' or 'skip', got {on_duplicate!r}")
        enc = self.encoder
        report = AddReport()
        existing_docs = set(self.document_ids()) if len(self) else set()
        docs: List[Tuple[str, Passage]] = []
        seen: set = set()
        for i, obj in enumerate(documents):
            report.documents += 1
            p = as_passage(obj, where=f"documents[{i}]")
            if not p.text.strip():
                report.skipped_empty += 1
                continue
            doc_id = p.id or (p.metadata.get("id") if isinstance(p.metadata.get("id"), str) else None)
            doc_id = doc_id or "doc-" + hashlib.sha1(p.text.encode("utf-8")).hexdigest()[:16]
            if doc_id in seen:
                raise ConfigError(f"document id {doc_id!r} appears twice in this batch")
            seen.add(doc_id)
            if doc_id in existing_docs:
                if on_duplicate == "error":
                    raise ConfigError(
                        f"document {doc_id!r} is already in the index; delete it first or pass on_duplicate='replace'"
                    )
                if on_duplicate == "skip":
                    report.skipped_duplicate += 1
                    continue
                report.replaced += 1
            try:
                json.dumps(p.metadata)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"metadata of document {doc_id!r} is not JSON-serialisable: {e}") from None
            docs.append((doc_id, p))
        if report.skipped_empty:
            logger.warning("skipped %d empty document(s)", report.skipped_empty)

        ids: List[str] = []
        texts: List[str] = []
        metas: List[Dict[str, Any]] = []
        tok = enc.tokenizer
        for doc_id, p in docs:
            chunks = chunk_text(p.text, tok, chunk_tokens=self.chunk_tokens, overlap=self.overlap)
            for c in chunks:
                ids.append(f"{doc_id}#{c.index}")
                texts.append(c.text)
                meta = dict(p.metadata)
                meta.update(doc_id=doc_id, chunk=c.index, start=c.start, end=c.end, n_tokens=c.n_tokens)
                if c.oversized:
                    meta["oversized"] = True
                    report.oversized_chunks += 1
                metas.append(meta)
        vecs = enc.encode(texts, batch_size=batch_size, show_progress_bar=show_progress_bar)
        # all work that can fail is done: mutate
        replaced = [d for d, _ in docs if d in existing_docs]
        if replaced:
            self.delete(replaced)
        self._append(vecs, ids, texts, metas)
        self._log("add", ids, on_duplicate)
        report.added_documents = len(docs)
        report.chunks = len(ids)
        report.ids = ids
        self.last_report = report
        return ids

    def add_vectors(
        self,
        vectors: np.ndarray,
        texts: Sequence[str],
        ids: Sequence[str],
        metadatas: Optional[Sequence[Dict[str, Any]]] = None,
    ) -> None:
        """Append pre-computed rows (already made by this index's encoder). ``vectors`` are
        L2-normalised here; ids must be new and unique."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ConfigError(f"vectors must have shape (n, {self.dim}), got {vectors.shape}")
        n = vectors.shape[0]
        metadatas = list(metadatas) if metadatas is not None else [{} for _ in range(n)]
        if not (len(texts) == len(ids) == len(metadatas) == n):
            raise ConfigError("vectors, texts, ids and metadatas must have the same length")
        if len(set(ids)) != n or any(i in self._row for i in ids):
            raise ConfigError("ids must be unique and not already in the index")
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        if np.any(norms == 0) or not np.all(np.isfinite(norms)):
            raise ConfigError("vectors must be finite and non-zero")
        ids = list(map(str, ids))
        self._append(vectors / norms, ids, list(texts), [dict(m) for m in metadatas])
        self._log("add", ids, "error")

    def _append(self, vecs: np.ndarray, ids: List[str], texts: List[str], metas: List[Dict[str, Any]]) -> None:
        if not ids:
            return
        dup = [i for i in ids if i in self._row]
        if dup:
            raise ConfigError(f"row id(s) already in the index: {dup[:3]}")
        base = len(self._ids)
        self._vectors = np.concatenate([self._vectors, np.ascontiguousarray(vecs, dtype=np.float32)], axis=0)
        self._ids.extend(ids)
        self._texts.extend(texts)
        self._metas.extend(metas)
        for k, i in enumerate(ids):
            self._row[i] = base + k
        if self._faiss is not None:
            self._faiss.add(np.ascontiguousarray(vecs, dtype=np.float32))

    def delete(self, ids: Union[str, Iterable[str]]) -> int:
        """Remove rows by chunk id (``"doc#3"``) or by document id (all its chunks). Unknown
        ids are ignored. Returns the number of rows removed. No re-embedding happens."""
        if isinstance(ids, str):
            ids = [ids]
        wanted = set(ids)
        if not wanted:
            return 0
        self._log("delete", frozenset(wanted))
        if not len(self):
            return 0
        keep = np.array(
            [not (i in wanted or m.get("doc_id") in wanted) for i, m in zip(self._ids, self._metas)], dtype=bool
        )
        removed = int((~keep).sum())
        if not removed:
            return 0
        self._vectors = np.ascontiguousarray(self._vectors[keep])
        self._ids = [x for x, k in zip(self._ids, keep) if k]
        self._texts = [x for x, k in zip(self._texts, keep) if k]
        self._metas = [x for x, k in zip(self._metas, keep) if k]
        self._row = {i: r for r, i in enumerate(self._ids)}
        self._faiss = None  # rebuilt from the remaining rows on the next search
        return removed

    # ------------------------------------------------------------------ search

    def search(self, query: str, k: int = 10) -> List[Hit]:
        """The ``k`` chunks most similar to ``query``, best first; ``score`` is the cosine.
        Fewer when the index holds fewer. An empty query raises :class:`ConfigError`."""
        return self.search_many([query], k=k, show_progress_bar=False)[0]

    def search_many(
        self,
        queries: Sequence[str],
        k: int = 10,
        *,
        batch_size: int = 32,
        show_progress_bar: Optional[bool] = None,
    ) -> List[List[Hit]]:
        """:meth:`search` for several queries at once (one encode call, blocked matrix products)."""
        if isinstance(queries, str):
            raise TypeError("search_many() takes a list of queries; use search() for one")
        queries = list(queries)
        for i, q in enumerate(queries):
            if not isinstance(q, str):
                raise TypeError(f"query {i} is a {type(q).__name__}, not a str")
            if not q.strip():
                raise ConfigError("the query is empty" if len(queries) == 1 else f"query {i} is empty")
            check_text(q, "the query" if len(queries) == 1 else f"query {i}")
        self._check_k(k)
        if not queries:
            return []
        if not len(self):
            return [[] for _ in queries]
        qv = self.encoder.encode(queries, batch_size=batch_size, show_progress_bar=show_progress_bar)
        return self.search_by_vector(qv, k)

    def search_by_vector(self, vectors: np.ndarray, k: int = 10) -> List[List[Hit]]:
        """Search with query embeddings of shape ``(m, dim)`` (or ``(dim,)``); they are
        L2-normalised here, so scores are cosines."""
        self._check_k(k)
        q = np.asarray(vectors, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ConfigError(f"query vectors must have dimension {self.dim}, got shape {q.shape}")
        norms = np.linalg.norm(q, axis=1, keepdims=True)
        if np.any(norms == 0) or not np.all(np.isfinite(norms)):
            raise ConfigError("query vectors must be finite and non-zero")
        if not np.allclose(norms, 1.0, atol=1e-4):
            q = q / norms  # scores are cosines whatever the query norm
        if not len(self):
            return [[] for _ in range(q.shape[0])]
        scores, rows = self.topk(q, k)
        return [
            [
                Hit(text=self._texts[r], score=float(s), id=self._ids[r], metadata=dict(self._metas[r]))
                for s, r in zip(srow, rrow)
                if r >= 0
            ]
            for srow, rrow in zip(scores, rows)
        ]

    def topk(self, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """Raw top-k: ``(scores, rows)`` of shape ``(m, min(k, count))``, best first; rows
        are ``-1`` where an approximate FAISS index returned fewer candidates."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(int(k), len(self))
        if self.backend == "faiss":
            return self._topk_faiss(q, k)
        return _topk_exact(self._vectors, q, k)

    def _topk_faiss(self, q: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        index = self._faiss_index()
        _, rows = index.search(q, k)
        rows = rows.astype(np.int64)
        # canonical cosine for every candidate, then re-sort (approximate indexes may misorder)
        safe = np.where(rows >= 0, rows, 0)
        scores = np.einsum("mkd,md->mk", self._vectors[safe], q)
        scores = np.where(rows >= 0, scores, -np.inf).astype(np.float32)
        order = np.argsort(-scores, axis=1, kind="stable")
        return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)

    def _faiss_index(self) -> Any:
        if self._faiss is None:
            faiss = _import_faiss()
            t0 = time.perf_counter()
            try:
                index = faiss.index_factory(self.dim, self.faiss_factory, faiss.METRIC_INNER_PRODUCT)
                if not index.is_trained:  # IVF/PQ: train on at most FAISS_TRAIN_MAX random rows
                    train = self._vectors
                    if len(train) > FAISS_TRAIN_MAX:
                        pick = np.random.default_rng(0).choice(len(train), FAISS_TRAIN_MAX, replace=False)
                        train = train[np.sort(pick)]
                    index.train(train)
                index.add(self._vectors)
                if self.faiss_params:
                    faiss.ParameterSpace().set_index_parameters(index, self.faiss_params)
            except RuntimeError as e:
                raise ConfigError(f"FAISS could not build {self.faiss_factory!r} over {len(self)} vectors: {e}") from None
            logger.info("built FAISS %s over %d vectors in %.1fs", self.faiss_factory, len(self), time.perf_counter() - t0)
            self._faiss = index
        return self._faiss

    @staticmethod
    def _check_k(k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"k must be an int, got {type(k).__name__}")
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")

    # ------------------------------------------------------------------ persistence

    def _log(self, op: str, *args: Any) -> None:
        """Record a change for :meth:`save`'s merge (only once this copy has a saved base)."""
        if self._base is not None:
            self._journal.append((op, *args))

    @property
    def generation(self) -> Optional[str]:
        """The generation this copy was loaded from or last saved as (``None``: never saved)."""
        return None if self._base is None else self._base[1]

    @staticmethod
    def saved_generation(path: PathLike) -> Optional[str]:
        """The generation the index directory ``path`` holds now (its manifest's; ``None``: no
        readable index). A copy whose :attr:`generation` differs is older than the directory:
        a long-running reader (a server replica) loads it again to see the writers' changes."""
        from pathlib import Path

        return index_store._current_generation(Path(path))

    def save(self, path: PathLike, *, lock_timeout: Optional[float] = DEFAULT_LOCK_TIMEOUT) -> None:
        """Write the index to directory ``path`` (created if needed), atomically: readers and
        crashes see either the previous index or this one, never a mix.

        The save holds the directory's writer lock (waiting up to ``lock_timeout`` seconds,
        ``None`` = forever, then :class:`~nbce_rag.errors.LockTimeoutError`). If this copy was
        loaded from (or last saved to) ``path`` and another writer saved there since, this
        copy's changes are merged into the newest index first (see
        :mod:`~nbce_rag.retrieval.index_store`) and this object then holds the merged rows; a
        conflict raises :class:`~nbce_rag.errors.ConflictError` and writes nothing. A copy saved
        to another directory replaces whatever index was there. Leftovers of interrupted saves
        are removed.
        """
        index_store.save_index(self, path, lock_timeout=lock_timeout)

    @classmethod
    def edit(
        cls,
        path: PathLike,
        encoder: Optional["CoSENTEncoder"] = None,
        *,
        lock_timeout: Optional[float] = DEFAULT_LOCK_TIMEOUT,
    ) -> ContextManager["VectorIndex"]:
        """Load, change and save the index at ``path`` under its writer lock, so no other save
        interleaves (``with VectorIndex.edit(p) as idx: idx.add(docs)``). The index is saved
        when the block ends normally, and not at all when it raises. Other writers wait (up to
        their own ``lock_timeout``) for as long as the block runs; :meth:`save` alone (which
        merges) keeps the lock only for the write itself."""
        return index_store.edit_index(cls, path, encoder, lock_timeout=lock_timeout)

    @classmethod
    def load(
        cls,
        path: PathLike,
        encoder: Optional["CoSENTEncoder"] = None,
        *,
        backend: Optional[str] = None,
        verify: bool = True,
    ) -> "VectorIndex":
        """Open an index written by :meth:`save`. Files are only read.

        With ``encoder``, its identity must match the one recorded, else
        :class:`EncoderMismatchError`; without it, the recorded encoder is loaded when first
        needed. ``verify=False`` skips the sha256 checks (sizes, shapes and counts are still
        checked). ``backend`` overrides the stored one. Damage raises :class:`CorruptFileError`.
        """
        return index_store.load_index(cls, path, encoder, backend=backend, verify=verify)


# ---------------------------------------------------------------------- helpers


def _topk_exact(vectors: np.ndarray, q: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product, queries in blocks so the score matrix stays <= ~256 MB."""
    n = vectors.shape[0]
    m = q.shape[0]
    out_s = np.empty((m, k), dtype=np.float32)
    out_r = np.empty((m, k), dtype=np.int64)
    block = max(1, (1 << 26) // max(n, 1))
    for b in range(0, m, block):
        s = q[b : b + block] @ vectors.T  # (bm, n)
        if k < n:
            part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        else:
            part = np.broadcast_to(np.arange(n), s.shape).copy()
        ps = np.take_along_axis(s, part, 1)
        # best first; ties by row number so results are deterministic
        order = np.lexsort((part, -ps), axis=1)
        out_s[b : b + block] = np.take_along_axis(ps, order, 1)
        out_r[b : b + block] = np.take_along_axis(part, order, 1)
    return out_s, out_r

