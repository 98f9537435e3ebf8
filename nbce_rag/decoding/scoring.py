"""How relevant is each passage? Two signals for the decoder's pooling.

1. **A passage scorer** for passages that arrive without a retrieval score (LangChain document
   chains, the server's ``documents``, ``NBCELLM(contexts=)``, a bare
   ``NBCEDecoder.generate(q, ["...", "..."])``): the canonical cosine of a CoSENT encoder
   against the question, the same score the pipeline's retriever attaches. :func:`resolve_scorer`
   turns the decoder's ``scorer`` option into a callable; :func:`score_missing` fills in the
   scores that are missing.

2. **The model's own evidence**: each NBCE row is ``{passage}`` then ``{question}``, so the
   prefill already holds ``log p(question | passage_k)`` (UPR, Sachan et al. 2022) at the
   question's positions. :func:`locate_question` finds those positions from a row's token offsets;
   :func:`question_loglik` sums the question tokens' log-probabilities from the logits of the
   row's last ``m`` positions only (the prefill never keeps full-sequence logits).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from nbce_rag.types import Passage

logger = logging.getLogger(__name__)

#: ``scorer(question, texts) -> one float per text`` (higher = more relevant).
Scorer = Callable[[str, Sequence[str]], Sequence[float]]

_BUNDLED_LOCK = threading.Lock()
_BUNDLED: dict = {}  # "scorer" -> the lazily loaded bundled encoder's scorer (or None when unavailable)


class EmbeddingMemo:
    """An encoder whose ``encode(texts)`` remembers the last ``max_texts`` texts' embeddings
    (LRU, thread-safe): passages come back with every question over them, and their embedding
    does not depend on the question (the passage KV cache's twin for the scorer). Only the
    texts not remembered are encoded, in one batch."""

    def __init__(self, encoder: Any, max_texts: int = 8192):
        self.encoder = encoder
        self.max_texts = int(max_texts)
        self._memo: "OrderedDict[str, np.ndarray]" = OrderedDict()
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:  # name, identity, ... of the wrapped encoder
        if name == "encoder":
            raise AttributeError(name)
        return getattr(self.encoder, name)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        with self._lock:
            found = {t: self._memo[t] for t in texts if t in self._memo}
            for t in found:
                self._memo.move_to_end(t)
        todo = list(dict.fromkeys(t for t in texts if t not in found))
        if todo:
            new = np.asarray(self.encoder.encode(todo), dtype=np.float32).reshape(len(todo), -1)
            with self._lock:
                for t, v in zip(todo, new):
                    found[t] = self._memo[t] = v
                while len(self._memo) > self.max_texts:
                    self._memo.popitem(last=False)
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([found[t] for t in texts])


def encoder_scorer(encoder: Any) -> Scorer:
    """The canonical cosine of ``encoder`` (a :class:`~nbce_rag.CoSENTEncoder`, an index holding
    one, or anything with ``encode(texts)``) as a :data:`Scorer`
    (:func:`nbce_rag.retrieval.selection.rescore`, the retrieval path's own cosine). Embeddings are
    remembered (:class:`EmbeddingMemo`), so passages seen before cost nothing to score again."""
    from nbce_rag.retrieval.selection import rescore

    if not hasattr(encoder, "encode") and hasattr(encoder, "encoder"):
        encoder = encoder.encoder
    memo = EmbeddingMemo(encoder)

    def score(question: str, texts: Sequence[str]) -> List[float]:
        return [float(p.score) for p in rescore(memo, question, list(texts))]

    score.name = str(getattr(encoder, "name", type(encoder).__name__))  # type: ignore[attr-defined]
    return score


def _bundled_scorer() -> Optional[Scorer]:
    """The bundled encoder's cosine, loaded once per process on first use; ``None`` (logged
    once) when the encoder cannot be loaded."""
    with _BUNDLED_LOCK:
        if "scorer" not in _BUNDLED:
            try:
                from nbce_rag.retrieval.encoder import CoSENTEncoder

                enc = CoSENTEncoder.from_pretrained()
                _BUNDLED["scorer"] = encoder_scorer(enc)
                logger.info("unscored passages are scored with the cosine of the bundled encoder %s "
                            "(pass scorer=None to NBCEDecoder to keep them unscored)", getattr(enc, "name", "encoder"))
            except Exception as e:  # noqa: BLE001 - any load failure: decode without scores, say so once
                _BUNDLED["scorer"] = None
                logger.warning("could not load the bundled encoder to score passages (%s): unscored passages "
                               "stay unscored; pass scorer= to NBCEDecoder to choose one", e)
        return _BUNDLED["scorer"]


def resolve_scorer(spec: Any) -> Optional[Scorer]:
    """The decoder's ``scorer`` option as a callable: ``"auto"`` = the bundled encoder's cosine
    (loaded lazily, once per process); ``None`` = no scorer; an encoder or an index = its
    cosine; any other callable ``(question, texts) -> scores`` as is."""
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec != "auto":
            raise ValueError(f"scorer must be 'auto', None, an encoder or a callable (got {spec!r})")
        return _bundled_scorer()
    if hasattr(spec, "encode") or hasattr(spec, "encoder"):
        return encoder_scorer(spec)
    if callable(spec):
        return spec
    raise TypeError(f"scorer must be 'auto', None, an encoder or a callable (question, texts) -> scores; "
                    f"got {type(spec).__name__}")


def score_missing(scorer: Optional[Scorer], question: str, passages: List[Tuple[int, Passage]]) -> List[Tuple[int, Passage]]:
    """Give every passage without a score the scorer's score; passages that carry one keep it.

    With a mix (some scored, some not) only the missing scores are computed: the given ones are
    assumed to be on the scorer's scale (they are when they come from this project's index or
    retriever, which use the same canonical cosine); a warning says so, since scores of another
    retriever would not be comparable. ``scorer=None`` returns the passages unchanged."""
    missing = [j for j, (_, p) in enumerate(passages) if p.score is None]
    if scorer is None or not missing:
        return passages
    if len(missing) < len(passages):
        logger.warning("%d of %d passages carry a score and %d do not: the missing ones get the scorer's "
                       "cosine; the given scores must be on the same scale (canonical cosine) to be compared",
                       len(passages) - len(missing), len(passages), len(missing))
    values = list(scorer(question, [passages[j][1].text for j in missing]))
    if len(values) != len(missing):
        raise ValueError(f"the scorer returned {len(values)} scores for {len(missing)} passages")
    out = list(passages)
    for j, v in zip(missing, values):
        i, p = out[j]
        meta = dict(p.metadata)
        meta["score_from"] = getattr(scorer, "name", "scorer")
        out[j] = (i, Passage(text=p.text, score=float(v), id=p.id, metadata=meta))
    return out


# ------------------------------------------------------------------ question likelihood
def locate_question(prompt: str, offsets: Sequence[Tuple[int, int]], char_start: int,
                    char_end: int) -> Optional[Tuple[int, int, int]]:
    """Where the question (characters ``[char_start, char_end)`` of ``prompt``) is in a row,
    from the character offsets of the row's tokens: ``(start, end, stable)``.

    ``[start, end)``: the tokens that overlap the question (a leading space merged into the
    first question token counts). ``stable``: how many leading tokens end before the text in
    front of the question (``prompt[:char_start]`` without its trailing whitespace), less one
    token of margin and at most ``start - 1``. Those tokens are the same whatever the question
    is (a question's first token may absorb the space before it, or not), so the passage KV
    cache stores exactly them: one entry per passage serves every question. ``None`` when no
    token overlaps the question or the first one has no position before it."""
    toks = [t for t, (a, b) in enumerate(offsets) if b > a and a < char_end and b > char_start]
    if not toks or toks[0] < 1:
        return None  # the first question token needs a position before it
    limit = len(prompt[:char_start].rstrip())
    first_after = next((t for t, (a, b) in enumerate(offsets) if b > a and b > limit), len(offsets))
    return toks[0], toks[-1] + 1, max(0, min(first_after - 1, toks[0] - 1))


def question_loglik(tail_logits: torch.Tensor, ids: Sequence[int], span: Tuple[int, int]) -> float:
    """``log p(question | everything before it)`` of one row: the sum over the question tokens
    ``ids[s:e]`` of their log-probability, each read from the logits of the position before it.

    ``tail_logits`` ``[m, V]`` are the logits of the row's last ``m`` positions (position
    ``len(ids) - m + i`` for row ``i``), as a prefill with ``logits_to_keep=m`` (or a slice of
    the final hidden states through the LM head) gives them; padding before the row is
    irrelevant since positions count from the row's end. ``m`` must reach the position before
    the first question token: ``m >= len(ids) - s + 1``. Log-softmax runs in fp32 on the
    question's positions only."""
    s, e = span
    L, m = len(ids), tail_logits.shape[0]
    if not 1 <= s < e <= L:
        raise ValueError(f"question span {span} is not inside a row of {L} tokens")
    first = L - m  # absolute position of tail row 0
    if s - 1 < first:
        raise ValueError(f"the logits of the last {m} positions do not reach position {s - 1}, the one "
                         f"before the first question token; keep at least {L - s + 1}")
    rows = tail_logits[s - 1 - first : e - 1 - first].float()
    target = torch.tensor(list(ids[s:e]), dtype=torch.long, device=rows.device)
    return span_logliks(rows, target, [e - s])[0]


def span_logliks(logits: torch.Tensor, targets: torch.Tensor, counts: Sequence[int]) -> List[float]:
    """Several rows' question log-likelihoods at once: ``logits`` ``[T, V]`` are the logits of
    the positions before each question token (the rows' spans one after another, ``counts[i]``
    positions for row ``i``), ``targets`` ``[T]`` the question tokens they predict. Returns
    ``sum log softmax(logits)[target]`` per row (fp32)."""
    logits = logits.float()
    tok = logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(dim=-1)
    return [float(t.sum()) for t in tok.split(list(counts))]
