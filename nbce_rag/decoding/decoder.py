"""NBCEDecoder: answer a question from many passages, one row per passage, fused token by token.

Rows (built by :mod:`nbce_rag.decoding.rows`): ``[no passage] + [one per passage (or per
window of a long passage)]``, each the same prompt template. One batched prefill in
micro-batches of ``batch_rows`` rows (left padding, position ids from the attention mask, only
last-position logits); the micro-batches' caches are then merged into decode groups of up to
``decode_rows`` rows, and every decode step runs each group once, fuses the ``[n+1, V]``
last-token log-probs with :func:`nbce_rag.decoding.nbce.nbce_step`, picks one token and feeds
it to every row. There is no Python loop over rows, only over row
groups (one decode group unless there are more than ``decode_rows`` rows).

:meth:`NBCEDecoder.stream` is the one decode entry point; :meth:`generate` consumes it, and
every adapter (pipeline, LangChain, LlamaIndex) calls one of the two.

Step API (what ``stream`` is a loop over, and what the server's scheduler drives):
:meth:`NBCEDecoder.start` checks the input and builds a request's rows into a
:class:`DecodeState`; :meth:`NBCEDecoder.prefill` prefills the next chunk of its rows;
:meth:`NBCEDecoder.advance` fuses the pending logits, picks a token, applies stop strings
and ``max_new_tokens`` and returns the events; :meth:`NBCEDecoder.forward` feeds the token to
the rows of one state (:class:`nbce_rag.decoding.scheduler.DecodeBatch` does it for many states in
shared forwards); :meth:`NBCEDecoder.finish` ends a state early (e.g. cancelled).
"""

from __future__ import annotations

import contextlib
import threading
import copy
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

from nbce_rag.config import NBCEConfig
from nbce_rag.errors import PromptTooLongError
from nbce_rag.decoding.kvcache import fill, index_texts, plan_prefill, resolve_cache
from nbce_rag.decoding.kvlayout import left_padded, new_cache
from nbce_rag.decoding.nbce import attribute, get_pooling, log_softmax, nbce_step
from nbce_rag.decoding.rows import (NO_PASSAGE, Group, Prepared, Row, check_passages, check_question, encode_prompt,
                                    merge_for_decode, prepare_rows)
from nbce_rag.decoding.sampling import Sampler
from nbce_rag.decoding.static_decode import make_stepper
from nbce_rag.types import Answer, Passage, SourceInfo, StreamEvent

logger = logging.getLogger(__name__)

#: options that act after the prefill (they do not change the rows), see NBCEDecoder.compare
_DECODE_ONLY = frozenset({"beta", "eta", "nbce_top_p", "pooling", "max_new_tokens", "do_sample",
                          "temperature", "top_k", "top_p", "seed", "stop", "min_p", "repetition_penalty",
                          "no_repeat_ngram_size", "frequency_penalty", "presence_penalty", "bad_words_ids",
                          "suppress_tokens", "compile"})


@dataclass(eq=False)
class DecodeState:
    """One request in the decoder's step API: its rows, options and progress.

    Made by :meth:`NBCEDecoder.start`; :meth:`NBCEDecoder.prefill` fills ``groups`` (KV caches,
    masks, positions) a chunk at a time; :meth:`NBCEDecoder.advance` turns the pending
    ``logits`` (``[n+1, V]``, row order) into the next token and its events; a forward
    (:meth:`NBCEDecoder.forward` alone, or :class:`nbce_rag.decoding.scheduler.DecodeBatch` batched with
    other states) feeds ``token`` to every row and sets the next ``logits``. Options (stop,
    max_new_tokens, sampling, seed, pooling) live in ``cfg``, per request.
    """

    prep: Prepared
    cfg: NBCEConfig
    order: List[int]  #: prefill order of the rows (row 0 first, then longest first)
    groups: List[Group] = field(default_factory=list)
    inverse: Optional[torch.Tensor] = None  #: position in ``order`` of each row
    logits: Optional[torch.Tensor] = None  #: [n+1, V] in row order, waiting for advance()
    token: Optional[int] = None  #: the last token, waiting to be fed to every row
    done: bool = False
    answer: Optional[Answer] = None
    finalize: Optional[Callable[[Answer], None]] = None  #: called on the final Answer (e.g. the pipeline's flags)
    #: a final event decided before decoding (the pipeline's abstention): no row is run, a
    #: scheduler emits it as it is (:meth:`NBCEDecoder.settle`)
    preset: Optional[StreamEvent] = None
    tokens: List[int] = field(default_factory=list)
    sources: List[int] = field(default_factory=list)
    emitted: int = 0
    prev: Optional[int] = None
    gen: Optional[torch.Generator] = None
    pooling: Any = None  #: this request's pooling (one object per request: it may keep state across tokens)
    scores: Optional[torch.Tensor] = None  #: retrieval scores of the passage rows, if every one has one
    sampler: Any = None  #: this request's nbce_rag.decoding.sampling.Sampler (processors, warpers, generator)
    stepper: Any = None  #: the static-cache step of forward() (cfg.compile), False when not used
    kv: Any = None  #: passage KV cache plan (nbce_rag.decoding.kvcache.PrefillPlan): what each row reuses; None = off
    begun: bool = False  #: pooling.begin() done (after the prefill: it may use log p(question | passage))
    weights: List[Optional[torch.Tensor]] = field(default_factory=lambda: [None, None])  #: row weights, first/last token
    _next: int = 0  # rows of ``order`` prefilled so far
    _chunks: List[torch.Tensor] = field(default_factory=list)

    @property
    def n_rows(self) -> int:
        return len(self.prep.rows)

    @property
    def prefilled(self) -> bool:
        return self.inverse is not None

    def row_tokens(self, r: int) -> int:
        """Tokens the prefill computes for row ``r``: its uncached tail when the passage KV cache
        holds the rest, else the whole row."""
        return self.kv.uncached(r) if self.kv is not None else len(self.prep.rows[r].ids)


class NBCEDecoder:
    """Naive Bayes-based Context Extension over a Hugging Face causal LM.

    >>> dec = NBCEDecoder.from_pretrained()                      # bundled SmolLM2-135M-Instruct
    >>> ans = dec.generate("Who wrote it?", ["passage one", "passage two"])
    >>> ans.text, ans.token_sources, ans.sources
    """

    def __init__(self, model, tokenizer, config: Optional[NBCEConfig] = None, *, kv_cache: Any = "auto",
                 scorer: Any = "auto"):
        from nbce_rag.models import prepare_tokenizer

        self.model = model
        self.tokenizer = tokenizer
        prepare_tokenizer(tokenizer)
        self.config = (config or NBCEConfig()).validate()
        #: scores passages given without one (see nbce_rag.decoding.scoring.resolve_scorer): "auto" = the
        #: bundled encoder's cosine, loaded on first need; None = leave them unscored (the
        #: behaviour before scorers); an encoder/index; or a callable (question, texts) -> scores
        self.scorer = scorer
        self._eos_ids = self._find_eos_ids()
        params = inspect.signature(model.forward).parameters
        # transformers >= 5.2x renamed past_key_values -> cache
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._logits_to_keep = "logits_to_keep" in params
        #: passage KV cache (:mod:`nbce_rag.decoding.kvcache`): "auto" = the process-wide RAM cache; None = off
        self.kv_cache = resolve_cache(kv_cache)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        model: Any = None,
        *,
        device: Optional[str] = None,
        dtype=None,
        gguf_file: Optional[str] = None,
        device_map=None,
        config: Optional[NBCEConfig] = None,
        kv_cache: Any = "auto",
        model_kwargs: Optional[dict] = None,
        **options: Any,
    ) -> "NBCEDecoder":
        """Load a model (``None``: the bundled default; an HF id, a local path or a ``.gguf``
        file) and wrap it. ``options`` are :class:`NBCEConfig` fields (e.g. ``beta=0.5``).
        ``kv_cache``: the passage KV cache ("auto": shared, in RAM; a directory: with a disk
        store; a :class:`~nbce_rag.decoding.kvcache.PassageKVCache`; None: off). ``model_kwargs`` go to
        transformers' ``from_pretrained`` (e.g. ``revision``, ``attn_implementation``,
        ``trust_remote_code``)."""
        from nbce_rag.models import load_model

        scorer = options.pop("scorer", "auto")
        lm, tok = load_model(model, device=device, dtype=dtype, gguf_file=gguf_file, device_map=device_map,
                             **dict(model_kwargs or {}))
        cfg = (config or NBCEConfig()).update(**options) if options else config
        return cls(lm, tok, cfg, kv_cache=kv_cache, scorer=scorer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def name(self) -> str:
        return getattr(self.model, "name_or_path_for_display", None) or getattr(self.model, "name_or_path", "model")

    @property
    def context_window(self) -> int:
        """Tokens one row may hold (prompt + answer): the model's trained length."""
        cfg = self.model.config
        for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            v = getattr(cfg, attr, None)
            if isinstance(v, int) and v > 0:
                return v
        v = getattr(self.tokenizer, "model_max_length", None)
        return v if isinstance(v, int) and 0 < v < 10**7 else 2048

    def _find_eos_ids(self) -> set:
        ids = set()
        for src in (self.tokenizer.eos_token_id, getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)):
            if isinstance(src, int):
                ids.add(src)
            elif isinstance(src, (list, tuple)):
                ids.update(int(x) for x in src)
        # chat templates often end a turn with a token that is not the tokenizer's EOS
        for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>"):
            tid = self.tokenizer.convert_tokens_to_ids(tok) if tok in self.tokenizer.get_vocab() else None
            if isinstance(tid, int):
                ids.add(tid)
        return ids

    # ------------------------------------------------------------------ prompts
    def build_prompt(self, question: str, passage: Optional[str] = None, *, config: Optional[NBCEConfig] = None) -> str:
        """The prompt of one row: ``prompt_template`` with the passage (``None`` or ``""`` for
        the no-passage row), wrapped in the chat template when the tokenizer has one."""
        cfg = config or self.config
        content = cfg.prompt_template.format(passage=passage or "", question=question).strip()
        if cfg.use_chat_template and getattr(self.tokenizer, "chat_template", None):
            messages = []
            if cfg.system_prompt is not None:
                messages.append({"role": "system", "content": cfg.system_prompt})
            messages.append({"role": "user", "content": content})
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return f"{content}\nAnswer:"

    # ------------------------------------------------------------------ rows
    #: the checked question and passages (:func:`nbce_rag.decoding.rows.check_question`,
    #: :func:`~nbce_rag.decoding.rows.check_passages`: ``[(original index, Passage)]``)
    _check_question = staticmethod(check_question)
    _check_passages = staticmethod(check_passages)

    def _prepare(self, question: str, kept: List[Tuple[int, Passage]], cfg: NBCEConfig,
                 question_spans: Optional[bool] = None) -> Prepared:
        """This decoder's rows (:func:`nbce_rag.decoding.rows.prepare_rows`)."""
        return prepare_rows(self, question, kept, cfg, question_spans=question_spans)

    def _score_passages(self, question: str, kept: List[Tuple[int, Passage]]) -> List[Tuple[int, Passage]]:
        """Fill in the scores of passages given without one (``self.scorer``)."""
        if self.scorer is None or all(p.score is not None for _, p in kept):
            return kept
        from nbce_rag.decoding.scoring import resolve_scorer, score_missing

        spec = self.scorer
        cached = getattr(self, "_resolved_scorer", None)
        if cached is None or cached[0] is not spec:  # resolve once per scorer (its embedding memo lives on)
            cached = self._resolved_scorer = (spec, resolve_scorer(spec))
        return score_missing(cached[1], question, kept)

    # ------------------------------------------------------------------ passage KV cache
    def cache_passages(self, source: Any, *, show_progress: bool = False):
        """Compute the keys and values of passages ahead of time into this decoder's passage KV
        cache (``self.kv_cache``, and its disk store if it has one), so that later questions
        over them prefill only the question (:func:`nbce_rag.decoding.kvcache.fill`).

        ``source``: a :class:`~nbce_rag.retrieval.index.VectorIndex` (its chunks, in storage
        order) or an iterable of passages (str, :class:`~nbce_rag.types.Passage` or dict).
        Passages already cached are skipped. Returns the fill's
        :class:`~nbce_rag.decoding.kvcache.KVCacheStats`. Raises ``ValueError`` when the
        decoder has no KV cache (``kv_cache=None``) or the cache cannot be used with this model
        or ``prompt_template``."""
        from nbce_rag.retrieval.index import VectorIndex

        texts = index_texts(source) if isinstance(source, VectorIndex) else source
        return fill(self, texts, show_progress=show_progress)

    # ------------------------------------------------------------------ model calls
    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache) -> Tuple[torch.Tensor, Any]:
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "use_cache": True, self._cache_kw: cache}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1  # only the last position's logits, never [rows, L, V]
        out = self.model(**kwargs)
        logits = out.logits[:, -1, :].float()
        new_cache = getattr(out, "cache", None)
        return logits, new_cache if new_cache is not None else out.past_key_values

    def _prefill(self, rows: List[Row], order: List[int], cfg: NBCEConfig, kv=None) -> Tuple[List[Group], torch.Tensor]:
        dev = self.device
        pad = self.tokenizer.pad_token_id
        groups: List[Group] = []
        chunks = []
        for start in range(0, len(order), cfg.batch_rows):
            members = order[start : start + cfg.batch_rows]
            if kv is not None:  # passage KV cache: only each row's uncached tail is computed
                with self._last_hidden(any(rows[r].q_span for r in members)) as hidden:
                    lg, group = kv.prefill(members)  # the tail always holds the question + the position before it
                self._question_logliks([rows[r] for r in members], hidden)
                groups.append(group)
                chunks.append(lg)
                continue
            ids, mask, pos = left_padded([rows[r].ids for r in members], max(len(rows[r].ids) for r in members), pad)
            ids, mask, pos = ids.to(dev), mask.to(dev), pos.to(dev)
            with self._last_hidden(any(rows[r].q_span for r in members)) as hidden:
                lg, cache = self._forward(ids, mask, pos, new_cache())
            self._question_logliks([rows[r] for r in members], hidden)
            groups.append(Group(members, cache, mask, pos[:, -1:]))
            chunks.append(lg)
        logits = torch.cat(chunks, dim=0)
        return merge_for_decode(groups, cfg.decode_rows), logits

    @contextlib.contextmanager
    def _last_hidden(self, wanted: bool):
        """Capture the decoder stack's final hidden states ``[rows, L, H]`` of the forward run
        inside (already computed by it: no extra forward, no extra full-sequence tensor)."""
        box: List[torch.Tensor] = []
        if not wanted:
            yield box
            return

        me = threading.get_ident()

        def hook(_mod, _args, out):
            # the hook sits on a module that other threads' decoders may share: capture only
            # the forward run by this thread (hooks run in the thread that calls forward)
            if threading.get_ident() == me:
                box[:] = [out[0] if isinstance(out, tuple) else out.last_hidden_state]

        handle = self.model.get_decoder().register_forward_hook(hook)
        try:
            yield box
        finally:
            handle.remove()

    def _question_logliks(self, rows: List[Row], hidden: List[torch.Tensor]) -> None:
        """Set ``row.q_loglik = log p(question | passage)`` from the prefill's final hidden states
        (left-padded batch): the LM head runs once, on the positions that predict a question
        token (the one before each question token), of every row together."""
        if not hidden:
            return
        from nbce_rag.decoding.scoring import span_logliks

        h = hidden[0]
        W = h.shape[1]
        picked, targets, counts, owners = [], [], [], []
        for j, row in enumerate(rows):
            if row.q_span is None:
                continue
            s, e = row.q_span
            L = len(row.ids)
            if L - (s - 1) > W:  # pragma: no cover - the prefill always computes the position before the question
                raise RuntimeError("the prefill did not compute the position before the question")
            picked.append(h[j, W - (L - s + 1) : W - (L - e + 1)])
            targets.extend(row.ids[s:e])
            counts.append(e - s)
            owners.append(row)
        if not owners:
            return
        logits = self.model.get_output_embeddings()(torch.cat(picked)).float()
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        for row, ll in zip(owners, span_logliks(logits, torch.tensor(targets, dtype=torch.long, device=logits.device), counts)):
            row.q_loglik = ll

    def _decode_step(self, groups: List[Group], token: int) -> torch.Tensor:
        chunks = []
        for g in groups:
            n = len(g.rows)
            ids = torch.full((n, 1), token, dtype=torch.long, device=g.mask.device)
            g.mask = torch.cat([g.mask, torch.ones((n, 1), dtype=g.mask.dtype, device=g.mask.device)], dim=-1)
            g.last_pos = g.last_pos + 1
            lg, g.cache = self._forward(ids, g.mask, g.last_pos, g.cache)
            chunks.append(lg)
        return torch.cat(chunks, dim=0)

    # ------------------------------------------------------------------ sampling
    @staticmethod
    def _sample(logits: torch.Tensor, cfg: NBCEConfig, gen: Optional[torch.Generator], generated: Sequence[int] = ()) -> int:
        """One token from the fused scores (see :class:`nbce_rag.decoding.sampling.Sampler`; a decode
        keeps one Sampler per request in ``DecodeState.sampler``)."""
        return Sampler(cfg, gen)(logits, generated)

    # ------------------------------------------------------------------ public decode
    def stream(self, question: str, passages: Optional[Iterable[Any]] = None, **options: Any) -> Iterator[StreamEvent]:
        """Decode token by token, yielding :class:`StreamEvent` (new text, token id, source
        passage index). The last event carries ``finish_reason`` and the full :class:`Answer`.
        ``options`` override :class:`NBCEConfig` fields for this call."""
        question = self._check_question(question)
        kept = self._score_passages(question, self._check_passages(passages))
        cfg = self.config.update(**options)  # validated each call (config fields may have been edited)
        prep = self._prepare(question, kept, cfg)
        return self._run(prep, cfg)

    # ------------------------------------------------------------------ step API
    def start(self, question: str, passages: Optional[Iterable[Any]] = None, **options: Any) -> DecodeState:
        """Begin decoding ``question`` over ``passages`` without running the model: checks the
        input, builds the rows and returns a :class:`DecodeState`. Drive it with
        :meth:`prefill` (a chunk of rows per call), then :meth:`advance` / :meth:`forward` per
        token, or hand it to :class:`nbce_rag.decoding.scheduler.StepScheduler` to decode it together
        with other requests. ``stream()`` is exactly this loop."""
        question = self._check_question(question)
        kept = self._score_passages(question, self._check_passages(passages))
        cfg = self.config.update(**options)  # validated each call (config fields may have been edited)
        return self._new_state(self._prepare(question, kept, cfg), cfg)

    def _new_state(self, prep: Prepared, cfg: NBCEConfig) -> DecodeState:
        rows = prep.rows
        kv = self._kv_plan(rows, cfg)
        # group rows of similar (uncached) length together (less padding); row 0 first
        order = [0] + sorted(range(1, len(rows)), key=lambda r: -(kv.uncached(r) if kv else len(rows[r].ids)))
        gen = torch.Generator().manual_seed(cfg.seed) if (cfg.do_sample and cfg.seed is not None) else None
        scores = prep.row_scores.to(self.device) if prep.row_scores is not None else None
        return DecodeState(prep, cfg, order, gen=gen, pooling=get_pooling(cfg.pooling), scores=scores, kv=kv,
                           sampler=Sampler(cfg, gen, exhausted=min(self._eos_ids, default=None)))

    @torch.inference_mode()
    def prefill(self, state: DecodeState, max_tokens: Optional[int] = None) -> bool:
        """Prefill the next chunk of ``state``'s rows: ``cfg.batch_rows`` rows, fewer when
        ``max_tokens`` (padded tokens per chunk, at least one row) says so. Returns ``True``
        once every row is prefilled (the caches are then merged into decode groups and the
        first token's logits wait in ``state.logits``). Chunking bounds how long one call
        holds the model: a scheduler interleaves these calls with other requests' steps."""
        if state.prefilled:
            return True
        cfg, rows, order = state.cfg, state.prep.rows, state.order
        start = state._next
        take = min(cfg.batch_rows, len(order) - start)
        if max_tokens is not None:  # rows are sorted longest first: the first sets the width
            width = max(state.row_tokens(r) for r in order[start : start + take])
            take = max(1, min(take, max_tokens // max(1, width)))
        members = order[start : start + take]
        groups, logits = self._prefill(rows, members, cfg, state.kv)
        state.groups.extend(groups)
        state._chunks.append(logits)
        state._next = start + take
        if state._next < len(order):
            return False
        if state.kv is not None:
            state.kv.finish()  # (drops its references to cache entries)
            state.prep.cached_tokens = state.kv.stats.cached_tokens
        state.groups = merge_for_decode(state.groups, cfg.decode_rows)
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        state.inverse = inverse.to(self.device)
        state.logits = torch.cat(state._chunks, dim=0)[state.inverse]
        state._chunks = []
        return True

    @torch.inference_mode()
    def forward(self, state: DecodeState) -> None:
        """Feed ``state.token`` to every row of this one state and set ``state.logits``."""
        if state.stepper is None:  # cfg.compile: a static cache (the one-request loop only)
            state.stepper = make_stepper(self, state.groups, state.inverse, state.cfg) or False
        if state.stepper:
            state.logits = state.stepper(state.token)
            return
        state.logits = self._decode_step(state.groups, state.token)[state.inverse]

    def generate(self, question: str, passages: Optional[Iterable[Any]] = None, **options: Any) -> Answer:
        """Answer ``question`` from ``passages`` (greedy by default). See :meth:`stream`."""
        answer = None
        for ev in self.stream(question, passages, **options):
            answer = ev.answer or answer
        assert answer is not None
        return answer

    def generate_concat(self, question: str, passages: Optional[Iterable[Any]] = None, **options: Any) -> Answer:
        """Baseline: all passages concatenated into one prompt, plain decoding (what
        LangChain's "stuff" chain does). Raises :class:`PromptTooLongError` when they do not
        fit the window. Sources are not attributed (every token is marked -1)."""
        question = self._check_question(question)
        kept = self._check_passages(passages)
        cfg = self.config.update(**options)  # validated each call (config fields may have been edited)
        joined = "\n\n".join(p.text.strip() for _, p in kept)
        ids = encode_prompt(self.tokenizer, self.build_prompt(question, joined or None, config=cfg), cfg)
        if len(ids) + cfg.max_new_tokens > self.context_window:
            raise PromptTooLongError(
                f"the concatenated prompt is {len(ids)} tokens + {cfg.max_new_tokens} new tokens, more than "
                f"the model's window of {self.context_window}; use generate() (NBCE) instead"
            )
        prep = Prepared([Row(ids, NO_PASSAGE)], [])
        answer = None
        for ev in self._run(prep, cfg):
            answer = ev.answer or answer
        return answer

    @torch.inference_mode()
    def _prefill_rows(self, prep: Prepared, cfg: NBCEConfig):
        """Prefill every row; returns ``(groups, logits in row order, inverse permutation)``."""
        rows = prep.rows
        kv = self._kv_plan(rows, cfg)
        # group rows of similar (uncached) length together (less padding); row 0 first
        order = [0] + sorted(range(1, len(rows)), key=lambda r: -(kv.uncached(r) if kv else len(rows[r].ids)))
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        inverse = inverse.to(self.device)
        groups, logits = self._prefill(rows, order, cfg, kv)
        if kv is not None:
            kv.finish()
            prep.cached_tokens = kv.stats.cached_tokens
        return groups, logits[inverse], inverse

    def _kv_plan(self, rows: List[Row], cfg: NBCEConfig):
        """What each row can take from the passage KV cache (None: no cache, or not usable here)."""
        if self.kv_cache is None:
            return None
        return plan_prefill(self, rows, cfg)

    def compare(self, question: str, passages: Optional[Iterable[Any]], variants: Sequence[dict], **options: Any) -> List[Answer]:
        """Decode the same question and passages under several decode-time option sets
        (e.g. each pooling, or several β), sharing one prefill. Returns one :class:`Answer`
        per variant, identical to ``generate(question, passages, **options, **variant)``.
        Variants may only change options that act after the prefill: beta, eta, nbce_top_p,
        pooling, max_new_tokens, do_sample, temperature, top_k, top_p, seed, stop."""
        question = self._check_question(question)
        kept = self._score_passages(question, self._check_passages(passages))
        for v in variants:
            bad = sorted(set(v) - _DECODE_ONLY)
            if bad:
                raise ValueError(f"compare() variants cannot change {bad}: they change the prompt rows")
        base = self.config.update(**options)  # validated each call (config fields may have been edited)
        cfgs = [base.update(**v) for v in variants]
        longest = max(c.max_new_tokens for c in cfgs) if cfgs else base.max_new_tokens
        has_scores = all(p.score is not None for _, p in kept)
        spans = any(get_pooling(c.pooling).needs_question_loglik(has_scores) for c in cfgs)
        prep = self._prepare(question, kept, base.update(max_new_tokens=longest), question_spans=spans)
        groups, logits, inverse = self._prefill_rows(prep, base)
        answers = []
        for cfg in cfgs:
            fresh = [Group(g.rows, copy.deepcopy(g.cache), g.mask.clone(), g.last_pos.clone()) for g in groups]
            answer = None
            for ev in self._run(prep, cfg, (fresh, logits.clone(), inverse)):
                answer = ev.answer or answer
            answers.append(answer)
        return answers

    @torch.inference_mode()
    def _run(self, prep: Prepared, cfg: NBCEConfig, prefilled=None) -> Iterator[StreamEvent]:
        """The plain (one request) decode loop over the step API."""
        state = self._new_state(prep, cfg)
        if prefilled is not None:
            state.groups, state.logits, state.inverse = prefilled
        while not self.prefill(state):
            pass
        while True:
            yield from self.advance(state)
            if state.done:
                return
            self.forward(state)

    @torch.inference_mode()
    def advance(self, state: DecodeState) -> List[StreamEvent]:
        """Pick the next token from ``state.logits`` (fusion, sampling, stop strings,
        max_new_tokens) and return the events it makes; the last one carries the
        :class:`Answer` and sets ``state.done``. Otherwise ``state.token`` waits for a forward."""
        if state.done:
            return []
        if state.logits is None:
            raise RuntimeError("advance() needs logits: prefill() the state first, then forward() after each token")
        prep, cfg, logits = state.prep, state.cfg, state.logits
        state.logits = None
        n = len(prep.rows) - 1
        events: List[StreamEvent] = []
        stop_hold = max((len(s) for s in cfg.stop), default=0)
        finish = None
        if not torch.isfinite(logits).any(dim=-1).all():
            raise RuntimeError("the model returned non-finite logits for a whole row; try dtype='float32'")
        if n == 0:
            fused = log_softmax(logits[0])
            token = state.sampler(fused, state.tokens)
            src = NO_PASSAGE
        else:
            if not state.begun and hasattr(state.pooling, "begin"):  # the per-answer pooling, given
                qll = [r.q_loglik for r in prep.rows[1:]]  # scores and log p(question | passage)
                state.pooling = state.pooling.begin(state.scores, None if None in qll else torch.tensor(qll))
            state.begun = True
            st = nbce_step(logits, beta=cfg.beta, eta=cfg.eta, top_p=cfg.nbce_top_p, pooling=state.pooling,
                           scores=state.scores, prev=state.prev)
            token = state.sampler(st.logits, state.tokens)
            state.prev = attribute(st, token)
            src = prep.rows[state.prev + 1].source
            updated = state.pooling.observe(st, token) if hasattr(state.pooling, "observe") else None
            state.weights = [st.weights if state.weights[0] is None else state.weights[0],
                             updated if updated is not None else st.weights]
        if token in self._eos_ids:
            finish = "stop"
        else:
            tokens = state.tokens
            tokens.append(token)
            state.sources.append(src)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            cut = _find_stop(text, cfg.stop, max(0, state.emitted - stop_hold))
            if cut is not None:
                text = text[:cut]
                finish = "stop"
                if len(text) > state.emitted:
                    events.append(StreamEvent(text[state.emitted:], token, src))
                    state.emitted = len(text)
            else:
                safe = len(text) - _held_back(text, cfg.stop)
                if text[safe - 1 : safe] == "\ufffd":  # an incomplete multi-byte character
                    safe -= 1
                if safe > state.emitted:
                    events.append(StreamEvent(text[state.emitted:safe], token, src))
                    state.emitted = safe
                else:
                    events.append(StreamEvent("", token, src))
                if len(tokens) >= cfg.max_new_tokens:
                    finish = "length"
        if finish is None:
            state.token = token
            return events
        events.append(self.finish(state, finish))
        return events

    def settle(self, state: DecodeState) -> StreamEvent:
        """End a state whose answer was decided before decoding (``state.preset``) and return
        that final event; no model call."""
        ev = state.preset
        if ev is None or ev.answer is None:
            raise ValueError("settle() needs a state with a preset final event (an Answer)")
        if state.finalize is not None:
            state.finalize(ev.answer)
        state.done, state.answer, state.token, state.logits, state.groups = True, ev.answer, None, None, []
        return ev

    def finish(self, state: DecodeState, reason: str) -> StreamEvent:
        """End ``state`` now (``reason``: "stop", "length", or e.g. "cancelled") and return its
        final event, with the :class:`Answer` of what was decoded so far."""
        tokens = state.tokens
        final = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if reason == "stop" and state.cfg.stop:
            cut = _find_stop(final, state.cfg.stop, 0)
            final = final[:cut] if cut is not None else final
        answer = self._answer(final, tokens, state.sources, state.prep, reason,
                              n_steps=len(tokens) + (reason == "stop"), weights=state.weights)
        if state.finalize is not None:
            state.finalize(answer)
        state.done, state.answer, state.token, state.logits = True, answer, None, None
        state.groups = []  # the KV caches go now, not when the state is collected
        return StreamEvent(final[state.emitted:], None, None, reason, answer)

    def _answer(self, text: str, tokens: List[int], sources: List[int], prep: Prepared, finish: str, n_steps: int,
                weights=(None, None)) -> Answer:
        total = len(tokens)
        infos = []
        row_src = [r.source for r in prep.rows[1:]]

        def weight_of(w: Optional[torch.Tensor], idx: int) -> Optional[float]:  # summed over the passage's windows
            return None if w is None else float(sum(float(w[j]) for j, s in enumerate(row_src) if s == idx))

        for idx, p in prep.passages:
            cnt = sum(1 for s in sources if s == idx)
            infos.append(
                SourceInfo(index=idx, text=p.text, score=p.score, n_tokens=cnt,
                           share=(cnt / total) if total else 0.0, id=p.id, metadata=dict(p.metadata),
                           weight_initial=weight_of(weights[0], idx), weight_final=weight_of(weights[1], idx))
            )
        return Answer(
            text=text,
            token_ids=tokens,
            token_sources=sources,
            sources=infos,
            finish_reason=finish,
            prompt_tokens=sum(len(r.ids) for r in prep.rows),
            cached_tokens=prep.cached_tokens,
            completion_tokens=n_steps,
            supported=bool(prep.passages),
        )


def _find_stop(text: str, stops: Sequence[str], start: int) -> Optional[int]:
    best = None
    for s in stops:
        i = text.find(s, start)
        if i != -1 and (best is None or i < best):
            best = i
    return best


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold
