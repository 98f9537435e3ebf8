"""Pooling and fusion against a plain NumPy reference on random log-probs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nbce_rag.decoding import nbce

NEG = -100.0


# ---------------------------------------------------------------- NumPy reference
def np_log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))


def np_top_p(logp, top_p):
    out = logp.copy()
    for r in range(logp.shape[0]):
        order = np.argsort(logp[r], kind="stable")  # ascending, like the HF warper
        p = np.exp(logp[r][order])
        p = p / p.sum()
        cum = np.cumsum(p)
        remove = cum <= 1 - top_p
        remove[-1] = False
        out[r, order[remove]] = -np.inf
    return out


def np_entropy(logp):
    with np.errstate(invalid="ignore", over="ignore"):
        return -(np.exp(logp) * np.clip(logp, NEG, 0)).sum(-1)


def np_pool(name, rows, ent, scores, prev, eta):
    n = rows.shape[0]
    if name == "auto":
        return np_pool("min_entropy" if scores is None else "replug", rows, ent, scores, prev, eta)
    if name == "min_entropy" or name == "scored_entropy":
        e = ent.copy()
        if prev is not None:
            e[prev] -= eta
        if name == "scored_entropy" and scores is not None:
            e = e - 5.0 * (scores - scores.max())
        k = int(np.argmin(e))
        w = np.zeros(n)
        w[k] = 1
        return rows[k], w
    if name == "mean":
        pooled = np.clip(rows, NEG, None).mean(0)
        pooled[~np.isfinite(rows).any(0)] = -np.inf
        return pooled, np.full(n, 1 / n)
    if name == "max":
        return rows.max(0), np.full(n, 1 / n)
    if name == "replug":
        if scores is None:
            w = np.full(n, 1 / n)
        else:
            z = scores / 0.1
            w = np.exp(z - z.max())
            w /= w.sum()
        with np.errstate(divide="ignore"):
            pooled = np.log((w[:, None] * np.exp(rows)).sum(0))
        return pooled, w
    if name == "posterior":
        # at its first step, with no question likelihood given, the posterior's prior is
        # softmax(score / 0.1) (uniform without scores): replug's mixture (its online update is
        # checked against NumPy in tests/test_scoring.py)
        return np_pool("replug", rows, ent, scores, prev, eta)
    raise AssertionError(name)


def np_fuse(pooled, uncond, beta):
    with np.errstate(invalid="ignore"):
        merged = (1 + beta) * pooled - beta * uncond
    return np.where(uncond > NEG, merged, pooled)


def reference_step(logits, name, beta, eta, top_p, scores, prev):
    logp = np_top_p(np_log_softmax(logits), top_p)
    rows = logp[1:]
    pooled, w = np_pool(name, rows, np_entropy(rows), scores, prev, eta)
    return np_fuse(pooled, logp[0], beta), w


# ---------------------------------------------------------------- tests
POOLINGS = sorted(nbce.POOLINGS)


def _random_logits(rng, n_rows, vocab, sharp=3.0):
    return rng.normal(size=(n_rows, vocab)) * rng.uniform(0.5, sharp, size=(n_rows, 1))


def _assert_close(a, b):
    a = np.asarray(a, dtype=np.float64)
    assert np.array_equal(np.isfinite(a), np.isfinite(b)), "support (finite entries) differs"
    np.testing.assert_array_equal(a[np.isneginf(a)], b[np.isneginf(b)])
    f = np.isfinite(a)
    np.testing.assert_allclose(a[f], b[f], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", POOLINGS)
@pytest.mark.parametrize("n_passages", [1, 2, 7])
@pytest.mark.parametrize("with_scores", [False, True])
def test_step_matches_numpy_reference(name, n_passages, with_scores):
    rng = np.random.default_rng(n_passages * 31 + len(name) + with_scores)
    for trial in range(5):
        logits = _random_logits(rng, n_passages + 1, 50)
        scores = rng.uniform(0.2, 0.9, size=n_passages) if with_scores else None
        prev = int(rng.integers(n_passages)) if trial % 2 else None
        ref, w_ref = reference_step(logits, name, 0.25, 0.1, 0.9, scores, prev)
        st = nbce.nbce_step(
            torch.tensor(logits, dtype=torch.float32), beta=0.25, eta=0.1, top_p=0.9,
            pooling=nbce.get_pooling(name), scores=None if scores is None else torch.tensor(scores, dtype=torch.float32),
            prev=prev,
        )
        _assert_close(st.logits.numpy(), ref)
        np.testing.assert_allclose(st.weights.numpy(), w_ref, rtol=1e-5, atol=1e-6)
        assert torch.isfinite(st.logits).any(), "at least one token must stay possible"


def test_top_p_matches_transformers_warper():
    from transformers import TopPLogitsWarper

    rng = np.random.default_rng(0)
    logits = torch.tensor(_random_logits(rng, 4, 100), dtype=torch.float32)
    logp = nbce.log_softmax(logits)
    ours = nbce.top_p_truncate(logp, 0.95)
    theirs = TopPLogitsWarper(0.95)(None, logp.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    assert torch.equal(ours[torch.isfinite(ours)], theirs[torch.isfinite(theirs)])


def test_entropy_of_truncated_rows_is_finite_and_matches_reference():
    logp = torch.tensor([[0.0, float("-inf"), float("-inf")], [np.log(0.5), np.log(0.5), float("-inf")]])
    ent = nbce.entropy(logp)
    assert torch.isfinite(ent).all()
    np.testing.assert_allclose(ent.numpy(), [0.0, np.log(2)], atol=1e-6)


@pytest.mark.parametrize("name", POOLINGS)
def test_rows_with_minus_inf_entries(name):
    """Rows that are -inf almost everywhere (one-token nuclei) and a no-passage row that is
    -inf where the passages are not: no NaN, no +inf, and the support is never empty."""
    inf = float("-inf")
    logits = torch.tensor(
        [
            [0.0, 0.0, inf, inf, inf, inf],  # no-passage row: only tokens 0, 1 possible
            [inf, inf, 5.0, inf, inf, inf],  # passage 0: only token 2
            [inf, inf, inf, 1.0, 1.0, inf],  # passage 1: tokens 3, 4
        ]
    )
    st = nbce.nbce_step(logits, beta=0.25, eta=0.1, top_p=0.95, pooling=nbce.get_pooling(name))
    assert not torch.isnan(st.logits).any()
    assert not torch.isposinf(st.logits).any()
    assert torch.isfinite(st.logits).any()
    ref, _ = reference_step(logits.numpy().astype(np.float64), name, 0.25, 0.1, 0.95, None, None)
    _assert_close(st.logits.numpy(), ref)


def test_fusion_falls_back_where_uncond_is_truncated():
    pooled = torch.tensor([-1.0, -2.0, float("-inf")])
    uncond = torch.tensor([-0.5, float("-inf"), -0.1])
    out = nbce.fuse(pooled, uncond, beta=0.25)
    assert out[0] == pytest.approx(1.25 * -1.0 + 0.25 * 0.5)
    assert out[1] == -2.0  # prior truncated: the pooled row as is
    assert out[2] == float("-inf")  # outside the chosen nucleus stays impossible


def test_min_entropy_ties_pick_the_first_row_and_eta_breaks_them():
    row = torch.log_softmax(torch.tensor([2.0, 1.0, 0.0]), -1)
    logits = torch.stack([torch.zeros(3), row, row, row])
    pool = nbce.get_pooling("min_entropy")
    st = nbce.nbce_step(logits, beta=0.0, eta=0.1, top_p=1.0, pooling=pool)
    assert st.weights.tolist() == [1.0, 0.0, 0.0]
    st = nbce.nbce_step(logits, beta=0.0, eta=0.1, top_p=1.0, pooling=pool, prev=2)
    assert st.weights.tolist() == [0.0, 0.0, 1.0]


def test_eta_keeps_the_previous_passage_unless_another_is_clearly_surer():
    sharp = torch.log_softmax(torch.tensor([3.0, 0.0, 0.0]), -1)
    flatter = torch.log_softmax(torch.tensor([2.9, 0.0, 0.0]), -1)
    gap = float(nbce.entropy(flatter) - nbce.entropy(sharp))
    assert 0 < gap < 0.1
    logits = torch.stack([torch.zeros(3), sharp, flatter])
    pool = nbce.get_pooling("min_entropy")
    assert nbce.nbce_step(logits, beta=0, eta=0.1, top_p=1.0, pooling=pool, prev=1).weights.tolist() == [0.0, 1.0]
    assert nbce.nbce_step(logits, beta=0, eta=0.0, top_p=1.0, pooling=pool, prev=1).weights.tolist() == [1.0, 0.0]


def test_scored_entropy_reduces_to_min_entropy_without_scores_and_follows_scores_when_weighted():
    rng = np.random.default_rng(3)
    logits = torch.tensor(_random_logits(rng, 5, 40), dtype=torch.float32)
    a = nbce.nbce_step(logits, beta=0.25, eta=0.1, top_p=0.95, pooling=nbce.get_pooling("min_entropy"))
    b = nbce.nbce_step(logits, beta=0.25, eta=0.1, top_p=0.95, pooling=nbce.ScoredEntropyPooling(5.0))
    assert torch.equal(a.logits, b.logits)
    scores = torch.tensor([0.1, 0.2, 0.9, 0.3])
    c = nbce.nbce_step(logits, beta=0.25, eta=0.1, top_p=0.95, pooling=nbce.ScoredEntropyPooling(1e4), scores=scores)
    assert c.weights.tolist() == [0.0, 0.0, 1.0, 0.0]


def test_replug_is_a_proper_distribution():
    rng = np.random.default_rng(4)
    logits = torch.tensor(_random_logits(rng, 4, 30), dtype=torch.float32)
    st = nbce.nbce_step(logits, beta=0.0, eta=0.0, top_p=1.0, pooling=nbce.get_pooling("replug"), scores=torch.tensor([0.3, 0.5, 0.7]))
    assert float(st.logits.exp().sum()) == pytest.approx(1.0, abs=1e-5)


def test_attribution_names_the_row_that_supplied_the_token():
    inf = float("-inf")
    logits = torch.tensor([[0.0, 0.0, 0.0], [5.0, inf, inf], [inf, 5.0, 0.0]])
    st = nbce.nbce_step(logits, beta=0.25, eta=0.0, top_p=1.0, pooling=nbce.get_pooling("max"))
    assert nbce.attribute(st, 0) == 0
    assert nbce.attribute(st, 1) == 1


def test_single_row_is_rejected_and_unknown_pooling_named():
    with pytest.raises(ValueError):
        nbce.nbce_step(torch.zeros(1, 5), beta=0.25, eta=0.1, top_p=0.95, pooling=nbce.get_pooling("mean"))
    with pytest.raises(ValueError, match="min_entropy"):
        nbce.get_pooling("median")


def _same(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row: the same -inf pattern and bit-identical kept values."""
    fa, fb = torch.isinf(a), torch.isinf(b)
    return (fa == fb).all(-1) & (torch.where(fa, 0.0, a) == torch.where(fb, 0.0, b)).all(-1)


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.95, 0.99, 0.999])
def test_fast_nucleus_equals_the_full_sort_row_by_row(top_p):
    """The bisection fast path of top_p_truncate against the reference full sort, bit for bit,
    on rows from flat (nuclei of thousands of tokens) to very peaked; and it decides most rows
    itself (else the test would only compare the sort with itself)."""
    g = torch.Generator().manual_seed(0)
    rows = torch.cat([torch.randn(8, 49152, generator=g) * s for s in (0.3, 1.0, 3.0, 6.0, 10.0, 20.0)])
    logp = nbce.log_softmax(rows)
    sorted_rows = []
    real = nbce.top_p_sorted

    def spy(x, p):
        sorted_rows.append(x.shape[0])
        return real(x, p)

    nbce.top_p_sorted = spy
    try:
        fast = nbce.top_p_truncate(logp, top_p)
    finally:
        nbce.top_p_sorted = real
    assert _same(fast, real(logp, top_p)).all()
    if top_p <= 0.95:
        assert sum(sorted_rows) < logp.shape[0] // 2  # the 8 near-uniform rows (scale 0.3) need the sort


def test_fast_nucleus_ties_infinities_small_vocab_and_1d():
    logp = nbce.log_softmax(torch.randn(4, 5000) * 8)
    logp[0, :10] = 5.0  # ten tied top tokens: the boundary falls between equal values
    logp[1, 100:] = float("-inf")  # a row already truncated
    logp[2] = float("-inf")
    logp[2, 7] = 0.0  # a one-token row
    logp = nbce.log_softmax(logp)
    for top_p in (0.25, 0.5, 0.95):
        assert _same(nbce.top_p_truncate(logp, top_p), nbce.top_p_sorted(logp, top_p)).all()
        assert _same(nbce.top_p_truncate(logp[3], top_p)[None], nbce.top_p_sorted(logp[3:4], top_p)).all()
    small = nbce.log_softmax(torch.randn(3, 100))  # k >= V/2: the sort directly
    assert _same(nbce.top_p_truncate(small, 0.9), nbce.top_p_sorted(small, 0.9)).all()
