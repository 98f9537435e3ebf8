"""The ``nbce-rag`` command as a new user meets it: examples and help in every ``--help``, the
question positional everywhere (``-q`` as an alias), one error line and exit code 2 for bad
input *before* any model loads, ``ask``/``chat`` answering several questions with the models
loaded once, a progress bar while indexing, the file types listed from the reader's constants."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from nbce_rag.cli import build_parser, main

from conftest import N, save_tiny_llama  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _subparsers():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices


# ------------------------------------------------------------------------------------ help


def test_every_help_has_examples_and_every_option_a_help_text():
    parser, choices = _subparsers()
    assert "examples:" in parser.format_help()
    assert {"generate", "ask", "chat", "index", "search", "calibrate", "train", "serve", "demo"} <= set(choices)
    for name, p in choices.items():
        text = p.format_help()
        assert text.startswith(f"usage: nbce-rag {name}")
        epilog = text[text.index("examples:"):]
        # real command lines, kept as written (not re-wrapped into one paragraph)
        lines = [ln.strip() for ln in epilog.splitlines()[1:] if ln.strip()]
        assert lines and any(ln.startswith(f"nbce-rag {name}") for ln in lines), (name, epilog)
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and action.help != argparse.SUPPRESS, f"nbce-rag {name} {action.option_strings or action.dest}"


def test_help_snapshot_generate():
    text = _subparsers()[1]["generate"].format_help()
    for piece in ("QUESTION", "-q TEXT, --question TEXT", "--max-new-tokens N", "--temperature T", "--seed S",
                  "--top-p P", "--stream", "examples:\n  nbce-rag generate \"When was the tower built?\" -p"):
        assert piece in text, piece


def test_ask_has_the_decoding_options_of_generate():
    choices = _subparsers()[1]

    def opts(name):
        return {s for a in choices[name]._actions for s in a.option_strings}

    decoding = {"--max-new-tokens", "--pooling", "--beta", "--stop", "--sample", "--temperature", "--top-p",
                "--top-k", "--seed"}
    assert decoding <= opts("generate")
    assert decoding | {"--stream", "--json", "--dtype"} <= opts("ask")
    assert opts("ask") - {"-q", "--question"} == opts("chat")


def test_file_types_listed_from_the_reader_constants(tmp_path):
    from nbce_rag.retrieval.readers import JSONL_EXTENSIONS, PDF_EXTENSIONS, TEXT_EXTENSIONS, read_documents

    text = _subparsers()[1]["index"].format_help()
    flat = " ".join(text.split())
    for ext in TEXT_EXTENSIONS + JSONL_EXTENSIONS + PDF_EXTENSIONS:
        assert ext in flat, ext
    # what is listed is what the folder reader takes, .rst included
    for ext in TEXT_EXTENSIONS:
        (tmp_path / f"doc{ext}").write_text(f"text of a {ext} file", encoding="utf-8")
    (tmp_path / "skip.html").write_text("<p>not read</p>", encoding="utf-8")
    docs, report = read_documents([tmp_path])
    assert sorted(d.id for d in docs) == sorted(f"doc{e}" for e in TEXT_EXTENSIONS) and report.ignored == 1


@pytest.mark.parametrize("argv, words", [
    (["generate", "When", "was", "it", "built?", "-p", "x"], "When was it built?"),
    (["generate", "-q", "When was it built?", "-p", "x"], "When was it built?"),
    (["generate", "--question", "When was it built?"], "When was it built?"),
    (["ask", "When was it built?", "--index", "i"], "When was it built?"),
    (["ask", "-q", "When was it built?", "--index", "i"], "When was it built?"),
    (["search", "-q", "tower", "--index", "i"], "tower"),
    (["search", "tall", "tower", "--index", "i"], "tall tower"),
    (["ask", "--index", "i"], None),
    (["chat", "--index", "i"], None),
])
def test_question_positional_or_q(argv, words):
    from nbce_rag.commands.arguments import question_of

    args = build_parser().parse_args(argv)
    assert question_of(args) == words


# ------------------------------------------------------------------------------------ bad input


@pytest.fixture()
def no_loading(monkeypatch):
    """Every way a command loads a model or an index fails the test."""
    import nbce_rag.decoding.decoder
    import nbce_rag.retrieval.encoder
    import nbce_rag.retrieval.index
    import nbce_rag.models
    import nbce_rag.pipeline

    def boom(*a, **k):
        raise AssertionError("a model or index was loaded before the options were checked")

    monkeypatch.setattr(nbce_rag.models, "load_model", boom)
    monkeypatch.setattr(nbce_rag.decoding.decoder.NBCEDecoder, "from_pretrained", classmethod(boom))
    monkeypatch.setattr(nbce_rag.pipeline.RAGPipeline, "from_pretrained", classmethod(boom))
    monkeypatch.setattr(nbce_rag.retrieval.encoder.CoSENTEncoder, "from_pretrained", classmethod(boom))
    monkeypatch.setattr(nbce_rag.retrieval.index.VectorIndex, "load", classmethod(boom))


BAD = [
    (["ask", "", "--index", "idx"], "empty"),
    (["ask", "   ", "--index", "idx"], "empty"),
    (["generate", "-q", ""], "empty"),
    (["generate", "-p", "x"], "give a question"),
    (["generate", "q", "-q", "q2"], "once"),
    (["generate", "q", "--temperature", "nan"], "temperature"),
    (["generate", "q", "--temperature", "0"], "temperature"),
    (["ask", "q", "--index", "idx", "--beta", "inf"], "beta"),
    (["ask", "q", "--index", "idx", "--top-p", "1.5"], "top_p"),
    (["generate", "q", "--seed", "99999999999999999999999"], "seed"),
    (["generate", "q", "--seed", "-1"], "seed"),
    (["generate", "q", "--pooling", "foo"], "pooling"),
    (["chat", "--index", "idx", "--max-new-tokens", "0"], "max_new_tokens"),
    (["generate", "q", "--device", "tpu9"], "device"),
    (["generate", "q", "--dtype", "float7"], "dtype"),
    (["index", "docs", "--out", "o", "--batch-size", "0"], "--batch-size"),
    (["index", "docs", "--out", "o", "--chunk-tokens", "-5"], "--chunk-tokens"),
    (["index", "docs", "--out", "o", "--chunk-tokens", "10", "--overlap", "10"], "--overlap"),
    (["ask", "q", "--index", "idx", "-k", "0"], "-k"),
    (["search", "", "--index", "idx"], "empty"),
    (["calibrate", "--index", "i", "--queries", "q", "--qrels", "r", "--margin", "nan"], "--margin"),
    (["calibrate", "--index", "i", "--queries", "q", "--qrels", "r", "--precision-target", "nan"], "precision"),
    (["demo", "", "--index-dir", "d"], "empty"),
]


def _rc(argv) -> int:
    """main()'s exit status, also when argparse itself rejects a value (it exits)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("argv, says", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_before_loading(argv, says, no_loading, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = _rc(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and says in err, err
    assert "Traceback" not in err


def test_bad_input_in_a_fresh_process_prints_no_traceback(tmp_path):
    """The real command, as a shell runs it (cases of the reliability sweep)."""
    for argv in (["ask", "", "--index", str(tmp_path)], ["generate", "q", "--temperature", "nan"],
                 ["generate", "q", "--seed", "99999999999999999999999"],
                 ["index", str(tmp_path), "--out", str(tmp_path / "o"), "--batch-size", "0"]):
        r = subprocess.run([sys.executable, "-m", "nbce_rag.cli", *argv], capture_output=True, text=True,
                           timeout=120, cwd=REPO)
        assert r.returncode == 2, (argv, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, (argv, r.stderr)
        assert r.stdout == ""


# ------------------------------------------------------------------------------------ with tiny models


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_chat_tokenizer):
    """A folder of documents, a tiny encoder and the tiny chat model saved as a model directory."""
    from conftest import make_tiny_encoder

    root = tmp_path_factory.mktemp("cli")
    make_tiny_encoder(root / "enc", seed=0)
    docs = root / "docs"
    docs.mkdir()
    (docs / "tower.md").write_text("# Tower\n\nThe Eiffel Tower is in Paris and was completed in 1889.", encoding="utf-8")
    (docs / "guide.rst").write_text("Mountains\n=========\n\nMount Everest is the highest mountain.", encoding="utf-8")
    (docs / "fruit.txt").write_text("Bananas are rich in potassium.\n" * 60, encoding="utf-8")
    save_tiny_llama(root / "model", tiny_chat_tokenizer, seed=1)
    return root


def test_index_shows_progress_and_reads_rst(setup, tmp_path, capsys):
    out = tmp_path / "idx"
    assert main(["index", str(setup / "docs"), "--out", str(out), "--encoder", str(setup / "enc" / "model"),
                 "--chunk-tokens", "16", "--overlap", "0", "--batch-size", "4"]) == 0
    cap = capsys.readouterr()
    assert "Batches" in cap.err  # the embedding bar, although far below 16 batches
    assert "indexed 3 document(s)" in cap.out
    assert main(["search", "-q", "highest mountain", "--index", str(out), "--json", "-k", "1"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits[0]["id"].startswith("guide.rst")
    assert main(["index", str(setup / "docs"), "--out", str(tmp_path / "quiet"), "--encoder", str(setup / "enc" / "model"),
                 "--no-progress"]) == 0
    assert "Batches" not in capsys.readouterr().err


@pytest.fixture(scope="module")
def index_dir(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_idx") / "idx"
    assert main(["index", str(setup / "docs"), "--out", str(out), "--encoder", str(setup / "enc" / "model"),
                 "--chunk-tokens", "32", "--overlap", "0", "--no-progress"]) == 0
    return out


def test_ask_stream_and_decoding_options(setup, index_dir, capsys):
    base = ["--index", str(index_dir), "--model", str(setup / "model"), "--device", "cpu", "-k", "2"]
    assert main(["ask", "When was the tower built?", *base, "--max-new-tokens", str(N), "--json",
                 "--beta", "0", "--pooling", "mean"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["question"] == "When was the tower built?" and 1 <= d["completion_tokens"] <= N
    ref = d["text"]
    assert main(["ask", "-q", "When was the tower built?", *base, "--max-new-tokens", str(N), "--stream",
                 "--beta", "0", "--pooling", "mean"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(ref) and "Sources:" in out
    # sampling options reach the decoder: the same seed gives the same answer
    runs = []
    for _ in range(2):
        assert main(["ask", "tower?", *base, "--max-new-tokens", str(N), "--sample", "--temperature", "1.5",
                     "--seed", "7", "--json"]) == 0
        runs.append(json.loads(capsys.readouterr().out)["text"])
    assert runs[0] == runs[1]


def test_generate_question_positional_with_options(setup, capsys, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("Mount Everest is the highest mountain above sea level.", encoding="utf-8")
    base = ["--model", str(setup / "model"), "--device", "cpu", "--max-new-tokens", str(N), "-p",
            "The Eiffel Tower is in Paris.", "-p", f"@{f}"]
    assert main(["generate", "Where", "is", "the", "tower?", *base, "--json", "--beta", "0.5"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert len(d["sources"]) == 2 and 1 <= d["completion_tokens"] <= N
    assert main(["generate", "-q", "Where is the tower?", *base, "--stream", "--beta", "0.5"]) == 0
    assert capsys.readouterr().out.startswith(d["text"])


def test_ask_without_question_loops_with_models_loaded_once(setup, index_dir, capsys, monkeypatch):
    import nbce_rag.models

    real, calls = nbce_rag.models.load_model, []

    def counting(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(nbce_rag.models, "load_model", counting)
    monkeypatch.setattr(sys, "stdin", io.StringIO("When was the tower built?\n\nWhich mountain is highest?\n"
                                                  "What is in bananas?\nquit\nnever asked\n"))
    assert main(["ask", "--index", str(index_dir), "--model", str(setup / "model"), "--device", "cpu",
                 "--max-new-tokens", str(N), "--json"]) == 0
    rows = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert [r["question"] for r in rows] == ["When was the tower built?", "Which mountain is highest?",
                                             "What is in bananas?"]
    assert len(calls) == 1  # one model load for three questions
    # chat: the same loop, with the usual text output
    monkeypatch.setattr(sys, "stdin", io.StringIO("When was the tower built?\nWhich mountain is highest?\n"))
    assert main(["chat", "--index", str(index_dir), "--model", str(setup / "model"), "--device", "cpu",
                 "--max-new-tokens", str(N)]) == 0
    assert capsys.readouterr().out.count("Supported:") == 2 and len(calls) == 2


def test_damaged_files_are_one_line_exit_2(setup, index_dir, tmp_path, capsys):
    import shutil

    bad = tmp_path / "idx"
    shutil.copytree(index_dir, bad)
    (bad / "manifest.json").write_text("{not json", encoding="utf-8")
    assert main(["search", "tower", "--index", str(bad)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "manifest" in err
    assert main(["search", "tower", "--index", str(tmp_path / "missing")]) == 2
    assert "no index" in capsys.readouterr().err
    # a manifest field of the wrong shape (the reliability sweep's `"chunking": {}`)
    shutil.rmtree(bad)
    shutil.copytree(index_dir, bad)
    manifest = json.loads((bad / "manifest.json").read_text(encoding="utf-8"))
    manifest["chunking"] = {}
    (bad / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    assert main(["search", "tower", "--index", str(bad)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "chunking" in err and "Traceback" not in err


def test_damaged_calibration_is_one_line_exit_2_before_the_llm_loads(setup, index_dir, tmp_path, capsys, monkeypatch):
    import shutil

    import nbce_rag.decoding.decoder
    from nbce_rag import MarginThreshold, VectorIndex

    bad = tmp_path / "idx"
    shutil.copytree(index_dir, bad)
    MarginThreshold(threshold=0.3, lower=0.2, upper=0.5, margin=None,
                    encoder_identity=VectorIndex.load(bad).encoder_identity).save(bad)
    cal = json.loads((bad / "calibration.json").read_text(encoding="utf-8"))
    cal["version"] = "x"
    (bad / "calibration.json").write_text(json.dumps(cal), encoding="utf-8")

    def boom(*a, **k):
        raise AssertionError("the LLM was loaded before the calibration was read")

    monkeypatch.setattr(nbce_rag.decoding.decoder.NBCEDecoder, "from_pretrained", classmethod(boom))
    assert main(["ask", "When was the tower built?", "--index", str(bad)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


# ------------------------------------------------------------------------------------ demo

LOOPING = ("The pass statement is a placeholder. It is used to indicate that a statement is not executed, "
           "but is instead used to indicate that a statement is not executed.\n\nIn Python")


@pytest.mark.parametrize("text, clean", [
    (LOOPING, "The pass statement is a placeholder."),  # the answer
    ("It does nothing. It is a null operation", "It does nothing."),  # cut mid-sentence by the limit
    ("It does nothing. It does nothing at all here. Really.", "It does nothing. It does nothing at all here. Really."),
    ("pass is a null operation; when it is executed, nothing happens. It is useful as a placeholder. "
     "It is useful as a placeholder when", "pass is a null operation; when it is executed, nothing happens. "
                                            "It is useful as a placeholder."),
    ("It is used to indicate that a statement is not executed, but is instead used to indicate that a",
     "It is used to indicate that a statement is not executed, but is instead\u2026"),
    ("Fine answer!", "Fine answer!"),
    ("", ""),
])
def test_demo_answer_ends_on_a_sentence_and_does_not_loop(text, clean):
    from nbce_rag.commands.demo import clean_answer

    assert clean_answer(text) == clean


def test_demo_settings_are_explicit_and_used(monkeypatch, capsys, tmp_path):
    from nbce_rag.commands import demo
    from nbce_rag.pipeline import RAGPipeline
    from nbce_rag.types import Answer, SourceInfo

    seen = {}

    class FakeRag:
        def ask(self, question, **options):
            seen.update(options, question=question)
            return Answer(text=LOOPING, token_ids=[1] * 40, token_sources=[0] * 40, finish_reason="length",
                          sources=[SourceInfo(index=0, text="pass is a null operation", score=0.7, n_tokens=40,
                                              share=1.0, id="pydoc:pass")])

    monkeypatch.setattr(demo, "build_demo_index", lambda path, rebuild=False: "an index")
    monkeypatch.setattr(RAGPipeline, "from_pretrained", classmethod(lambda cls, *a, **k: FakeRag()))
    assert main(["demo", "--index-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert seen == {**demo.DEMO_OPTIONS, "question": demo.DEFAULT_QUESTION}
    assert seen["stop"] and seen["max_new_tokens"] == 96 and seen["do_sample"] is False
    assert "settings: top-3 passages, greedy, at most 96 tokens" in out
    answer = out.split("Q: ")[1].split("\n\n", 1)[1].split("\n\n")[0]
    assert answer == "The pass statement is a placeholder." and "pydoc:pass" in out
