"""``nbce-rag demo``: the quick start. Indexes a real corpus that needs no download (the Python
language reference that ships with CPython as ``pydoc_data.topics``), then answers a question
from it with NBCE and prints the answer with its numbered sources."""

from __future__ import annotations

import argparse
import logging
import re
import time
from typing import Any, Dict, Optional

from nbce_rag.commands.arguments import add_question, examples, positive_int, question_of

logger = logging.getLogger(__name__)

#: Language-reference topics indexed by the demo (statements; small enough to embed in seconds).
DEMO_TOPICS = [
    "assert", "break", "class", "continue", "del", "for", "global", "if", "import", "lambda",
    "nonlocal", "pass", "raise", "return", "try", "while", "with", "yield", "context-managers",
    "exceptions", "truth", "booleans",
]
DEFAULT_QUESTION = "What does the pass statement do?"

#: The demo's decoding settings, all explicit (and printed): greedy decoding, an answer of at
#: most ``max_new_tokens`` that ends at the first blank line (a 135M model tends to start a new,
#: unrelated paragraph there). The text is then trimmed by :func:`clean_answer` to its last
#: full sentence, before any sentence that repeats an earlier phrase.
#: ``no_repeat_ngram_size=4``: no 4-gram of tokens twice; the bundled 135M model loops on the
#: default question otherwise (benchmarks/RESULTS_generation.md). The library default stays off
#: (no measured gain on the quality benchmark); clean_answer stays as the last guard.
DEMO_OPTIONS: Dict[str, Any] = {"max_new_tokens": 96, "do_sample": False, "stop": ["\n\n"], "no_repeat_ngram_size": 4}
DEMO_K = 3


def register(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser(
        "demo",
        help="index the Python language reference (bundled with CPython) and answer a question",
        description="Build (once, cached) an index of Python's language reference from "
        "pydoc_data.topics with the bundled encoder, retrieve passages for QUESTION and answer "
        "with NBCE on the bundled SmolLM2-135M-Instruct, printing the settings and the sources. "
        f"The answer is greedy, at most {DEMO_OPTIONS['max_new_tokens']} tokens, stops at a blank line and "
        "is trimmed to its last full sentence.",
        epilog=examples(
            "nbce-rag demo",
            'nbce-rag demo "What does the with statement do?"',
            'nbce-rag demo "How do I leave a loop early?" -k 4 --max-new-tokens 128 --rebuild',
        ),
    )
    add_question(p, required=False, help=f"the question (default: {DEFAULT_QUESTION!r})")
    p.add_argument("--index-dir", default=None, metavar="DIR",
                   help="where to keep the demo index (default: the nbce-rag cache directory)")
    p.add_argument("-k", "--k", type=positive_int, default=DEMO_K, help=f"passages retrieved (default {DEMO_K})")
    p.add_argument("--max-new-tokens", type=positive_int, default=DEMO_OPTIONS["max_new_tokens"], metavar="N",
                   help=f"longest answer in tokens (default {DEMO_OPTIONS['max_new_tokens']})")
    p.add_argument("--rebuild", action="store_true", help="rebuild the demo index")
    p.set_defaults(func=run)


_SENTENCE_END = re.compile(r"""[.!?]["')\]]*$""")


def clean_answer(text: str, ngram: int = 5) -> str:
    """``text`` cut before the first sentence that repeats a phrase of ``ngram`` words (said
    before, or twice inside it) and trimmed to its last full sentence. A small model's greedy
    answer tends to loop and is cut mid-sentence by the token limit; this keeps what precedes
    that. When not even one full sentence is left, the text up to the repetition is returned
    with an ellipsis."""
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]
    seen: set = set()
    kept = []
    for s in sentences:
        words = re.findall(r"\w+", s.lower())
        grams = [tuple(words[i:i + ngram]) for i in range(len(words) - ngram + 1)]
        if len(set(grams)) < len(grams) or seen.intersection(grams):
            break
        seen.update(grams)
        kept.append(s)
    while kept and not _SENTENCE_END.search(kept[-1]):
        kept.pop()
    if kept:
        return " ".join(kept)
    first = sentences[0] if sentences else text.strip()
    spans = [(m.start(), m.group().lower()) for m in re.finditer(r"\w+", first)]
    grams: set = set()
    for i in range(len(spans) - ngram + 1):
        g = tuple(w for _, w in spans[i:i + ngram])
        if g in grams:  # the loop starts here: keep what comes before it
            first = first[: spans[i][0]]
            break
        grams.add(g)
    first = first.rstrip(" ,;:")
    return first + "\u2026" if first else ""


def demo_options(max_new_tokens: Optional[int] = None) -> Dict[str, Any]:
    """The decoding options the demo uses (:data:`DEMO_OPTIONS`, with ``max_new_tokens``)."""
    opts = dict(DEMO_OPTIONS)
    if max_new_tokens is not None:
        opts["max_new_tokens"] = max_new_tokens
    return opts


def demo_documents():
    from pydoc_data.topics import topics

    return [{"id": f"pydoc:{name}", "text": topics[name], "metadata": {"source": f"pydoc_data.topics[{name!r}]"}}
            for name in DEMO_TOPICS if name in topics]


def build_demo_index(path, rebuild: bool = False):
    from nbce_rag.retrieval.encoder import CoSENTEncoder
    from nbce_rag.retrieval.index import MANIFEST, VectorIndex
    from pathlib import Path

    path = Path(path)
    enc = CoSENTEncoder.from_pretrained()
    if (path / MANIFEST).exists() and not rebuild:
        return VectorIndex.load(path, encoder=enc)
    t0 = time.perf_counter()
    print(f"indexing the Python language reference once (cached in {path})...", flush=True)
    index = VectorIndex.build(enc, demo_documents(), show_progress_bar=True)  # tens of seconds on a CPU
    index.save(path)
    print(f"indexed {len(index)} chunks of the Python language reference in {time.perf_counter() - t0:.0f} s -> {path}")
    return index


def run(args) -> int:
    question = question_of(args) or DEFAULT_QUESTION
    options = demo_options(args.max_new_tokens)

    from nbce_rag.config import NBCEConfig
    from nbce_rag.models import cache_dir
    from nbce_rag.pipeline import RAGPipeline
    from nbce_rag.commands.generate import print_answer

    NBCEConfig().update(**options)  # checked before anything loads
    index = build_demo_index(args.index_dir or cache_dir() / "demo_index", rebuild=args.rebuild)
    rag = RAGPipeline.from_pretrained(index, threshold=None, k=args.k)
    print(f"settings: top-{args.k} passages, greedy, at most {options['max_new_tokens']} tokens, "
          f"stop at {options['stop']!r}, no repeated {options['no_repeat_ngram_size']}-gram, "
          "trimmed to the last full sentence")
    print(f"Q: {question}\n")
    ans = rag.ask(question, **options)
    ans.text = clean_answer(ans.text)
    print_answer(ans)
    return 0
