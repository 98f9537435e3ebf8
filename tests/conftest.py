"""Shared fixtures: a tiny random Llama built from a config, with a small BPE tokenizer trained
in memory (no network, no files), and the bundled real model (marked slow)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# dtype="auto" on a CPU with bf16 units (AMX / AVX512-BF16) means bf16 (issue 28); the suite pins
# fp32 so that its exact-token checks keep their meaning on every machine. The bf16 tests ask for
# bf16 explicitly (tests/test_dtype.py, the bf16 half of tests/test_kvcache.py).
os.environ.setdefault("NBCE_RAG_CPU_DTYPE", "fp32")

_CORPUS = [
    "The Eiffel Tower is in Paris and was completed in 1889.",
    "Mount Everest is the highest mountain above sea level.",
    "Bananas are rich in potassium and grow in tropical climates.",
    "The river Thames flows through London into the North Sea.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "Who designed the tower? When was it completed? How high is the mountain?",
    "Question: answer briefly. Passage: context. The answer is yes or no.",
    "Ünïcödé, naïve café, 東京 and emoji 🙂 appear in some passages.",
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(chat: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<eos>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tk.train_from_iterator(_CORPUS * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")  # deliberately no pad token
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def make_tiny_llama(vocab_size: int, seed: int = 0, max_positions: int = 512):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        initializer_range=0.2,  # sharper next-token distributions than the default 0.02
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer(chat=False)


@pytest.fixture(scope="session")
def tiny_chat_tokenizer():
    return make_tokenizer(chat=True)


@pytest.fixture(scope="session")
def tiny_decoder(tiny_tokenizer):
    from nbce_rag import NBCEDecoder

    # scorer=None: the unit tests check the decoding mechanics on unscored passages (as before
    # scorers); tests/test_scoring.py sets scorers explicitly
    return NBCEDecoder(make_tiny_llama(len(tiny_tokenizer)), tiny_tokenizer, scorer=None)


@pytest.fixture(scope="session")
def tiny_chat_decoder(tiny_chat_tokenizer):
    from nbce_rag import NBCEDecoder

    return NBCEDecoder(make_tiny_llama(len(tiny_chat_tokenizer), seed=1), tiny_chat_tokenizer, scorer=None)


@pytest.fixture(scope="session")
def bundled_decoder():
    """The real bundled SmolLM2-135M-Instruct (first use converts the GGUF once, ~45 s)."""
    from nbce_rag import NBCEDecoder
    from nbce_rag.errors import ModelLoadError

    try:
        return NBCEDecoder.from_pretrained(device="cpu")
    except ModelLoadError as e:  # pragma: no cover - the install script always installs it
        pytest.fail(f"bundled model unavailable: {e}")


# ------------------------------------------------------------------ a small corpus for the RAG tests
#: shared by the pipeline, LangChain, LlamaIndex and pgvector tests (same inputs -> same answers)
DOCS = [
    "The Eiffel Tower is in Paris and was completed in 1889.",
    "Gustave Eiffel's company designed and built the tower for the World's Fair.",
    "Mount Everest is the highest mountain above sea level.",
    "Bananas are rich in potassium and grow in tropical climates.",
    "The river Thames flows through London into the North Sea.",
    "Water boils at one hundred degrees Celsius at sea level.",
]
Q = "Who built the Eiffel Tower in Paris?"
Q_NONE = "How many legs does a spider have?"  # nothing relevant: the filter keeps nothing
N = 8  # max_new_tokens in the fast tests


@pytest.fixture(scope="session")
def encoder():
    """The bundled all-MiniLM-L6-v2 encoder, loaded once per session (read-only in tests)."""
    from nbce_rag import CoSENTEncoder

    return CoSENTEncoder.from_pretrained()


# ------------------------------------------------------------------ a tiny CoSENT encoder


def save_tiny_llama(path, tokenizer, seed: int = 0):
    """A tiny random Llama for ``tokenizer`` (:func:`make_tiny_llama`) saved with it in ``path``,
    as ``--model`` / ``from_pretrained`` load a model folder; returns ``path``."""
    make_tiny_llama(len(tokenizer), seed=seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_tiny_encoder(
    path,
    *,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    max_seq_length: int = 256,
    seed: int = 0,
):
    """A tiny randomly initialised BERT encoder (mean pooling + normalise) with the bundled
    encoder's WordPiece tokenizer, saved at ``path``. For tests: loads and trains in seconds."""
    import shutil
    from pathlib import Path

    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize, Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = Path(path)
    raw = path / "_bert"
    torch.manual_seed(seed)
    from nbce_rag.retrieval.encoder import CoSENTEncoder, bundled_model_path

    tok = AutoTokenizer.from_pretrained(bundled_model_path(), local_files_only=True)
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 2,
        max_position_embeddings=max(max_seq_length, 128),
    )
    BertModel(cfg).save_pretrained(raw)
    tok.save_pretrained(raw)
    tr = Transformer(str(raw), max_seq_length=max_seq_length)
    st = SentenceTransformer(modules=[tr, Pooling(hidden, "mean"), Normalize()], device="cpu")
    enc = CoSENTEncoder(st, name="tiny-random-bert")
    enc.save_pretrained(path / "model")
    shutil.rmtree(raw, ignore_errors=True)
    return CoSENTEncoder.from_pretrained(path / "model", device="cpu")
