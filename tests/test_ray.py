"""Scale-out on Ray Serve (``nbce_rag.integrations.server.ray_app``), on one local Ray cluster
shared by the module: an ingress (retriever tier) and two decoder replicas of the tiny random
Llama of ``conftest.py`` (saved to a directory, so every replica and the single-process
reference load the same weights).

Checked: answers through Ray equal the single-process server's token for token (chat, text
completions, streaming, ``documents``, the server's index); the same documents with different
questions reach the same decoder replica and report cached tokens from the second request on;
different document sets spread over both replicas; a killed decoder replica -> the following
requests succeed (retried on the other replica, Ray restarts it); ``/metrics`` shows every
replica; bad deployment options are a clear error before anything starts."""

from __future__ import annotations

import json
import socket
import time

import pytest

serve = pytest.importorskip("ray.serve")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

import ray  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from nbce_rag import RAGPipeline  # noqa: E402
from nbce_rag.errors import ConfigError  # noqa: E402
from nbce_rag.integrations.server import ServerLimits, create_app  # noqa: E402
from nbce_rag.integrations.server.ray_app import ScaleOutOptions, build_app  # noqa: E402
from nbce_rag.integrations.server.ray_router import passage_key, rendezvous_owner  # noqa: E402

MODEL = "nbce-test"
#: max_active=1: a second request to a busy replica waits in its queue (the fault test needs one)
LIMITS = ServerLimits(max_queue=16, request_timeout_s=60, max_active=1)
CORPUS = [
    "The Eiffel Tower is in Paris and was completed in 1889.",
    "Gustave Eiffel's company designed and built the tower for the World's Fair.",
    "Mount Everest is the highest mountain above sea level.",
    "Bananas are rich in potassium and grow in tropical climates.",
    "The river Thames flows through London into the North Sea.",
    "Water boils at one hundred degrees Celsius at sea level.",
]
#: document sets, each asked several questions
SETS = [[{"title": f"doc {i}", "text": CORPUS[i]}, {"text": CORPUS[(i + 1) % 6]}] for i in range(6)]
QUESTIONS = ["When was the tower completed?", "Where is it?", "Who built it?"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A saved tiny chat model and a saved index over CORPUS (a tiny CoSENT encoder)."""
    from conftest import make_tiny_encoder, make_tokenizer, save_tiny_llama
    from nbce_rag.retrieval.index import VectorIndex

    root = tmp_path_factory.mktemp("ray_assets")
    tok = make_tokenizer(chat=True)
    save_tiny_llama(root / "model", tok, seed=1)
    enc = make_tiny_encoder(root / "encoder", seed=0)
    idx = VectorIndex.build(enc, [{"id": f"d{i}", "text": t} for i, t in enumerate(CORPUS)], chunk_tokens=32, overlap=4)
    idx.save(root / "index")
    return {"model": str(root / "model"), "index": str(root / "index")}


@pytest.fixture(scope="module")
def reference(assets):
    """The single-process server over the same model and index."""
    rag = RAGPipeline.from_pretrained(index=assets["index"], model=assets["model"], threshold=None, k=3,
                                      device="cpu", scorer=None)
    with TestClient(create_app(rag, limits=LIMITS, model_name=MODEL, encoder=False)) as c:
        yield c


@pytest.fixture(scope="module")
def cluster(assets):
    port = _free_port()
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                                       "TOKENIZERS_PARALLELISM": "false"}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    opts = ScaleOutOptions(replicas=2, decoder_cpus=1, ingress_cpus=0.5, threads=1, imbalanced_threshold=4,
                           max_ongoing_requests=4, index_refresh_s=0.2,
                           health_check_period_s=1, health_check_timeout_s=10, graceful_shutdown_timeout_s=5)
    app = build_app(model=assets["model"], index=assets["index"], threshold=None, k=3, device="cpu", limits=LIMITS,
                    model_name=[MODEL], scorer=None, options=opts)
    handle = serve.run(app, name="nbce", route_prefix="/")
    yield {"base": f"http://127.0.0.1:{port}", "handle": handle}
    serve.shutdown()
    ray.shutdown()


def post(base_or_client, path, body):
    if isinstance(base_or_client, str):
        return httpx.post(base_or_client + path, json=body, timeout=120)
    return base_or_client.post(path, json=body)


def chat_body(question, docs=None, stream=False, max_tokens=8, **kw):
    body = {"model": MODEL, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "stream": stream, **kw}
    if docs is not None:
        body["documents"] = docs
    return body


def streamed_text(resp) -> str:
    assert resp.status_code == 200, resp.text
    out, done = [], False
    for line in resp.text.splitlines():
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            done = True
            continue
        obj = json.loads(data)
        assert "error" not in obj, obj
        for ch in obj["choices"]:
            out.append(ch.get("delta", {}).get("content") or ch.get("text") or "")
    assert done
    return "".join(out)


def stats(cluster):
    """Every decoder replica's stats, through the ingress's handle."""
    return cluster["handle"].replica_stats.remote().result()


# ----------------------------------------------------------------------------- answers
def test_answers_equal_the_single_process_server(cluster, reference):
    base = cluster["base"]
    cases = [
        ("/v1/chat/completions", chat_body("When was the tower completed?", SETS[0])),  # documents
        ("/v1/chat/completions", chat_body("Who built the Eiffel Tower in Paris?")),  # the server's index
        ("/v1/chat/completions", chat_body("Hi", [], max_tokens=5)),  # closed-book
        ("/v1/completions", {"model": MODEL, "prompt": "How high is Everest?", "max_tokens": 6,
                             "documents": SETS[2]}),
    ]
    for path, body in cases:
        ours, ref = post(base, path, body), post(reference, path, body)
        assert ours.status_code == ref.status_code == 200, (ours.text, ref.text)
        a, b = ours.json(), ref.json()
        assert a["choices"][0] == b["choices"][0]
        assert a["usage"]["completion_tokens"] == b["usage"]["completion_tokens"]
        assert a["usage"]["prompt_tokens"] == b["usage"]["prompt_tokens"]
        na, nb = a["nbce"], b["nbce"]
        assert (na["retrieved"], na["supported"]) == (nb["retrieved"], nb["supported"])
        assert [s["n_tokens"] for s in na["sources"]] == [s["n_tokens"] for s in nb["sources"]]
        assert [s["id"] for s in na["sources"]] == [s["id"] for s in nb["sources"]]
    # streaming, chat and text completions
    for path, body in [("/v1/chat/completions", chat_body("Where is it?", SETS[1], stream=True)),
                       ("/v1/chat/completions", chat_body("Who built the tower?", stream=True)),
                       ("/v1/completions", {"model": MODEL, "prompt": "Why?", "max_tokens": 6, "stream": True,
                                            "documents": SETS[3]})]:
        assert streamed_text(post(base, path, body)) == streamed_text(post(reference, path, body))
    # errors keep the OpenAI format and status
    r = post(base, "/v1/chat/completions", chat_body("x", model="nope"))
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = post(base, "/v1/chat/completions", chat_body("x", SETS[0], max_tokens=10_000))
    assert r.status_code == 400 and r.json()["error"]["code"] == "max_tokens_too_large"


def test_same_documents_same_replica_and_cached_tokens(cluster):
    base = cluster["base"]
    docs = [{"title": "Thames", "text": CORPUS[4] + " It is 346 km long."}, {"text": CORPUS[5] + " Really."}]
    cached = []
    for q in QUESTIONS:
        r = post(base, "/v1/chat/completions", chat_body(q, docs, max_tokens=3))
        assert r.status_code == 200, r.text
        cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
    # the first request finds only the shared template prefix (the no-passage row); from the
    # second on, the passages' rows come from the replica's cache too
    assert cached[1] > cached[0] and cached[2] == cached[1], cached
    keys = {passage_key(f"{d['title']}\n{d['text']}" if d.get("title") else d["text"]) for d in docs}
    holders = [s for s in stats(cluster) if keys & set(s["served"])]
    assert len(holders) == 1, holders  # one replica served every request over these documents
    assert all(holders[0]["served"][k] == len(QUESTIONS) for k in keys)


def test_different_document_sets_spread(cluster):
    base = cluster["base"]
    for docs in SETS:
        assert post(base, "/v1/chat/completions", chat_body("What is it?", docs, max_tokens=2)).status_code == 200
    served = [s for s in stats(cluster)]
    assert len(served) == 2
    assert all(s["requests"] > 0 for s in served), served
    # the owners follow rendezvous hashing over the two replica ids
    ids = sorted(s["replica"] for s in served)
    owners = {rendezvous_owner([passage_key(d["title"] + "\n" + d["text"]), passage_key(s2["text"])], ids)
              for d, s2 in SETS}
    assert owners == set(ids)


def test_metrics_show_every_replica(cluster):
    r = httpx.get(cluster["base"] + "/metrics", timeout=60)
    assert r.status_code == 200
    fams = {f.name: f for f in text_string_to_metric_families(r.text)}
    reps = {s.labels["replica"] for s in fams["nbce_rag_prompt_tokens"].samples if s.labels["tier"] == "decoder"}
    assert len(reps) == 2
    total = sum(s.value for s in fams["nbce_rag_requests"].samples
                if s.labels.get("tier") == "decoder" and s.labels.get("outcome") == "completed")
    assert total > 0 and total == sum(s["worker"]["completed"] for s in stats(cluster))
    assert any(s.value > 0 for s in fams["nbce_rag_cached_prompt_tokens"].samples)


def test_ingress_sees_a_new_index_generation_without_restart(cluster, assets):
    """A writer adds a chunk to the shared index directory (under the index's lock); the
    ingress replica loads the new generation on its next retrieval (no restart)."""
    from nbce_rag.retrieval.index import VectorIndex

    new = "Zebras sleep standing up in the open savanna at night."
    body = chat_body(new, max_tokens=2)  # the question is the new chunk's text: its nearest neighbour
    r = post(cluster["base"], "/v1/chat/completions", body)
    assert r.status_code == 200 and new not in [x.get("text") for x in r.json()["nbce"]["sources"]]
    with VectorIndex.edit(assets["index"]) as idx:
        idx.add([{"id": "zebra", "text": new}])
    deadline = time.monotonic() + 30
    while True:
        r = post(cluster["base"], "/v1/chat/completions", body)
        assert r.status_code == 200, r.text
        if any(str(x["id"]).startswith("zebra") for x in r.json()["nbce"]["sources"]):
            break
        assert time.monotonic() < deadline, "the ingress did not load the new index generation"
        time.sleep(0.3)


def test_killed_decoder_replica_then_requests_succeed(cluster):
    """Replica A decodes a long stream and holds a second (non-streaming) request in its queue
    (max_active=1): killing A ends the stream with an OpenAI-format error event, the queued
    request is sent again to B and answered, Ray restarts A, and the next requests succeed."""
    import threading

    base = cluster["base"]
    before = stats(cluster)
    ids = {s["replica"]: s["actor"] for s in before}
    assert len(ids) == 2 and all(ids.values())
    docs = SETS[0]
    keys = [passage_key(docs[0]["title"] + "\n" + docs[0]["text"]), passage_key(docs[1]["text"])]
    victim = rendezvous_owner(keys, sorted(ids))  # the replica these documents go to
    n0 = next(s["requests"] for s in before if s["replica"] == victim)
    first_chunk, lines, results = threading.Event(), [], {}

    def long_stream():
        body = chat_body("Tell me everything.", docs, stream=True, max_tokens=400)  # within 512 positions
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=120) as r:
            results["stream_status"] = r.status_code
            for line in r.iter_lines():
                lines.append(line)
                if '"content"' in line and '"content":""' not in line:
                    first_chunk.set()
        first_chunk.set()

    def queued():
        results["queued"] = post(base, "/v1/chat/completions", chat_body("And then?", docs, max_tokens=3))

    t1 = threading.Thread(target=long_stream)
    t1.start()
    assert first_chunk.wait(60)
    assert results["stream_status"] == 200, lines
    assert not any(line == "data: [DONE]" for line in lines), "the stream ended before the kill; make it longer"
    t2 = threading.Thread(target=queued)
    t2.start()
    deadline = time.monotonic() + 30
    while not any(s["replica"] == victim and s["requests"] >= n0 + 2 for s in stats(cluster)):
        assert time.monotonic() < deadline, "the second request did not reach the replica"
        time.sleep(0.05)
    ray.kill(ray.get_actor(ids[victim], namespace="serve"), no_restart=True)
    t1.join(90)
    t2.join(90)
    assert not t1.is_alive() and not t2.is_alive()
    # the stream had started: an error event in the OpenAI format, then [DONE]
    assert results["stream_status"] == 200
    data = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    assert data[-1].get("error", {}).get("code") == "replica_failed", lines[-3:]
    assert set(data[-1]["error"]) == {"message", "type", "param", "code"}
    assert [x for x in lines if x][-1] == "data: [DONE]"
    # the queued request never started decoding: sent again, answered by the other replica
    assert results["queued"].status_code == 200, results["queued"].text
    # every following request succeeds
    for i, d in enumerate(SETS):
        r = post(base, "/v1/chat/completions", chat_body(f"Question {i}?", d, max_tokens=2))
        assert r.status_code == 200, r.text
    streamed_text(post(base, "/v1/chat/completions", chat_body("Where?", SETS[0], max_tokens=3, stream=True)))
    # Ray restarts the replica
    deadline = time.monotonic() + 90
    while True:
        st = serve.status().applications["nbce"].deployments["NBCEDecoder"]
        if st.status == "HEALTHY" and st.replica_states.get("RUNNING") == 2 and sum(st.replica_states.values()) == 2:
            break
        assert time.monotonic() < deadline, st
        time.sleep(0.5)
    # a new replica took the dead one's place; the ingress's handle learns the new replica set
    # asynchronously (Ray's long poll), so ask until it shows or the same deadline passes
    while len({s["replica"] for s in stats(cluster)} - set(ids)) != 1:
        assert time.monotonic() < deadline, stats(cluster)
        time.sleep(0.5)


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize("bad, words", [
    ({"replicas": 0}, "replicas=0"),
    ({"replicas": "many"}, "replicas='many'"),
    ({"replicas": "auto", "min_replicas": 3, "max_replicas": 2}, "min_replicas <= max_replicas"),
    ({"router": "random"}, "router='random'"),
    ({"decoder_cpus": 0}, "decoder_cpus > 0 or decoder_gpus > 0"),
    ({"imbalanced_threshold": -1}, "imbalanced_threshold=-1"),
])
def test_bad_options_are_a_clear_error_before_anything_starts(bad, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        build_app(options=ScaleOutOptions(**bad))
    with pytest.raises(ConfigError, match="unknown scale-out option"):
        ScaleOutOptions.from_dict({"replica": 2})


@pytest.mark.parametrize("argv, words", [
    (["--replicas", "0"], "replicas=0"),
    (["--replicas", "two"], "--replicas must be a number"),
    (["--replicas", "auto", "--min-replicas", "3", "--max-replicas", "1"], "min_replicas <= max_replicas"),
    (["--replicas", "2", "--decoder-cpus", "0"], "decoder_cpus > 0"),
    (["--replicas", "2", "--index", "/nonexistent/index"], "is not a directory"),
])
def test_serve_replicas_bad_options_exit_2_before_starting(argv, words, capsys):
    from nbce_rag.cli import main

    assert main(["serve", *argv]) == 2
    assert words in capsys.readouterr().err


def test_cluster_resources_are_checked():
    from nbce_rag.integrations.server.ray_app import check_resources

    check_resources(ScaleOutOptions(replicas=2, decoder_cpus=0.5, ingress_cpus=0.5), {"CPU": 2})
    with pytest.raises(ConfigError, match="need 2.5 CPUs; the Ray cluster has 2"):
        check_resources(ScaleOutOptions(replicas=2, decoder_cpus=1, ingress_cpus=0.5), {"CPU": 2})
    with pytest.raises(ConfigError, match="GPUs"):
        check_resources(ScaleOutOptions(replicas=2, decoder_gpus=1), {"CPU": 8, "GPU": 1})


def test_example_serve_config_deploys_as_written():
    """examples/serve_config.yaml is a valid Serve config and its args build the application."""
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from nbce_rag.integrations.server.ray_app import app_builder

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "examples" / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(cfg)
    (app_cfg,) = cfg["applications"]
    assert app_cfg["import_path"] == "nbce_rag.integrations.server.ray_app:app_builder"
    assert app_builder(app_cfg["args"]) is not None
    with pytest.raises(ConfigError, match="unknown application argument"):
        app_builder({**app_cfg["args"], "replicas": 2})
