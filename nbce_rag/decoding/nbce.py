"""The math of NBCE as pure tensor functions (no model needed to test them).

NBCE (Naive Bayes-based Context Extension; Su, 2023, kexue.fm/archives/9617; Su et al.,
NAACL 2024) fuses the next-token distributions of ``n`` rows, one per passage ``S_k``, with
that of a row with no passage::

    log p(T | S_1..S_n) = (β+1) · P[ log p(T | S_k) ] − β · log p(T) + const

``P`` is a pooling over the passage rows. Following the reference implementation
(``bojone/NBCE`` ``test.py``), every row is first truncated to its top-p nucleus (tail → −inf),
the entropy of each truncated row is computed with ``clip(log p, −100, 0)`` (so that −inf tails
contribute 0), and the merged score falls back to the pooled row wherever the no-passage row
was truncated (``−∞ − (−∞)`` is undefined). η lowers the entropy of the previously chosen
passage so that the selection does not jitter between passages token by token.

Pooling strategies are small callables (like transformers' ``LogitsProcessor``): they take the
truncated log-probs of the passage rows ``[n, V]``, their entropies ``[n]``, the retrieval
scores ``[n]`` (or ``None``) and the previously chosen row, and return a :class:`Pooled`: the
pooled log-scores ``[V]`` and the per-row weights ``[n]`` (one-hot for selection strategies)
that attribution uses.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, Optional, Type

import torch

#: Log-probabilities below this count as "truncated" (the reference's threshold).
NEG_FLOOR = -100.0


@dataclass
class Pooled:
    logp: torch.Tensor  #: [V] pooled log-scores; −inf outside the support
    weights: torch.Tensor  #: [n] non-negative, sums to 1; the share of each row in the pool


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Exact log-softmax in fp32 (``logits − logsumexp``), as in the reference."""
    logits = logits.float()
    return logits - logits.logsumexp(dim=-1, keepdim=True)


def top_p_truncate(logp: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set to −inf the tail of each row outside its top-p nucleus; kept entries keep their
    *unrenormalised* log-probs. Identical to transformers' ``TopPLogitsWarper`` (ascending
    sort, drop tokens with cumulative probability ≤ 1 − top_p, always keep at least one).

    Fast path: a full sort of a 49k vocabulary per row was most of the fusion on a CPU
    (``bench_speed.py --profile``), and the bundled model's nuclei hold hundreds to thousands
    of tokens, so a top-k bound does not suffice. Instead the boundary value is bisected: with
    ``M(t)`` the probability mass above ``t``, a token ``v`` is kept iff ``M(v) < top_p``, so
    tokens above ``hi`` (``M(hi) < top_p``) are kept, tokens at or below ``lo``
    (``M(lo) ≥ top_p``) dropped, and only the few between (plus the first below ``lo``) are
    sorted and decided in float64. A row whose boundary is within ``2e-6`` of ``top_p`` (where
    the reference's float32 cumulative sum could decide otherwise), falls between tied values
    or keeps too many undecided tokens goes to the full sort (:func:`top_p_sorted`). The
    result equals the full sort's (tests/test_nbce_math.py checks it row by row)."""
    if top_p >= 1.0:
        return logp
    one = logp.dim() == 1
    x = logp.unsqueeze(0) if one else logp
    if x.shape[-1] <= 2 * _NUCLEUS_K:
        out = top_p_sorted(x, top_p)
        return out[0] if one else out
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    p = (x - lse).exp()
    hi = x.max(dim=-1, keepdim=True).values  # M(hi) = 0 < top_p
    lo = hi - 40.0  # M(lo) >= top_p unless top_p is within e^-40·V of 1 (then: the sort)
    for _ in range(_BISECT_STEPS):
        mid = (lo + hi) / 2
        below = (p * (x > mid)).sum(dim=-1, keepdim=True) >= top_p
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    above = x > hi
    m_hi = torch.where(above, p.double(), 0.0).sum(-1, keepdim=True)
    between = (x > lo) & ~above
    count = between.sum(-1, keepdim=True)
    small = count <= _NUCLEUS_K  # rows with more undecided tokens go to the sort
    k = min(int(torch.where(small, count, 0).max()) + 1, x.shape[-1])
    vals, idx = torch.topk(x.masked_fill(above, float("-inf")), k, dim=-1)  # the undecided, then the first below lo
    pc = (vals.double() - lse.double()).exp()
    excl = m_hi + pc.cumsum(-1) - pc  # mass strictly above each candidate
    keep = excl < top_p
    m = keep.sum(-1, keepdim=True)  # kept candidates; the first removed is candidate m
    last, first_out = (m - 1).clamp(min=0), m.clamp(max=k - 1)
    ok = (m >= 1) & (m < k) & small
    ok &= (top_p - excl.gather(-1, last) > _NUCLEUS_EPS) & (excl.gather(-1, first_out) - top_p > _NUCLEUS_EPS)
    ok &= vals.gather(-1, last) != vals.gather(-1, first_out)
    ok = ok.squeeze(-1)
    kept_vals = torch.where(keep, vals, torch.full_like(vals, float("-inf")))
    out = x.masked_fill(~above, float("-inf")).scatter(-1, idx, torch.where(keep, kept_vals, x.gather(-1, idx).masked_fill(~above.gather(-1, idx), float("-inf"))))
    if not bool(ok.all()):
        bad = (~ok).nonzero().squeeze(-1)
        out[bad] = top_p_sorted(x[bad], top_p)
    return out[0] if one else out


#: bisection steps on the boundary value (40 nats / 2^12 ≈ 0.01 nats: undecided tokens are a handful)
_BISECT_STEPS = 12
#: most undecided tokens sorted per row before the full sort is used instead
_NUCLEUS_K = 256
#: how far from top_p the fast nucleus boundary must be to decide without the full sort (the
#: reference's float32 cumulative sum was within 1.5e-7 of the exact one on 40 rows of 49k)
_NUCLEUS_EPS = 2e-6


def top_p_sorted(logp: torch.Tensor, top_p: float) -> torch.Tensor:
    """The reference nucleus: a full ascending sort of each row (``TopPLogitsWarper``)."""
    sorted_lp, sorted_idx = torch.sort(logp, descending=False, dim=-1)
    cum = sorted_lp.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum <= (1 - top_p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
    return logp.masked_fill(remove, float("-inf"))


def entropy(logp: torch.Tensor) -> torch.Tensor:
    """``−Σ p · clip(log p, −100, 0)`` per row: the entropy of the truncated, unnormalised
    nucleus (truncated entries contribute exactly 0, never NaN)."""
    return -(logp.exp() * logp.clamp(NEG_FLOOR, 0.0)).sum(dim=-1)


def _sticky(ent: torch.Tensor, prev: Optional[int], eta: float) -> torch.Tensor:
    if prev is None or prev < 0 or eta == 0.0:
        return ent
    ent = ent.clone()
    ent[prev] -= eta
    return ent


def _one_hot(n: int, k: int, like: torch.Tensor) -> torch.Tensor:
    w = torch.zeros(n, dtype=torch.float32, device=like.device)
    w[k] = 1.0
    return w


def _mixture(logp: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """log Σ_k w_k p_k (a proper mixture in probability space); −inf where every row is −inf."""
    logw = torch.where(weights > 0, weights.log(), torch.full_like(weights, float("-inf")))
    return torch.logsumexp(logp + logw[:, None], dim=0)


class Pooling:
    """Base class: ``pool(logp [n,V], ent [n], scores [n] | None, prev, eta) -> Pooled``.

    A pooling with state across the tokens of one answer (``posterior``) overrides
    :meth:`begin` (called once per answer, after the prefill; returns the per-answer pooling)
    and :meth:`observe` (called after each sampled token). Stateless poolings keep the
    defaults, so the same instance can serve concurrent answers."""

    name = "base"

    def needs_question_loglik(self, has_scores: bool) -> bool:
        """Whether :meth:`begin` uses ``log p(question | passage)`` (the decoder computes it in
        the prefill only then)."""
        return False

    def begin(self, scores: Optional[torch.Tensor] = None, question_loglik: Optional[torch.Tensor] = None) -> "Pooling":
        """The pooling for one answer, given the rows' retrieval scores ``[n]`` and question
        log-likelihoods ``[n]`` (either may be ``None``)."""
        return self

    def observe(self, step: "Step", token: int) -> Optional[torch.Tensor]:
        """Called with each step and the token sampled from it; returns the updated row weights
        when the pooling keeps some (else ``None``)."""
        return None

    def __call__(
        self,
        logp: torch.Tensor,
        ent: torch.Tensor,
        scores: Optional[torch.Tensor],
        prev: Optional[int],
        eta: float,
    ) -> Pooled:  # pragma: no cover - interface
        raise NotImplementedError


class MinEntropyPooling(Pooling):
    """The reference NBCE pooling: the single row of lowest (η-adjusted) entropy.
    Su: the "most confident expert"; an implicit per-step retrieval with entropy as score."""

    name = "min_entropy"

    def __call__(self, logp, ent, scores, prev, eta):
        k = int(torch.argmin(_sticky(ent, prev, eta)))
        return Pooled(logp[k], _one_hot(logp.shape[0], k, logp))


class MeanPooling(Pooling):
    """Plain naive Bayes (β = n−1 recovers eq. nbce-1): the mean of the rows' log-probs.
    Truncated entries count as ``log p = −100`` (the reference's floor) so that a token outside
    one passage's nucleus is strongly penalised but not excluded; tokens outside every nucleus
    stay −inf. Su reports that this degrades as n grows."""

    name = "mean"

    def __call__(self, logp, ent, scores, prev, eta):
        n = logp.shape[0]
        pooled = logp.clamp(min=NEG_FLOOR).mean(dim=0)
        pooled = torch.where(torch.isfinite(logp).any(dim=0), pooled, torch.full_like(pooled, float("-inf")))
        return Pooled(pooled, torch.full((n,), 1.0 / n, device=logp.device))


class MaxPooling(Pooling):
    """Element-wise max of the rows' log-probs. Good under greedy decoding, not a proper
    distribution (Su: sampling from it is "basically unreadable")."""

    name = "max"

    def __call__(self, logp, ent, scores, prev, eta):
        n = logp.shape[0]
        return Pooled(logp.max(dim=0).values, torch.full((n,), 1.0 / n, device=logp.device))


class ReplugPooling(Pooling):
    """REPLUG (Shi et al., 2023): a probability-space mixture ``Σ_k w_k p(T|S_k)`` with
    ``w = softmax(score_k / temperature)`` from the retrieval scores (uniform without scores)."""

    name = "replug"

    def __init__(self, temperature: float = 0.1):
        if temperature <= 0:
            raise ValueError("ReplugPooling temperature must be > 0")
        self.temperature = temperature

    def __call__(self, logp, ent, scores, prev, eta):
        n = logp.shape[0]
        if scores is None:
            w = torch.full((n,), 1.0 / n, device=logp.device)
        else:
            w = torch.softmax(scores.float().to(logp.device) / self.temperature, dim=0)
        return Pooled(_mixture(logp, w), w)


class ScoredEntropyPooling(Pooling):
    """Retrieval-aware minimum entropy (ours): choose the row that minimises

        H_k − η·[k = prev] − λ · (s_k − max_j s_j)

    i.e. the model's confidence (entropy) and the retriever's confidence (cosine ``s_k``) on one
    scale: a passage that scores ``Δs`` below the best retrieved one must be ``λ·Δs`` nats more
    certain to be chosen. λ = 0 (or no scores) is exactly ``min_entropy``; a large λ always
    picks the top-scored passage. It keeps min-entropy's hard selection (a proper distribution,
    exact attribution) while distrusting a confident-but-off-topic passage."""

    name = "scored_entropy"

    def __init__(self, weight: float = 5.0):
        if weight < 0:
            raise ValueError("ScoredEntropyPooling weight must be >= 0")
        self.weight = weight

    def __call__(self, logp, ent, scores, prev, eta):
        adj = _sticky(ent, prev, eta)
        if scores is not None and self.weight:
            s = scores.float().to(adj.device)
            adj = adj - self.weight * (s - s.max())
        k = int(torch.argmin(adj))
        return Pooled(logp[k], _one_hot(logp.shape[0], k, logp))


class PosteriorPooling(Pooling):
    """A mixture whose weights are a posterior over the passages (ours; RAG-Sequence computed
    online, with REPLUG's and UPR's priors)::

        prior     π_k ∝ exp( s_k / τ  ·[prior uses scores]  +  ℓ_k / τ_q ·[prior uses question] )
        step t    p(T) = Σ_k w_k · p_k(T),        w_k = π_k at t = 0
        update    w_k ← w_k · p_k(y_t) / Σ_j w_j · p_j(y_t)       (after each token y_t; optional)

    ``s_k`` is the retrieval score (canonical cosine), ``ℓ_k = log p(question | passage_k)``
    from the prefill, ``p_k`` the row's truncated (top-p) next-token probabilities; a token
    outside row k's nucleus counts as ``p_k = e^-100``. ``prior``: ``"scores"`` (static it is
    exactly ``replug``), ``"question"`` (UPR's zero-shot posterior), ``"product"`` (both),
    ``"uniform"``. A missing signal (no scores, no question likelihood) counts as uniform. The
    update makes the weights the sequence posterior ``p(passage | question, answer so far)``:
    a principled form of η's stickiness (η is not used). Permuting the passages permutes the
    weights and changes no token.

    Spec strings for ``pooling=``: ``"posterior"`` (the defaults below) or
    ``"posterior:<prior>[,online|,static]"``, e.g. ``"posterior:question,static"``."""

    name = "posterior"
    PRIORS = ("scores", "question", "product", "uniform")

    def __init__(self, prior: str = "product", update: bool = True, temperature: float = 0.1,
                 question_temperature: float = 1.0):
        if prior not in self.PRIORS:
            raise ValueError(f"posterior prior must be one of {self.PRIORS} (got {prior!r})")
        if temperature <= 0 or question_temperature <= 0:
            raise ValueError("posterior temperatures must be > 0")
        self.prior = prior
        self.update = bool(update)
        self.temperature = float(temperature)
        self.question_temperature = float(question_temperature)
        self._logw: Optional[torch.Tensor] = None

    @classmethod
    def from_spec(cls, arg: str) -> "PosteriorPooling":
        """The part after ``posterior:``: a prior, an update (``online``/``static``), or both,
        each at most once. An empty spec, a repeated or contradictory part is an error."""
        kw: dict = {}
        parts = [x.strip() for x in arg.split(",")]
        usage = f"use posterior:<prior>[,online|,static] with a prior among {', '.join(cls.PRIORS)}"
        if not any(parts):
            raise ValueError(f"pooling 'posterior:{arg}' names no option; {usage}, or plain 'posterior'")
        for part in parts:
            if not part:
                raise ValueError(f"pooling 'posterior:{arg}': an option is empty; {usage}")
            key = "prior" if part in cls.PRIORS else "update" if part in ("online", "static") else None
            if key is None:
                raise ValueError(f"pooling 'posterior:{arg}': unknown posterior option {part!r}; {usage}")
            if key in kw:
                raise ValueError(f"pooling 'posterior:{arg}': the {key} is given twice (contradictory or repeated); {usage}")
            kw[key] = part if key == "prior" else part == "online"
        return cls(**kw)

    @property
    def spec(self) -> str:
        return f"posterior:{self.prior},{'online' if self.update else 'static'}"

    def needs_question_loglik(self, has_scores: bool) -> bool:
        return self.prior in ("question", "product")

    def prior_logw(self, n: int, scores: Optional[torch.Tensor], question_loglik: Optional[torch.Tensor],
                   device=None) -> torch.Tensor:
        """``log π`` ``[n]`` (see the class docstring)."""
        z = torch.zeros(n, dtype=torch.float32, device=device)
        if self.prior in ("scores", "product") and scores is not None:
            z = z + scores.float().to(z.device) / self.temperature
        if self.prior in ("question", "product") and question_loglik is not None:
            z = z + question_loglik.float().to(z.device) / self.question_temperature
        return torch.log_softmax(z, dim=0)

    def begin(self, scores=None, question_loglik=None) -> "PosteriorPooling":
        n = len(scores) if scores is not None else (len(question_loglik) if question_loglik is not None else 0)
        new = copy.copy(self)
        new._logw = self.prior_logw(n, scores, question_loglik) if n else None
        return new

    def __call__(self, logp, ent, scores, prev, eta):
        n = logp.shape[0]
        if self._logw is None or self._logw.shape[0] != n:
            # not begun (called as a plain function): the prior from the scores, kept nowhere
            w = self.prior_logw(n, scores, None, device=logp.device).exp()
        else:
            self._logw = self._logw.to(logp.device)
            w = self._logw.exp()
        return Pooled(_mixture(logp, w), w)

    def observe(self, step, token):
        if not self.update or self._logw is None:
            return None
        lik = step.row_logp[:, token].float().clamp(min=NEG_FLOOR).to(self._logw.device)
        logw = self._logw + lik
        self._logw = logw - torch.logsumexp(logw, dim=0)
        return self._logw.exp()


class AutoPooling(Pooling):
    """The default: ``replug`` (``Σ_k w_k p_k``, ``w = softmax(score/0.1)``) when every passage
    carries a score (retrieval score, or the decoder's scorer's cosine: with
    ``NBCEDecoder(scorer="auto")`` that is every passage), the reference ``min_entropy``
    otherwise (``scorer=None`` and plain strings: the behaviour before scorers, token for token).

    Why (``benchmarks/bench_quality.py --methods relevance --ns 5,10``, SQuAD, HotpotQA and NQ,
    60 questions per cell, bundled SmolLM2-135M, greedy, 16 new tokens; the paired table
    ``benchmarks/results/quality_relevance_paired.md`` and the README's "Unscored passages"):
    ``replug`` over the encoder's cosine had the best contains-gold accuracy of the eight
    poolings on the same 360 question-cells (28.3%); the ``posterior`` variants (question
    likelihood in the prior, online update) were 1.1-1.9 points lower, within the 95% bootstrap
    interval of no difference (they drew 95% of the answer from gold passages against 89%, did
    better on HotpotQA and worse on SQuAD), ``scored_entropy`` 3.1 lower, ``min_entropy`` 13.3
    lower. ``replug`` also needs no ``log p(question | passage)``: no LM-head pass over the
    question positions in the prefill."""

    name = "auto"

    def __init__(self):
        self.with_scores: Pooling = ReplugPooling()
        self.without_scores: Pooling = MinEntropyPooling()

    def needs_question_loglik(self, has_scores: bool) -> bool:
        return (self.with_scores if has_scores else self.without_scores).needs_question_loglik(has_scores)

    def begin(self, scores=None, question_loglik=None) -> Pooling:
        pool = self.without_scores if scores is None else self.with_scores
        return pool.begin(scores, question_loglik)

    def __call__(self, logp, ent, scores, prev, eta):
        pool = self.without_scores if scores is None else self.with_scores
        return pool(logp, ent, scores, prev, eta)


POOLINGS: Dict[str, Type[Pooling]] = {
    cls.name: cls
    for cls in (AutoPooling, MinEntropyPooling, MeanPooling, MaxPooling, ReplugPooling, ScoredEntropyPooling,
                PosteriorPooling)
}


def get_pooling(pooling) -> Pooling:
    """A :class:`Pooling` from a name (``auto``, ``min_entropy``, ``mean``, ``max``, ``replug``,
    ``scored_entropy``, ``posterior`` or ``posterior:<prior>[,online|,static]``) or an instance
    (returned as is)."""
    if isinstance(pooling, Pooling):
        return pooling
    if isinstance(pooling, str) and pooling.startswith("posterior:"):
        return PosteriorPooling.from_spec(pooling.split(":", 1)[1])
    try:
        return POOLINGS[pooling]()
    except (KeyError, TypeError):
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(sorted(POOLINGS))}, or "
                         "posterior:<prior>[,online|,static]") from None


def fuse(pooled: torch.Tensor, uncond: torch.Tensor, beta: float) -> torch.Tensor:
    """``(β+1)·pooled − β·uncond`` where the no-passage row is inside its nucleus
    (``uncond > −100``), the pooled row elsewhere (the reference's ``torch.where``)."""
    if beta == 0.0:
        return pooled
    merged = (1.0 + beta) * pooled - beta * uncond
    return torch.where(uncond > NEG_FLOOR, merged, pooled)


@dataclass
class Step:
    logits: torch.Tensor  #: [V] fused log-scores to sample from
    weights: torch.Tensor  #: [n] pooling weights of the passage rows
    row_logp: torch.Tensor  #: [n, V] truncated passage-row log-probs (for attribution)


def nbce_step(
    logits: torch.Tensor,
    *,
    beta: float,
    eta: float,
    top_p: float,
    pooling: Pooling,
    scores: Optional[torch.Tensor] = None,
    prev: Optional[int] = None,
) -> Step:
    """One NBCE step over last-position logits ``[n+1, V]`` (row 0 = no passage).
    ``prev`` is the index (0-based among passage rows) chosen at the previous step."""
    if logits.dim() != 2 or logits.shape[0] < 2:
        raise ValueError("nbce_step needs logits of shape [n+1, V] with n >= 1 passage rows")
    logp = top_p_truncate(log_softmax(logits), top_p)
    uncond, rows = logp[0], logp[1:]
    pooled = pooling(rows, entropy(rows), scores, prev, eta)
    return Step(fuse(pooled.logp, uncond, beta), pooled.weights, rows)


def attribute(step: Step, token: int) -> int:
    """The passage row (0-based) that supplied ``token``: the row with the largest weighted
    probability of it, ``argmax_k log w_k + log p_k(token)`` (the chosen row for selection
    strategies)."""
    w = step.weights
    logw = torch.where(w > 0, w.log(), torch.full_like(w, float("-inf")))
    return int(torch.argmax(logw + step.row_logp[:, token]))
