"""dtype="auto" on a CPU (issue 28): bf16 where the CPU has bf16 units (AMX-BF16 / AVX512-BF16),
fp32 elsewhere, $NBCE_RAG_CPU_DTYPE over that, an explicit dtype over everything, through every
surface (API, pipeline, CLI incl. serve, LangChain / LlamaIndex adapters, from_model_id, the
encoder); a bf16 decoder and encoder give finite, sane outputs; the fusion runs in fp32; an index
built with a bf16 encoder stores fp32 vectors and searches with an fp32 one.

The detection is mocked (``runtime.cpu_features``), so these tests mean the same on any CPU.
(tests/conftest.py pins ``NBCE_RAG_CPU_DTYPE=fp32`` for the rest of the suite; the tests here set
it themselves.) Cached vs uncached exactness in bf16: tests/test_kvcache.py runs in both dtypes."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from nbce_rag import runtime
from nbce_rag.errors import ConfigError, ModelLoadError
from nbce_rag.models import resolve_dtype, resolve_encoder_dtype

from conftest import DOCS, make_tiny_encoder, make_tiny_llama, save_tiny_llama

CPU = torch.device("cpu")
PASSAGES = ["The Eiffel Tower is in Paris and was completed in 1889.", "Mount Everest is the highest mountain above sea level.",
            "Bananas are rich in potassium and grow in tropical climates."]


@pytest.fixture
def bf16_cpu(monkeypatch):
    """A CPU with AMX, ``NBCE_RAG_CPU_DTYPE`` unset: ``auto`` must mean bf16."""
    monkeypatch.delenv(runtime.CPU_DTYPE_ENV, raising=False)
    monkeypatch.setattr(runtime, "cpu_features", lambda: frozenset({"amx_bf16"}))


@pytest.fixture
def plain_cpu(monkeypatch):
    """A CPU without bf16 units, ``NBCE_RAG_CPU_DTYPE`` unset: ``auto`` must mean fp32."""
    monkeypatch.delenv(runtime.CPU_DTYPE_ENV, raising=False)
    monkeypatch.setattr(runtime, "cpu_features", lambda: frozenset({"avx2", "avx512f"}))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_chat_tokenizer):
    root = tmp_path_factory.mktemp("dtype_model")
    return save_tiny_llama(root, tiny_chat_tokenizer, seed=1)


@pytest.fixture(scope="module")
def enc_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("dtype_enc")
    make_tiny_encoder(root, seed=0)
    return root / "model"


def lm_dtype(obj):
    return next(obj.model.parameters()).dtype


# ------------------------------------------------------------------ resolution
@pytest.mark.parametrize("features, want", [({"amx_bf16"}, "bfloat16"), ({"avx512_bf16"}, "bfloat16"),
                                            ({"amx_bf16", "avx512_bf16"}, "bfloat16"), ({"avx512f", "avx2"}, "float32"),
                                            (set(), "float32")])
def test_auto_follows_the_bf16_units(features, want):
    name, why = runtime.cpu_auto_dtype(features=features, env={})
    assert name == want
    assert ("AMX-BF16" in why or "AVX512-BF16" in why) if want == "bfloat16" else "no bf16 units" in why


@pytest.mark.parametrize("value, want", [("fp32", "float32"), ("float32", "float32"), ("bf16", "bfloat16"),
                                         ("BF16", "bfloat16"), ("auto", None), ("", None)])
def test_environment_overrides_the_detection(value, want):
    for features in ({"amx_bf16"}, set()):
        name, why = runtime.cpu_auto_dtype(features=features, env={runtime.CPU_DTYPE_ENV: value})
        detected = "bfloat16" if features else "float32"
        assert name == (want or detected)
        assert (runtime.CPU_DTYPE_ENV in why) == (want is not None)


def test_bad_environment_value_says_what_to_do():
    with pytest.raises(ConfigError, match="fp32, bf16 or auto"):
        runtime.cpu_auto_dtype(features=set(), env={runtime.CPU_DTYPE_ENV: "int8"})


def test_detection_reads_torch_and_cpuinfo():
    """On this machine: the real detection agrees with torch's own probe."""
    feats = runtime.cpu_features()
    assert isinstance(feats, frozenset) and feats <= set(runtime.BF16_FEATURES)
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if probe is not None and probe():
        assert "avx512_bf16" in feats


def test_resolve_dtype_on_cpu(bf16_cpu, caplog):
    runtime._logged_choices.clear()
    with caplog.at_level(logging.INFO, logger="nbce_rag.runtime"):
        assert resolve_dtype(None, CPU) is torch.bfloat16
        assert resolve_dtype("auto", CPU) is torch.bfloat16
    lines = [r.message for r in caplog.records if "bfloat16" in r.message]
    assert len(lines) == 1 and "AMX-BF16" in lines[0]  # one line says which and why
    for given, want in (("float32", torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16),
                        ("float16", torch.float16), (torch.float32, torch.float32)):
        assert resolve_dtype(given, CPU) is want
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        resolve_dtype("int4", CPU)


def test_resolve_dtype_on_a_cpu_without_bf16(plain_cpu):
    assert resolve_dtype(None, CPU) is torch.float32
    assert resolve_encoder_dtype(None, CPU) is torch.float32
    assert resolve_dtype("bfloat16", CPU) is torch.bfloat16  # asked for: given, even if slow


def test_encoder_auto_is_fp32_even_on_a_bf16_cpu(bf16_cpu):
    # measured: bf16 autocast slows the query encode on the CPU (RESULTS_generation.md §4)
    assert resolve_encoder_dtype(None, torch.device("meta")) is torch.float32
    assert resolve_encoder_dtype(None, CPU) is torch.float32
    assert resolve_encoder_dtype("auto", CPU) is torch.float32
    assert resolve_encoder_dtype("bfloat16", CPU) is torch.bfloat16  # asked for: given


# ------------------------------------------------------------------ every surface
def test_api_and_pipeline(bf16_cpu, model_dir, enc_dir, tmp_path):
    from nbce_rag import CoSENTEncoder, NBCEDecoder, VectorIndex
    from nbce_rag.models import load_model
    from nbce_rag.pipeline import RAGPipeline

    assert lm_dtype(NBCEDecoder.from_pretrained(str(model_dir), device="cpu")) is torch.bfloat16
    assert lm_dtype(NBCEDecoder.from_pretrained(str(model_dir), device="cpu", dtype="float32")) is torch.float32
    assert next(load_model(str(model_dir), device="cpu", dtype="fp32")[0].parameters()).dtype is torch.float32
    enc = CoSENTEncoder.from_pretrained(enc_dir, device="cpu", dtype="float32")
    VectorIndex.build(enc, DOCS).save(tmp_path / "idx")
    rag = RAGPipeline.from_pretrained(tmp_path / "idx", model=str(model_dir), device="cpu", threshold=None)
    assert lm_dtype(rag.decoder) is torch.bfloat16 and rag.index.encoder.dtype is torch.float32  # encoder auto: fp32
    rag = RAGPipeline.from_pretrained(tmp_path / "idx", model=str(model_dir), device="cpu", threshold=None,
                                      encoder_dtype="bfloat16")
    assert rag.index.encoder.dtype is torch.bfloat16
    rag = RAGPipeline.from_pretrained(tmp_path / "idx", model=str(model_dir), device="cpu", threshold=None,
                                      dtype="float32", encoder_dtype="float32")
    assert lm_dtype(rag.decoder) is torch.float32 and rag.index.encoder.dtype is torch.float32


def test_environment_pins_fp32_everywhere(monkeypatch, model_dir, enc_dir):
    from nbce_rag import CoSENTEncoder, NBCEDecoder

    monkeypatch.setattr(runtime, "cpu_features", lambda: frozenset({"amx_bf16"}))
    monkeypatch.setenv(runtime.CPU_DTYPE_ENV, "fp32")
    assert lm_dtype(NBCEDecoder.from_pretrained(str(model_dir), device="cpu")) is torch.float32
    assert CoSENTEncoder.from_pretrained(enc_dir, device="cpu").dtype is torch.float32
    assert lm_dtype(NBCEDecoder.from_pretrained(str(model_dir), device="cpu", dtype="bf16")) is torch.bfloat16


class _Loads:
    """Records the dtype of every decoder NBCEDecoder.from_pretrained loads (the real loader)."""

    def __init__(self, monkeypatch):
        from nbce_rag import NBCEDecoder

        self.dtypes = []
        real = NBCEDecoder.from_pretrained.__func__

        def spy(cls, *a, **kw):
            dec = real(cls, *a, **kw)
            self.dtypes.append(lm_dtype(dec))
            return dec

        monkeypatch.setattr(NBCEDecoder, "from_pretrained", classmethod(spy))


@pytest.mark.parametrize("flag, want", [(None, torch.bfloat16), ("float32", torch.float32), ("auto", torch.bfloat16)])
def test_cli_generate_ask_and_serve(bf16_cpu, monkeypatch, model_dir, enc_dir, tmp_path, capsys, flag, want):
    import uvicorn

    from nbce_rag.cli import main

    loads = _Loads(monkeypatch)
    opt = [] if flag is None else ["--dtype", flag]
    enc_opt = [] if flag is None else ["--encoder-dtype", flag]
    assert main(["generate", "--model", str(model_dir), "--device", "cpu", "-q", "When?", "-p", PASSAGES[0],
                 "--max-new-tokens", "2", *opt]) == 0
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("\n\n".join(DOCS), encoding="utf-8")
    assert main(["index", str(tmp_path / "docs"), "--out", str(tmp_path / "idx"), "--encoder", str(enc_dir),
                 "--no-progress", *enc_opt]) == 0
    assert main(["ask", "-q", "Who built the tower?", "--index", str(tmp_path / "idx"), "--model", str(model_dir),
                 "--device", "cpu", "--max-new-tokens", "2", "--no-filter", *opt, *enc_opt]) == 0
    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    assert main(["serve", "--index", str(tmp_path / "idx"), "--model", str(model_dir), "--device", "cpu",
                 "--no-filter", *opt, *enc_opt]) == 0
    capsys.readouterr()
    assert loads.dtypes == [want, want, want] and len(apps) == 1
    # the encoder's auto is fp32 (bf16 measured slower for queries); --encoder-dtype is honoured
    assert apps[0].state.nbce.pipeline.index.encoder.dtype is (torch.float32 if flag in (None, "auto") else want)


def test_cli_rejects_a_bad_dtype_before_loading(model_dir, capsys):
    from nbce_rag.cli import main

    assert main(["generate", "--model", str(model_dir), "-q", "x", "-p", "y", "--dtype", "int4"]) != 0
    assert "unknown dtype" in capsys.readouterr().err


def test_langchain_and_llama_index_adapters(bf16_cpu, model_dir, enc_dir):
    pytest.importorskip("langchain_core")
    pytest.importorskip("llama_index.core")
    from nbce_rag.integrations.langchain import ChatNBCE, CoSENTEmbeddings, NBCELLM as LCNBCELLM
    from nbce_rag.integrations.llama_index import CoSENTEmbedding, NBCELLM

    def loaded(llm):
        llm.invoke("Hi") if hasattr(llm, "invoke") else llm.complete("Hi")
        return lm_dtype(llm._rag.decoder)

    opts = {"max_new_tokens": 1}
    assert loaded(ChatNBCE(model=str(model_dir), device="cpu", nbce_options=opts)) is torch.bfloat16
    assert loaded(ChatNBCE(model=str(model_dir), device="cpu", dtype="float32", nbce_options=opts)) is torch.float32
    assert loaded(ChatNBCE.from_model_id(str(model_dir), device=-1, dtype="float32", nbce_options=opts)) is torch.float32
    assert loaded(LCNBCELLM.from_model_id(str(model_dir), device=-1, dtype="float32", nbce_options=opts)) is torch.float32
    assert loaded(NBCELLM(model=str(model_dir), device="cpu", nbce_options=opts)) is torch.bfloat16
    assert loaded(NBCELLM.from_model_id(str(model_dir), device="cpu", dtype="float32", nbce_options=opts)) is torch.float32
    assert CoSENTEmbeddings(model=str(enc_dir), device="cpu").get_encoder().dtype is torch.float32
    assert CoSENTEmbeddings(model=str(enc_dir), device="cpu", dtype="bf16").get_encoder().dtype is torch.bfloat16
    assert CoSENTEmbedding(model_name=str(enc_dir), device="cpu", dtype="bfloat16").encoder.dtype is torch.bfloat16
    assert CoSENTEmbedding(model_name=str(enc_dir), device="cpu").encoder.dtype is torch.float32


# ------------------------------------------------------------------ bf16 numerics
def test_bf16_decoder_is_finite_sane_and_fuses_in_fp32(tiny_chat_tokenizer, monkeypatch):
    from nbce_rag import NBCEDecoder
    from nbce_rag.decoding import decoder as decoder_mod

    model = make_tiny_llama(len(tiny_chat_tokenizer), seed=1)
    f32 = NBCEDecoder(model, tiny_chat_tokenizer, scorer=None)
    b16 = NBCEDecoder(make_tiny_llama(len(tiny_chat_tokenizer), seed=1).to(torch.bfloat16), tiny_chat_tokenizer, scorer=None)
    seen = []
    real = decoder_mod.nbce_step

    def spy(logits, **kw):
        seen.append(logits.dtype)
        assert torch.isfinite(logits).any(dim=-1).all()
        return real(logits, **kw)

    monkeypatch.setattr(decoder_mod, "nbce_step", spy)
    agree = 0
    for q in ("When was it completed?", "How high is the mountain?", "Who designed the tower?"):
        a, b = f32.generate(q, PASSAGES, max_new_tokens=6), b16.generate(q, PASSAGES, max_new_tokens=6)
        assert len(b.token_ids) > 0 and all(0 <= t < len(tiny_chat_tokenizer) for t in b.token_ids)
        assert abs(sum(s.share for s in b.sources) - 1.0) < 1e-6
        assert all(np.isfinite(s.weight_initial) and np.isfinite(s.weight_final) for s in b.sources)
        agree += a.token_ids[0] == b.token_ids[0]
    assert seen and set(seen) == {torch.float32}  # the pooling and fusion see fp32 log-probs
    assert agree >= 2  # bf16 rounding may flip a near tie, not the model's mind


def test_bf16_encoder_vectors(enc_dir):
    from nbce_rag import CoSENTEncoder

    f32 = CoSENTEncoder.from_pretrained(enc_dir, device="cpu", dtype="float32")
    b16 = CoSENTEncoder.from_pretrained(enc_dir, device="cpu", dtype="bfloat16")
    a, b = f32.encode(DOCS), b16.encode(DOCS)
    assert b.dtype == np.float32 and np.isfinite(b).all()
    assert np.abs(np.linalg.norm(b, axis=1) - 1).max() < 1e-4  # normalised in fp32
    assert np.abs(a - b).max() > 0  # really computed in bf16
    assert (a * b).sum(1).min() > 0.99
    assert f32.identity == b16.identity  # same weights: the compute dtype is not part of it
    assert next(b16.model.parameters()).dtype is torch.float32


def test_index_built_in_bf16_loads_and_searches_in_fp32(enc_dir, tmp_path):
    from nbce_rag import CoSENTEncoder, VectorIndex

    b16 = CoSENTEncoder.from_pretrained(enc_dir, device="cpu", dtype="bfloat16")
    f32 = CoSENTEncoder.from_pretrained(enc_dir, device="cpu", dtype="float32")
    VectorIndex.build(b16, DOCS).save(tmp_path / "b16")
    VectorIndex.build(f32, DOCS).save(tmp_path / "f32")
    stored = next((tmp_path / "b16").glob("*.npy"))
    assert np.load(stored).dtype == np.float32
    idx = VectorIndex.load(tmp_path / "b16", f32)
    ref = VectorIndex.load(tmp_path / "f32", f32)
    for q in DOCS:  # each document is its own nearest neighbour, in either index
        got, want = idx.search(q, k=2), ref.search(q, k=2)
        assert got[0].text == want[0].text == q
        assert abs(got[0].score - want[0].score) < 0.02
