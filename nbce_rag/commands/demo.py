"""``nbce-rag demo``: the quick start. Indexes a real corpus that needs no download (the Python
language reference that ships with CPython as ``pydoc_data.topics``), then answers a question
from it with NBCE and prints the answer with its numbered sources."""

from __future__ import annotations

import argparse
import logging
import time

logger = logging.getLogger(__name__)

#: Language-reference topics indexed by the demo (statements; small enough to embed in seconds).
DEMO_TOPICS = [
    "assert", "break", "class", "continue", "del", "for", "global", "if", "import", "lambda",
    "nonlocal", "pass", "raise", "return", "try", "while", "with", "yield", "context-managers",
    "exceptions", "truth", "booleans",
]
DEFAULT_QUESTION = "What does the pass statement do?"
#: decoding options of the demo (see run())
DEMO_OPTIONS = {"no_repeat_ngram_size": 4}


def register(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser(
        "demo",
        help="index the Python language reference (bundled with CPython) and answer a question",
        description="Build (once, cached) an index of Python's language reference from "
        "pydoc_data.topics with the bundled encoder, retrieve passages for QUESTION and answer "
        "with NBCE on the bundled SmolLM2-135M-Instruct, printing the sources.",
    )
    p.add_argument("question", nargs="?", default=DEFAULT_QUESTION, help=f"default: {DEFAULT_QUESTION!r}")
    p.add_argument("--index-dir", default=None, help="where to keep the demo index (default: the nbce-rag cache)")
    p.add_argument("-k", type=int, default=3, help="passages retrieved (default 3)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--rebuild", action="store_true", help="rebuild the demo index")
    p.set_defaults(func=run)


def demo_documents():
    from pydoc_data.topics import topics

    return [{"id": f"pydoc:{name}", "text": topics[name], "metadata": {"source": f"pydoc_data.topics[{name!r}]"}}
            for name in DEMO_TOPICS if name in topics]


def build_demo_index(path, rebuild: bool = False):
    from ..encoder import CoSENTEncoder
    from ..index import MANIFEST, VectorIndex
    from pathlib import Path

    path = Path(path)
    enc = CoSENTEncoder.from_pretrained()
    if (path / MANIFEST).exists() and not rebuild:
        return VectorIndex.load(path, encoder=enc)
    t0 = time.perf_counter()
    index = VectorIndex.build(enc, demo_documents())
    index.save(path)
    print(f"indexed {len(index)} chunks of the Python language reference in {time.perf_counter() - t0:.0f} s -> {path}")
    return index


def run(args) -> int:
    from ..models import cache_dir
    from ..pipeline import RAGPipeline
    from .generate import print_answer

    index = build_demo_index(args.index_dir or cache_dir() / "demo_index", rebuild=args.rebuild)
    rag = RAGPipeline.from_pretrained(index, threshold=None, k=args.k)
    print(f"Q: {args.question}\n")
    # no 4-gram of tokens twice: the bundled 135M model loops on this question otherwise
    # (benchmarks/RESULTS_generation.md); the library default stays off (no measured gain on data)
    ans = rag.ask(args.question, max_new_tokens=args.max_new_tokens, **DEMO_OPTIONS)
    print_answer(ans)
    return 0
