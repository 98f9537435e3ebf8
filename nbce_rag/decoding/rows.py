"""The rows of an NBCE request: the checked input, one prompt row per passage, and row groups.

A request becomes ``[no passage] + [one row per passage (or per window of a long passage)]``,
each row the same prompt template (:meth:`NBCEDecoder.build_prompt`) around its passage and the
question. :func:`check_question` and :func:`check_passages` check the input;
:func:`prepare_rows` builds the :class:`Row` list of a :class:`Prepared` request, splitting a
passage longer than a row's budget into overlapping windows (:func:`passage_windows`) and, when
asked, locating the question's tokens in each row (for ``log p(question | passage)`` and for the
passage KV cache, which stores everything before the question).

After the prefill the rows live in :class:`Group` s (a micro-batch of rows with its own KV
cache, mask and positions); :func:`merge_for_decode` merges consecutive groups so that a decode
step is one forward per ``decode_rows`` rows, and :func:`merge_run` merges one run of them.

Used by :mod:`nbce_rag.decoding.decoder`, :mod:`nbce_rag.decoding.kvcache` (filling the cache
ahead of time) and :mod:`nbce_rag.decoding.scheduler`; it imports none of them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch

from nbce_rag.config import NBCEConfig
from nbce_rag.errors import PromptTooLongError
from nbce_rag.decoding.kvlayout import is_plain, merge_left_padded
from nbce_rag.decoding.nbce import get_pooling
from nbce_rag.types import Passage, as_passage, check_text

logger = logging.getLogger(__name__)

NO_PASSAGE = -1  #: the ``source`` of the no-passage row


@dataclass
class Row:
    """One prompt row: its token ids and the passage it holds."""

    ids: List[int]
    source: int  # original passage index, -1 for the no-passage row
    q_span: Optional[Tuple[int, int]] = None  # token positions of the question (when its likelihood is needed)
    q_loglik: Optional[float] = None  # log p(question | passage), set by the prefill when q_span is set
    stable: Optional[int] = None  # leading tokens that no question changes, when known (what the passage KV cache stores)


@dataclass
class Group:
    """A micro-batch of rows with its own KV cache, mask and positions."""

    rows: List[int]  # indices into the row list
    cache: Any = None
    mask: Optional[torch.Tensor] = None
    last_pos: Optional[torch.Tensor] = None


@dataclass
class Prepared:
    """A request's rows (row 0 the no-passage row) and the passages they come from."""

    rows: List[Row]
    passages: List[Tuple[int, Passage]]  # (original index, passage) of the kept passages
    row_scores: Optional[torch.Tensor] = None
    cached_tokens: int = 0  # prompt tokens taken from the passage KV cache (set by the prefill)


# ---------------------------------------------------------------------------------- input checks
def check_question(question: Any) -> str:
    """``question`` itself when it is a non-empty string; ``TypeError`` / ``ValueError`` otherwise."""
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    if not question.strip():
        raise ValueError("question is empty; pass the text of a question")
    return check_text(question, "question")


def check_passages(passages: Any) -> List[Tuple[int, Passage]]:
    """``(original index, Passage)`` of every non-empty passage of ``passages`` (a list of str,
    :class:`Passage` or dict; ``None`` = none). Empty ones are dropped (said in the log)."""
    if passages is None:
        return []
    if isinstance(passages, (str, bytes)) or isinstance(passages, Passage):
        raise TypeError(
            f"passages must be a list of passages, got a single {type(passages).__name__}; wrap it in a list"
        )
    try:
        items = list(passages)
    except TypeError:
        raise TypeError(f"passages must be a list (of str, Passage or dict), got {type(passages).__name__}") from None
    kept = []
    dropped = 0
    for i, p in enumerate(items):
        psg = as_passage(p, where=f"passages[{i}]")
        if not psg.text.strip():
            dropped += 1
            continue
        kept.append((i, psg))
    if dropped:
        logger.info("dropped %d empty passage(s)", dropped)
    return kept


# ---------------------------------------------------------------------------------- rows
def prepare_rows(decoder, question: str, kept: List[Tuple[int, Passage]], cfg: NBCEConfig,
                 question_spans: Optional[bool] = None) -> Prepared:
    """The rows of ``question`` over the ``kept`` passages (:func:`check_passages`).

    ``decoder``: an :class:`~nbce_rag.decoding.decoder.NBCEDecoder` (its ``tokenizer``,
    ``context_window``, ``build_prompt`` and ``kv_cache`` are used). ``question_spans``: locate
    the question's tokens in every row (for ``log p(question | passage)``); ``None`` = when
    ``cfg.pooling`` needs it. Raises :class:`PromptTooLongError` when the question prompt and
    ``max_new_tokens`` leave no room for a passage."""
    if question_spans is None:
        question_spans = get_pooling(cfg.pooling).needs_question_loglik(all(p.score is not None for _, p in kept))
    # where the question is: for log p(question | passage), and for the passage KV cache,
    # which stores everything before it (the template text after the passage included)
    locate = question_spans or decoder.kv_cache is not None

    def row(question_at: Optional[Tuple[int, int, int]], ids: List[int], source: int) -> Row:
        return Row(ids, source, question_at[:2] if question_at and question_spans else None,
                   stable=question_at[2] if question_at else None)

    window = decoder.context_window
    base, base_at = encode_row(decoder, question, None, cfg, locate)
    room = window - len(base) - cfg.max_new_tokens
    if room <= 0:
        if len(base) >= window - 1:  # no max_new_tokens could help: the question itself does not fit
            raise PromptTooLongError(
                f"the question is too long for the model's window: its prompt is {len(base)} tokens and the "
                f"model reads at most {window}. Shorten the question (or use a model with a longer context)."
            )
        raise PromptTooLongError(
            f"the question prompt is {len(base)} tokens and max_new_tokens is {cfg.max_new_tokens}; together "
            f"they exceed the model's window of {window} tokens. Lower max_new_tokens to at most "
            f"{window - len(base) - 1}, or shorten the question."
        )
    rows = [row(base_at, base, NO_PASSAGE)]
    scores: List[Optional[float]] = []
    for idx, psg in kept:
        for text in passage_windows(decoder, psg.text, room, cfg, idx):
            ids, at = encode_row(decoder, question, text, cfg, locate)
            if len(ids) + cfg.max_new_tokens > window:  # template tokens merge differently: trim
                over = len(ids) + cfg.max_new_tokens - window
                text = trim_tokens(decoder.tokenizer, text, over)
                ids, at = encode_row(decoder, question, text, cfg, locate)
            rows.append(row(at, ids, idx))
            scores.append(psg.score)
    row_scores = None
    if scores and all(s is not None for s in scores):
        row_scores = torch.tensor(scores, dtype=torch.float32)
    return Prepared(rows, kept, row_scores)


def encode_prompt(tokenizer, prompt: str, cfg: NBCEConfig) -> List[int]:
    """The token ids of a built prompt (a chat-templated one already holds its special tokens)."""
    chat = cfg.use_chat_template and getattr(tokenizer, "chat_template", None)
    return list(tokenizer(prompt, add_special_tokens=not chat)["input_ids"])


def encode_row(decoder, question: str, passage: Optional[str], cfg: NBCEConfig,
               locate: bool) -> Tuple[List[int], Optional[Tuple[int, int, int]]]:
    """A row's token ids and, with ``locate``, where its question is (``(start, end, stable)``,
    :func:`nbce_rag.decoding.scoring.locate_question`; None if unknown), from one tokenization."""
    tokenizer = decoder.tokenizer
    prompt = decoder.build_prompt(question, passage, config=cfg)
    if locate:
        full = cfg.prompt_template.format(passage=passage or "", question=question)
        before = cfg.prompt_template.split("{question}", 1)[0].format(passage=passage or "")
        at = prompt.find(full.strip())
        if at >= 0:
            start = at + len(before) - (len(full) - len(full.lstrip()))
            chat = bool(cfg.use_chat_template and getattr(tokenizer, "chat_template", None))
            try:
                enc = tokenizer(prompt, add_special_tokens=not chat, return_offsets_mapping=True)
            except (NotImplementedError, TypeError, ValueError):  # no offsets (slow tokenizers)
                enc = None
            if enc is not None:
                from nbce_rag.decoding.scoring import locate_question

                found = locate_question(prompt, enc["offset_mapping"], start, start + len(question))
                if found is None:
                    logger.debug("question tokens not found in a row: no question likelihood for it")
                return list(enc["input_ids"]), found
    return encode_prompt(tokenizer, prompt, cfg), None


def passage_windows(decoder, text: str, room: int, cfg: NBCEConfig, idx: int) -> List[str]:
    """Split a passage into overlapping windows that fit the row budget ``room`` (a row each).

    The split is :func:`nbce_rag.retrieval.chunking.chunk_text` in the decoder's tokens: whole
    words, a paragraph or sentence end preferred near a window's end, about ``window_overlap``
    tokens shared by consecutive windows (at most half a window). ``idx``: the passage's index,
    for the log."""
    from nbce_rag.retrieval.chunking import chunk_text

    tokenizer = decoder.tokenizer
    limit = room - 8  # template tokens around the passage
    if cfg.max_passage_tokens is not None:
        limit = min(limit, cfg.max_passage_tokens)
    if limit < 8:
        raise PromptTooLongError(
            f"the prompt leaves only {room} tokens for a passage in the model's window of "
            f"{decoder.context_window} tokens; shorten the question or lower max_new_tokens"
        )
    n_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    if n_tokens <= limit:
        return [text]
    chunks = chunk_text(text, tokenizer, chunk_tokens=limit, overlap=min(cfg.window_overlap, limit // 2))
    # a single word longer than a window (a URL, a blob) is cut to the window
    out = [trim_tokens(tokenizer, c.text, c.n_tokens - limit) if c.oversized else c.text for c in chunks]
    logger.warning(
        "passage %d is %d tokens, more than the %d a row can hold; split into %d windows (a row each)",
        idx, n_tokens, limit, len(out),
    )
    return [w for w in out if w]


def trim_tokens(tokenizer, text: str, n: int) -> str:
    """``text`` without its last ``n`` tokens (at least one token is kept)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[: max(1, len(ids) - n)], skip_special_tokens=True)


# ---------------------------------------------------------------------------------- groups
def merge_for_decode(groups: List[Group], decode_rows: int) -> List[Group]:
    """Merge consecutive prefill groups into groups of at most ``decode_rows`` rows, so that a
    decode step is one forward instead of one per prefill micro-batch (on a GPU each forward
    costs about the same whatever its batch). Caches are left-padded to a common width and
    the padding is masked out, so no logit changes beyond float rounding. Caches of a shape
    this does not know (sliding windows, quantized, other layouts) are left as they are."""
    if len(groups) < 2 or not all(is_plain(g.cache) for g in groups):
        return groups
    runs: List[List[Group]] = [[]]
    for g in groups:
        if runs[-1] and sum(len(x.rows) for x in runs[-1]) + len(g.rows) > decode_rows:
            runs.append([])
        runs[-1].append(g)
    return [merge_run(run) if len(run) > 1 else run[0] for run in runs]


def merge_run(run: List[Group]) -> Group:
    """One group of the rows of ``run`` (plain caches), in order: caches and masks left-padded
    to a common width."""
    cache, mask = merge_left_padded([(g.cache, g.mask) for g in run])
    return Group(rows=[r for g in run for r in g.rows], cache=cache, mask=mask,
                 last_pos=torch.cat([g.last_pos for g in run]))
