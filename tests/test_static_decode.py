"""The static-cache decode path (nbce_rag/decoding/static_decode.py): the same tokens as the default
dynamic-cache path in fp32, eagerly on the CPU; under torch.compile on CUDA (skipped without
a GPU) and on the CPU where inductor works (slow)."""

from __future__ import annotations

import pytest
import torch

from nbce_rag import ConfigError, NBCEConfig
from nbce_rag.decoding.static_decode import LENGTH_BUCKET, ROW_BUCKET, wants_compile

from test_decoder import PASSAGES

Q = "When was it completed?"


@pytest.mark.parametrize("pooling", ["min_entropy", "replug", "mean"])
def test_static_cache_gives_the_same_tokens_as_the_dynamic_path(tiny_decoder, pooling):
    ref = tiny_decoder.generate(Q, PASSAGES, max_new_tokens=16, pooling=pooling)
    got = tiny_decoder.generate(Q, PASSAGES, max_new_tokens=16, pooling=pooling, compile="static")
    assert got.token_ids == ref.token_ids and got.token_sources == ref.token_sources
    assert len(ref.token_ids) > 0


def test_static_cache_with_one_row_sampling_and_processors(tiny_decoder):
    for opts in ({}, {"do_sample": True, "seed": 5, "temperature": 1.5}, {"no_repeat_ngram_size": 2, "repetition_penalty": 1.3}):
        ref = tiny_decoder.generate(Q, [], max_new_tokens=12, **opts)
        assert tiny_decoder.generate(Q, [], max_new_tokens=12, compile="static", **opts).token_ids == ref.token_ids
        ref = tiny_decoder.generate(Q, PASSAGES, max_new_tokens=12, **opts)
        assert tiny_decoder.generate(Q, PASSAGES, max_new_tokens=12, compile="static", **opts).token_ids == ref.token_ids


def test_buckets_and_fallback(tiny_decoder, caplog):
    from nbce_rag.decoding.static_decode import StaticStepper

    cfg = tiny_decoder.config.update(max_new_tokens=5)
    prep = tiny_decoder._prepare(Q, tiny_decoder._check_passages(PASSAGES), cfg)
    groups, _, inverse = tiny_decoder._prefill_rows(prep, cfg)
    st = StaticStepper(tiny_decoder, groups[0], inverse, 5)
    assert st.rows % ROW_BUCKET == 0 and st.rows >= len(prep.rows)
    assert st.length % LENGTH_BUCKET == 0 and st.length >= groups[0].mask.shape[1] + 5
    # several decode groups cannot share one static cache: the dynamic path, said in the log
    import logging

    with caplog.at_level(logging.INFO, logger="nbce_rag.decoding.static_decode"):
        ref = tiny_decoder.generate(Q, PASSAGES, max_new_tokens=8, batch_rows=2, decode_rows=2)
        got = tiny_decoder.generate(Q, PASSAGES, max_new_tokens=8, batch_rows=2, decode_rows=2, compile="static")
    assert got.token_ids == ref.token_ids and "decoding eagerly" in caplog.text


def test_compile_option_values():
    assert wants_compile("auto", torch.device("cpu")) is False
    assert wants_compile("auto", torch.device("cuda")) is True
    assert wants_compile(False, torch.device("cuda")) is False and wants_compile(True, torch.device("cpu")) is True
    with pytest.raises(ConfigError, match="compile must be"):
        NBCEConfig().update(compile="yes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_path_equals_eager_on_cuda(tiny_tokenizer):
    from conftest import make_tiny_llama

    from nbce_rag import NBCEDecoder

    dec = NBCEDecoder(make_tiny_llama(len(tiny_tokenizer)).to("cuda"), tiny_tokenizer)
    for pooling in ("min_entropy", "replug"):
        ref = dec.generate(Q, PASSAGES, max_new_tokens=16, pooling=pooling)
        for _ in range(2):  # the second run replays the captured graph
            got = dec.generate(Q, PASSAGES, max_new_tokens=16, pooling=pooling, compile=True)
            assert got.token_ids == ref.token_ids and got.token_sources == ref.token_sources


def _no_cpu_compiler() -> str | None:
    """Why inductor cannot build CPU kernels here (torch finds no C++ compiler), or None.

    This is the one expected reason for ``compile=True`` to fail on the CPU; any other failure
    is a bug and must fail the test below."""
    from torch._inductor import exc
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except exc.InvalidCxxCompiler as e:
        return f"torch finds no C++ compiler for inductor on the CPU: {e}"
    return None


@pytest.mark.slow
def test_compiled_path_equals_eager_on_cpu(tiny_decoder):
    """torch.compile on the CPU (inductor; no CUDA graphs there): the same tokens."""
    reason = _no_cpu_compiler()
    if reason:  # pragma: no cover - a machine without a C++ toolchain
        pytest.skip(reason)
    ref = tiny_decoder.generate(Q, PASSAGES, max_new_tokens=8)
    got = tiny_decoder.generate(Q, PASSAGES, max_new_tokens=8, compile=True)
    assert got.token_ids == ref.token_ids and got.token_sources == ref.token_sources
