"""Relevance of unscored passages: the decoder's scorer, the question likelihood read from the
prefill (against a plain unbatched computation), the ``posterior`` pooling (online update
against NumPy, order invariance), no extra forward pass, ``scorer=None`` = the tokens of
before, and the two-document example through every entry point (bundled model, slow)."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nbce_rag import NBCEDecoder, Passage, RAGPipeline
from nbce_rag.decoding.nbce import NEG_FLOOR, PosteriorPooling, get_pooling, nbce_step
from nbce_rag.decoding.scoring import question_loglik

from test_decoder import PASSAGES, reference_generate
from test_nbce_math import np_log_softmax, np_top_p

Q = "When was it completed?"
PY_Q = "Who created Python?"
PY_DOCS = ["Python was created by Guido van Rossum.", "The Berlin Wall fell on 9 November 1989."]


class CountingScorer:
    """A scorer that records what it was asked: score = 1 / (1 + len(text))."""

    name = "counting"

    def __init__(self):
        self.calls = []

    def __call__(self, question, texts):
        self.calls.append(list(texts))
        return [1.0 / (1 + len(t)) for t in texts]


def _reference_loglik(dec: NBCEDecoder, ids, span) -> float:
    """The plain computation: the whole row alone, full logits, log-softmax, sum over the span."""
    with torch.inference_mode():
        logits = dec.model(torch.tensor([ids], device=dec.device)).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    s, e = span
    return float(sum(logp[t - 1, ids[t]] for t in range(s, e)))


def _count_forwards(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls, handle


# ------------------------------------------------------------------ question likelihood
@pytest.mark.parametrize("fixture", ["tiny_decoder", "tiny_chat_decoder"])
def test_question_span_holds_exactly_the_question(fixture, request):
    dec = request.getfixturevalue(fixture)
    kept = dec._check_passages(PASSAGES)
    prep = dec._prepare(Q, kept, dec.config.update(max_passage_tokens=24), question_spans=True)
    assert len(prep.rows) > len(PASSAGES) + 1  # the long passage was split into windows
    for row in prep.rows:
        s, e = row.q_span
        assert dec.tokenizer.decode(row.ids[s:e]).strip() == Q


@pytest.mark.parametrize("fixture", ["tiny_decoder", "tiny_chat_decoder"])
@pytest.mark.parametrize("batch_rows", [1, 3, 16])
def test_question_loglik_equals_unbatched_computation(fixture, batch_rows, request):
    """Left padding (rows of very different lengths share a micro-batch), windows of a long
    passage, several micro-batches: every row's log p(question | passage) equals the row run
    alone with full logits."""
    dec = request.getfixturevalue(fixture)
    cfg = dec.config.update(max_passage_tokens=24, batch_rows=batch_rows)
    prep = dec._prepare(Q, dec._check_passages(PASSAGES), cfg, question_spans=True)
    lengths = {len(r.ids) for r in prep.rows}
    assert len(lengths) > 2
    dec._prefill_rows(prep, cfg)
    for row in prep.rows:
        assert row.q_loglik is not None
        assert row.q_loglik == pytest.approx(_reference_loglik(dec, row.ids, row.q_span), abs=1e-4)
        assert row.q_loglik < 0


def test_question_loglik_helper_reads_the_tail_only():
    torch.manual_seed(0)
    ids = [5, 1, 7, 3, 2, 9, 4]
    logits = torch.randn(len(ids), 11)
    full = torch.log_softmax(logits, -1)
    span = (3, 5)
    want = float(full[2, ids[3]] + full[3, ids[4]])
    for m in (5, 6, 7):  # enough positions: from the one before the question on
        assert question_loglik(logits[-m:], ids, span) == pytest.approx(want, abs=1e-6)
    with pytest.raises(ValueError, match="keep at least 5"):
        question_loglik(logits[-4:], ids, span)
    with pytest.raises(ValueError, match="not inside"):
        question_loglik(logits, ids, (0, 2))


def test_no_extra_forward_pass_for_the_likelihood(tiny_decoder):
    """The question likelihood comes from the prefill's own forward passes: the same number of
    model calls with and without it."""
    cfg = tiny_decoder.config.update(batch_rows=2)
    counts = {}
    for pooling in ("min_entropy", "posterior:question,static"):
        calls, handle = _count_forwards(tiny_decoder.model)
        try:
            ans = tiny_decoder.generate(Q, PASSAGES, pooling=pooling, batch_rows=2, max_new_tokens=1)
        finally:
            handle.remove()
        counts[pooling] = len(calls)
        assert ans.completion_tokens == 1
    assert counts["min_entropy"] == counts["posterior:question,static"] == math.ceil((len(PASSAGES) + 1) / 2)
    # and the prefill did compute it
    prep = tiny_decoder._prepare(Q, tiny_decoder._check_passages(PASSAGES), cfg, question_spans=True)
    calls, handle = _count_forwards(tiny_decoder.model)
    try:
        tiny_decoder._prefill_rows(prep, cfg)
    finally:
        handle.remove()
    assert len(calls) == math.ceil(len(prep.rows) / 2)
    assert all(r.q_loglik is not None for r in prep.rows)


# ------------------------------------------------------------------ posterior pooling
def _np_posterior(logits_steps, scores, qll, prior, update, beta=0.25, top_p=0.95, tau=0.1):
    """NumPy reference: prior softmax(s/τ + ℓ), mixture in probability space, fusion, greedy
    token, then w ← w·p_k(token) / Σ_j w_j p_j(token) (log-probs floored at −100)."""
    z = np.zeros(len(scores))
    if prior in ("scores", "product"):
        z += np.asarray(scores) / tau
    if prior in ("question", "product"):
        z += np.asarray(qll)
    logw = z - np.logaddexp.reduce(z)
    tokens, weights = [], []
    for lg in logits_steps:
        lp = np_top_p(np_log_softmax(lg), top_p)
        uncond, rows = lp[0], lp[1:]
        w = np.exp(logw)
        with np.errstate(divide="ignore", invalid="ignore"):
            mix = np.logaddexp.reduce(rows + np.log(w)[:, None], axis=0)
            fused = np.where(uncond > NEG_FLOOR, (1 + beta) * mix - beta * uncond, mix)
        tok = int(np.argmax(fused))
        weights.append(w)
        if update:
            logw = logw + np.maximum(rows[:, tok], NEG_FLOOR)
            logw = logw - np.logaddexp.reduce(logw)
        tokens.append(tok)
    return tokens, weights, np.exp(logw)


@pytest.mark.parametrize("prior", ["scores", "question", "product", "uniform"])
@pytest.mark.parametrize("update", [True, False])
def test_posterior_online_update_matches_numpy(prior, update):
    rng = np.random.default_rng(3)
    n, V, T = 5, 40, 8
    steps = [rng.normal(scale=3.0, size=(n + 1, V)).astype(np.float32) for _ in range(T)]
    scores = rng.uniform(0.1, 0.9, size=n)
    qll = rng.normal(-20, 3, size=n)
    want_tokens, want_w, want_final = _np_posterior(steps, scores, qll, prior, update)
    pool = PosteriorPooling(prior=prior, update=update).begin(torch.tensor(scores), torch.tensor(qll))
    final = None
    for t, lg in enumerate(steps):
        st = nbce_step(torch.from_numpy(lg), beta=0.25, eta=0.1, top_p=0.95, pooling=pool,
                       scores=torch.tensor(scores))
        tok = int(torch.argmax(st.logits))
        assert tok == want_tokens[t]
        np.testing.assert_allclose(st.weights.numpy(), want_w[t], rtol=1e-4, atol=1e-6)
        final = pool.observe(st, tok)
    if update:
        np.testing.assert_allclose(final.numpy(), want_final, rtol=1e-4, atol=1e-6)
    else:
        assert final is None


@pytest.mark.parametrize("pooling", ["posterior:product,online", "posterior:question,online"])
def test_decoder_posterior_equals_a_numpy_replay_of_its_rows(tiny_decoder, pooling):
    """The decoder's use of the posterior (``begin`` with every row's log p(question | passage),
    ``observe`` after each token, the fusion) against a NumPy replay: each row run alone through
    the model (no batch, no cache) on the decoder's own tokens gives the per-step log-probs and
    the question likelihood; the replay's greedy tokens, sources and weights must be the
    decoder's."""
    dec = tiny_decoder
    cfg = dec.config
    ps = [{"text": f"Note {i}. {p}", "score": 0.15 + 0.2 * i} for i, p in enumerate(PASSAGES)]
    ans = dec.generate(Q, ps, pooling=pooling, max_new_tokens=10)
    assert len(ans.token_ids) > 0
    chat = bool(getattr(dec.tokenizer, "chat_template", None))
    prep = dec._prepare(Q, dec._check_passages(ps), cfg.update(pooling=pooling), question_spans=True)
    assert len(prep.rows) == len(ps) + 1  # one row per passage (no windows)
    rows = [dec.tokenizer(dec.build_prompt(Q, p), add_special_tokens=not chat)["input_ids"]
            for p in [None] + [p["text"] for p in ps]]
    assert [r.ids for r in prep.rows] == rows
    qll = [_reference_loglik(dec, r.ids, r.q_span) for r in prep.rows[1:]]
    forced = list(ans.token_ids) + ([] if ans.finish_reason == "length" else [None])  # None: the EOS step
    steps = []
    with torch.inference_mode():
        for t in range(len(forced)):
            out = [int(x) for x in ans.token_ids[:t]]
            steps.append(np.stack([dec.model(torch.tensor([r + out], device=dec.device)).logits[0, -1].float().cpu().numpy()
                                   for r in rows]))
    prior = pooling.split(":")[1].split(",")[0]
    tokens, weights, final = _np_posterior(steps, [p["score"] for p in ps], qll, prior, update=True,
                                           beta=cfg.beta, top_p=cfg.nbce_top_p)
    assert tokens[: len(ans.token_ids)] == ans.token_ids
    if ans.finish_reason != "length":
        assert tokens[-1] in dec._eos_ids
    # the source of each token: the row with the largest weighted probability of it
    want_src = [int(np.argmax(np.log(weights[t]) + np_top_p(np_log_softmax(steps[t]), cfg.nbce_top_p)[1:, tok]))
                for t, tok in enumerate(ans.token_ids)]
    assert ans.token_sources == want_src
    np.testing.assert_allclose([s.weight_initial for s in ans.sources], weights[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose([s.weight_final for s in ans.sources], final, rtol=1e-4, atol=1e-6)
    logw0, logw1 = (np.log(np.maximum(w, 1e-300)) for w in (weights[0], final))
    assert np.abs(logw1 - logw0).max() > 1.0  # the update moved the weights
    assert not np.allclose(weights[0], 1 / len(ps), atol=1e-3)  # and the prior is not uniform


def test_posterior_static_scores_prior_is_replug():
    torch.manual_seed(0)
    logits = torch.randn(6, 30) * 3
    scores = torch.tensor([0.2, 0.7, 0.1, 0.5, 0.3])
    a = nbce_step(logits, beta=0.25, eta=0.1, top_p=0.95, pooling=get_pooling("replug"), scores=scores)
    pool = get_pooling("posterior:scores,static").begin(scores, None)
    b = nbce_step(logits, beta=0.25, eta=0.1, top_p=0.95, pooling=pool, scores=scores)
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.weights, b.weights)


def test_posterior_specs_and_errors():
    p = get_pooling("posterior:question,static")
    assert isinstance(p, PosteriorPooling) and p.prior == "question" and not p.update
    assert p.needs_question_loglik(True) and not get_pooling("posterior:scores").needs_question_loglik(True)
    with pytest.raises(ValueError, match="unknown posterior option"):
        get_pooling("posterior:questions")
    with pytest.raises(ValueError, match="prior must be one of"):
        PosteriorPooling(prior="cosine")
    shared = PosteriorPooling()
    a, b = shared.begin(torch.tensor([0.1, 0.2]), None), shared.begin(torch.tensor([0.3, 0.1]), None)
    assert a is not shared and b is not a  # per-answer state: one instance can serve concurrent answers


@pytest.mark.parametrize("pooling", ["posterior", "posterior:question,online", "posterior:product,static"])
def test_posterior_is_invariant_to_passage_order(tiny_decoder, pooling):
    ps = [{"text": f"Note {i}. {p}", "score": 0.1 + 0.2 * i} for i, p in enumerate(PASSAGES)]
    perm = [2, 0, 3, 1]
    a = tiny_decoder.generate(Q, ps, pooling=pooling, max_new_tokens=10)
    b = tiny_decoder.generate(Q, [ps[i] for i in perm], pooling=pooling, max_new_tokens=10)
    assert a.token_ids == b.token_ids and len(a.token_ids) > 0
    assert [perm[s] for s in b.token_sources] == a.token_sources
    for j, i in enumerate(perm):
        assert b.sources[j].weight_initial == pytest.approx(a.sources[i].weight_initial, abs=1e-5)
        assert b.sources[j].weight_final == pytest.approx(a.sources[i].weight_final, abs=1e-5)


def test_sources_carry_initial_and_final_weights(tiny_decoder):
    ps = [{"text": p, "score": 0.1 * (i + 1)} for i, p in enumerate(PASSAGES)]
    ans = tiny_decoder.generate(Q, ps, pooling="posterior:product,online", max_new_tokens=6, max_passage_tokens=24)
    assert sum(s.weight_initial for s in ans.sources) == pytest.approx(1.0, abs=1e-5)
    assert sum(s.weight_final for s in ans.sources) == pytest.approx(1.0, abs=1e-5)
    d = ans.sources[0].to_dict()
    assert {"weight_initial", "weight_final", "share"} <= set(d)
    sel = tiny_decoder.generate(Q, ps, pooling="min_entropy", max_new_tokens=6)
    assert sorted(s.weight_initial for s in sel.sources) == [0.0] * (len(ps) - 1) + [1.0]
    closed = tiny_decoder.generate(Q, [], max_new_tokens=2)
    assert closed.sources == []


# ------------------------------------------------------------------ the scorer
def test_scorer_none_keeps_todays_tokens(tiny_decoder):
    """``scorer=None`` on unscored passages: exactly the decoding of before (the unbatched
    reference, where ``auto`` falls back to min_entropy), and no score is invented."""
    dec = NBCEDecoder(tiny_decoder.model, tiny_decoder.tokenizer, scorer=None)
    ans = dec.generate(Q, PASSAGES, max_new_tokens=12)
    ref_ids, ref_src = reference_generate(dec, Q, PASSAGES, 12)
    assert ans.token_ids == ref_ids and ans.token_sources == ref_src
    assert all(s.score is None for s in ans.sources)
    assert ans.token_ids == dec.generate(Q, PASSAGES, max_new_tokens=12, pooling="min_entropy").token_ids


def test_scorer_scores_unscored_passages(tiny_decoder):
    scorer = CountingScorer()
    dec = NBCEDecoder(tiny_decoder.model, tiny_decoder.tokenizer, scorer=scorer)
    ans = dec.generate(Q, PASSAGES, max_new_tokens=8)
    assert scorer.calls == [PASSAGES]
    want = [1.0 / (1 + len(p)) for p in PASSAGES]
    assert [s.score for s in ans.sources] == pytest.approx(want)
    assert all(s.metadata["score_from"] == "counting" for s in ans.sources)
    # auto with scores = replug over the scorer's scores: the same tokens as scored passages
    scored = [Passage(p, score=w) for p, w in zip(PASSAGES, want)]
    ref = NBCEDecoder(tiny_decoder.model, tiny_decoder.tokenizer, scorer=None).generate(Q, scored, max_new_tokens=8)
    assert ans.token_ids == ref.token_ids and ans.token_sources == ref.token_sources


def test_scored_passages_keep_their_scores_and_a_mix_fills_the_rest(tiny_decoder, caplog):
    scorer = CountingScorer()
    dec = NBCEDecoder(tiny_decoder.model, tiny_decoder.tokenizer, scorer=scorer)
    all_scored = [Passage(p, score=0.5) for p in PASSAGES]
    ans = dec.generate(Q, all_scored, max_new_tokens=3)
    assert scorer.calls == [] and [s.score for s in ans.sources] == [0.5] * len(PASSAGES)
    mixed = [Passage(PASSAGES[0], score=0.9), PASSAGES[1], {"text": PASSAGES[2], "score": 0.2}, PASSAGES[3]]
    with caplog.at_level(logging.WARNING, logger="nbce_rag.decoding.scoring"):
        ans = dec.generate(Q, mixed, max_new_tokens=3)
    assert scorer.calls == [[PASSAGES[1], PASSAGES[3]]]
    assert [s.score for s in ans.sources] == pytest.approx([0.9, 1.0 / (1 + len(PASSAGES[1])), 0.2, 1.0 / (1 + len(PASSAGES[3]))])
    assert "same scale" in caplog.text


def test_scorer_option_errors(tiny_decoder):
    with pytest.raises(ValueError, match="scorer must be"):
        NBCEDecoder(tiny_decoder.model, tiny_decoder.tokenizer, scorer="cosine").generate(Q, PASSAGES)
    with pytest.raises(TypeError, match="scorer must be"):
        NBCEDecoder(tiny_decoder.model, tiny_decoder.tokenizer, scorer=3).generate(Q, PASSAGES)
    bad = NBCEDecoder(tiny_decoder.model, tiny_decoder.tokenizer, scorer=lambda q, ts: [0.1])
    with pytest.raises(ValueError, match="returned 1 scores for 4"):
        bad.generate(Q, PASSAGES)


def test_pipeline_passes_its_index_encoder(tiny_decoder):
    class Enc:
        name = "fake"

        def encode(self, texts, **_):
            return np.array([[len(t) % 7 + 1.0, 1.0, (len(t) * 3) % 5 + 0.5] for t in texts], dtype=np.float32)

    dec = NBCEDecoder(tiny_decoder.model, tiny_decoder.tokenizer)  # scorer "auto"
    rag = RAGPipeline(dec, index=SimpleNamespace(encoder=Enc()))
    ans = rag.ask(Q, passages=PASSAGES, max_new_tokens=3)
    q = Enc().encode([Q])[0]
    want = [float(v @ q / np.linalg.norm(v) / np.linalg.norm(q)) for v in Enc().encode(PASSAGES)]
    assert [s.score for s in ans.sources] == pytest.approx(want, abs=1e-5)


# ------------------------------------------------------------------ bundled model (slow)
@pytest.mark.slow
def test_bundled_question_loglik_equals_unbatched(bundled_decoder):
    dec = bundled_decoder
    long = " ".join(PY_DOCS * 12)
    cfg = dec.config.update(max_passage_tokens=40, batch_rows=3)
    prep = dec._prepare(PY_Q, dec._check_passages(PY_DOCS + [long]), cfg, question_spans=True)
    assert len(prep.rows) > 4
    dec._prefill_rows(prep, cfg)
    for row in prep.rows:
        assert dec.tokenizer.decode(row.ids[row.q_span[0]:row.q_span[1]]).strip() == PY_Q
        assert row.q_loglik == pytest.approx(_reference_loglik(dec, row.ids, row.q_span), abs=2e-3)
    # the passage that answers makes the question likelier than the one that does not
    assert prep.rows[1].q_loglik > prep.rows[2].q_loglik


@pytest.mark.slow
def test_two_documents_answer_guido_everywhere(bundled_decoder):
    """The issue's example ("Who created Python?" with a Berlin Wall distractor) answers
    Guido in both orders through the decoder, the pipeline without an index, LangChain,
    LlamaIndex and the server; with ``scorer=None`` it answers as before (min_entropy)."""
    dec = NBCEDecoder(bundled_decoder.model, bundled_decoder.tokenizer)  # default scorer
    orders = [PY_DOCS, PY_DOCS[::-1]]
    for docs in orders:
        ans = dec.generate(PY_Q, docs, max_new_tokens=16)
        assert "Guido" in ans.text, ans.text
        gold = next(s for s in ans.sources if "Guido" in s.text)
        assert gold.share > 0.5 and gold.weight_initial > 0.5
        assert "Guido" in RAGPipeline(dec).ask(PY_Q, passages=docs, max_new_tokens=16).text

    from nbce_rag.integrations.langchain import NBCELLM as LCLLM
    from nbce_rag.integrations.llama_index import NBCELLM as LILLM

    for docs in orders:
        assert "Guido" in LCLLM(decoder=dec, max_tokens=16).invoke(PY_Q, contexts=docs)
        assert "Guido" in LILLM(decoder=dec, max_new_tokens=16).complete(PY_Q, contexts=docs).text

    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("openai")
    from nbce_rag.integrations.server import create_app
    from test_server import Served

    served = Served(create_app(RAGPipeline(dec), model_name="nbce"))
    try:
        for docs in orders:
            r = served.client().chat.completions.create(
                model="nbce", messages=[{"role": "user", "content": PY_Q}], max_tokens=16,
                extra_body={"documents": docs})
            assert "Guido" in r.choices[0].message.content
            src = r.model_extra["nbce"]["sources"]
            assert all("weight_initial" in s and "weight_final" in s for s in src)
            assert max(src, key=lambda s: s["weight_initial"])["index"] == docs.index(PY_DOCS[0])
    finally:
        served.close()


def test_question_loglik_through_the_passage_kv_cache(tiny_decoder):
    """With the passage KV cache (second call: the passages' prefixes come from the cache and
    only the tails are computed) the question likelihood, hence the posterior's weights, is
    that of a plain prefill."""
    from nbce_rag.decoding.kvcache import PassageKVCache

    plain = NBCEDecoder(tiny_decoder.model, tiny_decoder.tokenizer, kv_cache=None, scorer=None)
    # a cache of its own (not the process-wide one other tests fill): the first call is cold
    cache = PassageKVCache(max_bytes="256MiB")
    cached = NBCEDecoder(tiny_decoder.model, tiny_decoder.tokenizer, kv_cache=cache, scorer=None)
    assert cached.kv_cache is cache
    want = plain.generate(Q, PASSAGES, pooling="posterior:question,static", max_new_tokens=4)
    assert want.cached_tokens == 0 and all(s.weight_initial is not None for s in want.sources)
    for call in ("cold", "warm"):
        got = cached.generate(Q, PASSAGES, pooling="posterior:question,static", max_new_tokens=4)
        if call == "cold":
            assert got.cached_tokens == 0, "the first call over a fresh cache must compute every token"
            assert len(cache) > 0, "the cold call stores the passages' prefixes"
        else:
            assert 0 < got.cached_tokens < got.prompt_tokens, "the warm call reads the passages' prefixes from the cache"
        assert got.prompt_tokens == want.prompt_tokens
        assert got.token_ids == want.token_ids
        assert [s.weight_initial for s in got.sources] == pytest.approx([s.weight_initial for s in want.sources], abs=1e-4)


def test_scorer_remembers_passage_embeddings():
    """A passage is encoded once: later questions over it only encode the question."""
    import numpy as np

    from nbce_rag.decoding.scoring import encoder_scorer

    class Enc:
        name = "counting-encoder"

        def __init__(self):
            self.seen = []

        def encode(self, texts):
            self.seen.append(list(texts))
            return np.array([[len(t), t.count("e") + 1.0, 1.0] for t in texts], dtype=np.float32)

    enc = Enc()
    score = encoder_scorer(enc)
    first = score("Who?", PASSAGES)
    again = score("Where?", PASSAGES[::-1])
    assert enc.seen == [["Who?"], PASSAGES, ["Where?"]]
    assert first == encoder_scorer(Enc())("Who?", PASSAGES)  # remembered = computed afresh
    assert again == encoder_scorer(Enc())("Where?", PASSAGES[::-1])


def test_auto_is_the_quality_benchmarks_choice():
    """``auto`` with scores is ``replug``, because that is what the issue-14 quality run found
    best (benchmarks/results/quality_relevance.json, README "Unscored passages"): a rerun that
    changes the winner must revisit the default, and this test says so."""
    import json
    from pathlib import Path

    from nbce_rag.decoding.nbce import MinEntropyPooling, ReplugPooling

    auto = get_pooling("auto")
    assert type(auto.with_scores) is ReplugPooling and auto.with_scores.temperature == 0.1
    assert type(auto.without_scores) is MinEntropyPooling
    assert not auto.needs_question_loglik(True)  # no LM-head pass over the question in the prefill
    rows = json.loads((Path(__file__).parents[1] / "benchmarks/results/quality_relevance.json").read_text())["rows"]
    totals = {}
    for r in rows:  # the decision cells: n = 5 and 10, where all eight poolings ran on 60 questions
        if r["gold_position"] is None and r["n"] in (5, 10):
            ok, n = totals.get(r["method"], (0.0, 0))
            totals[r["method"]] = (ok + r["accuracy"] * r["questions"], n + r["questions"])
    acc = {m: ok / n for m, (ok, n) in totals.items()}
    assert min(n for _, n in totals.values()) >= 6 * 60  # 3 data sets x 2 passage counts x 60 questions
    assert acc["replug"] == max(acc.values()), acc
