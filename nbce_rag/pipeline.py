"""RAGPipeline: retrieve -> filter -> decode, in one direction.

    question ──> index.search (top-k candidates, canonical cosine)
             ──> MarginThreshold.filter: keep (the rows) and support (is it answerable)
                                                                 [nbce_rag.retrieval.selection.select]
             ──> NBCEDecoder.stream (one row per kept passage)
             ──> Answer(text, per-token sources, sources with scores and shares, supported)

The two decisions of the filter reach the answer apart:

* some candidates pass ``keep``: they are decoded; ``Answer.supported`` is the ``support``
  decision (the best candidate's score against the support threshold), so a question with a
  weak best candidate is still answered from it, flagged unsupported;
* nothing passes ``keep``: with ``on_unsupported="abstain"`` (the default,
  :attr:`NBCEConfig.on_unsupported`) the answer says plainly that nothing in the documents
  answers the question (:data:`ABSTAIN_TEXT`; no decoding, ``answered_from="abstained"``); with
  ``"closed_book"`` the model answers alone (``answered_from="closed_book"``). Both are
  flagged ``supported=False``; there is never a silent fall-back to the top-k candidates;
* passages the caller gives (``ask(q, passages=...)``, a request's ``documents``) are never all
  dropped in silence: when none passes ``keep``, the best-scoring one is decoded anyway, the
  answer is flagged unsupported and ``Answer.notes`` says so.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Iterator, List, Optional, Sequence

from nbce_rag.config import ON_UNSUPPORTED
from nbce_rag.decoding.decoder import NBCEDecoder
from nbce_rag.errors import ConfigError
from nbce_rag.retrieval.selection import Selection, check_k, select
from nbce_rag.types import Answer, DroppedHit, Passage, StreamEvent, as_passage

if TYPE_CHECKING:  # pragma: no cover
    from nbce_rag.decoding.decoder import DecodeState
    from nbce_rag.decoding.scheduler import SchedulerConfig

logger = logging.getLogger(__name__)

#: The answer when nothing in the index passes the filter and ``on_unsupported="abstain"``.
ABSTAIN_TEXT = "Nothing in the documents answers this question."


@dataclass
class Plan:
    """What the pipeline will do for one question: the rows, the filter's decisions and how
    the answer is made (see the module docstring). Made by :meth:`RAGPipeline.plan`."""

    kept: List[Passage]
    dropped: List[DroppedHit]
    supported: bool
    support_score: Optional[float] = None
    support_threshold: Optional[float] = None
    answered_from: str = "passages"  #: "passages" | "abstained" | "closed_book"
    notes: List[str] = field(default_factory=list)
    calibration: Optional[str] = None

    def apply(self, answer: Answer) -> Answer:
        """Set the plan's flags on the final answer."""
        answer.supported = self.supported
        answer.dropped = list(self.dropped)
        answer.calibration = self.calibration
        answer.support_score, answer.support_threshold = self.support_score, self.support_threshold
        answer.answered_from, answer.notes = self.answered_from, list(self.notes)
        return answer

    def abstention(self) -> StreamEvent:
        """The final event of an abstained question (no decoding)."""
        ans = self.apply(Answer(text=ABSTAIN_TEXT, token_ids=[], token_sources=[], sources=[], finish_reason="stop",
                                supported=False))
        return StreamEvent(ABSTAIN_TEXT, None, None, "stop", ans)


class RAGPipeline:
    """A retriever (an embedded :class:`VectorIndex`), an optional calibrated filter
    (:class:`MarginThreshold`) and an :class:`NBCEDecoder`.

    >>> rag = RAGPipeline.from_pretrained(index="my_index")   # bundled models; picks up calibration.json
    >>> ans = rag.ask("How do I open a file?")
    >>> ans.text, ans.supported, [(s.id, s.score, s.share) for s in ans.sources]
    """

    def __init__(self, decoder: NBCEDecoder, index: Any = None, threshold: Any = None, *, k: int = 10,
                 calibration: Optional[str] = None):
        self.decoder = decoder
        self.index = index
        self.threshold = threshold
        self.k = check_k(k)
        if threshold is not None and index is not None:
            threshold.check_encoder(index)
        if index is not None and getattr(decoder, "scorer", None) == "auto":
            # unscored passages (e.g. ask(passages=...)) get the index's canonical cosine, the
            # scale its retrieval scores and thresholds use, instead of the bundled encoder's
            decoder.scorer = index
        #: which calibration filters (labelled / synthetic / prior / none), set on every Answer
        self.calibration = calibration or _describe(threshold)

    @classmethod
    def from_pretrained(
        cls,
        index: Any = None,
        *,
        model: Any = None,
        encoder: Any = None,
        threshold: Any = "auto",
        k: int = 10,
        device: Optional[str] = None,
        dtype=None,
        encoder_dtype=None,
        decoder: Optional[NBCEDecoder] = None,
        **decoder_options: Any,
    ) -> "RAGPipeline":
        """Build a pipeline from an index directory (or a loaded :class:`VectorIndex`).

        ``model``: the LLM (``None`` = bundled SmolLM2-135M-Instruct). ``encoder``: the query
        encoder (``None`` = the one recorded in the index). ``threshold``: ``"auto"`` picks, first
        found: ``calibration.json`` in the index directory (labelled), ``calibration.synthetic.json``
        (``nbce-rag calibrate --synthetic``), the shipped prior of the index's encoder
        (:mod:`nbce_rag.filtering.prior`), else no filter; a path, a :class:`MarginThreshold`, or ``None``
        (no filter: all top-k reach the decoder). ``"no-prior"``: ``"auto"`` without the prior.
        ``decoder_options`` are :class:`NBCEConfig` fields. ``dtype``: the LM's (``auto``: bf16 on
        CUDA and on a CPU with bf16 units, else fp32); ``encoder_dtype``: the query encoder's
        compute dtype (``CoSENTEncoder.dtype``; ``None`` leaves the encoder as it is).
        """
        from nbce_rag.filtering.threshold import MarginThreshold

        idx = index
        index_dir = None
        if isinstance(index, (str, os.PathLike)):
            from nbce_rag.retrieval.index import VectorIndex

            index_dir = index
            idx = VectorIndex.load(index, encoder=encoder)
        elif index is not None and encoder is not None:
            idx.encoder = encoder
        if encoder_dtype is not None and idx is not None:
            idx.encoder.dtype = encoder_dtype
        th = threshold
        calibration = None
        if isinstance(threshold, str) and threshold in ("auto", "no-prior"):
            from nbce_rag.filtering.prior import resolve_calibration

            res = resolve_calibration(index_dir, idx, use_prior=threshold == "auto") if idx is not None \
                else resolve_calibration(None, None)
            th, calibration = res.threshold, res.describe()
            if th is None and idx is not None:
                logger.warning(
                    "no calibration for this index and no prior for its encoder: every top-%d candidate "
                    "reaches the decoder. Run `nbce-rag calibrate --synthetic --index DIR` (no labels "
                    "needed) or `nbce-rag calibrate --queries --qrels` to filter irrelevant passages.", k)
            elif res.source == "prior":
                _log_once(logging.WARNING, "no calibration.json next to the index: filtering with %s. "
                          "`nbce-rag calibrate --synthetic --index DIR` calibrates on your own documents.",
                          calibration)
            else:
                _log_once(logging.INFO, "filtering with the %s calibration %s", res.source, res.path)
        elif isinstance(threshold, (str, os.PathLike)):
            th = MarginThreshold.load(threshold, encoder=idx)
            calibration = f"given ({threshold})"
        if decoder is None:
            if index_dir is not None and "kv_cache" not in decoder_options:  # `nbce-rag cache` output, if any
                from nbce_rag.decoding.kvcache import cache_for_index

                kv = cache_for_index(index_dir)
                decoder_options["kv_cache"] = "auto" if kv is None else kv
            dec = NBCEDecoder.from_pretrained(model, device=device, dtype=dtype, **decoder_options)
        elif decoder_options:  # a view with its own options; the caller's decoder is left as it was
            dec = NBCEDecoder(decoder.model, decoder.tokenizer, decoder.config.update(**decoder_options),
                              kv_cache=decoder.kv_cache, scorer=decoder.scorer)
        else:
            dec = decoder
        return cls(dec, idx, th, k=k, calibration=calibration)

    # ------------------------------------------------------------------ retrieval
    def retrieve(self, question: str, k: Optional[int] = None) -> List[Passage]:
        """Top-``k`` candidates from the index, scored with the canonical cosine."""
        if self.index is None:
            raise ValueError("this pipeline has no index: pass passages= to ask(), or build it with an index")
        return list(self.index.search(question, k=check_k(self.k if k is None else k)))

    def select(self, question: str, passages: Optional[Iterable[Any]] = None, k: Optional[int] = None) -> Selection:
        """The passages that will reach the decoder, and the filter's decisions.

        Returns a :class:`~nbce_rag.retrieval.selection.Selection` (unpacks as ``kept, dropped``). With
        ``passages`` given (e.g. from an external store or a request's ``documents``), they are
        re-scored with the canonical cosine when the pipeline has an encoder and a filter, then
        filtered; otherwise the index is searched. See :func:`nbce_rag.retrieval.selection.select`.
        """
        if passages is None:
            return select(question, self.retrieve(question, k), threshold=self.threshold, encoder=self.index)
        if isinstance(passages, (str, bytes)):
            raise TypeError("passages must be a list of passages; wrap a single string in a list")
        candidates = [as_passage(p, where=f"passages[{i}]") for i, p in enumerate(passages)]
        candidates = [p for p in candidates if p.text.strip()]
        return select(question, candidates, threshold=self.threshold, encoder=self.index,
                      rescore=self.threshold is not None and self.index is not None)

    # ------------------------------------------------------------------ answering
    def plan(self, question: str, passages: Optional[Iterable[Any]] = None, k: Optional[int] = None, *,
             on_unsupported: Optional[str] = None) -> Plan:
        """Retrieve (or take ``passages``), filter, and decide how the answer is made: the
        rows, ``supported`` (the filter's support decision, and some passage kept),
        ``answered_from`` and notes. No model call. See the module docstring."""
        mode = on_unsupported or self.decoder.config.on_unsupported
        if mode not in ON_UNSUPPORTED:
            raise ConfigError(f"on_unsupported must be one of {', '.join(map(repr, ON_UNSUPPORTED))} (got {mode!r})")
        given = passages is not None
        sel = self.select(question, passages, k)
        kept, dropped, res = list(sel.kept), list(sel.dropped), sel.result
        plan = Plan(list(kept), list(dropped), bool(kept), calibration=self.calibration)
        if res is not None:
            plan.supported = bool(res.supported) and bool(kept)
            plan.support_score, plan.support_threshold = res.support_score, res.support_threshold
        if given and not kept and dropped:
            # passages the caller sent are never all dropped in silence: decode the best one, flagged
            best = max(dropped, key=lambda d: float("-inf") if d.score is None else d.score)
            plan.dropped.remove(best)
            plan.kept = [best.hit]
            plan.supported = False
            plan.notes.append(
                f"none of the {len(dropped)} passages given passed the filter's keep rule ({best.reason}); "
                "the best-scoring one was decoded anyway and the answer is flagged unsupported")
        elif kept and res is not None and not res.supported:
            plan.notes.append(
                f"the best candidate scores {_num(res.support_score)}, below the support threshold "
                f"{_num(res.support_threshold)}: answered from the {len(kept)} passage(s) that passed the keep rule, "
                "flagged unsupported")
        if not plan.kept:
            plan.supported = False
            if given and not dropped:
                plan.answered_from = "closed_book"
                plan.notes.append("no passage was given: the model answered alone")
            elif mode == "abstain":
                plan.answered_from = "abstained"
                plan.notes.append("no candidate passed the filter's keep rule: nothing in the documents answers this "
                                  "question (on_unsupported='closed_book' lets the model answer alone, flagged)")
            else:
                plan.answered_from = "closed_book"
                plan.notes.append("no candidate passed the filter's keep rule: the model answered alone "
                                  "(on_unsupported='closed_book'); this answer is not from the documents")
        return plan

    def stream(self, question: str, passages: Optional[Iterable[Any]] = None, *, k: Optional[int] = None,
               **options: Any) -> Iterator[StreamEvent]:
        """Retrieve, filter and decode, streaming. The last event's ``answer`` has
        ``supported``, ``dropped``, ``calibration``, ``support_score`` / ``support_threshold``,
        ``answered_from`` and ``notes`` set. ``options`` are :class:`NBCEConfig` fields
        (``on_unsupported`` included)."""
        NBCEDecoder._check_question(question)
        plan = self.plan(question, passages, k, on_unsupported=options.get("on_unsupported"))
        if plan.answered_from == "abstained":
            self.decoder.config.update(**options)  # the options are checked as when decoding
            logger.info("no passage passed the filter: abstaining (unsupported)")
            yield plan.abstention()
            return
        if not plan.kept:
            logger.info("no passage passed the filter: answering closed-book (unsupported)")
        for ev in self.decoder.stream(question, plan.kept, **options):
            if ev.answer is not None:
                plan.apply(ev.answer)
            yield ev

    def answer_stream(self, question: str, passages: Optional[Iterable[Any]] = None, *, retrieve: bool = False,
                      filter_passages: bool = False, k: Optional[int] = None, **options: Any) -> Iterator[StreamEvent]:
        """How a framework's language model over this pipeline decodes (LangChain's and
        LlamaIndex's ``retrieve`` / ``filter_passages`` switches): with no ``passages``,
        ``retrieve`` and an index, as :meth:`stream` (retrieve and filter); with
        ``filter_passages`` and a filter, the passages are re-scored and filtered as in
        :meth:`stream`; otherwise they go to the decoder as given (none: closed-book)."""
        if passages is None and retrieve and self.index is not None:
            return self.stream(question, None, k=k, **options)
        if filter_passages and self.threshold is not None:
            return self.stream(question, list(passages or []), k=k, **options)
        return self.decoder.stream(question, list(passages or []), **options)

    def filter_settings(self) -> dict:
        """``threshold=`` and ``encoder=`` (when there is an index) for a framework's filter
        over this pipeline's calibration (LangChain's compressor, LlamaIndex's postprocessor)."""
        if self.threshold is None:
            raise ValueError("this pipeline has no threshold (calibrate one with `nbce-rag calibrate`)")
        settings = {"threshold": self.threshold}
        if self.index is not None:
            settings["encoder"] = self.index.encoder
        return settings

    def ask(self, question: str, passages: Optional[Iterable[Any]] = None, *, k: Optional[int] = None,
            **options: Any) -> Answer:
        """Answer ``question`` (see :meth:`stream`)."""
        answer = None
        for ev in self.stream(question, passages, k=k, **options):
            answer = ev.answer or answer
        return answer

    def start(self, question: str, passages: Optional[Iterable[Any]] = None, *, k: Optional[int] = None,
              **options: Any) -> "DecodeState":
        """Retrieve and filter now, and return the decoder's :class:`DecodeState` for the kept
        passages (nothing is run on the model yet): the unit a :class:`StepScheduler` decodes.
        Its final answer gets the flags of :meth:`stream`. An abstained question is a state
        with its answer preset (``state.preset``): the scheduler emits it without a model call."""
        NBCEDecoder._check_question(question)
        plan = self.plan(question, passages, k, on_unsupported=options.get("on_unsupported"))
        abstain = plan.answered_from == "abstained"
        state = self.decoder.start(question, [] if abstain else plan.kept, **options)
        if abstain:
            state.preset = plan.abstention()
        state.finalize = plan.apply
        return state

    def batch(self, questions: Sequence[str], passages: Optional[Sequence[Optional[Iterable[Any]]]] = None, *,
              k: Optional[int] = None, scheduler: Optional["SchedulerConfig"] = None, **options: Any) -> List[Answer]:
        """Answer many questions together (offline jobs): every question is a request of the
        server's step scheduler, so their rows share decode forwards. ``passages``: one list
        per question (``None`` in it, or no ``passages`` at all: retrieve from the index).
        Answers are in the order of ``questions`` and equal to :meth:`ask`'s one by one (up to
        float rounding in padded attention). ``scheduler``: a
        :class:`~nbce_rag.decoding.scheduler.SchedulerConfig`. A question whose decoding fails raises
        its error after the others finished."""
        from nbce_rag.decoding.scheduler import StepScheduler

        if isinstance(questions, str):
            raise TypeError("questions must be a list of questions; wrap a single question in a list")
        questions = list(questions)
        if passages is None:
            per = [None] * len(questions)
        else:
            per = list(passages)
            if len(per) != len(questions):
                raise ValueError(f"passages has {len(per)} lists for {len(questions)} questions; give one per question")
        states = [self.start(q, p, k=k, **options) for q, p in zip(questions, per)]
        results = StepScheduler(self.decoder, scheduler).run(states)
        for i, (_, err) in enumerate(results):
            if err is not None:
                logger.error("batch: question %d failed: %s", i, err)
                raise err
        return [s.answer for s, _ in results]

    # ------------------------------------------------------------------ conveniences
    def as_langchain_retriever(self, **kwargs: Any):
        """A LangChain ``BaseRetriever`` over this pipeline's index and filter."""
        from nbce_rag.integrations.langchain import CoSENTRetriever

        return CoSENTRetriever.from_pipeline(self, **kwargs)

    def as_langchain_chat_model(self, **kwargs: Any):
        """A LangChain chat model (``ChatNBCE``) over this pipeline's decoder."""
        from nbce_rag.integrations.langchain import ChatNBCE

        return ChatNBCE.from_pipeline(self, **kwargs)

    def as_query_engine(self, **kwargs: Any):
        """A LlamaIndex query engine (``NBCEQueryEngine``) over this pipeline."""
        from nbce_rag.integrations.llama_index import NBCEQueryEngine

        return NBCEQueryEngine.from_pipeline(self, **kwargs)


_LOGGED: set = set()


def _log_once(level: int, msg: str, *args: Any) -> None:
    """Log a message once per process (the calibration in use is said once, not per question)."""
    key = (msg, args)
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.log(level, msg, *args)


def _num(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _describe(threshold: Any) -> str:
    """Which calibration a filter given directly is (its ``stats["source"]`` when recorded)."""
    if threshold is None:
        return "none (no calibration: every candidate reaches the decoder)"
    st = getattr(threshold, "stats", None) or {}
    return f"{st.get('source', 'given')} (threshold {threshold.threshold:.3f})"
