"""Token-based chunking: word safety, sizes, overlap, offsets, edge cases, against a reference."""

from __future__ import annotations

import random
import re

import pytest

from nbce_rag.retrieval.chunking import Chunk, chunk_text

WORDS = re.compile(r"\S+")


def _check_word_safe(text: str, chunks: list) -> None:
    for c in chunks:
        assert c.text == text[c.start : c.end]
        assert c.text and not c.text[0].isspace() and not c.text[-1].isspace()
        assert c.start == 0 or text[c.start - 1].isspace(), f"chunk {c.index} starts inside a word"
        assert c.end == len(text) or text[c.end].isspace(), f"chunk {c.index} ends inside a word"


def _reference(text: str, chunk_tokens: int, overlap: int) -> list:
    """Obviously-correct greedy packing, one token per word, no boundary preference."""
    spans = [(m.start(), m.end()) for m in WORDS.finditer(text)]
    out, i = [], 0
    while i < len(spans):
        j = i + 1
        while j < len(spans) and j + 1 - i <= chunk_tokens:
            j += 1
        out.append((spans[i][0], spans[j - 1][1], j - i))
        if j == len(spans):
            break
        k = j
        while k - 1 > i and j - (k - 1) <= overlap:
            k -= 1
        i = k
    return out


@pytest.mark.parametrize("text", ["", "   ", "\n\t \n"])
def test_empty_text_gives_no_chunks(text):
    assert chunk_text(text) == []


def test_short_text_is_one_chunk_without_surrounding_space():
    text = "  Hello   world.\n"
    (c,) = chunk_text(text, chunk_tokens=10, overlap=2)
    assert c == Chunk("Hello   world.", 2, 16, 2, 0, False)


@pytest.mark.parametrize("chunk_tokens,overlap", [(1, 0), (2, 1), (5, 0), (7, 3), (16, 15), (50, 8)])
def test_matches_reference_packing(chunk_tokens, overlap):
    rng = random.Random(chunk_tokens * 100 + overlap)
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 9))) for _ in range(137)]
    seps = [rng.choice([" ", "  ", "\n", "\t", " \n "]) for _ in words]
    text = "".join(w + s for w, s in zip(words, seps))
    chunks = chunk_text(text, None, chunk_tokens=chunk_tokens, overlap=overlap, prefer_boundaries=False)
    assert [(c.start, c.end, c.n_tokens) for c in chunks] == _reference(text, chunk_tokens, overlap)
    assert [c.index for c in chunks] == list(range(len(chunks)))
    _check_word_safe(text, chunks)


def test_overlap_and_coverage():
    text = " ".join(f"w{i}" for i in range(1000))
    chunks = chunk_text(text, None, chunk_tokens=100, overlap=20, prefer_boundaries=False)
    covered = set()
    for a, b in zip(chunks, chunks[1:]):
        shared = len(WORDS.findall(text[b.start : a.end])) if b.start < a.end else 0
        assert shared == 20
        assert b.start > a.start
    for c in chunks:
        assert c.n_tokens <= 100
        covered.update(WORDS.findall(c.text))
    assert covered == set(WORDS.findall(text))


def test_zero_overlap_chunks_are_disjoint():
    text = " ".join(["alpha"] * 95)
    chunks = chunk_text(text, None, chunk_tokens=10, overlap=0)
    assert len(chunks) == 10
    assert all(b.start > a.end for a, b in zip(chunks, chunks[1:]))


def test_oversized_word_is_kept_whole():
    long = "x" * 500
    text = f"one two {long} three"
    chunks = chunk_text(text, len, chunk_tokens=50, overlap=10)  # a token per character
    big = [c for c in chunks if c.oversized]
    assert len(big) == 1 and big[0].text == long
    _check_word_safe(text, chunks)
    assert [c.text for c in chunks] == ["one two", long, "three"]  # no chunk inside another


def test_prefers_sentence_and_paragraph_ends():
    sent = "This sentence has exactly eight words in it."  # 8 words
    text = " ".join([sent] * 10)
    chunks = chunk_text(text, None, chunk_tokens=30, overlap=0)
    assert all(c.text.endswith(".") for c in chunks)
    assert all(c.n_tokens >= 3 * 30 // 4 or c is chunks[-1] for c in chunks)
    para = "a b c d e f g h i j k l m n o p q r s t u v w\n\nx y z " + "k " * 20
    first = chunk_text(para, None, chunk_tokens=26, overlap=0)[0]
    assert first.text.endswith("w")


def test_boundary_preference_never_exceeds_budget_or_stalls():
    rng = random.Random(0)
    text = " ".join(rng.choice(["a.", "b", "c!", "d\n\ne", "f?"]) for _ in range(2000))
    for ct, ov in [(3, 2), (10, 9), (40, 8)]:
        chunks = chunk_text(text, None, chunk_tokens=ct, overlap=ov)
        assert all(c.n_tokens <= ct for c in chunks)
        assert all(b.start > a.start and b.end > a.end for a, b in zip(chunks, chunks[1:]))
        _check_word_safe(text, chunks)
        assert chunks[-1].end == len(text.rstrip())


def test_cjk_characters_count_as_words():
    text = "我爱北京天安门。天安门上太阳升。"
    chunks = chunk_text(text, None, chunk_tokens=6, overlap=1)
    assert len(chunks) > 1 and all(c.n_tokens <= 6 for c in chunks)
    assert all(c.text == text[c.start : c.end] for c in chunks)


def test_invalid_options():
    with pytest.raises(ValueError):
        chunk_text("a b", chunk_tokens=0)
    with pytest.raises(ValueError):
        chunk_text("a b", chunk_tokens=4, overlap=4)
    with pytest.raises(ValueError):
        chunk_text("a b", chunk_tokens=4, overlap=-1)
    with pytest.raises(TypeError):
        chunk_text(None)  # type: ignore[arg-type]


def test_callable_and_slow_tokenizer_interfaces():
    text = "internationalization is long; ok"

    class Slow:  # only .encode, no offsets
        def encode(self, s, add_special_tokens=False):
            return list(s)

    by_len = chunk_text(text, len, chunk_tokens=40, overlap=5)
    by_encode = chunk_text(text, Slow(), chunk_tokens=40, overlap=5)
    assert by_len == by_encode
    assert by_len[0].n_tokens == sum(len(w) for w in text.split())


@pytest.fixture(scope="module")
def wordpiece():
    from transformers import AutoTokenizer

    from nbce_rag.retrieval.encoder import bundled_model_path

    return AutoTokenizer.from_pretrained(bundled_model_path(), local_files_only=True)


def test_hf_tokenizer_counts_match_the_chunk_text(wordpiece):
    text = (
        "Naive Bayes-based Context Extension (NBCE) pools next-token distributions; "
        "CoSENT's ranking loss—scale 20—orders pairs. URLs like https://example.org/a?b=c&d=e "
        "and numbers 3.14159 or 1,000,000 split into many word pieces.\n\n"
    ) * 12
    chunks = chunk_text(text, wordpiece, chunk_tokens=64, overlap=16)
    assert len(chunks) > 5
    _check_word_safe(text, chunks)
    for c in chunks:
        n = len(wordpiece(c.text, add_special_tokens=False)["input_ids"])
        assert n == c.n_tokens <= 64


def test_default_chunks_fit_minilm(wordpiece):
    text = " ".join(["tokenization"] * 3000)
    chunks = chunk_text(text, wordpiece)  # defaults: 200 tokens, 32 overlap
    assert max(c.n_tokens for c in chunks) <= 200
    assert max(len(wordpiece(c.text)["input_ids"]) for c in chunks) <= 256  # with [CLS]/[SEP]


def test_decoder_windows_are_chunks_of_whole_words(tiny_tokenizer):
    """The decoder splits a long passage with chunk_text in the LLM's tokens: every window is
    a span of the passage made of whole words, within the row budget, overlapping the next."""
    from conftest import make_tiny_llama

    from nbce_rag import NBCEDecoder
    from nbce_rag.decoding.rows import passage_windows

    dec = NBCEDecoder(make_tiny_llama(len(tiny_tokenizer), max_positions=96), tiny_tokenizer)
    long = " ".join(f"Fact {i}: the river Thames flows through London." for i in range(40))
    cfg = dec.config.update(max_new_tokens=8, max_passage_tokens=40, window_overlap=8)
    windows = passage_windows(dec, long, room=80, cfg=cfg, idx=0)
    assert len(windows) > 3
    starts = []
    for w in windows:
        start = long.find(w)
        assert start >= 0 and (start == 0 or long[start - 1] == " ") and (start + len(w) == len(long) or long[start + len(w)] == " ")
        assert len(tiny_tokenizer(w, add_special_tokens=False)["input_ids"]) <= 40
        starts.append(start)
    assert starts == sorted(starts) and starts[0] == 0 and windows[-1].endswith("London.")
    assert all(long.find(windows[i + 1]) < long.find(windows[i]) + len(windows[i]) for i in range(len(windows) - 1))
    assert windows == [c.text for c in chunk_text(long, tiny_tokenizer, chunk_tokens=40, overlap=8)]
