"""LlamaIndex adapters through LlamaIndex's public entry points (complete, stream_complete,
retrieve, postprocess_nodes, synthesize, query, aquery, streaming); answers equal to
RAGPipeline's for the same inputs; never a fall-back to OpenAI defaults."""

from __future__ import annotations

import asyncio
from typing import List

import numpy as np
import pytest

pytest.importorskip("llama_index.core")

from llama_index.core import StorageContext, VectorStoreIndex  # noqa: E402
from llama_index.core.base.embeddings.base import BaseEmbedding  # noqa: E402
from llama_index.core.base.response.schema import AsyncStreamingResponse, Response, StreamingResponse  # noqa: E402
from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler  # noqa: E402
from llama_index.core.llms import ChatMessage  # noqa: E402
from llama_index.core.query_engine import RetrieverQueryEngine  # noqa: E402
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode  # noqa: E402

from nbce_rag import MarginThreshold, Passage, RAGPipeline, VectorIndex  # noqa: E402
from nbce_rag.integrations.llama_index import (  # noqa: E402
    NBCELLM,
    CoSENTEmbedding,
    CoSENTRetriever,
    MarginThresholdPostprocessor,
    NBCEQueryEngine,
    NBCESynthesizer,
    node_to_passage,
)

from conftest import DOCS, N, Q, Q_NONE  # noqa: E402
from nbce_rag.pipeline import ABSTAIN_TEXT  # noqa: E402


@pytest.fixture(scope="module")
def index(encoder):
    return VectorIndex.build(encoder, [{"id": f"d{i}", "text": t} for i, t in enumerate(DOCS)])


@pytest.fixture(scope="module")
def rag(tiny_chat_decoder, index, encoder):
    th = MarginThreshold(threshold=0.35, lower=0.25, upper=0.6, margin=0.25, encoder_identity=encoder.identity)
    return RAGPipeline(tiny_chat_decoder, index, th, k=4)


@pytest.fixture(scope="module")
def dec(tiny_chat_decoder):
    return tiny_chat_decoder


def _nodes() -> List[TextNode]:
    return [TextNode(text=t, id_=f"d{i}") for i, t in enumerate(DOCS)]


# ------------------------------------------------------------------------------------ LLM


def test_from_model_id_and_loading_arguments(tmp_path, tiny_chat_tokenizer):
    """The loading arguments of HuggingFaceLLM / HuggingFacePipeline.from_model_id reach the model."""
    import torch
    from conftest import save_tiny_llama

    save_tiny_llama(tmp_path, tiny_chat_tokenizer, seed=1)
    llm = NBCELLM.from_model_id(str(tmp_path), device=-1, dtype="bfloat16", model_kwargs={"attn_implementation": "eager"},
                                generate_kwargs={"max_new_tokens": 2})
    assert llm.nbce_options == {"max_new_tokens": 2} and llm.device == "cpu"
    model = llm.get_pipeline().decoder.model
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"
    assert isinstance(llm.complete("Who built it?", contexts=["The tower was built by Eiffel."]).text, str)
    assert NBCELLM(model_name="some/model").model == "some/model"  # HuggingFaceLLM's name for it


@pytest.mark.parametrize("kwargs, says", [
    ({"torch_dtype": "float16"}, "use dtype="),
    ({"tokenizer_name": "x"}, "holding its tokenizer"),
    ({"stopping_ids": [2]}, "stop="),
    ({"beta": 0.5}, "nbce_options"),
    ({"max_new_token": 5}, "did you mean 'max_new_tokens'"),
    ({"model_kwargs": {"device_map": "auto"}}, "device_map="),
    ({"nbce_options": {"num_beams": 2}}, "no NBCE equivalent"),
])
def test_unknown_llm_arguments_are_errors(kwargs, says):
    with pytest.raises(TypeError) as e:
        NBCELLM(**kwargs)
    assert says in str(e.value)
    with pytest.raises(TypeError, match="num_beams"):
        NBCELLM.from_model_id("m", generate_kwargs={"num_beams": 2})


def test_llm_complete_and_stream_equal_decoder(dec):
    llm = NBCELLM(decoder=dec, max_new_tokens=N)
    ref = dec.generate(Q, DOCS[:2], max_new_tokens=N)
    r = llm.complete(Q, contexts=DOCS[:2])
    assert r.text == ref.text and r.raw.token_ids == ref.token_ids
    info = r.additional_kwargs
    assert info["supported"] and info["usage"]["completion_tokens"] == ref.completion_tokens
    assert [s["index"] for s in info["sources"]] == [0, 1]
    parts = list(llm.stream_complete(Q, contexts=DOCS[:2]))
    assert "".join(p.delta for p in parts) == ref.text
    assert parts[-1].text == ref.text and parts[-1].additional_kwargs["finish_reason"] == ref.finish_reason
    assert all(parts[i].text == "".join(p.delta for p in parts[: i + 1]) for i in range(len(parts)))

    async def run():
        a = await llm.acomplete(Q, contexts=DOCS[:2])
        gen = await llm.astream_complete(Q, contexts=DOCS[:2])
        s = "".join([p.delta async for p in gen])
        return a.text, s

    assert asyncio.run(run()) == (ref.text, ref.text)
    # nodes as contexts: their text, score (the default pooling uses it) and id
    nws = [NodeWithScore(node=n, score=0.5) for n in _nodes()[:2]]
    out = llm.complete(Q, contexts=nws)
    scored_ref = dec.generate(Q, [Passage(t, score=0.5) for t in DOCS[:2]], max_new_tokens=N)
    assert out.text == scored_ref.text and [s["id"] for s in out.additional_kwargs["sources"]] == ["d0", "d1"]
    assert [s["score"] for s in out.additional_kwargs["sources"]] == [0.5, 0.5]


def test_llm_options_chat_and_callbacks(dec):
    handler = LlamaDebugHandler()
    llm = NBCELLM(decoder=dec, max_new_tokens=N, callback_manager=CallbackManager([handler]))
    assert llm.complete(Q, max_new_tokens=3, beta=0.5).text == dec.generate(Q, [], max_new_tokens=3, beta=0.5).text
    hot = NBCELLM(decoder=dec, max_new_tokens=N, temperature=1.2, seed=3)
    assert hot.complete(Q, contexts=DOCS[:1]).text == dec.generate(
        Q, DOCS[:1], max_new_tokens=N, do_sample=True, temperature=1.2, seed=3).text
    sys_llm = NBCELLM(decoder=dec, max_new_tokens=N, system_prompt="Be brief.")
    assert sys_llm.complete(Q).text == dec.generate(Q, [], max_new_tokens=N, system_prompt="Be brief.").text
    chat = llm.chat([ChatMessage(role="user", content="hello"), ChatMessage(role="assistant", content="hi"),
                     ChatMessage(role="user", content=Q)], contexts=DOCS[:1])
    assert chat.message.content == dec.generate(f"User: hello\nAssistant: hi\n\n{Q}", DOCS[:1], max_new_tokens=N).text
    assert handler.get_event_pairs(CBEventType.LLM)  # completion events were emitted
    md = llm.metadata
    assert md.context_window == dec.context_window and md.num_output == N and md.model_name
    with pytest.raises(TypeError, match="unknown decoding option"):
        llm.complete(Q, bogus=1)
    with pytest.raises(TypeError, match="wrap a single"):
        llm.complete(Q, contexts="one string")


def test_llm_retrieve_through_pipeline(rag):
    llm = NBCELLM.from_pipeline(rag, max_new_tokens=N, retrieve=True)
    for q in (Q, Q_NONE):
        ref = rag.ask(q, max_new_tokens=N)
        r = llm.complete(q)
        assert r.text == ref.text and r.additional_kwargs["supported"] is ref.supported
    filt = NBCELLM.from_pipeline(rag, max_new_tokens=N, filter_passages=True)
    assert filt.complete(Q, contexts=DOCS).text == rag.ask(Q, passages=DOCS, max_new_tokens=N).text


# ------------------------------------------------------------------------------------ embedding / retriever / postprocessor


def test_embedding(encoder):
    emb = CoSENTEmbedding(encoder=encoder)
    assert np.allclose(emb.get_query_embedding(Q), encoder.encode([Q])[0], atol=1e-6)
    batch = emb.get_text_embedding_batch(DOCS[:3])
    assert np.allclose(batch, encoder.encode(DOCS[:3]), atol=1e-6)
    assert np.allclose(asyncio.run(emb.aget_query_embedding(Q)), emb.get_query_embedding(Q))
    assert CoSENTEmbedding().model_name == "all-MiniLM-L6-v2"  # lazy: nothing loaded yet


def test_retriever_over_index_equals_pipeline(rag):
    ret = CoSENTRetriever.from_pipeline(rag)
    for q in (Q, Q_NONE):
        kept, dropped = rag.select(q)
        nodes = ret.retrieve(q)
        assert [n.node.node_id for n in nodes] == [p.id for p in kept]
        assert [n.score for n in nodes] == pytest.approx([p.score for p in kept])
        assert [n.node.get_content(metadata_mode="llm") for n in nodes] == [p.text for p in kept]
        assert len(ret.last_dropped) == len(dropped)
        anodes = asyncio.run(ret.aretrieve(q))
        assert [n.node.node_id for n in anodes] == [p.id for p in kept]
    plain = CoSENTRetriever(index=rag.index, similarity_top_k=5)
    assert len(plain.retrieve(Q)) == 5
    with pytest.raises(ValueError, match="exactly one"):
        CoSENTRetriever()


class _ShiftedEmbedding(BaseEmbedding):
    """A store-side embedding that is not the canonical one (shifted vectors)."""

    def __init__(self, enc, **kw):
        super().__init__(model_name="shifted", **kw)
        self._enc = enc

    def _v(self, texts):
        return (self._enc.encode(texts) + 0.2).tolist()

    def _get_query_embedding(self, query):
        return self._v([query])[0]

    async def _aget_query_embedding(self, query):
        return self._get_query_embedding(query)

    def _get_text_embedding(self, text):
        return self._v([text])[0]


def test_retriever_over_vector_store_index_rescored(rag, encoder):
    ref = CoSENTRetriever.from_pipeline(rag)
    canon = VectorStoreIndex(_nodes(), embed_model=CoSENTEmbedding(encoder=encoder))
    skew = VectorStoreIndex(_nodes(), embed_model=_ShiftedEmbedding(encoder))
    for store, kw in ((canon, {}), (skew, {"encoder": encoder, "fetch_k": 6})):
        ret = CoSENTRetriever(vector_store=store, threshold=rag.threshold, similarity_top_k=rag.k,
                              **({"encoder": encoder} if not kw else kw))
        for q in (Q, Q_NONE):
            want = ref.retrieve(q)
            got = ret.retrieve(q)
            assert [n.node.get_content() for n in got] == [n.node.get_content() for n in want]
            assert [n.score for n in got] == pytest.approx([n.score for n in want], abs=1e-5)
            agot = asyncio.run(ret.aretrieve(q))
            assert [n.score for n in agot] == pytest.approx([n.score for n in got])
    # a plain retriever as the candidate source works too
    via_retriever = CoSENTRetriever(vector_store=skew.as_retriever(similarity_top_k=6), encoder=encoder,
                                    threshold=rag.threshold, similarity_top_k=rag.k)
    assert [n.score for n in via_retriever.retrieve(Q)] == pytest.approx([n.score for n in ref.retrieve(Q)], abs=1e-5)
    # a raw store that keeps ids only must be wrapped in its index
    raw = CoSENTRetriever(vector_store=canon.vector_store, encoder=encoder)
    with pytest.raises(ValueError, match="ids only"):
        raw.retrieve(Q)
    with pytest.raises(ValueError, match="encoder="):
        CoSENTRetriever(vector_store=skew).retrieve(Q)


def test_postprocessor(rag, encoder):
    pp = MarginThresholdPostprocessor.from_pipeline(rag)
    nodes = [NodeWithScore(node=n, score=0.99) for n in _nodes()]  # a store's (wrong) scores
    kept = pp.postprocess_nodes(nodes, query_str=Q)
    ref, _ = rag.select(Q, passages=DOCS)
    assert [n.node.get_content() for n in kept] == [p.text for p in ref]
    assert [n.score for n in kept] == pytest.approx([p.score for p in ref], abs=1e-6)
    assert pp.postprocess_nodes(nodes, query_str=Q_NONE) == []
    assert [n.node.node_id for n in asyncio.run(pp.apostprocess_nodes(nodes, query_str=Q))] == [n.node.node_id for n in kept]
    raw = MarginThresholdPostprocessor(threshold=rag.threshold)  # no encoder: scores used as given
    assert len(raw.postprocess_nodes(nodes, query_str=Q)) == len(nodes)


# ------------------------------------------------------------------------------------ synthesizer / query engines


def test_synthesizer_nodes_as_separate_passages(dec):
    llm = NBCELLM(decoder=dec, max_new_tokens=N)
    synth = NBCESynthesizer(llm=llm)
    nodes = [NodeWithScore(node=n, score=0.5 + i / 10) for i, n in enumerate(_nodes()[:3])]
    ref = dec.generate(Q, [node_to_passage(n) for n in nodes], max_new_tokens=N)
    r = synth.synthesize(Q, nodes)
    assert isinstance(r, Response) and r.response == ref.text
    assert r.source_nodes == nodes and [s["id"] for s in r.metadata["nbce"]["sources"]] == ["d0", "d1", "d2"]
    assert [s["score"] for s in r.metadata["nbce"]["sources"]] == pytest.approx([0.5, 0.6, 0.7])
    # the text-only entry point (abstract in BaseSynthesizer) carries no scores: it gives the
    # decoder's answer for the bare texts
    texts = [n.node.get_content() for n in nodes]
    assert synth.get_response(Q, texts) == dec.generate(Q, texts, max_new_tokens=N).text
    # no nodes: abstain by default (no decoding), closed-book when asked; flagged unsupported
    # either way (never "Empty Response")
    empty = synth.synthesize(Q, [])
    assert empty.response == ABSTAIN_TEXT and empty.metadata["nbce"]["answered_from"] == "abstained"
    assert empty.metadata["nbce"]["supported"] is False
    cb = synth.synthesize(Q, [], on_unsupported="closed_book")
    assert cb.response == dec.generate(Q, [], max_new_tokens=N).text and cb.metadata["nbce"]["supported"] is False
    assert "".join(NBCESynthesizer(llm=llm, streaming=True).synthesize(Q, []).response_gen) == ABSTAIN_TEXT
    streaming = NBCESynthesizer(llm=llm, streaming=True)
    s = streaming.synthesize(Q, nodes)
    assert isinstance(s, StreamingResponse)
    assert "".join(s.response_gen) == ref.text and s.metadata["nbce"]["supported"] is True

    async def run():
        a = await synth.asynthesize(Q, nodes)
        st = await streaming.asynthesize(Q, nodes)
        assert isinstance(st, AsyncStreamingResponse)
        text = "".join([t async for t in st.async_response_gen()])
        return a.response, text, await streaming.aget_response(Q, [n.node.get_content() for n in nodes])

    a, text, gen = asyncio.run(run())
    assert a == ref.text and text == ref.text


def test_retriever_query_engine_equals_pipeline(rag):
    llm = NBCELLM.from_pipeline(rag, max_new_tokens=N)
    engine = RetrieverQueryEngine(retriever=CoSENTRetriever.from_pipeline(rag), response_synthesizer=NBCESynthesizer(llm=llm))
    streaming = RetrieverQueryEngine(retriever=CoSENTRetriever.from_pipeline(rag),
                                     response_synthesizer=NBCESynthesizer(llm=llm, streaming=True))
    for q in (Q, Q_NONE):
        ref = rag.ask(q, max_new_tokens=N)
        r = engine.query(q)
        assert r.response == ref.text and r.metadata["nbce"]["supported"] is ref.supported
        assert [n.node.node_id for n in r.source_nodes] == [s.id for s in ref.sources]
        assert asyncio.run(engine.aquery(q)).response == ref.text
        assert "".join(streaming.query(q).response_gen) == ref.text


def test_nbce_query_engine_equals_pipeline(rag):
    engine = rag.as_query_engine(max_new_tokens=N)
    assert isinstance(engine, NBCEQueryEngine)
    s_engine = NBCEQueryEngine.from_pipeline(rag, streaming=True, max_new_tokens=N)
    for q in (Q, Q_NONE):
        ref = rag.ask(q, max_new_tokens=N)
        r = engine.query(q)
        assert r.response == ref.text
        nb = r.metadata["nbce"]
        assert nb["supported"] is ref.supported
        assert [s["id"] for s in nb["sources"]] == [s.id for s in ref.sources]
        assert [s["share"] for s in nb["sources"]] == pytest.approx([s.share for s in ref.sources])
        assert asyncio.run(engine.aquery(q)).response == ref.text
        sr = s_engine.query(q)
        assert "".join(sr.response_gen) == ref.text and sr.metadata["nbce"]["supported"] is ref.supported

        async def astream():
            resp = await s_engine.aquery(q)
            return "".join([t async for t in resp.async_response_gen()])

        assert asyncio.run(astream()) == ref.text
    none = engine.query(Q_NONE)
    assert none.metadata["nbce"]["supported"] is False and none.metadata["nbce"]["answered_from"] == "abstained"


def test_query_engine_reports_the_filter_decisions(rag):
    """The query engine's metadata says which calibration ran and what it dropped (it said
    ``calibration: None, dropped: []`` after the retriever had dropped candidates)."""
    engine = rag.as_query_engine(max_new_tokens=N)
    s_engine = rag.as_query_engine(streaming=True, max_new_tokens=N)
    for q in (Q, Q_NONE):
        ref = rag.ask(q, max_new_tokens=N)
        nb = engine.query(q).metadata["nbce"]
        assert ref.dropped and len(nb["dropped"]) == len(ref.dropped)
        assert [d["code"] for d in nb["dropped"]] == [d.code for d in ref.dropped]
        assert nb["calibration"] == rag.calibration and nb["supported"] is ref.supported
        assert nb["support_score"] == pytest.approx(ref.support_score) and nb["support_threshold"] == 0.35
        sr = s_engine.query(q)
        assert "".join(sr.response_gen) == ref.text
        assert sr.metadata["nbce"]["calibration"] == rag.calibration and len(sr.metadata["nbce"]["dropped"]) == len(ref.dropped)

        async def astream():
            resp = await s_engine.aquery(q)
            text = "".join([t async for t in resp.async_response_gen()])
            return text, resp.metadata["nbce"]

        text, anb = asyncio.run(astream())
        assert text == ref.text and anb["calibration"] == rag.calibration
    cb = rag.as_query_engine(max_new_tokens=N, on_unsupported="closed_book").query(Q_NONE)
    assert cb.response == rag.ask(Q_NONE, max_new_tokens=N, on_unsupported="closed_book").text
    assert cb.metadata["nbce"]["supported"] is False and cb.metadata["nbce"]["calibration"] == rag.calibration


def test_query_engine_with_postprocessor(rag):
    # unfiltered retriever + margin postprocessor == the pipeline's filter
    engine = NBCEQueryEngine(retriever=CoSENTRetriever(index=rag.index, similarity_top_k=rag.k),
                             llm=NBCELLM.from_pipeline(rag), node_postprocessors=[MarginThresholdPostprocessor.from_pipeline(rag)],
                             decode_kwargs={"max_new_tokens": N})
    for q in (Q, Q_NONE):
        assert engine.query(q).response == rag.ask(q, max_new_tokens=N).text


def test_never_falls_back_to_openai(monkeypatch, rag):
    import llama_index.core.settings as settings_mod

    def boom(*a, **k):
        raise AssertionError("Settings default model resolved (would be OpenAI)")

    monkeypatch.setattr(settings_mod, "resolve_llm", boom)
    monkeypatch.setattr(settings_mod, "resolve_embed_model", boom)
    monkeypatch.setattr(settings_mod.Settings, "_llm", None)
    monkeypatch.setattr(settings_mod.Settings, "_embed_model", None)
    synth = NBCESynthesizer()  # no llm given: the bundled NBCE model (loaded lazily), not Settings.llm
    assert isinstance(synth.llm, NBCELLM)
    engine = NBCEQueryEngine(retriever=CoSENTRetriever(index=rag.index))
    assert isinstance(engine.llm, NBCELLM)
    assert rag.as_query_engine(max_new_tokens=N).query(Q).response == rag.ask(Q, max_new_tokens=N).text
    with pytest.raises(TypeError, match="NBCELLM"):
        NBCESynthesizer(llm=object())
    with pytest.raises(AssertionError, match="Settings default"):  # the guard is live
        settings_mod.Settings.llm


# ------------------------------------------------------------------------------------ FAISS


def test_faiss_vector_store_end_to_end(rag, encoder):
    faiss = pytest.importorskip("faiss")
    faiss_store = pytest.importorskip("llama_index.vector_stores.faiss")
    ref_ret = CoSENTRetriever.from_pipeline(rag)
    for make in (faiss.IndexFlatIP, faiss.IndexFlatL2):  # inner products and L2 distances alike are re-scored
        vs = faiss_store.FaissVectorStore(faiss_index=make(encoder.dim))
        vindex = VectorStoreIndex(_nodes(), storage_context=StorageContext.from_defaults(vector_store=vs),
                                  embed_model=CoSENTEmbedding(encoder=encoder))
        ret = CoSENTRetriever(vector_store=vindex, encoder=encoder, threshold=rag.threshold, similarity_top_k=rag.k)
        for q in (Q, Q_NONE):
            want = ref_ret.retrieve(q)
            got = ret.retrieve(q)
            assert [n.node.get_content() for n in got] == [n.node.get_content() for n in want]
            assert [n.score for n in got] == pytest.approx([n.score for n in want], abs=1e-5)
        engine = NBCEQueryEngine(retriever=ret, llm=NBCELLM.from_pipeline(rag), decode_kwargs={"max_new_tokens": N})
        assert engine.query(Q).response == rag.ask(Q, max_new_tokens=N).text
        assert asyncio.run(engine.aquery(Q)).response == rag.ask(Q, max_new_tokens=N).text


# ------------------------------------------------------------------------------------ bundled models


@pytest.mark.slow
def test_bundled_query_engine_equals_pipeline(bundled_decoder, index, encoder):
    th = MarginThreshold(threshold=0.35, lower=0.25, upper=0.6, margin=0.25, encoder_identity=encoder.identity)
    rag = RAGPipeline(bundled_decoder, index, th, k=4)
    engine = rag.as_query_engine(streaming=True, max_new_tokens=24)
    ref = rag.ask(Q, max_new_tokens=24)
    resp = engine.query(Q)
    assert "".join(resp.response_gen) == ref.text
    assert "eiffel" in ref.text.lower() and resp.metadata["nbce"]["supported"]
    assert QueryBundle(Q).query_str == Q
