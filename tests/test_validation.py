"""One validation of numbers: every numeric NBCEConfig option and every passage score is a
finite number in a documented range, or a clear one-line error, whichever way it arrives
(NBCEConfig, per-call options of the decoder, Passage, dicts given as passages)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nbce_rag.config import NUMERIC_OPTIONS, NBCEConfig
from nbce_rag.errors import ConfigError
from nbce_rag.types import SCORE_LIMIT, Passage, as_passage

BAD_NUMBERS = [math.nan, math.inf, -math.inf, 1e308, -1e308, 10**400, "0.5", True, [1]]


def _spec_bounds(name):
    kind, low, high, _ = NUMERIC_OPTIONS[name]
    lo = low[0] if isinstance(low, tuple) else low
    return kind, lo, isinstance(low, tuple), high


def test_every_numeric_field_has_a_range():
    numeric = {"beta", "eta", "nbce_top_p", "max_new_tokens", "temperature", "top_k", "top_p", "seed",
               "batch_rows", "decode_rows", "max_passage_tokens", "window_overlap"}
    assert numeric <= set(NUMERIC_OPTIONS)
    for name in NUMERIC_OPTIONS:
        assert hasattr(NBCEConfig(), name)


@pytest.mark.parametrize("name", sorted(NUMERIC_OPTIONS))
@pytest.mark.parametrize("value", BAD_NUMBERS, ids=repr)
def test_non_finite_huge_or_non_numeric_values_are_refused(name, value):
    with pytest.raises(ConfigError) as e:
        NBCEConfig().update(**{name: value})
    msg = str(e.value)
    assert msg.startswith(f"{name} must be ") and "\n" not in msg and len(msg) < 200
    with pytest.raises(ConfigError):
        NBCEConfig(**{name: value}).validate()


@pytest.mark.parametrize("name", sorted(NUMERIC_OPTIONS))
def test_range_edges(name):
    kind, lo, lo_open, high = _spec_bounds(name)
    integer = kind.startswith("int")
    # the bounds themselves are accepted (an open low bound is not), just outside is refused
    if not lo_open:
        assert getattr(NBCEConfig().update(**{name: lo}), name) == lo
    else:
        with pytest.raises(ConfigError):
            NBCEConfig().update(**{name: lo})
    cfg = NBCEConfig().update(**{name: high})
    assert getattr(cfg, name) == high and type(getattr(cfg, name)) is (int if integer else float)
    step = 1 if integer else max(abs(high), 1.0) * 1e-6
    with pytest.raises(ConfigError, match=name):
        NBCEConfig().update(**{name: high + step})
    if not lo_open:
        step = 1 if integer else max(abs(lo), 1.0) * 1e-6
        with pytest.raises(ConfigError, match=name):
            NBCEConfig().update(**{name: lo - step})
    if integer:
        with pytest.raises(ConfigError, match="integer"):
            NBCEConfig().update(**{name: lo + 0.5})
        exact = min(high, 2**53)  # floats above 2**53 are not exact integers
        assert getattr(NBCEConfig().update(**{name: float(exact)}), name) == exact  # 64.0 from JSON
        assert type(getattr(NBCEConfig().update(**{name: np.int64(lo + 1)}), name)) is int


def test_issue_examples():
    with pytest.raises(ConfigError, match=r"beta must be a finite number in \[-1, 100\] \(got nan\)"):
        NBCEConfig(beta=float("nan")).validate()
    with pytest.raises(ConfigError, match=r"beta .*got 1e\+308"):
        NBCEConfig().update(beta=1e308)
    with pytest.raises(ConfigError, match=r"seed must be an integer in \[0, 18446744073709551615\]"):
        NBCEConfig().update(seed=2**70)
    with pytest.raises(ConfigError, match="seed"):
        NBCEConfig().update(seed=99999999999999999999999)
    with pytest.raises(ConfigError, match="temperature"):
        NBCEConfig().update(temperature=float("nan"))
    with pytest.raises(ConfigError, match="do_sample must be true or false"):
        NBCEConfig().update(do_sample="no")
    assert NBCEConfig().update(do_sample=np.bool_(True)).do_sample is True
    assert NBCEConfig().update(beta=np.float32(0.5), seed=None).beta == 0.5


def test_decoder_options_are_validated_before_any_work(tiny_decoder):
    for bad in ({"beta": float("nan")}, {"temperature": float("inf")}, {"seed": 2**64}, {"top_p": 1e308},
                {"eta": -math.inf}, {"max_new_tokens": 1e9}):
        with pytest.raises(ConfigError):
            tiny_decoder.generate("Where is the tower?", ["The Eiffel Tower is in Paris."], **bad)


def test_largest_seed_reaches_torch_without_overflow(tiny_decoder):
    a = tiny_decoder.generate("Where is the tower?", ["The Eiffel Tower is in Paris."], do_sample=True,
                              seed=2**64 - 1, max_new_tokens=3)
    b = tiny_decoder.generate("Where is the tower?", ["The Eiffel Tower is in Paris."], do_sample=True,
                              seed=2**64 - 1, max_new_tokens=3)
    assert a.token_ids == b.token_ids


# ------------------------------------------------------------------ passage scores


@pytest.mark.parametrize("score", [math.nan, math.inf, -math.inf, 1e308, SCORE_LIMIT * 1.01, "high", True, [0.5]],
                         ids=repr)
def test_bad_passage_scores_are_refused_everywhere(score, tiny_decoder):
    with pytest.raises(ValueError, match="passage score"):
        Passage("text", score)
    with pytest.raises(ValueError, match=r"passages\[2\]: a passage score"):
        as_passage({"text": "t", "score": score}, where="passages[2]")

    class Doc:  # LangChain-like: the score in metadata
        page_content = "t"
        metadata = {"score": score}

    with pytest.raises(ValueError, match="passage score"):
        as_passage(Doc())
    with pytest.raises(ValueError, match=r"passages\[1\]"):
        tiny_decoder.generate("Where?", ["ok", {"text": "The tower is in Paris.", "score": score}], max_new_tokens=2)


def test_passage_changed_after_construction_is_checked_again(tiny_decoder):
    p = Passage("The tower is in Paris.", 0.5)
    p.score = float("nan")
    with pytest.raises(ValueError, match=r"passages\[0\]: a passage score must be finite"):
        tiny_decoder.generate("Where?", [p], max_new_tokens=2)


def test_good_scores_are_floats():
    assert Passage("t", np.float32(0.25)).score == 0.25 and type(Passage("t", np.float32(0.25)).score) is float
    assert Passage("t", 3).score == 3.0 and Passage("t").score is None
    assert as_passage({"text": "t", "score": "0.7"}).score == 0.7
    assert Passage("t", -SCORE_LIMIT).score == -SCORE_LIMIT


@pytest.mark.parametrize("param", ["temperature", "max_tokens", "max_completion_tokens", "top_p", "seed"])
@pytest.mark.parametrize("value", [math.nan, math.inf, 1e308, "x"], ids=repr)
def test_openai_parameters_are_checked_and_named(param, value):
    """The server and the adapters map OpenAI parameters through NBCEConfig.from_openai_params."""
    with pytest.raises(ConfigError, match=f"^{param} must be"):
        NBCEConfig.from_openai_params({param: value})
    with pytest.raises(ConfigError, match="beta must be"):
        NBCEConfig.from_openai_params({"beta": math.nan})


def test_non_numeric_options_of_the_wrong_type_are_config_errors():
    for bad in ({"prompt_template": 5}, {"system_prompt": 3}, {"stop": 7}, {"stop": [""]}, {"use_chat_template": "yes"}):
        with pytest.raises(ConfigError):
            NBCEConfig().update(**bad)


def test_config_edited_after_construction_is_checked_on_every_call(tiny_decoder):
    """``dec.config.beta = nan`` by hand is caught by the next call, not decoded into garbage."""
    from nbce_rag import NBCEDecoder

    dec = NBCEDecoder(tiny_decoder.model, tiny_decoder.tokenizer, scorer=None)
    dec.config.beta = float("nan")
    for call in (lambda: dec.generate("Where?", ["The tower is in Paris."], max_new_tokens=2),
                 lambda: list(dec.stream("Where?", ["The tower is in Paris."], max_new_tokens=2))):
        with pytest.raises(ConfigError, match="beta"):
            call()
