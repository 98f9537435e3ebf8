"""``GET /metrics`` of the OpenAI-compatible server: Prometheus text that parses with
prometheus_client's own parser, and counters that move with the requests (tokens, cached
tokens from the passage KV cache, time to first token, requests by status)."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from nbce_rag import NBCEDecoder, RAGPipeline  # noqa: E402
from nbce_rag.decoding.kvcache import PassageKVCache  # noqa: E402
from nbce_rag.integrations.server import create_app  # noqa: E402

DOCS = [{"title": "Eiffel", "text": "The Eiffel Tower is in Paris and was completed in 1889."},
        {"text": "Mount Everest is the highest mountain above sea level."}]


def scrape(client) -> dict:
    """``{(name, frozenset(labels)): value}`` of every sample /metrics returns."""
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def client(tiny_chat_decoder):
    # a private passage KV cache: the hit counts below do not depend on other tests
    dec = NBCEDecoder(tiny_chat_decoder.model, tiny_chat_decoder.tokenizer, tiny_chat_decoder.config,
                      kv_cache=PassageKVCache(max_bytes="64MiB"), scorer=None)
    with TestClient(create_app(RAGPipeline(dec), encoder=False, model_name="m")) as c:
        yield c


def ask(client, question: str, stream: bool = False):
    body = {"model": "m", "messages": [{"role": "user", "content": question}], "documents": DOCS,
            "max_tokens": 6, "stream": stream}
    return client.post("/v1/chat/completions", json=body)


def test_metrics_parse_and_counters_move(client):
    before = scrape(client)
    r = ask(client, "When was the tower completed?")
    assert r.status_code == 200
    u1 = r.json()["usage"]
    r = ask(client, "Where is the tower?", stream=True)
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    r2 = ask(client, "How high is the mountain?")
    u2 = r2.json()["usage"]
    assert u2["prompt_tokens_details"]["cached_tokens"] > 0  # the passages' KV came from the cache
    bad = client.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert bad.status_code == 404
    after = scrape(client)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    path = "/v1/chat/completions"
    assert delta("nbce_rag_http_requests_total", method="POST", path=path, status="200") == 3
    assert delta("nbce_rag_http_requests_total", method="POST", path=path, status="404") == 1
    assert delta("nbce_rag_requests_total", outcome="completed") == 3
    assert delta("nbce_rag_prompt_tokens_total") >= u1["prompt_tokens"] + u2["prompt_tokens"]
    assert delta("nbce_rag_cached_prompt_tokens_total") >= u2["prompt_tokens_details"]["cached_tokens"]
    gen = delta("nbce_rag_generation_tokens_total")
    assert u1["completion_tokens"] + u2["completion_tokens"] < gen <= 3 * 6
    assert delta("nbce_rag_time_to_first_token_seconds_count") == 3
    assert delta("nbce_rag_time_per_output_token_seconds_count") == gen - 3
    assert delta("nbce_rag_rows_per_step_count") > 0
    assert delta("nbce_rag_rows_per_step_sum") >= 3 * 3  # each request: 2 passage rows + the no-passage row
    ratio = value(after, "nbce_rag_passage_kv_hit_ratio")
    assert ratio == pytest.approx(value(after, "nbce_rag_cached_prompt_tokens_total")
                                  / value(after, "nbce_rag_prompt_tokens_total"))
    assert 0 < ratio < 1
    assert value(after, "nbce_rag_queue_depth") == 0


def test_registries_are_per_app(tiny_chat_decoder):
    """Two apps in one process count apart (no global registry)."""
    a = create_app(RAGPipeline(tiny_chat_decoder), encoder=False)
    b = create_app(RAGPipeline(tiny_chat_decoder), encoder=False)
    assert a.state.nbce.metrics.registry is not b.state.nbce.metrics.registry
    with TestClient(a) as ca, TestClient(b) as cb:
        assert ca.get("/v1/models").status_code == 200
        assert value(scrape(ca), "nbce_rag_http_requests_total", method="GET", path="/v1/models", status="200") == 1
        assert value(scrape(cb), "nbce_rag_http_requests_total", method="GET", path="/v1/models", status="200") == 0


def test_replica_series_merge_into_one_scrape():
    """The Ray Serve ingress adds its decoder replicas' series: one family per name, every
    sample labelled with its tier and replica (parses, and nothing is lost)."""
    from nbce_rag.integrations.server.metrics import ServerMetrics

    ingress, d1, d2 = ServerMetrics(), ServerMetrics(), ServerMetrics()
    ingress.outcome("completed")
    d1.outcome("completed")
    d1.step(3)
    d2.outcome("failed")
    text = ingress.render([({"tier": "decoder", "replica": "a"}, d1.families()),
                           ({"tier": "decoder", "replica": "b"}, d2.families())]).decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    got = {(s.labels["replica"], s.labels["outcome"]): s.value for s in fams["nbce_rag_requests"].samples
           if s.name == "nbce_rag_requests_total"}
    assert got == {("ingress", "completed"): 1, ("a", "completed"): 1, ("b", "failed"): 1}
    rows = [s for s in fams["nbce_rag_rows_per_step"].samples if s.name == "nbce_rag_rows_per_step_count"]
    assert {s.labels["replica"]: s.value for s in rows} == {"ingress": 0, "a": 1, "b": 0}
    assert text.count("# TYPE nbce_rag_requests_total counter") == 1
