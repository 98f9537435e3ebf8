"""Passage KV cache: an answer costs the question, not the passages.

An NBCE row is ``[template prefix][passage][template text + question]`` and attention is
causal, so the keys and values of everything before the question do not depend on the
question. Computed once, they are reused **exactly** by every later question over the same
passage (each row starts at position 0; positions come from the attention mask).

How the decoder uses it (:meth:`NBCEDecoder.start` -> :func:`plan_prefill`, then
:meth:`NBCEDecoder.prefill` chunk by chunk -> :meth:`PrefillPlan.prefill`):

1. For each row, the *cacheable* length is everything before the first question token (the
   decoder locates it from the tokenizer's offsets): template prefix, passage, and the template
   text between passage and question (e.g. ``"\n\nAnswer briefly:"``). When the question
   cannot be located, the question-dependent tail is the longest common token suffix with a
   reference row (the no-passage row for passage rows, the first passage row for the
   no-passage row). One more token is left uncached so that the logits at the position before
   the question (and so at every question position) are always computed by the prefill.
2. Lookup on **token ids**: the cached entry with the longest common prefix with the row
   (exact key first, then 16-token block hashes, then an exact comparison of the ids). The
   entry is cropped to the common prefix, so a tokenisation that differs at the passage's
   edge can never make it wrong; only the rest of the row is prefilled.
3. A micro-batch of rows becomes one forward: each row's last ``S`` tokens are the new input
   (``S`` = the longest uncached tail in the batch) and its first ``len - S`` tokens come from
   the cache, right-aligned in a left-padded past of ``P`` columns. That is exactly the
   left-padded layout of an uncached prefill (pads only on the left), so the decode groups
   merge as before.
4. A row whose cacheable part was not (fully) cached is stored after the forward.

Where entries live: :class:`PassageKVCache`, an LRU in RAM with a byte budget (default: a
quarter of the machine's memory, at most 16 GiB; ``NBCE_RAG_KV_CACHE_BYTES``), and optionally
:class:`~nbce_rag.decoding.kvstore.DiskKVStore`, safetensors shards under a directory (one
folder per model namespace, each entry checked by CRC32 when it is loaded). Both find entries
through :class:`~nbce_rag.decoding.kvstore.PrefixIndex`; the token-prefix index and the disk
store are :mod:`nbce_rag.decoding.kvstore`. A damaged shard is a miss and a warning, never an
error and never a wrong answer.

Keys: every entry lives in a *namespace* that covers everything that changes the numbers:
model class and configuration, a fingerprint of the weights (every tensor's name, shape,
dtype and a strided sample of its values), dtype, device type, attention implementation,
and the torch / transformers / nbce-rag versions. Template and system prompt are part of the
token ids themselves. Anything else is a miss.

Not cached (said once in the log, then run uncached): a ``prompt_template`` with
``{question}`` before ``{passage}``; models whose cache is not plain full attention (sliding
windows, hybrid layers), "dynamic" RoPE scaling (the positions' scale depends on the total
length), models sharded over several devices.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from nbce_rag.decoding.kvlayout import cache_from, is_plain, left_padded, new_cache
from nbce_rag.decoding.kvstore import FORMAT, DiskKVStore, PrefixIndex, warn_once
from nbce_rag.decoding.kvstore import BLOCK  # noqa: F401 - importable from here as before
from nbce_rag.decoding.rows import Group, check_passages, prepare_rows

logger = logging.getLogger(__name__)

MIN_UNCACHED = 1  #: tokens before a row's question-dependent tail that are always recomputed
ENV_BYTES = "NBCE_RAG_KV_CACHE_BYTES"
ENV_DIR = "NBCE_RAG_KV_CACHE_DIR"
ENV_OFF = "NBCE_RAG_KV_CACHE"  #: "0" / "off" turns the default cache off


# ---------------------------------------------------------------------------------- sizes
def parse_bytes(value: Any) -> int:
    """``123``, ``"512MiB"``, ``"2GB"``, ``"1.5G"`` -> bytes."""
    if isinstance(value, (int, float)):
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*", str(value).lower())
    if not m:
        raise ValueError(f"cannot read {value!r} as a size; use e.g. 2GiB, 512MB or a number of bytes")
    num, unit = float(m.group(1)), m.group(2)
    return int(num * 1024 ** " kmgt".index(unit or " "))


def env_max_bytes() -> Optional[int]:
    """``NBCE_RAG_KV_CACHE_BYTES`` when set (a bad value: ConfigError naming it), else None."""
    from nbce_rag.runtime import env_setting

    return env_setting(ENV_BYTES, parse_bytes)


def default_max_bytes() -> int:
    """A quarter of the machine's memory, at most 16 GiB (``NBCE_RAG_KV_CACHE_BYTES`` overrides)."""
    env = env_max_bytes()
    if env is not None:
        return env
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        total = 8 * 2**30
    return int(min(total // 4, 16 * 2**30))


# ---------------------------------------------------------------------------------- namespace
_NAMESPACES: "weakref.WeakKeyDictionary[Any, Tuple[Any, str, Dict[str, Any]]]" = weakref.WeakKeyDictionary()
_NS_LOCK = threading.Lock()


def weights_fingerprint(model: torch.nn.Module, samples: int = 256) -> str:
    """A hash of every tensor's name, shape and dtype plus ``samples`` values taken at even
    strides: any other checkpoint or fine-tune changes it, at a cost of milliseconds."""
    h = hashlib.blake2b(digest_size=16)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
            if t.device.type == "meta" or t.numel() == 0:
                continue
            flat = t.detach().reshape(-1)
            k = min(samples, flat.numel())
            idx = (torch.arange(k, dtype=torch.int64) * (flat.numel() - 1)) // max(1, k - 1)
            h.update(flat[idx.to(flat.device)].float().cpu().numpy().tobytes())
    return h.hexdigest()


def model_namespace(model: torch.nn.Module) -> Tuple[str, Dict[str, Any]]:
    """``(hash, description)`` of everything about ``model`` that changes cached keys/values.
    Remembered per model object and recomputed when its parameters change (moved, cast, or
    modified in place: torch's version counters), so a fine-tuned model never reads the
    entries of its former self."""
    params = list(model.parameters())
    quick = (tuple((p.dtype, p.device, p.data_ptr()) for p in params[:: max(1, len(params) // 8)]),
             sum(p._version for p in params), str(getattr(model.config, "_attn_implementation", None)))
    with _NS_LOCK:
        got = _NAMESPACES.get(model)
    if got is not None and got[0] == quick:
        return got[1], got[2]
    import transformers

    from nbce_rag import __version__

    cfg = model.config.to_dict()
    for k in ("_name_or_path", "transformers_version", "name_or_path"):
        cfg.pop(k, None)
    param = next(model.parameters())
    desc = {
        "format": FORMAT,
        "model_class": type(model).__name__,
        "config": hashlib.blake2b(json.dumps(cfg, sort_keys=True, default=str).encode(), digest_size=16).hexdigest(),
        "weights": weights_fingerprint(model),
        "dtype": str(param.dtype),
        "device_type": param.device.type,
        "attn_implementation": str(getattr(model.config, "_attn_implementation", None)),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "nbce_rag": __version__,
    }
    ns = hashlib.blake2b(json.dumps(desc, sort_keys=True).encode(), digest_size=12).hexdigest()
    with _NS_LOCK:
        _NAMESPACES[model] = (quick, ns, desc)
    return ns, desc


def unsupported_reason(model: torch.nn.Module) -> Optional[str]:
    """Why cached keys/values would not be exact for ``model`` (None: they are)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cfg = model.config
    text_cfg = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    for rs in (getattr(text_cfg, "rope_scaling", None), getattr(text_cfg, "rope_parameters", None)):
        if isinstance(rs, dict) and "dynamic" in str(rs.get("rope_type", rs.get("type", ""))):
            return "its RoPE scaling is 'dynamic' (positions depend on the total length)"
    try:
        layers = DynamicCache(config=cfg).layers
    except Exception:  # pragma: no cover - exotic configs
        layers = []
    if any(type(layer) is not DynamicLayer for layer in layers):
        return "its cache is not plain full attention (sliding-window or hybrid layers)"
    devmap = getattr(model, "hf_device_map", None)
    if isinstance(devmap, dict) and len({str(d) for d in devmap.values()}) > 1:
        return "it is sharded over several devices"
    return None


# ---------------------------------------------------------------------------------- entries
@dataclass
class KVEntry:
    """The keys/values of one token sequence: ``kv[layer, 0|1, kv_head, position, head_dim]``."""

    ids: Tuple[int, ...]
    kv: torch.Tensor
    blocks: List[Any] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


@dataclass
class KVCacheStats:
    """Counters of a :class:`PassageKVCache` (cumulative) or of one prefill (``last``).
    ``hits``: rows whose whole cacheable part was cached; ``partial``: part of it;
    ``misses``: none. ``cached_tokens`` of ``prompt_tokens`` were not recomputed."""

    rows: int = 0
    hits: int = 0
    partial: int = 0
    misses: int = 0
    cached_tokens: int = 0
    prompt_tokens: int = 0
    stored: int = 0
    evicted: int = 0
    disk_loads: int = 0
    disk_errors: int = 0

    def add(self, other: "KVCacheStats") -> None:
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def to_dict(self) -> Dict[str, int]:
        return dict(self.__dict__)

    def summary(self) -> str:
        """One line for people, e.g. ``KV cache: 9/11 rows hit, 1650/2010 prompt tokens reused``."""
        s = f"KV cache: {self.hits}/{self.rows} rows hit"
        if self.partial:
            s += f" ({self.partial} partly)"
        return s + f", {self.cached_tokens}/{self.prompt_tokens} prompt tokens reused"


# ---------------------------------------------------------------------------------- the cache
class PassageKVCache:
    """Keys/values of passage prefixes, shared by every decoder over the same model.

    ``max_bytes``: RAM budget of the LRU (default :func:`default_max_bytes`; an int or a
    string like ``"2GiB"``). ``disk``: a directory (or a :class:`DiskKVStore`) used as a
    second level: looked up on a RAM miss, and written with every new entry when
    ``write_disk`` (entries of one prefill go into one shard). ``device``: where RAM entries
    are kept (default CPU memory; ``"cuda"`` keeps them next to a GPU model).
    Thread-safe: readers and writers may share it (the server's worker, several pipelines).
    """

    def __init__(self, max_bytes: Any = None, disk: Any = None, *, write_disk: bool = True,
                 device: Any = "cpu") -> None:
        self.max_bytes = default_max_bytes() if max_bytes is None else parse_bytes(max_bytes)
        if self.max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 (got {self.max_bytes})")
        if disk is not None and not isinstance(disk, DiskKVStore):
            disk = DiskKVStore(disk, writable=write_disk)
        self.disk: Optional[DiskKVStore] = disk
        self.device = torch.device(device)
        self._ram = PrefixIndex()
        self._bytes = 0
        self._lock = threading.RLock()
        self.stats = KVCacheStats()
        self.write_errors: List[OSError] = []  #: failed writes to the disk store (each also a warning)

    def __repr__(self) -> str:
        return (f"PassageKVCache(entries={len(self)}, bytes={self._bytes}, max_bytes={self.max_bytes}, "
                f"disk={self.disk!r})")

    def __len__(self) -> int:
        return len(self._ram.entries)

    @property
    def nbytes(self) -> int:
        """Bytes held in RAM now."""
        return self._bytes

    def clear(self) -> None:
        """Drop every RAM entry (the disk store is left as it is)."""
        with self._lock:
            self._ram = PrefixIndex()
            self._bytes = 0

    # -------------------------------------------------------------- lookups
    def lookup(self, ns: str, ids: Sequence[int], limit: int) -> Tuple[Optional[KVEntry], int]:
        """The entry sharing the longest token prefix with ``ids[:limit]`` and that length
        (RAM, then disk; a disk entry is promoted into RAM)."""
        if limit <= 0:
            return None, 0
        with self._lock:
            key, m = self._ram.find(ns, ids, limit)
            if key is not None and m == limit:
                self._ram.entries.move_to_end(key)
                return self._ram.entries[key], m
        if self.disk is not None:
            self.disk.refresh(ns)
            dkey, dm = self.disk.find(ns, ids, limit)
            if dkey is not None and dm > m:
                t = self.disk.load(ns, dkey)
                if t is None:
                    with self._lock:
                        self.stats.disk_errors += 1
                else:
                    entry = self._insert(ns, dkey[1], t.to(self.device))
                    with self._lock:
                        self.stats.disk_loads += 1
                    if entry is not None:
                        return entry, dm
                    return KVEntry(dkey[1], t), dm  # larger than the whole budget: use it once
        with self._lock:
            if key is not None and key in self._ram.entries:
                self._ram.entries.move_to_end(key)
                return self._ram.entries[key], m
        return None, 0

    # -------------------------------------------------------------- stores
    def put(self, ns: str, ids: Sequence[int], kv: torch.Tensor) -> Optional[KVEntry]:
        """Keep ``kv`` (``[layers, 2, kv_heads, len(ids), head_dim]``) for the token prefix ``ids``."""
        ids = tuple(int(x) for x in ids)
        if kv.dim() != 5 or kv.shape[1] != 2 or kv.shape[3] != len(ids):
            raise ValueError(f"kv of shape {tuple(kv.shape)} does not hold {len(ids)} positions")
        return self._insert(ns, ids, kv.detach().to(self.device).contiguous())

    def _insert(self, ns: str, ids: Tuple[int, ...], kv: torch.Tensor) -> Optional[KVEntry]:
        entry = KVEntry(ids, kv)
        if entry.nbytes > self.max_bytes:
            return None
        with self._lock:
            old = self._ram.entries.get((ns, ids))
            if old is not None:
                self._ram.entries.move_to_end((ns, ids))
                return old
            entry.blocks = self._ram.add(ns, ids, entry)
            self._bytes += entry.nbytes
            while self._bytes > self.max_bytes and self._ram.entries:
                (ens, eids), victim = next(iter(self._ram.entries.items()))
                self._ram.remove(ens, eids, victim.blocks)
                self._bytes -= victim.nbytes
                self.stats.evicted += 1
            return self._ram.entries.get((ns, ids))

    def write_disk(self, ns: str, desc: Dict[str, Any], entries: Sequence[Tuple[Tuple[int, ...], torch.Tensor]]) -> None:
        """Write new entries to the disk store (one shard); a failure is a warning."""
        if self.disk is None or not self.disk.writable or not entries:
            return
        try:
            self.disk.write(ns, desc, entries)
        except OSError as e:
            self.write_errors.append(e)
            warn_once(logger, ("kv-write", str(self.disk.root)), "cannot write the KV cache to %s (%s); "
                      "keeping it in RAM only", self.disk.root, e)


# ---------------------------------------------------------------------------------- defaults
_DEFAULT: Optional[PassageKVCache] = None
_DEFAULT_LOCK = threading.Lock()


def default_cache() -> Optional[PassageKVCache]:
    """The process-wide cache every decoder uses unless told otherwise (RAM, and the disk
    store in ``NBCE_RAG_KV_CACHE_DIR`` when set). ``NBCE_RAG_KV_CACHE=0`` turns it off."""
    global _DEFAULT
    if os.environ.get(ENV_OFF, "").strip().lower() in ("0", "off", "false", "no"):
        return None
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = PassageKVCache(disk=os.environ.get(ENV_DIR) or None)
        return _DEFAULT


def resolve_cache(value: Any) -> Optional[PassageKVCache]:
    """``"auto"`` -> :func:`default_cache`; None/False -> off; a :class:`PassageKVCache` as
    it is; a path -> a RAM cache over that disk store."""
    if value is None or value is False:
        return None
    if isinstance(value, str) and value == "auto" or value is True:
        return default_cache()
    if isinstance(value, PassageKVCache):
        return value
    if isinstance(value, (str, os.PathLike, DiskKVStore)):
        return PassageKVCache(disk=value)
    raise TypeError(f"kv_cache must be 'auto', None, a PassageKVCache or a directory, got {type(value).__name__}")


# ---------------------------------------------------------------------------------- planning
def cacheable_lengths(rows: Sequence[Sequence[int]], min_uncached: int = MIN_UNCACHED,
                      stable: Optional[Sequence[Optional[int]]] = None) -> List[int]:
    """Per row, how many leading tokens do not depend on the question.

    ``stable[r]``: row ``r``'s question-independent prefix when the decoder located the
    question (:func:`nbce_rag.decoding.scoring.locate_question`: the template prefix, the passage and
    the template text before the question, ending before the position that precedes the
    question). Otherwise: the row minus its longest common suffix with a reference row (row 0
    for the others, row 1 for row 0) and minus ``min_uncached``, which also leaves the template
    text before the question uncached. Rows must be ``[no-passage row] + passage rows``."""
    out = []
    for r, ids in enumerate(rows):
        n = len(ids)
        if stable is not None and stable[r] is not None and 0 <= stable[r] < n:
            out.append(stable[r])
            continue
        ref = rows[1] if r == 0 else rows[0]
        k = 0
        while k < min(n, len(ref)) and ids[n - 1 - k] == ref[len(ref) - 1 - k]:
            k += 1
        out.append(max(0, n - k - min_uncached))
    return out


class PrefillPlan:
    """What each row of one prefill reuses; built by :func:`plan_prefill`, driven by the decoder."""

    def __init__(self, decoder, cache: PassageKVCache, rows: List[List[int]], ns: str, desc: Dict[str, Any],
                 stable: Optional[Sequence[Optional[int]]] = None):
        self.dec = decoder
        self.cache = cache
        self.rows = rows
        self.ns, self.desc = ns, desc
        self.cacheable = cacheable_lengths(rows, stable=stable)
        self.entries: List[Optional[KVEntry]] = []
        self.cached: List[int] = []
        st = KVCacheStats(rows=len(rows), prompt_tokens=sum(len(r) for r in rows))
        for ids, a in zip(rows, self.cacheable):
            entry, m = cache.lookup(ns, ids, a)
            self.entries.append(entry)
            self.cached.append(m)
            st.cached_tokens += m
            if a > 0 and m >= a:
                st.hits += 1
            elif m > 0:
                st.partial += 1
            else:
                st.misses += 1
        self.stats = st
        self._new: List[Tuple[Tuple[int, ...], torch.Tensor]] = []
        self.stored_rows: set = set()

    def uncached(self, r: int) -> int:
        return len(self.rows[r]) - self.cached[r]

    def prefill(self, members: List[int]):
        """One forward for the rows ``members``: returns ``(last-position logits, Group)``."""
        dec = self.dec
        dev = dec.device
        pad = dec.tokenizer.pad_token_id
        n = [len(self.rows[r]) for r in members]
        S = max(len_ - self.cached[r] for len_, r in zip(n, members))  # new tokens per row
        use = [max(0, len_ - S) for len_ in n]  # cached tokens per row (<= cached[r])
        P = max(use)
        B, W = len(members), P + S
        ids, mask, pos = left_padded([self.rows[r] for r in members], S, pad)
        past = new_cache()
        if P:
            first = next(self.entries[r] for r, u in zip(members, use) if u)
            L, _, H, _, D = first.kv.shape
            buf = torch.empty((L, 2, B, H, P, D), dtype=first.kv.dtype, device=first.kv.device)
            for j, (r, u) in enumerate(zip(members, use)):
                if u < P:
                    buf[:, :, j, :, :P - u] = 0  # left padding: masked out, but must be finite
                if u:
                    buf[:, :, j, :, P - u:] = self.entries[r].kv[:, :, :, :u]
            buf = buf.to(dev, non_blocking=True)
            past = cache_from([(buf[li, 0], buf[li, 1]) for li in range(L)])
        ids, mask, pos = ids.to(dev), mask.to(dev), pos.to(dev)
        logits, cache = dec._forward(ids, mask, pos, past)
        if not is_plain(cache):  # pragma: no cover - unsupported_reason() catches these first
            warn_once(logger, ("kv-layout", self.ns), "this model's KV cache layout is not supported by the passage cache")
        else:
            for j, r in enumerate(members):
                a = self.cacheable[r]
                if a > self.cached[r]:
                    start = W - n[j]
                    kv = torch.stack([torch.stack([layer.keys[j, :, start:start + a], layer.values[j, :, start:start + a]])
                                      for layer in cache.layers])
                    ids = tuple(self.rows[r][:a])
                    entry = self.cache.put(self.ns, ids, kv)
                    self.stats.stored += 1
                    self.stored_rows.add(r)
                    self._new.append((ids, kv))  # for the disk store, even when RAM has no room
                    if entry is not None:
                        self.entries[r], self.cached[r] = entry, a  # later rows of this call reuse it
        return logits, Group(members, cache, mask, pos[:, -1:])

    def finish(self) -> None:
        """After the last micro-batch: write new entries to disk, update the cache's counters."""
        self.cache.write_disk(self.ns, self.desc, self._new)
        self._new = []
        self.entries = [None] * len(self.rows)  # the rows are computed: let the LRU free what it evicts
        with self.cache._lock:
            self.cache.stats.add(self.stats)
            self.cache.last = self.stats  # type: ignore[attr-defined]


def plan_prefill(decoder, rows, cfg) -> Optional[PrefillPlan]:
    """A :class:`PrefillPlan` for ``rows`` (:class:`~nbce_rag.decoding.rows.Row` objects, row 0
    the no-passage row), or None when the decoder has no cache or the cache cannot be exact
    here (said once)."""
    cache = getattr(decoder, "kv_cache", None)
    if cache is None or len(rows) < 2 or rows[0].source != -1:
        return None
    tpl = cfg.prompt_template
    if tpl.find("{question}") < tpl.find("{passage}"):
        warn_once(logger, ("kv-template", tpl), "prompt_template puts {question} before {passage}: passages cannot share "
                  "a cached prefix across questions, so the passage KV cache is off for this template")
        return None
    model = decoder.model
    reason = unsupported_reason(model)
    if reason is not None:
        warn_once(logger, ("kv-model", id(model)), "passage KV cache off for this model: %s", reason)
        return None
    ns, desc = model_namespace(model)
    return PrefillPlan(decoder, cache, [list(r.ids) for r in rows], ns, desc,
                       stable=[getattr(r, "stable", None) for r in rows])


# ---------------------------------------------------------------------------------- filling
FILL_QUESTION = "What does this passage say?"


@torch.inference_mode()
def fill(decoder, passages: Iterable[Any], *, batch_passages: int = 32, show_progress: bool = False) -> KVCacheStats:
    """Precompute the keys/values of ``passages`` (strings, :class:`Passage`, dicts...) into
    ``decoder.kv_cache`` (and its disk store) ahead of time, exactly as
    ``decoder.generate(question, passages)`` would reuse them for any question. Passages
    already cached are skipped. Returns the counters of this fill. (What
    :meth:`NBCEDecoder.cache_passages` runs, for a list of passages or an index's chunks.)"""
    cache = decoder.kv_cache
    if cache is None:
        raise ValueError("this decoder has no KV cache (kv_cache=None); create it with kv_cache='auto' or a directory")
    kept = check_passages(list(passages))
    if cache.disk is not None:
        cache.disk.sweep()  # temp files of an earlier, interrupted fill
    total = KVCacheStats()
    namespaces = set()
    bar = None
    if show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(kept), desc="KV cache", unit="passage")
    cfg = decoder.config
    for start in range(0, len(kept), batch_passages):
        chunk = kept[start : start + batch_passages]
        prep = prepare_rows(decoder, FILL_QUESTION, chunk, cfg)
        plan = plan_prefill(decoder, prep.rows, cfg)
        if plan is None:
            raise ValueError("the passage KV cache cannot be used with this model or prompt_template (see the log)")
        passage_rows = range(1, len(prep.rows))
        todo = [r for r in passage_rows if plan.cached[r] < plan.cacheable[r]]
        if plan.cached[0] < plan.cacheable[0]:  # the no-passage row's question-free prefix, once
            todo.append(0)
        todo.sort(key=lambda r: -plan.uncached(r))
        for s in range(0, len(todo), cfg.batch_rows):
            plan.prefill(todo[s : s + cfg.batch_rows])
        total.rows += len(passage_rows)
        new = sum(1 for r in todo if r)
        total.hits += len(passage_rows) - new  # already cached
        total.misses += new
        total.stored += len(plan.stored_rows - {0})
        total.prompt_tokens += sum(plan.cacheable[r] for r in passage_rows)
        plan.stats = KVCacheStats(stored=plan.stats.stored)  # the cache counts what was stored, not lookups
        plan.finish()
        namespaces.add(plan.ns)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    if cache.disk is not None:
        for ns in namespaces:  # every passage is now stored or found intact: damaged shards can go
            cache.disk.repair(ns)
    return total


# ---------------------------------------------------------------------------------- an index's store
INDEX_KV_DIR = "kvcache"  #: the disk store of an index directory, filled by ``nbce-rag cache``


def index_kv_dir(index_dir: os.PathLike | str) -> Path:
    """Where ``nbce-rag cache`` writes the passage KV cache of an index: ``<index>/kvcache``."""
    return Path(index_dir) / INDEX_KV_DIR


def cache_for_index(index_dir: os.PathLike | str) -> Optional[PassageKVCache]:
    """A RAM cache over the index's disk store (read-only: questions do not write into the
    index directory), or None when the index has none."""
    d = index_kv_dir(index_dir)
    if not d.is_dir() or os.environ.get(ENV_OFF, "").strip().lower() in ("0", "off", "false", "no"):
        return None
    return PassageKVCache(disk=DiskKVStore(d, writable=False))


def index_texts(index) -> List[str]:
    """The chunk texts of a :class:`~nbce_rag.retrieval.index.VectorIndex`, in storage order."""
    return [index.get(i).text for i in index.ids]
