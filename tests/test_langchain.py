"""LangChain adapters: every class through LangChain's public entry points (invoke, stream,
ainvoke, astream, batch, chains), answers equal to RAGPipeline's for the same inputs, and the
langchain-tests standard suites that apply."""

from __future__ import annotations

import asyncio
import functools
import inspect
from typing import List

import numpy as np
import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("langchain_tests")

from langchain_core.callbacks import BaseCallbackHandler  # noqa: E402
from langchain_core.documents import Document  # noqa: E402
from langchain_core.embeddings import Embeddings  # noqa: E402
from langchain_core.globals import set_llm_cache  # noqa: E402
from langchain_core.caches import InMemoryCache  # noqa: E402
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage  # noqa: E402
from langchain_core.messages.content import create_plaintext_block, create_text_block  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder  # noqa: E402
from langchain_core.vectorstores import InMemoryVectorStore  # noqa: E402
from langchain_tests.integration_tests import (  # noqa: E402
    ChatModelIntegrationTests,
    EmbeddingsIntegrationTests,
    RetrieversIntegrationTests,
)
from langchain_tests.unit_tests import ChatModelUnitTests, EmbeddingsUnitTests  # noqa: E402

from nbce_rag import MarginThreshold, NBCEDecoder, RAGPipeline, VectorIndex  # noqa: E402
from nbce_rag.integrations.langchain import (  # noqa: E402
    NBCELLM,
    ChatNBCE,
    CoSENTEmbeddings,
    CoSENTRetriever,
    MarginThresholdFilter,
    create_nbce_documents_chain,
    create_nbce_rag_chain,
    document_to_passage,
    documents_to_message,
)

from nbce_rag.pipeline import ABSTAIN_TEXT  # noqa: E402
from conftest import DOCS, N, Q, Q_NONE  # noqa: E402


def _mark_async_tests(cls):
    """pytest-asyncio runs in strict mode unless the project sets asyncio_mode=auto; mark the
    standard suites' coroutine tests explicitly (the functions are not overridden)."""
    for name in dir(cls):
        fn = getattr(cls, name)
        if name.startswith("test_") and inspect.iscoroutinefunction(fn):
            pytest.mark.asyncio(fn)
    return cls


# ------------------------------------------------------------------------------------ fixtures


@functools.lru_cache(maxsize=None)
def _tiny_chat_decoder() -> NBCEDecoder:
    """For the standard suites (their model fixtures are built from class properties)."""
    from conftest import make_tiny_llama, make_tokenizer

    tok = make_tokenizer(chat=True)
    return NBCEDecoder(make_tiny_llama(len(tok), seed=1), tok)


@functools.lru_cache(maxsize=None)
def _encoder():
    from nbce_rag import CoSENTEncoder

    return CoSENTEncoder.from_pretrained()


@functools.lru_cache(maxsize=None)
def _index() -> VectorIndex:
    return VectorIndex.build(_encoder(), [{"id": f"d{i}", "text": t} for i, t in enumerate(DOCS)])


def _threshold() -> MarginThreshold:
    # hand-set (a real one comes from `nbce-rag calibrate`); identity-checked against the encoder
    return MarginThreshold(threshold=0.35, lower=0.25, upper=0.6, margin=0.25, encoder_identity=_encoder().identity)


@pytest.fixture(scope="module")
def dec(tiny_chat_decoder):
    # These tests check the plumbing: the same passages reach the decoder whatever form they
    # take (Documents with scores, bare strings, hand-made blocks). Pin the score-free reference
    # pooling so that a form without scores must give the same answer; the score-aware default
    # is covered by the pipeline-equality tests.
    return NBCEDecoder(tiny_chat_decoder.model, tiny_chat_decoder.tokenizer,
                       tiny_chat_decoder.config.update(pooling="min_entropy"))


@pytest.fixture(scope="module")
def encoder():
    return _encoder()


@pytest.fixture(scope="module")
def index():
    return _index()


@pytest.fixture(scope="module")
def rag(dec, index):
    return RAGPipeline(dec, index, _threshold(), k=4)


@pytest.fixture(scope="module")
def rag_nofilter(dec, index):
    return RAGPipeline(dec, index, None, k=3)


@pytest.fixture()
def docs(index) -> List[Document]:
    return [Document(page_content=h.text, id=h.id, metadata={"score": h.score}) for h in index.search(Q, 3)]


class TokenCounter(BaseCallbackHandler):
    def __init__(self):
        self.tokens: List[str] = []
        self.events: List[str] = []

    def on_llm_new_token(self, token, **kw):
        self.tokens.append(token)

    def on_retriever_start(self, *a, **kw):
        self.events.append("retriever_start")

    def on_chat_model_start(self, *a, **kw):
        self.events.append("chat_model_start")

    def on_llm_start(self, *a, **kw):
        self.events.append("llm_start")


# ------------------------------------------------------------------------------------ ChatNBCE


def test_chat_invoke_blocks_equal_decoder(dec, docs):
    chat = ChatNBCE(decoder=dec, max_tokens=N)
    msg = documents_to_message(Q, docs)
    assert [b["type"] for b in msg.content_blocks] == ["text-plain"] * 3 + ["text"]
    out = chat.invoke([msg])
    ref = dec.generate(Q, [document_to_passage(d) for d in docs], max_new_tokens=N)
    assert isinstance(out, AIMessage)
    assert out.content == ref.text
    usage = dict(out.usage_metadata)
    assert usage.pop("input_token_details")["cache_read"] <= ref.cached_tokens  # the first call may have filled the cache
    assert usage == {"input_tokens": ref.prompt_tokens, "output_tokens": ref.completion_tokens,
                     "total_tokens": ref.prompt_tokens + ref.completion_tokens}
    again = chat.invoke([msg]).usage_metadata  # warm, like ref: the passages' tokens read from the cache
    assert again["input_token_details"] == {"cache_read": ref.cached_tokens} and ref.cached_tokens > 0
    meta = out.response_metadata
    assert meta["finish_reason"] == ref.finish_reason and meta["model_name"]
    srcs = meta["nbce"]["sources"]
    assert [s["id"] for s in srcs] == [d.id for d in docs]
    assert [s["score"] for s in srcs] == pytest.approx([d.metadata["score"] for d in docs])
    assert sum(s["n_tokens"] for s in srcs) + meta["nbce"]["token_sources"].count(-1) == len(ref.token_ids)
    assert meta["nbce"]["supported"] is True


def test_chat_documents_kwarg_and_plain_blocks(dec, docs):
    chat = ChatNBCE(decoder=dec, max_tokens=N)
    ref = chat.invoke([documents_to_message(Q, docs)]).content
    assert chat.invoke(Q, documents=docs).content == ref
    assert chat.invoke(Q, documents=[d.page_content for d in docs]).content == ref  # scores unused by min_entropy
    # hand-made standard blocks, the question block first
    blocks = [create_text_block(Q)] + [create_plaintext_block(text=d.page_content) for d in docs]
    assert chat.invoke([HumanMessage(content=blocks)]).content == ref
    # passages through a ChatPromptTemplate survive as blocks
    prompt = ChatPromptTemplate.from_messages([MessagesPlaceholder("msgs")])
    assert (prompt | chat).invoke({"msgs": [documents_to_message(Q, docs)]}).content == ref


def test_chat_stream_equals_invoke_and_callbacks(dec, docs):
    chat = ChatNBCE(decoder=dec, max_tokens=N)
    msg = [documents_to_message(Q, docs)]
    full = chat.invoke(msg)
    cb = TokenCounter()
    chunks = list(chat.stream(msg, config={"callbacks": [cb]}))
    assert "".join(c.content for c in chunks) == full.content
    assert chunks[-1].chunk_position == "last"
    assert chunks[-1].usage_metadata == full.usage_metadata
    assert sum(1 for c in chunks if c.usage_metadata) == 1
    assert len(cb.tokens) == len(chunks)  # fired once per chunk, by LangChain, not twice
    agg = chunks[0]
    for c in chunks[1:]:
        agg = agg + c
    assert agg.response_metadata["nbce"]["sources"] == full.response_metadata["nbce"]["sources"]


def test_chat_async(dec, docs):
    chat = ChatNBCE(decoder=dec, max_tokens=N)
    msg = [documents_to_message(Q, docs)]
    ref = chat.invoke(msg).content

    async def run():
        a = await chat.ainvoke(msg)
        s = ""
        async for c in chat.astream(msg):
            s += c.content
        b = await chat.abatch([msg, msg])
        return a.content, s, [x.content for x in b]

    a, s, b = asyncio.run(run())
    assert a == ref and s == ref and b == [ref, ref]


def test_chat_options_map_to_decoder(dec, docs):
    ps = [document_to_passage(d) for d in docs]
    chat = ChatNBCE(decoder=dec, max_tokens=N)
    msg = [documents_to_message(Q, docs)]
    # per-call max_tokens, NBCEConfig fields (beta, pooling)
    out = chat.invoke(msg, max_tokens=3, beta=0.5, pooling="mean")
    assert out.content == dec.generate(Q, ps, max_new_tokens=3, beta=0.5, pooling="mean").text
    assert out.usage_metadata["output_tokens"] <= 3
    # temperature > 0 samples (reproducible with a seed), temperature 0 is greedy
    hot = ChatNBCE(decoder=dec, max_tokens=N, temperature=1.5, seed=7, top_p=0.9)
    ref = dec.generate(Q, ps, max_new_tokens=N, do_sample=True, temperature=1.5, seed=7, top_p=0.9).text
    assert hot.invoke(msg).content == ref
    assert hot.invoke(msg, temperature=0).content == dec.generate(Q, ps, max_new_tokens=N, top_p=0.9).text
    # stop strings, constructor or per call
    greedy = dec.generate(Q, ps, max_new_tokens=N).text
    stop = greedy[2:4]
    cut = chat.invoke(msg, stop=[stop])
    assert cut.content == dec.generate(Q, ps, max_new_tokens=N, stop=[stop]).text
    assert stop not in cut.content and cut.response_metadata["finish_reason"] == "stop"
    assert ChatNBCE(decoder=dec, max_tokens=N, stop=[stop]).invoke(msg).content == cut.content
    with pytest.raises(TypeError, match="unknown decoding option"):
        chat.invoke(msg, bogus_option=1)


def test_chat_system_and_conversation(dec):
    chat = ChatNBCE(decoder=dec, max_tokens=N)
    out = chat.invoke([SystemMessage("Answer in one word."), HumanMessage(Q)])
    assert out.content == dec.generate(Q, [], max_new_tokens=N, system_prompt="Answer in one word.").text
    conv = chat.invoke([HumanMessage("hello"), AIMessage("hi there"), HumanMessage(Q)])
    assert conv.content == dec.generate(f"User: hello\nAssistant: hi there\n\n{Q}", [], max_new_tokens=N).text
    assert conv.response_metadata["nbce"]["supported"] is False  # no passages: closed-book


def test_chat_rejects_bad_input(dec):
    chat = ChatNBCE(decoder=dec, max_tokens=N)
    with pytest.raises(ValueError, match="text and text-plain"):
        chat.invoke([HumanMessage(content=[{"type": "image", "url": "http://x/y.png"}, {"type": "text", "text": Q}])])
    with pytest.raises(ValueError, match="needs a question"):
        chat.invoke([HumanMessage(content=[create_plaintext_block(text="a passage")])])
    with pytest.raises(TypeError, match="wrap a single"):
        chat.invoke(Q, documents="just one string")


def test_chat_cache_sees_passages(dec, docs):
    chat = ChatNBCE(decoder=dec, max_tokens=N)
    set_llm_cache(InMemoryCache())
    try:
        a = chat.invoke([documents_to_message(Q, docs[:1])]).content
        b = chat.invoke([documents_to_message(Q, docs[1:])]).content
        assert a == dec.generate(Q, [docs[0].page_content], max_new_tokens=N).text
        assert b == dec.generate(Q, [d.page_content for d in docs[1:]], max_new_tokens=N).text
    finally:
        set_llm_cache(None)


def test_chat_over_pipeline_retrieve_and_filter(rag):
    chat = rag.as_langchain_chat_model(max_tokens=N, retrieve=True)
    assert isinstance(chat, ChatNBCE)
    for q in (Q, Q_NONE):
        ref = rag.ask(q, max_new_tokens=N)
        out = chat.invoke(q)
        assert out.content == ref.text
        assert out.response_metadata["nbce"]["supported"] is ref.supported
    assert rag.ask(Q_NONE, max_new_tokens=N).supported is False
    # filter_passages: given (unfiltered) passages go through the pipeline's rescoring + filter
    cands = [Document(page_content=t) for t in DOCS]
    filt = ChatNBCE.from_pipeline(rag, max_tokens=N, filter_passages=True)
    ref = rag.ask(Q, passages=DOCS, max_new_tokens=N)
    out = filt.invoke([documents_to_message(Q, cands)])
    assert out.content == ref.text
    assert len(out.response_metadata["nbce"]["dropped"]) == len(ref.dropped) > 0
    # default: passages are decoded as given
    plain = ChatNBCE.from_pipeline(rag, max_tokens=N).invoke([documents_to_message(Q, cands)])
    assert plain.content == rag.decoder.generate(Q, DOCS, max_new_tokens=N).text


def test_chat_lazy_model_name_and_ls_params(dec):
    chat = ChatNBCE(decoder=dec, max_tokens=5, temperature=0.0, stop=["x"])
    p = chat._get_ls_params()
    assert p["ls_provider"] == "nbce" and p["ls_max_tokens"] == 5 and p["ls_stop"] == ["x"]
    assert ChatNBCE(model="some/model")._get_ls_params()["ls_model_name"] == "some/model"  # nothing loaded
    assert ChatNBCE(decoder=dec, max_new_tokens=4).max_tokens == 4  # alias


# ------------------------------------------------------------------------------------ constructors


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_chat_tokenizer):
    from conftest import save_tiny_llama

    d = tmp_path_factory.mktemp("lc_model")
    return save_tiny_llama(d, tiny_chat_tokenizer, seed=1)


def test_from_model_id_like_langchain_huggingface(model_dir):
    """from_model_id(model_id, task, device=, device_map=, model_kwargs=, pipeline_kwargs=) as
    HuggingFacePipeline takes them; dtype and model_kwargs reach the loaded model."""
    import torch

    chat = ChatNBCE.from_model_id(str(model_dir), task="text-generation", device=-1, dtype="bfloat16",
                                  model_kwargs={"attn_implementation": "eager"}, pipeline_kwargs={"max_new_tokens": 3})
    assert chat.nbce_options == {"max_new_tokens": 3} and chat.device == "cpu"
    dec = chat._get_pipeline().decoder
    assert dec.model.dtype == torch.bfloat16 and dec.model.config._attn_implementation == "eager"
    assert dec.device.type == "cpu"
    assert 1 <= chat.invoke("Who built the tower?").usage_metadata["output_tokens"] <= 3
    llm = NBCELLM.from_model_id(str(model_dir), device="cpu", model_kwargs={"attn_implementation": "sdpa"},
                                max_tokens=2)
    assert llm._get_pipeline().decoder.model.config._attn_implementation == "sdpa"
    assert isinstance(llm.invoke("Who?"), str)
    assert ChatNBCE.from_model_id(None, device=1).device == "cuda:1"  # nothing loads until used


@pytest.mark.parametrize("cls", [ChatNBCE, NBCELLM])
@pytest.mark.parametrize("kwargs, says", [
    ({"torch_dtype": "float16"}, "use dtype="),
    ({"beta": 0.5}, "nbce_options={'beta'"),
    ({"temprature": 0.5}, "did you mean 'temperature'"),
    ({"max_length": 10}, "max_tokens="),
    ({"generate_kwargs": {"top_k": 3}}, "nbce_options="),
    ({"model_kwargs": {"torch_dtype": "float16"}}, "dtype="),
    ({"nbce_options": {"num_beams": 4}}, "no NBCE equivalent"),
])
def test_unknown_constructor_arguments_are_errors(cls, kwargs, says):
    with pytest.raises(TypeError, match=says.replace("(", r"\(").replace("{", r"\{").replace("[", r"\[")):
        cls(**kwargs)


def test_from_model_id_rejects_what_nbce_cannot_do():
    with pytest.raises(TypeError, match="num_beams"):
        ChatNBCE.from_model_id("m", pipeline_kwargs={"num_beams": 4})
    with pytest.raises(ValueError, match="text-generation"):
        ChatNBCE.from_model_id("m", task="summarization")
    with pytest.raises(TypeError, match="device"):
        ChatNBCE.from_model_id("m", device=1.5)


def test_tools_and_structured_output_say_why(dec):
    chat = ChatNBCE(decoder=dec)
    for call in (lambda: chat.bind_tools([]), lambda: chat.with_structured_output(dict),
                 lambda: NBCELLM(decoder=dec).with_structured_output(dict)):
        with pytest.raises(NotImplementedError, match="no tool calling or structured output") as e:
            call()
        assert "use a tool-calling model" in str(e.value)


# ------------------------------------------------------------------------------------ NBCELLM


def test_llm_invoke_stream_equal_decoder(dec, docs):
    llm = NBCELLM(decoder=dec, max_tokens=N)
    ref = dec.generate(Q, [document_to_passage(d) for d in docs], max_new_tokens=N)
    assert llm.invoke(Q, contexts=docs) == ref.text
    assert llm.invoke(Q, contexts=[d.page_content for d in docs]) == ref.text
    assert llm.bind(contexts=docs).invoke(Q) == ref.text
    cb = TokenCounter()
    pieces = list(llm.stream(Q, contexts=docs, config={"callbacks": [cb]}))
    assert "".join(pieces) == ref.text
    assert "".join(cb.tokens) == ref.text and len(cb.tokens) == len([p for p in pieces if p])
    res = llm.generate([Q], contexts=docs)
    info = res.generations[0][0].generation_info
    assert res.generations[0][0].text == ref.text
    assert info["usage"]["output_tokens"] == ref.completion_tokens
    assert [s["id"] for s in info["nbce"]["sources"]] == [d.id for d in docs]

    async def run():
        a = await llm.ainvoke(Q, contexts=docs)
        s = "".join([p async for p in llm.astream(Q, contexts=docs)])
        return a, s

    assert asyncio.run(run()) == (ref.text, ref.text)


def test_llm_cache_off_by_default(dec, docs):
    """LangChain's LLM cache key ignores keywords: with a global cache and cache=True the
    second call would return the first call's answer (other passages)."""
    set_llm_cache(InMemoryCache())
    try:
        llm = NBCELLM(decoder=dec, max_tokens=N)
        assert llm.cache is False
        a = llm.invoke(Q, contexts=docs[:1])
        b = llm.invoke(Q, contexts=docs[1:])
        assert b == dec.generate(Q, [d.page_content for d in docs[1:]], max_new_tokens=N).text
        assert a == dec.generate(Q, [docs[0].page_content], max_new_tokens=N).text
        stale = NBCELLM(decoder=dec, max_tokens=N, cache=True)
        stale.invoke(Q, contexts=docs[:1])
        assert stale.invoke(Q, contexts=docs[1:]) == a  # the documented gotcha
    finally:
        set_llm_cache(None)


def test_llm_retrieve_through_pipeline(rag):
    llm = NBCELLM.from_pipeline(rag, max_tokens=N, retrieve=True)
    assert llm.invoke(Q) == rag.ask(Q, max_new_tokens=N).text
    with pytest.raises(TypeError, match="not both"):
        llm.invoke(Q, contexts=["a"], documents=["b"])


# ------------------------------------------------------------------------------------ embeddings / retriever / filter


def test_embeddings(encoder):
    emb = CoSENTEmbeddings(encoder=encoder)
    v = emb.embed_query(Q)
    assert np.allclose(v, encoder.encode([Q])[0], atol=1e-6)
    vs = emb.embed_documents(DOCS[:2])
    assert len(vs) == 2 and abs(np.linalg.norm(vs[0]) - 1) < 1e-5
    assert emb.embed_documents([]) == []
    assert asyncio.run(emb.aembed_query(Q)) == v


def test_retriever_equals_pipeline_select(rag):
    ret = rag.as_langchain_retriever()
    assert isinstance(ret, CoSENTRetriever) and ret.k == rag.k
    for q in (Q, Q_NONE):
        kept, dropped = rag.select(q)
        docs = ret.invoke(q)
        assert [d.id for d in docs] == [p.id for p in kept]
        assert [d.metadata["score"] for d in docs] == pytest.approx([p.score for p in kept])
        assert [d.page_content for d in docs] == [p.text for p in kept]
        assert ret.select(q)[1] and len(ret.select(q)[1]) == len(dropped)
    assert ret.invoke(Q_NONE) == []
    # k per call, without a filter
    plain = CoSENTRetriever(index=rag.index, k=5)
    assert len(plain.invoke(Q)) == 5 and len(plain.invoke(Q, k=2)) == 2
    assert asyncio.run(plain.ainvoke(Q, k=2)) == plain.invoke(Q, k=2)
    with pytest.raises(ValueError, match="exactly one"):
        CoSENTRetriever()


class _ScaledEmbeddings(Embeddings):
    """A store-side embedding that is not the canonical one (shifted vectors), so the store's
    own scores differ from the cosine; used to show the re-scoring."""

    def __init__(self, enc):
        self.enc = enc

    def embed_documents(self, texts):
        return (self.enc.encode(texts) + 0.2).tolist()

    def embed_query(self, text):
        return self.embed_documents([text])[0]


def test_retriever_over_vectorstore_rescored(rag, encoder):
    canonical = CoSENTRetriever(index=rag.index, threshold=rag.threshold, k=4)
    store = InMemoryVectorStore(embedding=CoSENTEmbeddings(encoder=encoder))
    store.add_texts(DOCS, ids=[f"d{i}" for i in range(len(DOCS))])
    via_store = CoSENTRetriever(vectorstore=store, threshold=rag.threshold, k=4)  # encoder from the store
    skewed = InMemoryVectorStore(embedding=_ScaledEmbeddings(encoder))
    skewed.add_texts(DOCS, ids=[f"d{i}" for i in range(len(DOCS))])
    via_skewed = CoSENTRetriever(vectorstore=skewed, encoder=encoder, threshold=rag.threshold, k=4, fetch_k=6)
    for q in (Q, Q_NONE):
        ref = canonical.invoke(q)
        for r in (via_store, via_skewed):
            got = r.invoke(q)
            assert [d.page_content for d in got] == [d.page_content for d in ref]
            assert [d.metadata["score"] for d in got] == pytest.approx([d.metadata["score"] for d in ref], abs=1e-5)
    got = via_skewed.invoke(Q)
    assert all(abs(d.metadata["store_score"] - d.metadata["score"]) > 0.05 for d in got)  # store scores differ
    with pytest.raises(ValueError, match="encoder="):
        CoSENTRetriever(vectorstore=skewed).invoke(Q)


def test_filter_compressor(rag, encoder):
    filt = MarginThresholdFilter.from_pipeline(rag)
    # candidates carrying a store's (wrong) scores: re-scored before the threshold
    cands = [Document(page_content=t, id=f"d{i}", metadata={"score": 0.99, "src": "x"}) for i, t in enumerate(DOCS)]
    kept = filt.compress_documents(cands, Q)
    ref, _ = rag.select(Q, passages=DOCS)
    assert [d.page_content for d in kept] == [p.text for p in ref]
    assert [d.metadata["score"] for d in kept] == pytest.approx([p.score for p in ref], abs=1e-6)
    assert all(d.metadata["src"] == "x" for d in kept)
    assert filt.compress_documents(cands, Q_NONE) == []
    # without an encoder the given scores are used as they are
    raw = MarginThresholdFilter(threshold=rag.threshold)
    assert len(raw.compress_documents(cands, Q)) == len(cands)
    assert asyncio.run(filt.acompress_documents(cands, Q)) == kept
    # classic ContextualCompressionRetriever
    classic = pytest.importorskip("langchain_classic.retrievers")
    ccr = classic.ContextualCompressionRetriever(base_compressor=filt, base_retriever=CoSENTRetriever(index=rag.index, k=6))
    assert [d.page_content for d in ccr.invoke(Q)] == [p.text for p in rag.select(Q, k=6)[0]]


# ------------------------------------------------------------------------------------ chains


def _same_as_answer(out, ref, question):
    """The chain's output is create_retrieval_chain's (input, context, answer) plus the grounding."""
    assert {"input", "context", "answer", "sources", "supported"} <= set(out)
    assert out["input"] == question and out["answer"] == ref.text and out["supported"] == ref.supported
    if "support_score" in out:  # the retriever's filter decisions (a CoSENTRetriever that filters)
        assert out["support_score"] == pytest.approx(ref.support_score) and out["calibration"] == ref.calibration
        assert out["support_threshold"] == ref.support_threshold and len(out["dropped"]) == len(ref.dropped)
        assert out["answered_from"] == ref.answered_from
    assert [d.page_content for d in out["context"]] == [s.text for s in ref.sources]
    keys = ("index", "id", "text", "n_tokens", "share")
    assert [{k: s[k] for k in keys} for s in out["sources"]] == [{k: getattr(s, k) for k in keys} for s in ref.sources]
    # a separate filter re-encodes the passages: the same cosine to float32 precision, not bit for bit
    assert [s["score"] for s in out["sources"]] == pytest.approx([s.score for s in ref.sources], rel=1e-5, abs=1e-6)
    if ref.sources:
        assert sum(s["share"] for s in out["sources"]) == pytest.approx(1.0, abs=1e-6)


def test_rag_chain_equals_pipeline(rag):
    chain = create_nbce_rag_chain(rag.as_langchain_retriever(), rag.as_langchain_chat_model(max_tokens=N))
    answer_only = chain.pick("answer")
    for q in (Q, Q_NONE):
        ref = rag.ask(q, max_new_tokens=N)
        _same_as_answer(chain.invoke(q), ref, q)
        _same_as_answer(chain.invoke({"input": q}), ref, q)
        assert answer_only.invoke(q) == ref.text
        cb = TokenCounter()
        pieces = list(answer_only.stream(q, config={"callbacks": [cb]}))
        assert "".join(pieces) == ref.text
        if q == Q:
            assert len(pieces) >= 2 and cb.events[:2] == ["retriever_start", "chat_model_start"]
        else:  # nothing passed the filter: the chain abstains without calling the model
            assert ref.answered_from == "abstained" and pieces == [ABSTAIN_TEXT] and "chat_model_start" not in cb.events
        chunks = list(chain.stream(q))  # create_retrieval_chain's order, then the grounding
        assert list(chunks[0]) == ["input"] and list(chunks[1]) == ["context"]
        assert all(list(c) == ["answer"] for c in chunks[2:-1]) and {"sources", "supported"} <= set(chunks[-1])
        assert chunks[-1]["calibration"] == rag.calibration
    closed = create_nbce_rag_chain(rag.as_langchain_retriever(), rag.as_langchain_chat_model(max_tokens=N),
                                   on_unsupported="closed_book").invoke(Q_NONE)
    cref = rag.ask(Q_NONE, max_new_tokens=N, on_unsupported="closed_book")
    assert closed["answer"] == cref.text and closed["supported"] is False and closed["answered_from"] == "closed_book"
    _same_as_answer(asyncio.run(chain.ainvoke(Q)), rag.ask(Q, max_new_tokens=N), Q)
    assert [o["answer"] for o in chain.batch([Q, Q_NONE])] == [rag.ask(q, max_new_tokens=N).text for q in (Q, Q_NONE)]


def test_rag_chain_with_llm_and_filter(rag):
    # unfiltered retriever + separate filter + string LLM == pipeline
    chain = create_nbce_rag_chain(CoSENTRetriever(index=rag.index, k=rag.k), NBCELLM.from_pipeline(rag, max_tokens=N),
                                  filter=MarginThresholdFilter.from_pipeline(rag))
    ref = rag.ask(Q, max_new_tokens=N)
    _same_as_answer(chain.invoke(Q), ref, Q)  # the string LLM's sources come through too
    assert "".join(chain.pick("answer").stream(Q)) == ref.text

    async def run():
        return "".join([p async for p in chain.pick("answer").astream(Q)])

    assert asyncio.run(run()) == ref.text
    _same_as_answer(asyncio.run(chain.ainvoke(Q)), ref, Q)


def test_rag_chain_astream_events(rag):
    chain = create_nbce_rag_chain(rag.as_langchain_retriever(), rag.as_langchain_chat_model(max_tokens=N))

    async def run():
        names = []
        async for ev in chain.astream_events(Q, version="v2"):
            names.append(ev["event"])
        return names

    names = asyncio.run(run())
    assert "on_retriever_end" in names and "on_chat_model_stream" in names and "on_chain_stream" in names


def test_create_retrieval_chain_drop_in(rag):
    chains = pytest.importorskip("langchain_classic.chains")
    chat = rag.as_langchain_chat_model(max_tokens=N)
    chain = chains.create_retrieval_chain(rag.as_langchain_retriever(), create_nbce_documents_chain(chat))
    out = chain.invoke({"input": Q})
    ref = rag.ask(Q, max_new_tokens=N)
    assert set(out) == {"input", "context", "answer"}
    assert out["answer"] == ref.text
    assert [d.id for d in out["context"]] == [s.id for s in ref.sources]
    streamed = "".join(c.get("answer", "") for c in chain.stream({"input": Q}))
    assert streamed == ref.text
    # with the string LLM too
    chain2 = chains.create_retrieval_chain(rag.as_langchain_retriever(),
                                           create_nbce_documents_chain(NBCELLM.from_pipeline(rag, max_tokens=N)))
    assert chain2.invoke({"input": Q})["answer"] == ref.text


# ------------------------------------------------------------------------------------ FAISS


def test_faiss_vectorstore_end_to_end(rag, encoder):
    pytest.importorskip("faiss")
    lc_faiss = pytest.importorskip("langchain_community.vectorstores")
    from langchain_community.vectorstores.utils import DistanceStrategy

    emb = CoSENTEmbeddings(encoder=encoder)
    # MAX_INNER_PRODUCT "relevance" scores are inverted and L2 ones are distances: both re-scored
    for strategy in (DistanceStrategy.EUCLIDEAN_DISTANCE, DistanceStrategy.MAX_INNER_PRODUCT):
        store = lc_faiss.FAISS.from_texts(DOCS, emb, ids=[f"d{i}" for i in range(len(DOCS))], distance_strategy=strategy)
        ret = CoSENTRetriever(vectorstore=store, threshold=rag.threshold, k=rag.k)
        for q in (Q, Q_NONE):
            kept, _ = rag.select(q)
            got = ret.invoke(q)
            assert [d.page_content for d in got] == [p.text for p in kept]
            assert [d.metadata["score"] for d in got] == pytest.approx([p.score for p in kept], abs=1e-5)
        chain = create_nbce_rag_chain(ret, rag.as_langchain_chat_model(max_tokens=N))
        assert chain.invoke(Q)["answer"] == rag.ask(Q, max_new_tokens=N).text


# ------------------------------------------------------------------------------------ bundled models


@pytest.mark.slow
def test_bundled_chain_equals_pipeline(bundled_decoder, index):
    rag = RAGPipeline(bundled_decoder, index, _threshold(), k=4)
    chain = create_nbce_rag_chain(rag.as_langchain_retriever(), rag.as_langchain_chat_model(max_tokens=24))
    ref = rag.ask(Q, max_new_tokens=24)
    pieces = list(chain.pick("answer").stream(Q))
    assert "".join(pieces) == ref.text
    assert "eiffel" in ref.text.lower()
    assert ref.supported and all(s.id in ("d0#0", "d1#0") for s in ref.sources)


# ------------------------------------------------------------------------------------ standard suites


@_mark_async_tests
class TestChatNBCEStandardUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self):
        return ChatNBCE

    @property
    def chat_model_params(self) -> dict:
        # short answers keep the suite fast; the standard max_tokens overrides this when given
        return {"decoder": _tiny_chat_decoder(), "nbce_options": {"max_new_tokens": 12}}

    @property
    def supports_model_override(self) -> bool:
        return False  # one loaded model per instance; a per-call model name cannot swap weights

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False


@_mark_async_tests
class TestChatNBCEStandardIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self):
        return ChatNBCE

    @property
    def chat_model_params(self) -> dict:
        # short answers keep the suite fast; the standard max_tokens overrides this when given
        return {"decoder": _tiny_chat_decoder(), "nbce_options": {"max_new_tokens": 12}}

    @property
    def supports_model_override(self) -> bool:
        return False

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def returns_usage_metadata(self) -> bool:
        return True


@_mark_async_tests
class TestCoSENTRetrieverStandard(RetrieversIntegrationTests):
    @property
    def retriever_constructor(self):
        return CoSENTRetriever

    @property
    def retriever_constructor_params(self) -> dict:
        return {"index": _index()}

    @property
    def retriever_query_example(self) -> str:
        return Q


@_mark_async_tests
class TestCoSENTEmbeddingsStandardUnit(EmbeddingsUnitTests):
    @property
    def embeddings_class(self):
        return CoSENTEmbeddings

    @property
    def embedding_model_params(self) -> dict:
        return {"encoder": _encoder()}


@_mark_async_tests
class TestCoSENTEmbeddingsStandardIntegration(EmbeddingsIntegrationTests):
    @property
    def embeddings_class(self):
        return CoSENTEmbeddings

    @property
    def embedding_model_params(self) -> dict:
        return {"encoder": _encoder()}
