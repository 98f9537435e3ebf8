"""The OpenAI-compatible server, driven over 127.0.0.1 by the real ``openai`` client,
LangChain's ``ChatOpenAI`` and raw ``httpx``: same answers as ``RAGPipeline``, streaming and
not, usage, the ``nbce`` extension, server-side retrieval, embeddings, auth, every limit,
malformed input, 16 concurrent clients, a full queue, timeouts and disconnects.

The model is the tiny random Llama of ``conftest.py`` (with a chat template, so system
prompts matter); the worker-mechanics tests use a model-free pipeline that never ends on its
own, and the scheduler tests gate the model's forward passes (``ForwardGate``), so no result
depends on how fast the machine is: waits on the server are hang guards (``WAIT``), never
limits on how long something took."""

from __future__ import annotations

import asyncio
import json
import queue
import socket
import threading
import time
from typing import Any, Dict, List

import numpy as np
import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from nbce_rag import RAGPipeline  # noqa: E402
from nbce_rag.integrations.server import ServerLimits, create_app  # noqa: E402
from nbce_rag.types import Answer, StreamEvent  # noqa: E402

MODEL = "nbce-test"
DOCS = [
    {"title": "Eiffel", "text": "The Eiffel Tower is in Paris and was completed in 1889."},
    {"text": "Mount Everest is the highest mountain above sea level."},
    {"title": "Thames", "text": "The river Thames flows through London into the North Sea."},
]
#: what the decoder reads for DOCS: title + newline + text
PASSAGES = [
    "Eiffel\nThe Eiffel Tower is in Paris and was completed in 1889.",
    "Mount Everest is the highest mountain above sea level.",
    "Thames\nThe river Thames flows through London into the North Sea.",
]
Q = "When was the tower completed?"
#: hang guard for every wait on the server (generous: the machine may be loaded)
WAIT = 120.0


def wait_until(cond, what: str, timeout: float = WAIT) -> None:
    """Poll ``cond`` until it holds; fail (not skip) if it never does."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.005)


# ----------------------------------------------------------------------------- serving helpers
class Served:
    """A uvicorn server on a free 127.0.0.1 port in a background thread."""

    def __init__(self, app):
        self.app = app
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), "uvicorn started")
        assert self.server.started, "uvicorn did not start"

    @property
    def worker(self):
        return self.app.state.nbce.worker

    def client(self, **kw):
        kw.setdefault("api_key", "unused")
        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 60)
        return openai.OpenAI(base_url=self.base + "/v1", **kw)

    def aclient(self, **kw):
        kw.setdefault("api_key", "unused")
        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 120)
        return openai.AsyncOpenAI(base_url=self.base + "/v1", **kw)

    def post(self, path: str, body: Any = None, **kw):
        if body is not None and "content" not in kw:
            kw["json"] = body
        return httpx.post(self.base + path, timeout=kw.pop("timeout", 60), **kw)

    def wait_idle(self) -> None:
        wait_until(lambda: not (self.worker.busy or self.worker.queued), "the model worker became idle")

    def close(self):
        self.server.should_exit = True
        self.thread.join(15)


def assert_openai_error(resp, status: int, code: str | None = None, type_: str | None = None) -> Dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    if type_ is not None:
        assert err["type"] == type_, err
    return err


#: more tokens than any test waits for: a request asking for it ends only by cancel or timeout
ENDLESS = 10**6


class SlowPipeline:
    """A model-free pipeline: one token ("t0 ", "t1 ", ...) every ``delay`` seconds (pacing only,
    no test depends on it). Records, per stream, how many tokens it produced before it ended or
    was closed."""

    def __init__(self, decoder, delay: float = 0.02):
        self.decoder = decoder  # only its config is used (option validation)
        self.index = None
        self.threshold = None
        self.delay = delay
        self.started = threading.Event()
        self.produced: List[int] = []

    def stream(self, question, passages=None, *, k=None, **opts):
        n = opts.get("max_new_tokens", 64)
        count = 0
        self.started.set()
        try:
            for i in range(n):
                time.sleep(self.delay)
                count += 1
                yield StreamEvent(f"t{i} ", i, -1)
            text = "".join(f"t{i} " for i in range(n))
            ans = Answer(text=text, token_ids=list(range(n)), token_sources=[-1] * n, sources=[],
                         finish_reason="length", prompt_tokens=3, completion_tokens=n, supported=False)
            yield StreamEvent("", None, None, "length", ans)
        finally:
            self.produced.append(count)


# ----------------------------------------------------------------------------- fixtures
LIMITS = ServerLimits(max_body_bytes=64 * 1024, max_documents=8, max_document_chars=2000, max_question_chars=500,
                      max_tokens=128, max_stop=4, max_embedding_inputs=8, max_queue=32, request_timeout_s=60)


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    from conftest import make_tiny_encoder

    return make_tiny_encoder(tmp_path_factory.mktemp("srv_enc"), seed=0)


@pytest.fixture(scope="module")
def pipe(tiny_chat_decoder):
    return RAGPipeline(tiny_chat_decoder)


@pytest.fixture(scope="module")
def served(pipe, tiny_encoder):
    s = Served(create_app(pipe, encoder=tiny_encoder, limits=LIMITS, model_name=MODEL))
    yield s
    s.close()


def ask(pipe, question=Q, passages=PASSAGES, **opts) -> Answer:
    return pipe.ask(question, passages, **opts)


def chat(served, question=Q, docs=DOCS, **kw):
    extra = dict(kw.pop("extra_body", {}))
    if docs is not None:
        extra["documents"] = docs
    return served.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], extra_body=extra, **kw)


def check_nbce(nbce: Dict[str, Any], expected: Answer) -> None:
    assert nbce["supported"] == expected.supported
    assert [s["n_tokens"] for s in nbce["sources"]] == [s.n_tokens for s in expected.sources]
    assert [s["share"] for s in nbce["sources"]] == pytest.approx([s.share for s in expected.sources])
    assert sum(s["n_tokens"] for s in nbce["sources"]) <= expected.completion_tokens


# ----------------------------------------------------------------------------- openai client
def test_models_and_health(served):
    ids = [m.id for m in served.client().models.list().data]
    assert ids == [MODEL]
    assert served.client().models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        served.client().models.retrieve("gpt-4")
    h = httpx.get(served.base + "/health").json()
    assert h["status"] == "ok" and h["model"] == MODEL and "stats" in h


def test_chat_non_stream_matches_pipeline(served, pipe):
    expected = ask(pipe, max_new_tokens=24)
    r = chat(served, max_tokens=24)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected.text
    assert r.choices[0].finish_reason == expected.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (expected.prompt_tokens, expected.completion_tokens)
    assert r.usage.total_tokens == expected.prompt_tokens + expected.completion_tokens
    # asked before (by the pipeline or an earlier test): the passages' keys/values came from the cache
    assert 0 < r.usage.prompt_tokens_details.cached_tokens < r.usage.prompt_tokens
    nbce = r.model_extra["nbce"]
    check_nbce(nbce, expected)
    assert [s["index"] for s in nbce["sources"]] == [0, 1, 2]
    assert [s["title"] for s in nbce["sources"]] == ["Eiffel", None, "Thames"]
    assert nbce["retrieved"] is False and nbce["dropped"] == []


def test_chat_stream_matches_pipeline_with_usage(served, pipe):
    expected = ask(pipe, max_new_tokens=24)
    chunks = list(chat(served, max_tokens=24, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == expected.finish_reason
    check_nbce(finals[0].model_extra["nbce"], expected)
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == expected.completion_tokens
    assert usage.usage.prompt_tokens == expected.prompt_tokens
    # without include_usage: no usage chunk
    chunks = list(chat(served, max_tokens=24, stream=True))
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)


def test_raw_sse_format(served):
    with httpx.stream("POST", served.base + "/v1/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": [{"role": "user", "content": Q}], "documents": DOCS,
                            "max_tokens": 8, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines)
    assert lines[-1] == "data: [DONE]"
    objs = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert {o["object"] for o in objs} == {"chat.completion.chunk"} and len({o["id"] for o in objs}) == 1


def test_completions_stream_and_not(served, pipe):
    expected = ask(pipe, max_new_tokens=16)
    c = served.client()
    r = c.completions.create(model=MODEL, prompt=Q, max_tokens=16, extra_body={"documents": DOCS})
    assert r.object == "text_completion" and r.choices[0].text == expected.text
    assert r.usage.completion_tokens == expected.completion_tokens
    check_nbce(r.model_extra["nbce"], expected)
    chunks = list(c.completions.create(model=MODEL, prompt=[Q], max_tokens=16, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"documents": DOCS}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == expected.text
    assert chunks[-1].usage.total_tokens == expected.prompt_tokens + expected.completion_tokens


def test_contexts_alias_and_plain_string_documents(served, pipe):
    expected = ask(pipe, passages=["alpha beta", "gamma"], max_new_tokens=10)
    assert chat(served, docs=None, max_tokens=10, extra_body={"contexts": ["alpha beta", "gamma"]}) \
        .choices[0].message.content == expected.text
    assert chat(served, docs=["alpha beta", "gamma"], max_tokens=10).choices[0].message.content == expected.text


def test_stop_seed_sampling_and_nbce_options(served, pipe):
    greedy = ask(pipe, max_new_tokens=24)
    words = [w for w in greedy.text.split() if len(w) > 1]
    assert len(words) >= 2, f"the greedy answer has no later word to stop at: {greedy.text!r}"
    # stop at a later piece of the greedy answer
    stop = words[len(words) // 2]
    exp = ask(pipe, max_new_tokens=24, stop=[stop])
    r = chat(served, max_tokens=24, stop=stop)
    assert r.choices[0].message.content == exp.text and stop not in exp.text
    assert exp.finish_reason == r.choices[0].finish_reason == "stop"
    assert greedy.text.startswith(exp.text) and len(exp.text) < len(greedy.text)
    sampled = ask(pipe, max_new_tokens=16, do_sample=True, temperature=0.9, top_p=0.8, seed=7)
    r1 = chat(served, max_tokens=16, temperature=0.9, top_p=0.8, seed=7)
    r2 = chat(served, max_tokens=16, temperature=0.9, top_p=0.8, seed=7)
    assert r1.choices[0].message.content == r2.choices[0].message.content == sampled.text
    # temperature 0 is greedy
    assert chat(served, max_tokens=24, temperature=0).choices[0].message.content == greedy.text
    # NBCE settings as an extension field
    exp = ask(pipe, max_new_tokens=16, pooling="mean", beta=0.5, eta=0.0)
    r = chat(served, max_tokens=16, extra_body={"nbce": {"pooling": "mean", "beta": 0.5, "eta": 0.0}})
    assert r.choices[0].message.content == exp.text
    check_nbce(r.model_extra["nbce"], exp)


def test_system_message_becomes_system_prompt(served, pipe):
    sys_prompt = "Answer in one word."
    exp = ask(pipe, max_new_tokens=16, system_prompt=sys_prompt)
    plain = ask(pipe, max_new_tokens=16)
    assert exp.prompt_tokens != plain.prompt_tokens  # the chat template renders it
    r = served.client().chat.completions.create(
        model=MODEL, max_tokens=16, extra_body={"documents": DOCS},
        messages=[{"role": "system", "content": sys_prompt}, {"role": "user", "content": "earlier turn"},
                  {"role": "assistant", "content": "ok"},
                  {"role": "user", "content": [{"type": "text", "text": Q}]}])
    assert r.choices[0].message.content == exp.text
    assert r.usage.prompt_tokens == exp.prompt_tokens


def test_closed_book_without_documents_or_index(served, pipe):
    exp = pipe.ask(Q, [], max_new_tokens=12)
    r = chat(served, docs=None, max_tokens=12)
    assert r.choices[0].message.content == exp.text
    info = dict(r.model_extra["nbce"])
    assert "calibration" in info  # which calibration filtered (none here)
    info.pop("calibration")
    notes = info.pop("notes")
    assert info == {"supported": False, "retrieved": False, "sources": [], "dropped": [], "support_score": None,
                    "support_threshold": None, "answered_from": "closed_book"}
    assert notes == ["no passage was given: the model answered alone"]


# ----------------------------------------------------------------------------- LangChain
def test_langchain_chat_openai(served, pipe):
    lco = pytest.importorskip("langchain_openai")
    expected = ask(pipe, max_new_tokens=20)
    llm = lco.ChatOpenAI(base_url=served.base + "/v1", api_key="unused", model=MODEL, max_tokens=20, max_retries=0)
    msg = llm.invoke(Q, extra_body={"documents": DOCS})
    assert msg.content == expected.text
    assert msg.usage_metadata["output_tokens"] == expected.completion_tokens
    streamed = "".join(ch.content for ch in llm.stream(Q, extra_body={"documents": DOCS}))
    assert streamed == expected.text
    bound = llm.bind(extra_body={"documents": DOCS})
    assert bound.invoke([("user", Q)]).content == expected.text


# ----------------------------------------------------------------------------- server-side retrieval
def test_server_side_retrieval_and_filter(tiny_chat_decoder, tiny_encoder):
    from nbce_rag.retrieval.index import VectorIndex
    from nbce_rag.filtering.threshold import MarginThreshold

    corpus = [{"id": f"d{i}", "text": d["text"], "metadata": {"title": d.get("title", f"doc {i}")}}
              for i, d in enumerate(DOCS)]
    corpus += [{"id": "d3", "text": "Bananas are rich in potassium and grow in tropical climates."},
               {"id": "d4", "text": "Water boils at one hundred degrees Celsius at sea level."}]
    index = VectorIndex.build(tiny_encoder, corpus, chunk_tokens=32, overlap=4)
    scores = sorted((h.score for h in index.search(Q, k=5)), reverse=True)
    cut = (scores[1] + scores[2]) / 2  # keeps the two best of five
    th = MarginThreshold(threshold=cut, lower=cut, upper=cut, margin=None, encoder_identity=tiny_encoder.identity)
    rag = RAGPipeline(tiny_chat_decoder, index, th, k=5)
    s = Served(create_app(rag, limits=LIMITS, model_name=MODEL))
    try:
        exp = rag.ask(Q, max_new_tokens=12)
        kept, dropped = rag.select(Q)
        assert len(kept) == 2 and len(dropped) == 3
        r = chat(s, docs=None, max_tokens=12)
        assert r.choices[0].message.content == exp.text
        nbce = r.model_extra["nbce"]
        assert nbce["retrieved"] is True and nbce["supported"] is True
        assert [x["id"] for x in nbce["sources"]] == [p.id for p in kept]
        assert [x["score"] for x in nbce["sources"]] == pytest.approx([p.score for p in kept])
        assert all(x["index"] is None and x["text"] for x in nbce["sources"])
        assert {x["id"] for x in nbce["dropped"]} == {d.hit.id for d in dropped}
        assert {x["code"] for x in nbce["dropped"]} == {"below_threshold"}
        # nbce.k bounds the candidates
        r = chat(s, docs=None, max_tokens=4, extra_body={"nbce": {"k": 1}})
        nb = r.model_extra["nbce"]
        assert len(nb["sources"]) + len(nb["dropped"]) == 1
        # documents given: re-scored and filtered with the calibration, not retrieved
        exp = rag.ask(Q, PASSAGES, max_new_tokens=12)
        r = chat(s, max_tokens=12)
        assert r.choices[0].message.content == exp.text
        assert r.model_extra["nbce"]["retrieved"] is False
        assert all(x["score"] is not None for x in r.model_extra["nbce"]["sources"])
        assert len(r.model_extra["nbce"]["sources"]) == len(exp.sources)
        # the server's embeddings default to the index's encoder
        e = s.client().embeddings.create(model="x", input="hello")
        np.testing.assert_allclose(e.data[0].embedding, tiny_encoder.encode(["hello"])[0], atol=1e-5)
        assert nb["support_threshold"] == cut and nb["support_score"] is not None
    finally:
        s.close()


def test_server_reports_both_decisions_and_never_drops_all_documents(tiny_chat_decoder, tiny_encoder):
    """Nothing passes keep: the server abstains (or answers closed-book when asked), flagged;
    the client's own documents are never all dropped in silence."""
    from nbce_rag.filtering.threshold import MarginThreshold
    from nbce_rag.pipeline import ABSTAIN_TEXT
    from nbce_rag.retrieval.index import VectorIndex

    index = VectorIndex.build(tiny_encoder, [{"id": f"d{i}", "text": d["text"]} for i, d in enumerate(DOCS)])
    strict = MarginThreshold(threshold=0.999, lower=0.999, upper=0.999, margin=None,
                             encoder_identity=tiny_encoder.identity)
    rag = RAGPipeline(tiny_chat_decoder, index, strict, k=3)
    s = Served(create_app(rag, limits=LIMITS, model_name=MODEL))
    try:
        r = chat(s, docs=None, max_tokens=8)
        nb = r.model_extra["nbce"]
        assert r.choices[0].message.content == ABSTAIN_TEXT and r.choices[0].finish_reason == "stop"
        assert nb["supported"] is False and nb["answered_from"] == "abstained" and len(nb["dropped"]) == 3
        assert nb["support_threshold"] == 0.999 and nb["support_score"] < 0.999 and nb["notes"]
        assert all(x["reason"] and x["code"] == "below_threshold" for x in nb["dropped"])
        streamed = "".join(ch.choices[0].delta.content or "" for ch in s.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": Q}], max_tokens=8, stream=True) if ch.choices)
        assert streamed == ABSTAIN_TEXT
        cb = chat(s, docs=None, max_tokens=8, extra_body={"nbce": {"on_unsupported": "closed_book"}})
        assert cb.choices[0].message.content == rag.ask(Q, max_new_tokens=8, on_unsupported="closed_book").text
        assert cb.model_extra["nbce"]["answered_from"] == "closed_book"
        # the client's documents: the best-scoring one is decoded, flagged unsupported, with a note
        exp = rag.ask(Q, PASSAGES, max_new_tokens=8)
        r = chat(s, max_tokens=8)
        nb = r.model_extra["nbce"]
        assert r.choices[0].message.content == exp.text and len(exp.sources) == 1
        assert nb["supported"] is False and len(nb["sources"]) == 1 and len(nb["dropped"]) == 2
        assert "none of the 3 passages given passed" in nb["notes"][0]
        bad = httpx.post(s.base + "/v1/chat/completions", json=_body(nbce={"on_unsupported": "guess"}))
        assert assert_openai_error(bad, 400)["param"] == "nbce.on_unsupported"
    finally:
        s.close()


# ----------------------------------------------------------------------------- embeddings
def test_embeddings(served, tiny_encoder):
    c = served.client()
    texts = ["The Eiffel Tower is in Paris.", "bananas"]
    ref = tiny_encoder.encode(texts)
    r = c.embeddings.create(model="anything", input=texts)  # the client asks for base64 by default
    got = np.array([d.embedding for d in r.data])
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert [d.index for d in r.data] == [0, 1]
    assert r.usage.prompt_tokens == sum(tiny_encoder.count_tokens(texts)) > 0
    r = c.embeddings.create(model="anything", input="bananas", encoding_format="float")
    np.testing.assert_allclose(r.data[0].embedding, ref[1], atol=1e-6)
    assert_openai_error(served.post("/v1/embeddings", {"input": [[1, 2, 3]]}), 400)
    assert_openai_error(served.post("/v1/embeddings", {"input": []}), 400)
    assert_openai_error(served.post("/v1/embeddings", {"input": ["x"] * 9}), 400, "too_many_inputs")
    assert_openai_error(served.post("/v1/embeddings", {"input": "x" * 2001}), 400, "input_too_long")
    assert_openai_error(served.post("/v1/embeddings", {"input": "x", "dimensions": 7}), 400)
    assert_openai_error(served.post("/v1/embeddings", {"input": "x", "encoding_format": "int8"}), 400)
    for raw, param in ((b'{"input": "caf\\ud800"}', "input"), (b'{"input": ["ok", "caf\xe9"]}', "input[1]")):
        r = httpx.post(served.base + "/v1/embeddings", content=raw, headers={"content-type": "application/json"})
        err = assert_openai_error(r, 400, "invalid_text")
        assert err["param"] == param and "not valid text" in err["message"], err


def test_embeddings_default_bundled_encoder(pipe):
    """No encoder and no index: the bundled all-MiniLM-L6-v2, loaded on first use."""
    from nbce_rag.retrieval.encoder import CoSENTEncoder

    s = Served(create_app(pipe, limits=LIMITS))
    try:
        r = s.client().embeddings.create(model="x", input=["hello world"])
        assert r.model == "all-MiniLM-L6-v2"
        ref = CoSENTEncoder.from_pretrained().encode(["hello world"])[0]
        np.testing.assert_allclose(r.data[0].embedding, ref, atol=1e-5)
    finally:
        s.close()
    off = Served(create_app(pipe, encoder=False, limits=LIMITS))
    try:
        assert_openai_error(off.post("/v1/embeddings", {"input": "x"}), 404)
    finally:
        off.close()


# ----------------------------------------------------------------------------- auth
def test_api_key(pipe):
    s = Served(create_app(pipe, api_key="s3cret", limits=LIMITS, model_name=MODEL))
    try:
        body = {"messages": [{"role": "user", "content": Q}], "max_tokens": 2}
        err = assert_openai_error(s.post("/v1/chat/completions", body), 401, "invalid_api_key")
        assert "Bearer" in err["message"]
        assert_openai_error(s.post("/v1/chat/completions", body, headers={"Authorization": "Bearer wrong"}),
                            401, "invalid_api_key")
        assert_openai_error(s.post("/v1/chat/completions", body, headers={"Authorization": "s3cret"}), 401)
        assert_openai_error(httpx.get(s.base + "/v1/models"), 401)
        assert_openai_error(s.post("/v1/embeddings", {"input": "x"}), 401)
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").chat.completions.create(model=MODEL, messages=body["messages"], max_tokens=2)
        ok = s.client(api_key="s3cret").chat.completions.create(model=MODEL, messages=body["messages"], max_tokens=2)
        assert ok.usage.completion_tokens >= 1
        assert httpx.get(s.base + "/health").status_code == 200  # health stays open
    finally:
        s.close()


# ----------------------------------------------------------------------------- limits and bad input
def _body(**kw):
    b = {"model": MODEL, "messages": [{"role": "user", "content": Q}], "max_tokens": 4}
    b.update(kw)
    return b


def test_limits(served):
    p = served.post
    # body size: declared and actual
    big = _body(documents=[{"text": "x" * 1500}] * 50)
    assert_openai_error(p("/v1/chat/completions", big), 413, "request_too_large")

    def chunked():
        yield json.dumps(big).encode()

    assert_openai_error(p("/v1/chat/completions", content=chunked(), headers={"content-type": "application/json"}),
                        413, "request_too_large")
    # passage count and length
    err = assert_openai_error(p("/v1/chat/completions", _body(documents=["a"] * 9)), 400, "too_many_documents")
    assert err["param"] == "documents"
    assert_openai_error(p("/v1/chat/completions", _body(documents=["a"] * 5, contexts=["b"] * 4)), 400,
                        "too_many_documents")
    err = assert_openai_error(p("/v1/chat/completions", _body(documents=["ok", {"text": "y" * 2001}])), 400,
                              "document_too_long")
    assert err["param"] == "documents[1].text"
    # question, max_tokens, stop, n, nbce.k
    assert_openai_error(p("/v1/chat/completions", _body(messages=[{"role": "user", "content": "q" * 501}])), 400,
                        "question_too_long")
    assert_openai_error(p("/v1/completions", {"prompt": "q" * 501}), 400, "question_too_long")
    assert_openai_error(p("/v1/chat/completions", _body(max_tokens=129)), 400, "max_tokens_too_large")
    assert_openai_error(p("/v1/chat/completions", _body(max_tokens=0, max_completion_tokens=None)), 400)
    assert_openai_error(p("/v1/chat/completions", _body(max_completion_tokens=500)), 400, "max_tokens_too_large")
    assert_openai_error(p("/v1/chat/completions", _body(stop=["a", "b", "c", "d", "e"])), 400)
    assert_openai_error(p("/v1/chat/completions", _body(n=2)), 400)
    assert_openai_error(p("/v1/chat/completions", _body(nbce={"k": 9})), 400)
    # the openai client surfaces them as BadRequestError
    with pytest.raises(openai.BadRequestError) as ei:
        chat(served, docs=["a"] * 9, max_tokens=4)
    assert ei.value.code == "too_many_documents"
    served.wait_idle()
    assert httpx.get(served.base + "/health").json()["status"] == "ok"


def test_malformed_and_invalid_requests(served):
    p = served.post
    served.wait_idle()
    failed_before = served.worker.stats["failed"]
    hdr = {"content-type": "application/json"}
    assert_openai_error(p("/v1/chat/completions", content=b'{"messages": [', headers=hdr), 400, "invalid_json")
    assert_openai_error(p("/v1/chat/completions", content=b"\xff\xfe", headers=hdr), 400, "invalid_json")
    assert_openai_error(p("/v1/chat/completions", content=b"", headers=hdr), 400, "invalid_json")
    assert_openai_error(p("/v1/chat/completions", content=b"[1, 2]", headers=hdr), 400, "invalid_json")
    assert_openai_error(p("/v1/completions", content=b"nope", headers=hdr), 400, "invalid_json")
    assert_openai_error(p("/v1/embeddings", content=b"{", headers=hdr), 400, "invalid_json")
    err = assert_openai_error(p("/v1/chat/completions", {"model": MODEL}), 400)
    assert err["param"] == "messages"
    err = assert_openai_error(p("/v1/chat/completions", _body(documents=[{"title": "no text"}])), 400)
    assert err["param"] == "documents.0.text"
    assert_openai_error(p("/v1/chat/completions", _body(max_tokens="many")), 400)
    assert_openai_error(p("/v1/chat/completions", _body(messages=[])), 400)
    assert_openai_error(p("/v1/chat/completions", _body(messages=[{"role": "system", "content": "hi"}])), 400)
    assert_openai_error(p("/v1/chat/completions", _body(messages=[{"role": "user", "content": "   "}])), 400)
    assert_openai_error(p("/v1/chat/completions", _body(
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])), 400,
        "unsupported_content")
    assert_openai_error(p("/v1/chat/completions", _body(temperature=3)), 400)
    assert_openai_error(p("/v1/chat/completions", _body(top_p=0)), 400)
    assert_openai_error(p("/v1/chat/completions", _body(logprobs=True)), 400)
    assert assert_openai_error(p("/v1/chat/completions", _body(nbce={"pooling": "nope"})), 400)["param"] == "nbce.pooling"
    assert assert_openai_error(p("/v1/chat/completions", _body(nbce={"beta": -5})), 400)["param"] == "nbce.beta"
    assert_openai_error(p("/v1/chat/completions", _body(nbce={"unknown": 1})), 400)
    assert_openai_error(p("/v1/completions", {"prompt": ["a", "b"]}), 400)
    assert_openai_error(p("/v1/completions", {"prompt": [1, 2, 3]}), 400)
    assert_openai_error(p("/v1/completions", {"prompt": "x", "echo": True}), 400)
    # a question too long for the model's window (512 tokens) -> context_length_exceeded
    assert_openai_error(p("/v1/completions", {"prompt": "q!z~" * 120, "max_tokens": 128}), 400,
                        "context_length_exceeded")
    assert_openai_error(httpx.get(served.base + "/v1/nothing"), 404, "not_found")
    assert_openai_error(httpx.get(served.base + "/v1/chat/completions"), 405)
    # unknown OpenAI parameters are accepted and ignored
    r = p("/v1/chat/completions", _body(frequency_penalty=0.5, presence_penalty=0, user="u", logit_bias={}))
    assert r.status_code == 200, r.text
    served.wait_idle()
    # the window overflow (and only it) failed in the worker, which lived on
    assert served.worker.stats["failed"] - failed_before == 1


def test_prompt_over_max_prompt_tokens_is_context_length_exceeded(tiny_chat_decoder, pipe):
    """``--max-prompt-tokens``: a request whose rows hold more prompt tokens than the limit is a
    400 ``context_length_exceeded`` (streamed or not), one at the limit is answered."""
    at_limit = ask(pipe, passages=PASSAGES[:2], max_new_tokens=4)
    limit = at_limit.prompt_tokens
    assert ask(pipe, max_new_tokens=4).prompt_tokens > limit  # all three documents: over it
    s = Served(create_app(RAGPipeline(tiny_chat_decoder), model_name=MODEL,
                          limits=ServerLimits(max_prompt_tokens=limit, max_tokens=64)))
    try:
        err = assert_openai_error(s.post("/v1/chat/completions", _body(documents=DOCS)), 400, "context_length_exceeded")
        assert err["param"] == "documents" and str(limit) in err["message"]
        assert_openai_error(s.post("/v1/chat/completions", _body(documents=DOCS, stream=True)), 400,
                            "context_length_exceeded")
        with pytest.raises(openai.BadRequestError) as ei:
            chat(s, max_tokens=4)
        assert ei.value.code == "context_length_exceeded"
        r = s.post("/v1/chat/completions", _body(documents=DOCS[:2], max_tokens=4))
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == limit
        assert r.json()["choices"][0]["message"]["content"] == at_limit.text
        s.wait_idle()
        assert s.worker.stats["failed"] == 3 and s.worker.stats["completed"] == 1  # the worker lived on
    finally:
        s.close()


# ----------------------------------------------------------------------------- concurrency
def test_16_concurrent_clients_no_interleaving(served, pipe):
    cases = []
    for i in range(16):
        q = ["Where is the tower?", "How high is the mountain?", "Which river flows through London?",
             "What is rich in potassium?"][i % 4] + f" ({i})"
        docs = [{"text": DOCS[(i + j) % 3]["text"]} for j in range(1 + i % 3)]
        cases.append((q, docs, i % 2 == 0))
    expected = [pipe.ask(q, [d["text"] for d in docs], max_new_tokens=12).text for q, docs, _ in cases]
    assert len(set(expected)) > 4

    async def one(client, q, docs, stream):
        kw = dict(model=MODEL, messages=[{"role": "user", "content": q}], max_tokens=12,
                  extra_body={"documents": docs})
        if stream:
            out = []
            async for ch in await client.chat.completions.create(stream=True, **kw):
                if ch.choices and ch.choices[0].delta.content:
                    out.append(ch.choices[0].delta.content)
            return "".join(out)
        r = await client.chat.completions.create(**kw)
        return r.choices[0].message.content

    async def main():
        client = served.aclient()
        try:
            return await asyncio.gather(*(one(client, *c) for c in cases))
        finally:
            await client.close()

    before = dict(served.worker.stats)
    got = asyncio.run(main())
    assert got == expected
    served.wait_idle()
    after = served.worker.stats
    assert after["completed"] - before["completed"] == 16
    assert after["failed"] == before["failed"] and after["rejected"] == before["rejected"]


# ----------------------------------------------------------------------------- queue, timeout, disconnect
def _stream_first_chunk(base: str, max_tokens: int, holder: dict):
    """Open a stream, read its first content chunk, then wait for holder['close'] and drop it."""
    with httpx.Client(timeout=WAIT) as c:
        with c.stream("POST", base + "/v1/chat/completions",
                      json=_body(max_tokens=max_tokens, stream=True)) as r:
            holder["status"] = r.status_code
            lines = r.iter_lines()  # keep a reference: a collected iterator would close the connection
            for line in lines:
                if '"content":"t' in line:
                    break
            holder["opened"].set()
            holder["close"].wait(WAIT)


def _post_then_leave(served: "Served", body: dict, running: threading.Event) -> None:
    """A non-streaming client that sends its request, waits until ``running`` says the worker
    is on it, then closes its connection without reading the answer."""
    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", served.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
        assert running.wait(WAIT), "the worker never started the request"


def test_disconnect_mid_stream_frees_the_worker(tiny_chat_decoder):
    slow = SlowPipeline(tiny_chat_decoder, delay=0.01)
    s = Served(create_app(slow, model_name=MODEL, limits=ServerLimits(max_tokens=ENDLESS)))
    try:
        holder = {"opened": threading.Event(), "close": threading.Event()}
        t = threading.Thread(target=_stream_first_chunk, args=(s.base, ENDLESS, holder))  # ends only if cancelled
        t.start()
        assert holder["opened"].wait(WAIT) and holder["status"] == 200
        holder["close"].set()
        t.join(WAIT)
        s.wait_idle()  # the worker let the endless stream go
        assert s.worker.stats["cancelled"] == 1 and s.worker.stats["completed"] == 0
        assert len(slow.produced) == 1 and slow.produced[0] < ENDLESS  # the stream was closed, not finished
        # the next request is served
        r = s.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "q"}], max_tokens=3)
        assert r.choices[0].message.content == "t0 t1 t2 "
        s.wait_idle()
        assert s.worker.stats["completed"] == 1
        # a non-streaming client that gives up is cancelled as well
        slow.started.clear()
        _post_then_leave(s, _body(max_tokens=ENDLESS), slow.started)
        s.wait_idle()
        assert s.worker.stats["cancelled"] == 2 and s.worker.stats["completed"] == 1
        assert len(slow.produced) == 3 and slow.produced[-1] < ENDLESS
    finally:
        s.close()


def test_queue_full_answers_503(tiny_chat_decoder):
    slow = SlowPipeline(tiny_chat_decoder, delay=0.01)
    s = Served(create_app(slow, model_name=MODEL, limits=ServerLimits(max_tokens=ENDLESS, max_queue=1)))
    try:
        holder = {"opened": threading.Event(), "close": threading.Event()}
        a = threading.Thread(target=_stream_first_chunk, args=(s.base, ENDLESS, holder))
        a.start()
        assert holder["opened"].wait(WAIT)  # A holds the worker until it goes away
        res = {}
        b = threading.Thread(target=lambda: res.setdefault("b", s.post("/v1/chat/completions", _body(max_tokens=3),
                                                                       timeout=WAIT)))
        b.start()
        wait_until(lambda: s.worker.queued >= 1, "B waits in the queue")
        assert_openai_error(s.post("/v1/chat/completions", _body(max_tokens=3)), 503, "server_overloaded")
        with pytest.raises(openai.InternalServerError):
            s.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "q"}], max_tokens=3)
        holder["close"].set()  # A goes away; B is served
        a.join(WAIT)
        b.join(WAIT)
        assert res["b"].status_code == 200 and res["b"].json()["choices"][0]["message"]["content"] == "t0 t1 t2 "
        assert s.worker.stats["rejected"] == 2
    finally:
        s.close()


def test_request_timeout(tiny_chat_decoder):
    slow = SlowPipeline(tiny_chat_decoder, delay=0.01)
    s = Served(create_app(slow, model_name=MODEL, limits=ServerLimits(max_tokens=ENDLESS, request_timeout_s=0.5)))
    try:
        # the request cannot finish, so only the timeout can end it
        err = assert_openai_error(s.post("/v1/chat/completions", _body(max_tokens=ENDLESS), timeout=WAIT), 504,
                                  "timeout", "timeout")
        assert "timeout" in err["message"]
        s.wait_idle()  # the worker dropped it
        assert s.worker.stats["timed_out"] == 1 and s.worker.stats["completed"] == 0
        # a stream that already started ends with an OpenAI-format error event and [DONE]
        with pytest.raises(openai.APIError) as ei:
            for _ in s.client(timeout=WAIT).chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "q"}], max_tokens=ENDLESS, stream=True):
                pass
        assert "timeout" in str(ei.value)
        s.wait_idle()
        assert s.worker.stats["timed_out"] == 2 and s.worker.stats["completed"] == 0
        assert all(n < ENDLESS for n in slow.produced)
        r = s.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "q"}], max_tokens=3)
        assert r.choices[0].message.content == "t0 t1 t2 "
    finally:
        s.close()


# ----------------------------------------------------------------------------- the step scheduler
class ForwardGate:
    """A decoder over the same tiny model whose every forward pass (a prefill chunk or a decode
    step) goes through a gate the test drives, in the worker thread:

    * ``before(n)``: called before the n-th forward (None: nothing);
    * while ``held`` is set, each forward announces itself on ``arrived`` and waits for a permit
      (``step()`` gives one; ``open()`` clears ``held`` and lets the waiting one go). While a
      forward waits, the worker is stopped at a known point and its state can be read."""

    def __init__(self, decoder):
        from nbce_rag import NBCEDecoder

        self.decoder = NBCEDecoder(decoder.model, decoder.tokenizer, decoder.config, scorer=decoder.scorer)
        self.before = None
        self.held = threading.Event()
        self.arrived: "queue.Queue[int]" = queue.Queue()
        self._permits = threading.Semaphore(0)
        self.calls = 0
        forward = self.decoder._forward

        def gated(*a, **kw):
            self.calls += 1
            if self.before is not None:
                self.before(self.calls)
            if self.held.is_set():
                self.arrived.put(self.calls)
                if not self._permits.acquire(timeout=WAIT):
                    raise RuntimeError("the test never let this forward pass go")
            return forward(*a, **kw)

        self.decoder._forward = gated

    def wait(self) -> int:
        """Until a forward waits at the gate; returns its number."""
        return self.arrived.get(timeout=WAIT)

    def step(self) -> None:
        self._permits.release()

    def open(self) -> None:
        self.held.clear()
        self._permits.release()


def test_concurrent_requests_share_steps_and_errors_stay_apart(tiny_chat_decoder):
    gate = ForwardGate(tiny_chat_decoder)
    rag = RAGPipeline(gate.decoder)
    s = Served(create_app(rag, limits=LIMITS, model_name=MODEL))
    cases = [(f"Question {i}: where is the tower?", [d["text"] for d in DOCS[: 1 + i % 3]],
              dict(max_tokens=6 + i, **({"seed": i, "temperature": 0.9} if i % 2 else {})))
             for i in range(8)]
    expected = [ask(RAGPipeline(tiny_chat_decoder), q, docs, max_new_tokens=o["max_tokens"],
                    **({"do_sample": True, "seed": o["seed"], "temperature": 0.9} if "seed" in o else {})).text
                for q, docs, o in cases]
    # the first forward waits until all 9 requests are in the worker's hands: they overlap for sure
    submitted, all_in = [], threading.Event()
    submit = s.worker.submit

    def counting_submit(job):
        submit(job)
        submitted.append(job)
        if len(submitted) == 1 + len(cases):
            all_in.set()

    s.worker.submit = counting_submit
    gate.before = lambda n: n == 1 and all_in.wait(WAIT)

    async def one(client, q, docs, o, stream):
        kw = dict(model=MODEL, messages=[{"role": "user", "content": q}], extra_body={"documents": docs}, **o)
        if stream:
            out = []
            async for ch in await client.chat.completions.create(stream=True, **kw):
                if ch.choices and ch.choices[0].delta.content:
                    out.append(ch.choices[0].delta.content)
            return "".join(out)
        return (await client.chat.completions.create(**kw)).choices[0].message.content

    async def failing(client):  # too long for the window: fails in the worker, among the others
        with pytest.raises(openai.BadRequestError) as ei:
            await client.completions.create(model=MODEL, prompt="q!z~" * 120, max_tokens=128)
        return ei.value.code

    async def main():
        client = s.aclient()
        try:
            return await asyncio.gather(failing(client), *(one(client, *c, i % 2 == 0) for i, c in enumerate(cases)))
        finally:
            await client.close()

    try:
        code, *got = asyncio.run(main())
        assert all_in.is_set()
        assert code == "context_length_exceeded"
        assert got == expected
        s.wait_idle()
        sched = s.worker.scheduler
        # 8 answers of 6..13 tokens took far fewer iterations than tokens: they shared steps
        assert sched.steps < 0.6 * sum(6 + i for i in range(8))
        assert s.worker.stats["completed"] == 8 and s.worker.stats["failed"] == 1 and sched.batch.rows == 0
    finally:
        s.close()


def test_disconnect_frees_its_rows_at_the_next_step(tiny_chat_decoder, monkeypatch):
    from nbce_rag.integrations.server import worker as worker_mod

    texted = set()  # jobs that have sent a token with text to their client
    push = worker_mod.Job.push

    def watched_push(job, kind, value=None):
        if kind == "event" and getattr(value, "text", ""):
            texted.add(id(job))
        return push(job, kind, value)

    monkeypatch.setattr(worker_mod.Job, "push", watched_push)
    gate = ForwardGate(tiny_chat_decoder)
    gate.held.set()  # the test runs every forward pass of this server
    rag = RAGPipeline(gate.decoder)
    s = Served(create_app(rag, limits=ServerLimits(max_tokens=400), model_name=MODEL))
    try:
        res = {}
        other = threading.Thread(target=lambda: res.setdefault("r", s.post(
            "/v1/chat/completions", _body(max_tokens=60, documents=DOCS[:2]), timeout=WAIT)))
        holder = {"opened": threading.Event(), "close": threading.Event()}

        def streamer():  # closed-book (1 row), 400 tokens; reads one content chunk, then goes away
            with httpx.Client(timeout=WAIT) as c:
                with c.stream("POST", s.base + "/v1/chat/completions", json=_body(max_tokens=400, stream=True)) as r:
                    holder["status"] = r.status_code
                    lines = r.iter_lines()
                    for line in lines:
                        if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                            break
                    holder["opened"].set()
                    holder["close"].wait(WAIT)

        t = threading.Thread(target=streamer, daemon=True)
        other.start()
        t.start()
        sched = s.worker.scheduler
        gate.wait()  # the worker is at its first forward
        wait_until(lambda: len(s.worker._active) + s.worker.queued == 2, "both requests reached the worker")

        def streaming_job():
            mine = [j for j in s.worker._active.values() if j.state is not None and j.state.n_rows == 1]
            return mine[0] if mine else None

        # step until both decode (1 row + (1 + 2 passages) rows) and the streamer has sent a token
        while not (sched.batch.rows == 1 + 3 and streaming_job() is not None and id(streaming_job()) in texted):
            gate.step()
            gate.wait()
        job = streaming_job()
        assert holder["opened"].wait(WAIT) and holder["status"] == 200
        holder["close"].set()
        t.join(WAIT)
        assert job.cancel.wait(WAIT), "the server did not notice the client leave"
        assert s.worker.stats["cancelled"] == 0 and sched.batch.rows == 4  # the worker is still held
        # the step it was in finishes (one forward per lane), then its rows leave
        for _ in range(2):
            gate.step()
            gate.wait()
            if s.worker.stats["cancelled"]:
                break
        assert s.worker.stats["cancelled"] == 1, "the disconnected stream kept its rows"
        assert sched.batch.rows == 3 and s.worker.active == 1  # only the other request's rows are left
        gate.open()
        other.join(WAIT)
        r = res["r"]
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"] == ask(
            RAGPipeline(tiny_chat_decoder), Q, PASSAGES[:2], max_new_tokens=60).text
        s.wait_idle()
        assert sched.batch.rows == 0 and s.worker.stats["completed"] == 1
    finally:
        gate.open()
        s.close()


def test_huge_prefill_times_out_and_the_next_request_is_served(tiny_chat_decoder, monkeypatch):
    """A request whose prefill takes over a hundred chunks passes its deadline mid-prefill: the
    worker drops it at the next iteration (504) and serves the next request. The worker's clock
    jumps past the deadline at the huge request's second forward (admission may take any time)."""
    from types import SimpleNamespace

    from nbce_rag.integrations.server import worker as worker_mod

    shift = [0.0]
    monkeypatch.setattr(worker_mod, "time", SimpleNamespace(monotonic=lambda: time.monotonic() + shift[0]))
    gate = ForwardGate(tiny_chat_decoder)
    rag = RAGPipeline(gate.decoder)
    limits = ServerLimits(max_documents=64, max_document_chars=2000, max_prompt_tokens=10**6, max_row_tokens=16,
                          prefill_tokens=64, request_timeout_s=WAIT, max_tokens=64)
    s = Served(create_app(rag, limits=limits, model_name=MODEL))
    seen = {"after_deadline": 0}  # the huge request, seen from inside its forward passes

    def before(n):
        (job,) = s.worker._active.values()
        seen["job"], seen["rows"] = job, job.state.n_rows
        if n == 2:  # mid-prefill: the deadline passes
            shift[0] = 2 * WAIT
        if shift[0]:
            seen["after_deadline"] += 1

    gate.before = before
    try:
        text = " ".join(d["text"] for d in DOCS)
        huge = _body(max_tokens=64, documents=[(f"({i}) " + text * 20)[:2000] for i in range(8)])
        assert_openai_error(s.post("/v1/chat/completions", huge, timeout=WAIT), 504, "timeout", "timeout")
        s.wait_idle()
        assert s.worker.stats["timed_out"] == 1, s.worker.stats
        # its rows left within the iteration the deadline passed in: of the 100+ prefill chunks
        # (4 rows of 16 tokens each) it needs, the one running then and at most one more forward
        assert seen["rows"] > 100 and seen["after_deadline"] <= 2 and gate.calls <= 3
        gate.before = None
        shift[0] = 0.0
        r = s.post("/v1/chat/completions", _body(max_tokens=8, documents=DOCS), timeout=WAIT)
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"] == ask(RAGPipeline(tiny_chat_decoder), max_new_tokens=8).text
    finally:
        s.close()


# ----------------------------------------------------------------------------- protocol checks
def test_content_type_json_depth_model_and_unsupported_parameters(served):
    p = served.post
    body = json.dumps(_body()).encode()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        assert_openai_error(p("/v1/chat/completions", content=body, headers={"content-type": ctype}), 415,
                            "unsupported_media_type")
    assert_openai_error(p("/v1/chat/completions", content=body), 415, "unsupported_media_type")  # no type
    r = p("/v1/chat/completions", content=body, headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200, r.text
    # structured-syntax JSON types (RFC 6839 "+json") are JSON too; only application/ ones
    for ctype in ("application/vnd.api+json", "application/merge-patch+json; charset=utf-8", "Application/LD+JSON"):
        r = p("/v1/chat/completions", content=body, headers={"content-type": ctype})
        assert r.status_code == 200, (ctype, r.text)
        assert r.json()["object"] == "chat.completion"
    for ctype in ("text/x+json", "application/jsonx", "application/json-seq"):
        assert_openai_error(p("/v1/chat/completions", content=body, headers={"content-type": ctype}), 415,
                            "unsupported_media_type")
    hdr = {"content-type": "application/json"}
    for depth in (40, 15_000):
        deep = b'{"model": "nbce-test", "x": ' + b"[" * depth + b"]" * depth + b"}"
        err = assert_openai_error(p("/v1/chat/completions", content=deep, headers=hdr), 400, "invalid_json")
        assert "deep" in err["message"]
    assert p("/v1/chat/completions", content=json.dumps(_body(x=[[["a \\\" [[[["]]])), headers=hdr).status_code == 200
    # unknown model: 404 in OpenAI's format; omitted: the served model
    err = assert_openai_error(p("/v1/chat/completions", _body(model="gpt-4o")), 404, "model_not_found")
    assert err["param"] == "model" and MODEL in err["message"]
    with pytest.raises(openai.NotFoundError):
        served.client().chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": Q}])
    assert_openai_error(p("/v1/completions", {"model": "other", "prompt": "q"}), 404, "model_not_found")
    no_model = _body()
    del no_model["model"]
    assert p("/v1/chat/completions", no_model).status_code == 200
    # tools and structured output: 400, never silently ignored
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    for extra, param in ((dict(tools=[tool]), "tools"), (dict(tool_choice="auto"), "tool_choice"),
                         (dict(functions=[tool["function"]]), "functions"),
                         (dict(response_format={"type": "json_object"}), "response_format"),
                         (dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "response_format")):
        err = assert_openai_error(p("/v1/chat/completions", _body(**extra)), 400, "unsupported_parameter")
        assert err["param"] == param and "not supported" in err["message"]
    for ok in (dict(response_format={"type": "text"}), dict(tool_choice="none"), dict(tools=[])):
        assert p("/v1/chat/completions", _body(**ok)).status_code == 200


def test_model_aliases(pipe):
    s = Served(create_app(pipe, limits=LIMITS, model_name="main", aliases=["alias-1"]))
    try:
        r = s.post("/v1/chat/completions", _body(model="alias-1", max_tokens=2))
        assert r.status_code == 200 and r.json()["model"] == "main"
        assert httpx.get(s.base + "/v1/models/alias-1").status_code == 200
        assert_openai_error(httpx.get(s.base + "/v1/models/nope"), 404, "model_not_found")
        assert_openai_error(s.post("/v1/chat/completions", _body(model=MODEL)), 404, "model_not_found")
    finally:
        s.close()


def test_host_header_is_checked_when_asked(pipe):
    from nbce_rag.commands.serve import allowed_hosts

    s = Served(create_app(pipe, limits=LIMITS, model_name=MODEL, allowed_hosts=allowed_hosts("127.0.0.1", None, None)))
    try:
        assert s.post("/v1/chat/completions", _body(max_tokens=2)).status_code == 200  # Host: 127.0.0.1:port
        for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example"):
            err = assert_openai_error(s.post("/v1/chat/completions", _body(), headers={"host": host}), 400,
                                      "invalid_host")
            assert "--allowed-hosts" in err["message"]
            assert httpx.get(s.base + "/health", headers={"host": host}).status_code == 400
        assert s.post("/v1/chat/completions", _body(max_tokens=2), headers={"host": "localhost:1234"}).status_code == 200
    finally:
        s.close()
    assert sorted(allowed_hosts("localhost", None, None)) == ["127.0.0.1", "::1", "localhost"]
    assert allowed_hosts("127.0.0.1", "key", None) is None  # a key protects it
    assert allowed_hosts("0.0.0.0", None, None) is None
    assert allowed_hosts("127.0.0.1", None, ["my.host"]) == ["my.host"]


def test_allowed_hosts_widens_the_check_and_star_allows_any(pipe):
    """``nbce-rag serve --allowed-hosts``: the names given (and only them) replace the loopback
    names; ``*`` lets any Host through."""
    from nbce_rag.cli import build_parser
    from nbce_rag.commands.serve import allowed_hosts

    def served_with(*cli):
        args = build_parser().parse_args(["serve", *cli])
        return Served(create_app(pipe, limits=LIMITS, model_name=MODEL,
                                 allowed_hosts=allowed_hosts(args.host, args.api_key, args.allowed_hosts)))

    s = served_with("--allowed-hosts", "api.example", "Other.Example")
    try:
        for host in ("api.example", "api.example:8000", "other.example"):
            assert s.post("/v1/chat/completions", _body(max_tokens=2), headers={"host": host}).status_code == 200, host
        for host in ("evil.example", "127.0.0.1", "localhost:8000"):  # the loopback names are replaced
            assert_openai_error(s.post("/v1/chat/completions", _body(), headers={"host": host}), 400, "invalid_host")
    finally:
        s.close()
    s = served_with("--allowed-hosts", "*")
    try:
        for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "[::1]:80"):
            r = s.post("/v1/chat/completions", _body(max_tokens=2), headers={"host": host})
            assert r.status_code == 200, (host, r.text)
        assert httpx.get(s.base + "/health", headers={"host": "anything.example"}).status_code == 200
    finally:
        s.close()


# ----------------------------------------------------------------------------- CLI
def test_serve_command_is_registered():
    from nbce_rag.cli import build_parser

    args = build_parser().parse_args(["serve", "--index", "idx", "--port", "9999", "--api-key", "k",
                                      "--max-documents", "5", "--timeout", "10"])
    assert args.command == "serve" and args.port == 9999 and args.api_key == "k"
    assert args.host == "127.0.0.1" and args.max_documents == 5 and args.timeout == 10.0
    args = build_parser().parse_args(["serve", "--served-model-name", "a", "b", "--allowed-hosts", "h",
                                      "--max-active", "4", "--prefill-tokens", "128"])
    assert args.model_name == ["a", "b"] and args.allowed_hosts == ["h"] and args.max_active == 4
    assert build_parser().parse_args(["serve", "--model-name", "x"]).model_name == ["x"]
