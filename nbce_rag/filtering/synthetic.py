"""Self-calibration from the user's own documents: synthetic questions, no labels.

The InPars / Promptagator / GPL idea applied to the filter: sample chunks of the index, have
the decoder's language model write a question each chunk answers, keep a question only when
the retriever ranks its source chunk among its top ``filter_top`` candidates (round-trip
consistency, as those papers filter), label the source chunk relevant and the other top-``k``
candidates irrelevant, and calibrate :class:`~nbce_rag.filtering.threshold.MarginThreshold` on those
candidates as for labelled queries.

    th = synthetic_calibration(index, decoder, n=200, seed=0)
    th.save(Path(index_dir) / SYNTHETIC_FILENAME)    # what `nbce-rag calibrate --synthetic` does

The result records what it did in ``stats["synthetic"]`` (chunks sampled, questions written,
kept, the rank filter, the prompt, a few examples). Generation is greedy, so with a fixed
``seed`` (which chunks are sampled) the result is deterministic for a given model.

Both decisions are calibrated: ``keep`` recall first (every kept question's source chunk is its
relevant candidate), ``support`` from the questions' best-candidate scores (in-domain only: no
off-topic questions are written, so the support rule keeps a share of them supported; pass
``off_topic_max`` to calibrate it against off-topic questions).

**Small corpora** (tens of chunks): there are at most as many questions as chunks. The
minimum of relevant pairs drops to :data:`MIN_SMALL_QUESTIONS` kept questions, the intervals
are wider, and ``stats["synthetic"]["note"]`` (printed by ``nbce-rag calibrate``) says so.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Dict, List, Optional

import numpy as np

from nbce_rag.errors import CalibrationError
from nbce_rag.filtering.decisions import DEFAULT_KEEP_RECALL_TARGET
from nbce_rag.filtering.objective import check_objective_option
from nbce_rag.filtering.prior import SYNTHETIC_FILENAME
from nbce_rag.filtering.threshold import MarginThreshold, _identity_of
from nbce_rag.types import Passage

logger = logging.getLogger(__name__)

#: Fewest kept questions a synthetic calibration accepts (a small corpus gives few).
MIN_SMALL_QUESTIONS = 3
#: Below this many kept questions the calibration is marked as a small-corpus one.
SMALL_QUESTIONS = 30

__all__ = ["QUESTION_PROMPT", "SYNTHETIC_FILENAME", "clean_question", "generate_questions", "synthetic_calibration"]

#: The instruction given to the LM after one chunk; the reply is started with QUESTION_PREFIX
#: (small instruction models otherwise answer or paraphrase the instruction).
QUESTION_PROMPT = ("Write one specific question that the text above answers, using its key terms. "
                   "Reply with the question only.")
QUESTION_PREFIX = "Question: What"

_PREFIX = re.compile(r"^\s*(?:\d+[.)]\s*|[-*]\s*|(?:question|q)\s*[:.-]\s*)+", re.I)


def clean_question(text: str, *, min_words: int = 3, max_words: int = 40) -> Optional[str]:
    """The first line of a generated reply, without list/"Question:" prefixes and quotes; up to
    and including the first ``?``. ``None`` when it has fewer than ``min_words`` words."""
    for line in (text or "").splitlines():
        line = _PREFIX.sub("", line).strip().strip('"\u201c\u201d\'').strip()
        if not line:
            continue
        if "?" in line:
            line = line[: line.index("?") + 1]
        words = line.split()
        if len(words) < min_words:
            return None
        return " ".join(words[:max_words])
    return None


def generate_questions(decoder: Any, passages: List[str], *, max_new_tokens: int = 40,
                       prompt: str = QUESTION_PROMPT, show_progress: bool = False,
                       min_words: int = 3) -> List[Optional[str]]:
    """One question per passage from the decoder's LM (plain conditional generation, greedy:
    :meth:`NBCEDecoder.generate_concat` with the passage as the only context)."""
    it: Any = passages
    if show_progress:
        from tqdm.auto import tqdm

        it = tqdm(passages, desc="synthetic: writing questions", unit="chunk")
    out: List[Optional[str]] = []
    for text in it:
        reply = write_question(decoder, text, prompt=prompt, max_new_tokens=max_new_tokens)
        out.append(clean_question(reply, min_words=min_words))
    return out


def write_question(decoder: Any, passage: str, *, prompt: str = QUESTION_PROMPT, prefix: str = QUESTION_PREFIX,
                   max_new_tokens: int = 40, max_passage_tokens: int = 384) -> str:
    """Greedy reply of the decoder's LM to ``passage`` + ``prompt``, the reply started with
    ``prefix`` (returned with it, without the "Question:" label). Plain conditional generation
    with the model and tokenizer the decoder wraps; the passage is cut to ``max_passage_tokens``."""
    import torch

    tok, model = decoder.tokenizer, decoder.model
    ids = tok(passage, add_special_tokens=False)["input_ids"]
    if len(ids) > max_passage_tokens:
        passage = tok.decode(ids[:max_passage_tokens])
    content = f"{passage.strip()}\n\n{prompt}"
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                       add_generation_prompt=True)
        enc = tok(text + prefix, add_special_tokens=False, return_tensors="pt")
    else:
        enc = tok(f"{content}\n{prefix}", return_tensors="pt")
    dev = next(model.parameters()).device
    enc = {k: v.to(dev) for k, v in enc.items()}
    eos = getattr(tok, "eos_token_id", None)
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=eos if eos is not None else 0)
    with torch.inference_mode():
        try:  # stop at the end of the question (transformers >= 4.39)
            out = model.generate(**enc, stop_strings=["?", "\n"], tokenizer=tok, **kw)
        except (TypeError, ValueError):
            out = model.generate(**enc, **kw)
    reply = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    label = prefix.split(":", 1)
    start = label[1] if len(label) == 2 else prefix
    return (start + reply).strip()


def synthetic_calibration(
    index: Any,
    decoder: Any,
    *,
    n: int = 200,
    k: int = 10,
    filter_top: int = 3,
    seed: int = 0,
    min_chunk_words: int = 20,
    max_new_tokens: int = 40,
    prompt: str = QUESTION_PROMPT,
    show_progress: bool = False,
    n_option: str = "n",
    **calibrate_kwargs: Any,
) -> MarginThreshold:
    """Calibrate ``index``'s filter on questions ``decoder`` writes about ``n`` sampled chunks.

    ``index``: a :class:`~nbce_rag.retrieval.index.VectorIndex` (``ids``, ``get``, ``search_many``).
    Chunks shorter than ``min_chunk_words`` words are not sampled (headings, stubs). A
    question is kept when its source chunk is among its top ``filter_top`` hits; its top
    ``k`` hits are then labelled (source = relevant). Other keyword arguments go to
    :meth:`MarginThreshold.calibrate` (``objective``, ``n_bootstrap``, ...).
    Raises :class:`CalibrationError` when too few questions survive; its message names ``n`` as
    ``n_option`` (how the caller's user sets it, e.g. the CLI's ``--n``).
    """
    if n < 1:
        raise CalibrationError(f"n must be >= 1 (got {n})")
    check_objective_option(calibrate_kwargs)  # before any work; None: the keep rule is recall first
    if not 1 <= filter_top <= k:
        raise CalibrationError(f"filter_top must be in [1, k={k}] (got {filter_top})")
    ids = list(index.ids)
    if len(ids) < 2:
        raise CalibrationError(f"the index holds {len(ids)} chunk(s): synthetic calibration needs at least 2")
    rng = np.random.default_rng(seed)
    chunks: List[Passage] = []
    for i in rng.permutation(len(ids)):
        p = index.get(ids[int(i)])
        if len(p.text.split()) >= min_chunk_words:
            chunks.append(p)
            if len(chunks) >= n:
                break
    if not chunks:
        short = [index.get(ids[i]) for i in range(len(ids))]
        longest = max((len(p.text.split()) for p in short), default=0)
        if longest >= 5:  # a small corpus of short chunks: use what there is
            min_chunk_words = min(min_chunk_words, max(5, longest // 2))
            chunks = [p for p in (short[int(i)] for i in rng.permutation(len(short)))
                      if len(p.text.split()) >= min_chunk_words][:n]
        if not chunks:
            raise CalibrationError(f"no chunk of the index has {min_chunk_words}+ words to write a question about "
                                   f"(the longest has {longest}); index longer documents, or lower min_chunk_words")
    questions = generate_questions(decoder, [c.text for c in chunks], max_new_tokens=max_new_tokens,
                                   prompt=prompt, show_progress=show_progress)
    pairs = [(c, q) for c, q in zip(chunks, questions) if q]
    hits = index.search_many([q for _, q in pairs], k=k, show_progress_bar=False) if pairs else []
    scores: List[float] = []
    labels: List[int] = []
    groups: List[int] = []
    ranks: List[Optional[int]] = []
    examples: List[Dict[str, Any]] = []
    kept = 0
    for gi, ((c, q), hs) in enumerate(zip(pairs, hits)):
        rank = next((r for r, h in enumerate(hs) if h.id == c.id), None)
        ranks.append(rank)
        if rank is None or rank >= filter_top:
            continue
        kept += 1
        for h in hs:
            scores.append(float(h.score))
            labels.append(int(h.id == c.id))
            groups.append(gi)
        if len(examples) < 5:
            examples.append({"chunk": c.id, "question": q, "rank": rank})
    report = {
        "n_sampled": len(chunks),
        "n_questions": len(pairs),
        "n_kept": kept,
        "filter_top": int(filter_top),
        "k": int(k),
        "seed": int(seed),
        "prompt": prompt,
        "decoder": str(getattr(decoder, "name", type(decoder).__name__)),
        "rank_histogram": {str(r): int(sum(1 for x in ranks if x == r)) for r in range(k)},
        "not_retrieved": int(sum(1 for x in ranks if x is None)),
        "examples": examples,
    }
    logger.info("synthetic calibration: %d chunks sampled, %d questions written, %d kept (source in top-%d)",
                len(chunks), len(pairs), kept, filter_top)
    exhausted = len(chunks) < n  # every chunk of the index with enough words was sampled
    more = ("the index has no more chunks to write questions about: add documents to the index (nbce-rag index "
            "--append), or calibrate with labelled queries (--queries, --qrels)") if exhausted else (
            f"sample more chunks (raise {n_option}), or calibrate with labelled queries (--queries, --qrels)")
    if kept == 0:
        raise CalibrationError(
            f"none of the {len(pairs)} generated questions ranks its source chunk in the top {filter_top} "
            f"({len(chunks) - len(pairs)} replies were not questions): the model or the encoder does not fit "
            f"these documents; {more}")
    calibrate_kwargs.setdefault("seed", seed)
    if calibrate_kwargs.get("objective") is None and calibrate_kwargs.get("keep_recall_target") is None:
        calibrate_kwargs["keep_recall_target"] = DEFAULT_KEEP_RECALL_TARGET
    small = kept < SMALL_QUESTIONS
    if small:
        if kept < MIN_SMALL_QUESTIONS:
            raise CalibrationError(
                f"only {kept} of {len(pairs)} generated questions ranked their source chunk in the top {filter_top} "
                f"({len(chunks)} chunks sampled of {len(ids)} in the index); a calibration needs at least "
                f"{MIN_SMALL_QUESTIONS} ({len(chunks) - len(pairs)} replies were not questions). {more[0].upper()}{more[1:]}, "
                "or raise --filter-top; until then the index filters with the prior of its encoder")
        calibrate_kwargs.setdefault("min_positives", MIN_SMALL_QUESTIONS)
        calibrate_kwargs.setdefault("min_negatives", MIN_SMALL_QUESTIONS)
        report["note"] = (f"small corpus: {kept} questions from {len(ids)} chunks (fewer than {SMALL_QUESTIONS}); "
                          "the thresholds are rough and their intervals wide. Recalibrate as the index grows, "
                          "or label a few queries (nbce-rag calibrate --queries --qrels)")
    import warnings as _warnings

    try:
        with _warnings.catch_warnings():
            if small:  # the thin-data warnings are summed up in the note
                _warnings.simplefilter("ignore")
            th = MarginThreshold.calibrate(scores, labels, groups, encoder_identity=_identity_of(index),
                                           **calibrate_kwargs)
        if small:
            from nbce_rag.filtering.calibration import CalibrationWarning

            _warnings.warn(report["note"], CalibrationWarning, stacklevel=2)
    except CalibrationError as e:
        raise CalibrationError(f"{e} (synthetic: {kept} of {len(pairs)} generated questions kept from "
                               f"{len(chunks)} chunks; {more})") from None
    th.stats["k"] = int(k)
    th.stats["source"] = "synthetic"
    th.stats["synthetic"] = report
    return th
