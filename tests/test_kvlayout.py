"""The decode groups' KV layout (nbce_rag/decoding/kvlayout.py): appending writes in place (no copy of
the whole cache per token) and gives exactly the stock DynamicCache's keys, values and logits;
merges and row cuts equal the plain concatenations they replace; a layer whose tensors were
replaced from outside starts a new buffer instead of writing into the old one."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from nbce_rag.decoding.kvlayout import GrowingLayer, cache_from, is_plain, merge_left_padded, new_cache, select_rows


def _kv(rows, width, seed, heads=2, dim=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, heads, width, dim, generator=g), torch.randn(rows, heads, width, dim, generator=g)


def test_appending_in_place_equals_concatenation():
    layer = GrowingLayer()
    ref_k = ref_v = None
    ptrs = set()
    for step in range(17):
        k, v = _kv(3, 5 if step == 0 else 1, seed=step)
        got_k, got_v = layer.update(k, v)
        ref_k = k if ref_k is None else torch.cat([ref_k, k], dim=-2)
        ref_v = v if ref_v is None else torch.cat([ref_v, v], dim=-2)
        assert torch.equal(got_k, ref_k) and torch.equal(got_v, ref_v)
        ptrs.add(layer.keys.data_ptr())
    assert len(ptrs) == 1  # 21 columns fit the first buffer (5 + 16 spare): never reallocated
    for step in range(100):  # past the spare columns: bigger buffers, the contents kept
        k, v = _kv(3, 1, seed=100 + step)
        layer.update(k, v)
        ref_k = torch.cat([ref_k, k], dim=-2)
        ptrs.add(layer.keys.data_ptr())
    assert torch.equal(layer.keys, ref_k) and 2 <= len(ptrs) <= 6  # 121 columns: a few regrowths, not 100 copies


def test_replaced_tensors_start_a_new_buffer():
    layer = GrowingLayer()
    k, v = _kv(2, 4, seed=0)
    layer.update(k, v)
    old_buf = layer._kbuf
    k2, v2 = _kv(1, 6, seed=1)
    layer.keys, layer.values = k2, v2  # e.g. a compaction that replaced the rows
    k3, v3 = _kv(1, 1, seed=2)
    got_k, _ = layer.update(k3, v3)
    assert torch.equal(got_k, torch.cat([k2, k3], dim=-2))
    assert torch.equal(old_buf[:, :, :4], k)  # the old buffer was not written into


def test_model_logits_equal_the_stock_cache(tiny_decoder):
    model, tok = tiny_decoder.model, tiny_decoder.tokenizer
    ids = torch.tensor([tok("The tower was built in Paris by a famous engineer")["input_ids"]])
    mask = torch.ones_like(ids)
    kw = tiny_decoder._cache_kw  # "cache" or "past_key_values", by transformers version

    def cache_of(out):
        c = getattr(out, "cache", None)
        return c if c is not None else out.past_key_values

    outs = []
    for cache in (DynamicCache(), new_cache()):
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, **{kw: cache})
        cache, m, logits = cache_of(out), mask, [out.logits[:, -1]]
        for _ in range(6):
            nxt = logits[-1].argmax(-1, keepdim=True)
            m = torch.cat([m, torch.ones_like(nxt)], dim=-1)
            out = model(input_ids=nxt, attention_mask=m, use_cache=True, **{kw: cache})
            cache = cache_of(out)
            logits.append(out.logits[:, -1])
        outs.append(torch.stack(logits))
    assert torch.equal(outs[0], outs[1])
    assert is_plain(cache) and type(cache.layers[0]) is GrowingLayer


def test_merge_and_select_equal_plain_concatenation():
    parts = []
    for rows, width, seed in ((2, 5, 0), (1, 8, 1), (3, 3, 2)):
        data = [_kv(rows, width, seed + 10 * li) for li in range(2)]
        mask = torch.zeros(rows, width, dtype=torch.long)
        mask[:, -2:] = 1
        parts.append((cache_from(data), mask, data))
    want_k = [torch.cat([torch.nn.functional.pad(d[li][0], (0, 0, 8 - d[li][0].shape[2], 0)) for _, _, d in parts])
              for li in range(2)]
    cache, mask = merge_left_padded([(c, m) for c, m, _ in parts])
    assert mask.shape == (6, 8) and int(mask.sum()) == 12
    for li in range(2):
        assert torch.equal(cache.layers[li].keys, want_k[li])
    keep = torch.tensor([0, 2, 5])
    cut = select_rows(cache, keep, 3)
    for li in range(2):
        assert torch.equal(cut.layers[li].keys, want_k[li][keep][:, :, 3:])
    assert cache.layers[0].keys is None  # the merged cache was freed as it was cut


def test_keep_freed_memory_can_be_turned_off(monkeypatch):
    import ctypes
    import ctypes.util
    import sys

    import nbce_rag.runtime as rt

    monkeypatch.setattr(rt, "_done", None)
    monkeypatch.setenv("NBCE_RAG_KEEP_FREED_MEMORY", "0")
    assert rt.keep_freed_memory() is False
    monkeypatch.setattr(rt, "_done", None)
    monkeypatch.delenv("NBCE_RAG_KEEP_FREED_MEMORY")
    try:
        glibc = sys.platform.startswith("linux") and hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallopt")
    except OSError:
        glibc = False
    assert rt.keep_freed_memory() is glibc
