"""Calibration without labels (issue 15): shipped priors, precedence, identity checks, the
synthetic recipe with the tiny random model, answer-oriented objectives, the off-topic path."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nbce_rag import EncoderMismatchError, MarginThreshold, RAGPipeline, VectorIndex
from nbce_rag.errors import CalibrationError, CorruptFileError
from nbce_rag.filtering.objective import parse_objective
from nbce_rag.filtering.prior import (PRIOR_DIR, PRIOR_PATH_ENV, SYNTHETIC_FILENAME, find_prior, prior_files,
                            resolve_calibration)

from conftest import DOCS, N, Q, Q_NONE  # noqa: E402

OTHER = "other-encoder@sha256:0123456789abcdef"


@pytest.fixture(scope="module")
def index(encoder):
    return VectorIndex.build(encoder, [{"id": f"d{i}", "text": t} for i, t in enumerate(DOCS)])


def _th(ident, t=0.35, source=None):
    th = MarginThreshold(threshold=t, lower=t - 0.1, upper=min(t + 0.2, 1.0), margin=0.25, encoder_identity=ident)
    if source:
        th.stats["source"] = source
    return th


@pytest.fixture
def prior_dir(tmp_path, monkeypatch):
    """An empty prior search path in front of the shipped priors."""
    d = tmp_path / "priors"
    d.mkdir()
    monkeypatch.setenv(PRIOR_PATH_ENV, str(d))
    return d


# ------------------------------------------------------------------------------ the shipped prior


def test_shipped_prior_is_package_data_for_the_bundled_encoder(encoder):
    files = sorted(PRIOR_DIR.glob("*.json"))
    assert files, "no prior shipped under nbce_rag/filtering/priors/"
    th = find_prior(encoder)
    assert th is not None and th.stats["source"] == "prior"
    assert th.encoder_identity.rsplit("@", 1)[1] == encoder.identity.rsplit("@", 1)[1]
    assert set(th.stats["prior"]["datasets"]) >= {"scifact", "squad", "nq", "hotpotqa"}
    assert th.ci.get("threshold") is not None  # confidence intervals are kept
    assert -1 < th.threshold < 1 and th.lower <= th.threshold <= th.upper
    import tomllib
    from pathlib import Path

    py = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    data = py["tool"]["setuptools"]["package-data"]["nbce_rag.filtering"]
    assert "priors/*.json" in data  # wheels carry it


def test_find_prior_matches_the_weight_digest_only(prior_dir, encoder):
    _th(OTHER, 0.9).save(prior_dir / "other.json")
    assert find_prior(OTHER).threshold == 0.9
    # same digest, another name: still the same weights
    assert find_prior("renamed@sha256:0123456789abcdef").threshold == 0.9
    # another encoder's prior is never used
    assert find_prior("third@sha256:ffffffffffffffff") is None
    assert prior_files()[0] == prior_dir / "other.json"


def test_corrupt_prior_is_a_clear_error(prior_dir, encoder):
    (prior_dir / "broken.json").write_text("{ not json")
    with pytest.raises(CorruptFileError, match="broken.json"):
        find_prior(encoder)
    (prior_dir / "broken.json").write_text(json.dumps({"format": "nbce-rag/margin-threshold", "version": 1}))
    with pytest.raises(CorruptFileError, match="broken.json.*(malformed|missing)"):
        find_prior(encoder)
    d = _th(None).to_dict()
    (prior_dir / "broken.json").write_text(json.dumps(d))
    with pytest.raises(CorruptFileError, match="broken.json.*encoder.identity"):
        find_prior(encoder)


# ------------------------------------------------------------------------------ precedence


def test_precedence_labelled_synthetic_prior_none(tmp_path, prior_dir, index, encoder, monkeypatch):
    import nbce_rag.filtering.prior as prior_mod

    monkeypatch.setattr(prior_mod, "PRIOR_DIR", tmp_path / "no-shipped")  # only prior_dir counts
    d = tmp_path / "idx"
    index.save(d)
    assert resolve_calibration(d, index).source == "none"
    _th(encoder.identity, 0.30).save(prior_dir / "mine.json")
    _th(OTHER, 0.99).save(prior_dir / "aaa-other.json")  # listed first, never applied
    r = resolve_calibration(d, index)
    assert (r.source, r.threshold.threshold) == ("prior", 0.30) and "prior for" in r.describe()
    assert resolve_calibration(d, index, use_prior=False).source == "none"
    _th(encoder.identity, 0.40).save(d / SYNTHETIC_FILENAME)
    r = resolve_calibration(d, index)
    assert (r.source, r.threshold.threshold) == ("synthetic", 0.40)
    _th(encoder.identity, 0.50).save(d)
    r = resolve_calibration(d, index)
    assert (r.source, r.threshold.threshold) == ("labelled", 0.50)
    # an index calibration of another encoder is an error, not skipped
    _th(OTHER).save(d)
    with pytest.raises(EncoderMismatchError):
        resolve_calibration(d, index)


# ------------------------------------------------------------------------------ off-topic end to end


def test_off_topic_question_with_prior_abstains_unsupported(tmp_path, prior_dir, index, encoder,
                                                                      tiny_chat_decoder, monkeypatch, caplog):
    import nbce_rag.filtering.prior as prior_mod
    from nbce_rag.commands.ask import print_sources

    monkeypatch.setattr(prior_mod, "PRIOR_DIR", tmp_path / "no-shipped")
    th = _th(encoder.identity, 0.35, source="prior")
    th.stats["prior"] = {"datasets": ["scifact", "squad"]}
    th.save(prior_dir / "bundled.json")
    d = tmp_path / "idx"
    index.save(d)
    with caplog.at_level("WARNING", logger="nbce_rag.pipeline"):
        rag = RAGPipeline.from_pretrained(d, encoder=encoder, decoder=tiny_chat_decoder, k=5)
        RAGPipeline.from_pretrained(d, encoder=encoder, decoder=tiny_chat_decoder, k=5)
    assert sum("filtering with prior for" in r.getMessage() for r in caplog.records) == 1  # said once
    assert rag.threshold.threshold == 0.35 and rag.calibration.startswith("prior for")
    on = rag.ask(Q, max_new_tokens=N)
    assert on.supported is True and on.calibration == rag.calibration
    off = rag.ask(Q_NONE, max_new_tokens=N)  # default: abstain, no invented answer
    assert off.supported is False and off.sources == [] and len(off.dropped) == 5
    assert off.answered_from == "abstained" and off.token_ids == []
    assert off.to_dict()["calibration"].startswith("prior for")
    cb = rag.ask(Q_NONE, max_new_tokens=N, on_unsupported="closed_book")
    assert cb.text == tiny_chat_decoder.generate(Q_NONE, [], max_new_tokens=N).text  # closed-book, flagged
    assert cb.supported is False and cb.answered_from == "closed_book"

    import io

    buf = io.StringIO()
    print_sources(off, out=buf)
    out = buf.getvalue()
    assert "Supported: no -- nothing in the documents answers this question" in out and "nothing decoded" in out
    assert "Filter: prior for" in out and "support threshold 0.350" in out
    buf = io.StringIO()
    print_sources(cb, out=buf)
    assert "closed-book" in buf.getvalue()

    from nbce_rag.integrations.server import nbce_info

    info = nbce_info(off, retrieved=True)
    assert info["supported"] is False and info["calibration"].startswith("prior for")


# ------------------------------------------------------------------------------ synthetic


def test_synthetic_calibration_with_tiny_model_is_deterministic(tiny_chat_decoder, encoder):
    from nbce_rag.filtering.synthetic import synthetic_calibration

    docs = [f"Passage {i}: " + " ".join(f"word{(i * 7 + j) % 50}" for j in range(30)) for i in range(24)]
    idx = VectorIndex.build(encoder, [{"id": f"p{i}", "text": t} for i, t in enumerate(docs)])
    kw = dict(n=12, k=6, filter_top=6, seed=3, max_new_tokens=8, min_positives=2, min_negatives=2,
              n_bootstrap=20)
    with pytest.warns(Warning):
        a = synthetic_calibration(idx, tiny_chat_decoder, **kw)
    with pytest.warns(Warning):
        b = synthetic_calibration(idx, tiny_chat_decoder, **kw)
    sa, sb = a.stats["synthetic"], b.stats["synthetic"]
    assert sa["examples"] == sb["examples"] and (a.threshold, a.margin) == (b.threshold, b.margin)
    assert sa["n_sampled"] == 12 and 0 < sa["n_kept"] <= sa["n_questions"] <= 12
    assert a.stats["source"] == "synthetic" and a.encoder_identity == encoder.identity
    assert a.stats["n_positives"] == sa["n_kept"]  # exactly the source chunk is relevant per question
    with pytest.warns(Warning):
        c = synthetic_calibration(idx, tiny_chat_decoder, **{**kw, "seed": 4})
    assert c.stats["synthetic"]["examples"] != sa["examples"]  # another seed samples other chunks
    with pytest.raises(CalibrationError, match="filter_top"):
        synthetic_calibration(idx, tiny_chat_decoder, n=4, k=3, filter_top=5)


def test_clean_question():
    from nbce_rag.filtering.synthetic import clean_question

    assert clean_question("Question: What is X made of? Answer: wood") == "What is X made of?"
    assert clean_question("1. Where is it?\nmore") == "Where is it?"
    assert clean_question("Why?") is None and clean_question("") is None


# ------------------------------------------------------------------------------ objectives


def _multi(seed=0, n_q=60, k=8):
    rng = np.random.default_rng(seed)
    S, Y, G = [], [], []
    for q in range(n_q):
        n_rel = rng.integers(0, 4)
        y = np.r_[np.ones(n_rel), np.zeros(k - n_rel)]
        s = np.where(y > 0, rng.normal(0.6, 0.1, k), rng.normal(0.35, 0.12, k))
        S += list(s)
        Y += list(y)
        G += [q] * k
    return np.array(S), np.array(Y), np.array(G)


def test_objectives_trade_recall_for_precision():
    S, Y, G = _multi()
    f1 = MarginThreshold.calibrate(S, Y, G, n_bootstrap=0, objective="f1")
    f05 = MarginThreshold.calibrate(S, Y, G, n_bootstrap=0, objective="f0.5")
    cov = MarginThreshold.calibrate(S, Y, G, n_bootstrap=50, objective="coverage0.8")
    assert f05.stats["objective"] == "f0.5" and cov.stats["objective"] == "coverage0.8"
    assert f05.stats["rule"]["precision"] >= f1.stats["rule"]["precision"]
    assert f05.stats["rule"]["recall"] <= f1.stats["rule"]["recall"]
    # coverage: a relevant passage is kept for >= 80% of the answerable queries
    keep = cov.keep_mask(S, G)
    ans = [q for q in np.unique(G) if Y[G == q].sum() > 0]
    covered = np.mean([bool((keep & (Y > 0))[G == q].any()) for q in ans])
    assert covered >= 0.8 - 1e-9
    assert cov.ci.get("threshold") is not None
    with pytest.raises(CalibrationError, match="objective"):
        parse_objective("accuracy")
    assert parse_objective("coverage").target == 0.9 and parse_objective("F0.25").beta == 0.25


def test_calibrate_command_needs_a_mode(capsys):
    from nbce_rag.cli import main

    assert main(["calibrate"]) == 2  # bad input: one error line, exit 2 (the CLI convention)
    assert "--synthetic --index DIR" in capsys.readouterr().err
    assert main(["calibrate", "--prior"]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["calibrate", "--prior", "--data", "x", "--objective", "bad"]) == 2
    assert "--objective" in capsys.readouterr().err


def test_index_calibrate_runs_the_synthetic_recipe(tmp_path, tiny_chat_tokenizer, capsys):
    """`nbce-rag index ... --calibrate`: the index is written, then the synthetic recipe runs with
    --model; too few kept questions for a calibration is a clear error that says what to do."""
    from conftest import save_tiny_llama
    from nbce_rag.cli import main

    save_tiny_llama(tmp_path / "model", tiny_chat_tokenizer, seed=1)
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(6):
        (docs / f"d{i}.txt").write_text(" ".join(f"topic{i} word{j}" for j in range(15)))
    rc = main(["index", str(docs), "--out", str(tmp_path / "idx"), "--calibrate", "--calibrate-n", "4",
               "--model", str(tmp_path / "model")])
    err = capsys.readouterr().err
    assert rc == 2 and "raise --calibrate-n" in err and "min_positives" not in err  # the option the user set
    assert (tmp_path / "idx" / "manifest.json").exists() or any((tmp_path / "idx").iterdir())
    assert not (tmp_path / "idx" / SYNTHETIC_FILENAME).exists()


def test_shipped_prior_loads_with_both_decisions(encoder):
    """The shipped prior is a version-2 file: a keep rule and a support rule of its own."""
    th = find_prior(encoder)
    raw = json.loads(open(th.stats["prior_file"], encoding="utf-8").read())
    assert (th.keep.threshold, th.keep.margin) == (raw["threshold"], raw["margin"])
    assert raw["version"] == 2  # refitted for issue 23 (a version-1 file: test_threshold's v1 test)
    assert th.support.threshold == raw["support"]["threshold"] and th.support.stats["method"] == "off_topic"
    assert th.keep.threshold < th.support.threshold  # recall first for rows, precision first for the flag
    assert -1 < th.support.threshold < 1


def _small_corpus_cli(tmp_path, tiny_chat_tokenizer, encoder, monkeypatch, questions):
    """`calibrate --synthetic` on a 24-chunk index with the tiny random model, its question writer
    replaced by ``questions(chunk_texts)`` (a random model's replies are not questions)."""
    import nbce_rag.filtering.plot as plot_mod
    import nbce_rag.filtering.synthetic as synth_mod
    from conftest import save_tiny_llama
    from nbce_rag.cli import main

    save_tiny_llama(tmp_path / "model", tiny_chat_tokenizer, seed=1)
    docs = [f"Passage {i}: " + " ".join(f"word{(i * 7 + j) % 50}" for j in range(30)) for i in range(24)]
    VectorIndex.build(encoder, [{"id": f"p{i}", "text": t} for i, t in enumerate(docs)]).save(tmp_path / "idx")
    monkeypatch.setattr(plot_mod, "can_plot", lambda: False)
    monkeypatch.setattr(synth_mod, "generate_questions", lambda decoder, texts, **kw: questions(texts))
    return main(["calibrate", "--synthetic", "--index", str(tmp_path / "idx"), "--model", str(tmp_path / "model"),
                 "--n", "12", "-k", "6", "--filter-top", "6", "--bootstrap", "20", "--seed", "3"])


def test_cli_synthetic_small_corpus_without_matplotlib(tmp_path, tiny_chat_tokenizer, encoder, capsys, monkeypatch):
    """`calibrate --synthetic` on a small index ends in a calibration with a note, no traceback;
    without matplotlib no plot is written and a note says so. (Each question repeats its chunk, so
    the source ranks first and all 12 questions count: fewer than a full calibration needs.)"""
    rc = _small_corpus_cli(tmp_path, tiny_chat_tokenizer, encoder, monkeypatch, lambda texts: list(texts))
    out, err = capsys.readouterr()
    assert rc == 0 and "Traceback" not in err
    assert "no plot written: matplotlib is not installed" in err
    assert "note:       small corpus" in out and "support:" in out and "keep:" in out
    th = MarginThreshold.load(tmp_path / "idx" / SYNTHETIC_FILENAME)
    assert th.keep.method == "recall_first" and th.support.method == "in_domain_quantile"
    assert th.stats["synthetic"]["n_kept"] == 12
    assert not list((tmp_path / "idx").glob("*.png"))


def test_cli_synthetic_small_corpus_too_few_questions_is_one_error_line(tmp_path, tiny_chat_tokenizer, encoder,
                                                                         capsys, monkeypatch):
    """When the model writes too few usable questions (here: two), the calibration stops with one
    clear error line that says what to do, never a traceback, and writes no file."""
    rc = _small_corpus_cli(tmp_path, tiny_chat_tokenizer, encoder, monkeypatch,
                           lambda texts: [t if i < 2 else "" for i, t in enumerate(texts)])
    out, err = capsys.readouterr()
    assert rc in (1, 2) and "Traceback" not in err
    assert "error:" in err and "only 2 of 2 generated questions" in err and "--filter-top" in err
    assert not (tmp_path / "idx" / SYNTHETIC_FILENAME).exists()
