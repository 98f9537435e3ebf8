"""Tests of the margin-calibrated filter (nbce_rag.filtering.threshold). Pure numpy, no models."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from nbce_rag.errors import CalibrationError, CorruptFileError, EncoderMismatchError
from nbce_rag.filtering.threshold import (
    CALIBRATION_FILENAME,
    CalibrationWarning,
    DroppedHit,
    FilterResult,
    MarginThreshold,
    best_f1_threshold,
    precision_target_threshold,
    read_qrels,
    read_queries,
    recall_target_threshold,
    within_query_spreads,
)
from nbce_rag.types import Passage

# --------------------------------------------------------------------------- brute-force references


def _prf_at(s, y, t):
    keep = s >= t
    tp = int(np.sum(keep & (y > 0)))
    nk = int(keep.sum())
    P = int((y > 0).sum())
    p = tp / nk if nk else 0.0
    r = tp / P if P else 0.0
    f = 2 * tp / (nk + P) if nk + P else 0.0
    return p, r, f


def _brute_best_f1(s, y):
    """Try every score as the threshold (keep s >= t): the best achievable F1."""
    return max(_prf_at(s, y, t)[2] for t in np.unique(s))


def _synthetic(rng, n_q=60, k=10, n_rel_max=3):
    """Grouped candidates: relevant ~N(0.7, 0.08), irrelevant ~N(0.45, 0.1), some queries with none."""
    s, y, g = [], [], []
    for q in range(n_q):
        n_rel = rng.integers(0, n_rel_max + 1)
        lab = np.zeros(k, dtype=int)
        lab[:n_rel] = 1
        sc = np.where(lab > 0, rng.normal(0.7, 0.08, k), rng.normal(0.45, 0.1, k))
        s.extend(sc.tolist())
        y.extend(lab.tolist())
        g.extend([f"q{q}"] * k)
    return np.array(s), np.array(y), np.array(g)


# --------------------------------------------------------------------------- exact scan


@pytest.mark.parametrize("seed", range(40))
def test_exact_scan_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 120))
    # rounded scores create ties, which must never be split
    s = np.round(rng.normal(0.5, 0.2, n), int(rng.integers(1, 4)))
    y = (rng.random(n) < rng.uniform(0.1, 0.7)).astype(int)
    if y.sum() == 0:
        y[0] = 1
    t, f1, p, r = best_f1_threshold(s, y)
    assert f1 == pytest.approx(_brute_best_f1(s, y), abs=1e-12)
    # the returned threshold reproduces the reported numbers under "keep iff s >= t"
    assert _prf_at(s, y, t) == pytest.approx((p, r, f1), abs=1e-12)


@pytest.mark.parametrize("seed", range(20))
def test_band_thresholds_match_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(5, 80))
    s = np.round(rng.random(n), 2)
    y = (rng.random(n) < 0.4).astype(int)
    y[0] = 1
    cuts = np.unique(s)
    for target in (0.5, 0.8, 0.95):
        # upper: lowest cut with precision >= target
        ok = [t for t in cuts if _prf_at(s, y, t)[0] >= target]
        up = precision_target_threshold(s, y, target)
        if not ok:
            assert up is None
        else:
            assert (s >= up).tolist() == (s >= min(ok)).tolist()
        # lower: highest cut with recall >= target
        ok = [t for t in cuts if _prf_at(s, y, t)[1] >= target]
        lo = recall_target_threshold(s, y, target)
        assert (s >= lo).tolist() == (s >= max(ok)).tolist()


def test_known_answer_separable():
    s = [0.9, 0.8, 0.7, 0.3, 0.2, 0.1]
    y = [1, 1, 1, 0, 0, 0]
    t, f1, p, r = best_f1_threshold(s, y)
    assert (f1, p, r) == (1.0, 1.0, 1.0)
    assert t == pytest.approx(0.5)  # halfway between 0.7 and 0.3


def test_known_answer_overlap():
    # desc: 0.9(1) 0.8(0) 0.7(1) 0.6(1) 0.5(0) 0.4(0); P = 3
    # cut after 0.6: tp=3, kept=4 -> F1 = 6/7 (best); threshold halfway 0.6..0.5
    t, f1, p, r = best_f1_threshold([0.4, 0.9, 0.6, 0.5, 0.8, 0.7], [0, 1, 1, 0, 0, 1])
    assert f1 == pytest.approx(6 / 7)
    assert (p, r) == (pytest.approx(0.75), 1.0)
    assert t == pytest.approx(0.55)
    # precision 1.0 only at the top; recall >= 2/3 first reached at 0.7
    assert precision_target_threshold([0.4, 0.9, 0.6, 0.5, 0.8, 0.7], [0, 1, 1, 0, 0, 1], 1.0) == pytest.approx(0.85)
    assert recall_target_threshold([0.4, 0.9, 0.6, 0.5, 0.8, 0.7], [0, 1, 1, 0, 0, 1], 0.6) == pytest.approx(0.65)


def test_ties_are_not_split():
    s = [0.5, 0.5, 0.5, 0.2]
    y = [1, 0, 1, 0]
    t, f1, p, r = best_f1_threshold(s, y)
    assert f1 == pytest.approx(0.8)  # keep the three 0.5s: tp=2, kept=3, P=2
    assert 0.2 < t <= 0.5


def test_within_query_spreads_known():
    s = [0.9, 0.8, 0.5, 0.7, 0.6, 0.65]
    y = [1, 1, 1, 1, 0, 0]
    g = ["a", "a", "a", "b", "b", "b"]
    # query a: top rel 0.9 -> spreads 0.1, 0.4; query b has one relevant -> none
    assert sorted(within_query_spreads(s, y, g).round(6).tolist()) == [0.1, 0.4]


# --------------------------------------------------------------------------- calibrate


def test_calibrate_synthetic_band_contains_threshold_and_cis():
    rng = np.random.default_rng(0)
    s, y, g = _synthetic(rng)
    th = MarginThreshold.calibrate(s, y, g, encoder_identity="enc-A", n_bootstrap=200)
    assert th.lower <= th.threshold <= th.upper
    assert th.lower <= th.stats["global_threshold"] <= th.upper
    for key in ("threshold", "global_threshold", "lower", "upper", "margin", "precision", "recall", "f1"):
        lo, hi = th.ci[key]
        assert lo <= hi
    lo, hi = th.threshold_ci
    assert lo - 0.05 <= th.threshold <= hi + 0.05
    # the in-sample t* F1 equals the exact scan
    assert th.stats["global_threshold_metrics"]["f1"] == pytest.approx(best_f1_threshold(s, y)[1])
    assert th.stats["rule"]["f1"] >= th.stats["global_threshold_metrics"]["f1"] - 1e-12
    assert th.encoder_identity == "enc-A"
    assert "threshold" in th.report() and "margin" in th.report()


@pytest.mark.parametrize("seed", range(10))
def test_band_contains_best_f1_threshold_random(seed):
    rng = np.random.default_rng(seed)
    s, y, g = _synthetic(rng, n_q=30)
    for pt, rt in ((0.5, 0.5), (0.9, 0.9), (0.99, 0.6), (0.6, 0.99)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CalibrationWarning)
            th = MarginThreshold.calibrate(s, y, g, precision_target=pt, recall_target=rt, n_bootstrap=0)
        assert th.lower <= th.threshold <= th.upper
        assert th.lower <= th.stats["global_threshold"] <= th.upper


@pytest.mark.parametrize("seed", range(15))
def test_eligible_scan_matches_brute_force(seed):
    """best_f1_threshold(eligible=...) is the exact best threshold of 'eligible AND s >= t'
    with recall over *all* positives."""
    rng = np.random.default_rng(200 + seed)
    n = int(rng.integers(5, 100))
    s = np.round(rng.random(n), 2)
    y = (rng.random(n) < 0.4).astype(int)
    y[0] = 1
    e = rng.random(n) < 0.6
    e[0] = True
    t, f1, p, r = best_f1_threshold(s, y, eligible=e)
    P = y.sum()

    def f1_at(c):
        keep = e & (s >= c)
        return 2 * np.sum(keep & (y > 0)) / (keep.sum() + P)

    assert f1 == pytest.approx(max(f1_at(c) for c in np.unique(s[e])), abs=1e-12)
    assert f1_at(t) == pytest.approx(f1, abs=1e-12)


def _group_smax(s, g):
    gmax = {k: s[g == k].max() for k in np.unique(g)}
    return np.array([gmax[k] for k in g])


def _brute_rule_f1(s, y, smax, m, thresholds):
    """F1 of 's >= t and smax - s <= m' for every t in thresholds (plain loops over the data)."""
    out = []
    P = int(np.sum(y > 0))
    for t in np.atleast_1d(thresholds):
        tp = kept = 0
        for si, yi, mi in zip(s, y, smax):
            if si >= t and (m is None or mi - si <= m):
                kept += 1
                tp += int(yi > 0)
        out.append(2 * tp / (kept + P))
    return np.array(out)


@pytest.mark.parametrize("seed", range(5))
def test_auto_margin_is_the_best_candidate_by_brute_force(seed):
    rng = np.random.default_rng(300 + seed)
    s, y, g = _synthetic(rng, n_q=15, k=6)
    th = MarginThreshold.calibrate(s, y, g, n_bootstrap=0, min_margin_queries=2)
    sp = within_query_spreads(s, y, g)
    cands = [None, 0.0] + [float(np.quantile(sp, q)) for q in np.linspace(0, 1, 11)]
    assert th.margin in cands
    # for every candidate margin, the best threshold (brute force over all scores) does not beat the choice
    smax = _group_smax(s, g)
    chosen = _brute_rule_f1(s, y, smax, th.margin, th.threshold)[0]
    grid = np.unique(s)
    for m in cands:
        assert _brute_rule_f1(s, y, smax, m, grid).max() <= chosen + 1e-12
    assert th.stats["rule"]["f1"] == pytest.approx(chosen)
    # the vectorised rule agrees with the brute force
    assert prf_keep_f1(th.keep_mask(s, g), y) == pytest.approx(chosen)


def prf_keep_f1(keep, y):
    return 2 * np.sum(keep & (y > 0)) / (keep.sum() + y.sum())


def test_margin_none_gives_global_threshold_and_fixed_margin():
    rng = np.random.default_rng(1)
    s, y, g = _synthetic(rng)
    th = MarginThreshold.calibrate(s, y, g, margin=None, n_bootstrap=0)
    assert th.margin is None
    assert th.threshold == best_f1_threshold(s, y)[0] == th.stats["global_threshold"]
    th2 = MarginThreshold.calibrate(s, y, g, margin=0.05, n_bootstrap=0)
    assert th2.margin == 0.05
    assert th2.stats["margin_mode"] == "fixed"
    with pytest.raises(CalibrationError, match="margin"):
        MarginThreshold.calibrate(s, y, g, margin=-1, n_bootstrap=0)
    with pytest.raises(CalibrationError, match="margin"):
        MarginThreshold.calibrate(s, y, g, margin="big", n_bootstrap=0)


def test_single_relevant_queries_choose_best_candidate_only():
    """One relevant per query, usually ranked first: the calibrated margin is 0 (keep the best
    candidate only, when it clears the threshold)."""
    rng = np.random.default_rng(14)
    s, y, g = [], [], []
    for q in range(80):
        sc = np.sort(rng.normal(0.5, 0.08, 10))[::-1] + rng.normal(0.0, 0.1)
        lab = np.zeros(10, dtype=int)
        if rng.random() < 0.8:
            lab[0 if rng.random() < 0.8 else 1] = 1
        s += sc.tolist()
        y += lab.tolist()
        g += [q] * 10
    with pytest.warns(CalibrationWarning, match="two or more relevant"):
        th = MarginThreshold.calibrate(s, y, g, n_bootstrap=0)
    assert th.margin == 0.0
    assert th.stats["rule"]["f1"] > th.stats["global_threshold_metrics"]["f1"]


def test_calibrate_without_groups_warns_and_disables_margin():
    rng = np.random.default_rng(2)
    s, y, _ = _synthetic(rng)
    with pytest.warns(CalibrationWarning, match="groups"):
        th = MarginThreshold.calibrate(s, y, n_bootstrap=20)
    assert th.margin is None


def test_bootstrap_is_reproducible():
    rng = np.random.default_rng(3)
    s, y, g = _synthetic(rng)
    a = MarginThreshold.calibrate(s, y, g, n_bootstrap=50, seed=7)
    b = MarginThreshold.calibrate(s, y, g, n_bootstrap=50, seed=7)
    assert a.ci == b.ci


# --------------------------------------------------------------------------- bad input


def test_nan_scores_refused():
    s = np.linspace(0, 1, 40)
    s[5] = np.nan
    y = np.r_[np.zeros(20), np.ones(20)]
    with pytest.raises(CalibrationError, match="NaN"):
        MarginThreshold.calibrate(s, y, n_bootstrap=0)


def test_too_few_positives_says_what_is_needed():
    s = np.linspace(0, 1, 40)
    y = np.zeros(40)
    y[-3:] = 1
    with pytest.raises(CalibrationError, match=r"at least 10 relevant.*got 3 relevant"):
        MarginThreshold.calibrate(s, y, n_bootstrap=0)


def test_too_few_negatives():
    s = np.linspace(0, 1, 40)
    y = np.ones(40)
    y[:2] = 0
    with pytest.raises(CalibrationError, match="2 irrelevant"):
        MarginThreshold.calibrate(s, y, n_bootstrap=0)


def test_all_equal_scores_refused():
    with pytest.raises(CalibrationError, match="all 40 scores are equal"):
        MarginThreshold.calibrate(np.full(40, 0.5), np.r_[np.zeros(20), np.ones(20)], n_bootstrap=0)


def test_length_mismatch_and_bad_targets():
    with pytest.raises(CalibrationError, match="differ in length"):
        MarginThreshold.calibrate([0.1, 0.2], [1], n_bootstrap=0)
    rng = np.random.default_rng(4)
    s, y, g = _synthetic(rng)
    with pytest.raises(CalibrationError, match="precision_target"):
        MarginThreshold.calibrate(s, y, g, precision_target=1.5)
    with pytest.raises(CalibrationError, match="groups has"):
        MarginThreshold.calibrate(s, y, g[:-1])


def test_scores_outside_cosine_range_warn():
    rng = np.random.default_rng(5)
    s, y, g = _synthetic(rng)
    with pytest.warns(CalibrationWarning, match="outside the cosine range"):
        MarginThreshold.calibrate(s * 10, y, g, n_bootstrap=0)


def test_no_multi_relevant_queries_limits_margin_with_warning():
    rng = np.random.default_rng(6)
    s, y, g = _synthetic(rng, n_rel_max=1)
    with pytest.warns(CalibrationWarning, match="two or more relevant"):
        th = MarginThreshold.calibrate(s, y, g, n_bootstrap=0)
    assert th.margin in (None, 0.0)
    assert [c["margin"] for c in th.stats["margin_candidates"]] == [None, 0.0]


def test_unreachable_precision_target_warns():
    rng = np.random.default_rng(7)
    s = rng.random(200)
    y = (rng.random(200) < 0.5).astype(int)
    y[np.argmax(s)] = 0  # the top score is irrelevant: precision 1.0 is unreachable
    with pytest.warns(CalibrationWarning, match="precision"):
        th = MarginThreshold.calibrate(s, y, n_bootstrap=0, precision_target=1.0)
    assert th.upper > s.max()


# --------------------------------------------------------------------------- filter


def _th(**kw):
    d = dict(threshold=0.5, lower=0.4, upper=0.7, margin=0.1, encoder_identity="enc-A")
    d.update(kw)
    return MarginThreshold(**d)


def test_filter_rule_and_reasons():
    th = _th()
    hits = [Passage("a", 0.80, "a"), Passage("b", 0.72, "b"), Passage("c", 0.65, "c"),
            Passage("d", 0.45, "d"), Passage("e", 0.30, "e")]
    res = th.filter(hits)
    assert isinstance(res, FilterResult)
    assert [h.id for h in res.kept] == ["a", "b"]
    assert res.confident == [True, True]
    by = {d.hit.id: d for d in res.dropped}
    assert by["c"].code == "outside_margin" and "margin" in by["c"].reason
    assert by["d"].code == "below_threshold" and by["d"].zone == "uncertain"
    assert by["e"].code == "below_threshold" and by["e"].zone == "confident"
    for d in res.dropped:
        assert isinstance(d, DroppedHit)
        dd = d.to_dict()
        assert dd["reason"] and dd["hit"]["id"] == d.hit.id
    json.dumps(res.to_dict())
    assert res.supported and not res.empty


def test_filter_matches_vectorised_rule():
    rng = np.random.default_rng(8)
    th = _th(margin=0.12)
    for _ in range(50):
        sc = rng.uniform(0.2, 0.9, 10)
        res = th.filter([Passage(str(i), float(x), str(i)) for i, x in enumerate(sc)])
        mask = th.keep_mask(sc)
        assert sorted(h.id for h in res.kept) == sorted(str(i) for i in np.flatnonzero(mask))


def test_filter_without_margin():
    th = _th(margin=None)
    res = th.filter([Passage("a", 0.9), Passage("b", 0.51), Passage("c", 0.49)])
    assert [h.text for h in res.kept] == ["a", "b"]


def test_empty_result_path():
    th = _th()
    res = th.filter([Passage("a", 0.45), Passage("b", 0.2)])
    assert res.kept == [] and res.empty and not res.supported and len(res) == 0
    assert len(res.dropped) == 2
    assert th.filter([]).empty  # no candidates at all


def test_filter_accepts_dicts_and_missing_scores():
    th = _th()
    res = th.filter([{"text": "a", "score": 0.9, "id": "x"}, {"text": "b"}, Passage("c")])
    assert [h.id for h in res.kept] == ["x"]
    assert [d.code for d in res.dropped] == ["no_score", "no_score"]
    with pytest.raises(ValueError, match="finite"):  # a NaN score is an error, not a missing one
        th.filter([{"text": "c", "score": float("nan")}])


class _FakeEncoder:
    """Duck-typed encoder: bag-of-letters vectors, L2-normalised."""

    def __init__(self, identity="enc-A"):
        self.identity = identity

    def encode(self, texts):
        out = np.zeros((len(texts), 26), dtype=np.float32)
        for i, t in enumerate(texts):
            for ch in t.lower():
                if "a" <= ch <= "z":
                    out[i, ord(ch) - 97] += 1
        n = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(n, 1e-12)


def test_encoder_mismatch_refused():
    th = _th()
    with pytest.raises(EncoderMismatchError, match="enc-A"):
        th.filter([Passage("a", 0.9)], encoder=_FakeEncoder("enc-B"))
    with pytest.raises(EncoderMismatchError):
        th.check_encoder(type("Idx", (), {"encoder_identity": "other"})())
    th.filter([Passage("a", 0.9)], encoder=_FakeEncoder("enc-A"))  # same encoder: fine


def test_rescore_recomputes_canonical_cosine():
    enc = _FakeEncoder()
    hits = [Passage("abc", 0.1, "1"), Passage("xyz", 0.99, "2")]  # store scores are meaningless
    out = MarginThreshold.rescore(enc, "abc", hits)
    assert out[0].score == pytest.approx(1.0, abs=1e-6)
    assert out[1].score == pytest.approx(0.0, abs=1e-6)
    assert out[1].metadata["store_score"] == 0.99
    assert hits[1].score == 0.99  # inputs untouched
    res = _th().filter(hits, encoder=enc, query="abc")
    assert [h.id for h in res.kept] == ["1"]


# --------------------------------------------------------------------------- persistence


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(9)
    s, y, g = _synthetic(rng)
    th = MarginThreshold.calibrate(s, y, g, encoder_identity="enc-A", n_bootstrap=30)
    p = th.save(tmp_path / "cal.json")
    back = MarginThreshold.load(p)
    assert (back.threshold, back.lower, back.upper, back.margin) == (th.threshold, th.lower, th.upper, th.margin)
    assert back.encoder_identity == "enc-A"
    assert back.ci == th.ci
    assert back.stats["n_scores"] == th.stats["n_scores"]
    # same decisions
    hits = [Passage(str(i), float(x)) for i, x in enumerate(s[:10])]
    assert [h.text for h in back.filter(hits).kept] == [h.text for h in th.filter(hits).kept]
    # no temp files left behind
    assert sorted(x.name for x in tmp_path.iterdir()) == ["cal.json"]


def test_save_into_index_dir_and_for_index(tmp_path):
    th = _th()
    assert MarginThreshold.for_index(tmp_path) is None
    p = th.save(tmp_path)
    assert p.name == CALIBRATION_FILENAME
    got = MarginThreshold.for_index(tmp_path, encoder=_FakeEncoder("enc-A"))
    assert got.threshold == th.threshold
    with pytest.raises(EncoderMismatchError):
        MarginThreshold.for_index(tmp_path, encoder=_FakeEncoder("enc-B"))
    with pytest.raises(EncoderMismatchError):
        MarginThreshold.load(tmp_path, encoder="enc-C")


def test_load_corrupt(tmp_path):
    p = tmp_path / "cal.json"
    p.write_text("{not json")
    with pytest.raises(CorruptFileError):
        MarginThreshold.load(p)
    p.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CorruptFileError, match="not an nbce-rag calibration"):
        MarginThreshold.load(p)
    d = _th().to_dict()
    del d["threshold"]
    p.write_text(json.dumps(d))
    with pytest.raises(CorruptFileError, match="malformed"):
        MarginThreshold.load(p)


# --------------------------------------------------------------------------- calibrate_from_qrels


class _FakeIndex:
    """Duck-typed VectorIndex over the fake encoder."""

    def __init__(self, docs, identity="enc-A"):
        self.encoder = _FakeEncoder(identity)
        self.encoder_identity = identity
        self.docs = docs  # {id: text}
        self.ids = list(docs)
        self.emb = self.encoder.encode([docs[i] for i in self.ids])

    def search(self, query, k):
        q = self.encoder.encode([query])[0]
        sc = self.emb @ q
        order = np.argsort(-sc)[:k]
        return [Passage(self.docs[self.ids[i]], float(sc[i]), self.ids[i]) for i in order]


def _qrels_fixture(rng, n_q=40, n_docs=120):
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    docs = {f"d{i}": "".join(rng.choice(letters, 12)) for i in range(n_docs)}
    queries, qrels = {}, {}
    ids = list(docs)
    for q in range(n_q):
        rel = rng.choice(ids, size=int(rng.integers(1, 4)), replace=False)
        base = docs[rel[0]]
        queries[f"q{q}"] = base[:8] + "".join(rng.choice(letters, 3))
        qrels[f"q{q}"] = {d: 1 for d in rel}
    return docs, queries, qrels


def test_calibrate_from_qrels_with_fake_index(tmp_path):
    rng = np.random.default_rng(10)
    docs, queries, qrels = _qrels_fixture(rng)
    idx = _FakeIndex(docs)
    th = MarginThreshold.calibrate_from_qrels(idx, queries, qrels, k=10, n_bootstrap=50)
    assert th.encoder_identity == "enc-A"
    assert th.stats["k"] == 10 and th.stats["n_scores"] == 400
    assert th.lower <= th.threshold <= th.upper
    # the same through files (BEIR layout) and triples
    qf = tmp_path / "queries.jsonl"
    qf.write_text("".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in queries.items()))
    rf = tmp_path / "qrels.tsv"
    rf.write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{d}\t1\n" for q, ds in qrels.items() for d in ds))
    assert read_queries(qf) == queries
    assert read_qrels(rf) == {q: {d: 1.0 for d in ds} for q, ds in qrels.items()}
    th2 = MarginThreshold.calibrate_from_qrels(idx, qf, rf, k=10, n_bootstrap=50)
    assert th2.threshold == th.threshold and th2.margin == th.margin
    triples = [(q, d, 1) for q, ds in qrels.items() for d in ds]
    th3 = MarginThreshold.calibrate_from_qrels(idx, list(queries.items()), triples, k=10, n_bootstrap=0)
    assert th3.threshold == th.threshold


def test_calibrate_from_qrels_id_mismatch():
    rng = np.random.default_rng(11)
    docs, queries, qrels = _qrels_fixture(rng)
    with pytest.raises(CalibrationError, match="no query id"):
        MarginThreshold.calibrate_from_qrels(_FakeIndex(docs), {"zz": "x"}, qrels, k=5)


def test_plot_written(tmp_path):
    pytest.importorskip("matplotlib")
    from nbce_rag.filtering.threshold import plot_distributions

    rng = np.random.default_rng(12)
    s, y, g = _synthetic(rng)
    th = MarginThreshold.calibrate(s, y, g, n_bootstrap=20)
    out = plot_distributions(th, tmp_path / "cal.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_public_export():
    import nbce_rag

    assert nbce_rag.MarginThreshold is MarginThreshold
    assert nbce_rag.FilterResult is FilterResult


def test_identity_digest_decides_not_the_name():
    th = _th(encoder_identity="all-MiniLM-L6-v2@sha256:0123456789abcdef")
    th.check_encoder("renamed-copy@sha256:0123456789abcdef")  # same weights, other name: fine
    with pytest.raises(EncoderMismatchError):
        th.check_encoder("all-MiniLM-L6-v2@sha256:fedcba9876543210")


class _FakeChunkIndex(_FakeIndex):
    """Like VectorIndex: chunk ids '<doc>#<n>', metadata doc_id, and a batched search_many."""

    def __init__(self, docs, identity="enc-A"):
        super().__init__(docs, identity)
        self.calls = 0

    def search_many(self, queries, k=10):
        self.calls += 1
        out = []
        for q in queries:
            hits = super().search(q, k)
            out.append([Passage(h.text, h.score, f"{h.id}#0", {"doc_id": h.id}) for h in hits])
        return out

    def search(self, query, k):  # pragma: no cover - must not be used when search_many exists
        raise AssertionError("search_many should be used")


def test_calibrate_from_qrels_maps_chunks_to_documents():
    rng = np.random.default_rng(13)
    docs, queries, qrels = _qrels_fixture(rng)
    plain = MarginThreshold.calibrate_from_qrels(_FakeIndex(docs), queries, qrels, k=10, n_bootstrap=0)
    idx = _FakeChunkIndex(docs)
    chunked = MarginThreshold.calibrate_from_qrels(idx, queries, qrels, k=10, n_bootstrap=0)
    assert idx.calls == 1  # one batched call for 40 queries
    assert chunked.threshold == plain.threshold
    assert chunked.stats["n_positives"] == plain.stats["n_positives"] > 0


@pytest.mark.parametrize("seed", range(5))
def test_filter_reproduces_calibrated_decisions_exactly(seed):
    """filter(), query by query, makes the decisions the calibration scored (boundary cases
    included: the margin is a quantile of measured spreads, so some gaps equal it exactly)."""
    rng = np.random.default_rng(400 + seed)
    s, y, g = _synthetic(rng, n_q=50)
    th = MarginThreshold.calibrate(s, y, g, n_bootstrap=0, margin_quantiles=(0.3, 0.5, 0.7))
    mask = th.keep_mask(s, g)
    for q in np.unique(g):
        idx = np.flatnonzero(g == q)
        res = th.filter([Passage(str(i), float(s[i]), str(i)) for i in idx])
        assert sorted(int(h.id) for h in res.kept) == sorted(idx[mask[idx]].tolist())
    keep = mask
    assert th.stats["rule"]["f1"] == pytest.approx(2 * np.sum(keep & (y > 0)) / (keep.sum() + y.sum()))
    # a fixed margin equal to a measured spread: the boundary candidate is kept
    sp = within_query_spreads(s, y, g)
    th2 = MarginThreshold.calibrate(s, y, g, n_bootstrap=0, margin=float(sp[0]))
    assert np.array_equal(th2.keep_mask(s, g), (s >= th2.threshold) & (
        np.array([s[g == q].max() for q in g]) - s <= sp[0]))


# --------------------------------------------------------------------------- real index + CLI


def _write_beir(tmp_path, queries, qrels):
    qf = tmp_path / "queries.jsonl"
    qf.write_text("".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in queries.items()))
    rf = tmp_path / "qrels.tsv"
    rf.write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{d}\t{v}\n" for q, ds in qrels.items() for d, v in ds.items()))
    return qf, rf


@pytest.fixture(scope="module")
def tiny_index_dir(tmp_path_factory):
    """A real VectorIndex over 40 short documents with a tiny random encoder, saved to disk."""
    pytest.importorskip("torch")
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from conftest import make_tiny_encoder
    from nbce_rag.retrieval.index import VectorIndex

    root = tmp_path_factory.mktemp("cal_index")
    enc = make_tiny_encoder(root / "enc", seed=0)
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda sigma omega".split()
    docs = [{"id": f"d{i}", "text": " ".join(rng.choice(words, 8))} for i in range(40)]
    index = VectorIndex.build(enc, docs)
    index.save(root / "index")
    # query = a document's text (+ one word); relevant: that document, and for some a second one
    queries, qrels = {}, {}
    for i in range(30):
        queries[f"q{i}"] = docs[i]["text"] + " " + words[i % len(words)]
        qrels[f"q{i}"] = {f"d{i}": 1}
        if i % 3 == 0:
            qrels[f"q{i}"][f"d{(i + 1) % 40}"] = 1
    return root, queries, qrels, docs


def test_cli_calibrate_real_index(tiny_index_dir, tmp_path, capsys):
    from nbce_rag.cli import main
    from nbce_rag.retrieval.index import VectorIndex

    root, queries, qrels, _ = tiny_index_dir
    qf, rf = _write_beir(tmp_path, queries, qrels)
    idx_dir = tmp_path / "idx"
    import shutil

    shutil.copytree(root / "index", idx_dir)
    rc = main(["calibrate", "--index", str(idx_dir), "--queries", str(qf), "--qrels", str(rf),
               "-k", "5", "--bootstrap", "50"])
    out = capsys.readouterr().out
    assert rc == 0
    for word in ("threshold:", "margin:", "band:", "precision", "recall", "F1", "wrote:"):
        assert word in out
    cal = idx_dir / CALIBRATION_FILENAME
    assert cal.exists() and (idx_dir / "calibration.png").read_bytes()[:4] == b"\x89PNG"
    # picked up next to the index, with the index's encoder; applied to real hits
    index = VectorIndex.load(idx_dir)
    th = MarginThreshold.for_index(idx_dir, encoder=index)
    assert th.encoder_identity == index.encoder_identity
    assert th.stats["k"] == 5 and th.stats["n_scores"] == 150 and th.stats["n_positives"] >= 30
    res = th.filter(index.search(queries["q1"], 5), encoder=index)
    assert isinstance(res, FilterResult)
    assert len(res.kept) + len(res.dropped) == 5
    # --out elsewhere, --margin none, --no-plot
    other = tmp_path / "cal2.json"
    assert main(["calibrate", "--index", str(idx_dir), "--queries", str(qf), "--qrels", str(rf),
                 "-k", "5", "--bootstrap", "0", "--margin", "none", "--no-plot", "--out", str(other)]) == 0
    assert MarginThreshold.load(other).margin is None
    assert not other.with_suffix(".png").exists()


def test_cli_calibrate_reads_trec_qrels_and_tsv_queries(tiny_index_dir, tmp_path, capsys):
    """A 4-column TREC qrels file ('qid 0 docid rel') and 'id<TAB>text' queries calibrate
    exactly as the BEIR files with the same labels (one reader for every command)."""
    from nbce_rag.cli import main

    root, queries, qrels, _ = tiny_index_dir
    qf, rf = _write_beir(tmp_path, queries, qrels)
    trec = tmp_path / "qrels.trec"
    trec.write_text("".join(f"{q} 0 {d} {v}\n" for q, ds in qrels.items() for d, v in ds.items()))
    tsv = tmp_path / "queries.tsv"
    tsv.write_text("".join(f"{k}\t{v}\n" for k, v in queries.items()))
    outs = []
    for name, q, r in (("beir", qf, rf), ("trec", tsv, trec)):
        out = tmp_path / f"{name}.json"
        assert main(["calibrate", "--index", str(root / "index"), "--queries", str(q), "--qrels", str(r),
                     "-k", "5", "--bootstrap", "0", "--no-plot", "--out", str(out)]) == 0
        outs.append(MarginThreshold.load(out))
    capsys.readouterr()
    assert outs[0].stats["n_positives"] == outs[1].stats["n_positives"] >= 30
    assert (outs[0].threshold, outs[0].margin) == (outs[1].threshold, outs[1].margin)


def test_cli_calibrate_bad_input(tiny_index_dir, tmp_path, capsys):
    from nbce_rag.cli import main

    root, queries, qrels, _ = tiny_index_dir
    few = {q: qrels[q] for q in list(qrels)[:3]}  # 3 positives: not enough
    qf, rf = _write_beir(tmp_path, queries, few)
    rc = main(["calibrate", "--index", str(root / "index"), "--queries", str(qf), "--qrels", str(rf),
               "-k", "5", "--bootstrap", "0", "--out", str(tmp_path / "x.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "at least 10 relevant" in err
    assert not (tmp_path / "x.json").exists()
    assert main(["calibrate", "--index", str(root / "index"), "--queries", str(qf), "--qrels", str(rf),
                 "--margin", "wide"]) == 2
    assert "--margin" in capsys.readouterr().err


def test_real_index_encoder_mismatch(tiny_index_dir, tmp_path):
    from conftest import make_tiny_encoder
    from nbce_rag.retrieval.index import VectorIndex

    root, queries, qrels, _ = tiny_index_dir
    index = VectorIndex.load(root / "index")
    th = MarginThreshold.calibrate_from_qrels(index, queries, qrels, k=5, n_bootstrap=0)
    other = make_tiny_encoder(tmp_path / "other", seed=1)
    assert other.identity != index.encoder_identity
    with pytest.raises(EncoderMismatchError):
        th.filter(index.search(queries["q0"], 5), encoder=other)
    with pytest.raises(EncoderMismatchError):
        th.check_encoder(other)
    th.filter(index.search(queries["q0"], 5), encoder=index.encoder)  # the right one: fine
    # rescore with the real encoder reproduces the index's cosine
    hits = index.search(queries["q2"], 5)
    again = MarginThreshold.rescore(index.encoder, queries["q2"], hits)
    assert np.allclose([h.score for h in again], [h.score for h in hits], atol=1e-5)
    via_index = th.filter([h.text for h in hits], encoder=index, query=queries["q2"])  # store gave no scores
    assert [h.text for h in via_index.kept] == [h.text for h in th.filter(hits).kept]


def test_several_relevant_per_query_open_the_margin():
    """Queries with 2-3 relevant candidates that score close together, above a crowd of
    irrelevant ones whose level varies by query: the calibrated margin is > 0 and the rule beats
    the global threshold alone."""
    rng = np.random.default_rng(15)
    s, y, g = [], [], []
    for q in range(80):
        level = rng.normal(0.5, 0.1)  # per-query shift: absolute cosine is a weak signal
        n_rel = int(rng.integers(2, 4))
        rel = level + 0.15 + rng.normal(0, 0.02, n_rel)
        irr = level + rng.normal(0, 0.04, 10 - n_rel)
        s += rel.tolist() + irr.tolist()
        y += [1] * n_rel + [0] * (10 - n_rel)
        g += [q] * 10
    th = MarginThreshold.calibrate(s, y, g, n_bootstrap=0)
    assert th.margin is not None and th.margin > 0.02
    assert th.stats["rule"]["f1"] > th.stats["global_threshold_metrics"]["f1"] + 0.1


# --------------------------------------------------------------------------- two decisions (issue 23)

from nbce_rag.filtering.decisions import (  # noqa: E402
    SupportDecision,
    calibrate_keep,
    calibrate_support,
    keep_mask,
    keep_recall,
)


def _brute_keep_recall(s, y, g, t, m):
    """Macro keep-recall and rows of the rule, by loops over queries."""
    recs, rows = [], 0
    for q in np.unique(g):
        sel = g == q
        sq, yq = s[sel], y[sel]
        keep = (sq >= t) & ((m is None) | (sq.max() - sq <= (np.inf if m is None else m)))
        rows += int(keep.sum())
        if yq.sum():
            recs.append((keep & (yq > 0)).sum() / (yq > 0).sum())
    return float(np.mean(recs)), rows / np.unique(g).size


@pytest.mark.parametrize("seed", range(4))
def test_keep_recall_first_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    s, y, g = _synthetic(rng, n_q=50)
    for target in (0.8, 0.95, 1.0):
        k = calibrate_keep(s, y, g, recall_target=target, margin=None, n_bootstrap=0)
        t = k["threshold"]
        rec, _ = _brute_keep_recall(s, y, g, t, None)
        assert rec >= target - 1e-9
        # the next distinct score above the threshold no longer reaches the target: it is the highest cut
        higher = np.unique(s[s > s[s >= t].min()])  # the cut above the lowest kept score
        if higher.size:
            assert _brute_keep_recall(s, y, g, higher[0], None)[0] < target - 1e-9
        # auto: every feasible margin candidate keeps at least as many rows as the chosen one
        a = calibrate_keep(s, y, g, recall_target=target, n_bootstrap=0)
        rec_a, rows_a = _brute_keep_recall(s, y, g, a["threshold"], a["margin"])
        assert rec_a >= target - 1e-9 and abs(rows_a - a["stats"]["rows"]) < 1e-9
        for c in a["stats"]["margin_candidates"]:
            if c["feasible"]:
                assert _brute_keep_recall(s, y, g, c["threshold"], c["margin"])[1] >= rows_a - 1e-9
        assert rows_a <= _brute_keep_recall(s, y, g, t, None)[1] + 1e-9  # no margin is one candidate


def test_keep_recall_does_not_depend_on_how_many_passages_are_relevant():
    # query A: 1 relevant of 1 kept; query B: 1 of 3 kept -> macro (1 + 1/3) / 2, micro 2/4
    s = np.array([0.9, 0.1, 0.8, 0.2, 0.2, 0.1])
    y = np.array([1, 0, 1, 1, 1, 0])
    g = np.array(["A", "A", "B", "B", "B", "B"])
    rec, n = keep_recall(keep_mask(s, g, 0.5, None), y, g)
    assert n == 2 and rec == pytest.approx((1 + 1 / 3) / 2)


def test_support_flags_the_target_share_of_off_topic_questions():
    rng = np.random.default_rng(1)
    ind, off = rng.normal(0.6, 0.1, 120), rng.normal(0.35, 0.1, 80)
    r = calibrate_support(ind, off, flag_target=0.9, n_bootstrap=50)
    t = r["threshold"]
    assert r["stats"]["method"] == "off_topic"
    assert np.mean(off < t) >= 0.9
    below = np.sort(off[off < t])[-1]  # the lowest cut: one more off-topic maximum would pass below it
    assert np.mean(off < below) < 0.9
    assert r["stats"]["in_domain_supported"] == pytest.approx(np.mean(ind >= t))
    lo, hi = r["ci"]["threshold"]
    assert lo <= t <= hi
    # without off-topic questions: the highest cut keeping 95% of in-domain questions supported
    r2 = calibrate_support(ind, None, supported_target=0.95, n_bootstrap=0)
    t2 = r2["threshold"]
    assert r2["stats"]["method"] == "in_domain_quantile" and np.mean(ind >= t2) >= 0.95
    assert np.mean(ind >= np.sort(ind[ind >= t2])[1]) < 0.95
    with pytest.raises(CalibrationError):
        calibrate_support([], [0.1, 0.2])


def test_both_decisions_persist_and_reload(tmp_path):
    rng = np.random.default_rng(2)
    s, y, g = _synthetic(rng, n_q=60)
    off = rng.normal(0.45, 0.1, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        th = MarginThreshold.calibrate(s, y, g, encoder_identity="enc-A", n_bootstrap=30, keep_recall_target=0.95,
                                       off_topic_max=off)
    assert th.keep.method == "recall_first" and th.keep.threshold == th.threshold
    assert th.support.method == "off_topic" and th.support.threshold != th.threshold
    assert th.keep.ci["keep_recall"] and th.support.ci["threshold"]
    assert th.lower <= th.threshold <= th.upper
    rec, _ = _brute_keep_recall(s, y, g, th.keep.threshold, th.keep.margin)
    assert rec >= 0.95 - 1e-9
    p = th.save(tmp_path / "c.json")
    d = json.loads(p.read_text())
    assert d["version"] == 2 and d["keep"]["threshold"] == th.threshold and d["support"]["threshold"] == th.support.threshold
    back = MarginThreshold.load(p)
    assert back.keep == th.keep and back.support == th.support
    assert back.ci == th.ci and back.stats == json.loads(json.dumps(th.stats))
    assert "support:" in back.report() and "keep:" in back.report()


def test_version_1_dict_loads_as_one_rule_for_both_decisions(tmp_path):
    v1 = {"format": "nbce-rag/margin-threshold", "version": 1, "encoder_identity": "enc-A", "threshold": 0.5,
          "lower": 0.4, "upper": 0.7, "margin": 0.1, "rule": "keep iff s >= threshold and s >= s_max - margin",
          "ci": {"threshold": [0.45, 0.55]}, "stats": {"objective": "f0.5"}}
    p = tmp_path / "v1.json"
    p.write_text(json.dumps(v1))
    th = MarginThreshold.load(p)
    assert (th.keep.threshold, th.keep.margin) == (0.5, 0.1)
    assert th.support.threshold == 0.5 and th.support.method == "single_rule"
    # the decisions are today's: supported iff something passes s >= threshold
    for hits in ([0.55, 0.52, 0.3], [0.49, 0.2], [0.5], []):
        r = th.filter([Passage(f"p{i}", sc) for i, sc in enumerate(hits)])
        assert r.supported == bool(r.kept) == any(h >= 0.5 for h in hits)
    # saved again it is a version-2 file with the same decisions
    again = MarginThreshold.load(th.save(tmp_path / "v2.json"))
    assert again.keep == th.keep and again.support.threshold == 0.5


def test_support_and_keep_decide_apart():
    th = _th(threshold=0.3, lower=0.2, upper=0.7, margin=0.2, support=SupportDecision(0.6, stats={"method": "off_topic"}))
    r = th.filter([Passage("a", 0.65), Passage("b", 0.5), Passage("c", 0.35), Passage("d", 0.1)])
    assert r.supported and r.support_score == 0.65 and r.support_threshold == 0.6
    assert [p.text for p in r.kept] == ["a", "b"] and {d.code for d in r.dropped} == {"outside_margin", "below_threshold"}
    weak = th.filter([Passage("a", 0.45), Passage("b", 0.1)])
    assert not weak.supported and [p.text for p in weak.kept] == ["a"]  # decoded, flagged
    none = th.filter([Passage("a", 0.2)])
    assert not none.supported and none.kept == []
    assert weak.to_dict()["supported"] is False and weak.to_dict()["support_threshold"] == 0.6
