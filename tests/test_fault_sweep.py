"""Issue 26, the bad-input and fault sweep of the newer surfaces: calibration objectives checked
before any work, ``cache`` failing when it stored nothing, text that is not valid Unicode refused
where it enters, the KV store after a killed writer, exact usage, messages that name what the
user set, contradictory pooling specs, one exit-code convention."""

from __future__ import annotations

import pytest

from nbce_rag.cli import main
from nbce_rag.errors import CalibrationError
from nbce_rag.filtering.objective import parse_objective

from conftest import N, make_tiny_llama  # noqa: E402,F401


def _rc(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.fixture()
def no_loading(monkeypatch):
    """Loading a model or an index fails the test: options must be refused before."""
    import nbce_rag.decoding.decoder
    import nbce_rag.models
    import nbce_rag.retrieval.index

    def boom(*a, **k):
        raise AssertionError("something was loaded before the options were checked")

    monkeypatch.setattr(nbce_rag.models, "load_model", boom)
    monkeypatch.setattr(nbce_rag.decoding.decoder.NBCEDecoder, "from_pretrained", classmethod(boom))
    monkeypatch.setattr(nbce_rag.retrieval.index.VectorIndex, "load", classmethod(boom))


# ------------------------------------------------------------------------------ objectives
@pytest.mark.parametrize("spec", ["coverage1.5", "coverage90", "coverage150%", "coverage0", "coverage0%", "coverage%"])
def test_coverage_target_out_of_range_is_refused_never_rescaled(spec):
    with pytest.raises(CalibrationError, match="coverage"):
        parse_objective(spec)


@pytest.mark.parametrize("spec, target", [("coverage0.9", 0.9), ("coverage90%", 0.9), ("coverage_95%", 0.95),
                                          ("coverage1", 1.0), ("coverage100%", 1.0), ("coverage", 0.9)])
def test_coverage_target_as_share_or_explicit_percentage(spec, target):
    obj = parse_objective(spec)
    assert obj.kind == "coverage" and obj.target == pytest.approx(target)
    assert parse_objective(obj.name) == obj  # the stored name reads back as the same objective


@pytest.mark.parametrize("argv, says", [
    (["calibrate", "--synthetic", "--index", "idx", "--objective", "coverage1.5"], "--objective"),
    (["calibrate", "--index", "i", "--queries", "q", "--qrels", "r", "--objective", "coverage90"], "--objective"),
    (["calibrate", "--synthetic", "--index", "idx", "--n", "0"], "--n"),
    (["calibrate", "--synthetic", "--index", "idx", "--filter-top", "50"], "--filter-top"),
])
def test_calibrate_options_are_refused_before_anything_loads(argv, says, no_loading, capsys):
    assert _rc(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and says in err and "Traceback" not in err, err


def test_synthetic_calibration_on_an_exhausted_index_says_add_documents(tmp_path, tiny_chat_tokenizer, capsys):
    """--n far above the index's chunks: 'raise --n' cannot help; the message says what can, and
    names no internal parameter."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(4):
        (docs / f"d{i}.txt").write_text(" ".join(f"topic{i} word{j}" for j in range(15)))
    from conftest import make_tiny_encoder

    make_tiny_encoder(tmp_path / "enc", seed=0)
    assert main(["index", str(docs), "--out", str(tmp_path / "idx"), "--encoder", str(tmp_path / "enc" / "model"),
                 "--no-progress"]) == 0
    model = make_tiny_llama(len(tiny_chat_tokenizer), seed=1)
    model.save_pretrained(tmp_path / "model")
    tiny_chat_tokenizer.save_pretrained(tmp_path / "model")
    capsys.readouterr()
    rc = main(["calibrate", "--synthetic", "--index", str(tmp_path / "idx"), "--n", "1000000",
               "--model", str(tmp_path / "model"), "--no-plot"])
    err = capsys.readouterr().err
    assert rc == 2, err
    line = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(line) == 1 and "add documents" in line[0], err
    assert "--n" not in line[0] and "min_positives" not in line[0] and "filter_top" not in line[0], err
