"""Where the passage KV cache keeps its entries: the token-prefix index and the disk store.

:class:`PrefixIndex` finds, among stored token sequences, the one sharing the longest prefix
with a row (exact key first, then chained hashes of 16-token blocks, then an exact comparison
of the ids); the RAM LRU of :class:`nbce_rag.decoding.kvcache.PassageKVCache` and the disk
store below both keep their entries in one. :class:`DiskKVStore` is the second level:
safetensors shards under a directory (one folder per model namespace, each shard written to a
temp file and renamed, read memory-mapped through ``safe_open``, each entry checked by CRC32
when it is loaded). A damaged or foreign shard is a miss and a warning, never an error and
never a wrong answer.

What the entries are, how their namespaces are keyed and how the decoder uses them:
:mod:`nbce_rag.decoding.kvcache`, which imports this module (never the other way).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import uuid
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

logger = logging.getLogger(__name__)

FORMAT = "nbce-rag-kv/1"  #: the entries' format, in every shard's metadata and every namespace
BLOCK = 16  #: tokens per block of the prefix-lookup hashes

_WARNED: set = set()
_WARN_LOCK = threading.Lock()


def warn_once(log: logging.Logger, key: Any, msg: str, *args: Any) -> None:
    """``log.warning(msg, *args)`` the first time this process sees ``key``, then nothing."""
    with _WARN_LOCK:
        if key in _WARNED:
            return
        _WARNED.add(key)
    log.warning(msg, *args)


# ---------------------------------------------------------------------------------- prefix index
def _block_hashes(ns: str, ids: Sequence[int], upto: int) -> List[Tuple[int, int]]:
    """``(length, hash)`` of every full block of ``ids[:upto]``, each hash chained on the last."""
    out, h = [], hash(ns)
    for end in range(BLOCK, upto + 1, BLOCK):
        h = hash((h, tuple(ids[end - BLOCK : end])))
        out.append((end, h))
    return out


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixIndex:
    """Entries by ``(namespace, ids)`` plus a block-hash index for longest-prefix lookups."""

    def __init__(self) -> None:
        self.entries: "OrderedDict[Tuple[str, Tuple[int, ...]], Any]" = OrderedDict()
        self.blocks: Dict[Tuple[str, int], "OrderedDict[Tuple[str, Tuple[int, ...]], None]"] = {}

    def add(self, ns: str, ids: Tuple[int, ...], value: Any) -> List[Any]:
        key = (ns, ids)
        self.entries[key] = value
        hashes = [h for _, h in _block_hashes(ns, ids, len(ids))]
        for h in hashes:
            self.blocks.setdefault((ns, h), OrderedDict())[key] = None
        return hashes

    def remove(self, ns: str, ids: Tuple[int, ...], hashes: Iterable[int]) -> Any:
        key = (ns, ids)
        value = self.entries.pop(key, None)
        for h in hashes:
            keys = self.blocks.get((ns, h))
            if keys is not None:
                keys.pop(key, None)
                if not keys:
                    del self.blocks[(ns, h)]
        return value

    def find(self, ns: str, ids: Sequence[int], limit: int) -> Tuple[Optional[Tuple[str, Tuple[int, ...]]], int]:
        """The key of the entry sharing the longest token prefix with ``ids[:limit]``, and that length."""
        exact = (ns, tuple(ids[:limit]))
        if exact in self.entries:
            return exact, limit
        best, best_len = None, 0
        for end, h in reversed(_block_hashes(ns, ids, limit)):
            keys = self.blocks.get((ns, h))
            if not keys:
                continue
            for tried, key in enumerate(reversed(keys)):  # most recent first; verified on the ids
                m = _common_prefix(key[1], ids, limit)
                if m > best_len:
                    best, best_len = key, m
                if best_len == limit or tried >= 8:
                    break
            if best_len >= end:
                break
        return best, best_len


# ---------------------------------------------------------------------------------- disk
class DiskKVStore:
    """Safetensors shards under ``root/<namespace>/``; see the module docstring.

    Each shard holds many entries: tensor ``e<i>`` (``[layers, 2, kv_heads, len, head_dim]``)
    and ``e<i>.ids`` (int64 token ids), metadata ``{"format", "namespace", "crc": {name: crc32}}``.
    Shards are written to a temp file in the same folder and renamed, so a reader sees a whole
    shard or none; readers re-scan the folder when its modification time changes.
    """

    def __init__(self, root: os.PathLike | str, *, writable: bool = True) -> None:
        self.root = Path(root)
        self.writable = writable
        self._lock = threading.RLock()
        self._index: Dict[str, PrefixIndex] = {}
        self._seen: Dict[str, Dict[str, float]] = {}  # ns -> shard name -> mtime scanned
        self._dir_mtime: Dict[str, float] = {}
        self.errors = 0

    def __repr__(self) -> str:
        return f"DiskKVStore({str(self.root)!r}, writable={self.writable})"

    def _ns_dir(self, ns: str) -> Path:
        return self.root / ns

    def refresh(self, ns: str, desc: Optional[Dict[str, Any]] = None) -> None:
        """Index the shards of namespace ``ns`` not seen yet (cheap when nothing changed)."""
        d = self._ns_dir(ns)
        try:
            mtime = d.stat().st_mtime
        except OSError:
            return
        with self._lock:
            if self._dir_mtime.get(ns) == mtime:
                return
            self._dir_mtime[ns] = mtime
            seen = self._seen.setdefault(ns, {})
            index = self._index.setdefault(ns, PrefixIndex())
            for path in sorted(d.glob("*.safetensors")):
                if path.name in seen:
                    continue
                seen[path.name] = mtime
                self._scan(ns, path, index)

    def _scan(self, ns: str, path: Path, index: PrefixIndex) -> None:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT or meta.get("namespace") != ns:
                    warn_once(logger, ("kv-foreign", str(path)), "KV cache shard %s was written for another model, dtype "
                              "or version (namespace %s, expected %s); it is not used", path, meta.get("namespace"), ns)
                    return
                crc = json.loads(meta.get("crc", "{}"))
                for name in f.keys():
                    if name.endswith(".ids"):
                        continue
                    ids = tuple(int(x) for x in f.get_tensor(name + ".ids").tolist())
                    index.add(ns, ids, (path, name, crc.get(name)))
        except Exception as e:  # a damaged shard is a miss, never a crash
            self.errors += 1
            logger.warning("KV cache shard %s is unreadable (%s: %s); its entries are misses. Delete it or "
                           "refill the cache (nbce-rag cache).", path, type(e).__name__, e)

    def find(self, ns: str, ids: Sequence[int], limit: int):
        with self._lock:
            index = self._index.get(ns)
            if index is None:
                return None, 0
            return index.find(ns, ids, limit)

    def load(self, ns: str, key) -> Optional[torch.Tensor]:
        """The stored tensor of ``key`` (checked against its CRC32), or None with a warning."""
        from safetensors import safe_open

        with self._lock:
            index = self._index.get(ns)
            ref = index.entries.get(key) if index is not None else None
        if ref is None:
            return None
        path, name, crc = ref
        try:
            with safe_open(str(path), framework="pt") as f:
                t = f.get_tensor(name)
            if crc is not None and zlib.crc32(t.contiguous().view(torch.uint8).numpy()) != crc:
                raise ValueError("checksum mismatch")
            if t.dim() != 5 or t.shape[1] != 2 or t.shape[3] != len(key[1]):
                raise ValueError(f"tensor of shape {tuple(t.shape)} does not hold {len(key[1])} positions")
            return t
        except Exception as e:
            self.errors += 1
            logger.warning("KV cache entry %s in %s is damaged (%s: %s); recomputing it", name, path, type(e).__name__, e)
            with self._lock:
                index.remove(ns, key[1], [h for _, h in _block_hashes(ns, key[1], len(key[1]))])
            return None

    def write(self, ns: str, desc: Dict[str, Any], entries: Sequence[Tuple[Tuple[int, ...], torch.Tensor]]) -> Optional[Path]:
        """Write ``entries`` as one new shard (temp file + rename); returns its path."""
        from safetensors.torch import save_file

        if not entries or not self.writable:
            return None
        d = self._ns_dir(ns)
        d.mkdir(parents=True, exist_ok=True)
        desc_path = d / "namespace.json"
        if not desc_path.exists():
            _atomic_write_text(desc_path, json.dumps(desc, indent=2, sort_keys=True))
        tensors, crc = {}, {}
        for i, (ids, kv) in enumerate(entries):
            t = kv.detach().to("cpu").contiguous()
            tensors[f"e{i}"] = t
            tensors[f"e{i}.ids"] = torch.tensor(ids, dtype=torch.int64)
            crc[f"e{i}"] = zlib.crc32(t.view(torch.uint8).numpy())
        meta = {"format": FORMAT, "namespace": ns, "crc": json.dumps(crc)}
        final = d / f"kv-{uuid.uuid4().hex}.safetensors"
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=d)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, final)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        with self._lock:  # index our own shard right away
            index = self._index.setdefault(ns, PrefixIndex())
            self._seen.setdefault(ns, {})[final.name] = 0.0
            for i, (ids, _) in enumerate(entries):
                index.add(ns, tuple(ids), (final, f"e{i}", crc[f"e{i}"]))
        return final

    def nbytes(self) -> int:
        """Bytes of all shards on disk (every namespace)."""
        return sum(p.stat().st_size for p in self.root.glob("*/*.safetensors")) if self.root.is_dir() else 0

    def __len__(self) -> int:
        with self._lock:
            return sum(len(i.entries) for i in self._index.values())


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
