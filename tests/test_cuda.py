"""The CUDA path: the same decoder on a GPU. Skipped where no CUDA device is present (CI has
none); run on a GPU machine with ``python -m pytest -q tests/test_cuda.py``.

fp32 on the GPU must give the CPU's tokens exactly (greedy, same math); bf16, the GPU
default, must run end to end and keep the row bookkeeping intact."""

from __future__ import annotations

import copy

import pytest
import torch

from nbce_rag import NBCEDecoder, models

from test_decoder import EIFFEL_PS, EIFFEL_Q, PASSAGES, assert_equals_reference, reference_generate

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

Q = "When was it completed?"


@pytest.fixture(scope="module")
def cuda_decoder(tiny_decoder):
    return NBCEDecoder(copy.deepcopy(tiny_decoder.model).to("cuda"), tiny_decoder.tokenizer, scorer=None)


def test_auto_device_and_dtype_on_cuda():
    dev = models.resolve_device("auto")
    assert dev.type == "cuda"
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert models.resolve_dtype(None, dev) == expected


@pytest.mark.parametrize("pooling", ["min_entropy", "mean", "replug", "scored_entropy"])
def test_cuda_equals_cpu_and_the_unbatched_reference(tiny_decoder, cuda_decoder, pooling):
    gpu = cuda_decoder.generate(Q, PASSAGES, max_new_tokens=12, pooling=pooling)
    cpu = tiny_decoder.generate(Q, PASSAGES, max_new_tokens=12, pooling=pooling)
    ref_ids, ref_src = reference_generate(cuda_decoder, Q, PASSAGES, 12, pooling=pooling)
    assert gpu.token_ids == cpu.token_ids == ref_ids
    assert gpu.token_sources == cpu.token_sources == ref_src
    assert len(gpu.token_ids) > 0


def test_cuda_micro_batching_does_not_change_a_token(cuda_decoder):
    many = [f"Note {i}. {p}" for i in range(3) for p in PASSAGES]
    full = cuda_decoder.generate("How high is the mountain?", many, max_new_tokens=10, batch_rows=64)
    for rows in (1, 4):
        part = cuda_decoder.generate("How high is the mountain?", many, max_new_tokens=10, batch_rows=rows)
        assert part.token_ids == full.token_ids
        assert part.token_sources == full.token_sources


def test_cuda_stream_equals_generate(cuda_decoder):
    ans = cuda_decoder.generate(Q, PASSAGES, max_new_tokens=12)
    assert "".join(e.text for e in cuda_decoder.stream(Q, PASSAGES, max_new_tokens=12)) == ans.text


def test_bf16_runs_end_to_end(tiny_decoder):
    dec = NBCEDecoder(copy.deepcopy(tiny_decoder.model).to("cuda", torch.bfloat16), tiny_decoder.tokenizer, scorer=None)
    ans = dec.generate(Q, PASSAGES, max_new_tokens=12)
    assert len(ans.token_ids) == len(ans.token_sources) > 0
    assert set(ans.token_sources) <= {-1, 0, 1, 2, 3}
    assert sum(s.n_tokens for s in ans.sources) + ans.token_sources.count(-1) == len(ans.token_ids)


@pytest.mark.slow
def test_bundled_model_on_cuda_equals_reference():
    dec = NBCEDecoder.from_pretrained(device="cuda", dtype="float32")
    assert dec.device.type == "cuda"
    ans = assert_equals_reference(dec, EIFFEL_Q, EIFFEL_PS, 12)
    assert "1889" in ans.text  # digits are single tokens: 10 tokens stop at "... completed in 18"


@pytest.mark.slow
def test_bundled_model_bf16_default_answers():
    dec = NBCEDecoder.from_pretrained(device="cuda")
    assert next(dec.model.parameters()).dtype in (torch.bfloat16, torch.float16)
    ans = dec.generate("How high is Mount Everest?", ["Mount Everest is 8,849 metres high.", "Bananas are yellow."],
                       max_new_tokens=16)
    assert "8,849" in ans.text or "8849" in ans.text
    assert ans.sources[0].n_tokens > ans.sources[1].n_tokens
