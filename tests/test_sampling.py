"""Post-fusion processing and sampling (nbce_rag/decoding/sampling.py): transformers' own processors
on the fused row, the same tokens as the sampler that came before it, each option through
the decoder's API, and the ban that removes every candidate."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from nbce_rag import ConfigError, NBCEConfig
from nbce_rag.decoding.nbce import log_softmax, top_p_truncate
from nbce_rag.decoding.sampling import FrequencyPresencePenaltyLogitsProcessor, Sampler, build_processors, build_warpers

from test_decoder import PASSAGES

V = 300


def old_sample(logits: torch.Tensor, cfg: NBCEConfig, gen) -> int:
    """NBCEDecoder._sample as it was before nbce_rag/decoding/sampling.py (commit 3c886b2), verbatim."""
    if not cfg.do_sample:
        return int(torch.argmax(logits))
    x = logits.detach().float().cpu() / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(x, min(cfg.top_k, x.numel())).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if cfg.top_p < 1.0:
        x = top_p_truncate(log_softmax(x), cfg.top_p)
    probs = torch.softmax(x, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))


def fused_like(seed: int) -> torch.Tensor:
    """A fused-looking row: log-probs with a -inf tail (as after nbce_top_p)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(V, generator=g) * 3
    return top_p_truncate(log_softmax(x), 0.95)


@pytest.mark.parametrize("opts", [
    {},
    {"do_sample": True},
    {"do_sample": True, "temperature": 0.7},
    {"do_sample": True, "temperature": 1.5, "top_k": 20},
    {"do_sample": True, "top_p": 0.8},
    {"do_sample": True, "temperature": 2.0, "top_k": 50, "top_p": 0.9},
])
def test_same_tokens_as_the_previous_sampler_for_the_same_seed(opts):
    """Without the new options a seed draws exactly the tokens it drew before (200 steps, one
    generator each, as in a decode)."""
    cfg = NBCEConfig().update(**opts)
    gen_old = torch.Generator().manual_seed(123)
    new = Sampler(cfg.update(seed=123))
    for step in range(200):
        row = fused_like(step)
        assert new(row, []) == old_sample(row, cfg, gen_old), step


def test_processors_are_transformers_own_in_generate_order():
    cfg = NBCEConfig().update(repetition_penalty=1.3, no_repeat_ngram_size=2, bad_words_ids=[[5, 6]],
                              suppress_tokens=[7], frequency_penalty=0.5)
    procs = build_processors(cfg)
    assert [type(p) for p in procs] == [RepetitionPenaltyLogitsProcessor, NoRepeatNGramLogitsProcessor,
                                        NoBadWordsLogitsProcessor, SuppressTokensLogitsProcessor,
                                        FrequencyPresencePenaltyLogitsProcessor]
    warpers = build_warpers(cfg.update(do_sample=True, temperature=0.5, top_k=10, top_p=0.9, min_p=0.05))
    assert [type(w) for w in warpers] == [TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper]
    assert len(build_processors(NBCEConfig())) == 0 and len(build_warpers(NBCEConfig())) == 0


def test_processed_scores_equal_transformers_processors_on_the_same_logits():
    generated = [3, 9, 5, 3, 9]
    row = fused_like(0)
    cfg = NBCEConfig().update(repetition_penalty=1.3, no_repeat_ngram_size=2, bad_words_ids=[[9, 5], [11]], suppress_tokens=[7])
    ids = torch.tensor([generated])
    want = row.unsqueeze(0).clone()
    for p in (RepetitionPenaltyLogitsProcessor(1.3), NoRepeatNGramLogitsProcessor(2),
              NoBadWordsLogitsProcessor([[9, 5], [11]]), SuppressTokensLogitsProcessor([7])):
        want = p(ids, want)
    got = Sampler(cfg).process(row, generated)
    assert torch.equal(got, want[0])
    # and the effects are the documented ones
    assert torch.isinf(got[3]) and torch.isinf(got[7]) and torch.isinf(got[11])  # 9,3 seen: bigram "9 3"; suppress; bad word
    assert got[9] == pytest.approx(row[9] * 1.3) or torch.isinf(row[9])


def test_frequency_and_presence_penalty_follow_openai():
    scores = torch.zeros(1, 6)
    out = FrequencyPresencePenaltyLogitsProcessor(0.5, 0.25)(torch.tensor([[1, 1, 1, 4]]), scores)
    assert out[0].tolist() == pytest.approx([0.0, -1.75, 0.0, 0.0, -0.75, 0.0])
    assert torch.equal(FrequencyPresencePenaltyLogitsProcessor(0.5, 0.5)(torch.zeros(1, 0, dtype=torch.long), scores), scores)


def test_min_p_keeps_only_tokens_near_the_top():
    row = log_softmax(torch.tensor([5.0, 4.9, 0.0, -1.0, -3.0]))
    draws = {Sampler(NBCEConfig().update(do_sample=True, min_p=0.5, seed=s))(row) for s in range(40)}
    assert draws == {0, 1}


def test_a_ban_that_leaves_no_candidate_ends_the_answer():
    row = torch.full((V,), float("-inf"))
    row[4] = 0.0  # a nucleus of one token
    s = Sampler(NBCEConfig().update(suppress_tokens=[4]), exhausted=0)
    assert s(row, []) == 0
    assert Sampler(NBCEConfig(), exhausted=0)(row, []) == 4


@pytest.mark.parametrize("bad", [
    {"repetition_penalty": 0.0}, {"no_repeat_ngram_size": -1}, {"no_repeat_ngram_size": 1.5},
    {"min_p": 1.5}, {"frequency_penalty": 3.0}, {"presence_penalty": -2.5},
    {"bad_words_ids": [5, 6]}, {"bad_words_ids": [[]]}, {"suppress_tokens": ["a"]}, {"suppress_tokens": 5},
])
def test_bad_generation_options_are_refused_with_the_fix(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        NBCEConfig().update(**bad)


# ------------------------------------------------------------------ through the decoder
def _has_repeat(ids, n):
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return len(grams) != len(set(grams))


def test_repetition_penalty_is_accepted_by_generate(tiny_decoder):
    """The call the issue quotes: it used to be refused as an unknown option."""
    ans = tiny_decoder.generate("Where?", PASSAGES, max_new_tokens=10, repetition_penalty=1.1)
    assert ans.finish_reason in ("stop", "length")


def test_no_repeat_ngram_size_removes_repeats(tiny_decoder):
    free = tiny_decoder.generate("Where?", PASSAGES, max_new_tokens=24)
    assert _has_repeat(free.token_ids, 1), "the tiny model should repeat itself for this test to mean something"
    for size in (1, 2):
        ans = tiny_decoder.generate("Where?", PASSAGES, max_new_tokens=24, no_repeat_ngram_size=size)
        assert not _has_repeat(ans.token_ids, size)
    assert len(ans.token_sources) == len(ans.token_ids)


def test_suppress_and_bad_words_through_generate(tiny_decoder):
    free = tiny_decoder.generate("Where?", PASSAGES, max_new_tokens=12)
    first = free.token_ids[0]
    ans = tiny_decoder.generate("Where?", PASSAGES, max_new_tokens=12, suppress_tokens=[first])
    assert first not in ans.token_ids
    ans = tiny_decoder.generate("Where?", PASSAGES, max_new_tokens=12, bad_words_ids=[[first]])
    assert first not in ans.token_ids


def test_frequency_penalty_through_generate_and_compare(tiny_decoder):
    free = tiny_decoder.generate("Where?", PASSAGES, max_new_tokens=24)
    pen = tiny_decoder.generate("Where?", PASSAGES, max_new_tokens=24, frequency_penalty=2.0)
    assert max(pen.token_ids.count(t) for t in set(pen.token_ids)) <= max(free.token_ids.count(t) for t in set(free.token_ids))
    # decode-only options share the prefill in compare() and give what generate() gives
    variants = [{"frequency_penalty": 2.0}, {"no_repeat_ngram_size": 2}, {"repetition_penalty": 1.5}]
    answers = tiny_decoder.compare("Where?", PASSAGES, variants, max_new_tokens=24)
    for v, a in zip(variants, answers):
        assert a.token_ids == tiny_decoder.generate("Where?", PASSAGES, max_new_tokens=24, **v).token_ids


def test_stream_with_processors_equals_generate(tiny_decoder):
    opts = dict(max_new_tokens=16, no_repeat_ngram_size=2, repetition_penalty=1.2)
    events = list(tiny_decoder.stream("Where?", PASSAGES, **opts))
    ans = tiny_decoder.generate("Where?", PASSAGES, **opts)
    assert "".join(e.text for e in events) == ans.text
    assert [e.token_id for e in events if e.token_id is not None] == ans.token_ids


# ------------------------------------------------------------------ the CLI flags
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    from conftest import save_tiny_llama

    d = tmp_path_factory.mktemp("model")
    return save_tiny_llama(d, tiny_tokenizer)


def _generate_cli(model_dir, capsys, *flags):
    import json

    from nbce_rag.cli import main

    args = ["generate", "-q", "Where?", "--model", str(model_dir), "--device", "cpu", "--max-new-tokens", "24", "--json"]
    for p in PASSAGES:
        args += ["-p", p]
    assert main(args + list(flags)) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_cli_flags_reach_the_decoder(model_dir, capsys):
    free = _generate_cli(model_dir, capsys)
    assert _has_repeat(free["token_ids"], 1)
    assert not _has_repeat(_generate_cli(model_dir, capsys, "--no-repeat-ngram-size", "1")["token_ids"], 1)
    first = free["token_ids"][0]
    assert first not in _generate_cli(model_dir, capsys, "--suppress-token", str(first))["token_ids"]
    sampled = _generate_cli(model_dir, capsys, "--sample", "--seed", "3", "--top-k", "5", "--min-p", "0.1",
                            "--repetition-penalty", "1.3", "--frequency-penalty", "0.5", "--presence-penalty", "0.5")
    assert sampled["finish_reason"] in ("stop", "length")
    from nbce_rag.decoding.sampling import bad_words_ids
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)

    def has_banned(ids, banned):
        return any(ids[i : i + len(b)] == b for b in banned for i in range(len(ids)))

    # a word the free answer really spells as one of its banned token sequences (a random model's
    # words rarely tokenize alone as they did in context): banning it must change the answer
    candidates = free["text"].split() + [tok.decode([t]).strip() for t in free["token_ids"]]
    word = next((w for w in candidates if w and has_banned(free["token_ids"], bad_words_ids(tok, [w]))), None)
    assert word, f"no word of the free answer to ban: {free['text']!r}"
    banned = bad_words_ids(tok, [word])
    assert not has_banned(_generate_cli(model_dir, capsys, "--bad-word", word)["token_ids"], banned)


def test_ask_cli_passes_the_generation_flags(monkeypatch, tiny_decoder, capsys):
    """``ask`` hands the same options to the pipeline (the pipeline itself is tested elsewhere)."""
    import nbce_rag.pipeline as pipeline_mod
    from nbce_rag.cli import main

    seen = {}

    class FakeRAG:
        decoder = tiny_decoder

        def ask(self, question, **options):
            seen.update(options)
            return tiny_decoder.generate(question, [], max_new_tokens=2)

    monkeypatch.setattr(pipeline_mod.RAGPipeline, "from_pretrained", classmethod(lambda cls, **kw: FakeRAG()))
    assert main(["ask", "Where?", "--index", "unused", "--json", "--repetition-penalty", "1.2",
                 "--no-repeat-ngram-size", "3", "--frequency-penalty", "0.4", "--presence-penalty", "0.1",
                 "--min-p", "0.05", "--suppress-token", "7", "--suppress-token", "8"]) == 0
    capsys.readouterr()
    assert seen == {"repetition_penalty": 1.2, "no_repeat_ngram_size": 3, "frequency_penalty": 0.4,
                    "presence_penalty": 0.1, "min_p": 0.05, "suppress_tokens": [7, 8]}


# ------------------------------------------------------------------ the adapters and the options table
PENALTIES = {"frequency_penalty": 2.0, "presence_penalty": 0.5, "repetition_penalty": 1.5, "top_k": 5}


def test_openai_table_maps_frequency_and_presence_penalty():
    from nbce_rag.config import OPENAI_PARAMS, openai_options

    assert {"frequency_penalty", "presence_penalty"} <= set(OPENAI_PARAMS)
    assert openai_options({"frequency_penalty": 0.5, "presence_penalty": 1}) == {"frequency_penalty": 0.5, "presence_penalty": 1.0}
    cfg = NBCEConfig.from_openai_params({"frequency_penalty": 0.3, "repetition_penalty": 1.2, "no_repeat_ngram_size": 3})
    assert (cfg.frequency_penalty, cfg.repetition_penalty, cfg.no_repeat_ngram_size) == (0.3, 1.2, 3)
    with pytest.raises(ConfigError, match="frequency_penalty must be"):
        NBCEConfig.from_openai_params({"frequency_penalty": 2.5})


def test_langchain_models_take_the_penalties(tiny_decoder):
    pytest.importorskip("langchain_core")
    from nbce_rag.integrations.langchain import ChatNBCE, NBCELLM

    free = tiny_decoder.generate("Where?", PASSAGES, max_new_tokens=24)
    want = tiny_decoder.generate("Where?", PASSAGES, max_new_tokens=24, **PENALTIES)
    assert want.text != free.text  # the options change this answer, so the checks below mean something
    chat = ChatNBCE(decoder=tiny_decoder, max_tokens=24, **PENALTIES)
    assert chat.invoke("Where?", documents=PASSAGES).content == want.text
    per_call = ChatNBCE(decoder=tiny_decoder, max_tokens=24)
    assert per_call.invoke("Where?", documents=PASSAGES, **PENALTIES).content == want.text
    assert per_call.invoke("Where?", documents=PASSAGES).content == free.text
    llm = NBCELLM(decoder=tiny_decoder, max_tokens=24, **PENALTIES)
    assert llm.invoke("Where?", contexts=PASSAGES) == want.text


def test_llama_index_llm_takes_the_penalties(tiny_decoder):
    pytest.importorskip("llama_index.core")
    from nbce_rag.integrations.llama_index import NBCELLM

    want = tiny_decoder.generate("Where?", PASSAGES, max_new_tokens=24, **PENALTIES)
    llm = NBCELLM(decoder=tiny_decoder, max_new_tokens=24, **PENALTIES)
    assert llm.complete("Where?", contexts=PASSAGES).text == want.text
    plain = NBCELLM(decoder=tiny_decoder, max_new_tokens=24)
    assert plain.complete("Where?", contexts=PASSAGES, **PENALTIES).text == want.text


# ------------------------------------------------------------------ the server (OpenAI's names)
def test_server_maps_frequency_and_presence_penalty():
    """OpenAI's ``frequency_penalty`` / ``presence_penalty`` reach the decoder through the one
    options table (the server reads every OPENAI_PARAMS name); out of range is a 400."""
    pytest.importorskip("fastapi")
    openai = pytest.importorskip("openai")
    import test_server as ts
    from nbce_rag import RAGPipeline
    from nbce_rag.integrations.server import create_app

    from conftest import make_tiny_encoder, make_tiny_llama, make_tokenizer
    from nbce_rag import NBCEDecoder
    import tempfile

    tok = make_tokenizer(chat=True)
    pipe = RAGPipeline(NBCEDecoder(make_tiny_llama(len(tok), seed=1), tok))
    with tempfile.TemporaryDirectory() as d:
        served = ts.Served(create_app(pipe, encoder=make_tiny_encoder(d, seed=0), limits=ts.LIMITS, model_name=ts.MODEL))
        try:
            free = ts.ask(pipe, max_new_tokens=24)
            want = ts.ask(pipe, max_new_tokens=24, frequency_penalty=2.0, presence_penalty=1.0)
            assert want.text != free.text  # the options change this answer
            got = ts.chat(served, max_tokens=24, frequency_penalty=2.0, presence_penalty=1.0)
            assert got.choices[0].message.content == want.text
            with pytest.raises(openai.BadRequestError, match="frequency_penalty"):
                ts.chat(served, max_tokens=4, frequency_penalty=2.5)
        finally:
            served.close()


# ------------------------------------------------------------------ the defaults, chosen on data
def _repeated_4gram(text: str) -> bool:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_quality import repeated_ngram

    return repeated_ngram(text, 4)


def test_defaults_are_pinned_by_the_quality_benchmark():
    """benchmarks/results/quality_repetition.json (RESULTS_generation.md; bench_quality.py
    --decode-variants, SQuAD and NQ, n=10, 48 new tokens, bundled model): no default answer had
    a repeated 4-gram, so the library's penalties stay off (today's answers unchanged); the
    demo's no_repeat_ngram_size=4 lowered accuracy in no cell."""
    import json
    from pathlib import Path

    from nbce_rag.commands.demo import DEMO_OPTIONS

    res = json.loads((Path(__file__).resolve().parents[1] / "benchmarks/results/quality_repetition.json").read_text())
    rows = {(r["dataset"], r["method"]): r for r in res["rows"]}
    for ds in ("squad", "nq"):
        base, ng4 = rows[(ds, "replug+base")], rows[(ds, "replug+ngram4")]
        assert base["questions"] >= 8 and base["repeat4"] == 0.0
        assert ng4["accuracy"] >= base["accuracy"]
    cfg = NBCEConfig()
    assert (cfg.repetition_penalty, cfg.no_repeat_ngram_size, cfg.frequency_penalty, cfg.presence_penalty, cfg.min_p) == (1.0, 0, 0.0, 0.0, 0.0)
    assert DEMO_OPTIONS["no_repeat_ngram_size"] == 4  # the demo only; its other settings are issue 13's


@pytest.mark.slow
def test_demo_answer_does_not_loop():
    """The quick start: "What does the pass statement do?" looped without the demo's options."""
    from nbce_rag.commands.demo import DEFAULT_QUESTION, DEMO_OPTIONS, build_demo_index
    from nbce_rag.models import cache_dir
    from nbce_rag.pipeline import RAGPipeline

    rag = RAGPipeline.from_pretrained(build_demo_index(cache_dir() / "demo_index"), threshold=None, k=3)
    ans = rag.ask(DEFAULT_QUESTION, **{**DEMO_OPTIONS, "max_new_tokens": 48})
    assert "placeholder" in ans.text and not _repeated_4gram(ans.text), ans.text
    loop = rag.ask(DEFAULT_QUESTION, max_new_tokens=48)
    assert _repeated_4gram(loop.text), "without the options the bundled model loops (else this test proves nothing)"
