"""NBCEDecoder against an unbatched, cache-free reference (one row at a time, full forward each
step): identical token ids, with passages of very different lengths, on a tiny random Llama;
the same on the bundled model (slow). Plus streaming, stops, sampling and bad input."""

from __future__ import annotations

import logging

import pytest
import torch

from nbce_rag import NBCEDecoder, PromptTooLongError
from nbce_rag.decoding.nbce import attribute, get_pooling, log_softmax, nbce_step

LONG = " ".join(["The river Thames flows through London into the North Sea."] * 12)
PASSAGES = [
    "The Eiffel Tower is in Paris.",
    LONG,
    "Bananas are rich in potassium and grow in tropical climates, mostly in large farms near the coast.",
    "Water boils at one hundred degrees.",
]


@torch.inference_mode()
def reference_generate(dec: NBCEDecoder, question, passages, max_new_tokens, **options):
    """The obviously-correct version: rows built from build_prompt, each run alone with no
    padding and no cache, all of its tokens re-encoded at every step."""
    cfg = dec.config.update(**options)
    chat = bool(getattr(dec.tokenizer, "chat_template", None))
    rows = []
    for p in [None] + list(passages):
        rows.append(dec.tokenizer(dec.build_prompt(question, p), add_special_tokens=not chat)["input_ids"])
    pooling = get_pooling(cfg.pooling)
    out, srcs, prev = [], [], None
    for _ in range(max_new_tokens):
        logits = torch.stack([dec.model(torch.tensor([r + out], device=dec.device)).logits[0, -1].float() for r in rows])
        if len(rows) == 1:
            tok, src = int(torch.argmax(log_softmax(logits[0]))), -1
        else:
            st = nbce_step(logits, beta=cfg.beta, eta=cfg.eta, top_p=cfg.nbce_top_p, pooling=pooling, prev=prev)
            tok = int(torch.argmax(st.logits))
            prev = attribute(st, tok)
            src = prev
        if tok in dec._eos_ids:
            break
        out.append(tok)
        srcs.append(src)
    return out, srcs


@pytest.mark.parametrize("pooling", ["auto", "min_entropy", "mean", "max", "replug", "scored_entropy"])
def test_batched_decoder_equals_unbatched_reference(tiny_decoder, pooling):
    ans = tiny_decoder.generate("When was it completed?", PASSAGES, max_new_tokens=12, pooling=pooling)
    ref_ids, ref_src = reference_generate(tiny_decoder, "When was it completed?", PASSAGES, 12, pooling=pooling)
    assert ans.token_ids == ref_ids
    assert ans.token_sources == ref_src
    assert len(ans.token_ids) > 0


def test_micro_batching_does_not_change_a_token(tiny_decoder):
    # distinct passages: identical ones tie exactly in entropy, and a tie is decided by rounding
    many = [f"Note {i}. {p}" for i in range(3) for p in PASSAGES]
    full = tiny_decoder.generate("How high is the mountain?", many, max_new_tokens=10, batch_rows=64)
    for rows in (1, 2, 5):
        part = tiny_decoder.generate("How high is the mountain?", many, max_new_tokens=10, batch_rows=rows)
        assert part.token_ids == full.token_ids
        assert part.token_sources == full.token_sources


def test_decode_groups_are_merged_without_changing_a_token(tiny_decoder):
    """Prefill micro-batches are merged into decode groups of up to ``decode_rows`` rows (one
    forward per step); any grouping gives the same tokens as one big batch."""
    from nbce_rag.decoding.rows import merge_for_decode

    many = [f"Note {i}. {p}" for i in range(3) for p in PASSAGES]
    prep = tiny_decoder._prepare("How high is the mountain?", [(i, _p(t)) for i, t in enumerate(many)], tiny_decoder.config)
    cfg = tiny_decoder.config.update(batch_rows=3, decode_rows=10**6)
    with torch.inference_mode():
        groups, _ = tiny_decoder._prefill(prep.rows, list(range(len(prep.rows))), cfg)
    assert len(groups) == 1 and groups[0].rows == list(range(len(prep.rows)))
    assert groups[0].mask.shape[0] == len(prep.rows) == groups[0].cache.layers[0].keys.shape[0]
    full = tiny_decoder.generate("How high is the mountain?", many, max_new_tokens=10, batch_rows=64)
    for rows, dec_rows in ((3, 1), (3, 7), (1, 4), (5, 10**6)):
        part = tiny_decoder.generate("How high is the mountain?", many, max_new_tokens=10, batch_rows=rows, decode_rows=dec_rows)
        assert part.token_ids == full.token_ids
        assert part.token_sources == full.token_sources
    assert merge_for_decode([], 4) == []


def test_padding_does_not_change_tokens(tiny_decoder):
    """A short passage decoded alone equals it decoded next to a 12x longer one whose
    rows force heavy left padding, when the long one never gets selected (mean pooling would
    mix them, so compare the per-row logits directly)."""
    dec = tiny_decoder
    q = "Who designed the tower?"
    prep_alone = dec._prepare(q, [(0, _p(PASSAGES[0]))], dec.config)
    prep_mixed = dec._prepare(q, [(0, _p(PASSAGES[0])), (1, _p(LONG))], dec.config)
    with torch.inference_mode():
        _, alone = dec._prefill(prep_alone.rows, [0, 1], dec.config)
        _, mixed = dec._prefill(prep_mixed.rows, [0, 2, 1], dec.config)  # long row first: short ones padded
    torch.testing.assert_close(mixed[0], alone[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed[2], alone[1], rtol=1e-4, atol=1e-4)


def _p(text):
    from nbce_rag import Passage

    return Passage(text)


def test_chat_template_tokenizer_matches_reference(tiny_chat_decoder):
    ans = tiny_chat_decoder.generate("Where is the tower?", PASSAGES, max_new_tokens=10)
    ref_ids, _ = reference_generate(tiny_chat_decoder, "Where is the tower?", PASSAGES, 10)
    assert ans.token_ids == ref_ids
    prompt = tiny_chat_decoder.build_prompt("Q?", "P.")
    assert prompt.startswith("<|im_start|>user\nP.\n\nAnswer briefly: Q?") and prompt.endswith("<|im_start|>assistant\n")


def test_plain_prompt_fallback_without_chat_template(tiny_decoder):
    assert tiny_decoder.tokenizer.chat_template is None
    assert tiny_decoder.build_prompt("Q?", "P.") == "P.\n\nAnswer briefly: Q?\nAnswer:"
    assert tiny_decoder.build_prompt("Q?") == "Answer briefly: Q?\nAnswer:"
    custom = tiny_decoder.config.update(prompt_template="{passage} | {question}")
    assert tiny_decoder.build_prompt("Q?", "P.", config=custom) == "P. | Q?\nAnswer:"
    assert tiny_decoder.tokenizer.pad_token is not None  # was None: the decoder set one
    assert tiny_decoder.tokenizer.padding_side == "left"


def test_stream_yields_exactly_the_text_of_generate(tiny_decoder):
    for opts in ({}, {"stop": ["the"]}, {"do_sample": True, "seed": 3, "temperature": 1.5}):
        ans = tiny_decoder.generate("Where is the tower?", PASSAGES, max_new_tokens=20, **opts)
        events = list(tiny_decoder.stream("Where is the tower?", PASSAGES, max_new_tokens=20, **opts))
        assert "".join(e.text for e in events) == ans.text
        assert events[-1].answer.token_ids == ans.token_ids
        assert events[-1].finish_reason in ("stop", "length")


def test_no_passages_is_plain_generation(tiny_decoder):
    ans = tiny_decoder.generate("Where is the tower?", [], max_new_tokens=8)
    ref_ids, _ = reference_generate(tiny_decoder, "Where is the tower?", [], 8)
    assert ans.token_ids == ref_ids
    assert set(ans.token_sources) <= {-1}
    assert ans.sources == [] and ans.supported is False


def test_empty_passages_are_dropped_and_indices_kept(tiny_decoder):
    ans = tiny_decoder.generate("Where?", ["", "   ", PASSAGES[0], "\n"], max_new_tokens=4)
    assert [s.index for s in ans.sources] == [2]
    assert set(ans.token_sources) <= {2}
    assert ans.token_ids == tiny_decoder.generate("Where?", [PASSAGES[0]], max_new_tokens=4).token_ids


def test_passage_objects_and_scores(tiny_decoder):
    from nbce_rag import Passage

    ps = [Passage("The Eiffel Tower is in Paris.", score=0.8, id="a"), {"text": "Water boils.", "score": 0.3, "id": "b"}]
    ans = tiny_decoder.generate("Where?", ps, max_new_tokens=6, pooling="replug")
    assert [(s.id, s.score) for s in ans.sources] == [("a", 0.8), ("b", 0.3)]
    assert sum(s.n_tokens for s in ans.sources) == len(ans.token_ids)
    assert sum(s.share for s in ans.sources) == pytest.approx(1.0)


def test_stop_strings_cut_the_answer(tiny_decoder):
    free = tiny_decoder.generate("Where is the tower?", PASSAGES, max_new_tokens=20)
    assert len(free.text) > 4
    stop = free.text[2:4]
    cut = tiny_decoder.generate("Where is the tower?", PASSAGES, max_new_tokens=20, stop=[stop])
    assert cut.finish_reason == "stop"
    assert stop not in cut.text
    assert free.text.startswith(cut.text)


def test_sampling_is_reproducible_with_a_seed(tiny_decoder):
    a = tiny_decoder.generate("Where?", PASSAGES, max_new_tokens=10, do_sample=True, seed=7, temperature=2.0, top_k=50, top_p=0.9)
    b = tiny_decoder.generate("Where?", PASSAGES, max_new_tokens=10, do_sample=True, seed=7, temperature=2.0, top_k=50, top_p=0.9)
    assert a.token_ids == b.token_ids
    outs = {tuple(tiny_decoder.generate("Where?", PASSAGES, max_new_tokens=10, do_sample=True, seed=s, temperature=3.0).token_ids) for s in range(6)}
    assert len(outs) > 1


def test_max_new_tokens_and_usage(tiny_decoder):
    ans = tiny_decoder.generate("Where?", PASSAGES, max_new_tokens=5)
    assert len(ans.token_ids) <= 5 and ans.completion_tokens <= 5
    assert ans.prompt_tokens > 0


def test_long_passage_is_split_into_windows_with_a_warning(tiny_tokenizer, caplog):
    from conftest import make_tiny_llama

    dec = NBCEDecoder(make_tiny_llama(len(tiny_tokenizer), max_positions=96), tiny_tokenizer)
    long = " ".join(f"Fact {i}: the river Thames flows through London." for i in range(40))
    with caplog.at_level(logging.WARNING, logger="nbce_rag.decoding.rows"):
        ans = dec.generate("Where does it flow?", [long, "Short one."], max_new_tokens=8)
    assert "split into" in caplog.text
    prep = dec._prepare("Where does it flow?", [(0, _p(long)), (1, _p("Short one."))], dec.config.update(max_new_tokens=8))
    assert len(prep.rows) > 3  # several windows for passage 0
    assert all(len(r.ids) + 8 <= 96 for r in prep.rows)
    assert {r.source for r in prep.rows} == {-1, 0, 1}
    assert set(ans.token_sources) <= {0, 1}


def test_question_that_leaves_no_room_names_the_limit(tiny_tokenizer):
    from conftest import make_tiny_llama

    dec = NBCEDecoder(make_tiny_llama(len(tiny_tokenizer), max_positions=64), tiny_tokenizer)
    with pytest.raises(PromptTooLongError, match="64"):
        dec.generate("why " * 80, ["a passage"], max_new_tokens=8)


@pytest.mark.parametrize(
    "question,passages,exc,match",
    [
        (42, [], TypeError, "question must be a str"),
        ("   ", [], ValueError, "question is empty"),
        ("Q?", "a single string", TypeError, "wrap it in a list"),
        ("Q?", [b"bytes"], TypeError, r"passages\[0\].*bytes"),
        ("Q?", [None], TypeError, "NoneType"),
        ("Q?", 5, TypeError, "passages must be a list"),
    ],
)
def test_bad_input_gets_a_clear_error(tiny_decoder, question, passages, exc, match):
    with pytest.raises(exc, match=match):
        tiny_decoder.generate(question, passages)


def test_bad_options_are_rejected(tiny_decoder):
    from nbce_rag import ConfigError

    with pytest.raises(TypeError, match="unknown decoding option"):
        tiny_decoder.generate("Q?", [], betta=1.0)
    with pytest.raises(ConfigError, match="top_p"):
        tiny_decoder.generate("Q?", [], nbce_top_p=0.0)
    with pytest.raises(ConfigError, match="unknown pooling"):
        tiny_decoder.generate("Q?", [], pooling="median")


def test_concat_baseline_is_one_plain_row(tiny_decoder):
    ans = tiny_decoder.generate_concat("Where?", PASSAGES[:2], max_new_tokens=6)
    joined = "\n\n".join(PASSAGES[:2])
    row = tiny_decoder.tokenizer(tiny_decoder.build_prompt("Where?", joined))["input_ids"]
    with torch.inference_mode():
        out = []
        for _ in range(6):
            tok = int(torch.argmax(tiny_decoder.model(torch.tensor([row + out])).logits[0, -1]))
            if tok in tiny_decoder._eos_ids:
                break
            out.append(tok)
    assert ans.token_ids == out


# ---------------------------------------------------------------- the real bundled model
EIFFEL_Q = "When was the Eiffel Tower completed?"
EIFFEL_PS = [
    "The Eiffel Tower is a wrought-iron lattice tower in Paris. It was completed in 1889.",
    "Bananas are rich in potassium.",
    " ".join(["The river Thames flows through London into the North Sea."] * 4),
]


def assert_equals_reference(dec, question, passages, max_new_tokens):
    """generate() gives the reference's tokens and sources exactly; returns the answer. The
    reference decodes unscored passages, so the decoder is compared with its scorer off (the
    scorer's own path is tested in test_scoring.py)."""
    dec = NBCEDecoder(dec.model, dec.tokenizer, dec.config, kv_cache=dec.kv_cache, scorer=None)
    ans = dec.generate(question, passages, max_new_tokens=max_new_tokens)
    ref_ids, ref_src = reference_generate(dec, question, passages, max_new_tokens)
    assert ans.token_ids == ref_ids
    assert ans.token_sources == ref_src
    return ans


@pytest.mark.slow
def test_bundled_model_batched_equals_reference(bundled_decoder):
    ans = assert_equals_reference(bundled_decoder, EIFFEL_Q, EIFFEL_PS, 10)
    assert ans.sources[0].n_tokens > 0  # the passage that answers supplies tokens


@pytest.mark.slow
def test_bundled_model_stream_equals_generate(bundled_decoder):
    ps = ["Mount Everest is 8,849 metres high.", "Bananas are yellow."]
    ans = bundled_decoder.generate("How high is Mount Everest?", ps, max_new_tokens=16)
    text = "".join(e.text for e in bundled_decoder.stream("How high is Mount Everest?", ps, max_new_tokens=16))
    assert text == ans.text
    assert "Everest" in ans.text


def test_compare_shares_one_prefill_and_equals_generate(tiny_decoder):
    from nbce_rag.decoding.nbce import POOLINGS

    variants = [{"pooling": p} for p in sorted(POOLINGS)] + [{"beta": 0.0}, {"max_new_tokens": 3}]
    ps = [{"text": t, "score": 0.1 * (i + 1)} for i, t in enumerate(PASSAGES)]
    answers = tiny_decoder.compare("When was it completed?", ps, variants, max_new_tokens=8)
    for v, a in zip(variants, answers):
        opts = {"max_new_tokens": 8, **v}
        g = tiny_decoder.generate("When was it completed?", ps, **opts)
        assert a.token_ids == g.token_ids and a.token_sources == g.token_sources and a.text == g.text, v
    with pytest.raises(ValueError, match="prompt_template"):
        tiny_decoder.compare("Q?", PASSAGES, [{"prompt_template": "{passage}{question}"}])


def test_nbce_is_invariant_to_passage_order(tiny_decoder):
    """Rows are independent and pooled symmetrically: permuting the passages permutes the
    sources and changes no token (concatenation, by contrast, depends on the order)."""
    q = "When was it completed?"
    ps = [f"Note {i}. {p}" for i, p in enumerate(PASSAGES)]
    perm = [2, 0, 3, 1]
    a = tiny_decoder.generate(q, ps, max_new_tokens=10)
    b = tiny_decoder.generate(q, [ps[i] for i in perm], max_new_tokens=10)
    assert a.token_ids == b.token_ids
    assert [perm[s] for s in b.token_sources] == a.token_sources
