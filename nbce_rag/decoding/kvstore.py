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

import hashlib
import json
import logging
import os
import re
import socket
import tempfile
import threading
import time
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
#: temp files of this store's writer: ``.tmp-<pid>-<host tag>-<random>[.safetensors]`` (a shard or
#: a namespace.json being written; renamed into place when whole)
_TEMP_FILE = re.compile(r"^\.tmp-(\d+)-([0-9a-f]{8})-[A-Za-z0-9_]+(?:\.safetensors)?$")
#: temp files of writers before the pid was in the name (``.tmp-<random>[.safetensors]``)
_LEGACY_TEMP_FILE = re.compile(r"^\.tmp-[A-Za-z0-9_]{6,}(?:\.safetensors)?$")
#: a temp file untouched for this long belongs to no live writer (a shard is written in seconds)
STALE_TEMP_SECONDS = 300.0
#: the ``crc`` of a shard with this metadata covers the token ids, then the tensor
CRC_SCOPE = "ids+kv"


def _host_tag() -> str:
    return hashlib.blake2b(socket.gethostname().encode("utf-8", "replace"), digest_size=4).hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or cannot tell: keep its file
    return True


def entry_crc(ids: Sequence[int], t: torch.Tensor) -> int:
    """CRC32 of an entry: its token ids (int64), then its tensor's bytes. The ids are covered: a
    damaged id would otherwise file the keys/values under another token sequence."""
    crc = zlib.crc32(torch.tensor(list(ids), dtype=torch.int64).view(torch.uint8).numpy())
    return zlib.crc32(t.contiguous().view(torch.uint8).numpy(), crc)


class DiskKVStore:
    """Safetensors shards under ``root/<namespace>/``; see the module docstring.

    Each shard holds many entries: tensor ``e<i>`` (``[layers, 2, kv_heads, len, head_dim]``)
    and ``e<i>.ids`` (int64 token ids), metadata ``{"format", "namespace", "crc": {name: crc32},
    "crc_scope": "ids+kv"}`` (each CRC covers the entry's ids and tensor; shards written before
    ``crc_scope`` existed have CRCs of the tensor alone and are still read). Shards are written to
    a temp file in the same folder and renamed, so a reader sees a whole shard or none; readers
    re-scan the folder when its modification time changes and never look at temp files. A
    writable store removes the temp files its writers left behind (a killed run: the writer's
    process is gone, or the file is older than :data:`STALE_TEMP_SECONDS`) and replaces damaged
    shards once their entries are recomputed: an unreadable shard is deleted, a shard with
    damaged entries is rewritten without them.
    """

    def __init__(self, root: os.PathLike | str, *, writable: bool = True) -> None:
        self.root = Path(root)
        self.writable = writable
        self._lock = threading.RLock()
        self._index: Dict[str, PrefixIndex] = {}
        self._seen: Dict[str, Dict[str, float]] = {}  # ns -> shard name -> mtime scanned
        self._dir_mtime: Dict[str, float] = {}
        self._swept: set = set()  # namespaces whose stale temp files were removed by this store
        self._unreadable: Dict[str, set] = {}  # ns -> shards that could not be read at all
        self._bad: Dict[str, Dict[Path, set]] = {}  # ns -> shard -> names of damaged entries
        self.errors = 0

    def __repr__(self) -> str:
        return f"DiskKVStore({str(self.root)!r}, writable={self.writable})"

    def _ns_dir(self, ns: str) -> Path:
        return self.root / ns

    # ---------------- housekeeping of a writable store
    def sweep(self, ns: Optional[str] = None) -> int:
        """Remove the stale temp files of namespace ``ns`` (every namespace: None) that writers of
        this store left behind; returns how many. Another live writer's temp file is kept."""
        if not self.writable:
            return 0
        dirs = [self._ns_dir(ns)] if ns is not None else ([d for d in self.root.iterdir() if d.is_dir()]
                                                         if self.root.is_dir() else [])
        removed, now, host = 0, time.time(), _host_tag()
        for d in dirs:
            self._swept.add(d.name)
            try:
                names = os.listdir(d)
            except OSError:
                continue
            for name in names:
                m = _TEMP_FILE.match(name)
                if m is None and not _LEGACY_TEMP_FILE.match(name):
                    continue
                path = d / name
                try:
                    age = now - path.stat().st_mtime
                    dead = m is not None and m.group(2) == host and not _pid_alive(int(m.group(1)))
                    if dead or age > STALE_TEMP_SECONDS:
                        path.unlink()
                        removed += 1
                except OSError:
                    continue
        if removed:
            logger.info("removed %d temp file(s) of interrupted KV cache writes under %s", removed, self.root)
        return removed

    def repair(self, ns: str) -> None:
        """Replace the damaged shards of ``ns`` found so far (their entries are misses, recomputed
        by whoever needs them): an unreadable one is deleted, one with damaged entries is
        rewritten without them. A writable store runs it after each write."""
        if not self.writable:
            return
        with self._lock:
            unreadable = self._unreadable.pop(ns, set())
            bad = self._bad.pop(ns, {})
        for path in unreadable:
            try:
                path.unlink()
                logger.warning("removed the damaged KV cache shard %s (its entries are recomputed when needed)", path)
            except FileNotFoundError:
                pass
            except OSError as e:
                logger.warning("cannot remove the damaged KV cache shard %s (%s); delete it by hand", path, e)
        for path, names in bad.items():
            try:
                self._rewrite_without(ns, path, names)
            except Exception as e:  # noqa: BLE001 - the shard stays a partial miss
                logger.warning("cannot rewrite the damaged KV cache shard %s (%s: %s); delete it or refill the "
                               "cache (nbce-rag cache)", path, type(e).__name__, e)

    def _rewrite_without(self, ns: str, path: Path, names: set) -> None:
        from safetensors import safe_open
        from safetensors.torch import save_file

        keep: Dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            crc = json.loads(meta.get("crc", "{}"))
            for name in f.keys():
                if name.endswith(".ids") or name in names:
                    continue
                t, ids = f.get_tensor(name), f.get_tensor(name + ".ids")
                if crc.get(name) is not None and _crc_of(meta, ids.tolist(), t) != crc[name]:
                    continue  # damaged too
                keep[name], keep[name + ".ids"] = t, ids
        if not keep:
            path.unlink()
            logger.warning("removed the damaged KV cache shard %s (no intact entry left)", path)
            return
        meta["crc"] = json.dumps({n: crc[n] for n in keep if not n.endswith(".ids") and n in crc})
        tmp = self._temp(path.parent, ".safetensors")
        try:
            save_file(keep, tmp, metadata=meta)
            os.replace(tmp, path)  # same entry names: references to the intact ones stay valid
        except BaseException:
            _unlink_quietly(tmp)
            raise
        logger.warning("rewrote the KV cache shard %s without its %d damaged entr%s", path, len(names),
                       "y" if len(names) == 1 else "ies")

    @staticmethod
    def _temp(d: Path, suffix: str = "") -> str:
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.getpid()}-{_host_tag()}-", suffix=suffix, dir=d)
        os.close(fd)
        return tmp

    # ---------------- reading
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
                if path.name in seen or path.name.startswith("."):  # a temp file: a write under way or killed
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
                with_ids = meta.get("crc_scope") == CRC_SCOPE
                for name in f.keys():
                    if name.endswith(".ids"):
                        continue
                    ids = tuple(int(x) for x in f.get_tensor(name + ".ids").tolist())
                    index.add(ns, ids, (path, name, crc.get(name), with_ids))
        except Exception as e:  # a damaged shard is a miss, never a crash
            self.errors += 1
            if not isinstance(e, OSError):  # damaged, not merely unreachable now: replaced on the next write
                self._unreadable.setdefault(ns, set()).add(path)
            logger.warning("KV cache shard %s is unreadable (%s: %s); its entries are misses. Refill the cache "
                           "(nbce-rag cache), which replaces it.", path, type(e).__name__, e)

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
        path, name, crc, with_ids = ref
        try:
            with safe_open(str(path), framework="pt") as f:
                t = f.get_tensor(name)
            if crc is not None:
                got = entry_crc(key[1], t) if with_ids else zlib.crc32(t.contiguous().view(torch.uint8).numpy())
                if got != crc:
                    raise ValueError("checksum mismatch")
            if t.dim() != 5 or t.shape[1] != 2 or t.shape[3] != len(key[1]):
                raise ValueError(f"tensor of shape {tuple(t.shape)} does not hold {len(key[1])} positions")
            return t
        except Exception as e:
            self.errors += 1
            logger.warning("KV cache entry %s in %s is damaged (%s: %s); recomputing it", name, path, type(e).__name__, e)
            with self._lock:
                index.remove(ns, key[1], [h for _, h in _block_hashes(ns, key[1], len(key[1]))])
                if not isinstance(e, OSError):
                    self._bad.setdefault(ns, {}).setdefault(path, set()).add(name)
            return None

    # ---------------- writing
    def write(self, ns: str, desc: Dict[str, Any], entries: Sequence[Tuple[Tuple[int, ...], torch.Tensor]]) -> Optional[Path]:
        """Write ``entries`` as one new shard (temp file + rename); returns its path. The first
        write to a namespace removes stale temp files there; each write replaces the damaged
        shards found so far (:meth:`repair`)."""
        from safetensors.torch import save_file

        if not entries or not self.writable:
            return None
        d = self._ns_dir(ns)
        d.mkdir(parents=True, exist_ok=True)
        if ns not in self._swept:
            self.sweep(ns)
        desc_path = d / "namespace.json"
        if not desc_path.exists():
            _atomic_write_text(desc_path, json.dumps(desc, indent=2, sort_keys=True), self._temp(d))
        tensors, crc = {}, {}
        for i, (ids, kv) in enumerate(entries):
            t = kv.detach().to("cpu").contiguous()
            tensors[f"e{i}"] = t
            tensors[f"e{i}.ids"] = torch.tensor(ids, dtype=torch.int64)
            crc[f"e{i}"] = entry_crc(ids, t)
        meta = {"format": FORMAT, "namespace": ns, "crc": json.dumps(crc), "crc_scope": CRC_SCOPE}
        final = d / f"kv-{uuid.uuid4().hex}.safetensors"
        tmp = self._temp(d, ".safetensors")
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, final)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        with self._lock:  # index our own shard right away
            index = self._index.setdefault(ns, PrefixIndex())
            self._seen.setdefault(ns, {})[final.name] = 0.0
            for i, (ids, _) in enumerate(entries):
                index.add(ns, tuple(ids), (final, f"e{i}", crc[f"e{i}"], True))
        self.repair(ns)
        return final

    def nbytes(self) -> int:
        """Bytes of all shards on disk (every namespace; temp files not counted)."""
        if not self.root.is_dir():
            return 0
        return sum(p.stat().st_size for p in self.root.glob("*/*.safetensors") if not p.name.startswith("."))

    def __len__(self) -> int:
        with self._lock:
            return sum(len(i.entries) for i in self._index.values())


def _crc_of(meta: Dict[str, Any], ids: Sequence[int], t: torch.Tensor) -> int:
    if meta.get("crc_scope") == CRC_SCOPE:
        return entry_crc(ids, t)
    return zlib.crc32(t.contiguous().view(torch.uint8).numpy())


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _atomic_write_text(path: Path, text: str, tmp: str) -> None:
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
