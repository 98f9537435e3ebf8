"""VectorIndex: build/search/add/delete, persistence (bit-exact, atomic, verified), encoder
mismatch, FAISS agreement, file ingestion and the index/search CLI."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")

import nbce_rag.retrieval.index as index_mod  # noqa: E402
import nbce_rag.retrieval.index_store as index_store  # noqa: E402
from nbce_rag.retrieval.encoder import CoSENTEncoder  # noqa: E402

from conftest import make_tiny_encoder  # noqa: E402
from nbce_rag.errors import ConfigError, CorruptFileError, EncoderMismatchError  # noqa: E402
from nbce_rag.retrieval.index import VectorIndex, faiss_available, read_documents  # noqa: E402
from nbce_rag.types import Passage  # noqa: E402

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss is not installed (extra: nbce-rag[faiss])")

LOREM = (
    "Retrieval augmented generation fetches passages for a question. A CoSENT encoder maps text to "
    "unit vectors whose cosine orders pairs by similarity. Chunks overlap so that no sentence is lost "
    "at a border, and no word is ever cut in two. "
)
DOCS = [
    {"text": " ".join(f"Part {i}. {LOREM}" for i in range(6)), "id": "long", "metadata": {"source": "long.md", "lang": "en"}},
    Passage(text="Dogs bark at night. Cats sleep all day.", id="pets"),
    "The stock market fell sharply on Monday.",
    {"text": "   \n  ", "id": "blank"},
    "Photosynthesis turns light into chemical energy in plants.",
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def enc_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    make_tiny_encoder(d, seed=0)
    return d / "model"


@pytest.fixture(scope="module")
def enc(enc_dir):
    return CoSENTEncoder.from_pretrained(enc_dir, device="cpu")


@pytest.fixture(scope="module")
def other_enc(tmp_path_factory):
    return make_tiny_encoder(tmp_path_factory.mktemp("tiny_other"), seed=1)


@pytest.fixture()
def index(enc):
    return VectorIndex.build(enc, DOCS, chunk_tokens=24, overlap=6)


def _dir_state(path: Path) -> dict:
    return {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in sorted(path.iterdir())}


def _assert_same(a: VectorIndex, b: VectorIndex) -> None:
    assert a.ids == b.ids
    np.testing.assert_array_equal(a.vectors, b.vectors)
    assert a.vectors.dtype == b.vectors.dtype == np.float32
    assert [a.get(i).text for i in a.ids] == [b.get(i).text for i in b.ids]
    assert [a.get(i).metadata for i in a.ids] == [b.get(i).metadata for i in b.ids]
    assert a.encoder_identity == b.encoder_identity and a.dim == b.dim


# ------------------------------------------------------------------ build and search


def test_build_chunks_documents_with_offsets_and_stable_ids(index, enc):
    rep = index.last_report
    assert rep.documents == 5 and rep.skipped_empty == 1 and rep.added_documents == 4
    assert len(index) == rep.chunks > 4
    long_rows = [i for i in index.ids if i.startswith("long#")]
    assert long_rows == [f"long#{n}" for n in range(len(long_rows))] and len(long_rows) > 3
    text = DOCS[0]["text"]
    for cid in long_rows:
        h = index.get(cid)
        m = h.metadata
        assert text[m["start"] : m["end"]] == h.text
        assert m["source"] == "long.md" and m["lang"] == "en" and m["doc_id"] == "long" and m["n_tokens"] <= 24
    assert "pets#0" in index
    # ids are stable: rebuilding gives the same ids (content hashes for documents without id)
    again = VectorIndex.build(enc, DOCS, chunk_tokens=24, overlap=6)
    assert again.ids == index.ids
    np.testing.assert_array_equal(again.vectors, index.vectors)
    assert index.encoder_identity == enc.identity


def test_search_scores_are_exact_cosines(index, enc):
    hits = index.search("dogs and cats", k=4)
    assert len(hits) == 4
    q = enc.encode(["dogs and cats"])[0]
    ref = {i: float(v @ q) for i, v in zip(index.ids, enc.encode([index.get(i).text for i in index.ids]))}
    best = sorted(ref.values(), reverse=True)[:4]
    np.testing.assert_allclose([h.score for h in hits], best, atol=1e-5)
    for h in hits:
        assert h.score == pytest.approx(ref[h.id], abs=1e-5)
        assert isinstance(h.score, float) and h.text == index.get(h.id).text
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_k_larger_than_index_returns_what_exists(index):
    assert len(index.search("energy", k=1000)) == len(index)
    assert len(index.search("energy", k=1)) == 1


def test_bad_queries(index):
    for q in ("", "   \n"):
        with pytest.raises(ConfigError, match="empty"):
            index.search(q)
    with pytest.raises(ConfigError):
        index.search("x", k=0)
    with pytest.raises(TypeError):
        index.search("x", k=2.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        index.search_many("not a list")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="query 1"):
        index.search_many(["ok", ""])


def test_search_many_equals_search(index):
    qs = ["plants and light", "market", "a word cut in two"]
    many = index.search_many(qs, k=3)
    assert [[h.id for h in hs] for hs in many] == [[h.id for h in index.search(q, k=3)] for q in qs]
    assert index.search_many([], k=3) == []


def test_exact_topk_matches_brute_force():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((1000, 16)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    q = rng.standard_normal((7, 16)).astype(np.float32)
    s, r = index_mod._topk_exact(v, q, 10)
    full = q @ v.T
    for i in range(7):
        ref = np.argsort(-full[i], kind="stable")[:10]
        np.testing.assert_array_equal(r[i], ref)
        np.testing.assert_allclose(s[i], full[i, ref], rtol=1e-6)
    s, r = index_mod._topk_exact(v[:5], q, 5)  # k == n
    assert r.shape == (7, 5) and all(sorted(row) == list(range(5)) for row in r)


def test_empty_index(enc):
    idx = VectorIndex.build(enc, ["", "  "])
    assert len(idx) == 0 and idx.last_report.skipped_empty == 2
    assert idx.search("anything", k=5) == []


def test_chunk_size_must_fit_the_encoder(enc):
    with pytest.raises(ConfigError, match="does not fit"):
        VectorIndex.build(enc, ["x"], chunk_tokens=300)
    with pytest.raises(ConfigError):
        VectorIndex.build(enc, ["x"], chunk_tokens=20, overlap=20)


# ------------------------------------------------------------------ add / delete


def test_incremental_add_and_delete_without_rebuild(index, enc):
    n = len(index)
    before = index.vectors.copy()
    ids = index.add([{"text": "Volcanoes erupt molten rock.", "id": "volc", "metadata": {"source": "v.txt"}}])
    assert ids == ["volc#0"] and len(index) == n + 1
    np.testing.assert_array_equal(index.vectors[:n], before)  # nothing re-embedded
    assert index.search("Volcanoes erupt molten rock.", k=1)[0].id == "volc#0"

    with pytest.raises(ConfigError, match="already in the index"):
        index.add([{"text": "other text", "id": "volc"}])
    assert len(index) == n + 1
    index.add([{"text": "Lava flows downhill.", "id": "volc"}], on_duplicate="replace")
    assert index.get("volc#0").text == "Lava flows downhill." and len(index) == n + 1
    index.add([{"text": "ignored", "id": "volc"}], on_duplicate="skip")
    assert index.last_report.skipped_duplicate == 1 and index.get("volc#0").text == "Lava flows downhill."

    n_long = len([i for i in index.ids if i.startswith("long#")])
    assert index.delete("long") == n_long > 0  # by document
    assert not any(i.startswith("long#") for i in index.ids)
    assert index.delete(["pets#0", "nope"]) == 1  # by chunk id; unknown ids ignored
    assert index.delete([]) == 0
    remaining = index.ids
    assert [h.id for h in index.search("anything", k=100)] and {h.id for h in index.search("x", k=100)} == set(remaining)
    np.testing.assert_allclose(index.vectors, enc.encode([index.get(i).text for i in remaining]), atol=1e-6)


def test_add_is_all_or_nothing(index):
    n, ids = len(index), index.ids
    with pytest.raises(ConfigError, match="twice"):
        index.add([{"text": "a", "id": "x"}, {"text": "b", "id": "x"}])
    with pytest.raises(ConfigError, match="JSON"):
        index.add([{"text": "a", "id": "y", "metadata": {"bad": object()}}])
    with pytest.raises(TypeError):
        index.add([123])
    assert len(index) == n and index.ids == ids


def test_add_vectors_low_level(enc):
    idx = VectorIndex(8, "x@sha256:0", chunk_tokens=10, overlap=2)
    rng = np.random.default_rng(1)
    v = rng.standard_normal((5, 8)).astype(np.float32) * 3
    idx.add_vectors(v, [f"t{i}" for i in range(5)], [f"r{i}" for i in range(5)])
    np.testing.assert_allclose(np.linalg.norm(idx.vectors, axis=1), 1, rtol=1e-6)
    hits = idx.search_by_vector(v[2], k=2)[0]
    assert hits[0].id == "r2" and hits[0].score == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ConfigError):
        idx.add_vectors(v[:1], ["t"], ["r0"])  # duplicate id
    with pytest.raises(ConfigError):
        idx.add_vectors(np.zeros((1, 8)), ["t"], ["z"])
    with pytest.raises(ConfigError):
        idx.search("needs an encoder")  # never saved: no recorded encoder to load


# ------------------------------------------------------------------ persistence


def test_save_load_round_trip_is_bit_exact(index, enc, tmp_path):
    index.save(tmp_path / "idx")
    names = sorted(p.name for p in (tmp_path / "idx").iterdir())
    assert names[:2] == [".index.lock", "manifest.json"] and len(names) == 4  # + vectors, records
    assert not any(n.endswith(".pkl") or n.endswith(".pickle") for n in names)
    loaded = VectorIndex.load(tmp_path / "idx", enc)
    _assert_same(index, loaded)
    assert (loaded.chunk_tokens, loaded.overlap) == (24, 6)
    q = "light and plants"
    assert [(h.id, h.score) for h in loaded.search(q, k=5)] == [(h.id, h.score) for h in index.search(q, k=5)]
    m = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert m["encoder"]["identity"] == enc.identity and m["dim"] == 32 and m["count"] == len(index)
    # save again (after a change): one generation on disk, old files gone
    loaded.delete("pets")
    loaded.save(tmp_path / "idx")
    assert len(list((tmp_path / "idx").iterdir())) == 4
    _assert_same(loaded, VectorIndex.load(tmp_path / "idx", enc))


def test_load_without_encoder_uses_the_recorded_one(index, enc_dir, tmp_path):
    index.save(tmp_path / "idx")
    loaded = VectorIndex.load(tmp_path / "idx")
    assert loaded._encoder is None  # loaded lazily
    assert loaded.search("market", k=1)[0].id == index.search("market", k=1)[0].id
    assert loaded.encoder.identity == index.encoder_identity


def test_load_never_writes(index, enc, other_enc, tmp_path):
    p = tmp_path / "idx"
    index.save(p)
    state = _dir_state(p)
    VectorIndex.load(p, enc)
    VectorIndex.load(p, enc, verify=False)
    with pytest.raises(EncoderMismatchError):
        VectorIndex.load(p, other_enc)
    assert _dir_state(p) == state


@pytest.mark.parametrize("stage", ["vectors", "records", "manifest"])
def test_failure_during_save_keeps_previous_index(index, enc, tmp_path, monkeypatch, stage):
    p = tmp_path / "idx"
    index.save(p)
    state = _dir_state(p)
    old = VectorIndex.load(p, enc)
    changed = VectorIndex.load(p, enc)
    changed.add(["A brand new document about glaciers."])

    class Crash(RuntimeError):
        pass

    if stage == "manifest":
        def boom(path, manifest):
            raise Crash("disk full while writing the manifest")
        monkeypatch.setattr(index_store, "_commit_manifest", boom)
    else:
        real = index_store._write_data_file

        def boom(path, write):
            if path.name.startswith(stage):
                def half(tmp):
                    with open(tmp, "wb") as f:
                        f.write(b"partial")
                    raise Crash(f"crash while writing {stage}")
                return real(path, half)
            return real(path, write)
        monkeypatch.setattr(index_store, "_write_data_file", boom)

    with pytest.raises(Crash):
        changed.save(p)
    assert _dir_state(p) == state  # no partial or new-generation file left behind
    _assert_same(old, VectorIndex.load(p, enc))
    monkeypatch.undo()
    changed.save(p)
    _assert_same(changed, VectorIndex.load(p, enc))


def test_encoder_mismatch_is_refused(index, other_enc, tmp_path):
    index.save(tmp_path / "idx")
    with pytest.raises(EncoderMismatchError, match="built with encoder"):
        VectorIndex.load(tmp_path / "idx", other_enc)
    loaded = VectorIndex.load(tmp_path / "idx")
    with pytest.raises(EncoderMismatchError):
        loaded.encoder = other_enc


def test_recorded_encoder_that_changed_is_refused(enc, tmp_path):
    own = make_tiny_encoder(tmp_path / "e", seed=3)
    VectorIndex.build(own, ["some text"]).save(tmp_path / "idx")
    make_tiny_encoder(tmp_path / "e", seed=4)  # other weights at the recorded path
    loaded = VectorIndex.load(tmp_path / "idx")
    with pytest.raises(EncoderMismatchError):
        loaded.search("text")


def _corrupt_cases():
    def truncate_vectors(p):
        f = next(p.glob("vectors-*.npy"))
        f.write_bytes(f.read_bytes()[:-40])

    def flip_vector_byte(p):
        f = next(p.glob("vectors-*.npy"))
        b = bytearray(f.read_bytes())
        b[-3] ^= 0xFF
        f.write_bytes(bytes(b))

    def flip_record_byte(p):
        f = next(p.glob("records-*.jsonl"))
        b = bytearray(f.read_bytes())
        b[5] ^= 0x01
        f.write_bytes(bytes(b))

    def garbage_manifest(p):
        (p / "manifest.json").write_text('{"format": "nbce-rag-index", "vers')

    def manifest_missing_field(p):
        m = json.loads((p / "manifest.json").read_text())
        del m["files"]
        (p / "manifest.json").write_text(json.dumps(m))

    def wrong_format(p):
        m = json.loads((p / "manifest.json").read_text())
        m["format"] = "something-else"
        (p / "manifest.json").write_text(json.dumps(m))

    def delete_records(p):
        next(p.glob("records-*.jsonl")).unlink()

    def delete_manifest(p):
        (p / "manifest.json").unlink()

    return [truncate_vectors, flip_vector_byte, flip_record_byte, garbage_manifest, manifest_missing_field,
            wrong_format, delete_records, delete_manifest]


@pytest.mark.parametrize("damage", _corrupt_cases(), ids=lambda f: f.__name__)
def test_corrupt_or_truncated_index_fails_clearly_and_untouched(index, enc, tmp_path, damage):
    p = tmp_path / "idx"
    index.save(p)
    damage(p)
    state = _dir_state(p)
    with pytest.raises(CorruptFileError) as e:
        VectorIndex.load(p, enc)
    assert str(p) in str(e.value) or "manifest" in str(e.value)
    assert _dir_state(p) == state


def test_inconsistent_shape_detected_without_checksum(index, enc, tmp_path):
    p = tmp_path / "idx"
    index.save(p)
    m = json.loads((p / "manifest.json").read_text())
    m["count"] += 1
    (p / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CorruptFileError, match="manifest says"):
        VectorIndex.load(p, enc, verify=False)


def test_load_missing_directory(tmp_path):
    with pytest.raises(CorruptFileError, match="no index"):
        VectorIndex.load(tmp_path / "none")


# ------------------------------------------------------------------ FAISS


def _random_index(n=2000, dim=32, seed=0):
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, dim)).astype(np.float32)
    idx = VectorIndex(dim, "x@sha256:0")
    idx.add_vectors(v, [f"t{i}" for i in range(n)], [f"r{i}" for i in range(n)])
    q = rng.standard_normal((50, dim)).astype(np.float32)
    return idx, q / np.linalg.norm(q, axis=1, keepdims=True)


@needs_faiss
def test_faiss_flat_and_exact_agree_on_topk():
    idx, q = _random_index()
    es, er = idx.topk(q, 10)
    idx.backend = "faiss"
    fs, fr = idx.topk(q, 10)
    np.testing.assert_array_equal(fr, er)
    np.testing.assert_allclose(fs, es, rtol=1e-5, atol=1e-6)


@needs_faiss
def test_faiss_hnsw_agrees_on_topk_and_scores_are_cosines():
    idx, q = _random_index()
    exact = idx.search_by_vector(q, 10)
    idx.backend, idx.faiss_factory, idx.faiss_params = "faiss", "HNSW32", "efSearch=128"
    approx = idx.search_by_vector(q, 10)
    overlap = np.mean([len({h.id for h in a} & {h.id for h in e}) / 10 for a, e in zip(approx, exact)])
    assert overlap >= 0.95
    for a in approx:
        for h in a:
            r = idx._row[h.id]
            assert h.score == pytest.approx(float(idx.vectors[r] @ q[approx.index(a)]), abs=1e-5)


@needs_faiss
def test_faiss_index_follows_add_delete_and_save(index, enc, tmp_path):
    exact = [(h.id, h.score) for h in index.search("plants", k=5)]
    index.save(tmp_path / "idx")
    f = VectorIndex.load(tmp_path / "idx", enc, backend="faiss")
    np.testing.assert_allclose([h.score for h in f.search("plants", k=5)], [s for _, s in exact], atol=1e-6)
    f.add([{"text": "Plants need light.", "id": "new"}])
    assert "new#0" in {h.id for h in f.search("Plants need light.", k=3)}
    f.delete("new")
    assert "new#0" not in {h.id for h in f.search("Plants need light.", k=len(f))}
    g = VectorIndex.build(enc, DOCS, backend="faiss", chunk_tokens=24, overlap=6)
    g.save(tmp_path / "g")
    assert VectorIndex.load(tmp_path / "g", enc).backend == "faiss"


def test_faiss_backend_without_faiss_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "faiss", None)
    assert not faiss_available()
    with pytest.raises(ConfigError, match=r"nbce-rag\[faiss\]"):
        VectorIndex(8, "x@sha256:0", backend="faiss")


# ------------------------------------------------------------------ reading files


def test_read_documents(tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("Plain text file.", encoding="utf-8")
    (d / "sub" / "b.md").write_text("# Title\n\nMarkdown body.", encoding="utf-8")
    (d / "empty.txt").write_text("  \n")
    (d / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (d / "rows.jsonl").write_text(
        json.dumps({"_id": "r1", "title": "T", "text": "Row one."}) + "\n"
        + "{not json\n"
        + json.dumps({"contents": "Row two.", "metadata": {"k": 1}}) + "\n"
        + json.dumps({"id": "r3", "text": ""}) + "\n",
        encoding="utf-8",
    )
    (d / "image.png").write_bytes(b"\x89PNG")
    (d / ".hidden.txt").write_text("secret")
    os.symlink(d / "does-not-exist.txt", d / "broken.txt")
    docs, rep = read_documents([d, tmp_path / "missing.txt"])
    by_id = {p.id: p for p in docs}
    assert set(by_id) == {"a.txt", "sub/b.md", "latin1.txt", "rows.jsonl:r1", "rows.jsonl:3"}  # 3: line number
    assert by_id["latin1.txt"].text == "caf\ufffd cr\ufffdme"
    assert rep.replaced_characters == [str(d / "latin1.txt")]
    assert by_id["rows.jsonl:r1"].text == "T\nRow one." and by_id["rows.jsonl:r1"].metadata["title"] == "T"
    assert by_id["rows.jsonl:3"].metadata["k"] == 1 and by_id["rows.jsonl:3"].metadata["line"] == 3
    assert by_id["sub/b.md"].metadata["source"] == str(d / "sub" / "b.md")
    assert rep.skipped_empty == 2 and rep.ignored == 1
    unreadable = "\n".join(rep.unreadable)
    assert "broken.txt" in unreadable and "missing.txt" in unreadable and "rows.jsonl:2" in unreadable
    assert any("UTF-8" in line for line in rep.lines())
    docs2, _ = read_documents([d / "a.txt"])
    assert docs2[0].id == "a.txt"


# ------------------------------------------------------------------ CLI


def test_cli_index_then_search(enc_dir, tmp_path, capsys):
    from nbce_rag.cli import main

    d = tmp_path / "docs"
    d.mkdir()
    (d / "pets.txt").write_text("Dogs bark at night. Cats sleep all day.")
    (d / "plants.md").write_text("Photosynthesis turns light into chemical energy.")
    (d / "empty.txt").write_text("")
    (d / "bad.txt").write_bytes(b"\xff\xfe broken bytes")
    out = tmp_path / "idx"
    assert main(["index", str(d), "--out", str(out), "--encoder", str(enc_dir), "--chunk-tokens", "50", "--overlap", "5"]) == 0
    o = capsys.readouterr()
    assert "indexed 3 document(s) as 3 chunk(s), 1 empty skipped" in o.out
    assert "bad.txt" in o.err and "UTF-8" in o.err

    assert main(["search", "--index", str(out), "-k", "2", "--json", "light", "energy"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 2 and {"text", "score", "id", "metadata"} <= set(hits[0])
    assert main(["search", "--index", str(out), "-k", "50", "dogs"]) == 0
    text = capsys.readouterr().out
    assert text.count("\n") == 6 and "pets.txt#0" in text and "chars 0-" in text

    assert main(["search", "--index", str(out), " "]) == 2  # bad input: exit 2
    assert "empty" in capsys.readouterr().err

    (d / "more.txt").write_text("Volcanoes erupt.")
    assert main(["index", str(d / "more.txt"), "--out", str(out), "--append"]) == 0
    assert main(["index", "--out", str(out), "--delete", "pets.txt"]) == 0
    capsys.readouterr()
    assert sorted(VectorIndex.load(out).ids) == ["bad.txt#0", "more.txt#0", "plants.md#0"]

    empty = tmp_path / "nothing"
    empty.mkdir()
    assert main(["index", str(empty), "--out", str(tmp_path / "x"), "--encoder", str(enc_dir)]) == 2
    assert "no documents" in capsys.readouterr().err
    assert main(["search", "--index", str(tmp_path / "nope"), "q"]) == 2
    assert "no index" in capsys.readouterr().err


def test_load_retries_once_when_a_save_replaced_the_index_meanwhile(index, enc, tmp_path, monkeypatch):
    p = tmp_path / "idx"
    index.save(p)
    newer = VectorIndex.load(p, enc)
    newer.add(["Another document, saved while a reader was loading."])
    real = index_store.read_index
    calls = []

    def racing(cls, *a, **kw):
        calls.append(1)
        if len(calls) == 1:
            newer.save(p)  # a writer commits a new generation and removes the old files
            raise CorruptFileError("index file ... named by manifest.json is missing")
        return real(cls, *a, **kw)

    monkeypatch.setattr(index_store, "read_index", racing)
    _assert_same(newer, VectorIndex.load(p, enc))
    assert len(calls) == 2


def test_fine_tuning_the_encoder_after_indexing_is_detected(tmp_path):
    own = make_tiny_encoder(tmp_path / "e", seed=5)
    idx = VectorIndex.build(own, ["cats purr", "dogs bark", "fish swim"])
    assert idx.search("cats", k=1)
    own.fit([("cats purr", "kittens meow", 1.0), ("dogs bark", "fish swim", 0.0)], max_steps=3,
            learning_rate=1e-2, show_progress_bar=False)
    with pytest.raises(EncoderMismatchError, match="changed since"):
        idx.search("cats", k=1)


def test_reloads_recorded_encoder_with_its_max_seq_length(tmp_path):
    make_tiny_encoder(tmp_path / "e", seed=6)
    short = CoSENTEncoder.from_pretrained(tmp_path / "e" / "model", max_seq_length=64)
    VectorIndex.build(short, ["some text here"], chunk_tokens=40, overlap=4).save(tmp_path / "idx")
    loaded = VectorIndex.load(tmp_path / "idx")
    assert loaded.search("text", k=1) and loaded.encoder.max_seq_length == 64


def test_pdf_without_the_extra_is_reported_and_skipped(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pypdf", None)
    (tmp_path / "paper.pdf").write_bytes(b"%PDF-1.4 not really")
    (tmp_path / "note.txt").write_text("text")
    docs, rep = read_documents([tmp_path])
    assert [d.id for d in docs] == ["note.txt"]
    assert any("paper.pdf" in u and "nbce-rag[pdf]" in u for u in rep.unreadable)


def _text_pdf(text: str) -> bytes:
    """A minimal one-page PDF showing ``text`` in Helvetica."""
    stream = f"BT /F1 12 Tf 10 50 Td ({text}) Tj ET".encode()
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 300 100] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, o in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + o + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    return bytes(out)


def test_pdf_with_the_extra(tmp_path):
    pypdf = pytest.importorskip("pypdf")
    (tmp_path / "paper.pdf").write_bytes(_text_pdf("Glaciers carve valleys"))
    w = pypdf.PdfWriter()
    w.add_blank_page(width=72, height=72)
    with open(tmp_path / "blank.pdf", "wb") as f:
        w.write(f)
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4 garbage")
    docs, rep = read_documents([tmp_path])
    assert [(d.id, d.text.strip(), d.metadata["page"]) for d in docs] == [("paper.pdf:p1", "Glaciers carve valleys", 1)]
    assert rep.skipped_empty == 1  # the blank page has no text
    assert any("broken.pdf" in u for u in rep.unreadable)
