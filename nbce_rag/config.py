"""Decoding options, in the style of transformers' ``GenerationConfig``, and the one mapping
from OpenAI-style request parameters to them (:data:`OPENAI_PARAMS`, :func:`openai_options`,
:meth:`NBCEConfig.from_openai_params`), used by the LangChain and LlamaIndex models and the
server alike."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable, Dict, List, Mapping, Optional

from .errors import ConfigError

DEFAULT_PROMPT_TEMPLATE = "{passage}\n\nAnswer briefly: {question}"


@dataclass
class NBCEConfig:
    """Options of :class:`~nbce_rag.NBCEDecoder`. Every field can be overridden per call
    (``dec.generate(q, passages, beta=0.5, pooling="mean")``).

    NBCE (defaults from the reference implementation, ``bojone/NBCE``):
        beta: weight of the contrast against the no-passage row,
            ``(β+1)·pooled − β·uncond``. 0 disables it; larger pushes answers to the passages.
        eta: entropy bonus of the passage chosen at the previous step (stickiness).
        nbce_top_p: per-row nucleus truncation applied before entropy and pooling.
        pooling: ``"auto"`` (default: ``"posterior:product,online"``, a mixture whose weights
            start at softmax(score/0.1 + log p(question | passage)) and follow each generated
            token, when every passage has a score, which the decoder's scorer gives unscored
            passages; the reference ``"min_entropy"`` when none has, i.e. with ``scorer=None``),
            ``"min_entropy"``, ``"mean"``, ``"max"``, ``"replug"``, ``"scored_entropy"`` (ours:
            min-entropy selection that also weighs the retrieval score), ``"posterior"`` /
            ``"posterior:<scores|question|product|uniform>[,online|,static]"``, or a
            :class:`~nbce_rag.nbce.Pooling` instance. Chosen by benchmarks/bench_quality.py
            (SQuAD, HotpotQA, NQ; see the README's quality tables).

    Sampling (applied to the fused distribution):
        do_sample: False = greedy. temperature, top_k (0 = off), top_p (1.0 = off), seed.

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
    stop: List[str] = field(default_factory=list)
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE  # chosen on SQuAD: 8/10 vs 5/10 for "{passage}\n\n{question}"
    use_chat_template: bool = True
    system_prompt: Optional[str] = None
    batch_rows: int = 16
    decode_rows: int = 256
    max_passage_tokens: Optional[int] = None
    window_overlap: int = 32

    def validate(self) -> "NBCEConfig":
        def bad(msg: str) -> ConfigError:
            return ConfigError(msg)

        if self.beta < -1:
            raise bad(f"beta must be >= -1 (got {self.beta}); 0.25 is the reference default")
        if self.eta < 0:
            raise bad(f"eta must be >= 0 (got {self.eta})")
        if not 0 < self.nbce_top_p <= 1:
            raise bad(f"nbce_top_p must be in (0, 1] (got {self.nbce_top_p})")
        if not 0 < self.top_p <= 1:
            raise bad(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.temperature <= 0:
            raise bad(f"temperature must be > 0 (got {self.temperature}); use do_sample=False for greedy")
        if self.top_k < 0:
            raise bad(f"top_k must be >= 0 (got {self.top_k})")
        if self.max_new_tokens < 1:
            raise bad(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if self.batch_rows < 1:
            raise bad(f"batch_rows must be >= 1 (got {self.batch_rows})")
        if self.decode_rows < 1:
            raise bad(f"decode_rows must be >= 1 (got {self.decode_rows})")
        if self.max_passage_tokens is not None and self.max_passage_tokens < 8:
            raise bad(f"max_passage_tokens must be >= 8 or None (got {self.max_passage_tokens})")
        if self.window_overlap < 0:
            raise bad(f"window_overlap must be >= 0 (got {self.window_overlap})")
        if "{question}" not in self.prompt_template or "{passage}" not in self.prompt_template:
            raise bad("prompt_template must contain both {passage} and {question}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop must be a list of non-empty strings")
        from .nbce import get_pooling

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
        overrides = {k: v for k, v in overrides.items() if v is not None or k in ("seed", "max_passage_tokens", "system_prompt")}
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


def _temperature(v: Any) -> Dict[str, Any]:
    t = float(v)
    if t < 0:
        raise ConfigError(f"temperature must be >= 0 (got {t}); 0 means greedy decoding")
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
    "max_completion_tokens": _to("max_new_tokens", int),
    "max_tokens": _to("max_new_tokens", int),
    "temperature": _temperature,
    "top_p": _to("top_p", float),
    "seed": _to("seed", int),
    "stop": _to("stop", _stop_list),
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
