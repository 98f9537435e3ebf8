"""Post-fusion processing and sampling through transformers' ``LogitsProcessorList``.

NBCE fuses the rows' distributions into one row of scores ``[V]`` per step (log-probs, ``-inf``
outside the nucleus). That row is what ``model.generate`` would see as the logits of a batch
of one, so transformers' own processors apply to it as they are, with the answer's tokens so
far as ``input_ids`` (shape ``[1, t]``). The processors are built in the order
``GenerationMixin._get_logits_processor`` builds them:

* always (greedy and sampling): ``repetition_penalty`` (:class:`RepetitionPenaltyLogitsProcessor`),
  ``no_repeat_ngram_size`` (:class:`NoRepeatNGramLogitsProcessor`), ``bad_words_ids``
  (:class:`NoBadWordsLogitsProcessor`), ``suppress_tokens`` (:class:`SuppressTokensLogitsProcessor`),
  and OpenAI's ``frequency_penalty`` / ``presence_penalty`` (:class:`FrequencyPresencePenaltyLogitsProcessor`,
  ours: transformers has none);
* only when ``do_sample``: ``temperature``, ``top_k``, ``top_p``, ``min_p`` (the warpers).

Differences from ``model.generate``, on purpose:

* ``input_ids`` hold the *answer's* tokens only, not the prompt: NBCE has one prompt per row
  and no single prompt to penalise, and copying a passage's words is what a RAG answer should
  do. (transformers' decoder-only ``generate`` also penalises prompt tokens.)
* The scores are log-probs (all ``<= 0``), so ``repetition_penalty`` multiplies a seen token's
  log-prob: ``log p -> θ·log p``, i.e. ``p -> p^θ``. A token the model is nearly sure of
  (``p`` close to 1) is barely penalised; the additive ``frequency_penalty`` /
  ``presence_penalty`` (OpenAI's definition, shift invariant) and the hard ban of
  ``no_repeat_ngram_size`` do not have that blind spot.

With none of these options set, greedy is ``argmax`` of the fused row and sampling is the
same token for the same seed as before this module existed (temperature, top-k, top-p on the
CPU with a CPU ``torch.Generator``; see tests/test_sampling.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional, Sequence

import logging

import torch

from nbce_rag.config import validate_token_lists  # noqa: F401 - its home is config (NBCEConfig.validate); the old path

logger = logging.getLogger(__name__)

if TYPE_CHECKING:  # pragma: no cover
    from transformers import LogitsProcessorList

    from nbce_rag.config import NBCEConfig

__all__ = ["FrequencyPresencePenaltyLogitsProcessor", "Sampler", "build_processors", "build_warpers"]


class FrequencyPresencePenaltyLogitsProcessor:
    """OpenAI's penalties: ``score[t] -= count(t)·frequency_penalty + [count(t) > 0]·presence_penalty``
    where ``count(t)`` is how often ``t`` occurs in ``input_ids`` (OpenAI's API reference,
    "Parameter details"). Negative values encourage repetition. A ``LogitsProcessor``:
    ``(input_ids [B, t], scores [B, V]) -> scores``."""

    def __init__(self, frequency_penalty: float = 0.0, presence_penalty: float = 0.0):
        self.frequency_penalty = float(frequency_penalty)
        self.presence_penalty = float(presence_penalty)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] == 0:
            return scores
        counts = torch.zeros_like(scores)
        counts.scatter_add_(1, input_ids.to(scores.device), torch.ones_like(input_ids, dtype=scores.dtype, device=scores.device))
        penalty = counts * self.frequency_penalty + (counts > 0).to(scores.dtype) * self.presence_penalty
        return scores - penalty


def build_processors(cfg: "NBCEConfig") -> "LogitsProcessorList":
    """The processors that act whether or not ``do_sample`` (empty when no option is set)."""
    from transformers import (
        LogitsProcessorList,
        NoBadWordsLogitsProcessor,
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        SuppressTokensLogitsProcessor,
    )

    procs = LogitsProcessorList()
    if cfg.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(penalty=cfg.repetition_penalty))
    if cfg.no_repeat_ngram_size:
        procs.append(NoRepeatNGramLogitsProcessor(cfg.no_repeat_ngram_size))
    if cfg.bad_words_ids:
        procs.append(NoBadWordsLogitsProcessor([list(map(int, w)) for w in cfg.bad_words_ids]))
    if cfg.suppress_tokens:
        procs.append(SuppressTokensLogitsProcessor([int(t) for t in cfg.suppress_tokens]))
    if cfg.frequency_penalty or cfg.presence_penalty:
        procs.append(FrequencyPresencePenaltyLogitsProcessor(cfg.frequency_penalty, cfg.presence_penalty))
    return procs


def build_warpers(cfg: "NBCEConfig") -> "LogitsProcessorList":
    """The sampling warpers (temperature, top-k, top-p, min-p), in transformers' order."""
    from transformers import (
        LogitsProcessorList,
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = LogitsProcessorList()
    if cfg.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(cfg.temperature))
    if cfg.top_k:
        warpers.append(TopKLogitsWarper(cfg.top_k))
    if cfg.top_p < 1.0:
        warpers.append(TopPLogitsWarper(cfg.top_p))
    if cfg.min_p:
        warpers.append(MinPLogitsWarper(cfg.min_p))
    return warpers


class Sampler:
    """Picks each answer token from the fused scores: the processors, then ``argmax`` (greedy)
    or the warpers and a multinomial draw (``do_sample``; on the CPU with a CPU generator
    seeded by ``cfg.seed``, so that a seed gives the same answer on every device).

    The fused row is ``-inf`` outside the nucleus (``nbce_top_p``), so a ban
    (``no_repeat_ngram_size``, ``bad_words_ids``, ``suppress_tokens``) can leave no candidate;
    the sampler then returns ``exhausted`` (the decoder passes an end-of-sequence id: the answer
    ends with ``finish_reason="stop"``) instead of an arbitrary token.

    >>> s = Sampler(cfg)
    >>> token = s(fused_scores, generated_ids)
    """

    def __init__(self, cfg: "NBCEConfig", generator: Optional[torch.Generator] = None, exhausted: Optional[int] = None):
        self.exhausted = exhausted
        self.do_sample = bool(cfg.do_sample)
        self.processors = build_processors(cfg)
        self.warpers = build_warpers(cfg) if self.do_sample else None
        if generator is None and self.do_sample and cfg.seed is not None:
            generator = torch.Generator().manual_seed(cfg.seed)
        self.generator = generator

    def process(self, scores: torch.Tensor, generated: Sequence[int]) -> torch.Tensor:
        """The processed ``[V]`` scores (processors only; the warpers act in :meth:`__call__`)."""
        if not self.processors:
            return scores
        ids = torch.tensor([list(generated)], dtype=torch.long, device=scores.device)
        return self.processors(ids, scores.float().unsqueeze(0)).squeeze(0)

    def __call__(self, scores: torch.Tensor, generated: Sequence[int] = ()) -> int:
        scores = self.process(scores, generated)
        if self.processors and self.exhausted is not None and not bool(torch.isfinite(scores).any()):
            # the fused row is -inf outside its nucleus: a ban can remove every candidate
            logger.debug("every candidate token was removed by the processors; ending the answer")
            return self.exhausted
        if not self.do_sample:
            return int(torch.argmax(scores))
        x = scores.detach().float().cpu().unsqueeze(0)
        if self.warpers:
            ids = torch.tensor([list(generated)], dtype=torch.long)
            x = self.warpers(ids, x)
        probs = torch.softmax(x[0], dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def bad_words_ids(tokenizer, words: Sequence[str]) -> List[List[int]]:
    """``bad_words_ids`` for words or phrases: each as the tokenizer splits it at the start of
    a text and after a space (BPE tokenizers spell the two differently), as transformers'
    ``NoBadWordsLogitsProcessor`` documentation recommends."""
    out: List[List[int]] = []
    for w in words:
        if not isinstance(w, str) or not w.strip():
            raise ValueError(f"a bad word must be a non-empty string, got {w!r}")
        for variant in (w, " " + w.lstrip()):
            ids = list(tokenizer(variant, add_special_tokens=False)["input_ids"])
            if ids and ids not in out:
                out.append(ids)
    return out
