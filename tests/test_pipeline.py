"""RAGPipeline behaviour (retrieve -> filter -> NBCE) and the `nbce-rag ask` command."""

from __future__ import annotations

import json

import pytest

from nbce_rag import EncoderMismatchError, MarginThreshold, Passage, RAGPipeline, VectorIndex
from nbce_rag.cli import main
from nbce_rag.errors import ConfigError
from nbce_rag.pipeline import ABSTAIN_TEXT

from conftest import DOCS, N, Q, Q_NONE  # noqa: E402


@pytest.fixture(scope="module")
def index(encoder):
    return VectorIndex.build(encoder, [{"id": f"d{i}", "text": t} for i, t in enumerate(DOCS)])


@pytest.fixture(scope="module")
def threshold(encoder):
    return MarginThreshold(threshold=0.35, lower=0.25, upper=0.6, margin=0.25, encoder_identity=encoder.identity)


@pytest.fixture(scope="module")
def rag(tiny_chat_decoder, index, threshold):
    return RAGPipeline(tiny_chat_decoder, index, threshold, k=5)


def test_retrieve_is_index_search(rag, index):
    assert [(h.id, h.score) for h in rag.retrieve(Q)] == [(h.id, h.score) for h in index.search(Q, 5)]
    assert len(rag.retrieve(Q, k=2)) == 2
    with pytest.raises(ValueError, match="k must be"):
        RAGPipeline(rag.decoder, k=0)


def test_filter_keeps_relevant_and_explains_drops(rag, threshold):
    kept, dropped = rag.select(Q)
    assert kept and {p.id for p in kept} <= {"d0#0", "d1#0"}
    assert all(p.score >= threshold.threshold for p in kept)
    assert len(kept) + len(dropped) == 5
    assert {d.code for d in dropped} <= {"below_threshold", "outside_margin"}
    for d in dropped:
        assert f"{d.score:.4f}" in d.reason  # the numbers that decided it
        if d.code == "below_threshold":
            assert d.score < threshold.threshold and f"{threshold.threshold:.4f}" in d.reason
            assert d.zone == ("confident" if d.score < threshold.lower else "uncertain")
    ans = rag.ask(Q, max_new_tokens=N)
    assert ans.supported is True
    assert [s.id for s in ans.sources] == [p.id for p in kept]
    assert [d.to_dict()["code"] for d in ans.dropped] == [d.code for d in dropped]
    assert ans.text == rag.decoder.generate(Q, kept, max_new_tokens=N).text


def test_outside_margin_reason(tiny_chat_decoder, index, encoder):
    # a low threshold and a tight margin: candidates far below the best are dropped by the margin
    th = MarginThreshold(threshold=-1.0, lower=-1.0, upper=0.9, margin=0.1, encoder_identity=encoder.identity)
    rag = RAGPipeline(tiny_chat_decoder, index, th, k=6)
    kept, dropped = rag.select(Q)
    best = max(p.score for p in kept)
    assert dropped and all(d.code == "outside_margin" for d in dropped)
    assert all(best - d.score > 0.1 and "margin 0.1000" in d.reason for d in dropped)


def test_abstains_or_closed_book_when_filter_keeps_nothing(rag):
    kept, dropped = rag.select(Q_NONE)
    assert kept == [] and len(dropped) == 5
    # default: abstain -- a plain answer, no decoding, no invented answer
    ans = rag.ask(Q_NONE, max_new_tokens=N)
    assert ans.supported is False and ans.answered_from == "abstained"
    assert ans.text == ABSTAIN_TEXT and ans.token_ids == [] and ans.sources == [] and ans.completion_tokens == 0
    assert len(ans.dropped) == 5 and ans.notes and ans.calibration == rag.calibration
    assert ans.support_score == max(d.score for d in dropped) and ans.support_threshold == 0.35
    assert ans.grounding()["answered_from"] == "abstained" and ans.metadata()["dropped"][0]["code"]
    # closed-book when asked: exactly the no-passage answer, never the top-k candidates, flagged
    cb = rag.ask(Q_NONE, max_new_tokens=N, on_unsupported="closed_book")
    assert cb.supported is False and cb.answered_from == "closed_book" and "not from the documents" in cb.notes[0]
    assert cb.sources == [] and set(cb.token_sources) == {-1} and len(cb.dropped) == 5
    assert cb.text == rag.decoder.generate(Q_NONE, [], max_new_tokens=N).text
    with pytest.raises(ConfigError, match="on_unsupported"):
        rag.ask(Q_NONE, on_unsupported="guess")


def test_stream_text_equals_ask(rag):
    for q in (Q, Q_NONE):
        events = list(rag.stream(q, max_new_tokens=N))
        ask = rag.ask(q, max_new_tokens=N)
        assert "".join(ev.text for ev in events) == ask.text
        assert all(ev.answer is None for ev in events[:-1])
        last = events[-1].answer
        assert last.text == ask.text and last.supported == ask.supported
        assert len(last.dropped) == len(ask.dropped)
        assert [ev.source for ev in events[:-1]] == ask.token_sources[: len(events) - 1]


def test_passages_path_rescores_and_filters(rag, encoder):
    # passages from elsewhere (wrong store scores): re-scored with the canonical cosine, filtered
    given = [Passage(text=t, score=0.99, id=f"x{i}", metadata={"src": "store"}) for i, t in enumerate(DOCS)]
    kept, dropped = rag.select(Q, passages=given)
    ref, _ = rag.select(Q)
    assert [p.text for p in kept] == [p.text for p in ref]
    assert [p.score for p in kept] == pytest.approx([p.score for p in ref], abs=1e-5)
    assert all(p.metadata["store_score"] == 0.99 and p.metadata["src"] == "store" for p in kept)
    assert len(kept) + len(dropped) == len(DOCS)
    ans = rag.ask(Q, passages=given, max_new_tokens=N)
    assert ans.text == rag.ask(Q, max_new_tokens=N).text
    # strings and dicts are accepted; blank passages are removed; a bare string is an error
    kept2, _ = rag.select(Q, passages=DOCS + ["   "])
    assert [p.text for p in kept2] == [p.text for p in ref]
    kept3, _ = rag.select(Q, passages=[{"text": DOCS[0], "id": "a"}])
    assert [p.id for p in kept3] == ["a"]
    with pytest.raises(TypeError, match="list of passages"):
        rag.select(Q, passages=DOCS[0])
    # nothing relevant among the given passages: they are not all dropped in silence -- the best
    # one is decoded, the answer is flagged unsupported and says why
    given2 = [DOCS[3], DOCS[5]]
    _, dropped2 = rag.select(Q, passages=given2)
    best = max(dropped2, key=lambda d: d.score)
    none = rag.ask(Q, passages=given2, max_new_tokens=N)
    assert none.supported is False and none.answered_from == "passages"
    assert [s.text for s in none.sources] == [best.hit.text] and len(none.dropped) == 1
    assert "none of the 2 passages given passed" in none.notes[0]
    assert none.text == rag.decoder.generate(Q, [best.hit], max_new_tokens=N).text


def test_passages_without_filter_go_through(tiny_chat_decoder, index):
    rag = RAGPipeline(tiny_chat_decoder, index, None, k=3)
    kept, dropped = rag.select(Q, passages=DOCS[3:])
    assert [p.text for p in kept] == DOCS[3:] and dropped == []
    assert rag.ask(Q, passages=DOCS[3:], max_new_tokens=N).text == tiny_chat_decoder.generate(Q, DOCS[3:], max_new_tokens=N).text
    kept, _ = rag.select(Q)
    assert [p.id for p in kept] == [h.id for h in index.search(Q, 3)]
    no_index = RAGPipeline(tiny_chat_decoder)
    assert no_index.ask(Q, passages=DOCS[:2], max_new_tokens=N).supported is True
    with pytest.raises(ValueError, match="no index"):
        no_index.ask(Q)
    with pytest.raises(ValueError, match="empty"):
        rag.ask("   ")


def test_from_pretrained_loads_calibration(tmp_path, tiny_chat_decoder, index, threshold, encoder):
    d = tmp_path / "idx"
    index.save(d)
    # no calibration.json: the shipped prior of the bundled encoder filters (nbce_rag.filtering.prior);
    # without the prior, nothing does
    rag = RAGPipeline.from_pretrained(d, encoder=encoder, decoder=tiny_chat_decoder, k=4)
    assert rag.k == 4 and rag.calibration.startswith("prior for") and rag.threshold is not None
    rag = RAGPipeline.from_pretrained(d, encoder=encoder, decoder=tiny_chat_decoder, k=4, threshold="no-prior")
    assert rag.threshold is None and rag.calibration.startswith("none")
    threshold.save(d)
    rag = RAGPipeline.from_pretrained(d, encoder=encoder, decoder=tiny_chat_decoder, k=5)
    assert rag.threshold is not None and rag.threshold.threshold == threshold.threshold
    assert rag.ask(Q_NONE, max_new_tokens=N).supported is False
    assert RAGPipeline.from_pretrained(d, encoder=encoder, decoder=tiny_chat_decoder, threshold=None).threshold is None
    other = MarginThreshold(threshold=0.3, lower=0.2, upper=0.5, margin=None, encoder_identity="other@sha256:0123456789abcdef")
    with pytest.raises(EncoderMismatchError):
        RAGPipeline(tiny_chat_decoder, index, other)


# ------------------------------------------------------------------------------------ nbce-rag ask


@pytest.fixture(scope="module")
def ask_setup(tmp_path_factory, tiny_chat_tokenizer, index, threshold):
    """An index directory with a calibration, and the tiny model saved as a model directory."""
    from conftest import save_tiny_llama

    root = tmp_path_factory.mktemp("ask")
    index.save(root / "idx")
    threshold.save(root / "idx")
    save_tiny_llama(root / "model", tiny_chat_tokenizer, seed=1)
    return root


def test_ask_command(ask_setup, capsys):
    idx, model = str(ask_setup / "idx"), str(ask_setup / "model")
    assert main(["ask", Q, "--index", idx, "--model", model, "--max-new-tokens", str(N), "-k", "5", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "Supported: yes" in out and "dropped by the filter" in out
    assert "[1] score 0." in out and "d0#0" in out and "share" in out

    assert main(["ask", *Q_NONE.split(), "--index", idx, "--model", model, "--max-new-tokens", str(N),
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(ABSTAIN_TEXT) and "Supported: no -- nothing in the documents answers" in out
    assert "Sources:" not in out and "KV cache" not in out and "support threshold 0.350" in out
    assert main(["ask", *Q_NONE.split(), "--index", idx, "--model", model, "--max-new-tokens", str(N),
                 "--device", "cpu", "--on-unsupported", "closed_book"]) == 0
    out = capsys.readouterr().out
    assert "Supported: no" in out and "closed-book" in out and "Sources:" not in out
    assert not out.startswith(ABSTAIN_TEXT)

    assert main(["ask", Q_NONE, "--index", idx, "--model", model, "--max-new-tokens", str(N), "-k", "2",
                 "--no-filter", "--json", "--device", "cpu"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["question"] == Q_NONE and d["supported"] is True and len(d["sources"]) == 2
    assert d["completion_tokens"] <= N and d["dropped"] == []


def test_ask_command_errors(ask_setup, tmp_path, capsys):
    assert main(["ask", Q, "--index", str(tmp_path / "missing"), "--model", str(ask_setup / "model")]) == 2
    assert "no index" in capsys.readouterr().err


def test_ask_help_is_light():
    """The ask module imports nothing heavy until its handler runs."""
    import subprocess
    import sys

    code = ("import argparse, sys, nbce_rag.commands.ask as a\n"
            "p = argparse.ArgumentParser(prog='nbce-rag'); a.register(p.add_subparsers())\n"
            "print(p.format_help() and 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


# ------------------------------------------------------------------------------------ bundled models


@pytest.mark.slow
def test_bundled_pipeline_answers_from_sources(bundled_decoder, index, threshold):
    rag = RAGPipeline(bundled_decoder, index, threshold, k=5)
    ans = rag.ask(Q, max_new_tokens=24)
    assert ans.supported and "eiffel" in ans.text.lower()
    assert sum(s.n_tokens for s in ans.sources) > 0
    assert all(s.id in ("d0#0", "d1#0") for s in ans.sources)
    none = rag.ask(Q_NONE, max_new_tokens=24)
    assert none.supported is False and none.sources == []


def test_pipeline_options_do_not_mutate_the_given_decoder(tiny_decoder):
    from nbce_rag import RAGPipeline

    before = tiny_decoder.config.beta
    rag = RAGPipeline.from_pretrained(None, threshold=None, decoder=tiny_decoder, beta=before + 1.0)
    assert rag.decoder.config.beta == before + 1.0
    assert tiny_decoder.config.beta == before
    assert rag.decoder.model is tiny_decoder.model


def test_langchain_style_document_score_in_metadata_is_read():
    from nbce_rag.types import as_passage

    class Doc:
        page_content = "text"
        metadata = {"score": 0.42}

    assert as_passage(Doc()).score == 0.42


def test_batch_and_step_api_carry_both_decisions(rag):
    """An abstained question in a batch is answered without a model call (its state is preset);
    the others decode as with ask; every answer carries the filter's flags."""
    got = rag.batch([Q, Q_NONE, Q], max_new_tokens=N)
    alone = [rag.ask(q, max_new_tokens=N) for q in (Q, Q_NONE)]
    assert [a.text for a in got] == [alone[0].text, alone[1].text, alone[0].text]
    assert got[1].answered_from == "abstained" and got[1].text == ABSTAIN_TEXT and not got[1].supported
    assert got[0].supported and got[0].support_score == alone[0].support_score and got[0].calibration == rag.calibration
    state = rag.start(Q_NONE)
    assert state.preset is not None and state.n_rows == 1  # nothing to decode but the prompt row
    cb = rag.batch([Q_NONE], max_new_tokens=N, on_unsupported="closed_book")[0]
    assert cb.answered_from == "closed_book" and cb.text == rag.decoder.generate(Q_NONE, [], max_new_tokens=N).text
