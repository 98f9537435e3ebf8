"""Token-based chunking with overlap that never cuts inside a word.

:func:`chunk_text` is a pure function: text in, :class:`Chunk` spans out. Sizes are measured
in the tokens of a given tokenizer (the encoder's for indexing, the LLM's for the decoder's
windows), so a chunk of ``chunk_tokens`` tokens fits the model it is made for.

Rules:

* A *word* is a maximal run of non-whitespace characters; in scripts written without spaces
  (Chinese and Japanese, with their punctuation) each character is a word. Chunks start at the first character
  of a word and end at the last character of a word, so no word is ever split and chunks
  carry no leading or trailing whitespace. ``chunk.text == text[chunk.start:chunk.end]``.
* A chunk holds as many whole words as fit in ``chunk_tokens`` tokens. A single word longer
  than that (a URL, a base64 blob) becomes a chunk of its own, marked ``oversized``; the
  encoder truncates it.
* Consecutive chunks share about ``overlap`` tokens: the next chunk starts at the earliest
  word such that the shared tail is at most ``overlap`` tokens and the next unseen word still
  fits, so every chunk starts later and ends later than the previous one (no chunk is
  contained in another, and chunking always progresses).
* When a paragraph break, or else a sentence end, falls in the last quarter of a full
  chunk, the chunk ends there instead (``prefer_boundaries``), which keeps sentences whole
  at almost no cost in chunk size.

Token counts come from tokenizing the whole text once with offsets (fast Hugging Face
tokenizers) and assigning each token to the word holding its last character; word-level
counts are therefore additive, exactly so for WordPiece (BERT) and up to merges across a
space for byte-level BPE. Without offsets, each word is tokenized alone. With
``tokenizer=None`` a token is a word.

Defaults for the bundled encoder (all-MiniLM-L6-v2, ``max_seq_length`` 256 word pieces):
``chunk_tokens=200``, ``overlap=32``, leaving room for [CLS]/[SEP] and tokenizer drift.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

#: Default chunk size and overlap, in encoder tokens (see the module docstring).
DEFAULT_CHUNK_TOKENS = 200
DEFAULT_OVERLAP = 32

#: Scripts written without spaces between words: each character counts as a word there.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3000-\u303f\uff00-\uffef"
_WORD = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")
_SENTENCE_END = re.compile(r"[.!?\u3002\uff01\uff1f][\"')\]\u201d\u2019]*$")

Tokenizer = Union[None, Callable[[str], int], Any]


@dataclass(frozen=True)
class Chunk:
    """A span of the original text: ``text == source[start:end]``."""

    text: str
    start: int  #: character offset of the first character in the source text
    end: int  #: character offset one past the last character
    n_tokens: int  #: tokens of the chunk (sum over its words)
    index: int  #: position among the chunks of the text
    oversized: bool = False  #: a single word longer than ``chunk_tokens``

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def chunk_text(
    text: str,
    tokenizer: Tokenizer = None,
    *,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    overlap: int = DEFAULT_OVERLAP,
    prefer_boundaries: bool = True,
) -> List[Chunk]:
    """Split ``text`` into overlapping chunks of at most ``chunk_tokens`` tokens.

    ``tokenizer``: a Hugging Face tokenizer, a callable ``str -> int`` (token count), or
    ``None`` (one token per whitespace-separated word). Special tokens are not counted.
    Returns ``[]`` for empty or whitespace-only text. Raises ``ValueError`` when
    ``chunk_tokens < 1`` or ``overlap`` is not in ``[0, chunk_tokens)``.
    """
    if not isinstance(text, str):
        raise TypeError(f"chunk_text() expects a str, got {type(text).__name__}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if not 0 <= overlap < chunk_tokens:
        raise ValueError(f"overlap must be in [0, chunk_tokens={chunk_tokens}), got {overlap}")
    spans = [(m.start(), m.end()) for m in _WORD.finditer(text)]
    if not spans:
        return []
    counts = word_token_counts(text, spans, tokenizer)
    return _pack(text, spans, counts, chunk_tokens, overlap, prefer_boundaries)


def word_token_counts(text: str, spans: Sequence[Tuple[int, int]], tokenizer: Tokenizer) -> List[int]:
    """Tokens per word span (each at least 1)."""
    if tokenizer is None:
        return [1] * len(spans)
    if getattr(tokenizer, "is_fast", False):
        return _counts_from_offsets(text, spans, tokenizer)
    if hasattr(tokenizer, "encode"):
        return [max(1, len(tokenizer.encode(text[a:b], add_special_tokens=False))) for a, b in spans]
    if callable(tokenizer):
        return [max(1, int(tokenizer(text[a:b]))) for a, b in spans]
    raise TypeError(f"tokenizer must be a Hugging Face tokenizer, a callable or None, got {type(tokenizer).__name__}")


def _counts_from_offsets(text: str, spans: Sequence[Tuple[int, int]], tokenizer: Any) -> List[int]:
    enc = tokenizer(
        text,
        add_special_tokens=False,
        return_offsets_mapping=True,
        return_attention_mask=False,
        return_token_type_ids=False,
        truncation=False,
        verbose=False,
    )
    starts = [a for a, _ in spans]
    counts = [0] * len(spans)
    for a, b in enc["offset_mapping"]:
        if b <= a:
            continue
        # the word holding the token's last character (BPE tokens carry a leading space)
        w = bisect.bisect_right(starts, b - 1) - 1
        if w < 0:
            w = 0
        counts[w] += 1
    return [max(1, c) for c in counts]


def _pack(
    text: str,
    spans: Sequence[Tuple[int, int]],
    counts: Sequence[int],
    chunk_tokens: int,
    overlap: int,
    prefer_boundaries: bool,
) -> List[Chunk]:
    n = len(spans)
    prefix = [0]
    for c in counts:
        prefix.append(prefix[-1] + c)

    def tokens(i: int, j: int) -> int:  # words [i, j)
        return prefix[j] - prefix[i]

    chunks: List[Chunk] = []
    i = 0
    prev_end = 0  # the previous chunk's end (in words): each chunk must end later
    while i < n:
        # largest j with tokens(i, j) <= chunk_tokens (at least one word)
        j = bisect.bisect_right(prefix, prefix[i] + chunk_tokens, lo=i + 1) - 1
        oversized = False
        if j <= i:
            j, oversized = i + 1, True
        if prefer_boundaries and j < n and j - i > 1:
            j = _boundary_end(text, spans, prefix, i, max(i, prev_end) + 1, j, chunk_tokens)
        prev_end = j
        a, b = spans[i][0], spans[j - 1][1]
        chunks.append(Chunk(text[a:b], a, b, tokens(i, j), len(chunks), oversized))
        if j >= n:
            break
        # next start: earliest k in (i, j] sharing at most `overlap` tokens with this chunk
        # and leaving room for word j, so that every chunk brings at least one new word
        k = bisect.bisect_left(prefix, max(prefix[j] - overlap, prefix[j + 1] - chunk_tokens), lo=i + 1, hi=j)
        i = max(k, i + 1)
    return chunks


def _boundary_end(
    text: str, spans: Sequence[Tuple[int, int]], prefix: Sequence[int], i: int, lo: int, j: int, budget: int
) -> int:
    """Move the end ``j`` back to a paragraph or sentence end in the last quarter of the chunk,
    but not below ``lo`` (words ``[i, e)`` with ``e >= lo``)."""
    floor = prefix[i] + (3 * budget) // 4
    best_sentence: Optional[int] = None
    for e in range(j, max(lo, i + 2) - 1, -1):  # candidate end: words [i, e)
        if prefix[e] < floor:
            break
        last_end = spans[e - 1][1]
        gap = text[last_end : spans[e][0]] if e < len(spans) else ""
        if "\n\n" in gap or "\n\r\n" in gap:
            return e
        if best_sentence is None and _SENTENCE_END.search(text[spans[e - 1][0] : last_end]):
            best_sentence = e
    return best_sentence or j
