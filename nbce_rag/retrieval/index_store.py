"""How a :class:`~nbce_rag.retrieval.index.VectorIndex` lives on disk: its files, atomic saves,
the writer lock, merging concurrent saves, and verified loading.

Storage (``save(dir)``) is a directory::

    manifest.json                 format, version, encoder identity, dim, count, chunking,
                                  backend, and the names, sizes and sha256 of:
    vectors-<generation>.npy      float32 (count, dim), ``np.save`` without pickle
    records-<generation>.jsonl    one {"id", "text", "metadata"} per row, same order

A save writes a new generation of data files (each temp file + rename), then atomically
replaces ``manifest.json``, which is the commit point, then removes the files of older
generations. A crash at any moment leaves either the old or the new index complete. Loading
checks the manifest (every field's type and range), sizes, checksums, shapes, dtype and
record count, raises :class:`~nbce_rag.errors.CorruptFileError` on any mismatch, and never
writes.

Several writers (processes or threads) may save one directory. A save holds an exclusive
lock (``flock`` on ``.index.lock`` in the directory; released by the kernel if the writer
dies) from reading the current manifest to removing the superseded files, so it only ever
deletes the generation it replaced and the leftovers of killed saves (orphaned data and
temp files). A copy remembers the generation it was loaded from (or last saved as) and the
changes made to it since; when another writer saved in between, :meth:`VectorIndex.save`
**merges**: it replays this copy's ``add``/``delete`` calls on the newest saved index, so
both writers' changes survive. Two writers adding the same row id is a conflict: with
``on_duplicate="replace"`` (as ``nbce-rag index --append`` does) the later save wins, with
``"skip"`` the earlier one, and with ``"error"`` (and :meth:`add_vectors`) the later save
raises :class:`~nbce_rag.errors.ConflictError` and writes nothing. For a
read-modify-write that must see the latest state, hold the lock throughout with
:meth:`VectorIndex.edit`. Readers take no lock.

The FAISS structure is not stored: the vectors are the single source of truth and the FAISS
index is rebuilt from them on load (instant for ``Flat``; minutes for HNSW over millions).

``VectorIndex.save``, ``load`` and ``edit`` call :func:`save_index`, :func:`load_index` and
:func:`edit_index`; this module is the other half of :mod:`nbce_rag.retrieval.index` and reads
and sets the rows of the index it is given directly. It never imports ``index`` (the class is
passed in), so ``index`` imports it freely.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Tuple, Type, Union

import numpy as np

from nbce_rag.errors import ConfigError, ConflictError, CorruptFileError, EncoderMismatchError
from nbce_rag.files import atomic_write, file_lock, read_json, write_json

if TYPE_CHECKING:  # pragma: no cover
    from nbce_rag.retrieval.encoder import CoSENTEncoder

#: "VectorIndex" in the annotations below is nbce_rag.retrieval.index.VectorIndex, named, not
#: imported: the index imports this module, never the other way round.

logger = logging.getLogger(__name__)

FORMAT = "nbce-rag-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: search backends a manifest may name (``VectorIndex(backend=...)``)
BACKENDS = ("exact", "faiss")
_DATA_FILE = re.compile(r"^(vectors|records)-[0-9a-f]+-[0-9a-f]+\.(npy|jsonl)$")
#: temp files of an interrupted save (``atomic_write`` names them ``.<name>.<random>.tmp``)
_TEMP_FILE = re.compile(r"^\.((vectors|records)-[0-9a-f]+-[0-9a-f]+\.(npy|jsonl)|manifest\.json)\.[A-Za-z0-9_]+\.tmp$")
#: lock file serialising the saves of one index directory (never deleted, never written)
LOCK_FILE = ".index.lock"
#: seconds a save waits for another writer's lock before LockTimeoutError
DEFAULT_LOCK_TIMEOUT = 120.0
#: reads of a manifest that concurrent saves keep replacing, before load() gives up
_LOAD_ATTEMPTS = 8

PathLike = Union[str, "os.PathLike[str]"]


def check_encoder(index: "VectorIndex", enc: "CoSENTEncoder", *, where: str, path: Any = None) -> None:
    """Raise :class:`EncoderMismatchError` unless ``enc`` is the encoder ``index`` was built with
    (same dimension, matching identity): vectors of another encoder would be searched silently wrong."""
    from nbce_rag.retrieval.encoder import identities_match

    if enc.dim != index.dim or not identities_match(enc.identity, index.encoder_identity):
        at = f" at {path}" if path else ""
        raise EncoderMismatchError(
            f"the index{at} was built with encoder {index.encoder_identity} (dim {index.dim}), "
            f"but {where} is {enc.identity} (dim {enc.dim}); load it with the same encoder, "
            f"or rebuild the index with this one (nbce-rag index ... --encoder ...)"
        )


def save_index(index: "VectorIndex", path: PathLike, *, lock_timeout: Optional[float] = DEFAULT_LOCK_TIMEOUT) -> None:
    """:meth:`VectorIndex.save <nbce_rag.retrieval.index.VectorIndex.save>`: under the writer
    lock, merge into a generation another writer saved since ``index``'s base, write a new
    generation, commit the manifest, remove what it superseded."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    with file_lock(path / LOCK_FILE, timeout=lock_timeout, what=f"the index at {path}"):
        key = os.path.realpath(path)
        if index._base is not None and index._base[0] == key:
            current = _current_generation(path)
            if current is not None and current != index._base[1]:
                _merge_into(index, path, current)
        gen = _write_generation(index, path)
        index._base, index._journal = (key, gen), []
        _remove_leftovers(path, keep=(f"vectors-{gen}.npy", f"records-{gen}.jsonl"))


@contextmanager
def edit_index(
    cls: Type["VectorIndex"],
    path: PathLike,
    encoder: Optional["CoSENTEncoder"] = None,
    *,
    lock_timeout: Optional[float] = DEFAULT_LOCK_TIMEOUT,
) -> Iterator["VectorIndex"]:
    """:meth:`VectorIndex.edit <nbce_rag.retrieval.index.VectorIndex.edit>`: load ``cls`` from
    ``path`` and save it back, all under the writer lock; no save when the block raises."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise CorruptFileError(f"no index at {path}: {MANIFEST} is missing (build one with `nbce-rag index`)")
    with file_lock(path / LOCK_FILE, timeout=lock_timeout, what=f"the index at {path}"):
        index = load_index(cls, path, encoder)
        yield index
        save_index(index, path, lock_timeout=lock_timeout)


def _merge_into(index: "VectorIndex", path: Path, current: str) -> None:
    """Replay this copy's changes since its base on the index saved at ``path`` (generation
    ``current``, newer than the base) and adopt the result. Raises ConflictError (and
    changes nothing) when the two cannot be combined."""
    try:
        disk = read_index(type(index), path, None, backend=index.backend, verify=True)
    except CorruptFileError as e:
        raise ConflictError(
            f"another writer saved the index at {path} after this copy was loaded, and the newer "
            f"index cannot be read to merge into ({e}); nothing was written"
        ) from None
    from nbce_rag.retrieval.encoder import identities_match

    if (disk.dim != index.dim or not (disk.encoder_identity == index._encoder_identity
                                     or identities_match(disk.encoder_identity, index._encoder_identity))
            or (disk.chunk_tokens, disk.overlap) != (index.chunk_tokens, index.overlap)):
        raise ConflictError(
            f"the index at {path} was rebuilt by another writer (encoder {disk.encoder_identity}, dim "
            f"{disk.dim}, chunks {disk.chunk_tokens}/{disk.overlap}) after this copy was loaded; "
            "nothing was written: load it again and redo the changes"
        )
    for op in index._journal:
        if op[0] == "delete":
            disk.delete(op[1])
            continue
        _, ids, policy = op
        rows = [index._row[i] for i in ids if i in index._row]  # rows deleted later are skipped
        if not rows:
            continue
        docs = {index._metas[r].get("doc_id") for r in rows} - {None}
        clash = [index._ids[r] for r in rows if index._ids[r] in disk._row]
        if policy == "replace":
            disk.delete(set(index._ids[r] for r in rows) | docs)
        elif policy == "skip":
            there = set(disk.document_ids())
            rows = [r for r in rows if index._ids[r] not in disk._row
                    and index._metas[r].get("doc_id", index._ids[r]) not in there]
        elif clash:
            raise ConflictError(
                f"another writer added row(s) {clash[:3]} to the index at {path} after this copy was "
                "loaded, and this copy adds them too; nothing was written: load the index again and "
                "redo the change (or add with on_duplicate='replace' to let the later save win)"
            )
        disk._append(index._vectors[rows], [index._ids[r] for r in rows], [index._texts[r] for r in rows],
                     [index._metas[r] for r in rows])
    logger.info("merged %d change(s) into generation %s of %s written by another writer",
                len(index._journal), current, path)
    index._vectors, index._ids, index._texts, index._metas = disk._vectors, disk._ids, disk._texts, disk._metas
    index._row, index._faiss = disk._row, None


def _write_generation(index: "VectorIndex", path: Path) -> str:
    """Write this index as a new generation in ``path`` (lock held) and return its name."""
    gen = f"{time.time_ns():x}-{secrets.token_hex(4)}"
    vec_name, rec_name = f"vectors-{gen}.npy", f"records-{gen}.jsonl"
    checks: Dict[str, str] = {}

    def write_vectors(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(index._vectors, dtype=np.float32), allow_pickle=False)
        checks["vectors"] = _sha256_file(tmp)

    def write_records(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for i, t, m in zip(index._ids, index._texts, index._metas):
                f.write(json.dumps({"id": i, "text": t, "metadata": m}, ensure_ascii=False))
                f.write("\n")
        checks["records"] = _sha256_file(tmp)

    try:
        _write_data_file(path / vec_name, write_vectors)
        _write_data_file(path / rec_name, write_records)
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "generation": gen,
            "encoder": {"identity": index._encoder_identity, "source": index.encoder_source, "dim": index.dim,
                        "max_seq_length": index.encoder_max_seq_length},
            "dim": index.dim,
            "count": len(index),
            "chunking": {"chunk_tokens": index.chunk_tokens, "overlap": index.overlap, "unit": "encoder tokens"},
            "backend": {"name": index.backend, "faiss_factory": index.faiss_factory, "faiss_params": index.faiss_params},
            "files": {
                "vectors": {"name": vec_name, "bytes": (path / vec_name).stat().st_size, "sha256": checks["vectors"],
                            "dtype": "float32", "shape": [len(index), index.dim]},
                "records": {"name": rec_name, "bytes": (path / rec_name).stat().st_size, "sha256": checks["records"]},
            },
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        _commit_manifest(path / MANIFEST, manifest)
    except BaseException:
        for name in (vec_name, rec_name):
            try:
                (path / name).unlink()
            except FileNotFoundError:
                pass
        raise
    return gen


def load_index(
    cls: Type["VectorIndex"],
    path: PathLike,
    encoder: Optional["CoSENTEncoder"] = None,
    *,
    backend: Optional[str] = None,
    verify: bool = True,
) -> "VectorIndex":
    """:meth:`VectorIndex.load <nbce_rag.retrieval.index.VectorIndex.load>`: :func:`read_index`,
    read again while concurrent saves keep replacing the manifest under it."""
    for attempt in range(_LOAD_ATTEMPTS):
        stamp = _manifest_stamp(path)
        try:
            return read_index(cls, path, encoder, backend=backend, verify=verify)
        except CorruptFileError:
            # a concurrent save may have replaced the manifest and removed the files being
            # read; while the manifest keeps changing meanwhile, read the newer generation
            now = _manifest_stamp(path)
            if now is None or now == stamp or attempt == _LOAD_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def read_index(
    cls: Type["VectorIndex"],
    path: PathLike,
    encoder: Optional["CoSENTEncoder"],
    *,
    backend: Optional[str],
    verify: bool,
) -> "VectorIndex":
    """One attempt at opening the index at ``path`` as a ``cls``: check the manifest, sizes,
    checksums (``verify``), shapes, dtype and records; raise :class:`CorruptFileError` on any
    mismatch. Files are only read."""
    path = Path(path)
    if not path.is_dir():
        raise CorruptFileError(f"no index at {path}: the directory does not exist")
    if not (path / MANIFEST).is_file():
        raise CorruptFileError(f"no index at {path}: {MANIFEST} is missing (build one with `nbce-rag index`)")
    where = path / MANIFEST
    m = _check_manifest(read_json(where), where)
    dim, count = m["dim"], m["count"]
    be, vinfo, rinfo = m["backend"], m["files"]["vectors"], m["files"]["records"]
    index = cls(
        dim,
        m["encoder"]["identity"],
        encoder_source=m["encoder"].get("source"),
        chunk_tokens=m["chunking"]["chunk_tokens"],
        overlap=m["chunking"]["overlap"],
        backend=backend or be["name"],
        faiss_factory=be["faiss_factory"],
        faiss_params=be["faiss_params"],
    )
    index.encoder_max_seq_length = m["encoder"].get("max_seq_length")
    if encoder is not None:
        check_encoder(index, encoder, where="the given encoder", path=path)
        index._encoder = encoder
        index._checked_version = getattr(encoder, "weights_version", 0)

    vfile, rfile = path / vinfo["name"], path / rinfo["name"]
    for info, f in ((vinfo, vfile), (rinfo, rfile)):
        if not f.is_file():
            raise CorruptFileError(f"index file {f} named by {where} is missing; rebuild the index")
        size = f.stat().st_size
        if size != int(info["bytes"]):
            raise CorruptFileError(
                f"index file {f} has {size} bytes, the manifest says {info['bytes']}: it is truncated or was changed; rebuild the index"
            )
        if verify and _sha256_file(f) != info["sha256"]:
            raise CorruptFileError(f"index file {f} fails its sha256 check: it is damaged; rebuild the index")
    try:
        with open(vfile, "rb") as f:
            vectors = np.load(f, allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        raise CorruptFileError(f"{vfile} is not a readable .npy array ({e}); rebuild the index") from None
    if vectors.dtype != np.float32 or vectors.shape != (count, dim):
        raise CorruptFileError(
            f"{vfile} holds {vectors.dtype} {vectors.shape}, the manifest says float32 {(count, dim)}; rebuild the index"
        )
    # unit rows sum to at most sqrt(dim): a non-finite row sum means NaN/inf (or absurd) values
    if count and not np.all(np.isfinite(vectors.sum(axis=1, dtype=np.float64))):
        raise CorruptFileError(f"{vfile} holds NaN or infinite values; rebuild the index")
    ids: List[str] = []
    texts: List[str] = []
    metas: List[Dict[str, Any]] = []
    try:
        with open(rfile, "r", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                rec = json.loads(line)
                if not (isinstance(rec.get("id"), str) and isinstance(rec.get("text"), str) and isinstance(rec.get("metadata"), dict)):
                    raise CorruptFileError(f"{rfile}:{lineno}: a record needs id, text and metadata")
                ids.append(rec["id"])
                texts.append(rec["text"])
                metas.append(rec["metadata"])
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise CorruptFileError(f"{rfile} is damaged ({e}); rebuild the index") from None
    if len(ids) != count:
        raise CorruptFileError(f"{rfile} has {len(ids)} records, the manifest says {count}; rebuild the index")
    if len(set(ids)) != count:
        raise CorruptFileError(f"{rfile} repeats row ids; rebuild the index")
    index._vectors = vectors
    index._ids, index._texts, index._metas = ids, texts, metas
    index._row = {i: r for r, i in enumerate(ids)}
    index._base = (os.path.realpath(path), m["generation"])
    return index


# ---------------------------------------------------------------------- helpers

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_GENERATION = re.compile(r"^[0-9a-f]+-[0-9a-f]+$")


def _check_manifest(m: Any, where: Any) -> Dict[str, Any]:
    """Check the type and range of every manifest field the loader uses; return the manifest
    with defaults filled in. Any problem is a :class:`CorruptFileError` naming the field."""

    def bad(name: str, problem: str, value: Any = None, *, missing: bool = False) -> CorruptFileError:
        got = "it is missing" if missing else f"got {_short(value)}"
        return CorruptFileError(f"{where}: field {name!r} {problem} ({got}); the manifest is damaged, rebuild the index")

    def get(d: Dict[str, Any], name: str, key: str, default: Any = ...) -> Any:
        if key not in d:
            if default is ...:
                raise bad(name, "is required", missing=True)
            return default
        return d[key]

    def obj(d: Dict[str, Any], name: str, key: str) -> Dict[str, Any]:
        v = get(d, name, key)
        if not isinstance(v, dict):
            raise bad(name, "must be a JSON object", v)
        return v

    def integer(d: Dict[str, Any], name: str, key: str, lo: int, hi: int, default: Any = ...) -> Any:
        v = get(d, name, key, default)
        if v is None and default is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise bad(name, f"must be an integer in [{lo}, {hi}]", v)
        return v

    def string(d: Dict[str, Any], name: str, key: str, default: Any = ..., pattern: Any = None) -> Any:
        v = get(d, name, key, default)
        if v is None and default is None:
            return None
        if not isinstance(v, str) or (pattern is not None and not pattern.match(v)):
            raise bad(name, "must be a string" + (f" matching {pattern.pattern}" if pattern is not None else ""), v)
        return v

    if not isinstance(m, dict):
        raise CorruptFileError(f"{where} is not an nbce-rag index manifest (not a JSON object); rebuild the index")
    if m.get("format") != FORMAT:
        raise CorruptFileError(f"{where} is not an nbce-rag index manifest")
    version = m.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise bad("version", "must be a positive integer", version, missing="version" not in m)
    if version > FORMAT_VERSION:
        raise CorruptFileError(
            f"{where} has format version {version}; this nbce-rag reads up to {FORMAT_VERSION} (upgrade nbce-rag)"
        )
    out: Dict[str, Any] = {"version": version}
    out["generation"] = string(m, "generation", "generation", pattern=_GENERATION)
    out["dim"] = integer(m, "dim", "dim", 1, 1 << 20)
    out["count"] = integer(m, "count", "count", 0, 1 << 40)
    enc = obj(m, "encoder", "encoder")
    ident = string(enc, "encoder.identity", "identity")
    if not ident.strip():
        raise bad("encoder.identity", "must be a non-empty string", ident)
    if "dim" in enc and enc["dim"] != out["dim"]:
        raise bad("encoder.dim", f"must equal dim={out['dim']}", enc["dim"])
    out["encoder"] = {
        "identity": ident,
        "source": string(enc, "encoder.source", "source", None),
        "max_seq_length": integer(enc, "encoder.max_seq_length", "max_seq_length", 1, 1 << 20, None),
    }
    ch = obj(m, "chunking", "chunking")
    tokens = integer(ch, "chunking.chunk_tokens", "chunk_tokens", 1, 1 << 20)
    out["chunking"] = {
        "chunk_tokens": tokens,
        "overlap": integer(ch, "chunking.overlap", "overlap", 0, tokens - 1),
    }
    be = obj(m, "backend", "backend")
    name = get(be, "backend.name", "name", "exact")
    if name not in BACKENDS:
        raise bad("backend.name", f"must be one of {BACKENDS}", name)
    out["backend"] = {
        "name": name,
        "faiss_factory": string(be, "backend.faiss_factory", "faiss_factory", "Flat"),
        "faiss_params": string(be, "backend.faiss_params", "faiss_params", ""),
    }
    files = obj(m, "files", "files")
    out["files"] = {}
    for kind, ext in (("vectors", ".npy"), ("records", ".jsonl")):
        f = obj(files, f"files.{kind}", kind)
        fname = string(f, f"files.{kind}.name", "name", pattern=_DATA_FILE)
        if not (fname.startswith(kind + "-") and fname.endswith(ext)):
            raise bad(f"files.{kind}.name", f"must be a {kind}-<generation>{ext} file name", fname)
        out["files"][kind] = {
            "name": fname,
            "bytes": integer(f, f"files.{kind}.bytes", "bytes", 0, 1 << 50),
            "sha256": string(f, f"files.{kind}.sha256", "sha256", pattern=_SHA256),
        }
    return out


def _short(value: Any, limit: int = 60) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _manifest_stamp(path: PathLike) -> Optional[Tuple[int, int, int]]:
    try:
        st = (Path(path) / MANIFEST).stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _sha256_file(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _current_generation(path: Path) -> Optional[str]:
    """The generation named by the manifest in ``path``; None when there is no readable one."""
    try:
        m = read_json(path / MANIFEST)
    except (CorruptFileError, OSError):
        return None
    g = m.get("generation") if isinstance(m, dict) else None
    return g if isinstance(g, str) else None


def _remove_leftovers(path: Path, keep: Tuple[str, ...]) -> None:
    """After a commit (writer lock held): remove every data file the new manifest does not
    name -- the generation just superseded and files of saves that were killed -- and the
    temp files such saves left. Other files in the directory are never touched."""
    for p in path.iterdir():
        name = p.name
        if (_DATA_FILE.match(name) and name not in keep) or _TEMP_FILE.match(name):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
            except OSError as e:  # pragma: no cover
                logger.warning("could not remove old index file %s: %s", p, e)


def _write_data_file(path: Path, write: Any) -> None:
    atomic_write(path, write)


def _commit_manifest(path: Path, manifest: Dict[str, Any]) -> None:
    """The commit point of a save (a separate function so tests can inject a crash)."""
    write_json(path, manifest)
