"""CoSENTEncoder: encode, identity, save/load, CoSENT fine-tuning, data readers.

Fast tests use a tiny random BERT (hidden 32, 2 layers) with the bundled WordPiece vocabulary;
the tests marked ``slow`` load the bundled all-MiniLM-L6-v2.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")

from nbce_rag.retrieval.encoder import CoSENTEncoder, identities_match  # noqa: E402
from nbce_rag.retrieval.readers import BeirData, as_pairs, read_beir, read_pairs, read_qrels, read_stsb  # noqa: E402
from nbce_rag.retrieval.training import CoSENTTrainingConfig, qrels_to_pairs  # noqa: E402
from nbce_rag.errors import ConfigError, CorruptFileError, ModelLoadError  # noqa: E402

from conftest import make_tiny_encoder  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models on a shared 2-core machine: one thread avoids OpenMP oversubscription
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    make_tiny_encoder(d, seed=0)
    return d / "model"


@pytest.fixture()
def tiny(tiny_dir):
    return CoSENTEncoder.from_pretrained(tiny_dir, device="cpu")


# ------------------------------------------------------------------ synthetic CoSENT task

TOPICS = [
    ["cat", "dog", "horse", "cow", "sheep", "goat"],
    ["car", "bus", "train", "truck", "bike", "boat"],
    ["apple", "banana", "orange", "grape", "lemon", "cherry"],
    ["red", "blue", "green", "yellow", "purple", "white"],
    ["piano", "guitar", "violin", "drum", "flute", "harp"],
    ["rain", "snow", "wind", "storm", "cloud", "sun"],
]


def topic_pairs(n, seed):
    """Same-topic pairs share no word, so only training can tell them from the others."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ta = rng.randrange(len(TOPICS))
        tb = ta if rng.random() < 0.4 else rng.randrange(len(TOPICS))
        wa = rng.sample(TOPICS[ta], 3)
        wb = rng.sample([w for w in TOPICS[tb] if w not in wa], 2)
        out.append((" ".join(wa), " ".join(wb), 5.0 if ta == tb else 0.0))
    return out


# ------------------------------------------------------------------ encode


def test_encode_shape_dtype_and_norm(tiny):
    v = tiny.encode(["a cat sat on the mat", "stock markets fell", ""])
    assert v.shape == (3, tiny.dim) == (3, 32)
    assert v.dtype == np.float32 and v.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    assert tiny.encode([]).shape == (0, 32)
    np.testing.assert_array_equal(tiny.encode("a cat sat on the mat"), v[:1])
    with pytest.raises(TypeError):
        tiny.encode([1, 2])  # type: ignore[list-item]


def test_encode_equals_sentence_transformers(tiny):
    texts = [f"sentence number {i} about {TOPICS[i % 6][i % 5]}" for i in range(40)]
    ref = tiny.model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_array_equal(tiny.encode(texts, show_progress_bar=False), ref)


def test_count_tokens_and_limits(tiny):
    assert tiny.count_tokens(["hello world", ""]) == [2, 0]
    assert tiny.max_seq_length == 256 and tiny.num_special_tokens == 2


# ------------------------------------------------------------------ identity, save, load


def test_identity_is_stable_and_round_trips(tiny, tiny_dir, tmp_path):
    ident = tiny.identity
    assert ident.startswith("tiny-random-bert@sha256:") and len(ident.split(":")[-1]) == 16
    again = CoSENTEncoder.from_pretrained(tiny_dir)
    assert again.identity == ident
    tiny.save_pretrained(tmp_path / "copy")
    copy = CoSENTEncoder.from_pretrained(tmp_path / "copy")
    assert copy.identity == ident and copy.name == tiny.name
    texts = ["one two three", "four five"]
    np.testing.assert_array_equal(copy.encode(texts), tiny.encode(texts))
    info = json.loads((tmp_path / "copy" / "nbce_encoder.json").read_text())
    assert info["identity"] == ident and info["dim"] == 32


def test_identity_differs_for_other_weights(tiny, tmp_path):
    other = make_tiny_encoder(tmp_path, seed=1)
    assert other.name == tiny.name and other.identity != tiny.identity
    assert not identities_match(other.identity, tiny.identity)
    assert identities_match(tiny.identity, "renamed@" + tiny.identity.split("@")[1])


def test_save_pretrained_replaces_atomically(tiny, tmp_path):
    out = tmp_path / "enc"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    tiny.save_pretrained(out)
    assert not (out / "stale.txt").exists() and (out / "modules.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["enc"]  # no temp dirs left behind


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(ModelLoadError):
        CoSENTEncoder.from_pretrained(tmp_path / "nope")
    with pytest.raises(ModelLoadError):
        CoSENTEncoder.from_pretrained(str(tmp_path))  # a directory without a model


# ------------------------------------------------------------------ fit


def test_cosent_fit_moves_spearman_up_on_held_out_pairs(tiny):
    train, held_out = topic_pairs(480, seed=0), topic_pairs(200, seed=1)
    assert not set(train) & set(held_out) or len(set(train) & set(held_out)) < 20
    before = tiny.evaluate(held_out)["spearman"]
    ident = tiny.identity
    report = tiny.fit(train, held_out, epochs=1, learning_rate=1e-3, show_progress_bar=False)
    after = tiny.evaluate(held_out)["spearman"]
    assert before < 40 and after > before + 30, (before, after)
    assert report["dev_before"]["spearman"] == pytest.approx(before)
    assert report["dev_after"]["spearman"] == pytest.approx(after)
    assert report["steps"] == 30 and report["n_pairs"] == 480 and report["train_seconds"] > 0
    assert report["loss"] == "sentence_transformers.losses.CoSENTLoss(scale=20.0)"
    assert report["history"][0]["dev_spearman"] == pytest.approx(after)
    assert tiny.identity != ident and report["identity_after"] == tiny.identity
    assert tiny.name.endswith("+cosent") and tiny.source is None
    assert not tiny.model.training


def test_fit_uses_sentence_transformers_cosent_loss(tiny, monkeypatch):
    import sentence_transformers.losses as st_losses

    calls = []
    real = st_losses.CoSENTLoss

    class Spy(real):  # type: ignore[misc, valid-type]
        def __init__(self, model, scale=20.0, **kw):
            calls.append(scale)
            super().__init__(model, scale=scale, **kw)

    monkeypatch.setattr(st_losses, "CoSENTLoss", Spy)
    tiny.fit(topic_pairs(32, 3), max_steps=1, show_progress_bar=False)
    assert calls == [20.0]


def test_fit_defaults_are_the_measured_recipe():
    c = CoSENTTrainingConfig()
    assert (c.epochs, c.batch_size, c.learning_rate, c.warmup_ratio, c.scale) == (4, 16, 2e-5, 0.1, 20.0)


def test_fit_keep_best_and_max_steps(tiny):
    pairs = topic_pairs(64, 5)
    r = tiny.fit(pairs, pairs[:32], epochs=2, max_steps=5, keep_best=True, learning_rate=1e-3, max_length=16,
                 show_progress_bar=False)
    assert r["steps"] == 5 and r["epochs_run"] == 2 and "restored_best_epoch" in r
    assert r["config"]["max_length"] == 16 and tiny.max_seq_length == 256  # training-only truncation


def test_epoch_batches_plain_shuffle_and_grouped_packing():
    from nbce_rag.retrieval.training import _epoch_batches

    # plain: a permutation cut into batch_size slices (the order fit always used)
    pairs = [(f"s{i}", "t", 0.5) for i in range(10)]
    b = _epoch_batches(pairs, 4, False, random.Random(0))
    order = list(range(10))
    random.Random(0).shuffle(order)
    assert b == [order[:4], order[4:8], order[8:]]
    # grouped: 5 queries with 1-7 pairs each; every group stays in one batch unless larger
    sizes = {"q0": 3, "q1": 5, "q2": 1, "q3": 7, "q4": 2}
    pairs = [(q, f"{q}-p{j}", 1.0 if j == 0 else 0.0) for q, n in sizes.items() for j in range(n)]
    random.Random(1).shuffle(pairs)
    for seed in range(5):
        b = _epoch_batches(pairs, 6, True, random.Random(seed))
        assert sorted(i for x in b for i in x) == list(range(len(pairs)))
        assert all(1 <= len(x) <= 6 for x in b)
        for q, n in sizes.items():
            holding = [k for k, x in enumerate(b) if any(pairs[i][0] == q for i in x)]
            assert len(holding) == (1 if n <= 6 else 2), (q, holding)
    assert _epoch_batches(pairs, 6, True, random.Random(0)) != _epoch_batches(pairs, 6, True, random.Random(1))


def test_fit_group_batches_trains_and_is_reported(tiny):
    pairs = [(q, p, s) for q, p, s in topic_pairs(96, 4)]
    r = tiny.fit(pairs, epochs=1, group_batches=True, batch_size=8, show_progress_bar=False)
    assert r["config"]["group_batches"] is True and r["steps"] >= 12


@pytest.mark.parametrize(
    "bad",
    [
        {"epochs": 0},
        {"batch_size": 1},
        {"learning_rate": 0},
        {"warmup_ratio": 1.0},
        {"scale": -1},
        {"max_length": 2},
        {"no_such_option": 3},
    ],
)
def test_fit_rejects_bad_options(tiny, bad):
    with pytest.raises(ConfigError):
        tiny.fit(topic_pairs(8, 0), show_progress_bar=False, **bad)


def test_fit_rejects_constant_scores_and_tiny_sets(tiny):
    with pytest.raises(ConfigError, match="order"):
        tiny.fit([("a", "b", 1.0), ("c", "d", 1.0)], show_progress_bar=False)
    with pytest.raises(ConfigError):
        tiny.fit([("a", "b", 1.0)], show_progress_bar=False)
    with pytest.raises(ConfigError):
        tiny.evaluate([("a", "b", 1.0)])


def test_evaluate_reference(tiny):
    from scipy.stats import pearsonr, spearmanr

    pairs = topic_pairs(50, 9)
    a = tiny.encode([p[0] for p in pairs])
    b = tiny.encode([p[1] for p in pairs])
    cos = (a * b).sum(1)
    gold = [p[2] for p in pairs]
    ev = tiny.evaluate(pairs)
    assert ev["spearman"] == pytest.approx(100 * spearmanr(cos, gold).statistic, abs=1e-4)
    assert ev["pearson"] == pytest.approx(100 * pearsonr(cos, gold).statistic, abs=1e-4)
    assert ev["n"] == 50


# ------------------------------------------------------------------ data readers


def test_read_stsb_and_autodetect(tmp_path):
    f = tmp_path / "sts.csv"
    f.write_text(
        'main-captions\tMSRvid\t2012test\t0001\t5.000\tA "plane" is taking off.\tAn air plane is taking off.\n'
        "main-news\theadlines\t2013\t0002\t0.500\tOne.\tTwo.\tsrc\tsrc\n",
        encoding="utf-8",
    )
    assert read_stsb(f) == [('A "plane" is taking off.', "An air plane is taking off.", 1.0), ("One.", "Two.", 0.1)]
    assert read_pairs(f) == read_stsb(f)
    assert read_stsb(f, normalize=False)[0][2] == 5.0
    (tmp_path / "bad.csv").write_text("a\tb\tc\n")
    with pytest.raises(CorruptFileError):
        read_stsb(tmp_path / "bad.csv")


def test_read_csv_and_jsonl_pairs(tmp_path):
    c = tmp_path / "p.csv"
    c.write_text('text1,text2,score\n"a, b",c,4\nd,e,1\n', encoding="utf-8")
    assert read_pairs(c) == [("a, b", "c", 0.8), ("d", "e", 0.2)]  # 0-5 -> [0, 1]
    assert read_pairs(c, score_scale=None)[0][2] == 4.0
    j = tmp_path / "p.jsonl"
    j.write_text('{"sentence1": "x", "sentence2": "y", "score": 0.9}\n\n{"text1": "u", "text2": "v", "label": 0}\n')
    assert read_pairs(j) == [("x", "y", 0.9), ("u", "v", 0.0)]  # already in [0, 1]: unchanged
    (tmp_path / "bad.jsonl").write_text('{"text1": "x", "text2": "y", "score": "high"}\n')
    with pytest.raises(CorruptFileError, match="score"):
        read_pairs(tmp_path / "bad.jsonl")
    (tmp_path / "nohead.csv").write_text("a,b,1\n")
    with pytest.raises(CorruptFileError, match="header"):
        read_pairs(tmp_path / "nohead.csv")
    with pytest.raises(ConfigError):
        read_pairs(tmp_path / "missing.csv")
    (tmp_path / "empty.csv").write_text("\n")
    with pytest.raises(ConfigError):
        read_pairs(tmp_path / "empty.csv")


def test_as_pairs_accepts_input_examples_and_dicts():
    from sentence_transformers import InputExample

    assert as_pairs([InputExample(texts=["a", "b"], label=0.5), {"text1": "c", "text2": "d", "score": 1}]) == [
        ("a", "b", 0.5),
        ("c", "d", 1.0),
    ]
    with pytest.raises(ConfigError):
        as_pairs([("a", "b")])


def _beir(tmp_path):
    root = tmp_path / "beir"
    (root / "qrels").mkdir(parents=True)
    docs = {f"d{i}": (f"title {i}", " ".join(TOPICS[i % 6][j % 6] for j in range(i, i + 5))) for i in range(30)}
    with open(root / "corpus.jsonl", "w") as f:
        for k, (t, x) in docs.items():
            f.write(json.dumps({"_id": k, "title": t, "text": x}) + "\n")
    with open(root / "queries.jsonl", "w") as f:
        for q in range(6):
            f.write(json.dumps({"_id": f"q{q}", "text": " ".join(TOPICS[q][:2])}) + "\n")
    (root / "qrels" / "train.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{q}\td{q}\t1\nq{q}\td{q + 6}\t2\n" for q in range(6)) + "q99\td1\t1\n"
    )
    return root


def test_read_beir_and_qrels(tmp_path):
    root = _beir(tmp_path)
    data = read_beir(root, "train")
    assert len(data.corpus) == 30 and len(data.queries) == 6
    assert data.qrels["q0"] == {"d0": 1, "d6": 2} and "q99" in data.qrels
    assert data.doc_text("d0").startswith("title 0\n")
    (tmp_path / "bad.tsv").write_text("q1\td1\tx\n")
    with pytest.raises(CorruptFileError):
        read_qrels(tmp_path / "bad.tsv")


def test_qrels_to_pairs_are_graded_with_mined_hard_negatives(tiny, tmp_path):
    from nbce_rag.retrieval.index import VectorIndex

    data = read_beir(_beir(tmp_path), "train")
    index = VectorIndex.build(tiny, [{"text": data.doc_text(d), "id": d} for d in sorted(data.corpus)])
    pairs = qrels_to_pairs(data, index, n_hard=2, n_random=1, top_k=10)
    by_q = {}
    for q, p, s in pairs:
        by_q.setdefault(q, []).append((p, s))
    assert len(by_q) == 6  # q99 is not in the queries file
    for qid, qtext in data.queries.items():
        rows = by_q[qtext]
        rel = {data.doc_text(d): g for d, g in data.qrels[qid].items()}
        scores = [s for _, s in rows]
        assert sorted(s for p, s in rows if p in rel) == [0.5, 1.0]  # grades 1 and 2 of max 2
        negs = [(p, s) for p, s in rows if p not in rel]
        assert all(s in (0.3, 0.0) for _, s in negs)
        assert scores.count(0.3) <= 2 and scores.count(0.0) == 1
        # hard negatives come from the index's top candidates
        top = [data.doc_text(h.id.split("#")[0]) for h in index.search(qtext, k=10)]
        assert all(p in top for p, s in negs if s == 0.3)
    # skip_top: negatives are mined below the first skip_top non-relevant candidates
    deep = qrels_to_pairs(data, index, n_hard=2, n_random=0, skip_top=3, top_k=10, false_negative_ratio=10.0)
    for qid, qtext in data.queries.items():
        rel = {data.doc_text(d) for d in data.qrels[qid]}
        ranked = [data.doc_text(h.id.split("#")[0]) for h in index.search(qtext, k=20)]
        non_rel = [p for p in ranked if p not in rel]
        hard = [p for q, p, s in deep if q == qtext and s == 0.3]
        assert hard == non_rel[3:5]
    assert not [p for p in qrels_to_pairs(data, index, n_hard=0, n_random=0) if p[2] < 0.5]
    with pytest.raises(ConfigError):
        qrels_to_pairs(data, index, skip_top=-1)
    with pytest.raises(ConfigError):
        qrels_to_pairs(data, index, hard_score=0.0, random_score=0.0)
    with pytest.raises(ConfigError):
        qrels_to_pairs(BeirData(data.corpus, {}, data.qrels), index)


# ------------------------------------------------------------------ CLI


def test_cli_train_on_pairs(tiny_dir, tmp_path, capsys):
    from nbce_rag.cli import main

    train = tmp_path / "train.jsonl"
    with open(train, "w") as f:
        for a, b, s in topic_pairs(64, 11):
            f.write(json.dumps({"text1": a, "text2": b, "score": s}) + "\n")
    dev = tmp_path / "dev.csv"
    dev.write_text("text1,text2,score\n" + "".join(f"{a},{b},{s}\n" for a, b, s in topic_pairs(40, 12)))
    out = tmp_path / "out"
    rc = main(["train", "--train", str(train), "--dev", str(dev), "--out", str(out), "--encoder", str(tiny_dir),
               "--epochs", "1", "--lr", "1e-3", "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "dev Spearman x100" in text and "saved" in text
    report = json.loads((out / "training_report.json").read_text())
    assert report["steps"] == 4 and report["config"]["learning_rate"] == 1e-3
    # scored pairs keep the STS-B recipe where not overridden
    assert (report["config"]["batch_size"], report["config"]["group_batches"]) == (16, False)
    assert CoSENTEncoder.from_pretrained(out).identity == report["identity_after"]


def test_cli_train_reads_trec_qrels(tiny_dir, tmp_path, capsys):
    """A 4-column TREC qrels file ('qid 0 docid rel') trains on the same pairs as the BEIR TSV
    with the same labels (it used to raise CorruptFileError here while `calibrate` read it)."""
    from nbce_rag.cli import main

    root = _beir(tmp_path)
    beir = read_qrels(root / "qrels" / "train.tsv")
    trec = tmp_path / "train.trec"
    trec.write_text("".join(f"{q} 0 {d} {g:g}\n" for q, ds in beir.items() for d, g in ds.items()))
    assert read_qrels(trec) == beir
    reports = []
    for i, qrels in enumerate((root / "qrels" / "train.tsv", trec)):
        out = tmp_path / f"out{i}"
        rc = main(["train", "--qrels", str(qrels), "--corpus", str(root / "corpus.jsonl"),
                   "--queries", str(root / "queries.jsonl"), "--out", str(out), "--encoder", str(tiny_dir),
                   "--epochs", "1", "--no-progress"])
        assert rc == 0, capsys.readouterr().err
        reports.append(json.loads((out / "training_report.json").read_text()))
    assert reports[0]["n_pairs"] == reports[1]["n_pairs"] > 0
    assert reports[0]["identity_after"] == reports[1]["identity_after"]  # same pairs, same seed: same weights


def test_cli_train_on_qrels(tiny_dir, tmp_path, capsys):
    from nbce_rag.cli import main

    root = _beir(tmp_path)
    out = tmp_path / "out"
    rc = main(["train", "--qrels", str(root / "qrels" / "train.tsv"), "--corpus", str(root / "corpus.jsonl"),
               "--queries", str(root / "queries.jsonl"), "--out", str(out), "--encoder", str(tiny_dir),
               "--epochs", "1", "--no-progress", "--dev-qrels", str(root / "qrels" / "train.tsv")])
    assert rc == 0
    cfg = json.loads((out / "training_report.json").read_text())["config"]
    # qrels get the retrieval recipe (3 epochs, lr 5e-5, grouped), with the given override
    want = CoSENTTrainingConfig.retrieval()
    assert (cfg["epochs"], cfg["learning_rate"], cfg["group_batches"]) == (1, want.learning_rate, True)
    assert (want.epochs, want.learning_rate, want.group_batches) == (3, 5e-5, True)
    rc = main(["train", "--qrels", str(root / "qrels" / "train.tsv"), "--corpus", str(root / "corpus.jsonl"),
               "--queries", str(root / "queries.jsonl"), "--out", str(out), "--encoder", str(tiny_dir),
               "--epochs", "1", "--no-group-batches", "--lr", "1e-4", "--no-progress"])
    cfg = json.loads((out / "training_report.json").read_text())["config"]
    assert rc == 0 and (cfg["learning_rate"], cfg["group_batches"]) == (1e-4, False)
    assert main(["train", "--out", str(out)]) == 2  # neither --train nor --qrels: bad input
    assert "error" in capsys.readouterr().err


# ------------------------------------------------------------------ the bundled encoder


@pytest.mark.slow
def test_bundled_encoder_loads_offline_and_is_normalised():
    enc = CoSENTEncoder.from_pretrained()
    assert enc.dim == 384 and enc.max_seq_length == 256 and enc.source == "bundled"
    assert enc.identity.startswith("all-MiniLM-L6-v2@sha256:")
    v = enc.encode(["A man is playing a guitar.", "Someone plays a guitar.", "The stock market crashed."])
    assert v[0] @ v[1] > 0.6 > v[0] @ v[2]
    assert CoSENTEncoder.from_pretrained("sentence-transformers/all-MiniLM-L6-v2").identity == enc.identity


@pytest.mark.slow
def test_bundled_encoder_stsb_sample():
    f = DATA / "stsb" / "sts-test.csv"
    if not f.exists():
        pytest.skip("STS-B data not found at ../shared/data")
    enc = CoSENTEncoder.from_pretrained()
    ev = enc.evaluate(read_stsb(f)[:300])
    assert ev["spearman"] > 75  # 82.0 on the full test set
