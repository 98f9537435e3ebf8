"""One retrieval path (nbce_rag.retrieval.selection.select) and one options mapping (OPENAI_PARAMS),
checked on every surface: the pipeline, LangChain, LlamaIndex and the server mapping."""

from __future__ import annotations

import numpy as np
import pytest

from nbce_rag import MarginThreshold, NBCEDecoder, Passage, RAGPipeline, VectorIndex
from nbce_rag.config import OPENAI_PARAMS, NBCEConfig, openai_options
from nbce_rag.errors import ConfigError, EncoderMismatchError
from nbce_rag.retrieval.selection import CandidateSource, EmbeddingEncoder, Encoder, Selection, as_encoder, identity_of, select
from nbce_rag.types import Answer, DroppedHit, FilterResult

from conftest import DOCS, N, Q, Q_NONE


# ------------------------------------------------------------------------------------ select, pure


class _BagEncoder:
    """Word-count vectors over a fixed vocabulary: cosines known by construction."""

    identity = "bag@sha256:0000"

    def __init__(self, vocab):
        self.vocab = list(vocab)

    def encode(self, texts, **_):
        return np.asarray([[t.lower().split().count(w) + 1e-6 for w in self.vocab] for t in texts], dtype=np.float32)


class _Source:
    def __init__(self, passages):
        self.passages = passages
        self.asked = []

    def search(self, query, k):
        self.asked.append(k)
        return [Passage(p.text, p.score, p.id, dict(p.metadata)) for p in self.passages[:k]]


def test_protocols_are_what_the_core_and_adapters_use():
    enc = _BagEncoder(["a"])
    assert isinstance(enc, Encoder) and isinstance(_Source([]), CandidateSource)
    assert as_encoder(None) is None and as_encoder(enc) is enc
    wrapped = as_encoder(3.0, embeddings=(float, lambda x: (lambda texts: [[x, 1.0] for _ in texts])))
    assert isinstance(wrapped, EmbeddingEncoder) and wrapped.encode(["u", "v"]).shape == (2, 2)
    with pytest.raises(TypeError, match="a thing that encodes"):
        as_encoder(object(), what="a thing that encodes")
    assert identity_of(enc) == enc.identity and identity_of(wrapped) is None and identity_of(None) is None


def test_select_rescoring_sorts_cuts_and_maps_back_positions():
    enc = _BagEncoder(["apple", "pear", "plum"])
    store = [Passage("plum plum", score=0.99, id="x"), Passage("apple pear", score=0.10, id="y"),
             Passage("apple apple", score=0.50, id="z")]
    src = _Source(store)
    sel = select("apple", src, encoder=enc, k=2, fetch_k=3, rescore=True)
    assert src.asked == [3]  # searched max(k, fetch_k)
    assert [p.id for p in sel.kept] == ["z", "y"] and sel.kept_index == [2, 1]  # by cosine, cut to k
    assert [p.metadata["store_score"] for p in sel.kept] == [0.50, 0.10]
    kept, dropped = sel  # unpacks like the tuple RAGPipeline.select used to return
    assert isinstance(sel, Selection) and kept is sel.kept and dropped == [] and sel[0] is sel.kept and sel.result is None

    th = MarginThreshold(threshold=0.8, lower=0.3, upper=0.9, margin=None, encoder_identity=enc.identity)
    sel = select("apple", store, threshold=th, encoder=enc, rescore=True)
    assert [p.id for p in sel.kept] == ["z"] and sel.kept_index == [2]
    assert sorted(sel.dropped_index) == [0, 1] and all(isinstance(d, DroppedHit) for d in sel.dropped)
    assert isinstance(sel.result, FilterResult) and sel.result.threshold == 0.8
    # the calibration's encoder identity is checked
    other = MarginThreshold(threshold=0.6, lower=0.3, upper=0.9, margin=None, encoder_identity="other@sha256:1111")
    with pytest.raises(EncoderMismatchError):
        select("apple", store, threshold=other, encoder=enc)
    with pytest.raises(TypeError):
        select("apple", "just one string")
    with pytest.raises(ValueError, match="needs an encoder"):
        select("apple", store, rescore=True)


def test_answer_usage_and_metadata_are_the_core_s():
    d = DroppedHit(Passage("x", 0.1, "p"), reason="low", code="below_threshold")
    a = Answer(text="t", token_ids=[1, 2], token_sources=[0, -1], sources=[], prompt_tokens=7, completion_tokens=2,
               dropped=[d])
    assert a.usage() == {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9,
                         "prompt_tokens_details": {"cached_tokens": 0}}
    assert a.metadata() == {"supported": True, "support_score": None, "support_threshold": None,
                            "calibration": None, "answered_from": "passages", "kept": 0, "notes": [],
                            "sources": [], "dropped": [d.to_dict()], "token_sources": [0, -1]}
    a.support_score, a.support_threshold, a.supported, a.calibration = 0.31, 0.43, False, "prior"
    assert {k: a.grounding()[k] for k in ("supported", "support_score", "support_threshold", "calibration",
                                          "dropped")} == {"supported": False, "support_score": 0.31,
                                                          "support_threshold": 0.43, "calibration": "prior",
                                                          "dropped": 1}


# ------------------------------------------------------------------------------------ options mapping


def test_openai_options_table_layers_and_aliases():
    assert set(OPENAI_PARAMS) >= {"max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop"}
    assert openai_options({"max_tokens": 5, "stop": "x", "seed": 3, "beta": 0.5, "top_p": None}) == {
        "beta": 0.5, "max_new_tokens": 5, "stop": ["x"], "seed": 3}
    # the first-listed alias wins inside a layer; a later layer wins over an earlier one
    assert openai_options({"max_completion_tokens": 4, "max_tokens": 9, "max_new_tokens": 20}) == {"max_new_tokens": 4}
    assert openai_options({"max_tokens": 9}, {"max_new_tokens": 3}) == {"max_new_tokens": 3}
    # temperature 0 in a later layer is greedy and drops the earlier temperature
    assert openai_options({"temperature": 0.7}, {"temperature": 0}) == {"do_sample": False}
    assert openai_options({"do_sample": False, "temperature": 0.5}) == {"do_sample": True, "temperature": 0.5}
    with pytest.raises(ConfigError, match="temperature"):
        openai_options({"temperature": -1})
    cfg = NBCEConfig.from_openai_params({"max_tokens": 7, "temperature": 0.3}, base=NBCEConfig(beta=0.5))
    assert (cfg.max_new_tokens, cfg.do_sample, cfg.temperature, cfg.beta) == (7, True, 0.3, 0.5)
    with pytest.raises(TypeError, match="unknown decoding option"):
        NBCEConfig.from_openai_params({"no_such_option": 1})


#: (request parameters, expected (do_sample, temperature, top_p)) -- top_p never turns sampling on
TOP_P_CASES = [
    ({"top_p": 0.9}, (False, 1.0, 0.9)),
    ({"top_p": 0.9, "temperature": 0.7}, (True, 0.7, 0.9)),
    ({"top_p": 0.5, "temperature": 0}, (False, 1.0, 0.5)),
    ({"temperature": 1.2}, (True, 1.2, 1.0)),
]


def _effective(dec: NBCEDecoder, overrides) -> tuple:
    c = dec.config.update(**overrides)
    return c.do_sample, c.temperature, c.top_p


@pytest.mark.parametrize("params,expected", TOP_P_CASES)
def test_top_p_semantics_are_the_same_on_every_surface(tiny_chat_decoder, params, expected):
    dec = tiny_chat_decoder
    # the decoder itself: OpenAI names mapped once, then NBCEConfig fields
    assert _effective(dec, openai_options(params)) == expected
    pytest.importorskip("langchain_core")
    from nbce_rag.integrations.langchain import NBCELLM as LCLLM
    from nbce_rag.integrations.langchain import ChatNBCE, decode_options

    assert _effective(dec, ChatNBCE(decoder=dec, **params)._options(None, {})) == expected
    assert _effective(dec, ChatNBCE(decoder=dec)._options(None, dict(params))) == expected  # per call
    assert _effective(dec, LCLLM(decoder=dec, **params)._options(None, {})) == expected
    assert _effective(dec, decode_options(**params)) == expected
    pytest.importorskip("llama_index.core")
    from nbce_rag.integrations.llama_index import NBCELLM as LILLM

    assert _effective(dec, LILLM(decoder=dec, **params)._options({})) == expected
    assert _effective(dec, LILLM(decoder=dec)._options(dict(params))) == expected
    pytest.importorskip("fastapi")
    from nbce_rag.integrations.server import ChatCompletionRequest, create_app

    srv = create_app(RAGPipeline(dec), encoder=False).state.nbce
    req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "q"}], **params})
    assert _effective(dec, srv.decode_options(req, None)) == expected


def test_a_new_parameter_is_one_table_line_on_every_surface(tiny_chat_decoder, monkeypatch):
    """Adding a line to OPENAI_PARAMS makes the parameter work per call in both adapters and
    in server requests, with no other change."""
    from nbce_rag import config

    monkeypatch.setitem(config.OPENAI_PARAMS, "contrast", config._to("beta", float))
    dec = tiny_chat_decoder
    assert openai_options({"contrast": "0.5"}) == {"beta": 0.5}
    pytest.importorskip("langchain_core")
    pytest.importorskip("llama_index.core")
    pytest.importorskip("fastapi")
    from nbce_rag.integrations.langchain import ChatNBCE
    from nbce_rag.integrations.llama_index import NBCELLM as LILLM
    from nbce_rag.integrations.server import ChatCompletionRequest, create_app

    assert ChatNBCE(decoder=dec)._options(None, {"contrast": 0.5})["beta"] == 0.5
    assert LILLM(decoder=dec)._options({"contrast": 0.5})["beta"] == 0.5
    srv = create_app(RAGPipeline(dec), encoder=False).state.nbce
    req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "q"}], "contrast": 0.5})
    assert srv.decode_options(req, None)["beta"] == 0.5


def test_top_p_alone_decodes_greedily_everywhere(tiny_chat_decoder):
    """Behaviour, not just mapping: top_p=0.5 without a temperature is the greedy answer."""
    pytest.importorskip("langchain_core")
    pytest.importorskip("llama_index.core")
    from langchain_core.messages import HumanMessage

    from nbce_rag.integrations.langchain import ChatNBCE
    from nbce_rag.integrations.llama_index import NBCELLM as LILLM

    dec = tiny_chat_decoder
    greedy = dec.generate(Q, DOCS[:2], max_new_tokens=N).text
    assert dec.generate(Q, DOCS[:2], max_new_tokens=N, top_p=0.5).text == greedy
    chat = ChatNBCE(decoder=dec, max_tokens=N, top_p=0.5)
    assert chat.invoke([HumanMessage(Q)], documents=DOCS[:2]).content == greedy
    assert LILLM(decoder=dec, max_new_tokens=N, top_p=0.5).complete(Q, contexts=DOCS[:2]).text == greedy


# ------------------------------------------------------------------------------------ adapters == pipeline


@pytest.fixture(scope="module")
def rag(tiny_chat_decoder, encoder):
    index = VectorIndex.build(encoder, [{"id": f"d{i}", "text": t} for i, t in enumerate(DOCS)])
    th = MarginThreshold(threshold=0.35, lower=0.25, upper=0.6, margin=0.25, encoder_identity=encoder.identity)
    return RAGPipeline(tiny_chat_decoder, index, th, k=4)


def _ids(ps):
    return [(p.id, round(float(p.score), 6)) for p in ps]


@pytest.mark.parametrize("q", [Q, Q_NONE])
def test_langchain_retriever_and_filter_return_what_the_pipeline_selects(rag, encoder, q):
    pytest.importorskip("langchain_core")
    from langchain_core.documents import Document

    from nbce_rag.integrations.langchain import CoSENTRetriever, MarginThresholdFilter

    kept, dropped = rag.select(q)
    ret = CoSENTRetriever.from_pipeline(rag)
    docs = ret.invoke(q)
    assert [(d.id, round(d.metadata["score"], 6)) for d in docs] == _ids(kept)
    assert len(ret.select(q).dropped) == len(dropped)
    given = [Document(page_content=t, id=f"d{i}", metadata={"score": 0.99}) for i, t in enumerate(DOCS)]
    ref, ref_dropped = rag.select(q, passages=[{"text": t, "id": f"d{i}", "score": 0.99} for i, t in enumerate(DOCS)])
    out = MarginThresholdFilter.from_pipeline(rag).compress_documents(given, q)
    assert [(d.id, round(d.metadata["score"], 6)) for d in out] == _ids(ref)
    assert all(d.metadata["store_score"] == 0.99 for d in out)


@pytest.mark.parametrize("q", [Q, Q_NONE])
def test_llama_index_retriever_and_postprocessor_return_what_the_pipeline_selects(rag, q):
    pytest.importorskip("llama_index.core")
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

    from nbce_rag.integrations.llama_index import CoSENTRetriever, MarginThresholdPostprocessor

    kept, dropped = rag.select(q)
    ret = CoSENTRetriever.from_pipeline(rag)
    nodes = ret.retrieve(q)
    assert [(n.node.node_id, round(n.score, 6)) for n in nodes] == _ids(kept)
    assert len(ret.last_dropped) == len(dropped)
    assert all(d["hit"]["text"] for d in ret.last_dropped)  # the dropped passages themselves, not stand-ins
    given = [NodeWithScore(node=TextNode(text=t, id_=f"d{i}"), score=0.99) for i, t in enumerate(DOCS)]
    ref, _ = rag.select(q, passages=[{"text": t, "id": f"d{i}"} for i, t in enumerate(DOCS)])
    out = MarginThresholdPostprocessor.from_pipeline(rag).postprocess_nodes(given, query_bundle=QueryBundle(q))
    assert [(n.node.node_id, round(n.score, 6)) for n in out] == _ids(ref)
    assert all(n.node is given[int(n.node.node_id[1:])].node for n in out)  # the caller's nodes come back


def test_each_adapter_answers_what_the_pipeline_answers(rag):
    pytest.importorskip("langchain_core")
    pytest.importorskip("llama_index.core")
    from langchain_core.messages import HumanMessage

    from nbce_rag.integrations.langchain import ChatNBCE
    from nbce_rag.integrations.llama_index import NBCEQueryEngine

    for q in (Q, Q_NONE):
        rag.ask(q, max_new_tokens=N)  # the passage KV cache warm for all three (usage counts cached tokens)
        ref = rag.ask(q, max_new_tokens=N)
        lc = ChatNBCE.from_pipeline(rag, retrieve=True, max_tokens=N).invoke([HumanMessage(q)])
        assert lc.content == ref.text and lc.response_metadata["nbce"] == ref.metadata()
        li = NBCEQueryEngine.from_pipeline(rag, max_new_tokens=N).query(q)
        assert li.response == ref.text and li.metadata["nbce"]["sources"] == ref.metadata()["sources"]
        assert li.metadata["nbce"]["usage"] == ref.usage()
