"""Decoding options, in the style of transformers' ``GenerationConfig``, and the one mapping
from OpenAI-style request parameters to them (:data:`OPENAI_PARAMS`, :func:`openai_options`,
:meth:`NBCEConfig.from_openai_params`), used by the LangChain and LlamaIndex models and the
server alike."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from nbce_rag.errors import ConfigError

DEFAULT_PROMPT_TEMPLATE = "{passage}\n\nAnswer briefly: {question}"
#: What the pipeline answers when no passage passes the filter (:attr:`NBCEConfig.on_unsupported`).
ON_UNSUPPORTED = ("abstain", "closed_book")


@dataclass
class NBCEConfig:
    """Options of :class:`~nbce_rag.NBCEDecoder`. Every field can be overridden per call
    (``dec.generate(q, passages, beta=0.5, pooling="mean")``).

    NBCE (defaults from the reference implementation, ``bojone/NBCE``):
        beta: weight of the contrast against the no-passage row,
            ``(β+1)·pooled − β·uncond``. 0 disables it; larger pushes answers to the passages.
        eta: entropy bonus of the passage chosen at the previous step (stickiness).
        nbce_top_p: per-row nucleus truncation applied before entropy and pooling.
        pooling: ``"auto"`` (default: ``"replug"``, the mixture with weights softmax(score/0.1),
            when every passage has a score, which the decoder's scorer gives unscored passages;
            the reference ``"min_entropy"`` when none has, i.e. with ``scorer=None``),
            ``"min_entropy"``, ``"mean"``, ``"max"``, ``"replug"``, ``"scored_entropy"`` (ours:
            min-entropy selection that also weighs the retrieval score), ``"posterior"`` /
            ``"posterior:<scores|question|product|uniform>[,online|,static]"``, or a
            :class:`~nbce_rag.decoding.nbce.Pooling` instance. Chosen by benchmarks/bench_quality.py
            (SQuAD, HotpotQA, NQ; see the README's quality tables).

    Sampling (applied to the fused distribution):
        do_sample: False = greedy. temperature, top_k (0 = off), top_p (1.0 = off), min_p
            (0.0 = off), seed. These act only when ``do_sample`` (as in transformers).

    Post-fusion processing (greedy and sampling; transformers' processors on the fused row,
    with the answer's tokens so far as ``input_ids``; see :mod:`nbce_rag.decoding.sampling`):
        repetition_penalty: ``> 0``, 1.0 = off (transformers' definition, on log-probs).
        no_repeat_ngram_size: no n-gram of this many tokens occurs twice in the answer (0 = off).
        frequency_penalty, presence_penalty: OpenAI's additive penalties in ``[-2, 2]``
            (0 = off): ``score -= count·frequency_penalty + [count > 0]·presence_penalty``.
        bad_words_ids: token-id sequences that must not be generated (a list of lists).
        suppress_tokens: token ids that are never generated.

    Length and stopping:
        max_new_tokens; stop: strings that end the answer (not included in it); the
        tokenizer's EOS (and the chat template's end-of-turn token) always stop.

    Prompt:
        prompt_template: how a passage and the question form one row's user message; row 0
            uses the same template with an empty passage. use_chat_template: wrap it with the
            tokenizer's chat template when there is one (else a plain "...\\nAnswer:" prompt).
        system_prompt: optional system message (None = the template's default).

    Memory:
        batch_rows: rows per prefill forward pass. Bounds the prefill's activation memory for
            hundreds of passages; the KV cache still grows with the number of rows.
        decode_rows: rows per decode forward pass. After the prefill, row groups are merged
            (their caches left-padded to one width) into groups of up to this many rows, so a
            decode step is one forward for up to ``decode_rows`` passages: a decode step's
            activations are one token per row, small next to the cache.
        max_passage_tokens: split longer passages into windows of this many tokens (a row
            each). None = as much as the model's window leaves after the prompt and answer.
        window_overlap: tokens shared by consecutive windows of a split passage.

    Unsupported questions (read by :class:`~nbce_rag.pipeline.RAGPipeline`; the decoder ignores it):
        on_unsupported: what to answer when no candidate passes the filter's ``keep`` rule:
            ``"abstain"`` (default: a plain answer saying nothing in the documents answers the
            question; no decoding, no invented answer) or ``"closed_book"`` (the model answers
            alone). Either way the answer is flagged ``supported=False``. Questions some
            candidates pass ``keep`` for are answered from them, flagged unsupported when the
            best one fails ``support``.

    Speed:
        compile: the decode steps over a static KV cache bucketed in rows and length, under
            ``torch.compile(mode="reduce-overhead")`` (CUDA graphs on a GPU; see
            :mod:`nbce_rag.decoding.static_decode`). ``False`` (default: GPU speed not measured yet),
            ``True``, ``"auto"`` (on CUDA only) or ``"static"`` (the static cache without
            compiling). Same tokens as the default path in fp32.
    """

    beta: float = 0.25
    eta: float = 0.1
    nbce_top_p: float = 0.95
    pooling: Any = "auto"
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    bad_words_ids: Optional[List[List[int]]] = None
    suppress_tokens: Optional[List[int]] = None
    stop: List[str] = field(default_factory=list)
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE  # chosen on SQuAD: 8/10 vs 5/10 for "{passage}\n\n{question}"
    use_chat_template: bool = True
    system_prompt: Optional[str] = None
    batch_rows: int = 16
    decode_rows: int = 256
    max_passage_tokens: Optional[int] = None
    window_overlap: int = 32
    compile: Any = False
    on_unsupported: str = "abstain"

    def validate(self) -> "NBCEConfig":
        """Check every option (types, finite numbers in range: see :data:`NUMERIC_OPTIONS`) and
        normalise numbers to ``int``/``float``; raise :class:`ConfigError` with one line that
        names the option. The API, the CLI and the server all validate through here."""

        def bad(msg: str) -> ConfigError:
            return ConfigError(msg)

        for name, spec in NUMERIC_OPTIONS.items():
            setattr(self, name, check_number(name, getattr(self, name), *spec))
        for name in ("do_sample", "use_chat_template"):
            v = getattr(self, name)
            if not isinstance(v, bool):
                if not (type(v).__module__ == "numpy" and type(v).__name__ in ("bool", "bool_")):  # numpy's bool
                    raise bad(f"{name} must be true or false (got {_show(v)})")
                setattr(self, name, bool(v))
        if (not isinstance(self.prompt_template, str) or "{question}" not in self.prompt_template
                or "{passage}" not in self.prompt_template):
            raise bad("prompt_template must be a string containing both {passage} and {question}")
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise bad(f"system_prompt must be a string or None (got {_show(self.system_prompt)})")
        try:
            self.bad_words_ids = validate_token_lists("bad_words_ids", self.bad_words_ids, nested=True)
            self.suppress_tokens = validate_token_lists("suppress_tokens", self.suppress_tokens, nested=False)
        except ValueError as e:
            raise bad(str(e)) from None
        if self.on_unsupported not in ON_UNSUPPORTED:
            raise bad(f"on_unsupported must be one of {', '.join(map(repr, ON_UNSUPPORTED))} "
                      f"(got {_show(self.on_unsupported)})")
        if self.compile not in (False, True, "auto", "static"):
            raise bad(f"compile must be False, True, 'auto' (CUDA only) or 'static' (got {_show(self.compile)})")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop must be a list of non-empty strings")
        from nbce_rag.decoding.nbce import get_pooling

        try:
            get_pooling(self.pooling)
        except ValueError as e:
            raise bad(str(e)) from None
        return self

    def update(self, **overrides: Any) -> "NBCEConfig":
        """A validated copy with ``overrides`` applied; unknown names are an error."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown decoding option(s) {unknown}; valid options: {sorted(names)}")
        overrides = {k: v for k, v in overrides.items() if v is not None or k in ("seed", "max_passage_tokens", "system_prompt", "bad_words_ids", "suppress_tokens")}
        if isinstance(overrides.get("stop"), str):
            overrides["stop"] = [overrides["stop"]]
        return replace(self, **overrides).validate()

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        if not isinstance(d["pooling"], str):
            d["pooling"] = getattr(self.pooling, "name", type(self.pooling).__name__)
        return d

    @classmethod
    def from_openai_params(cls, *layers: Mapping[str, Any], base: Optional["NBCEConfig"] = None) -> "NBCEConfig":
        """A validated config from OpenAI-style parameters (``max_tokens``, ``temperature``,
        ``top_p``, ``stop``, ``seed``, ... and any :class:`NBCEConfig` field), given as
        ``layers`` from the most general to the most specific; ``base`` (default: the
        defaults) supplies every option not given. See :func:`openai_options`."""
        return (base or cls()).update(**openai_options(*layers))


# --------------------------------------------------------------------------------------------
# OpenAI-style parameters -> NBCEConfig overrides
# --------------------------------------------------------------------------------------------


def _to(name: str, convert: Callable[[Any], Any] = lambda v: v) -> Callable[[Any], Dict[str, Any]]:
    """A parameter that sets one NBCEConfig field to ``convert(value)``."""
    return lambda v: {name: convert(v)}


def _stop_list(v: Any) -> List[str]:
    return [v] if isinstance(v, str) else list(v)


def _checked(param: str, name: str) -> Callable[[Any], Any]:
    """``param``'s value checked against the range of the field ``name`` it sets (the error
    names ``param``, the name the caller used)."""
    return lambda v: check_number(param, v, *NUMERIC_OPTIONS[name])


def _temperature(v: Any) -> Dict[str, Any]:
    t = check_number("temperature", v, "float", 0.0, NUMERIC_OPTIONS["temperature"][2], "0 means greedy decoding")
    return {"do_sample": True, "temperature": t} if t > 0 else {"do_sample": False}


#: OpenAI-style parameter -> the NBCEConfig overrides it stands for; one line per parameter.
#: Where several names set one field, the one listed first wins (``max_completion_tokens`` over
#: ``max_tokens`` over the field name ``max_new_tokens``).
#:
#: Sampling is switched by ``temperature`` alone: ``> 0`` samples at that temperature, ``0``
#: is greedy, absent keeps the decoder's setting (greedy by default). ``top_p`` (like ``top_k``)
#: only shapes sampling and never turns it on: ``top_p=0.9`` without a temperature is greedy
#: decoding, exactly as ``dec.generate(q, ps, top_p=0.9)`` and transformers' ``generate``.
#: The same on every surface (decoder, LangChain, LlamaIndex, the server).
OPENAI_PARAMS: Dict[str, Callable[[Any], Dict[str, Any]]] = {
    "max_completion_tokens": _to("max_new_tokens", _checked("max_completion_tokens", "max_new_tokens")),
    "max_tokens": _to("max_new_tokens", _checked("max_tokens", "max_new_tokens")),
    "temperature": _temperature,
    "top_p": _to("top_p", _checked("top_p", "top_p")),
    "seed": _to("seed", _checked("seed", "seed")),
    "stop": _to("stop", _stop_list),
    "frequency_penalty": _to("frequency_penalty", _checked("frequency_penalty", "frequency_penalty")),  # nbce_rag.decoding.sampling
    "presence_penalty": _to("presence_penalty", _checked("presence_penalty", "presence_penalty")),  # nbce_rag.decoding.sampling
}


def openai_options(*layers: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """:class:`NBCEConfig` overrides from OpenAI-style parameters.

    Each layer is a mapping of parameter names (:data:`OPENAI_PARAMS`) and NBCEConfig fields
    (passed as they are; an unknown name is reported by :meth:`NBCEConfig.update`); ``None``
    values are left out (the decoder's default stays). Layers go from the most general (a
    model's settings) to the most specific (one call's keywords): a later layer wins, and a
    later ``temperature=0`` also drops an earlier layer's temperature. Within a layer a
    mapped parameter wins over a field it sets (``temperature`` over ``do_sample``).
    """
    opts: Dict[str, Any] = {}
    for layer in layers:
        given = {k: v for k, v in dict(layer or {}).items() if v is not None}
        out = {k: v for k, v in given.items() if k not in OPENAI_PARAMS}
        for name in reversed(list(OPENAI_PARAMS)):  # the first-listed alias is applied last
            if name in given:
                out.update(OPENAI_PARAMS[name](given[name]))
        if out.get("do_sample") is False:
            opts.pop("temperature", None)
        opts.update(out)
    return opts


# ---------------------------------------------------------------------- numeric options

#: ``(kind, low, high, hint)`` of every numeric option: kind ``"float"`` or ``"int"`` (``"int?"``:
#: ``None`` allowed), the closed range ``[low, high]`` (a float ``low`` given as ``(low,)`` is
#: exclusive), and what to say besides the range. The bounds keep every value meaningful and
#: the decoder's float32 arithmetic finite: ``(β+1)·pooled − β·uncond`` and
#: ``logits / temperature`` cannot overflow, and a seed fits torch's 64-bit generator.
NUMERIC_OPTIONS: Dict[str, Tuple[str, Any, Any, str]] = {
    "beta": ("float", -1.0, 100.0, "0.25 is the reference default; 0 turns the contrast off"),
    "eta": ("float", 0.0, 100.0, "0.1 is the reference default"),
    "nbce_top_p": ("float", (0.0,), 1.0, "0.95 is the reference default; 1 turns it off"),
    "temperature": ("float", 1e-6, 100.0, "use do_sample=False for greedy decoding"),
    "top_k": ("int", 0, 2**31 - 1, "0 turns it off"),
    "top_p": ("float", (0.0,), 1.0, "1 turns it off"),
    "max_new_tokens": ("int", 1, 2**20, ""),
    "seed": ("int?", 0, 2**64 - 1, "None draws a fresh seed"),
    "batch_rows": ("int", 1, 2**20, ""),
    "decode_rows": ("int", 1, 2**20, ""),
    "max_passage_tokens": ("int?", 8, 2**24, "None fits the model's window"),
    "window_overlap": ("int", 0, 2**24, ""),
    "min_p": ("float", 0.0, 1.0, "0 turns it off"),
    "repetition_penalty": ("float", (0.0,), 100.0, "1.0 turns it off, > 1 penalises"),
    "no_repeat_ngram_size": ("int", 0, 2**20, "0 turns it off"),
    "frequency_penalty": ("float", -2.0, 2.0, "OpenAI's range; 0 turns it off"),
    "presence_penalty": ("float", -2.0, 2.0, "OpenAI's range; 0 turns it off"),
}


def _show(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def check_number(name: str, value: Any, kind: str, low: Any, high: Any, hint: str = "") -> Any:
    """``value`` as an ``int``/``float`` if it is a finite number of ``kind`` within
    ``[low, high]`` (``low`` as a 1-tuple: exclusive), else :class:`ConfigError` (one line, naming
    ``name``, the range and ``hint``). Integral floats (``64.0``) are accepted for ints; bools
    and strings are not numbers here."""
    if kind.endswith("?") and value is None:
        return None
    lo_open = isinstance(low, tuple)
    lo = low[0] if lo_open else low
    integer = kind.startswith("int")
    rng = f"({lo:g}, {high:g}]" if lo_open else (f"[{lo}, {high}]" if integer else f"[{lo:g}, {high:g}]")
    what = "an integer" if integer else "a finite number"
    tail = f"; {hint}" if hint else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be {what} in {rng} (got {type(value).__name__} {_show(value)}){tail}")
    try:
        f = float(value)
    except OverflowError:
        f = math.inf
    if not math.isfinite(f):
        raise ConfigError(f"{name} must be {what} in {rng} (got {_show(value)}){tail}")
    if integer:
        if isinstance(value, numbers.Integral):
            v: Any = int(value)
        elif f.is_integer():
            v = int(f)
        else:
            raise ConfigError(f"{name} must be {what} in {rng} (got {_show(value)}){tail}")
        ok = lo <= v <= high
    else:
        v = f
        ok = (lo < v if lo_open else lo <= v) and v <= high
    if not ok:
        raise ConfigError(f"{name} must be {what} in {rng} (got {_show(value)}){tail}")
    return v


def validate_token_lists(name: str, value, nested: bool) -> Optional[List]:
    """``bad_words_ids`` (``nested``: a list of non-empty lists of token ids) or
    ``suppress_tokens`` (a list of token ids); ``None``/empty = off. Raises ``ValueError``."""
    if value is None:
        return None
    items = list(value) if isinstance(value, (list, tuple)) else None
    if items is None:
        raise ValueError(f"{name} must be a list{' of lists' if nested else ''} of token ids, got {type(value).__name__}")
    if nested:
        for w in items:
            if not isinstance(w, (list, tuple)) or not w or not all(isinstance(t, int) and t >= 0 for t in w):
                raise ValueError(f"{name} must be a list of non-empty lists of token ids (ints >= 0); got {w!r} in it. "
                                 "Token ids of a word: tokenizer(word, add_special_tokens=False).input_ids")
        return [list(w) for w in items]
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in items):
        raise ValueError(f"{name} must be a list of token ids (ints >= 0), got {value!r}")
    return items
