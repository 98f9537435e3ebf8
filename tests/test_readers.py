"""nbce_rag.retrieval.readers: one reader per file format, used by every command; old import paths still work."""

from __future__ import annotations

import json

import pytest

from nbce_rag.errors import ConfigError, CorruptFileError
from nbce_rag.retrieval.readers import load_qrels, load_queries, read_documents, read_qrels, read_queries
from nbce_rag.types import Passage, document_id


def test_qrels_beir_trec_and_whitespace_read_alike(tmp_path):
    want = {"q1": {"d1": 1.0, "d2": 2.0}, "q2": {"d3": 0.0}}
    (tmp_path / "beir.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t2\nq2\td3\t0\n")
    (tmp_path / "trec.txt").write_text("q1 0 d1 1\nq1 Q0 d2 2\n\nq2 0 d3 0\n")
    (tmp_path / "plain.txt").write_text("q1 d1 1\nq1 d2 2\nq2 d3 0\n")
    for name in ("beir.tsv", "trec.txt", "plain.txt"):
        assert read_qrels(tmp_path / name) == want, name
    assert load_qrels(tmp_path / "trec.txt") == load_qrels([("q1", "d1", 1), ("q1", "d2", 2), ("q2", "d3", 0)]) == want
    assert load_qrels({"q1": {"d1": 1, "d2": 2}, "q2": {"d3": 0}}) == want


@pytest.mark.parametrize("text,match", [
    ("q1\td1\tx\n", "not a number"),            # not a header: the relevance must be a number
    ("q1 d1\n", "2 columns"),
    ("q1 0 d1 1 extra\n", "5 columns"),
    ("q1\td1\t1\nq2\td2\tscore\n", "line 2|:2:"),  # a header only on the first line
])
def test_bad_qrels_name_the_line(tmp_path, text, match):
    f = tmp_path / "bad.tsv"
    f.write_text(text)
    with pytest.raises(CorruptFileError, match=match):
        read_qrels(f)


def test_queries_jsonl_and_tsv(tmp_path):
    (tmp_path / "q.jsonl").write_text(json.dumps({"_id": "a", "text": "x y"}) + "\n" + json.dumps({"id": 2, "text": "z"}) + "\n")
    (tmp_path / "q.tsv").write_text("a\tx y\n2\tz\n")
    assert read_queries(tmp_path / "q.jsonl") == read_queries(tmp_path / "q.tsv") == {"a": "x y", "2": "z"}
    assert load_queries([("a", "x y")]) == {"a": "x y"}
    (tmp_path / "bad.jsonl").write_text(json.dumps({"_id": "a"}) + "\n")
    with pytest.raises(CorruptFileError, match=":1: a query line needs"):
        read_queries(tmp_path / "bad.jsonl")
    with pytest.raises(ConfigError, match="does not exist"):
        read_queries(tmp_path / "missing.jsonl")


def test_documents_reader(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.jsonl").write_text(json.dumps({"id": "r1", "title": "T", "text": "body"}) + "\n")
    docs, report = read_documents([tmp_path])
    assert [d.id for d in docs] == ["a.txt", "b.jsonl:r1"] and report.documents == 2
    assert docs[1].text == "T\nbody"


def test_one_chunk_to_document_rule():
    assert document_id(Passage("t", id="doc#a#3")) == "doc#a"  # the chunk suffix after the last '#'
    assert document_id(Passage("t", id="doc#3", metadata={"doc_id": "other"})) == "other"
    assert document_id(Passage("t", id="plain")) == "plain"
    assert document_id(Passage("t")) is None


def test_old_import_paths_still_work():
    import nbce_rag.data as data
    import nbce_rag.retrieval.index as index
    import nbce_rag.retrieval.readers as readers
    import nbce_rag.filtering.threshold as threshold
    import nbce_rag.retrieval.training as training

    assert data.read_qrels is threshold.read_qrels is readers.read_qrels
    assert threshold.read_queries is readers.read_queries and data.read_beir_queries is readers.read_queries
    assert index.read_documents is readers.read_documents and data.qrels_to_pairs is training.qrels_to_pairs
    from nbce_rag import FilterResult
    from nbce_rag.filtering.calibration import best_f1_threshold
    from nbce_rag.retrieval.encoder import CoSENTTrainingConfig
    from nbce_rag.types import FilterResult as F2

    assert FilterResult is F2 is threshold.FilterResult and threshold.best_f1_threshold is best_f1_threshold
    assert CoSENTTrainingConfig is training.CoSENTTrainingConfig
