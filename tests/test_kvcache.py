"""The passage KV cache (nbce_rag/decoding/kvcache.py): every answer is token-for-token the answer of
the same decoder without a cache, in fp32 and in bf16 (each test runs in both: the model of
``model_tok`` is cast to each dtype; issue 28), whether the passages are all cached, partly cached
(a cropped prefix), not cached, mixed in one batch, split into windows, asked about with
other questions, evicted, reloaded from disk, written by another model, or damaged on disk."""

from __future__ import annotations

import copy
import logging
import threading
from pathlib import Path

import pytest
import torch

from nbce_rag import NBCEDecoder
from nbce_rag.decoding.kvcache import (
    DiskKVStore,
    PassageKVCache,
    cacheable_lengths,
    default_cache,
    fill,
    model_namespace,
    parse_bytes,
    resolve_cache,
)

from conftest import make_tiny_llama

LONG = " ".join(["The river Thames flows through London into the North Sea."] * 12)
PASSAGES = [
    "The Eiffel Tower is in Paris and was completed in 1889.",
    LONG,
    "Bananas are rich in potassium and grow in tropical climates, mostly in large farms near the coast.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "Mount Everest is the highest mountain above sea level.",
]
QUESTIONS = ["When was it completed?", "How high is the mountain?", "Who designed the tower?"]
N = 10


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def model_tok(tiny_chat_tokenizer, request):
    """The tiny model in each dtype: cached vs uncached must agree token for token within each."""
    return make_tiny_llama(len(tiny_chat_tokenizer), seed=3).to(request.param), tiny_chat_tokenizer


@pytest.fixture(scope="module")
def ref(model_tok):
    """The same model without a cache: the answers every cached run must reproduce."""
    model, tok = model_tok
    return NBCEDecoder(model, tok, kv_cache=None)


def cached(model_tok, cache=None, **kw):
    model, tok = model_tok
    return NBCEDecoder(model, tok, kv_cache=cache if cache is not None else PassageKVCache(max_bytes=2**30), **kw)


def same(a, b):
    assert a.token_ids == b.token_ids
    assert a.token_sources == b.token_sources
    assert a.text == b.text


# ------------------------------------------------------------------ exactness
def test_miss_then_full_hit_equal_no_cache(model_tok, ref):
    dec = cached(model_tok)
    want = ref.generate(QUESTIONS[0], PASSAGES, max_new_tokens=N)
    cold = dec.generate(QUESTIONS[0], PASSAGES, max_new_tokens=N)
    assert dec.kv_cache.last.misses == len(PASSAGES) + 1 and cold.cached_tokens == 0
    warm = dec.generate(QUESTIONS[0], PASSAGES, max_new_tokens=N)
    assert dec.kv_cache.last.hits == len(PASSAGES) + 1
    assert warm.cached_tokens > 0.6 * warm.prompt_tokens  # the passages, not the question
    same(cold, want)
    same(warm, want)
    assert len(want.token_ids) > 0


def test_other_questions_over_cached_passages(model_tok, ref):
    dec = cached(model_tok)
    dec.generate(QUESTIONS[0], PASSAGES, max_new_tokens=2)
    for q in QUESTIONS[1:]:
        got = dec.generate(q, PASSAGES, max_new_tokens=N)
        assert dec.kv_cache.last.hits == len(PASSAGES) + 1
        same(got, ref.generate(q, PASSAGES, max_new_tokens=N))


@pytest.mark.parametrize("batch_rows", [1, 2, 16])
def test_mixed_batch_of_hits_and_misses(model_tok, ref, batch_rows):
    dec = cached(model_tok)
    dec.generate(QUESTIONS[1], PASSAGES[::2], max_new_tokens=2)  # 3 of 5 cached
    got = dec.generate(QUESTIONS[0], PASSAGES, max_new_tokens=N, batch_rows=batch_rows, decode_rows=3)
    st = dec.kv_cache.last
    assert st.hits == 4 and st.misses == 2  # the no-passage row + 3 passages; 2 new passages
    same(got, ref.generate(QUESTIONS[0], PASSAGES, max_new_tokens=N, batch_rows=batch_rows, decode_rows=3))


def test_partial_hit_uses_a_cropped_prefix(model_tok, ref):
    """Longest cached prefix on token ids (block hashes, then the ids compared), cropped:
    a passage that extends a cached one reuses the cached part and computes the rest; a
    passage that is a prefix of a cached one is served by cropping that entry."""
    dec = cached(model_tok)
    longer = LONG + " The Thames is the longest river entirely in England."
    dec.generate(QUESTIONS[0], [LONG], max_new_tokens=2)
    got = dec.generate(QUESTIONS[1], [longer], max_new_tokens=N)
    st = dec.kv_cache.last
    assert st.partial == 1 and st.hits == 1  # the longer row partly, the no-passage row fully
    same(got, ref.generate(QUESTIONS[1], [longer], max_new_tokens=N))
    dec.generate(QUESTIONS[1], [longer], max_new_tokens=2)  # the longer passage was stored: a hit
    assert dec.kv_cache.last.hits == 2

    dec = cached(model_tok)
    dec.generate(QUESTIONS[0], [longer], max_new_tokens=2)
    got = dec.generate(QUESTIONS[2], [LONG], max_new_tokens=N)  # a prefix of the cached entry
    st = dec.kv_cache.last
    # the no-passage row fully; LONG's row through the whole passage from the cropped entry (the
    # template text after the passage differs from the longer passage's text, so it is computed)
    n_passage = len(dec.tokenizer(LONG, add_special_tokens=False)["input_ids"])
    assert st.hits == 1 and st.partial == 1 and st.cached_tokens > n_passage
    same(got, ref.generate(QUESTIONS[2], [LONG], max_new_tokens=N))


def test_windows_of_long_passages(model_tok, ref):
    dec = cached(model_tok)
    opts = dict(max_new_tokens=N, max_passage_tokens=24, window_overlap=4)
    want = ref.generate(QUESTIONS[0], PASSAGES, **opts)
    for q in (QUESTIONS[0], QUESTIONS[0]):
        same(dec.generate(q, PASSAGES, **opts), want)
    assert dec.kv_cache.last.rows > len(PASSAGES) + 1  # really split
    assert dec.kv_cache.last.misses == 0


def test_plain_prompt_without_chat_template(tiny_decoder, tiny_tokenizer):
    ref = NBCEDecoder(tiny_decoder.model, tiny_tokenizer, kv_cache=None)
    dec = NBCEDecoder(tiny_decoder.model, tiny_tokenizer, kv_cache=PassageKVCache(max_bytes=2**30))
    for q in QUESTIONS[:2]:
        for _ in range(2):
            same(dec.generate(q, PASSAGES, max_new_tokens=N), ref.generate(q, PASSAGES, max_new_tokens=N))
    # every row, the no-passage row too: its question-free prefix is the template text "Answer briefly:"
    assert dec.kv_cache.last.hits == len(PASSAGES) + 1


def test_compare_and_stream_use_the_cache(model_tok, ref):
    dec = cached(model_tok)
    dec.generate(QUESTIONS[0], PASSAGES, max_new_tokens=2)
    variants = [{"pooling": "mean"}, {"beta": 0.5}]
    for a, b in zip(dec.compare(QUESTIONS[2], PASSAGES, variants, max_new_tokens=N),
                    ref.compare(QUESTIONS[2], PASSAGES, variants, max_new_tokens=N)):
        same(a, b)
    text = "".join(ev.text for ev in dec.stream(QUESTIONS[1], PASSAGES, max_new_tokens=N))
    assert text == ref.generate(QUESTIONS[1], PASSAGES, max_new_tokens=N).text


def test_question_positions_are_never_cached(model_tok):
    """The prefill always computes the position before the first question token, so logits at
    every question position are available; the template text between passage and question
    ("Answer briefly") is cached with the passage, and the cached prefix is the same for every
    question (one entry per passage), whether or not the question's first token absorbs the
    space before it."""
    dec = cached(model_tok)
    cfg = dec.config
    seen = []
    for q in QUESTIONS + ["x? ", "Who designed the tower?"]:
        prep = dec._prepare(q, [(i, _p(t)) for i, t in enumerate(PASSAGES)], cfg)
        rows = [r.ids for r in prep.rows]
        q_ids = dec.tokenizer(" " + q.strip(), add_special_tokens=False)["input_ids"]
        lengths = cacheable_lengths(rows, stable=[r.stable for r in prep.rows])
        assert all(r.stable is not None for r in prep.rows)
        for ids, a in zip(rows, lengths):
            text_cached = dec.tokenizer.decode(ids[:a])
            assert q.strip() not in text_cached and a < len(ids) - len(q_ids) - 1
        assert all("Answer briefly" in dec.tokenizer.decode(ids[:a]) for ids, a in zip(rows[1:], lengths[1:]))
        seen.append([tuple(ids[:a]) for ids, a in zip(rows, lengths)])
        # without located questions: the common-suffix rule (template text before the question uncached)
        for ids, a in zip(rows, cacheable_lengths(rows)):
            assert "Answer briefly" not in dec.tokenizer.decode(ids[:a])
    assert all(s == seen[0] for s in seen)


def _p(text):
    from nbce_rag.types import as_passage

    return as_passage(text)


def test_question_before_passage_runs_uncached_and_says_so(model_tok, ref, caplog, monkeypatch):
    from nbce_rag.decoding import kvstore

    monkeypatch.setattr(kvstore, "_WARNED", set())  # said once per process: once per dtype here
    dec = cached(model_tok)
    tpl = "Question: {question}\n\nContext: {passage}"
    with caplog.at_level(logging.WARNING, logger="nbce_rag.decoding.kvcache"):
        a = dec.generate(QUESTIONS[0], PASSAGES, max_new_tokens=N, prompt_template=tpl)
        b = dec.generate(QUESTIONS[0], PASSAGES, max_new_tokens=N, prompt_template=tpl)
    assert a.cached_tokens == b.cached_tokens == 0 and len(dec.kv_cache) == 0
    assert sum("{question} before {passage}" in r.message for r in caplog.records) == 1
    same(b, ref.generate(QUESTIONS[0], PASSAGES, max_new_tokens=N, prompt_template=tpl))


def test_system_prompt_and_template_change_the_key(model_tok, ref):
    dec = cached(model_tok)
    dec.generate(QUESTIONS[0], PASSAGES, max_new_tokens=2)
    got = dec.generate(QUESTIONS[0], PASSAGES, max_new_tokens=N, system_prompt="Be terse.")
    assert dec.kv_cache.last.hits == 0
    same(got, ref.generate(QUESTIONS[0], PASSAGES, max_new_tokens=N, system_prompt="Be terse."))


# ------------------------------------------------------------------ memory
def test_eviction_under_a_tiny_budget(model_tok, ref):
    probe = cached(model_tok)
    probe.generate(QUESTIONS[0], PASSAGES[:1], max_new_tokens=1)
    one = max(e.nbytes for e in probe.kv_cache._ram.entries.values())
    cache = PassageKVCache(max_bytes=2 * one)
    dec = cached(model_tok, cache)
    for q in QUESTIONS:
        same(dec.generate(q, PASSAGES, max_new_tokens=N), ref.generate(q, PASSAGES, max_new_tokens=N))
        assert cache.nbytes <= cache.max_bytes
    assert cache.stats.evicted > 0 and 0 < len(cache) <= 3
    # an entry larger than the whole budget is not kept at all
    none = PassageKVCache(max_bytes=10)
    same(cached(model_tok, none).generate(QUESTIONS[0], PASSAGES, max_new_tokens=N),
         ref.generate(QUESTIONS[0], PASSAGES, max_new_tokens=N))
    assert len(none) == 0 and none.nbytes == 0


def test_lru_keeps_recently_used(model_tok):
    def size(passages):
        probe = cached(model_tok)
        probe.generate(QUESTIONS[0], passages, max_new_tokens=1)
        return probe.kv_cache.nbytes

    row0 = size([PASSAGES[3]]) - (size([PASSAGES[3], PASSAGES[4]]) - size([PASSAGES[4]]))
    p3, p0 = size([PASSAGES[3]]) - row0, size([PASSAGES[0]]) - row0
    cache = PassageKVCache(max_bytes=row0 + p3 + p0)  # not room for passage 4 as well
    dec = cached(model_tok, cache)
    for i in (3, 4, 3, 0):  # touching 3 leaves 4 the least recently used
        dec.generate(QUESTIONS[0], [PASSAGES[i]], max_new_tokens=1)
    assert cache.stats.evicted == 1
    dec.generate(QUESTIONS[0], [PASSAGES[3]], max_new_tokens=1)
    assert cache.last.hits == 2
    dec.generate(QUESTIONS[0], [PASSAGES[4]], max_new_tokens=1)
    assert cache.last.misses == 1


# ------------------------------------------------------------------ disk
def shards(root: Path):
    return sorted(root.glob("*/*.safetensors"))


def test_disk_round_trip(model_tok, ref, tmp_path):
    a = cached(model_tok, PassageKVCache(max_bytes=2**30, disk=tmp_path))
    a.generate(QUESTIONS[0], PASSAGES, max_new_tokens=2)
    assert len(shards(tmp_path)) == 1 and not list(tmp_path.glob("*/.tmp-*"))
    assert (tmp_path / model_namespace(model_tok[0])[0] / "namespace.json").is_file()
    b = cached(model_tok, PassageKVCache(max_bytes=2**30, disk=tmp_path))  # empty RAM: a new process
    got = b.generate(QUESTIONS[1], PASSAGES, max_new_tokens=N)
    assert b.kv_cache.last.hits == len(PASSAGES) + 1 and b.kv_cache.stats.disk_loads >= len(PASSAGES)
    same(got, ref.generate(QUESTIONS[1], PASSAGES, max_new_tokens=N))
    assert len(shards(tmp_path)) == 1  # nothing new to write


def test_read_only_disk_store_is_not_written(model_tok, tmp_path):
    dec = cached(model_tok, PassageKVCache(disk=DiskKVStore(tmp_path, writable=False)))
    dec.generate(QUESTIONS[0], PASSAGES, max_new_tokens=2)
    assert shards(tmp_path) == [] and len(dec.kv_cache) > 0


def test_fill_ahead_of_time(model_tok, ref, tmp_path):
    model, tok = model_tok
    dec = cached(model_tok, PassageKVCache(max_bytes=0, disk=tmp_path))  # disk only
    st = fill(dec, PASSAGES, batch_passages=2)
    assert st.stored == len(PASSAGES) and st.misses == len(PASSAGES)
    assert fill(dec, PASSAGES).stored == 0  # already there
    user = cached(model_tok, PassageKVCache(max_bytes=2**30, disk=tmp_path))
    got = user.generate(QUESTIONS[2], PASSAGES, max_new_tokens=N)
    assert user.kv_cache.last.hits >= len(PASSAGES)
    same(got, ref.generate(QUESTIONS[2], PASSAGES, max_new_tokens=N))


def test_another_model_or_dtype_never_uses_the_cache(model_tok, tiny_chat_tokenizer, tmp_path, caplog):
    a = cached(model_tok, PassageKVCache(disk=tmp_path))
    a.generate(QUESTIONS[0], PASSAGES, max_new_tokens=2)
    tok = tiny_chat_tokenizer
    other = make_tiny_llama(len(tok), seed=4)  # same architecture, other weights
    half = copy.deepcopy(model_tok[0]).to(torch.float64)  # same weights, other dtype
    for m in (other, half):
        assert model_namespace(m)[0] != model_namespace(model_tok[0])[0]
        dec = NBCEDecoder(m, tok, kv_cache=PassageKVCache(disk=tmp_path))
        got = dec.generate(QUESTIONS[0], PASSAGES, max_new_tokens=N)
        assert got.cached_tokens == 0 and dec.kv_cache.stats.disk_loads == 0
        same(got, NBCEDecoder(m, tok, kv_cache=None).generate(QUESTIONS[0], PASSAGES, max_new_tokens=N))
    # a shard copied into another model's folder is refused on its recorded namespace
    ns, ns_other = model_namespace(model_tok[0])[0], model_namespace(other)[0]
    (src,) = [p for p in shards(tmp_path) if p.parent.name == ns]
    (tmp_path / "copy" / ns_other).mkdir(parents=True)
    (tmp_path / "copy" / ns_other / "kv-copied.safetensors").write_bytes(src.read_bytes())
    with caplog.at_level(logging.WARNING, logger="nbce_rag.decoding.kvstore"):
        dec = NBCEDecoder(other, tok, kv_cache=PassageKVCache(disk=tmp_path / "copy", write_disk=False))
        dec.generate(QUESTIONS[1], PASSAGES, max_new_tokens=2)
    assert dec.kv_cache.stats.disk_loads == 0
    assert any("written for another model" in r.message for r in caplog.records)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip"])
def test_corrupt_shard_is_a_miss_and_a_warning(model_tok, ref, tmp_path, caplog, damage):
    cached(model_tok, PassageKVCache(disk=tmp_path)).generate(QUESTIONS[0], PASSAGES, max_new_tokens=2)
    (path,) = shards(tmp_path)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytearray(b"not a safetensors file" * 10)
    else:  # a flipped byte in the tensor data, the header intact: caught by the CRC
        data[-1000] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="nbce_rag.decoding.kvstore"):
        dec = cached(model_tok, PassageKVCache(disk=tmp_path))
        got = dec.generate(QUESTIONS[1], PASSAGES, max_new_tokens=N)
    same(got, ref.generate(QUESTIONS[1], PASSAGES, max_new_tokens=N))
    assert any(w in r.message for r in caplog.records for w in ("unreadable", "damaged"))
    assert dec.kv_cache.last.misses >= 1 and dec.kv_cache.stats.disk_errors + dec.kv_cache.disk.errors >= 1


def test_concurrent_readers(model_tok, ref, tmp_path):
    """Threads sharing one RAM cache, and threads each with their own cache over one disk
    store while another writes new shards: every answer is the uncached answer."""
    cached(model_tok, PassageKVCache(disk=tmp_path)).generate(QUESTIONS[0], PASSAGES, max_new_tokens=2)
    shared = PassageKVCache(disk=tmp_path)
    want = {q: ref.generate(q, PASSAGES, max_new_tokens=N).token_ids for q in QUESTIONS}
    errors, results = [], []

    def reader(i):
        try:
            cache = shared if i % 2 else PassageKVCache(disk=tmp_path)
            q = QUESTIONS[i % len(QUESTIONS)]
            results.append(cached(model_tok, cache).generate(q, PASSAGES, max_new_tokens=N).token_ids == want[q])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    def writer():
        try:
            w = cached(model_tok, PassageKVCache(disk=tmp_path))
            for j in range(3):
                w.generate(QUESTIONS[0], [f"Extra note {j}. {PASSAGES[2]}"], max_new_tokens=1)
        except Exception as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(6)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert results == [True] * 6


# ------------------------------------------------------------------ options
def test_resolve_and_defaults(tmp_path, monkeypatch):
    assert resolve_cache(None) is None and resolve_cache(False) is None
    assert resolve_cache("auto") is default_cache() is resolve_cache(True)
    c = resolve_cache(str(tmp_path))
    assert isinstance(c, PassageKVCache) and c.disk.root == tmp_path
    with pytest.raises(TypeError):
        resolve_cache(3)
    monkeypatch.setenv("NBCE_RAG_KV_CACHE", "0")
    assert resolve_cache("auto") is None
    assert parse_bytes("2GiB") == 2 * 2**30 and parse_bytes("512MB") == 512 * 2**20 and parse_bytes(100) == 100
    with pytest.raises(ValueError):
        parse_bytes("lots")
    assert PassageKVCache().max_bytes <= 16 * 2**30


def test_pipeline_views_share_the_decoders_cache(model_tok):
    from nbce_rag import RAGPipeline

    dec = cached(model_tok)
    rag = RAGPipeline.from_pretrained(decoder=dec, threshold=None, beta=0.5)
    assert rag.decoder is not dec and rag.decoder.kv_cache is dec.kv_cache


# ------------------------------------------------------------------ the real model
@pytest.mark.slow
def test_bundled_model_equal_with_and_without_cache(bundled_decoder):
    from nbce_rag.types import Passage

    ref = NBCEDecoder(bundled_decoder.model, bundled_decoder.tokenizer, kv_cache=None)
    dec = NBCEDecoder(bundled_decoder.model, bundled_decoder.tokenizer, kv_cache=PassageKVCache(max_bytes=2**30))
    passages = [Passage(p, score=s) for p, s in zip(PASSAGES[:4], (0.9, 0.5, 0.3, 0.2))]
    q1, q2 = "When was the Eiffel Tower completed?", "Where does the Thames flow?"
    for q in (q1, q1, q2):
        same(dec.generate(q, passages, max_new_tokens=12), ref.generate(q, passages, max_new_tokens=12))
    assert dec.kv_cache.last.hits == len(passages) + 1


# ------------------------------------------------------------------ filling an index ahead of time
def test_index_build_fills_the_decoder_cache(model_tok, ref, encoder, tmp_path):
    from nbce_rag import VectorIndex

    dec = cached(model_tok, PassageKVCache(disk=tmp_path))
    index = VectorIndex.build(encoder, PASSAGES, decoder=dec)
    assert len(dec.kv_cache) >= len(index) and shards(tmp_path)
    texts = [h.text for h in index.search(QUESTIONS[0], k=3)]
    got = dec.generate(QUESTIONS[0], texts, max_new_tokens=N)
    assert dec.kv_cache.last.hits == 4
    same(got, ref.generate(QUESTIONS[0], texts, max_new_tokens=N))


def test_cache_passages_is_fill_over_passages_or_an_index(model_tok, ref, encoder):
    """NBCEDecoder.cache_passages fills the decoder's cache exactly as kvcache.fill does, from
    a list of passages or from a VectorIndex's chunks, and answers then reuse it."""
    from nbce_rag import VectorIndex
    from nbce_rag.decoding.kvcache import index_texts

    by_method, by_fill = cached(model_tok), cached(model_tok)
    st = by_method.cache_passages(PASSAGES)
    assert st.to_dict() == fill(by_fill, PASSAGES).to_dict()
    assert st.stored == len(PASSAGES) and len(by_method.kv_cache) == len(by_fill.kv_cache)
    assert by_method.cache_passages([_p(t) for t in PASSAGES]).stored == 0  # Passages too; already cached
    got = by_method.generate(QUESTIONS[0], PASSAGES, max_new_tokens=N)
    assert by_method.kv_cache.last.hits >= len(PASSAGES)
    same(got, ref.generate(QUESTIONS[0], PASSAGES, max_new_tokens=N))

    index = VectorIndex.build(encoder, PASSAGES)
    from_index, from_texts = cached(model_tok), cached(model_tok)
    st = from_index.cache_passages(index, show_progress=False)
    assert st.stored > 0 and st.to_dict() == fill(from_texts, index_texts(index)).to_dict()
    assert len(from_index.kv_cache) == len(from_texts.kv_cache)
    with pytest.raises(ValueError, match="no KV cache"):
        ref.cache_passages(PASSAGES)


def test_cache_and_ask_commands(model_tok, encoder, tmp_path, capsys):
    """`nbce-rag cache` fills <index>/kvcache; `nbce-rag ask` reads it and says how much it reused."""
    from nbce_rag import VectorIndex
    from nbce_rag.cli import main
    from nbce_rag.decoding.kvcache import cache_for_index, index_kv_dir

    model, tok = model_tok
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    VectorIndex.build(encoder, PASSAGES).save(tmp_path / "idx")
    assert cache_for_index(tmp_path / "idx") is None
    m, idx = str(tmp_path / "model"), str(tmp_path / "idx")
    assert main(["cache", "--index", idx, "--model", m, "--device", "cpu", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert f"{len(PASSAGES)} chunk(s) cached" in out and "MiB on disk" in out
    assert shards(index_kv_dir(idx)) and cache_for_index(idx).disk.writable is False
    assert main(["cache", "--index", idx, "--model", m, "--device", "cpu"]) == 0
    assert f"0 chunk(s) cached, {len(PASSAGES)} already there" in capsys.readouterr().out
    assert main(["ask", QUESTIONS[0], "--index", idx, "--model", m, "--device", "cpu", "-k", "3",
                 "--no-filter", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "KV cache: 4/4 rows hit" in out


def test_weights_changed_in_place_are_a_new_namespace(tiny_chat_tokenizer):
    tok = tiny_chat_tokenizer
    model = make_tiny_llama(len(tok), seed=5)
    cache = PassageKVCache()
    dec = NBCEDecoder(model, tok, kv_cache=cache)
    dec.generate(QUESTIONS[0], PASSAGES[:2], max_new_tokens=2)
    before = model_namespace(model)[0]
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)  # a fine-tuning step, in place
        model.model.layers[0].self_attn.k_proj.weight.add_(0.01)
    assert model_namespace(model)[0] != before
    got = dec.generate(QUESTIONS[0], PASSAGES[:2], max_new_tokens=N)
    assert got.cached_tokens == 0
    same(got, NBCEDecoder(model, tok, kv_cache=None).generate(QUESTIONS[0], PASSAGES[:2], max_new_tokens=N))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("where", ["cpu", "cuda"])
def test_cuda_cached_equals_uncached(model_tok, where):
    """On a GPU (fp32): entries kept in host memory (default) or on the device."""
    model, tok = model_tok
    gpu = copy.deepcopy(model).to("cuda")
    ref = NBCEDecoder(gpu, tok, kv_cache=None)
    dec = NBCEDecoder(gpu, tok, kv_cache=PassageKVCache(device=where))
    for q in (QUESTIONS[0], QUESTIONS[0], QUESTIONS[1]):
        same(dec.generate(q, PASSAGES, max_new_tokens=N), ref.generate(q, PASSAGES, max_new_tokens=N))
    assert dec.kv_cache.last.hits == len(PASSAGES) + 1
    assert next(iter(dec.kv_cache._ram.entries.values())).kv.device.type == where


def test_step_scheduler_with_the_cache(model_tok, ref):
    """Requests decoded together by the server's step scheduler, over cached and new passages,
    in small prefill chunks: each equals the uncached answer alone."""
    from nbce_rag.decoding.scheduler import SchedulerConfig, StepScheduler

    dec = cached(model_tok)
    dec.generate(QUESTIONS[0], PASSAGES[:3], max_new_tokens=1)  # passages 0-2 cached, 3-4 not
    cases = [(QUESTIONS[1], PASSAGES), (QUESTIONS[2], PASSAGES[1:4]), (QUESTIONS[0], PASSAGES[3:])]
    sched = StepScheduler(dec, SchedulerConfig(step_rows=4, prefill_tokens=40))
    states = [dec.start(q, p, max_new_tokens=N) for q, p in cases]
    assert states[0].row_tokens(1) < len(states[0].prep.rows[1].ids)  # a cached row costs its tail only
    for (state, err), (q, p) in zip(sched.run(states), cases):
        assert err is None
        same(state.answer, ref.generate(q, p, max_new_tokens=N))
    assert states[0].answer.cached_tokens > 0
