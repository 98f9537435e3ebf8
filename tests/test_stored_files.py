"""Stored files that are malformed or impossible: every field of an index manifest and of a
calibration, replaced by a wrong value, gives CorruptFileError (never another exception, never
a silent load of garbage); and special files in a folder being indexed are skipped."""

from __future__ import annotations

import copy
import json
import logging
import os
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from nbce_rag.errors import CalibrationError, CorruptFileError
from nbce_rag.retrieval.index import VectorIndex, read_documents
from nbce_rag.filtering.threshold import MarginThreshold

WRONG = [None, "x", -1, 0, 1.5, 10**30, True, [], {}, float("nan")]


def _leaves(d, prefix=()):
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _leaves(v, prefix + (k,))
        yield prefix + (k,)


def _set(d, path, value):
    for k in path[:-1]:
        d = d[k]
    if value is _MISSING:
        del d[path[-1]]
    else:
        d[path[-1]] = value


_MISSING = object()

# ------------------------------------------------------------------ index manifest


@pytest.fixture(scope="module")
def saved_index(tmp_path_factory):
    p = tmp_path_factory.mktemp("idx") / "idx"
    idx = VectorIndex(8, "random@sha256:0123456789abcdef", chunk_tokens=32, overlap=4)
    idx.add_vectors(np.random.default_rng(0).standard_normal((5, 8)), [f"t{i}" for i in range(5)],
                    [f"r{i}" for i in range(5)], [{"doc_id": f"d{i}"} for i in range(5)])
    idx.save(p)
    return p


#: fields whose value is not used by the loader: anything there still loads
_FREE = {("saved_at",), ("chunking", "unit"), ("files", "vectors", "dtype"), ("files", "vectors", "shape")}
#: values of WRONG (+ missing) that are legal for a field
_LEGAL_MANIFEST = {
    ("encoder", "identity"): ("x",),
    ("encoder", "source"): (None, _MISSING, "x"),
    ("encoder", "max_seq_length"): (None, _MISSING),
    ("encoder", "dim"): (_MISSING,),
    ("backend", "name"): (_MISSING,),
    ("backend", "faiss_factory"): (_MISSING, "x"),
    ("backend", "faiss_params"): (_MISSING, "x"),
    ("chunking", "overlap"): (0,),
    ("backend",): ({},),  # every backend field has a default
}


def test_every_manifest_field_malformed_is_corrupt(saved_index, tmp_path):
    good = json.loads((saved_index / "manifest.json").read_text())
    assert VectorIndex.load(saved_index).ids == [f"r{i}" for i in range(5)]
    tried = 0
    for path in _leaves(good):
        for value in WRONG + [_MISSING]:
            m = copy.deepcopy(good)
            _set(m, path, value)
            if m == good:
                continue
            d = tmp_path / "case"
            d.mkdir(exist_ok=True)
            for f in saved_index.iterdir():
                if f.name != "manifest.json":
                    (d / f.name).write_bytes(f.read_bytes())
            (d / "manifest.json").write_text(json.dumps(m))
            tried += 1
            try:
                loaded = VectorIndex.load(d)
            except CorruptFileError as e:
                assert "\n" not in str(e)
                continue
            # only a field the loader does not use, an optional one, or a legal value may load
            assert path in _FREE or value in _LEGAL_MANIFEST.get(path, ()), f"{'.'.join(path)} = {value!r} loaded"
            assert loaded.ids == [f"r{i}" for i in range(5)]
    assert tried > 150


@pytest.mark.parametrize("field,value,match", [
    ("version", "x", "version"),
    ("chunking", {}, "chunking.chunk_tokens"),
    ("dim", -3, "dim"),
    ("count", 2.5, "count"),
    ("backend", {"name": "annoy"}, "backend.name"),
])
def test_issue_manifest_examples(saved_index, tmp_path, field, value, match):
    d = tmp_path / "i"
    d.mkdir()
    for f in saved_index.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    m = json.loads((d / "manifest.json").read_text())
    m[field] = value
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CorruptFileError, match=match):
        VectorIndex.load(d)


def test_manifest_cannot_point_outside_the_index(saved_index, tmp_path):
    d = tmp_path / "i"
    d.mkdir()
    for f in saved_index.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    m = json.loads((d / "manifest.json").read_text())
    m["files"]["records"]["name"] = "../../etc/passwd"
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CorruptFileError, match="files.records.name"):
        VectorIndex.load(d)


# ------------------------------------------------------------------ calibration


def _cal() -> dict:
    rng = np.random.default_rng(3)
    s, y, g = [], [], []
    for q in range(30):
        for j in range(8):
            rel = j < 2
            s.append(float(rng.normal(0.7 if rel else 0.4, 0.08)))
            y.append(int(rel))
            g.append(q)
    return MarginThreshold.calibrate(s, y, g, encoder_identity="enc@sha256:0123456789abcdef", n_bootstrap=20).to_dict()


@pytest.fixture(scope="module")
def cal():
    return _cal()


def test_saved_calibration_loads(cal, tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(cal))
    th = MarginThreshold.load(p)
    assert th.lower <= th.threshold <= th.upper and th.encoder_identity


def test_every_calibration_field_malformed_is_corrupt(cal, tmp_path):
    p = tmp_path / "c.json"
    tried = 0
    for path in _leaves(cal):
        for value in WRONG + [_MISSING]:
            d = copy.deepcopy(cal)
            _set(d, path, value)
            p.write_text(json.dumps(d))
            tried += 1
            try:
                th = MarginThreshold.load(p)
            except CorruptFileError as e:
                assert "\n" not in str(e)
                continue
            # what may load: optional fields nulled or left out, informational stats, the
            # "rule" text, and margin values that are legal margins
            legal = {("margin",): (None, _MISSING, 0, 1.5), ("lower",): (-1, 0), ("encoder_identity",): ("x",),
                     # keep.margin repeats margin: the same value (or, for no margin, left out) loads
                     ("support", "threshold"): (-1, 0),
                     ("keep", "margin"): (cal["margin"],) + ((_MISSING,) if cal["margin"] is None else ())}
            free = path[0] in ("rule", "stats", "ci") or (
                path[0] in ("keep", "support") and len(path) > 1 and path[1] in ("rule", "stats", "ci"))
            assert free or value in legal.get(path, ()), (
                f"{'.'.join(map(str, path))} = {value!r} loaded")
            th.report()  # and it can still be reported
    assert tried > 100


@pytest.mark.parametrize("change,match", [
    ({"version": "x"}, "version"),
    ({"margin": -1}, "margin"),
    ({"threshold": 5.0}, "cosine range"),
    ({"lower": 0.9, "upper": 0.1}, "lower <= threshold <= upper"),
    ({"threshold": 0.99}, "lower <= threshold <= upper"),
    ({"encoder_identity": None}, "encoder_identity"),
    ({"encoder_identity": ""}, "encoder_identity"),
    ({"ci": {"threshold": [0.6, 0.2]}}, "ci.threshold"),
    ({"stats": "x"}, "stats"),
])
def test_impossible_calibrations_are_corrupt(cal, tmp_path, change, match):
    d = dict(cal, **change)
    p = tmp_path / "c.json"
    p.write_text(json.dumps(d))
    with pytest.raises(CorruptFileError, match=match):
        MarginThreshold.load(p)
    del_id = dict(cal)
    del del_id["encoder_identity"]
    p.write_text(json.dumps(del_id))
    with pytest.raises(CorruptFileError, match="encoder_identity"):
        MarginThreshold.load(p)


def test_save_refuses_what_load_would_refuse(tmp_path):
    with pytest.raises(CalibrationError, match="encoder_identity"):
        MarginThreshold(threshold=0.5, lower=0.4, upper=0.7, margin=0.1).save(tmp_path / "c.json")
    with pytest.raises(CalibrationError, match="cosine range"):
        MarginThreshold(threshold=5.0, lower=4.0, upper=7.0, margin=0.1, encoder_identity="e").save(tmp_path / "c.json")
    assert not (tmp_path / "c.json").exists()


def test_newer_calibration_version_says_upgrade(cal, tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(dict(cal, version=99)))
    with pytest.raises(CorruptFileError, match="upgrade nbce-rag"):
        MarginThreshold.load(p)


# ------------------------------------------------------------------ special files in a folder


def _in_thread(fn, timeout=20.0):
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "reading the folder hung (a FIFO was opened)"
    if "error" in out:
        raise out["error"]
    return out["value"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifo_and_socket_in_a_folder_are_skipped_with_a_warning(tmp_path, caplog):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "a.txt").write_text("A real document.")
    os.mkfifo(d / "pipe.txt")
    os.symlink(d / "pipe.txt", d / "link.md")  # a link to a FIFO is a FIFO too
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(d / "s.txt"))
        with caplog.at_level(logging.WARNING, logger="nbce_rag"):
            docs, report = _in_thread(lambda: read_documents([d]))
    finally:
        sock.close()
    assert [p.id for p in docs] == ["a.txt"]
    assert len(report.special) == 3 and any("FIFO" in s for s in report.special)
    assert any("socket" in s for s in report.special)
    assert any("skipped 3 special file(s)" in line for line in report.lines())
    assert sum("not a regular file" in r.getMessage() for r in caplog.records) == 3


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_cli_index_of_a_folder_with_a_fifo_does_not_hang(tmp_path, capsys):
    from nbce_rag.cli import main
    from conftest import make_tiny_encoder

    make_tiny_encoder(tmp_path / "enc", seed=0)
    d = tmp_path / "docs"
    d.mkdir()
    (d / "a.txt").write_text("Dogs bark at night.")
    os.mkfifo(d / "b.txt")
    rc = _in_thread(lambda: main(["index", str(d), "--out", str(tmp_path / "idx"), "--encoder",
                                  str(tmp_path / "enc" / "model")]), timeout=120)
    assert rc == 0
    assert "skipped 1 special file(s)" in capsys.readouterr().err
    assert VectorIndex.load(tmp_path / "idx").ids == ["a.txt#0"]


def test_missing_path_still_reported(tmp_path):
    docs, report = read_documents([Path(tmp_path / "nope")])
    assert not docs and report.unreadable


def test_nan_vectors_with_a_matching_checksum_are_corrupt(saved_index, tmp_path):
    """A manifest edited to match damaged vectors still cannot bring NaN scores into search."""
    import hashlib

    d = tmp_path / "i"
    d.mkdir()
    for f in saved_index.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    m = json.loads((d / "manifest.json").read_text())
    vf = d / m["files"]["vectors"]["name"]
    v = np.load(vf)
    v[2, 3] = np.nan
    with open(vf, "wb") as f:
        np.save(f, v)
    m["files"]["vectors"]["sha256"] = hashlib.sha256(vf.read_bytes()).hexdigest()
    m["files"]["vectors"]["bytes"] = vf.stat().st_size
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CorruptFileError, match="NaN or infinite"):
        VectorIndex.load(d)
